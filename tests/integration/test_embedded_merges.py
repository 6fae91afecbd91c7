"""The embedded store's merges finish in the sessions that start them, so short sessions still merge parts."""

from __future__ import annotations

from pathlib import Path

from clickhouse_connect.driver.client import Client

from clickhouse_etl.clients.clickhouse import EMBEDDED_MERGE_MAX_BYTES, clickhouse_session

SESSIONS = 12
ROWS_PER_PART = 200_000  # a merge of a few such parts outlasts a session that only inserts one


def _active_parts(client: Client) -> int:
    return int(client.command("SELECT count() FROM system.parts WHERE active AND database = 'db' AND table = 'events'"))


def test_sessions_shorter_than_a_merge_still_merge_the_parts_they_make(tmp_path: Path) -> None:
    dsn = f"chdb://{tmp_path / 'store'}"
    with clickhouse_session(dsn, 30.0) as client:
        cap = client.command(
            "SELECT value FROM system.merge_tree_settings WHERE name = 'max_bytes_to_merge_at_max_space_in_pool'"
        )
        assert int(cap) == EMBEDDED_MERGE_MAX_BYTES
        client.command("CREATE DATABASE db")
        client.command("CREATE TABLE db.events (id UInt64, body String) ENGINE = MergeTree ORDER BY id")

    # One part per session, as each run's load writes one per table: when closing cancelled the merges, every
    # session left one part more.
    for session in range(SESSIONS):
        with clickhouse_session(dsn, 30.0) as client:
            client.command(
                f"INSERT INTO db.events SELECT number + {session * ROWS_PER_PART}, "
                f"concat(toString(cityHash64(number)), toString(number)) FROM numbers({ROWS_PER_PART})"
            )

    with clickhouse_session(dsn, 30.0) as client:
        assert _active_parts(client) < SESSIONS
        [row] = client.query("SELECT count(), uniqExact(id), min(id), max(id) FROM db.events").result_rows
    rows = SESSIONS * ROWS_PER_PART
    assert row == (rows, rows, 0, rows - 1)  # merged, not lost or doubled
