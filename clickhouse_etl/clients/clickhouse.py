"""ClickHouse sessions: embedded chDB (one process at a time) or a server over HTTP(S).

An on-disk chDB directory can be opened by one process at a time, so a session on the embedded store holds
an exclusive file lock for its whole life and is opened only around the work that needs it. Waiting for
the lock is bounded by `clickhouse_lock_timeout_seconds`, and a wait longer than a few seconds is logged
with the process holding the lock (logger `clickhouse_etl`, which runs show in their event log); a server
DSN needs no lock.

The embedded store merges its parts in the threads of the process holding it, and releasing the store
cancels the merges running then, discarding their work. A run's load holds the store for a second or less,
shorter than most merges, so merges were started and thrown away session after session: a core busy for
nothing while the store was held, and parts never merged (one more per table and run, towards ClickHouse's
limit of 3,000 parts). A session on the embedded store therefore lets the merges running at its end finish
before it releases the store (within MERGES_FINISH_SECONDS), and the engine merges parts of at most
EMBEDDED_MERGE_MAX_BYTES in all, so that a merge always can finish in that time (docs/benchmarks.md). A merge
joins about EMBEDDED_MERGE_SELECTOR_BASE parts at a time, twice ClickHouse's default, so that a row is rewritten
by fewer merges on its way to that size: with the default, merges took half the CPU of 24 load sessions.

The embedded engine never removes outdated parts (those a merge or mutation replaced: its background cleanup
does not run), and it reads every part on disk when it opens: a store written by many sessions opened slower
and slower (0.09 s after `clickhouse-etl seed`, 0.34 s after 122 load sessions that left 547 outdated parts).
A session that leaves OUTDATED_PARTS_TO_REMOVE or more therefore removes them after closing the engine, still
holding the store, once the disk holds every part that replaced them (a sync): what ClickHouse's own cleanup
does once a replaced part is old enough.

Rows go into the embedded store as an Arrow IPC stream handed to the engine in memory, through chDB's
streaming insert on a handle of the session's engine. The client's own insert_arrow writes the stream to a
temporary file that the engine then reads back, a quarter more of the insert's time (docs/benchmarks.md). A
server gets the stream over HTTP from the client, as before.
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import time
import weakref
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import clickhouse_connect
from clickhouse_connect.driver.binding import format_query_value, quote_identifier
from clickhouse_connect.driver.client import Client

from clickhouse_etl.core.processes import return_free_heap

if TYPE_CHECKING:
    import pyarrow as pa

log = logging.getLogger("clickhouse_etl")

# The embedded chDB allocates through its own jemalloc, which reads this variable when the library is loaded
# (on the first chdb:// session, after this module) and by default keeps freed pages for seconds: a process
# that has just loaded a range then holds them while it reads the next one. Returning them at once cut the
# catch-up's peak RSS at 3,000,000 events from 1,188-1,387 to 1,076-1,081 MiB for about 3 % more CPU
# (docs/benchmarks.md). A value set in the environment is kept.
os.environ.setdefault("JE_MALLOC_CONF", "dirty_decay_ms:0,muzzy_decay_ms:0")

# A load holds the store for a second or two; a wait longer than this is worth a line in the run's log.
REPORT_WAIT_AFTER_SECONDS = 5.0
# A process waiting for the store tries again this often, so it takes the store within this time of its release.
# A backoff doubling from 50 ms slept on for up to as long again as the wait had lasted: a catch-up's worker,
# whose first load often meets the other process's, waited 0.35 or 0.75 s, the backoff's steps (docs/benchmarks.md).
LOCK_POLL_SECONDS = 0.01
# 128 MiB of parts (about 3.5M rows of the demo's sink table) merge in about 3.5 CPU seconds here, far within
# MERGES_FINISH_SECONDS on a slower machine too.
EMBEDDED_MERGE_MAX_BYTES = 128 * 2**20
# A merge joins about this many parts of one size (ClickHouse's default: 5). Each merge level rewrites every row
# once on its way to the cap, on the cores of the loading process: 24 load sessions of four 110,000-row inserts of
# the demo's sink table took 31.8 / 33.4 CPU seconds with 5, 25.0 / 24.4 with 10 and 15.7 with merges stopped;
# 48 sessions 65.7 against 47.8 (docs/benchmarks.md). The price: more parts for queries to read, and more disk, as
# less of the data sits in large parts, which the engine compresses better (a table like it after 96 sessions of
# four such inserts, 42.2M rows: 53 parts and 2,625 MiB against 39 and 1,942 MiB; docs/production.md).
EMBEDDED_MERGE_SELECTOR_BASE = 10
MERGES_FINISH_SECONDS = 30.0
MERGES_POLL_SECONDS = 0.02
# Each sync writes out what the whole machine has buffered, so outdated parts are removed a hundred at a time
# (about every twenty load sessions of a pipeline), not after every session.
OUTDATED_PARTS_TO_REMOVE = 100
EMBEDDED_CONFIG = f"""<clickhouse>
  <merge_tree>
    <max_bytes_to_merge_at_max_space_in_pool>{EMBEDDED_MERGE_MAX_BYTES}</max_bytes_to_merge_at_max_space_in_pool>
    <merge_selector_base>{EMBEDDED_MERGE_SELECTOR_BASE}</merge_selector_base>
  </merge_tree>
