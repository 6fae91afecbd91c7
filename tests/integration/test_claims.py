"""The claim script on the stack's real Redis: how long a claim is met, by clocks that disagree, and one winner
per key when runs claim the same keys at once."""

from __future__ import annotations

import threading
import time
import uuid

import polars as pl
import pytest
import redis

from clickhouse_etl.clients import claims
from clickhouse_etl.core.settings import Settings
from clickhouse_etl.dev import claims_cost

from .helpers import free_port

TTL = 600


def batch(count: int, owner: str) -> tuple[pl.Series, pl.Series]:
    offsets = pl.int_range(0, count, eager=True)
    return "click-" + offsets.cast(pl.String), f"{owner}:" + offsets.cast(pl.String)


def test_a_claim_is_met_for_a_ttl_and_by_clocks_up_to_a_ttl_apart(base_settings: Settings) -> None:
    url, namespace = base_settings.redis_url, f"test:claims:{uuid.uuid4().hex}"
    keys, positions = batch(5_000, "0")
    bucket = int(time.time()) // TTL + 1  # one that begins in the future: its hashes do not expire meanwhile
    written = bucket * TTL + 1
    assert claims.claim(url, namespace, keys, positions, TTL, 5, now=written).null_count() == 5_000
    _, others = batch(5_000, "1")
    # Workers whose clocks are behind (up to a TTL), and claims one and almost two TTLs later.
    for now in (written - 2, written - TTL + 1, written + TTL, written + 2 * TTL - 2):
        assert claims.claim(url, namespace, keys, others, TTL, 5, now=now).to_list() == positions.to_list(), now
    # Two TTLs later the bucket is no longer looked at (and Redis has let it expire by then).
    assert claims.claim(url, namespace, keys, others, TTL, 5, now=written + 2 * TTL).null_count() == 5_000
    client = redis.Redis.from_url(url)
    hashes = sorted(name.decode() for name in client.scan_iter(match=f"{namespace}:*", count=1_000))
    assert len(hashes) == 2 * claims.SHARDS
    for name in hashes:
        written_bucket = int(name.rpartition(":")[2])
        assert written_bucket in (bucket, bucket + 2)
        assert client.expiretime(name) == (written_bucket + 2) * TTL
    assert sum(client.hlen(name) for name in hashes) == 10_000


def test_runs_claiming_the_same_keys_at_once_see_one_owner_each(base_settings: Settings) -> None:
    url, namespace = base_settings.redis_url, f"test:claims:{uuid.uuid4().hex}"
    answers: dict[str, list[str | None]] = {}
    start = threading.Barrier(4)

    def run(owner: str) -> None:
        keys, positions = batch(50_000, owner)
        start.wait()
        answers[owner] = claims.claim(url, namespace, keys, positions, TTL, 5).to_list()

    threads = [threading.Thread(target=run, args=(str(partition),)) for partition in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for row in range(50_000):
        seen = {owner: answers[owner][row] for owner in answers}
        winners = [owner for owner, previous in seen.items() if previous is None]
        assert len(winners) == 1, seen
        assert all(previous == f"{winners[0]}:{row}" for owner, previous in seen.items() if owner != winners[0])


def test_namespaces_do_not_share_claims(base_settings: Settings) -> None:
    url = base_settings.redis_url
    keys, positions = batch(1_000, "0")
    for namespace in (f"test:claims:{uuid.uuid4().hex}:a", f"test:claims:{uuid.uuid4().hex}:b"):
        assert claims.claim(url, namespace, keys, positions, TTL, 5).null_count() == 1_000


def test_a_key_repeated_in_one_batch_is_owned_by_its_first_occurrence(base_settings: Settings) -> None:
    url, namespace = base_settings.redis_url, f"test:claims:{uuid.uuid4().hex}"
    keys = pl.Series(["a", "b", "a", "c", "b", "a"])
    positions = pl.Series([f"0:{offset}" for offset in range(6)])
    owners = claims.claim(url, namespace, keys, positions, TTL, 5).to_list()
    assert owners == [None, None, "0:0", None, "0:1", "0:0"]
    assert claims.claim(url, namespace, keys, positions, TTL, 5).to_list() == ["0:0", "0:1", "0:0", "0:3", "0:1", "0:0"]


def test_claim_hashes_are_hash_tables_from_their_first_claim(base_settings: Settings) -> None:
    """The stack's Redis keeps no claim hash as a listpack, which it searches field by field (docs/production.md)."""
    url, namespace = base_settings.redis_url, f"test:claims:{uuid.uuid4().hex}"
    keys, positions = batch(10, "0")
    assert claims.claim(url, namespace, keys, positions, TTL, 5).null_count() == 10
    client = redis.Redis.from_url(url)
    hashes = list(client.scan_iter(match=f"{namespace}:*", count=1_000))
    assert hashes and {client.object("encoding", name) for name in hashes} == {b"hashtable"}


@pytest.mark.parametrize("previous_bucket", [False, True])
def test_claims_cost_measures_the_first_ttl_or_the_steady_state(base_settings: Settings, previous_bucket: bool) -> None:
    """`clickhouse_etl.dev.claims_cost --previous-bucket` claims in a bucket whose previous one holds claims, so
    that every call also looks there, as from a pipeline's second TTL on; without it, in the first bucket alone."""
    figures = claims_cost.measure(2_000, 2, free_port(), (), restart=False, previous_bucket=previous_bucket)
    assert figures["previous_bucket"] is previous_bucket
    assert figures["hashes"] == (2 if previous_bucket else 1) * claims.SHARDS
    for kind in ("redis_cpu_us_per_new_claim", "redis_cpu_us_per_duplicate"):
        assert len(figures[kind]) == 2 and all(value > 0 for value in figures[kind])
