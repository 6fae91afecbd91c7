"""`clickhouse-etl query`: SQL against CLICKHOUSE_DSN, printed as a table; read-only unless asked."""

from __future__ import annotations

from typing import Any

from clickhouse_etl.clients.clickhouse import clickhouse_session
from clickhouse_etl.core.settings import Settings


def run_query(settings: Settings, sql: str, writable: bool = False) -> tuple[list[str], list[tuple[Any, ...]]]:
    """Column names and rows; waits its turn while a load holds the embedded store."""
    query_settings = {} if writable else {"readonly": 2}
    with clickhouse_session(settings.clickhouse_dsn, settings.clickhouse_lock_timeout_seconds) as client:
        result = client.query(sql, settings=query_settings)
        return list(result.column_names), list(result.result_rows)


def format_table(columns: list[str], rows: list[tuple[Any, ...]], max_width: int = 60) -> str:
    def cell(value: Any) -> str:
        text = "NULL" if value is None else str(value)
        return text if len(text) <= max_width else text[: max_width - 1] + "…"

    body = [[cell(v) for v in row] for row in rows]
    widths = [max([len(c), *(len(r[i]) for r in body)]) for i, c in enumerate(columns)]
    line = "+".join("-" * (w + 2) for w in widths)
    render = [" | ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)), line]
    render += [" | ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) for r in body]
    render.append(f"({len(rows)} row{'s' if len(rows) != 1 else ''})")
    return "\n".join(render)
