"""Redis claims of dedup keys: one script call claims up to a thousand keys of one hash.

A pipeline's claims live in hashes, `<namespace>:{<shard>}:<bucket>`: the key's shard (CRC16 of the key,
mod 256) spreads them over a Redis Cluster's nodes, and the bucket is the claim time in whole TTLs. Each call
(`EVAL`, see CLAIM_SCRIPT) looks the keys up in the buckets before, at and after the caller's clock (so
workers whose clocks disagree by less than a TTL still meet each other's claims), writes the missing ones
with their owner `<partition>:<offset>` into the current bucket and answers every key's previous owner. A
bucket expires two TTLs after it began: a claim lives at least its TTL, at most twice that.

Why hashes and a script rather than one `SET key owner NX GET EX ttl` per key: Redis spends most of a small
command on reading, dispatching and answering it. `HMGET`/`HSET` over a thousand fields do that once, which
cut Redis CPU per new claim from 3.2 to 5.8 µs down to 1.1 to 1.4 µs, and memory from 166 to 75 bytes per
claim (measured with clickhouse_etl.dev.claims_cost, docs/production.md). The script is atomic, so two runs
claiming the same key at once still see one winner, and Redis writes its effects (`HSET`, `PEXPIREAT`) to
the append-only file.

The commands of a whole batch are built column-wise with polars and streamed on one connection while hiredis
parses the replies. A claim sent twice answers the second time with its own position, which the dedup step
keeps: so a batch whose connection broke, or that met a Redis loading its dataset after a restart, is simply
sent again (with backoff, for at most `claims_wait_seconds`) before the call gives up with ClaimsUnavailable.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass

import hiredis
import numpy as np
import polars as pl

from clickhouse_etl.clients import redis_cluster
from clickhouse_etl.clients.redis_resp import (
    ClaimsUnavailable,
    Patience,
    RedisAddress,
    RespConnection,
    TransientRedisError,
    bulk,
    owners_of,
    raise_for_error,
)

__all__ = ["ClaimCalls", "ClaimsUnavailable", "claim", "claim_calls", "hash_key"]

SHARDS = 256  # hashes per bucket: enough to spread over a cluster's nodes, few enough for large calls
KEYS_PER_CALL = 1_000  # Lua's unpack() takes at most ~8,000 values; HSET gets two per new key
ASKING = b"*1\r\n$6\r\nASKING\r\n"

# KEYS: the shard's buckets before, at and after the caller's clock. ARGV: the current bucket's expiry (unix
# seconds), the number n of keys, the n keys, their n owners. Answers each key's previous owner (nil: new).
# The keys of a call are distinct (claim() makes them so): the script keeps no table of the keys it has seen,
# which cost Redis a tenth of its CPU per new claim or more (docs/production.md).
CLAIM_SCRIPT = """
local n = tonumber(ARGV[2])
local owners = redis.call('HMGET', KEYS[2], unpack(ARGV, 3, n + 2))
for _, other in ipairs({KEYS[1], KEYS[3]}) do
  if redis.call('EXISTS', other) == 1 then
    local found = redis.call('HMGET', other, unpack(ARGV, 3, n + 2))
    for i = 1, n do owners[i] = owners[i] or found[i] end
  end
end
local new, m = {}, 0
for i = 1, n do
  if not owners[i] then
    new[m + 1] = ARGV[2 + i]
    new[m + 2] = ARGV[n + 2 + i]
    m = m + 2
  end
end
if m > 0 then
  redis.call('HSET', KEYS[2], unpack(new, 1, m))
  redis.call('EXPIREAT', KEYS[2], ARGV[1])
end
return owners
""".strip()


def hash_key(namespace: str, shard: int, bucket: int) -> str:
    """The hash of one shard and bucket; the braces keep a shard's buckets in one cluster slot."""
    return f"{namespace}:{{{shard}}}:{bucket}"


def shards_of(keys: pl.Series) -> np.ndarray:
    """Each key's shard: its CRC16 (as a cluster hashes it) mod SHARDS, the same in every process."""
    return redis_cluster.key_slots(keys) % SHARDS


@dataclass(frozen=True)
class ClaimCalls:
    """The script calls claiming some rows of a batch, and how their replies map back to those rows."""

    chunks: list[bytes]  # one script call each
    keys_per_call: np.ndarray  # how many rows each call claims, in call order
    order: np.ndarray  # the rows' positions in the caller's rows, in the order the calls claim them

    def per_row(self, replies: list) -> list:
        """The owner replies (or each call's error, repeated) of every row, in the caller's row order."""
        flat = list(
            itertools.chain.from_iterable(
                reply if isinstance(reply, list) else itertools.repeat(reply, count)
                for reply, count in zip(replies, self.keys_per_call.tolist(), strict=True)
            )
        )
        if len(flat) != self.order.size:
            raise ClaimsUnavailable(f"Redis answered {len(flat)} owners for {self.order.size} claims")
        where = np.empty_like(self.order)
        where[self.order] = np.arange(self.order.size)
        return [flat[i] for i in where.tolist()]


