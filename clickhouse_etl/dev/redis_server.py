"""A local `redis-server` process: how the stack runs it (its options), starts it, waits for it and stops it.

Shared by the stack's Redis and the nodes of a local Redis Cluster (clickhouse_etl.dev.redis_cluster).

A Redis restarted with many claims first reads its append-only file, answering `-LOADING` meanwhile (1.5 to
4.5 s per million claims here, see docs/production.md). So "started" means: the process runs (its pid is
known at once, so a caller can record it before the wait) and then answers commands; a Redis that is still
loading is waited for as long as it makes progress.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from clickhouse_etl.core.processes import process_alive

if TYPE_CHECKING:
    import redis

# The claims must survive a restart: every write goes to the append-only file, flushed to disk every second
# (a crash of the machine, not of Redis, may lose the last second). The file starts with an RDB snapshot of
# the data set (rdb preamble) that Redis rewrites once the commands appended since exceed the snapshot's size
# (and 64 MB): a restart reads at most about twice the data set, mostly in the compact RDB form, instead of
# every SET ever made — the load time stays proportional to the live claims.
#
# Claim hashes are hash tables from their first field: Redis keeps a hash of up to 512 fields as a listpack by
# default, searched field by field, and a claim call looks up and writes hundreds of fields of one hash at once.
# Until a new bucket's 256 hashes held 512 claims each (its first ~130,000 claims), a claim cost Redis two to
# three times the CPU it costs in a hash table (docs/production.md).
SERVER_OPTIONS = (
    "--appendonly",
    "yes",
    "--appendfsync",
    "everysec",
    "--aof-use-rdb-preamble",
    "yes",
    "--auto-aof-rewrite-percentage",
    "100",
    "--auto-aof-rewrite-min-size",
    "64mb",
    "--save",
    "",
    "--hash-max-listpack-entries",
    "0",
)

STARTUP_SECONDS = 20.0  # to answer at all (LOADING counts as an answer)
STALLED_LOADING_SECONDS = 120.0  # a load that makes no progress for this long has failed


class RedisStartError(RuntimeError):
    """A redis-server did not come up answering; the message names it and shows its log."""


@dataclass(frozen=True)
class RedisState:
    """What a Redis answers now: `ready`, `loading` (reading its data set; percent done) or `down`."""

    status: str
    loaded_percent: float = 0.0
    eta_seconds: int = -1
    detail: str = ""

    def describe(self) -> str:
        if self.status == "loading":
            eta = f", about {self.eta_seconds} s left" if self.eta_seconds >= 0 else ""
            return f"loading its dataset ({self.loaded_percent:.0f}%{eta})"
        return self.status + (f": {self.detail}" if self.detail else "")


def redis_state(url: str, timeout: float = 2.0) -> RedisState:
    """Ready, loading or down, asked over `url` (INFO still answers while the data set is loading)."""
    import redis

    client = redis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout)
    try:
        client.ping()
        return RedisState("ready")
    except redis.BusyLoadingError:
        try:
            info = client.info("persistence")
        except redis.RedisError:
            return RedisState("loading")
        return RedisState(
            "loading",
            float(info.get("loading_loaded_perc", 0.0)),
            int(info.get("loading_eta_seconds", -1)),
        )
    except redis.RedisError as error:
        return RedisState("down", detail=str(error))
    finally:
        client.close()


def log_tail(path: Path, lines: int = 25) -> str:
    if not path.exists():
        return f"(no log at {path})"
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


@dataclass
class RedisServer:
    """One redis-server on this machine, its files under `home`."""

    host: str
    port: int
    home: Path
    name: str = "redis"
    options: tuple[str, ...] = field(default=SERVER_OPTIONS)

    @property
    def pidfile(self) -> Path:
        return self.home / f"{self.name}.pid"

    @property
    def log_path(self) -> Path:
        return self.home / f"{self.name}.log"

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    def launch(self) -> int:
        """Start the daemonized server and return its pid at once (before it answers)."""
        self.home.mkdir(parents=True, exist_ok=True)
        self.pidfile.unlink(missing_ok=True)
        result = subprocess.run(
            [
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                self.host,
                "--dir",
                str(self.home),
                "--daemonize",
                "yes",
                "--pidfile",
                str(self.pidfile),
                "--logfile",
                str(self.log_path),
                "--protected-mode",
                "yes",
                *self.options,
            ],
            capture_output=True,
            text=True,
        )
        deadline = time.monotonic() + 10
        while result.returncode == 0 and not self.pid() and time.monotonic() < deadline:
            time.sleep(0.05)
        pid = self.pid()
        if result.returncode != 0 or pid is None:
            raise RedisStartError(
                f"{self.name} did not start at {self.host}:{self.port}; last lines of {self.log_path}:\n"
                f"{result.stderr}{log_tail(self.log_path)}"
            )
        return pid

    def pid(self) -> int | None:
        """The pid in the pidfile of the server running in `home`, if any."""
        try:
            return int(self.pidfile.read_text().strip())
        except (OSError, ValueError):
            return None

    def wait_ready(self, pid: int | None, url: str | None = None, echo: Callable[[str], None] = lambda _: None) -> None:
        """Wait until the server answers commands; while it loads its data set, as long as the load progresses.

        A server that died, never answered, or stopped making progress is stopped (if `pid` is known) and
        named with its log.
        """
        url = url or self.url
        started = progressed = last_said = time.monotonic()
        best = -1.0
        while True:
            state = redis_state(url)
            now = time.monotonic()
            if state.status == "ready":
                return
            if state.status == "loading":
                if state.loaded_percent > best:
                    best, progressed = state.loaded_percent, now
                if now - last_said >= 5:
                    echo(f"{self.name:<10} {self.host}:{self.port} {state.describe()}")
                    last_said = now
                stalled = now - progressed > STALLED_LOADING_SECONDS
            else:
                stalled = now - started > STARTUP_SECONDS
            alive = pid is None or process_alive(pid)
            if stalled or not alive:
                why = "it exited" if not alive else f"it is not answering ({state.describe()})"
                if pid is not None and alive:
                    self.stop(pid)
                    why += "; stopped it"
                raise RedisStartError(
                    f"{self.name} did not start at {self.host}:{self.port}: {why}. Last lines of {self.log_path}:\n"
                    f"{log_tail(self.log_path)}"
                )
            time.sleep(0.1 if state.status == "down" else 0.5)

    def start(self, url: str | None = None, echo: Callable[[str], None] = lambda _: None) -> int:
        pid = self.launch()
        self.wait_ready(pid, url, echo)
        return pid

    def stop(self, pid: int, timeout: float = 30.0) -> None:
        """SIGTERM (Redis flushes its append-only file and exits), SIGKILL if it does not within `timeout`."""
        stop_process(pid, timeout)


def stop_process(pid: int, timeout: float) -> None:
    if not process_alive(pid):
        return
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while process_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    if process_alive(pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def wait_for_aof_rewrite(client: redis.Redis) -> None:
    """Return once the server neither rewrites its append-only file nor has a rewrite scheduled."""
    while True:
        persistence = client.info("persistence")
        if not persistence.get("aof_rewrite_in_progress") and not persistence.get("aof_rewrite_scheduled"):
            return
        time.sleep(0.1)
