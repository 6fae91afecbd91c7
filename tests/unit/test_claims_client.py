"""The claim client against scripted RESP servers: transient outages are waited out, final errors fail closed,
and on a cluster the keys follow MOVED and ASK to the node that serves them, in batch order.

The servers here speak just enough RESP for the claims (`SET key value NX GET EX ttl`, `ASKING`,
`CLUSTER SLOTS`); real Redis and a real cluster are in tests/integration.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator

import hiredis
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
        self.store: dict[bytes, bytes] = {}
        self.connections = 0
        self.answer = answer or (lambda _n, command: self.claim(command))
        self.listener = socket.create_server(("127.0.0.1", port))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def claim(self, command: list[bytes]) -> Reply:
        """`SET key value NX GET …` as Redis does it: the previous value, and the new one only if none."""
        assert command[0].upper() == b"SET" and b"NX" in command and b"GET" in command, command
        previous = self.store.setdefault(command[1], command[2])
        return bulk(None if previous is command[2] else previous)

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


def batch(count: int, prefix: str = "ce:dedup:t:") -> tuple[pl.Series, pl.Series]:
    keys = pl.Series("key", [f"{prefix}{i}" for i in range(count)])
    return keys, pl.Series("position", [f"0:{i}" for i in range(count)])


def test_new_claims_then_their_owners(fakes: list[FakeRedis]) -> None:
    fakes.append(server := FakeRedis())
    keys, positions = batch(1_000)
    assert claims.claim(server.url, keys, positions, 60, wait_seconds=0).null_count() == 1_000
    others = pl.Series([f"1:{i}" for i in range(1_000)])
    assert claims.claim(server.url, keys, others, 60, wait_seconds=0).to_list() == positions.to_list()


def test_loading_is_waited_out(fakes: list[FakeRedis]) -> None:
    loading_until = time.monotonic() + 0.5

    def answer(_number: int, command: list[bytes]) -> Reply:
        if time.monotonic() < loading_until:
            return b"-LOADING Redis is loading the dataset in memory\r\n"
        return server.claim(command)

    fakes.append(server := FakeRedis(answer))
    keys, positions = batch(500)
    assert claims.claim(server.url, keys, positions, 60, wait_seconds=10).null_count() == 500
    assert server.connections >= 2


def test_a_connection_lost_mid_batch_is_sent_again_and_keeps_what_it_claimed(fakes: list[FakeRedis]) -> None:
    answered = []

    def answer(number: int, command: list[bytes]) -> Reply:
        if number == 1 and len(answered) == 300:
            return None  # the connection breaks after 300 claims were made
        answered.append(command[1])
        return server.claim(command)

    fakes.append(server := FakeRedis(answer))
    keys, positions = batch(1_000)
    owners = claims.claim(server.url, keys, positions, 60, wait_seconds=10)
    # The first 300 were claimed by the broken attempt: the resend finds them owned by this very position.
    assert owners.head(300).to_list() == positions.head(300).to_list()
    assert owners.tail(700).null_count() == 700


def test_a_refused_connection_is_waited_out_until_redis_listens() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    servers: list[FakeRedis] = []
    threading.Timer(0.4, lambda: servers.append(FakeRedis(port=port))).start()
    keys, positions = batch(10)
    try:
        assert claims.claim(f"redis://127.0.0.1:{port}/0", keys, positions, 60, wait_seconds=10).null_count() == 10
    finally:
        for server in servers:
            server.close()


def test_a_final_error_fails_closed_at_once(fakes: list[FakeRedis]) -> None:
    fakes.append(server := FakeRedis(lambda _n, _c: b"-OOM command not allowed when used memory > 'maxmemory'.\r\n"))
    keys, positions = batch(10)
    started = time.monotonic()
    with pytest.raises(claims.ClaimsUnavailable, match="OOM"):
        claims.claim(server.url, keys, positions, 60, wait_seconds=30)
    assert time.monotonic() - started < 5 and server.connections == 1


def test_an_outage_longer_than_the_wait_fails_closed(fakes: list[FakeRedis]) -> None:
    fakes.append(server := FakeRedis(lambda _n, _c: b"-LOADING Redis is loading the dataset in memory\r\n"))
    keys, positions = batch(10)
    started = time.monotonic()
    with pytest.raises(claims.ClaimsUnavailable, match=r"still unavailable after 0.6 s.*LOADING"):
        claims.claim(server.url, keys, positions, 60, wait_seconds=0.6)
    assert 0.6 <= time.monotonic() - started < 3


def test_no_wait_fails_at_once_like_before(fakes: list[FakeRedis]) -> None:
    fakes.append(server := FakeRedis(lambda _n, _c: None))
    keys, positions = batch(10)
    with pytest.raises(claims.ClaimsUnavailable):
        claims.claim(server.url, keys, positions, 60, wait_seconds=0)


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
        slot = redis_py_key_slot(command[1])
        asked, self.asking = number in self.asking, self.asking - {number}
        owner = low if slot < SPLIT else high
        if slot in MIGRATING and self is low:  # low is handing this slot to high: new keys go there
            if command[1] in self.store:
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
    assert claims.claim(url, keys, positions, 60, wait_seconds=0).null_count() == 2_000
    slots = key_slots(keys)
    assert len(low.store) == int((slots < SPLIT).sum()) and len(high.store) == int((slots >= SPLIT).sum())
    others = pl.Series([f"1:{i}" for i in range(2_000)])
    assert claims.claim(url, keys, others, 60, wait_seconds=0).to_list() == positions.to_list()


def test_cluster_follows_moved_after_a_slot_changed_owner(cluster: tuple[FakeNode, FakeNode]) -> None:
    global SPLIT
    low, high = cluster
    keys, positions = batch(2_000)
    url = f"redis+cluster://127.0.0.1:{low.port}"
    claims.claim(url, *batch(10, prefix="first:"), 60, wait_seconds=0)  # the client learns the map
    SPLIT = 4_000  # slots 4000-8191 now belong to the high node: the low one answers MOVED
    try:
        assert claims.claim(url, keys, positions, 60, wait_seconds=5).null_count() == 2_000
        assert all(key_slots(pl.Series([k.decode() for k in high.store])) >= 4_000)
    finally:
        SPLIT = 8_192


def test_cluster_follows_ask_during_a_migration(cluster: tuple[FakeNode, FakeNode]) -> None:
    low, high = cluster
    keys, positions = batch(2_000)
    slots = key_slots(keys)
    migrating = {int(s) for s in slots[slots < SPLIT][:200]}
    MIGRATING.update(migrating)
    try:
        url = f"redis+cluster://127.0.0.1:{low.port}"
        assert claims.claim(url, keys, positions, 60, wait_seconds=5).null_count() == 2_000
        moved_keys = {k.decode() for k in high.store}
        assert {int(s) for s in key_slots(pl.Series(sorted(moved_keys))) if s < SPLIT} == migrating
        assert claims.claim(url, keys, keys, 60, wait_seconds=5).to_list() == positions.to_list()
    finally:
        MIGRATING.clear()
