"""The embedded store admits one process at a time: a wait for it is bounded, and a long one is logged."""

from __future__ import annotations

import fcntl
import logging
import os
import threading
from pathlib import Path

import pytest

from clickhouse_etl.clients.clickhouse import ClickHouseUnavailable, clickhouse_session


def test_a_held_store_is_waited_for_visibly_then_given_up(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    store = tmp_path / "store"
    store.mkdir()
    with open(tmp_path / "store.lock", "w") as holder:
        holder.write("pid 4242")
        holder.flush()
        fcntl.flock(holder.fileno(), fcntl.LOCK_EX)  # a lock of its own open file: it conflicts like a process

        with (
            caplog.at_level(logging.WARNING, "clickhouse_etl"),
            pytest.raises(ClickHouseUnavailable) as raised,
            clickhouse_session(f"chdb://{store}", 1.0),
        ):
            pass

    assert "stayed held by another process (last taken by pid 4242) for 1 s" in str(raised.value)
    [waiting] = [r.getMessage() for r in caplog.records]
    assert waiting.startswith(f"waiting for the embedded ClickHouse store {store}, held by another process")


def test_a_session_records_who_holds_the_store(tmp_path: Path) -> None:
    store = tmp_path / "store"
    with clickhouse_session(f"chdb://{store}", 5.0):
        assert (tmp_path / "store.lock").read_text() == f"pid {os.getpid()}"


def test_a_store_released_while_a_session_waits_is_taken_by_it(tmp_path: Path) -> None:
    store = tmp_path / "store"
    store.mkdir()
    with open(tmp_path / "store.lock", "w") as holder:
        holder.write("pid 4242")
        holder.flush()
        fcntl.flock(holder.fileno(), fcntl.LOCK_EX)
        release = threading.Timer(0.3, fcntl.flock, (holder.fileno(), fcntl.LOCK_UN))
        release.start()
        try:
            with clickhouse_session(f"chdb://{store}", 30.0) as client:
                assert client.command("SELECT 1") == 1
                assert (tmp_path / "store.lock").read_text() == f"pid {os.getpid()}"
        finally:
            release.cancel()