def claim_calls(
    namespace: str,
    keys: pl.Series,
    positions: pl.Series,
    shards: np.ndarray,
    ttl_seconds: int,
    now: float,
    asking: bool = False,
) -> ClaimCalls:
    """The `EVAL` calls claiming `keys` (distinct) for `positions`, grouped by shard (each after an `ASKING` when
    `asking`: a cluster node importing the slot accepts the call only then)."""
    bucket = int(now // ttl_seconds)
    expire_at = str((bucket + 2) * ttl_seconds)
    frame = (
        pl.DataFrame({"key": keys, "position": positions, "shard": shards})
        .with_row_index("row")
        .sort("shard", maintain_order=True)
        .with_columns((pl.int_range(pl.len()).over("shard") // KEYS_PER_CALL).alias("part"))
    )
    as_bulk = [pl.format("${}\r\n{}\r\n", pl.col(name).str.len_bytes(), pl.col(name)) for name in ("key", "position")]
    calls = (
        frame.group_by("shard", "part", maintain_order=True)
        .agg(pl.len().alias("count"), *(text.str.join("").alias(f"{i}") for i, text in enumerate(as_bulk)))
        .to_dict(as_series=False)
    )
    script = bulk(CLAIM_SCRIPT)
    chunks = []
    for shard, count, key_bulks, position_bulks in zip(
        calls["shard"], calls["count"], calls["0"], calls["1"], strict=True
    ):
        buckets = (hash_key(namespace, shard, b) for b in (bucket - 1, bucket, bucket + 1))
        header = [b"*%d\r\n$4\r\nEVAL\r\n" % (8 + 2 * count), script, b"$1\r\n3\r\n"]
        header += [bulk(name) for name in (*buckets, expire_at, str(count))]
        chunks.append((ASKING if asking else b"") + b"".join(header) + (key_bulks + position_bulks).encode())
    return ClaimCalls(
        chunks=chunks,
        keys_per_call=np.asarray(calls["count"], dtype=np.int64),
        order=frame["row"].to_numpy(),
    )


def claim(
    url: str,
    namespace: str,
    keys: pl.Series,
    positions: pl.Series,
    ttl_seconds: int,
    wait_seconds: float,
    now: float | None = None,
) -> pl.Series:
    """The previous owner of each key of `namespace` (null where this call made the claim), claimed at `now`
    (unix seconds; default: this machine's clock). A key repeated in `keys` is owned by its first occurrence,
    as one `SET NX GET` per key would answer.

    A transient outage (connection refused or lost, LOADING, a cluster failing over) is waited out for
    `wait_seconds` (default: the `claims_wait_seconds` setting); then, or at once for any other error,
    ClaimsUnavailable.
    """
    if keys.len() == 0:
        return pl.Series("owner", [], dtype=pl.String)
    # The script claims distinct keys only (see CLAIM_SCRIPT): a repeated key is answered from its first occurrence.
    firsts = keys.is_first_distinct()
    distinct = bool(firsts.all())
    claimed_keys = keys if distinct else keys.filter(firsts)
    claimed_positions = positions if distinct else positions.filter(firsts)
    patience = Patience(wait_seconds)
    shards = shards_of(claimed_keys)
    if redis_cluster.is_cluster_url(url):
        # Every shard's hashes share one slot: the slot of a row is its shard's.
        shard_slots = redis_cluster.key_slots(pl.Series([hash_key(namespace, shard, 0) for shard in range(SHARDS)]))

        def calls_for(rows: np.ndarray, asking: bool) -> ClaimCalls:
            return claim_calls(
                namespace,
                claimed_keys.gather(rows),
                claimed_positions.gather(rows),
                shards[rows],
                ttl_seconds,
                now or time.time(),
                asking,
            )

        owners = redis_cluster.send_by_slot(url, shard_slots[shards], calls_for, patience)
    else:
        address = RedisAddress.parse(url)
        while True:
            try:
                calls = claim_calls(namespace, claimed_keys, claimed_positions, shards, ttl_seconds, now or time.time())
                owners = _claim_on_server(address, calls)
                break
            except TransientRedisError as error:
                patience.pause(error)
    owners = owners.cast(pl.String)
    return owners if distinct else owners_with_repeats(keys, positions, firsts, owners)


def owners_with_repeats(keys: pl.Series, positions: pl.Series, firsts: pl.Series, owners: pl.Series) -> pl.Series:
    """Every row's previous owner from `owners`, the answers for the first occurrences (`firsts`) alone: a later
    occurrence is owned by its first occurrence's previous owner, or by the first occurrence when that made the
    claim."""
    repeats = ~firsts
    first_keys = keys.filter(firsts)
    # Only the keys met again are looked up: a table of every first occurrence would cost twice as much.
    met_again = first_keys.is_in(keys.filter(repeats).implode())
    answers = (
        pl.DataFrame({"key": first_keys, "owner": owners, "first": positions.filter(firsts)})
        .filter(met_again)
        .select("key", later=pl.coalesce("owner", "first"))
    )
    later = pl.DataFrame({"key": keys.filter(repeats)}).join(
        answers, on="key", how="left", nulls_equal=True, maintain_order="left"
    )
    every_row = pl.repeat(None, keys.len(), dtype=pl.String, eager=True).alias("owner")
    return every_row.scatter(firsts.arg_true(), owners).scatter(repeats.arg_true(), later["later"])


def _claim_on_server(address: RedisAddress, calls: ClaimCalls) -> pl.Series:
    with RespConnection(address) as connection:
        replies = connection.exchange(calls.chunks, len(calls.chunks))
    errors = [reply for reply in replies if isinstance(reply, hiredis.ReplyError)]
    if errors:
        raise_for_error(errors[0], f"at {address.label}")
    owners, _ = owners_of(calls.per_row(replies))
    return owners
