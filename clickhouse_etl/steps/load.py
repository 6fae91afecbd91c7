"""Load: idempotent ClickHouse inserts of one offset range — dead letters, sink rows, aggregate partials.

A range's rows go in per window of at most INSERT_WINDOW offsets, each one insert block carrying the token
`<topic>/<partition>/<start>-<end>/<table>` of its window, so ClickHouse skips an insert it has seen inside its
deduplication window. Beyond the window, a unit whose rows are already present is not inserted again (a unit
is written all at once or not at all). A forced reload first deletes the range's rows and then inserts under
a token of its own.
"""

from __future__ import annotations

from dataclasses import dataclass

import polars as pl
from clickhouse_connect.driver.client import Client

from clickhouse_etl.core.ranges import OffsetRange, split_range

# An insert unit: at most this many offsets of a range, written as one block (present whole or not at all).
INSERT_WINDOW = 250_000
# One block per insert: a unit is present completely or not at all, and its token names one block.
SINGLE_BLOCK = {
    "max_insert_block_size": 100_000_000,
    "min_insert_block_size_rows": 100_000_000,
    "min_insert_block_size_bytes": 100_000_000_000,
}


@dataclass(frozen=True)
class RangeTables:
    """What one range writes: its sink rows, its dead letters, and each aggregate's partials by table."""

    sink_table: str
    rows: pl.DataFrame
    dead_letter_table: str
    dead_letters: pl.DataFrame
    partials: dict[str, pl.DataFrame]


@dataclass(frozen=True)
class TableLoad:
    table: str
    rows: int
    inserted: bool  # False: the range was already present (a replay), nothing written


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


def range_present(client: Client, database: str, table: str, offset_range: OffsetRange, partials: bool = False) -> bool:
    where, parameters = _range_condition(offset_range, partials)
    found = client.query(f"SELECT count() FROM `{database}`.`{table}` WHERE {where} LIMIT 1", parameters=parameters)
    return found.result_rows[0][0] > 0


def delete_range(client: Client, database: str, table: str, offset_range: OffsetRange, partials: bool = False) -> None:
    where, parameters = _range_condition(offset_range, partials)
    client.command(
        f"ALTER TABLE `{database}`.`{table}` DELETE WHERE {where}",
        parameters=parameters,
        settings={"mutations_sync": 2},
    )


def insert_range(
    client: Client,
    database: str,
    table: str,
    offset_range: OffsetRange,
    rows: pl.DataFrame,
    force_token: str | None = None,
    partials: bool = False,
) -> TableLoad:
    """Insert `rows` of the range unless already present; `force_token` replaces the range's rows instead."""
    if force_token is not None:
        delete_range(client, database, table, offset_range, partials)
    elif range_present(client, database, table, offset_range, partials):
        return TableLoad(table, rows.height, inserted=False)
    if rows.is_empty():
        return TableLoad(table, 0, inserted=False)
    token = offset_range.insert_token(table, "" if force_token is None else f"/{force_token}")
    client.insert_arrow(
        f"`{database}`.`{table}`",
        rows.rechunk().to_arrow(),
        settings={"insert_deduplication_token": token, "insert_deduplicate": 1, **SINGLE_BLOCK},
    )
    return TableLoad(table, rows.height, inserted=True)


def insert_by_offset_window(
    client: Client,
    database: str,
    table: str,
    offset_range: OffsetRange,
    rows: pl.DataFrame,
    force_token: str | None = None,
) -> TableLoad:
    """Rows of a range inserted per window of at most INSERT_WINDOW offsets, each window as one unit.

    Windows are fixed by offsets, not by rows, so a replay cuts them the same way and finds each one
    present or absent as a whole; an insert's memory stays bounded whatever the range size.
    """
    loads = []
    for window in split_range(
        offset_range.topic, offset_range.partition, offset_range.start, offset_range.end, INSERT_WINDOW
    ):
        in_window = rows.filter(pl.col("kafka_offset").is_between(window.start, window.end, closed="left"))
        loads.append(insert_range(client, database, table, window, in_window, force_token))
    return TableLoad(table, rows.height, inserted=any(load.inserted for load in loads))


def load_range(
    client: Client,
    database: str,
    offset_range: OffsetRange,
    tables: RangeTables,
    force_token: str | None = None,
) -> list[TableLoad]:
    """Dead letters, then the sink rows, then their partial aggregates: every insert idempotent."""
    loads = [
        insert_by_offset_window(
            client, database, tables.dead_letter_table, offset_range, tables.dead_letters, force_token
        ),
        insert_by_offset_window(client, database, tables.sink_table, offset_range, tables.rows, force_token),
    ]
    for table, partials in tables.partials.items():
        # Partials belong to the whole range: one insert, present or absent with the range.
        loads.append(insert_range(client, database, table, offset_range, partials, force_token, partials=True))
    return loads
