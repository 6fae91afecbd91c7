"""Claims on a Redis Cluster: each batch split by hash slot and streamed to every primary at once.

`REDIS_URL=redis+cluster://[user:password@]host:port[,host:port…]` (`rediss+cluster://` for TLS) names a
cluster by some of its nodes (seeds). The slot map comes from `CLUSTER SLOTS` and is kept per process.

Keys are hashed to slots column-wise (CRC16/XMODEM mod 16384 over the whole batch in numpy, with Redis
Cluster's `{hash tag}` rule). A batch's rows, each with the slot it goes to, are grouped by the primary that
owns the slot, and each group's commands streamed as raw RESP on one connection per primary, the primaries in
parallel threads. The replies are put back in the batch's order. Rows a node no longer serves come back as
`MOVED` (the map is read again and the rows resent) or `ASK` during a slot migration (resent to the named
node after `ASKING`); a node that is gone, loading, or a cluster that is down for a failover is waited out
with backoff within the claim call's patience, after which the call fails closed with ClaimsUnavailable.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol
from urllib.parse import unquote

import hiredis
import numpy as np
import polars as pl

from clickhouse_etl.clients.redis_resp import (
    TRANSIENT_ERRORS,
    ClaimsUnavailable,
    Patience,
    RedisAddress,
    RespConnection,
    TransientRedisError,
    command,
    error_code,
    owners_of,
)

SLOTS = 16_384
CLUSTER_SCHEMES = {"redis+cluster": False, "rediss+cluster": True}  # scheme → TLS
# Rounds that only met redirections before the call backs off: a slot migrating back and forth settles.
REDIRECT_ROUNDS_WITHOUT_PAUSE = 5

# ---------------------------------------------------------------------------------------------------------
# The URL
# ---------------------------------------------------------------------------------------------------------


def is_cluster_url(url: str) -> bool:
    return url.partition("://")[0].lower() in CLUSTER_SCHEMES


@dataclass(frozen=True)
class ClusterUrl:
    """A cluster named by seed nodes, and the credentials and TLS every node is reached with."""

    seeds: tuple[tuple[str, int], ...]
    username: str | None
    password: str | None
    tls: bool

    @classmethod
    def parse(cls, url: str) -> ClusterUrl:
        scheme, separator, rest = url.partition("://")
        if not separator or scheme.lower() not in CLUSTER_SCHEMES:
            raise ValueError(f"not a Redis Cluster URL (redis+cluster:// or rediss+cluster://): {url!r}")
        location, _, path = rest.partition("/")
        path = path.partition("?")[0]
        if path not in ("", "0"):
            raise ValueError(f"a Redis Cluster has only database 0, the URL names database {path!r}")
        userinfo, _, hosts = location.rpartition("@")
        username, _, password = userinfo.partition(":")
        seeds = tuple(_host_port(seed) for seed in hosts.split(",") if seed.strip())
        if not seeds:
            raise ValueError(f"a Redis Cluster URL needs at least one host:port: {url!r}")
        return cls(
            seeds=seeds,
            username=unquote(username) or None,
            password=unquote(password) or None,
            tls=CLUSTER_SCHEMES[scheme.lower()],
        )

    def node(self, host: str, port: int) -> RedisAddress:
        return RedisAddress(host=host, port=port, username=self.username, password=self.password, tls=self.tls)


def _host_port(text: str) -> tuple[str, int]:
    text = text.strip()
    if text.startswith("["):  # [IPv6]:port
        host, _, port = text[1:].partition("]")
        port = port.removeprefix(":")
    else:
        host, _, port = text.rpartition(":") if ":" in text else (text, "", "")
    if not host or (port and not port.isdigit()):
        raise ValueError(f"{text!r} is not host:port")
    return host, int(port or 6379)


# ---------------------------------------------------------------------------------------------------------
# Hash slots, for a whole batch at once
# ---------------------------------------------------------------------------------------------------------


def _crc_step(registers: np.ndarray, byte: np.ndarray | int) -> np.ndarray:
    """CRC16/XMODEM (polynomial 0x1021, initial 0) registers after one more byte each."""
    return ((registers << 8) & 0xFFFF).astype(np.uint16) ^ _BYTE_TABLE[((registers >> 8) ^ byte) & 0xFF]


def _byte_table() -> np.ndarray:
    table = np.arange(256, dtype=np.uint32) << 8
    for _ in range(8):
        table = np.where(table & 0x8000, (table << 1) ^ 0x1021, table << 1) & 0xFFFF
    return table.astype(np.uint16)


_BYTE_TABLE = _byte_table()
# Two bytes at a time: the 16-bit register is shifted out completely by two bytes, so the register after
# them depends only on (register XOR the two bytes as a big-endian word): one table lookup per two bytes.
_WORD_TABLE = _crc_step(_crc_step(np.arange(65_536, dtype=np.uint16), 0), 0)


def crc16(data: bytes) -> int:
    """CRC16/XMODEM of one byte string (for prefixes and tests; batches go through key_slots)."""
    register = np.zeros(1, dtype=np.uint16)
    for byte in data:
        register = _crc_step(register, byte)
    return int(register[0])


def hashed_parts(keys: pl.Series) -> pl.Series:
    """What Redis Cluster hashes of each key: the content of the first `{…}` if that is not empty, else the
    whole key. (`[^}]*` after the first `{` reaches the first `}` after it, as Redis looks for it.)"""
    braced = keys.str.contains("{", literal=True)
    if not braced.any():
        return keys
    rows = braced.arg_true()  # the regular expression only where it can match: user data rarely has braces
    some = keys.gather(rows)
    tags = some.str.extract(r"\{([^}]*)\}", 1)
    hashed = pl.select(pl.when(tags.str.len_bytes() > 0).then(tags).otherwise(some)).to_series()
    return keys.clone().scatter(rows, hashed)


def _crc16_rows(rows: np.ndarray) -> np.ndarray:
    """CRC16 of every row of a (n, width) byte matrix, one column pair at a time over all rows."""
    registers = np.zeros(rows.shape[0], dtype=np.uint16)
    first = rows.shape[1] & 1
    if first:
        registers = _BYTE_TABLE[rows[:, 0]]  # the step from a zero register
    words = rows[:, first:].view(">u2")
    for column in range(words.shape[1]):
        registers = _WORD_TABLE[registers ^ words[:, column]]
    return registers


def _crc16_all(texts: pl.Series) -> np.ndarray:
    """CRC16 of every text, right-aligned in matrices of equal width.

    Leading zero bytes leave a zero CRC register at zero, so a text padded in front with NULs to its group's
    width has its own CRC. Texts are grouped by exact length when there are few lengths (no padding at all),
    else by length rounded up to 16 bytes (at most 15 bytes of padding each, and few groups).
    """
    lengths = texts.str.len_bytes()
    widths = lengths if lengths.n_unique() <= 16 else ((lengths + 15) // 16 * 16)
    frame = pl.DataFrame({"text": texts, "length": lengths, "width": widths}).with_row_index("row")
    registers = np.zeros(texts.len(), dtype=np.uint16)
    for (width,), group in frame.group_by("width"):
        width = int(width)
        if width == 0:
            continue
        padded = group["text"]
        if group["length"].min() != width:
            padded = group.select(
                pl.concat_str([pl.lit("\0" * width).str.head(width - pl.col("length")), pl.col("text")])
            ).to_series()
        registers[group["row"].to_numpy()] = _crc16_rows(_byte_matrix(padded, width))
    return registers


def _byte_matrix(texts: pl.Series, width: int) -> np.ndarray:
    """The texts (each `width` bytes long) as a (n, width) matrix over their Arrow data buffer, no copy."""
    import pyarrow as pa

    array = texts.cast(pl.Binary).rechunk().to_arrow()
    if array.type != pa.large_binary():
        array = array.cast(pa.large_binary())
    offsets = np.frombuffer(array.buffers()[1], dtype=np.int64)[array.offset : array.offset + len(array) + 1]
    data = np.frombuffer(array.buffers()[2], dtype=np.uint8)[offsets[0] : offsets[-1]]
    return data.reshape(len(array), width)


def key_slots(keys: pl.Series) -> np.ndarray:
    """The hash slot of every key, as `CLUSTER KEYSLOT` gives it: CRC16(key or its hash tag) mod 16384.

    The keys of one batch often share a prefix, hashed once: CRC16 is linear, so
    CRC(prefix ‖ rest) = CRC(prefix ‖ zeros of len(rest)) XOR CRC(rest), and the first term depends only on
    the length of the rest.
    """
    if keys.len() == 0:
        return np.zeros(0, dtype=np.uint16)
    hashed = hashed_parts(keys.fill_null(""))
    lowest, highest = hashed.min(), hashed.max()  # every key lies between them, so shares their common prefix
    common = next((i for i, (a, b) in enumerate(zip(lowest, highest, strict=False)) if a != b), len(lowest))
    prefix = lowest[:common].encode()
    rests = hashed.str.slice(common)
    rest_lengths = rests.str.len_bytes().to_numpy()
    prefix_then_zeros = np.zeros(int(rest_lengths.max()) + 1, dtype=np.uint16)
    prefix_then_zeros[0] = crc16(prefix)
    for length in range(1, prefix_then_zeros.size):
        prefix_then_zeros[length] = _crc_step(prefix_then_zeros[length - 1 : length], 0)[0]
    return (prefix_then_zeros[rest_lengths] ^ _crc16_all(rests)) & (SLOTS - 1)


# ---------------------------------------------------------------------------------------------------------
# The slot map
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SlotMap:
    """Which primary serves each slot: `owner[slot]` indexes `nodes` (-1: no node serves it now)."""

    nodes: tuple[tuple[str, int], ...]
    owner: np.ndarray

    @classmethod
    def from_cluster_slots(cls, reply: list, asked: tuple[str, int]) -> SlotMap:
        """From a `CLUSTER SLOTS` reply: [[first, last, [host, port, id, …], replicas…], …]."""
        nodes: dict[tuple[str, int], int] = {}
        owner = np.full(SLOTS, -1, dtype=np.int16)
        for first, last, primary, *_replicas in reply:
            host = primary[0].decode() if isinstance(primary[0], bytes) else str(primary[0])
            # An empty or unknown endpoint ("?") means: the node that was asked.
            node = (asked[0] if host in ("", "?") else host, int(primary[1]))
            owner[int(first) : int(last) + 1] = nodes.setdefault(node, len(nodes))
        return cls(tuple(nodes), owner)

    def moved(self, slot: int, node: tuple[str, int]) -> SlotMap:
        """The map after a node said `MOVED <slot> <node>` (it knows the slot's new owner before we do)."""
        nodes = list(self.nodes)
        if node not in nodes:
            nodes.append(node)
        owner = self.owner.copy()
        owner[slot] = nodes.index(node)
        return SlotMap(tuple(nodes), owner)


_slot_maps: dict[str, SlotMap] = {}
_slot_maps_lock = threading.Lock()


def read_slot_map(cluster: ClusterUrl, known: SlotMap | None) -> SlotMap:
    """The slot map from the first node that answers: the known primaries first, then the seeds."""
    candidates = list(dict.fromkeys([*(known.nodes if known else ()), *cluster.seeds]))
    problems = []
    for host, port in candidates:
        try:
            with RespConnection(cluster.node(host, port), timeout=5.0) as connection:
                [reply] = connection.exchange(command("CLUSTER", "SLOTS"), 1)
        except ClaimsUnavailable as error:
            problems.append(str(error))
            continue
        if isinstance(reply, hiredis.ReplyError):
            problems.append(f"{host}:{port}: {reply}")
            if error_code(reply) not in TRANSIENT_ERRORS:
                raise ClaimsUnavailable(f"Redis at {host}:{port} cannot tell its cluster's slots: {reply}")
            continue
        slot_map = SlotMap.from_cluster_slots(reply, (host, port))
        if (slot_map.owner >= 0).any():
            return slot_map
        problems.append(f"{host}:{port}: no slot is served")
    raise TransientRedisError("no Redis Cluster node told the slot map: " + "; ".join(problems))


def _remember(url: str, slot_map: SlotMap) -> SlotMap:
    with _slot_maps_lock:
        _slot_maps[url] = slot_map
    return slot_map


# ---------------------------------------------------------------------------------------------------------
# Sending a batch
# ---------------------------------------------------------------------------------------------------------


def in_batch_order(parts: list[tuple[np.ndarray, pl.Series]], size: int) -> pl.Series:
    """The replies of all parts (each: the batch rows it answers, and its replies) in batch order."""
    rows = np.concatenate([part[0] for part in parts]) if parts else np.zeros(0, dtype=np.int64)
    counts = np.bincount(rows, minlength=size)
    if counts.size != size or not (counts == 1).all():
        raise AssertionError(f"replies for {rows.size} rows do not cover each of the {size} rows once")
    replies = pl.concat([part[1] for part in parts]) if parts else pl.Series("owner", [], dtype=pl.Binary)
    where = np.empty(size, dtype=np.int64)
    where[rows] = np.arange(size)
    return replies.gather(where)


def _redirect_target(reply: hiredis.ReplyError, asked: tuple[str, int]) -> tuple[int, tuple[str, int]]:
    """(slot, node) of `MOVED 3999 127.0.0.1:6381` or `ASK 3999 127.0.0.1:6381`."""
    _code, slot, endpoint = str(reply).split(" ")
    host, _, port = endpoint.rpartition(":")
    return int(slot), ((asked[0] if host in ("", "?") else host), int(port))


@dataclass
class _Round:
    """What one round of sends left to do."""

    done: list[tuple[np.ndarray, pl.Series]]
    retry: list[np.ndarray]
    asking: dict[tuple[str, int], list[np.ndarray]]
    moved: dict[int, tuple[str, int]]
    transient: Exception | None = None


class Commands(Protocol):
    """The commands answering some rows of a batch: each command's rows share one slot."""

    chunks: list[bytes]  # the RESP of the commands, each after an `ASKING` if they were built asking

    def per_row(self, replies: list) -> list:
        """One reply per row, in the order of the rows the commands were built for."""
        ...


def _send_to_node(
    cluster: ClusterUrl,
    node: tuple[str, int],
    rows: np.ndarray,
    asking: bool,
    commands_for: Callable[[np.ndarray, bool], Commands],
) -> list:
    commands = commands_for(rows, asking)
    with RespConnection(cluster.node(*node)) as connection:
        replies = connection.exchange(commands.chunks, len(commands.chunks) * (2 if asking else 1))
    return commands.per_row(replies[1::2] if asking else replies)  # each ASKING answers +OK


def _take_replies(rows: np.ndarray, node: tuple[str, int], replies: list, into: _Round) -> None:
    owners, errors = owners_of(replies)
    if not errors:
        into.done.append((rows, owners))
        return
    answered = np.ones(rows.size, dtype=bool)
    retry: list[int] = []
    asking: dict[tuple[str, int], list[int]] = {}
    for index, reply in errors:
        answered[index] = False
        code = error_code(reply)
        if code == "MOVED":
            slot, target = _redirect_target(reply, node)
            into.moved[slot] = target
            retry.append(index)
        elif code == "ASK":
            asking.setdefault(_redirect_target(reply, node)[1], []).append(index)
        elif code in TRANSIENT_ERRORS:
            retry.append(index)
            into.transient = TransientRedisError(f"Redis at {node[0]}:{node[1]} answered: {reply}")
        else:
            raise ClaimsUnavailable(f"Redis at {node[0]}:{node[1]} answered an error: {reply}")
    into.done.append((rows[answered], owners.filter(pl.Series(answered))))
    into.retry.append(rows[np.array(retry, dtype=np.int64)])
    for target, indices in asking.items():
        into.asking.setdefault(target, []).append(rows[np.array(indices, dtype=np.int64)])


def send_by_slot(
    url: str,
    slots: np.ndarray,
    commands_for: Callable[[np.ndarray, bool], Commands],
    patience: Patience,
) -> pl.Series:
    """Send each row of a batch to the primary serving its slot; one reply per row, in batch order.

    `commands_for(rows, asking)` gives the commands of those batch rows (each after an `ASKING` when asked
    to). Every command must be safe to send twice: a reply lost with a connection is sent again.
    """
    cluster = ClusterUrl.parse(url)
    slot_map = _slot_maps.get(url)
    pending = np.arange(slots.size, dtype=np.int64)
    asking: dict[tuple[str, int], np.ndarray] = {}
    done: list[tuple[np.ndarray, pl.Series]] = []
    redirect_rounds = 0
    while pending.size or asking:
        if slot_map is None:
            try:
                slot_map = _remember(url, read_slot_map(cluster, None))
            except TransientRedisError as error:
                patience.pause(error)
                continue
        owners = slot_map.owner[slots[pending]]
        tasks = [(node, pending[owners == index], False) for index, node in enumerate(slot_map.nodes)]
        tasks += [(node, rows, True) for node, rows in asking.items()]
        tasks = [task for task in tasks if task[1].size]
        outcome = _Round(done=done, retry=[pending[owners < 0]], asking={}, moved={})
        if outcome.retry[0].size:
            outcome.transient = TransientRedisError(f"{np.unique(slots[outcome.retry[0]]).size} slots have no node")
        with ThreadPoolExecutor(max_workers=max(1, len(tasks)), thread_name_prefix="claims") as pool:
            futures = [pool.submit(_send_to_node, cluster, node, rows, ask, commands_for) for node, rows, ask in tasks]
            for (node, rows, _ask), future in zip(tasks, futures, strict=True):
                try:
                    _take_replies(rows, node, future.result(), outcome)
                except TransientRedisError as error:  # the node is gone or going: its rows wait for a new map
                    outcome.retry.append(rows)
                    outcome.transient = error
        pending = np.sort(np.concatenate(outcome.retry))
        asking = {node: np.concatenate(rows) for node, rows in outcome.asking.items()}
        if not (pending.size or asking):
            break
        if outcome.moved or outcome.transient:
            try:
                slot_map = read_slot_map(cluster, slot_map)
            except TransientRedisError as error:
                outcome.transient = outcome.transient or error
            # A node that says MOVED knows the slot's new owner; the node that told the map may lag behind.
            for slot, node in outcome.moved.items():
                if slot_map.owner[slot] < 0 or slot_map.nodes[slot_map.owner[slot]] != node:
                    slot_map = slot_map.moved(slot, node)
            _remember(url, slot_map)
        if outcome.transient is not None:
            patience.pause(outcome.transient)
        else:
            redirect_rounds += 1
            if redirect_rounds > REDIRECT_ROUNDS_WITHOUT_PAUSE:
                patience.pause(TransientRedisError(f"rows still redirected after {redirect_rounds} rounds"))
    return in_batch_order(done, slots.size)
