"""ClickHouse DDL generated from a pipeline, and the plan that brings existing tables in line — or refuses.

Tables: the sink table, its dead letters, and per aggregate a partials table (one row per window and group
per offset range, so ranges merge exactly) with one view per window returning final values. Every table
keeps a non-replicated insert deduplication window, so an insert whose token was seen is skipped.

A changed pipeline meets tables that already hold rows. A new nullable column is added; everything else
that would change existing rows' meaning (a type change, a new column without a value for old rows, a
removed column, another ORDER BY, another dedup key, a new measure) is refused with the way to migrate.
No existing row is ever touched.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

import polars as pl

from clickhouse_etl.core.pipeline.columns import AggregateColumns, PipelineColumns
from clickhouse_etl.core.pipeline.model import Pipeline
from clickhouse_etl.core.pipeline.types import DATETIME_MS, Column

DEAD_LETTER_COLUMNS = (
    Column("kafka_topic", pl.String(), low_cardinality=True),
    Column("kafka_partition", pl.UInt32()),
    Column("kafka_offset", pl.UInt64()),
    Column("raw_value", pl.Binary()),
    Column("error", pl.String()),
    Column("failed_at", DATETIME_MS),
)
WINDOW_START = {"minute": "toStartOfMinute", "hour": "toStartOfHour", "day": "toStartOfDay"}
COMMENT_KEY = "clickhouse_etl"
MARKED = "load_markers"  # in a table's comment: every range in it has a marker in the loads table


class SchemaChangeRefused(RuntimeError):
    """The tables hold rows the pipeline's change would misread; the message says how to migrate."""


@dataclass(frozen=True)
class TableSpec:
    """One table as the pipeline wants it."""

    name: str
    columns: list[Column]
    order_by: list[str]
    indexes: list[str] = field(default_factory=list)  # column names with a minmax skipping index
    partition_by: str | None = None
    ttl: str | None = None
    comment: dict[str, object] | None = None
    kind: str = "sink"  # sink | dead_letter | partials | loads


@dataclass(frozen=True)
class ExistingTable:
    """A table or view as the database's system tables describe it."""

    columns: dict[str, str]  # name → ClickHouse type, in table order
    sorting_key: str = ""
    comment: str = ""
    indexes: frozenset[str] = frozenset()


# Which insert units (a table's window of a range) are loaded: one row each, written after the unit.
LOADS = TableSpec(
    "clickhouse_etl_loads",
    [
        Column("table", pl.String(), low_cardinality=True),
        Column("kafka_topic", pl.String(), low_cardinality=True),
        Column("kafka_partition", pl.UInt32()),
        Column("range_start", pl.UInt64()),
        Column("range_end", pl.UInt64()),
        Column("rows", pl.UInt64()),
        Column("loaded_at", DATETIME_MS),
    ],
    ["kafka_topic", "kafka_partition", "table", "range_start"],
    kind="loads",
)


def _quote(text: str) -> str:
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def table_specs(pipeline: Pipeline, columns: PipelineColumns) -> list[TableSpec]:
    """The pipeline's tables, and the loads table every pipeline shares."""
    sink = pipeline.sink
    sink_names = columns.sink_names
    # Minmax indexes: per-run checks read only the windows a range touched, and loads find a range's rows
    # fast even when the table is not ordered by Kafka position.
    indexes = [a.aggregate.time_column for a in columns.aggregates if a.aggregate.time_column in sink_names]
    if sink.order_by[:3] != ["kafka_topic", "kafka_partition", "kafka_offset"]:
        indexes.append("kafka_offset")
    specs = [
        LOADS,
        TableSpec(
            sink.dead_letters,
            list(DEAD_LETTER_COLUMNS),
            ["kafka_topic", "kafka_partition", "kafka_offset"],
            kind="dead_letter",
        ),
        TableSpec(
            sink.table,
            columns.sink,
            list(sink.order_by),
            indexes=list(dict.fromkeys(indexes)),
            partition_by=sink.partition_by,
            ttl=sink.ttl,
            comment={"pipeline": pipeline.name, "dedup_key": pipeline.dedup.key if pipeline.dedup else None},
        ),
    ]
    for aggregate in columns.aggregates:
        specs.append(
            TableSpec(
                aggregate.aggregate.partials,
                aggregate.partials_columns(),
                ["kafka_topic", "kafka_partition", "range_start", aggregate.window_column],
                kind="partials",
            )
        )
    return specs


def _on_cluster(cluster: str | None) -> str:
    return f" ON CLUSTER {_quote(cluster)}" if cluster else ""


