"""The claim client against scripted RESP servers: transient outages are waited out, final errors fail closed,
and on a cluster the keys follow MOVED and ASK to the node that serves them, in batch order.

The servers here speak just enough RESP for the claims (the claim script's `EVAL`, done here in Python,
`ASKING`, `CLUSTER SLOTS`); real Redis and a real cluster are in tests/integration.
"""

from __future__ import annotations

import random
import socket
import threading
import time
from collections.abc import Callable, Iterator

import hiredis
import numpy as np
import polars as pl
import pytest
from redis.crc import key_slot as redis_py_key_slot

from clickhouse_etl.clients import claims
from clickhouse_etl.clients.redis_cluster import _slot_maps, key_slots

Reply = bytes | None  # None: close the connection instead of answering


def bulk(value: bytes | None) -> bytes:
    return b"$-1\r\n" if value is None else b"$%d\r\n%s\r\n" % (len(value), value)


class FakeRedis:
    """A RESP server on loopback; `answer(connection number, command)` decides every reply."""

    def __init__(self, answer: Callable[[int, list[bytes]], Reply] | None = None, port: int = 0) -> None:
        self.store: dict[bytes, dict[bytes, bytes]] = {}  # hash → key → owner
        self.connections = 0
        self.answer = answer or (lambda _n, command: self.claim(command))
        self.listener = socket.create_server(("127.0.0.1", port))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def claim(self, command: list[bytes]) -> Reply:
        """The claim script: each key's owner in any of the three buckets, else the key claimed in the middle
        one (`EVAL script 3 before current after expiry n keys… owners…`)."""
        assert command[:3] == [b"EVAL", claims.CLAIM_SCRIPT.encode(), b"3"], command[:3]
        before, current, after = command[3:6]
        count = int(command[7])
        keys, owners = command[8 : 8 + count], command[8 + count :]
        assert len(owners) == count
        assert len(set(keys)) == count, "the keys of one call are distinct"
        answer = []
        for key, owner in zip(keys, owners, strict=True):
            found = [self.store[b][key] for b in (current, before, after) if key in self.store.get(b, {})]
            if not found:
                self.store.setdefault(current, {})[key] = owner
            answer.append(found[0] if found else None)
        return b"*%d\r\n" % count + b"".join(bulk(owner) for owner in answer)

    def claimed(self) -> set[bytes]:
        return {key for fields in self.store.values() for key in fields}

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self.listener.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._serve, args=(sock, self.connections), daemon=True).start()

    def _serve(self, sock: socket.socket, number: int) -> None:
        reader = hiredis.Reader()
        with sock:
            while data := sock.recv(1 << 16):
                reader.feed(data)
                out = []
                while (command := reader.gets()) is not False:
                    reply = self.answer(number, command)
                    if reply is None:
                        sock.sendall(b"".join(out))
                        return
                    out.append(reply)
                sock.sendall(b"".join(out))

    def close(self) -> None:
        self.listener.close()


@pytest.fixture
def fakes() -> Iterator[list[FakeRedis]]:
    servers: list[FakeRedis] = []
    yield servers
    for server in servers:
        server.close()
    _slot_maps.clear()


NAMESPACE = "ce:dedup:t"


def batch(count: int, prefix: str = "click-") -> tuple[pl.Series, pl.Series]:
    keys = pl.Series("key", [f"{prefix}{i}" for i in range(count)])
    return keys, pl.Series("position", [f"0:{i}" for i in range(count)])


def row_slots(keys: pl.Series) -> np.ndarray:
    """The cluster slot each key's claim goes to: its shard's hashes'."""
    shards = claims.shards_of(keys).tolist()
    return key_slots(pl.Series([claims.hash_key(NAMESPACE, shard, 0) for shard in shards]))


def hash_slots(node: FakeRedis) -> np.ndarray:
    return key_slots(pl.Series([name.decode() for name in node.store]))