</clickhouse>
"""


# The store of each embedded session's client now open (see insert_arrow).
_embedded_stores: weakref.WeakKeyDictionary[Client, str] = weakref.WeakKeyDictionary()


class ClickHouseUnavailable(RuntimeError):
    """ClickHouse could not be reached (or the embedded store stayed held) within the timeout."""


@contextmanager
def _embedded_store_lock(path: Path, timeout: float) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    lock_path = path.with_name(path.name + ".lock")
    with open(lock_path, "a+") as lock_file:
        started = time.monotonic()
        reported = False
        while True:
            try:
                fcntl.flock(lock_file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                waited = time.monotonic() - started
                if waited >= timeout:
                    raise ClickHouseUnavailable(
                        f"the embedded ClickHouse store {path} stayed held by {_holder(lock_file)} for {timeout:.0f} s"
                    ) from None
                if not reported and waited >= min(REPORT_WAIT_AFTER_SECONDS, timeout / 2):
                    log.warning(
                        "waiting for the embedded ClickHouse store %s, held by %s (giving up after %.0f s)",
                        path,
                        _holder(lock_file),
                        timeout,
                    )
                    reported = True
                time.sleep(LOCK_POLL_SECONDS)
        # Whoever waits next can name the holder.
        lock_file.seek(0)
        lock_file.truncate()
        lock_file.write(f"pid {os.getpid()}")
        lock_file.flush()
        try:
            yield
        finally:
            fcntl.flock(lock_file.fileno(), fcntl.LOCK_UN)


def _embedded_config(path: Path) -> Path:
    """The engine's configuration file, next to the store (the engine reads it when it starts)."""
    config = path.with_name(path.name + ".xml")
    if not config.exists() or config.read_text() != EMBEDDED_CONFIG:
        config.write_text(EMBEDDED_CONFIG)
    return config


def _import_embedded_engine() -> None:
    """Import chDB (which loads the engine's library) and pyarrow, as the client's first embedded session and
    first insert would: before the store is taken, not while another process may be waiting for it. A
    process's first session held the store 0.24 s to open it, 0.04 s with both imported (docs/benchmarks.md)."""
    import chdb  # noqa: F401
    import pyarrow  # noqa: F401


def _wait_for_merges(client: Client, seconds: float = MERGES_FINISH_SECONDS) -> None:
    """Wait until no merge runs (at most `seconds`): a merge that finishes is never done again."""
    deadline = time.monotonic() + seconds
    while client.command("SELECT count() FROM system.merges") and time.monotonic() < deadline:
        time.sleep(MERGES_POLL_SECONDS)


def _outdated_parts(client: Client) -> list[str]:
    """The directories of the parts that merges and mutations have replaced."""
    return [path for (path,) in client.query("SELECT path FROM system.parts WHERE NOT active").result_rows]


