"""Load: idempotent ClickHouse inserts of one offset range — dead letters, sink rows, aggregate partials.

A range's rows go in per unit: each table's rows per window of at most INSERT_WINDOW offsets (the partials
as one unit per range). A unit is one insert block carrying the token `<topic>/<partition>/<start>-<end>/<table>`
of its window, so ClickHouse skips an insert it has seen inside its deduplication window — also the parts
of a block that a PARTITION BY split, and wrote only some of, before a crash.

After its units, a range records one marker per unit (even an empty one) in the loads table, in one insert.
A unit with a marker is never written again, however long ago it was loaded: a replay reads the markers of
its range (one small query) instead of looking for rows in every table. Tables created before markers
existed are also checked for rows. A forced reload deletes the range's rows and markers, then inserts under
a token of its own.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime

import polars as pl
from clickhouse_connect.driver.client import Client

from clickhouse_etl.clients.clickhouse import insert_arrow
from clickhouse_etl.core.pipeline.ddl import COMMENT_KEY, LOADS, MARKED
from clickhouse_etl.core.ranges import OffsetRange

# An insert unit: at most this many offsets of a range, written as one block. It is also the window a run
# processes its range by (orchestration.batch): 125,000 keeps a run of a 1M range under 1 GiB peak RSS (998 MiB
# measured, against 1,062 MiB with 250,000), for 4 more inserts per table and million.
INSERT_WINDOW = 125_000
# One block per insert: a unit is present completely or not at all, and its token names one block.
SINGLE_BLOCK = {
    "max_insert_block_size": 100_000_000,
    "min_insert_block_size_rows": 100_000_000,
    "min_insert_block_size_bytes": 100_000_000_000,
}


@dataclass(frozen=True)
class WindowRows:
    """One insert window of a range: its sink rows and its dead letters."""

    window: OffsetRange
    rows: pl.DataFrame
    dead_letters: pl.DataFrame


@dataclass(frozen=True)
class RangeTables:
    """What one range writes: per insert window its sink rows and dead letters (produced one window at a time,
    so a range's rows are never all in memory), and each aggregate's partials by table."""

    sink_table: str
    dead_letter_table: str
    windows: Callable[[], Iterable[WindowRows]]  # the range's windows in order, each made when reached
    partials: dict[str, pl.DataFrame]


@dataclass(frozen=True)
class TableLoad:
    table: str
    rows: int
    inserted: bool  # False: the range was already present (a replay), nothing written


@dataclass(frozen=True)
class Unit:
    table: str
    window: OffsetRange
    rows: pl.DataFrame
    partials: bool  # a partials table: its rows carry range_start/range_end instead of offsets


def units_of(offset_range: OffsetRange, tables: RangeTables) -> Iterator[Unit]:
    """Per insert window its dead letters, then its sink rows; then each aggregate's partials for the range.

    Windows are fixed by offsets (INSERT_WINDOW from the range's start), not by rows, so a replay cuts them the
    same way and finds each one present or absent as a whole; an insert's memory stays bounded whatever the
    range size.
    """
    for window in tables.windows():
        assert window.window.size <= INSERT_WINDOW, window.window
        yield Unit(tables.dead_letter_table, window.window, window.dead_letters, partials=False)
        yield Unit(tables.sink_table, window.window, window.rows, partials=False)
    for table, partials in tables.partials.items():
        yield Unit(table, offset_range, partials, partials=True)


def unit_tables(tables: RangeTables) -> list[str]:
    """The tables a range's units write, in order."""
    return [tables.dead_letter_table, tables.sink_table, *tables.partials]


def _range_condition(offset_range: OffsetRange, partials: bool) -> tuple[str, dict[str, object]]:
    parameters = {
        "topic": offset_range.topic,
        "partition": offset_range.partition,
        "start": offset_range.start,
        "end": offset_range.end,
    }
    if partials:
        # Partials of any range overlapping this one: a replay of part of a loaded range adds nothing.
        where = (
            "kafka_topic = {topic:String} AND kafka_partition = {partition:UInt32} "
            "AND range_start < {end:UInt64} AND range_end > {start:UInt64}"
        )
    else:
        where = (
            "kafka_topic = {topic:String} AND kafka_partition = {partition:UInt32} "
            "AND kafka_offset >= {start:UInt64} AND kafka_offset < {end:UInt64}"
        )
    return where, parameters


def rows_present(client: Client, database: str, unit: Unit) -> bool:
    where, parameters = _range_condition(unit.window, unit.partials)
    found = client.query(
        f"SELECT count() FROM `{database}`.`{unit.table}` WHERE {where} LIMIT 1", parameters=parameters
    )
    return found.result_rows[0][0] > 0


def loaded_units(
    client: Client, database: str, offset_range: OffsetRange, tables: Iterable[str]
) -> dict[str, list[tuple[int, int]]]:
    """table → [start, end) of its units with a marker that overlap the range."""
    markers = client.query(
        f"SELECT table, range_start, range_end FROM `{database}`.{LOADS.name} "
        "WHERE kafka_topic = {topic:String} AND kafka_partition = {partition:UInt32} "
        "AND table IN {tables:Array(String)} AND range_start < {end:UInt64} AND range_end > {start:UInt64}",
        parameters={
            "topic": offset_range.topic,
            "partition": offset_range.partition,
            "tables": list(tables),
            "start": offset_range.start,
            "end": offset_range.end,
        },
    ).result_rows
    found: dict[str, list[tuple[int, int]]] = {}
    for table, start, end in markers:
        found.setdefault(table, []).append((start, end))
    return found


_marked: dict[tuple[str, str], bool] = {}


def marked_since_created(client: Client, database: str, table: str) -> bool:
    """Whether every range in the table has its marker (a table created with markers); asked once a process."""
    key = (database, table)
    if key not in _marked:
        comment = client.command(
            "SELECT comment FROM system.tables WHERE database = {db:String} AND name = {table:String}",
            parameters={"db": database, "table": table},
        )
        _marked[key] = f'"{MARKED}": true' in str(comment) and COMMENT_KEY in str(comment)
    return _marked[key]


def _delete(client: Client, database: str, table: str, where: str, parameters: dict[str, object]) -> None:
    client.command(
        f"ALTER TABLE `{database}`.`{table}` DELETE WHERE {where}",
        parameters=parameters,
        settings={"mutations_sync": 2},
    )


def _insert(client: Client, database: str, table: str, rows: pl.DataFrame, token: str) -> None:
    insert_arrow(
        client,
        f"`{database}`.`{table}`",
        rows.rechunk().to_arrow(),
        {"insert_deduplication_token": token, "insert_deduplicate": 1, **SINGLE_BLOCK},
    )


def load_range(
    client: Client,
    database: str,
    offset_range: OffsetRange,
    tables: RangeTables,
    force_token: str | None = None,
) -> list[TableLoad]:
    """Every unit of the range not loaded yet, then their markers; `force_token` replaces the range instead."""
    names = unit_tables(tables)
    suffix = "" if force_token is None else f"/{force_token}"
    if force_token is not None:
        for name in names:
            where, parameters = _range_condition(offset_range, partials=name in tables.partials)
            _delete(client, database, name, where, parameters)
        where, parameters = _range_condition(offset_range, partials=True)
        _delete(
            client,
            database,
            LOADS.name,
            f"{where} AND table IN {{tables:Array(String)}}",
            {**parameters, "tables": names},
        )
        markers: dict[str, list[tuple[int, int]]] = {}
    else:
        markers = loaded_units(client, database, offset_range, names)
    inserted: dict[str, bool] = dict.fromkeys(names, False)
    sizes = dict.fromkeys(names, 0)
    new_markers = []
    for unit in units_of(offset_range, tables):
        sizes[unit.table] += unit.rows.height
        if force_token is None:
            overlapping = any(
                start < unit.window.end and end > unit.window.start for start, end in markers.get(unit.table, [])
            )
            if overlapping or (
                not marked_since_created(client, database, unit.table) and rows_present(client, database, unit)
            ):
                continue
        if not unit.rows.is_empty():
            _insert(client, database, unit.table, unit.rows, unit.window.insert_token(unit.table, suffix))
            inserted[unit.table] = True
        new_markers.append((unit.table, unit.window, unit.rows.height))
    if new_markers:
        loaded_at = datetime.now(UTC)
        rows = pl.DataFrame(
            {
                "table": [table for table, _, _ in new_markers],
                "kafka_topic": [offset_range.topic] * len(new_markers),
                "kafka_partition": pl.Series([offset_range.partition] * len(new_markers), dtype=pl.UInt32),
                "range_start": pl.Series([w.start for _, w, _ in new_markers], dtype=pl.UInt64),
                "range_end": pl.Series([w.end for _, w, _ in new_markers], dtype=pl.UInt64),
                "rows": pl.Series([n for _, _, n in new_markers], dtype=pl.UInt64),
                "loaded_at": pl.Series([loaded_at] * len(new_markers), dtype=pl.Datetime("ms", "UTC")),
            }
        )
        _insert(client, database, LOADS.name, rows, offset_range.insert_token(LOADS.name, suffix))
    return [TableLoad(name, sizes[name], inserted[name]) for name in names]