def test_calls_group_keys_by_shard_and_answer_in_row_order() -> None:
    keys, positions = batch(5_000)
    keys = keys.shuffle(seed=3)
    shards = claims.shards_of(keys)
    calls = claims.claim_calls(NAMESPACE, keys, positions, shards, 3_600, now=7_200 * 100 + 5)
    commands = [hiredis.Reader() for _ in calls.chunks]
    parsed = []
    for reader, chunk in zip(commands, calls.chunks, strict=True):
        reader.feed(chunk)
        parsed.append(reader.gets())
    assert len(parsed) == claims.SHARDS and sum(calls.keys_per_call) == 5_000
    claimed = []
    for command, count in zip(parsed, calls.keys_per_call.tolist(), strict=True):
        before, current, after, expiry, n = command[3:8]
        assert 0 < count == int(n) <= claims.KEYS_PER_CALL and len(command) == 8 + 2 * count
        shard = int(current.decode().partition("{")[2].partition("}")[0])
        buckets = tuple(claims.hash_key(NAMESPACE, shard, bucket).encode() for bucket in (199, 200, 201))
        assert (before, current, after) == buckets
        assert int(expiry) == 202 * 3_600  # two TTLs after the current bucket began
        call_keys = [key.decode() for key in command[8 : 8 + count]]
        assert len(set(key_slots(pl.Series([before.decode(), current.decode(), after.decode()])))) == 1
        assert set(claims.shards_of(pl.Series(call_keys)).tolist()) == {shard}
        claimed += list(zip(call_keys, (p.decode() for p in command[8 + count :]), strict=True))
    assert sorted(claimed) == sorted(zip(keys.to_list(), positions.to_list(), strict=True))
    # Each call answers its keys' owners in the order it sent them; per_row puts them back in row order.
    replies = [list(command[8 + int(command[7]) :]) for command in parsed]
    assert calls.per_row(replies) == [p.encode() for p in positions]


def test_new_claims_then_their_owners(fakes: list[FakeRedis]) -> None:
    fakes.append(server := FakeRedis())
    keys, positions = batch(1_000)
    assert claims.claim(server.url, NAMESPACE, keys, positions, 60, wait_seconds=0).null_count() == 1_000
    others = pl.Series([f"1:{i}" for i in range(1_000)])
    assert claims.claim(server.url, NAMESPACE, keys, others, 60, wait_seconds=0).to_list() == positions.to_list()


def test_a_key_repeated_in_a_batch_is_sent_once_and_owned_by_its_first_occurrence(fakes: list[FakeRedis]) -> None:
    fakes.append(server := FakeRedis())
    claims.claim(server.url, NAMESPACE, pl.Series(["b"]), pl.Series(["1:7"]), 60, wait_seconds=0)
    keys = pl.Series(["a", "b", "a", "c", "b", "a"])
    positions = pl.Series([f"0:{offset}" for offset in range(6)])
    owners = claims.claim(server.url, NAMESPACE, keys, positions, 60, wait_seconds=0)
    assert owners.to_list() == [None, "1:7", "0:0", None, "1:7", "0:0"]
    assert server.claimed() == {b"a", b"b", b"c"}


def test_random_repeats_are_owned_as_one_set_if_absent_per_key_would_answer(fakes: list[FakeRedis]) -> None:
    """Every row of a batch with many repeats, some keys claimed before: a plain Python reference of one
    `SET NX GET` per key, in row order."""
    fakes.append(server := FakeRedis())
    rng = random.Random(5)
    before = {f"k{n}": f"1:{n}" for n in rng.sample(range(400), 100)}
    claims.claim(server.url, NAMESPACE, pl.Series(list(before)), pl.Series(list(before.values())), 60, wait_seconds=0)
    keys = [f"k{rng.randrange(400)}" for _ in range(2_000)]
    positions = [f"0:{offset}" for offset in range(2_000)]
    store, expected = dict(before), []
    for key, position in zip(keys, positions, strict=True):
        expected.append(store.get(key))
        store.setdefault(key, position)
    owners = claims.claim(server.url, NAMESPACE, pl.Series(keys), pl.Series(positions), 60, wait_seconds=0)
    assert owners.to_list() == expected


