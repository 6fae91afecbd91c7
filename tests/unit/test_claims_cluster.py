"""The pure parts of claims on a Redis Cluster: hash slots, the URL, the slot map, redirections, reply order."""

from __future__ import annotations

import time

import numpy as np
import polars as pl
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from redis.crc import key_slot as redis_py_key_slot

from clickhouse_etl.clients.redis_cluster import (
    ClusterUrl,
    SlotMap,
    _redirect_target,
    crc16,
    hashed_parts,
    in_batch_order,
    is_cluster_url,
    key_slots,
)

# `CLUSTER KEYSLOT <key>` as a Redis 7.0 server in cluster mode answered them.
KEYSLOTS_FROM_REDIS = {
    "foo": 12182,
    "bar": 5061,
    "hello": 866,
    "123456789": 12739,
    "ce:dedup:ad_clicks:c7f3a9-1": 16170,
    "{user1000}.following": 3443,
    "{user1000}.followers": 3443,
    "foo{}{bar}": 8363,  # the first {…} is empty: the whole key is hashed
    "foo{{bar}}zap": 4015,  # from the first { to the first } after it: "{bar"
    "foo{bar}{zap}": 5061,  # only the first tag counts: "bar"
    "{}": 15257,
    "{": 4092,
    "}": 12090,
    "": 0,
    "ce:dedup:ad_clicks:é-ü-中": 5702,
}


def test_crc16_is_xmodem() -> None:
    assert crc16(b"123456789") == 0x31C3  # the CRC16/XMODEM check value Redis Cluster's specification gives


def test_slots_are_the_ones_redis_computes() -> None:
    keys = pl.Series(list(KEYSLOTS_FROM_REDIS))
    assert key_slots(keys).tolist() == list(KEYSLOTS_FROM_REDIS.values())


@pytest.mark.parametrize("key", list(KEYSLOTS_FROM_REDIS))
def test_each_key_alone_gets_its_slot(key: str) -> None:
    """Alone, a key is its own common prefix: the prefix shortcut must still give the slot."""
    assert key_slots(pl.Series([key])).tolist() == [KEYSLOTS_FROM_REDIS[key]]


def test_hash_tags_follow_redis_rules() -> None:
    keys = pl.Series(["a{b}c", "a{}c{d}", "a{b{c}d", "no tag", "{x}", "a}b{c}", "}{", "{{}}"])
    assert hashed_parts(keys).to_list() == ["b", "a{}c{d}", "b{c", "no tag", "x", "c", "}{", "{"]


keys_with_braces = st.lists(
    st.text(alphabet=st.sampled_from(list("ab{}:é中\0-")), max_size=40), min_size=1, max_size=60
)


@settings(max_examples=300, deadline=None)
@given(suffixes=keys_with_braces, prefix=st.sampled_from(["", "ce:dedup:ad_clicks:", "{tag}:", "p{"]))
def test_slots_match_redis_py_on_any_keys(suffixes: list[str], prefix: str) -> None:
    keys = [prefix + suffix for suffix in suffixes]
    expected = [redis_py_key_slot(key.encode()) for key in keys]
    assert key_slots(pl.Series(keys)).tolist() == expected


def test_many_different_lengths_are_grouped_and_still_exact() -> None:
    keys = [f"k:{'x' * (i % 70)}{i}" for i in range(3_000)]  # 70 lengths: rounded groups with padding
    assert key_slots(pl.Series(keys)).tolist() == [redis_py_key_slot(k.encode()) for k in keys]


def test_a_million_keys_are_hashed_well_under_half_a_second() -> None:
    keys = "ce:dedup:ad_clicks:" + pl.Series([f"c{i:x}-{i}" for i in range(1_000_000)])
    key_slots(keys.head(1000))  # warm-up
    timings = []
    for _ in range(3):  # the best of three: the machine may be busy with something else for a moment
        started = time.perf_counter()
        slots = key_slots(keys)
        timings.append(time.perf_counter() - started)
    elapsed = min(timings)
    sample = np.random.default_rng(1).choice(keys.len(), 2_000, replace=False)
    assert [slots[i] for i in sample] == [redis_py_key_slot(keys[int(i)].encode()) for i in sample]
    assert elapsed < 0.5, f"{elapsed:.3f} s"


