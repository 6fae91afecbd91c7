"""Redis claims of dedup keys, pipelined as raw RESP: `SET <key> <position> NX GET EX <ttl>` per key.

The commands of a whole batch are built column-wise with polars and streamed on one connection while the
replies are parsed by hiredis, so Python does no per-id work and Redis does one plain SET per id (no script).
Every key is a separate command, so the same stream works against one Redis server or, split by hash slot,
against the nodes of a Redis Cluster (`redis+cluster://host:port,host:port`, see
clickhouse_etl.clients.redis_cluster).

A claim that is sent twice answers the second time with its own position, which the dedup step keeps: so a
batch whose connection broke, or that met a Redis loading its dataset after a restart, is simply sent again
(with backoff, for at most `claims_wait_seconds`) before the call gives up with ClaimsUnavailable.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import polars as pl

from clickhouse_etl.clients import redis_cluster
from clickhouse_etl.clients.redis_resp import (
    ClaimsUnavailable,
    Patience,
    RedisAddress,
    RespConnection,
    TransientRedisError,
    owners_of,
    raise_for_error,
)

__all__ = ["ClaimsUnavailable", "claim", "claim_commands", "command_chunks"]

CHUNK = 100_000
ASKING = "*1\r\n$6\r\nASKING\r\n"


def claim_commands(keys: pl.Series, positions: pl.Series, ttl_seconds: int, asking: bool = False) -> bytes:
    """The RESP bytes of `SET key position NX GET EX ttl` for every (key, position), each after an `ASKING`
    when `asking` (a cluster node importing the slot accepts the key only then)."""
    tail = f"\r\n$2\r\nNX\r\n$3\r\nGET\r\n$2\r\nEX\r\n${len(str(ttl_seconds))}\r\n{ttl_seconds}\r\n"
    frame = pl.DataFrame({"key": keys, "position": positions})
    commands = frame.select(
        pl.concat_str(
            [
                pl.lit(f"{ASKING if asking else ''}*7\r\n$3\r\nSET\r\n$"),
                pl.col("key").str.len_bytes().cast(pl.String),
                pl.lit("\r\n"),
                pl.col("key"),
                pl.lit("\r\n$"),
                pl.col("position").str.len_bytes().cast(pl.String),
                pl.lit("\r\n"),
                pl.col("position"),
                pl.lit(tail),
            ]
        ).str.join("")
    ).item()
    return commands.encode() if commands else b""


def command_chunks(keys: pl.Series, positions: pl.Series, ttl_seconds: int, asking: bool = False) -> Iterator[bytes]:
    """The commands in chunks, built while earlier ones are being sent (memory stays at one chunk)."""
    for first in range(0, keys.len(), CHUNK):
        yield claim_commands(keys.slice(first, CHUNK), positions.slice(first, CHUNK), ttl_seconds, asking)


def claim(url: str, keys: pl.Series, positions: pl.Series, ttl_seconds: int, wait_seconds: float) -> pl.Series:
    """The previous owner of each key (null where this call made the claim).

    A transient outage (connection refused or lost, LOADING, a cluster failing over) is waited out for
    `wait_seconds` (default: the `claims_wait_seconds` setting); then, or at once for any other error,
    ClaimsUnavailable.
    """
    if keys.len() == 0:
        return pl.Series("owner", [], dtype=pl.String)
    patience = Patience(wait_seconds)
    if redis_cluster.is_cluster_url(url):

        def commands_for(indices: np.ndarray, asking: bool) -> Iterator[bytes]:
            return command_chunks(keys.gather(indices), positions.gather(indices), ttl_seconds, asking)

        return redis_cluster.send_by_slot(url, keys, commands_for, patience).cast(pl.String)
    address = RedisAddress.parse(url)
    while True:
        try:
            return _claim_on_server(address, keys, positions, ttl_seconds).cast(pl.String)
        except TransientRedisError as error:
            patience.pause(error)


def _claim_on_server(address: RedisAddress, keys: pl.Series, positions: pl.Series, ttl_seconds: int) -> pl.Series:
    with RespConnection(address) as connection:
        replies = connection.exchange(command_chunks(keys, positions, ttl_seconds), keys.len())
    owners, errors = owners_of(replies)
    if errors:
        raise_for_error(errors[0][1], f"at {address.label}")
    return owners