def test_loading_is_waited_out(fakes: list[FakeRedis]) -> None:
    loading_until = time.monotonic() + 0.5

    def answer(_number: int, command: list[bytes]) -> Reply:
        if time.monotonic() < loading_until:
            return b"-LOADING Redis is loading the dataset in memory\r\n"
        return server.claim(command)

    fakes.append(server := FakeRedis(answer))
    keys, positions = batch(500)
    assert claims.claim(server.url, NAMESPACE, keys, positions, 60, wait_seconds=10).null_count() == 500
    assert server.connections >= 2


def test_a_connection_lost_mid_batch_is_sent_again_and_keeps_what_it_claimed(fakes: list[FakeRedis]) -> None:
    calls = 0
    claimed_before_the_break: set[bytes] = set()

    def answer(number: int, command: list[bytes]) -> Reply:
        nonlocal calls
        if number == 1 and calls == 100:
            claimed_before_the_break.update(server.claimed())
            return None  # the connection breaks after 100 calls were answered
        calls += 1
        return server.claim(command)

    fakes.append(server := FakeRedis(answer))
    keys, positions = batch(5_000)
    owners = claims.claim(server.url, NAMESPACE, keys, positions, 60, wait_seconds=10)
    # What the broken attempt claimed, the resend finds owned by this very position; the rest is new.
    assert 0 < len(claimed_before_the_break) < 5_000 and server.connections == 2
    again = pl.Series([key.encode() in claimed_before_the_break for key in keys])
    assert owners.filter(again).to_list() == positions.filter(again).to_list()
    assert owners.filter(~again).null_count() == 5_000 - len(claimed_before_the_break)
    assert server.claimed() == set(keys.cast(pl.Binary).to_list())


def test_a_refused_connection_is_waited_out_until_redis_listens() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    servers: list[FakeRedis] = []
    threading.Timer(0.4, lambda: servers.append(FakeRedis(port=port))).start()
    keys, positions = batch(10)
    try:
        url = f"redis://127.0.0.1:{port}/0"
        assert claims.claim(url, NAMESPACE, keys, positions, 60, wait_seconds=10).null_count() == 10
    finally:
        for server in servers:
            server.close()


def test_a_final_error_fails_closed_at_once(fakes: list[FakeRedis]) -> None:
    fakes.append(server := FakeRedis(lambda _n, _c: b"-OOM command not allowed when used memory > 'maxmemory'.\r\n"))
    keys, positions = batch(10)
    started = time.monotonic()
    with pytest.raises(claims.ClaimsUnavailable, match="OOM"):
        claims.claim(server.url, NAMESPACE, keys, positions, 60, wait_seconds=30)
    assert time.monotonic() - started < 5 and server.connections == 1


def test_an_outage_longer_than_the_wait_fails_closed(fakes: list[FakeRedis]) -> None:
    fakes.append(server := FakeRedis(lambda _n, _c: b"-LOADING Redis is loading the dataset in memory\r\n"))
    keys, positions = batch(10)
    started = time.monotonic()
    with pytest.raises(claims.ClaimsUnavailable, match=r"still unavailable after 0.6 s.*LOADING"):
        claims.claim(server.url, NAMESPACE, keys, positions, 60, wait_seconds=0.6)
    assert 0.6 <= time.monotonic() - started < 3


def test_no_wait_fails_at_once_like_before(fakes: list[FakeRedis]) -> None:
    fakes.append(server := FakeRedis(lambda _n, _c: None))
    keys, positions = batch(10)
    with pytest.raises(claims.ClaimsUnavailable):
        claims.claim(server.url, NAMESPACE, keys, positions, 60, wait_seconds=0)


# --- a cluster of two fake nodes -------------------------------------------------------------------------


