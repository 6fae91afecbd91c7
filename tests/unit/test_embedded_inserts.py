"""Arrow rows go into the embedded store as a stream handed to the engine in memory: by column name, one block
per insert, skipped when their token was seen; the store is released with the session."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import polars as pl
import pyarrow as pa
from clickhouse_connect.driver.client import Client

from clickhouse_etl.clients.clickhouse import clickhouse_session, insert_arrow

TABLE = """
CREATE TABLE db.t (
    id UInt64,
    name LowCardinality(Nullable(String)),
    raw String,
    amount Nullable(Decimal(14, 2)),
    at DateTime64(3, 'UTC'),
    note String DEFAULT 'none'
) ENGINE = MergeTree ORDER BY id SETTINGS non_replicated_deduplication_window = 100
"""


def _rows(first_id: int) -> pa.Table:
    """Two rows, columns in another order than the table's, `note` left to its default."""
    return pl.DataFrame(
        {
            "at": pl.Series([datetime(2026, 1, 1, 12, 0, 0, 123000, UTC)] * 2, dtype=pl.Datetime("ms", "UTC")),
            "raw": pl.Series([b'{"a": 1}', b"\xff\x00"], dtype=pl.Binary),
            "id": pl.Series([first_id, first_id + 1], dtype=pl.UInt64),
            "amount": pl.Series([Decimal("12.50"), None], dtype=pl.Decimal(14, 2)),
            "name": ["it's", None],
        }
    ).to_arrow()


def _insert(client: Client, rows: pa.Table, token: str) -> None:
    insert_arrow(client, "db.t", rows, {"insert_deduplication_token": token, "insert_deduplicate": 1})


def test_arrow_rows_go_in_by_name_once_per_token(tmp_path: Path) -> None:
    with clickhouse_session(f"chdb://{tmp_path / 'store'}", 30.0) as client:
        client.command("CREATE DATABASE db")
        client.command(TABLE)
        _insert(client, _rows(1), "topic/0/1-3/t'x")
        _insert(client, _rows(1), "topic/0/1-3/t'x")  # a replay: skipped
        _insert(client, _rows(3), "topic/0/3-5/t")

        rows = client.query(
            "SELECT id, name, hex(raw), toString(amount), toUnixTimestamp64Milli(at), note FROM db.t ORDER BY id"
        ).result_rows
        parts = client.command("SELECT count() FROM system.parts WHERE database = 'db' AND table = 't' AND active")

    millis = int(datetime(2026, 1, 1, 12, 0, 0, 123000, UTC).timestamp() * 1000)
    assert rows == [
        (1, "it's", b'{"a": 1}'.hex().upper(), "12.5", millis, "none"),
        (2, None, "FF00", None, millis, "none"),
        (3, "it's", b'{"a": 1}'.hex().upper(), "12.5", millis, "none"),
        (4, None, "FF00", None, millis, "none"),
    ]
    assert int(parts) == 2  # one block per insert


def test_a_store_inserted_into_is_released_with_its_session(tmp_path: Path) -> None:
    store = tmp_path / "store"
    with clickhouse_session(f"chdb://{store}", 30.0) as client:
        client.command("CREATE DATABASE db")
        client.command(TABLE)
        _insert(client, _rows(1), "topic/0/1-3/t")
    # Another store opens in this process only once the engine of the first has stopped.
    with clickhouse_session(f"chdb://{tmp_path / 'other'}", 30.0) as client:
        assert client.command("SELECT 1") == 1
    with clickhouse_session(f"chdb://{store}", 30.0) as client:
        assert client.command("SELECT count() FROM db.t") == 2
