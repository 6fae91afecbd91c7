"""Verification that each aggregate's views equal the same aggregation computed over the sink table itself."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import datetime

from clickhouse_connect.driver.client import Client

from clickhouse_etl.core.pipeline.columns import AggregateColumns
from clickhouse_etl.core.pipeline.ddl import WINDOW_START

DIRECT = {
    "count": "count()",
    "count_distinct": "toUInt64(uniqExact(`{column}`))",
    "sum": "sum(`{column}`)",
    "min": "min(`{column}`)",
    "max": "max(`{column}`)",
}


@dataclass
class WindowCheck:
    view: str
    windows_compared: int = 0
    mismatches: list[dict[str, object]] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.mismatches


def _equal(a: object, b: object) -> bool:
    """Exact, except float sums: adding the same numbers in another order may differ in the last bits."""
    if isinstance(a, float) and isinstance(b, float):
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-9)
    return a == b


def _window_start(window: str, moment: datetime) -> datetime:
    if window == "day":
        return moment.replace(hour=0, minute=0, second=0, microsecond=0)
    if window == "hour":
        return moment.replace(minute=0, second=0, microsecond=0)
    return moment.replace(second=0, microsecond=0)


def compare_view(
    client: Client,
    database: str,
    sink_table: str,
    aggregate: AggregateColumns,
    window: str,
    first: datetime | None = None,
    last: datetime | None = None,
) -> WindowCheck:
    """The view of `window` against count/uniqExact/sum/min/max over the sink table, for windows in [first, last]."""
    view = aggregate.aggregate.windows[window]  # type: ignore[index]
    measures = list(aggregate.aggregate.measures)
    groups = [f"`{column.name}`" for column in aggregate.group_by]
    bounds = {
        "first": _window_start(window, first) if first else datetime(1970, 1, 1),
        "last": last or datetime(2299, 12, 31),
    }
    between = f"`{window}` BETWEEN {{first:DateTime('UTC')}} AND {{last:DateTime('UTC')}}"
    stats = client.query(
        f"SELECT `{window}`, {', '.join([*groups, *(f'`{m}`' for m in measures)])} "
        f"FROM `{database}`.`{view}` WHERE {between}",
        parameters=bounds,
    ).result_rows
    direct_measures = []
    for name in measures:
        measure = aggregate.aggregate.measures[name]
        direct_measures.append(DIRECT[measure.function].format(column=measure.column))
    time_column = aggregate.aggregate.time_column
    direct = client.query(
        f"SELECT toDateTime({WINDOW_START[window]}(`{time_column}`), 'UTC') AS `{window}`, "
        f"{', '.join([*groups, *direct_measures])} FROM `{database}`.`{sink_table}` WHERE {between} "
        f"GROUP BY {', '.join([f'`{window}`', *groups])}",
        parameters=bounds,
    ).result_rows
    width = 1 + len(groups)
    from_view = {tuple(row[:width]): tuple(row[width:]) for row in stats}
    from_rows = {tuple(row[:width]): tuple(row[width:]) for row in direct}
    check = WindowCheck(view, windows_compared=len(from_view.keys() | from_rows.keys()))
    for key in sorted(from_view.keys() | from_rows.keys(), key=lambda k: tuple("" if v is None else str(v) for v in k)):
        mine, theirs = from_view.get(key), from_rows.get(key)
        if mine is None or theirs is None or not all(_equal(a, b) for a, b in zip(mine, theirs, strict=True)):
            check.mismatches.append(
                {"window": str(key[0]), "group": [str(v) for v in key[1:]], "view": str(mine), "table": str(theirs)}
            )
    return check
