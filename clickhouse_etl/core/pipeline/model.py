"""The pipeline model: what a pipeline file declares, validated into typed objects.

A pipeline reads one Kafka topic of JSON events and runs them through the same stages every time — decode,
dedup, enrich, filter, transform, (python), aggregate, load — each stage driven by a section below. The
structure is checked here (types, required keys, unknown keys); how the sections refer to each other's
columns is checked in `columns.py`, with the path of every problem.
"""

from __future__ import annotations

import ipaddress
import json
import re
from functools import cached_property
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator, model_validator

from clickhouse_etl.core.pipeline.types import FieldType

IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
PIPELINE_NAME = re.compile(r"^[a-z][a-z0-9_]{0,62}$")
TOPIC_NAME = re.compile(r"^[A-Za-z0-9._-]{1,249}$")
MODULE_FUNCTION = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")

# Columns every pipeline adds itself: when a row was processed and its Kafka position.
SYSTEM_COLUMNS = ("processed_at", "kafka_topic", "kafka_partition", "kafka_offset")
WINDOWS = ("minute", "hour", "day")
DEFAULT_ORDER_BY = ("kafka_topic", "kafka_partition", "kafka_offset")


def check_topic(value: str) -> str:
    if not TOPIC_NAME.match(value):
        raise ValueError(f"{value!r} is not a valid Kafka topic name")
    return value


def _identifier(value: str) -> str:
    if not IDENTIFIER.match(value):
        raise ValueError(f"{value!r} is not a plain identifier ([A-Za-z_][A-Za-z0-9_]*)")
    return value


def _as_list(value: Any) -> Any:
    """A single name may stand for a list of one; text from the environment may hold a comma list or JSON."""
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            return json.loads(text)
        return [item.strip() for item in text.split(",") if item.strip()]
    return value


Identifier = Annotated[str, BeforeValidator(lambda v: _identifier(str(v)) if isinstance(v, str) else v)]
NameList = Annotated[list[Identifier], BeforeValidator(_as_list)]