def _remove_outdated_parts(store: Path, paths: list[str]) -> None:
    """Remove the outdated parts' directories, the engine closed: first the sync, so that a crash cannot lose a
    replacing part whose data was still only in memory after its sources are gone. Each is renamed first, as
    ClickHouse does, so that a removal cut short leaves a directory the engine skips, not a broken part."""
    os.sync()
    root = store.resolve()
    for path in paths:
        directory = Path(path).resolve()
        if directory.is_relative_to(root) and directory.parent != root and directory.exists():
            doomed = directory.rename(directory.with_name(f"delete_tmp_{directory.name}"))
            shutil.rmtree(doomed, ignore_errors=True)


def _holder(lock_file: Any) -> str:
    lock_file.seek(0)
    last = lock_file.read().strip()
    return f"another process (last taken by {last})" if last else "another process"


def _connect(dsn: str, timeout: float, **kwargs: Any) -> Client:
    deadline = time.monotonic() + timeout
    delay = 0.2
    while True:
        try:
            return clickhouse_connect.get_client(dsn=dsn, **kwargs)
        except Exception as error:
            if time.monotonic() >= deadline:
                raise ClickHouseUnavailable(f"ClickHouse at {_redacted(dsn)} is unavailable: {error}") from error
            time.sleep(delay)
            delay = min(delay * 2, 5.0)


def _redacted(dsn: str) -> str:
    from urllib.parse import urlsplit

    url = urlsplit(dsn)
    if url.password:
        return dsn.replace(f":{url.password}@", ":***@")
    return dsn


@contextmanager
def clickhouse_session(dsn: str, timeout: float, finish_merges: bool = True) -> Iterator[Client]:
    """A ClickHouse client for the duration of the block; closed (and the embedded store released) after.

    An embedded session that ends without an error first lets its running merges finish (see the module's
    note), unless `finish_merges` is False.
    """
    if dsn.startswith("chdb://"):
        path = Path(dsn.removeprefix("chdb://"))
        path.mkdir(parents=True, exist_ok=True)
        _import_embedded_engine()
        with _embedded_store_lock(path, timeout):
            return_free_heap()  # the engine's allocations then come on top of what is in use only
            client = _connect(dsn, timeout, chdb_options={"config-file": str(_embedded_config(path))})
            _embedded_stores[client] = str(path)
            outdated: list[str] = []
            try:
                yield client
                if finish_merges:
                    _wait_for_merges(client)
                outdated = _outdated_parts(client)
            finally:
                client.close()
            if len(outdated) >= OUTDATED_PARTS_TO_REMOVE:
                _remove_outdated_parts(path, outdated)
    else:
        # clickhouse-connect picks TLS by port (8443/443), not by scheme: an https DSN on another port would
        # otherwise be spoken to in plain HTTP.
        secure = dsn.split("://", 1)[0] in ("https", "clickhouses")
        client = _connect(
            dsn, timeout, connect_timeout=10, send_receive_timeout=300, **({"secure": True} if secure else {})
        )
        try:
            yield client
        finally:
            client.close()


def insert_arrow(client: Client, table: str, rows: pa.Table, settings: Mapping[str, str | int]) -> None:
    """Insert `rows` into `table` (quoted as needed) with `settings`, as one Arrow IPC stream: on the embedded
    store handed to the engine in memory (see the module's note), to a server by the client over HTTP."""
    store = _embedded_stores.get(client)
    if store is None:
        client.insert_arrow(table, rows, settings=dict(settings))
        return
    # Imported with the session (_import_embedded_engine): processes that never open the embedded store (the
    # webserver, the daemon, a server DSN) load neither library.
    import chdb
    import pyarrow as pa

    stream = pa.BufferOutputStream()
    with pa.ipc.new_stream(stream, rows.schema) as writer:
        writer.write_table(rows)
    columns = ", ".join(quote_identifier(name) for name in rows.column_names)  # by name, as the client inserts
    clause = ", ".join(f"{name} = {format_query_value(value)}" for name, value in settings.items())
    # A second handle of the engine the session opened: chDB runs one engine per process and store, which stays
    # up while any handle is open, so this one is closed before the session's.
    engine = chdb.connect(store)
    try:
        with engine.send_insert(f"INSERT INTO {table} ({columns}) SETTINGS {clause}", "ArrowStream") as insert:
            insert.append(stream.getvalue().to_pybytes())
            insert.finish()
    finally:
        engine.close()
