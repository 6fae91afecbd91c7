"""Dedup: exactly-once by click_id, with Redis claims that remember which Kafka position owns an id.

Inside a batch the first occurrence (lowest offset) of an id is the candidate; each candidate is claimed in
Redis with `SET key position NX GET` (see clickhouse_etl.claims). The id is kept when the claim is new or
when the existing owner is this very position — a replay of the same range finds its own claims and keeps
exactly what it kept.
"""

from __future__ import annotations

import polars as pl


def position_labels(events: pl.DataFrame) -> pl.Series:
    """The owner label stored in a claim: `<partition>:<offset>`."""
    return events.select(pl.format("{}:{}", "kafka_partition", "kafka_offset")).to_series()


def first_in_batch(events: pl.DataFrame) -> pl.Series:
    """True for the first occurrence of each click_id, by offset, within one batch."""
    return events.select(pl.col("kafka_offset") == pl.col("kafka_offset").min().over("click_id")).to_series()


def kept_by_claims(
    positions: list[str] | pl.Series, previous_owners: list[bytes | str | None] | pl.Series
) -> pl.Series:
    """True where the claim is new or already owned by this position (a replay)."""
    if isinstance(previous_owners, pl.Series):
        owners = previous_owners.cast(pl.String)
    else:
        owners = pl.Series([o.decode() if isinstance(o, bytes) else o for o in previous_owners], dtype=pl.String)
    mine = positions if isinstance(positions, pl.Series) else pl.Series(positions, dtype=pl.String)
    return (owners.is_null() | (owners == mine)).alias("kept")
