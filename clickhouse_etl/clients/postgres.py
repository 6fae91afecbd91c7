"""PostgreSQL: a lookup's rows read in bulk with COPY, in a read-only transaction; the last good copy on disk.

A snapshot is read once per run and joined column-wise, never looked up per event. With the `last_good`
fallback every successful read is kept on disk (replaced atomically), and stands in while PostgreSQL is
unavailable.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import psycopg
from psycopg import sql

from clickhouse_etl.core.pipeline.model import Lookup


class LookupUnavailable(RuntimeError):
    """PostgreSQL could not be read and no last good snapshot may (or can) stand in."""


@dataclass(frozen=True)
class SnapshotRead:
    csv: bytes  # key columns, then the lookup's columns, in declaration order
    source: str  # "postgres", or which saved snapshot stood in


def snapshot_query(lookup: Lookup) -> sql.Composed:
    """COPY of the key and the lookup's columns, ordered by the key, as CSV."""
    keys = [sql.Identifier(name) for name in lookup.key_columns]
    wanted = keys + [sql.Identifier(spec.column or name) for name, spec in lookup.columns.items()]
    if lookup.table is not None:
        source: sql.Composable = sql.Identifier(*lookup.table.split("."))
    else:
        source = sql.SQL("({}) AS lookup").format(sql.SQL(lookup.query))  # type: ignore[arg-type]
    return sql.SQL("COPY (SELECT {} FROM {} ORDER BY {}) TO STDOUT (FORMAT CSV)").format(
        sql.SQL(", ").join(wanted), source, sql.SQL(", ").join(keys)
    )


def read_snapshot(postgres_dsn: str, lookup: Lookup, last_good_path: Path | None = None) -> SnapshotRead:
    """The lookup's rows as CSV; with `last_good_path`, the last good copy when PostgreSQL is down."""
    try:
        csv = _copy(postgres_dsn, lookup)
    except psycopg.OperationalError as error:
        if last_good_path is None:
            raise
        return _last_good(last_good_path, error)
    if last_good_path is not None:
        _save_last_good(last_good_path, csv)
    return SnapshotRead(csv, "postgres")


def _copy(postgres_dsn: str, lookup: Lookup) -> bytes:
    buffer = bytearray()
    with psycopg.connect(postgres_dsn, connect_timeout=10) as connection:
        connection.read_only = True  # a lookup query can read, never write
        with connection.cursor() as cursor, cursor.copy(snapshot_query(lookup)) as copy:
            for block in copy:
                buffer += block
    return bytes(buffer)


def _save_last_good(path: Path, csv: bytes) -> None:
    if path.exists() and path.read_bytes() == csv:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f"{path.name}.{os.getpid()}.partial")
    partial.write_bytes(csv)
    partial.replace(path)  # atomic: a reader sees the old or the new snapshot, never half of one


def _last_good(path: Path, error: psycopg.Error) -> SnapshotRead:
    if not path.exists():
        raise LookupUnavailable(
            f"PostgreSQL is unavailable ({error}) and no last good snapshot was saved at {path}"
        ) from error
    saved_at = datetime.fromtimestamp(path.stat().st_mtime, UTC).isoformat(timespec="seconds")
    return SnapshotRead(path.read_bytes(), f"last good snapshot saved {saved_at} (PostgreSQL unavailable)")