def test_cluster_urls() -> None:
    assert is_cluster_url("redis+cluster://h:1") and is_cluster_url("rediss+cluster://h:1")
    assert not is_cluster_url("redis://h:1/0")
    plain = ClusterUrl.parse("redis+cluster://10.0.0.1:7000,10.0.0.2:7001,[::1]:7002,redis.example")
    assert plain.seeds == (("10.0.0.1", 7000), ("10.0.0.2", 7001), ("::1", 7002), ("redis.example", 6379))
    assert (plain.username, plain.password, plain.tls) == (None, None, False)
    secret = ClusterUrl.parse("rediss+cluster://claims:p%40ss@h1:7000,h2:7000/0")
    assert (secret.username, secret.password, secret.tls) == ("claims", "p@ss", True)
    node = secret.node("h2", 7000)
    assert (node.host, node.port, node.db, node.username, node.password, node.tls) == (
        "h2",
        7000,
        0,
        "claims",
        "p@ss",
        True,
    )
    assert ClusterUrl.parse("redis+cluster://:only-password@h:1").password == "only-password"


@pytest.mark.parametrize(
    "url", ["redis://h:1", "redis+cluster://", "redis+cluster://h:1/2", "redis+cluster://h:port", "redis+cluster://:1"]
)
def test_bad_cluster_urls_are_refused(url: str) -> None:
    with pytest.raises(ValueError):
        ClusterUrl.parse(url)


def test_slot_map_from_cluster_slots() -> None:
    reply = [
        [0, 5460, [b"127.0.0.1", 7000, b"id-a"], [b"127.0.0.1", 7003, b"id-r"]],
        [5461, 10922, [b"", 7001, b"id-b"]],  # no endpoint given: the node that was asked
        [10923, 16383, [b"127.0.0.1", 7002, b"id-c"]],
        [16000, 16000, [b"127.0.0.1", 7000, b"id-a"]],  # a slot range of a node seen before
    ]
    slot_map = SlotMap.from_cluster_slots(reply, ("10.1.1.1", 7001))
    assert slot_map.nodes == (("127.0.0.1", 7000), ("10.1.1.1", 7001), ("127.0.0.1", 7002))
    assert slot_map.owner[[0, 5460, 5461, 10922, 10923, 16000, 16383]].tolist() == [0, 0, 1, 1, 2, 0, 2]
    moved = slot_map.moved(1, ("127.0.0.1", 7009))
    assert moved.nodes[-1] == ("127.0.0.1", 7009) and moved.owner[1] == 3 and moved.owner[2] == 0
    assert slot_map.owner[1] == 0  # the map itself is not changed


def test_partial_slot_map_marks_unserved_slots() -> None:
    slot_map = SlotMap.from_cluster_slots([[100, 200, [b"h", 1, b"x"]]], ("h", 1))
    assert (slot_map.owner[100:201] == 0).all() and (slot_map.owner[:100] == -1).all()


def test_redirect_targets() -> None:
    assert _redirect_target("MOVED 3999 127.0.0.1:6381", ("h", 1)) == (3999, ("127.0.0.1", 6381))
    assert _redirect_target("ASK 12 ::1:7002", ("h", 1)) == (12, ("::1", 7002))
    assert _redirect_target("MOVED 5 :7003", ("10.0.0.9", 7000)) == (5, ("10.0.0.9", 7003))


def test_replies_are_put_back_in_batch_order() -> None:
    parts = [
        (np.array([4, 0]), pl.Series("owner", [b"e", None], dtype=pl.Binary)),
        (np.array([], dtype=np.int64), pl.Series("owner", [], dtype=pl.Binary)),
        (np.array([3, 1, 2]), pl.Series("owner", [b"d", b"b", None], dtype=pl.Binary)),
    ]
    assert in_batch_order(parts, 5).to_list() == [None, b"b", None, b"d", b"e"]


@pytest.mark.parametrize("rows", [[0, 1], [0, 1, 1, 2], [0, 1, 3]])
def test_replies_that_do_not_cover_the_batch_once_are_a_bug(rows: list[int]) -> None:
    parts = [(np.array(rows), pl.Series("owner", [b"x"] * len(rows), dtype=pl.Binary))]
    with pytest.raises(AssertionError):
        in_batch_order(parts, 3)