def create_database(database: str, cluster: str | None = None) -> str:
    return f"CREATE DATABASE IF NOT EXISTS `{database}`{_on_cluster(cluster)}"


def create_table(database: str, spec: TableSpec, dedup_window: int, cluster: str | None = None) -> str:
    """The table's DDL; on a cluster (`cluster`) a ReplicatedMergeTree with its deduplication window."""
    lines = [f"`{c.name}` {c.clickhouse_type()}" for c in spec.columns]
    lines += [f"INDEX {name}_minmax `{name}` TYPE minmax GRANULARITY 1" for name in spec.indexes]
    engine = "MergeTree"
    window = f"non_replicated_deduplication_window = {int(dedup_window)}"
    if cluster:
        engine = f"ReplicatedMergeTree('/clickhouse/tables/{{shard}}/{database}/{spec.name}', '{{replica}}')"
        window = f"replicated_deduplication_window = {int(dedup_window)}"
    clauses = [f"ENGINE = {engine}", f"ORDER BY ({', '.join(f'`{name}`' for name in spec.order_by)})"]
    if spec.partition_by:
        clauses.append(f"PARTITION BY {spec.partition_by}")
    if spec.ttl:
        clauses.append(f"TTL {spec.ttl}")
    clauses.append(f"SETTINGS {window}")
    # A table created here is marked as a whole: every range loaded into it has its marker in the loads table.
    comment = {**(spec.comment or {}), MARKED: True}
    clauses.append(f"COMMENT {_quote(json.dumps({COMMENT_KEY: comment}, sort_keys=True))}")
    body = ",\n    ".join(lines)
    name = f"`{database}`.`{spec.name}`{_on_cluster(cluster)}"
    return f"CREATE TABLE IF NOT EXISTS {name} (\n    {body}\n) " + "\n".join(clauses)


def measure_sql(aggregate: AggregateColumns, name: str) -> str:
    """The final value of a measure from its partial states."""
    measure = aggregate.aggregate.measures[name]
    state = f"`{aggregate.states[name].name}`"
    return {
        "count": f"toUInt64(sum({state}))",
        "count_distinct": f"toUInt64(uniqExactArray({state}))",
        "sum": f"sum({state})",
        "min": f"min({state})",
        "max": f"max({state})",
    }[measure.function]


def create_view(database: str, aggregate: AggregateColumns, window: str, view: str, cluster: str | None = None) -> str:
    finest = aggregate.window_column
    window_sql = f"`{finest}`" if window == finest else f"{WINDOW_START[window]}(`{finest}`)"
    groups = [f"`{c.name}`" for c in aggregate.group_by]
    measures = [f"{measure_sql(aggregate, name)} AS `{name}`" for name in aggregate.aggregate.measures]
    select = ", ".join([f"{window_sql} AS `{window}`", *groups, *measures])
    return (
        f"CREATE OR REPLACE VIEW `{database}`.`{view}`{_on_cluster(cluster)} AS SELECT {select} "
        f"FROM `{database}`.`{aggregate.aggregate.partials}` GROUP BY {', '.join([f'`{window}`', *groups])}"
    )


def _normalized(text: str) -> str:
    return re.sub(r"[\s`]", "", text)


def _nullable(clickhouse_type: str) -> bool:
    inner = clickhouse_type.removeprefix("LowCardinality(")
    return inner.startswith("Nullable(")


def _comment(existing: ExistingTable) -> dict[str, object]:
    try:
        return json.loads(existing.comment).get(COMMENT_KEY, {})
    except (json.JSONDecodeError, AttributeError):
        return {}