class Section(BaseModel):
    """Every section refuses unknown keys: a misspelt key is an error, never silently ignored."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class SourceField(Section):
    """One JSON field of the events; numeric strings are coerced, values that cannot be are dead-lettered."""

    type: str = Field(description="string, int64, float64, decimal(p,s), bool, timestamp(ms|s), ip or uuid")
    required: bool = Field(default=True, description="A missing or null value dead-letters the event")
    max_length: int | None = Field(default=None, ge=1, description="Longest text accepted (text fields)")
    allow_empty: bool = Field(default=True, description="Accept the empty string (text fields)")
    allow_control_characters: bool = Field(default=True, description="Accept control characters (text fields)")

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, value: Any) -> Any:
        return {"type": value} if isinstance(value, str) else value

    @field_validator("type")
    @classmethod
    def _check_type(cls, value: str) -> str:
        return str(FieldType.parse(value))

    @cached_property
    def field_type(self) -> FieldType:
        return FieldType.parse(self.type)

    @model_validator(mode="after")
    def _text_options(self) -> SourceField:
        text_only = self.max_length is not None or not self.allow_empty or not self.allow_control_characters
        if text_only and not self.field_type.is_text:
            raise ValueError("max_length, allow_empty and allow_control_characters apply to text fields only")
        return self


class Source(Section):
    topic: str = Field(description="Kafka topic of the JSON events")
    consumer_group: str | None = Field(
        default=None, description="Group whose offsets are committed for lag tools (default clickhouse-etl-<name>)"
    )
    max_message_bytes: int = Field(default=65_536, ge=64, description="Larger messages are dead-lettered")
    fields: dict[Identifier, SourceField] = Field(min_length=1, description="The JSON fields read; others ignored")

    @field_validator("topic")
    @classmethod
    def _check_topic(cls, value: str) -> str:
        return check_topic(value)


class Dedup(Section):
    key: NameList = Field(min_length=1, description="Field(s) whose values identify an event")
    ttl_seconds: int = Field(
        default=86_400,
        gt=0,
        description="How long a claim of a key is remembered in Redis: at least this, at most twice",
    )
    key_prefix: str | None = Field(
        default=None, min_length=1, description="Prefix of the Redis claim keys (default ce:dedup:<name>)"
    )


class LookupColumn(Section):
    type: str = Field(description="string, int64, float64, decimal(p,s), bool or uuid")
    column: Identifier | None = Field(default=None, description="Column of the lookup to read (default: same name)")

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, value: Any) -> Any:
        return {"type": value} if isinstance(value, str) else value

    @field_validator("type")
    @classmethod
    def _check_type(cls, value: str) -> str:
        parsed = FieldType.parse(value)
        if parsed.kind in ("timestamp", "ip"):
            raise ValueError(
                f"{parsed} is not a lookup column type; one of string, int64, float64, decimal(p,s), bool, uuid"
            )
        return str(parsed)

    @cached_property
    def field_type(self) -> FieldType:
        return FieldType.parse(self.type)


class Lookup(Section):
    """A PostgreSQL table (or read-only query) joined to the events, snapshotted once per run."""

    name: Identifier = Field(description="Name of the lookup (run metadata, assets)")
    table: str | None = Field(default=None, description="PostgreSQL table to read (optionally schema.table)")
    query: str | None = Field(default=None, description="Read-only SELECT to read instead of a table")
    join_key: NameList = Field(min_length=1, description="Event field(s) matched with the lookup's key")
    lookup_key: NameList | None = Field(default=None, description="Lookup column(s) of the key (default: join_key)")
    columns: dict[Identifier, LookupColumn] = Field(min_length=1, description="Columns added to the events")
    missing: Literal["keep", "drop", "dead_letter"] = Field(
        default="keep", description="An event without a lookup row: kept with NULLs, dropped, or dead-lettered"
    )
    fallback: Literal["fail", "last_good"] = Field(
        default="fail", description="PostgreSQL down: fail the run, or use the last snapshot a run read"
    )

    @field_validator("table")
    @classmethod
    def _check_table(cls, value: str | None) -> str | None:
        if value is not None:
            for part in value.split("."):
                _identifier(part)
        return value

    @model_validator(mode="after")
    def _table_or_query(self) -> Lookup:
        if (self.table is None) == (self.query is None):
            raise ValueError("give exactly one of table and query")
        if self.lookup_key is not None and len(self.lookup_key) != len(self.join_key):
            raise ValueError(f"lookup_key names {len(self.lookup_key)} columns, join_key {len(self.join_key)}")
        return self

    @property
    def key_columns(self) -> list[str]:
        return list(self.lookup_key or self.join_key)

    @property
    def asset_name(self) -> str:
        return self.table or self.name


class NetworkRule(Section):
    field: Identifier = Field(description="An ip field of the source")
    cidrs: list[str] = Field(description="IPv4/IPv6 networks whose events are dropped")

    @field_validator("cidrs", mode="before")
    @classmethod
    def _split(cls, value: Any) -> Any:
        return _as_list(value)

    @field_validator("cidrs")
    @classmethod
    def _check_networks(cls, value: list[str]) -> list[str]:
        for cidr in value:
            try:
                ipaddress.ip_network(cidr, strict=False)
            except ValueError as error:
                raise ValueError(f"{cidr!r} is not an IPv4 or IPv6 network: {error}") from None
        return value


class Filter(Section):
    drop_networks: list[NetworkRule] = Field(default_factory=list, description="CIDR rules on ip fields")
    drop_when: list[str] = Field(
        default_factory=list, description="SQL conditions; an event for which one is true is dropped"
    )


class ComputedColumn(Section):
    sql: str = Field(description="SQL expression over the columns so far, evaluated vectorized by polars")
    type: str | None = Field(default=None, description="Cast the result to this type (default: as computed)")
    nullable: bool | None = Field(
        default=None, description="May the result be NULL (default: when a column it reads may be)"
    )

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, value: Any) -> Any:
        return {"sql": value} if isinstance(value, str) else value

    @field_validator("type")
    @classmethod
    def _check_type(cls, value: str | None) -> str | None:
        return None if value is None else str(FieldType.parse(value))


class PythonStep(Section):
    """A deterministic DataFrame → DataFrame function, for logic that SQL expressions cannot say."""

    function: str = Field(description="module:function taking and returning a polars DataFrame")
    adds: dict[Identifier, str] = Field(default_factory=dict, description="Columns the function adds, with types")

    @field_validator("function")
    @classmethod
    def _check_function(cls, value: str) -> str:
        if not MODULE_FUNCTION.match(value):
            raise ValueError(f"{value!r} is not module:function")
        return value

    @field_validator("adds")
    @classmethod
    def _check_types(cls, value: dict[str, str]) -> dict[str, str]:
        return {name: str(FieldType.parse(text)) for name, text in value.items()}


MeasureFunction = Literal["count", "count_distinct", "sum", "min", "max"]


class Measure(Section):
    function: MeasureFunction
    column: Identifier | None = None
    partial_column: Identifier | None = Field(
        default=None, description="Column of the partials table holding this measure's state (default: its name)"
    )

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, value: Any) -> Any:
        """`count`, or `{sum: column}` (likewise count_distinct, min, max), optionally with partial_column."""
        if isinstance(value, str):
            return {"function": value}
        if isinstance(value, dict) and "function" not in value:
            functions = [key for key in value if key in ("count_distinct", "sum", "min", "max")]
            if len(functions) != 1:
                raise ValueError("a measure is count, or one of {count_distinct|sum|min|max: column}")
            rest = {key: item for key, item in value.items() if key != functions[0]}
            return {"function": functions[0], "column": value[functions[0]], **rest}
        return value

    @model_validator(mode="after")
    def _column_needed(self) -> Measure:
        if (self.function == "count") != (self.column is None):
            raise ValueError("count takes no column; count_distinct, sum, min and max take one")
        return self


class Aggregate(Section):
    """Tumbling-window aggregates kept exact across ranges, retries and replays."""

    name: Identifier
    time_column: Identifier = Field(description="Timestamp column whose windows the events fall in")
    group_by: NameList = Field(default_factory=list)
    measures: dict[Identifier, Measure] = Field(min_length=1)
    windows: dict[Literal["minute", "hour", "day"], Identifier] = Field(
        min_length=1, description="Window → name of the ClickHouse view holding its final values"
    )
    partials_table: Identifier | None = Field(
        default=None, description="Table of per-range partial aggregates (default <name>_partials)"
    )

    @property
    def finest_window(self) -> str:
        return min(self.windows, key=WINDOWS.index)

    @property
    def partials(self) -> str:
        return self.partials_table or f"{self.name}_partials"


class Sink(Section):
    table: Identifier = Field(description="ClickHouse table of the processed events")
    dead_letter_table: Identifier | None = Field(default=None, description="Default <table>_dead_letter")
    columns: NameList | None = Field(default=None, description="Columns of the table, in order (default: all)")
    order_by: NameList = Field(default_factory=lambda: list(DEFAULT_ORDER_BY))
    partition_by: str | None = Field(default=None, description="ClickHouse PARTITION BY expression")
    ttl: str | None = Field(default=None, description="ClickHouse TTL expression, e.g. event_time + INTERVAL 90 DAY")
    low_cardinality: NameList = Field(default_factory=list, description="String columns stored as LowCardinality")

    @property
    def dead_letters(self) -> str:
        return self.dead_letter_table or f"{self.table}_dead_letter"


class DagsterNames(Section):
    job: Identifier | None = Field(default=None, description="Name of the ingest job (default ingest_<name>)")
    sensor: Identifier | None = Field(default=None, description="Name of the sensor (default <name>_sensor)")


class Pipeline(Section):
    name: str = Field(description="Lower-case identifier of the pipeline")
    description: str = ""
    dagster: DagsterNames = Field(default_factory=DagsterNames)
    source: Source
    dedup: Dedup | None = None
    enrich: list[Lookup] = Field(default_factory=list)
    filter: Filter = Field(default_factory=Filter)
    transform: dict[Identifier, ComputedColumn] = Field(default_factory=dict)
    python: PythonStep | None = None
    aggregate: list[Aggregate] = Field(default_factory=list)
    sink: Sink

    @field_validator("name")
    @classmethod
    def _check_name(cls, value: str) -> str:
        if not PIPELINE_NAME.match(value):
            raise ValueError(f"{value!r} is not a pipeline name (lower-case letters, digits and _, from a letter)")
        return value

    # --- names derived from the declaration ---
    @property
    def topic(self) -> str:
        return self.source.topic

    @property
    def job_name(self) -> str:
        return self.dagster.job or f"ingest_{self.name}"

    @property
    def sensor_name(self) -> str:
        return self.dagster.sensor or f"{self.name}_sensor"

    @property
    def consumer_group(self) -> str:
        return self.source.consumer_group or f"clickhouse-etl-{self.name}"

    @property
    def dedup_key_prefix(self) -> str:
        return (self.dedup.key_prefix if self.dedup else None) or f"ce:dedup:{self.name}"

    @property
    def tables(self) -> list[str]:
        """Every ClickHouse table and view the pipeline writes or defines."""
        names = [self.sink.table, self.sink.dead_letters]
        for aggregate in self.aggregate:
            names += [aggregate.partials, *aggregate.windows.values()]
        return names

    def with_topic(self, topic: str) -> Pipeline:
        """The same pipeline reading another topic (tests, benchmarks, `--topic`)."""
        return self.model_copy(update={"source": self.source.model_copy(update={"topic": check_topic(topic)})})
