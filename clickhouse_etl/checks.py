"""Verification that the pre-aggregated stats equal the same aggregation over the enriched clicks."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Literal

from clickhouse_connect.driver.client import Client

from clickhouse_etl.schemas import ENRICHED_TABLE, HOUR_STATS_VIEW, MINUTE_STATS_VIEW

Window = Literal["minute", "hour"]
WINDOWS: dict[str, tuple[str, str, str]] = {
    # window → (stats view, its window column, ClickHouse function truncating click_time)
    "minute": (MINUTE_STATS_VIEW, "minute", "toStartOfMinute"),
    "hour": (HOUR_STATS_VIEW, "hour", "toStartOfHour"),
}


@dataclass
class WindowCheck:
    window: Window
    windows_compared: int = 0
    mismatches: list[dict[str, object]] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.mismatches


def compare_window_stats(
    client: Client, database: str, window: Window, first: datetime | None = None, last: datetime | None = None
) -> WindowCheck:
    """Compare the stats view with clicks/uniqExact over ad_clicks_enriched, for windows in [first, last]."""
    view, column, truncate = WINDOWS[window]
    if window == "hour" and first is not None:
        first = first.replace(minute=0, second=0, microsecond=0)  # the hour holding the first minute
    bounds = {"first": first or datetime(1970, 1, 1), "last": last or datetime(2299, 12, 31)}
    stats = client.query(
        f"SELECT {column}, campaign_name, clicks, unique_users FROM `{database}`.{view} "
        f"WHERE {column} BETWEEN {{first:DateTime('UTC')}} AND {{last:DateTime('UTC')}}",
        parameters=bounds,
    ).result_rows
    direct = client.query(
        f"SELECT toDateTime({truncate}(click_time), 'UTC') AS w, campaign_name, count(), uniqExact(user_id) "
        f"FROM `{database}`.{ENRICHED_TABLE} "
        f"WHERE w BETWEEN {{first:DateTime('UTC')}} AND {{last:DateTime('UTC')}} GROUP BY w, campaign_name",
        parameters=bounds,
    ).result_rows
    from_view = {(w, name): (clicks, users) for w, name, clicks, users in stats}
    from_rows = {(w, name): (clicks, users) for w, name, clicks, users in direct}
    check = WindowCheck(window, windows_compared=len(from_view.keys() | from_rows.keys()))
    for key in sorted(from_view.keys() | from_rows.keys(), key=lambda k: (k[0], k[1] or "")):
        if from_view.get(key) != from_rows.get(key):
            check.mismatches.append(
                {
                    "window": str(key[0]),
                    "campaign_name": key[1],
                    "stats": from_view.get(key),
                    "enriched": from_rows.get(key),
                }
            )
    return check
