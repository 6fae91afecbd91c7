"""Dedup: exactly-once by the pipeline's key, with Redis claims that remember which Kafka position owns a key.

Each event's key is claimed in Redis for the event's position, in offset order; Redis answers the position that
owned the key before, if any (see clickhouse_etl.clients.claims, where a key repeated in one call is owned by
its first occurrence). The event is kept when the claim is new or when the existing owner is this very
position — a replay of the same range finds its own claims and keeps exactly what it kept.
"""

from __future__ import annotations

import polars as pl


def position_labels(events: pl.DataFrame) -> pl.Series:
    """The owner label stored in a claim: `<partition>:<offset>`."""
    return events.select(pl.format("{}:{}", "kafka_partition", "kafka_offset")).to_series()


def dedup_keys(events: pl.DataFrame, key: list[str]) -> pl.Series:
    """The key of each event as text: the field itself, or each field's length and text, so that no two
    different tuples of values give the same key (("a:b", "c") and ("a", "b:c") stay apart)."""
    if len(key) == 1:
        return events[key[0]].cast(pl.String)
    parts = [pl.format("{}:{}", pl.col(n).cast(pl.String).str.len_bytes(), pl.col(n).cast(pl.String)) for n in key]
    return events.select(pl.concat_str(parts, separator="|")).to_series()


def claim_namespace(prefix: str, topic: str) -> str:
    """`<prefix>:<topic>`: the claims of one topic under one prefix (two pipelines never share a prefix)."""
    return f"{prefix}:{topic}"


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
