"""Dedup: exactly-once by click_id, with Redis claims that remember which Kafka position owns an id.

Inside a batch the first occurrence (lowest offset) of an id is the candidate; each candidate is claimed in
Redis with `SET key position NX GET`. The id is kept when the claim is new or when the existing owner is
this very position — a replay of the same range finds its own claims and keeps exactly what it kept.
"""

from __future__ import annotations

import polars as pl

# One round trip claims a whole chunk: ids and positions travel as two newline-joined strings (ids never
# contain control characters: decode rejects them), and the script answers one newline-joined string of the
# previous owner per id, empty where the claim is new. Keys are built inside the script, so it needs a
# single Redis node.
CLAIM_SCRIPT = """
local prefix, ttl = ARGV[1], tonumber(ARGV[2])
local positions = string.gmatch(ARGV[4], "[^\\n]+")
local previous, i = {}, 1
for id in string.gmatch(ARGV[3], "[^\\n]+") do
  previous[i] = redis.call('SET', prefix .. id, positions(), 'NX', 'GET', 'EX', ttl) or ''
  i = i + 1
end
return table.concat(previous, '\\n')
"""


def position_labels(events: pl.DataFrame) -> pl.Series:
    """The owner label stored in a claim: `<partition>:<offset>`."""
    return events.select(pl.format("{}:{}", "kafka_partition", "kafka_offset")).to_series()


def first_in_batch(events: pl.DataFrame) -> pl.Series:
    """True for the first occurrence of each click_id, by offset, within one batch."""
    return events.select(pl.col("kafka_offset") == pl.col("kafka_offset").min().over("click_id")).to_series()


def owners_from_reply(reply: bytes | str) -> pl.Series:
    """The previous owners of one claim chunk, from the script's newline-joined answer (null: new claim)."""
    text = reply.decode() if isinstance(reply, bytes) else reply
    owners = pl.Series("owner", [text], dtype=pl.String).str.split("\n").explode()
    return owners.replace("", None)


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
