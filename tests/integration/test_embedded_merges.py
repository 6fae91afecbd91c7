"""The embedded store's merges finish in the sessions that start them, so short sessions still merge parts; the
parts they replaced are removed."""

from __future__ import annotations

from pathlib import Path

from clickhouse_connect.driver.client import Client

from clickhouse_etl.clients import clickhouse
from clickhouse_etl.clients.clickhouse import (
    EMBEDDED_MERGE_MAX_BYTES,
    EMBEDDED_MERGE_SELECTOR_BASE,
    clickhouse_session,
)

SESSIONS = 12
ROWS_PER_PART = 200_000  # a merge of a few such parts outlasts a session that only inserts one


def _active_parts(client: Client) -> int:
    return int(client.command("SELECT count() FROM system.parts WHERE active AND database = 'db' AND table = 'events'"))


def _create_events(dsn: str) -> str:
    """db.events in a new store; its data directory."""
    with clickhouse_session(dsn, 30.0) as client:
        client.command("CREATE DATABASE db")
        client.command("CREATE TABLE db.events (id UInt64, body String) ENGINE = MergeTree ORDER BY id")
        return str(client.command("SELECT data_paths[1] FROM system.tables WHERE database = 'db' AND name = 'events'"))


def _insert_a_part_per_session(dsn: str, sessions: int, rows_per_part: int) -> None:
    """One part per session, as each run's load writes one per table; ids from 0, consecutive."""
    for session in range(sessions):
        with clickhouse_session(dsn, 30.0) as client:
            client.command(
                f"INSERT INTO db.events SELECT number + {session * rows_per_part}, "
                f"concat(toString(cityHash64(number)), toString(number)) FROM numbers({rows_per_part})"
            )


def _count_distinct_min_max(client: Client) -> tuple[int, int, int, int]:
    [row] = client.query("SELECT count(), uniqExact(id), min(id), max(id) FROM db.events").result_rows
    return row


def test_sessions_shorter_than_a_merge_still_merge_the_parts_they_make(tmp_path: Path) -> None:
    dsn = f"chdb://{tmp_path / 'store'}"
    with clickhouse_session(dsn, 30.0) as client:
        settings = dict(
            client.query(
                "SELECT name, value FROM system.merge_tree_settings "
                "WHERE name IN ('max_bytes_to_merge_at_max_space_in_pool', 'merge_selector_base')"
            ).result_rows
        )
        assert int(settings["max_bytes_to_merge_at_max_space_in_pool"]) == EMBEDDED_MERGE_MAX_BYTES
        assert float(settings["merge_selector_base"]) == EMBEDDED_MERGE_SELECTOR_BASE
    _create_events(dsn)

    # When closing cancelled the merges, every session left one part more.
    _insert_a_part_per_session(dsn, SESSIONS, ROWS_PER_PART)

    with clickhouse_session(dsn, 30.0) as client:
        assert _active_parts(client) < SESSIONS
        row = _count_distinct_min_max(client)
    rows = SESSIONS * ROWS_PER_PART
    assert row == (rows, rows, 0, rows - 1)  # merged, not lost or doubled


def test_parts_that_merges_replaced_are_removed_and_no_row_is_lost(tmp_path: Path, monkeypatch) -> None:
    # The engine never removes them itself: without the removal, every session's part stays on disk for good.
    monkeypatch.setattr(clickhouse, "OUTDATED_PARTS_TO_REMOVE", 5)
    dsn = f"chdb://{tmp_path / 'store'}"
    data_path = _create_events(dsn)
    sessions, rows_per_part = 40, 1_000
    _insert_a_part_per_session(dsn, sessions, rows_per_part)

    with clickhouse_session(dsn, 30.0) as client:
        outdated = int(client.command("SELECT count() FROM system.parts WHERE NOT active AND table = 'events'"))
        active = _active_parts(client)
        row = _count_distinct_min_max(client)
    rows = sessions * rows_per_part
    assert row == (rows, rows, 0, rows - 1)
    assert outdated < 5
    on_disk = [part for part in Path(data_path).iterdir() if part.is_dir() and part.name.startswith("all_")]
    assert len(on_disk) == active + outdated < sessions