def plan_changes(database: str, spec: TableSpec, existing: ExistingTable) -> list[str]:
    """ALTER statements that bring `existing` in line with `spec`; raises SchemaChangeRefused otherwise."""
    table = f"`{database}`.`{spec.name}`"
    refusals = []
    wanted = {c.name: c.clickhouse_type() for c in spec.columns}
    statements = []
    previous = None
    for column in spec.columns:
        have = existing.columns.get(column.name)
        want = wanted[column.name]
        if have is None:
            if not _nullable(want) or spec.kind == "partials":
                refusals.append(_new_column_refusal(spec, column.name))
            else:
                after = f" AFTER `{previous}`" if previous else " FIRST"
                statements.append(f"ALTER TABLE {table} ADD COLUMN IF NOT EXISTS `{column.name}` {want}{after}")
        elif _normalized(have) != _normalized(want):
            refusals.append(
                f"column {column.name} is {have} in {spec.name}, the pipeline makes it {want}: ClickHouse would "
                f"convert the rows already there. Migrate it yourself (ALTER TABLE {spec.name} MODIFY COLUMN …, "
                f"after checking every row converts) or write to a new table (sink.table) and backfill it"
            )
        previous = column.name
    for name, have in existing.columns.items():
        if name not in wanted and not _nullable(have) and spec.kind != "partials":
            refusals.append(
                f"column {name} ({have}) of {spec.name} is no longer produced: new rows would hold its default "
                f"value as if it were data. Keep the field in the pipeline, make the column Nullable "
                f"(ALTER TABLE {spec.name} MODIFY COLUMN {name} Nullable(…)), or write to a new table"
            )
    if _normalized(existing.sorting_key) != _normalized(", ".join(spec.order_by)):
        refusals.append(
            f"{spec.name} is ordered by ({existing.sorting_key}), the pipeline asks for ({', '.join(spec.order_by)}): "
            "the order of a table cannot change in place. Write to a new table (sink.table) and backfill it"
        )
    if spec.comment is not None:
        recorded = _comment(existing)
        marked = recorded.pop(MARKED, False)
        if "dedup_key" in recorded and recorded["dedup_key"] != spec.comment["dedup_key"]:
            refusals.append(
                f"the dedup key of {spec.name} was {recorded['dedup_key']}, now {spec.comment['dedup_key']}: claims "
                "made under the old key would not recognise the events already loaded, so they could be loaded "
                "again. Restore the key, or write to a new table (sink.table) with a new dedup.key_prefix"
            )
        elif recorded != spec.comment:
            text = json.dumps({COMMENT_KEY: {**spec.comment, **({MARKED: True} if marked else {})}}, sort_keys=True)
            statements.append(f"ALTER TABLE {table} MODIFY COMMENT {_quote(text)}")
    for name in spec.indexes:
        if f"{name}_minmax" in existing.indexes:
            continue
        statements.append(
            f"ALTER TABLE {table} ADD INDEX IF NOT EXISTS {name}_minmax `{name}` TYPE minmax GRANULARITY 1"
        )
    if refusals:
        raise SchemaChangeRefused(f"table {spec.name}: " + f"\ntable {spec.name}: ".join(refusals))
    return statements


def _new_column_refusal(spec: TableSpec, name: str) -> str:
    if spec.kind == "partials":
        return (
            f"measure or group column {name} is new to {spec.name}: the windows already loaded hold no state for "
            "it, so its values would be wrong for them. Declare it in a new aggregate (a name and partials table of "
            "its own) and backfill with --force the ranges it should cover"
        )
    return (
        f"column {name} is new and not nullable: the rows already in {spec.name} have no value for it. Declare it "
        "nullable (required: false, or nullable: true on a transform), or write to a new table and backfill it"
    )


def view_columns(aggregate: AggregateColumns, window: str) -> list[str]:
    return [window, *(c.name for c in aggregate.group_by), *aggregate.aggregate.measures]


def schema_statements(
    pipeline: Pipeline,
    columns: PipelineColumns,
    database: str,
    dedup_window: int,
    existing: Mapping[str, ExistingTable],
    database_exists: bool = False,
) -> list[str]:
    """What to run so the pipeline's tables and views exist and fit it — nothing when they do (a user
    allowed only to read and insert can then run the pipeline); raises SchemaChangeRefused."""
    statements = [] if database_exists else [create_database(database)]
    refusals = []
    for spec in table_specs(pipeline, columns):
        if spec.name in existing:
            try:
                statements += plan_changes(database, spec, existing[spec.name])
            except SchemaChangeRefused as refused:
                refusals.append(str(refused))
        else:
            statements.append(create_table(database, spec, dedup_window))
    if refusals:
        raise SchemaChangeRefused(f"pipeline {pipeline.name}: refused to change its tables:\n" + "\n".join(refusals))
    for aggregate in columns.aggregates:
        for window, view in aggregate.aggregate.windows.items():
            present = existing.get(view)
            if present is None or list(present.columns) != view_columns(aggregate, window):
                statements.append(create_view(database, aggregate, window, view))
    return statements


def all_statements(
    pipeline: Pipeline, columns: PipelineColumns, database: str, dedup_window: int, cluster: str | None = None
) -> list[str]:
    """Every statement of the pipeline's database, tables and views, for a database administrator to run
    (on a cluster: replicated tables, each statement ON CLUSTER)."""
    statements = [create_database(database, cluster)]
    statements += [create_table(database, spec, dedup_window, cluster) for spec in table_specs(pipeline, columns)]
    for aggregate in columns.aggregates:
        for window, view in aggregate.aggregate.windows.items():
            statements.append(create_view(database, aggregate, window, view, cluster))
    return statements