class FakeNode(FakeRedis):
    """A cluster node serving the slots below `split` (node A) or from it (node B)."""

    def __init__(self, low: bool) -> None:
        self.low = low
        self.asking: set[int] = set()
        self.cluster: tuple[FakeNode, FakeNode] | None = None
        super().__init__(self.serve)

    def serves(self, slot: int) -> bool:
        return (slot < SPLIT) == self.low

    def serve(self, number: int, command: list[bytes]) -> Reply:
        assert self.cluster is not None
        low, high = self.cluster
        name = command[0].upper()
        if name == b"CLUSTER":
            return (
                b"*2\r\n"
                + b"*3\r\n:0\r\n:%d\r\n*3\r\n$9\r\n127.0.0.1\r\n:%d\r\n$1\r\na\r\n" % (SPLIT - 1, low.port)
                + b"*3\r\n:%d\r\n:16383\r\n*3\r\n$9\r\n127.0.0.1\r\n:%d\r\n$1\r\nb\r\n" % (SPLIT, high.port)
            )
        if name == b"ASKING":
            self.asking.add(number)
            return b"+OK\r\n"
        slot = redis_py_key_slot(command[4])  # the current bucket's hash (its shard's hashes share a slot)
        asked, self.asking = number in self.asking, self.asking - {number}
        owner = low if slot < SPLIT else high
        if slot in MIGRATING and self is low:  # low is handing this slot to high: new keys go there
            if command[4] in self.store:
                return self.claim(command)
            return b"-ASK %d 127.0.0.1:%d\r\n" % (slot, high.port)
        if slot in MIGRATING and self is high:
            return self.claim(command) if asked else b"-MOVED %d 127.0.0.1:%d\r\n" % (slot, low.port)
        if owner is not self:
            return b"-MOVED %d 127.0.0.1:%d\r\n" % (slot, owner.port)
        return self.claim(command)


SPLIT = 8_192
MIGRATING: set[int] = set()


@pytest.fixture
def cluster(fakes: list[FakeRedis]) -> tuple[FakeNode, FakeNode]:
    low, high = FakeNode(low=True), FakeNode(low=False)
    low.cluster = high.cluster = (low, high)
    fakes.extend([low, high])
    return low, high


def test_cluster_claims_go_to_the_slot_owner_and_come_back_in_order(cluster: tuple[FakeNode, FakeNode]) -> None:
    low, high = cluster
    keys, positions = batch(2_000)
    url = f"redis+cluster://127.0.0.1:{low.port}"
    assert claims.claim(url, NAMESPACE, keys, positions, 60, wait_seconds=0).null_count() == 2_000
    slots = row_slots(keys)
    assert len(low.claimed()) == int((slots < SPLIT).sum()) and len(high.claimed()) == int((slots >= SPLIT).sum())
    assert (hash_slots(low) < SPLIT).all() and (hash_slots(high) >= SPLIT).all()
    others = pl.Series([f"1:{i}" for i in range(2_000)])
    assert claims.claim(url, NAMESPACE, keys, others, 60, wait_seconds=0).to_list() == positions.to_list()


def test_cluster_follows_moved_after_a_slot_changed_owner(cluster: tuple[FakeNode, FakeNode]) -> None:
    global SPLIT
    low, high = cluster
    keys, positions = batch(2_000)
    url = f"redis+cluster://127.0.0.1:{low.port}"
    claims.claim(url, NAMESPACE, *batch(10, prefix="first:"), 60, wait_seconds=0)  # the client learns the map
    SPLIT = 4_000  # slots 4000-8191 now belong to the high node: the low one answers MOVED
    try:
        assert claims.claim(url, NAMESPACE, keys, positions, 60, wait_seconds=5).null_count() == 2_000
        assert (hash_slots(high) >= 4_000).all() and (hash_slots(low) < 4_000).any()
    finally:
        SPLIT = 8_192


def test_cluster_follows_ask_during_a_migration(cluster: tuple[FakeNode, FakeNode]) -> None:
    low, high = cluster
    keys, positions = batch(2_000)
    slots = row_slots(keys)
    migrating = {int(s) for s in np.unique(slots[slots < SPLIT])[:40]}
    MIGRATING.update(migrating)
    try:
        url = f"redis+cluster://127.0.0.1:{low.port}"
        assert claims.claim(url, NAMESPACE, keys, positions, 60, wait_seconds=5).null_count() == 2_000
        assert {int(s) for s in hash_slots(high) if s < SPLIT} == migrating
        assert claims.claim(url, NAMESPACE, keys, keys, 60, wait_seconds=5).to_list() == positions.to_list()
    finally:
        MIGRATING.clear()
