"""Unit tests of clickhouse_etl.steps.aggregate, with expectations computed in plain Python."""

from __future__ import annotations

import random
from collections import defaultdict
from datetime import UTC, datetime
from decimal import Decimal

import polars as pl

from clickhouse_etl.steps.aggregate import highlights, window_partials
from clickhouse_etl.steps.transform import ENRICHED_COLUMNS, to_enriched_rows

MINUTE_MS = 60_000
T0 = 1_700_000_040_000  # a whole minute: 2023-11-14 22:14:00 UTC
PROCESSED_AT = datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC)


def enriched(rows: list[tuple[str, str | None, int]], offsets: list[int] | None = None) -> pl.DataFrame:
    """rows of (user_id, campaign_name, timestamp_ms) → the frame to_enriched_rows makes of them."""
    offsets = offsets if offsets is not None else list(range(len(rows)))
    events = pl.DataFrame(
        {
            "click_id": [f"c{o}" for o in offsets],
            "user_id": [r[0] for r in rows],
            "ad_id": [1 if r[1] is not None else 999 for r in rows],
            "campaign_name": [r[1] for r in rows],
            "campaign_budget": [Decimal("10.00") if r[1] is not None else None for r in rows],
            "ip_address": ["10.0.0.1"] * len(rows),
            "timestamp_ms": [r[2] for r in rows],
            "kafka_partition": [0] * len(rows),
            "kafka_offset": offsets,
        },
        schema={
            "click_id": pl.String,
            "user_id": pl.String,
            "ad_id": pl.Int64,
            "campaign_name": pl.String,
            "campaign_budget": pl.Decimal(14, 2),
            "ip_address": pl.String,
            "timestamp_ms": pl.Int64,
            "kafka_partition": pl.UInt32,
            "kafka_offset": pl.UInt64,
        },
    )
    return to_enriched_rows(events, "ad_clicks", processed_at=PROCESSED_AT)


def minute_of(timestamp_ms: int) -> datetime:
    return datetime.fromtimestamp((timestamp_ms // MINUTE_MS) * MINUTE_MS / 1000, tz=UTC)


def expected_windows(rows: list[tuple[str, str | None, int]]) -> dict[tuple[datetime, str | None], tuple[int, list]]:
    clicks: dict[tuple[datetime, str | None], int] = defaultdict(int)
    users: dict[tuple[datetime, str | None], set[str]] = defaultdict(set)
    for user_id, campaign, timestamp_ms in rows:
        key = (minute_of(timestamp_ms), campaign)
        clicks[key] += 1
        users[key].add(user_id)
    return {key: (clicks[key], sorted(users[key])) for key in clicks}


def as_windows(partials: pl.DataFrame) -> dict[tuple[datetime, str | None], tuple[int, list]]:
    result = {}
    for row in partials.iter_rows(named=True):
        key = (row["minute"], row["campaign_name"])
        assert key not in result, f"window {key} appears twice"
        result[key] = (row["clicks"], row["user_ids"])
    return result


def test_to_enriched_rows_shapes_the_contract_columns():
    frame = enriched([("u1", "A", T0 + 1_234)])
    assert tuple(frame.columns) == ENRICHED_COLUMNS
    assert isinstance(frame.schema["click_time"], pl.Datetime)
    assert frame.schema["click_time"].time_zone == "UTC"
    assert frame.schema["processed_at"] == pl.Datetime("ms", "UTC")
    assert frame["click_time"][0] == datetime(2023, 11, 14, 22, 14, 1, 234_000, tzinfo=UTC)
    assert frame["processed_at"][0] == PROCESSED_AT
    assert frame["kafka_topic"][0] == "ad_clicks"


def test_to_enriched_rows_click_time_is_milliseconds():
    assert enriched([("u1", "A", T0)]).schema["click_time"] == pl.Datetime("ms", "UTC")


def test_partials_do_not_depend_on_the_click_time_unit():
    rows = random_rows(random.Random(9), 500)
    frame = enriched(rows)
    as_ms = frame.with_columns(pl.col("click_time").dt.cast_time_unit("ms"))
    as_us = frame.with_columns(pl.col("click_time").dt.cast_time_unit("us"))
    assert as_ms.schema["click_time"] == pl.Datetime("ms", "UTC")
    from_ms = window_partials(as_ms, "t", 0, 0, 500)
    assert from_ms.schema["minute"] == pl.Datetime("ms", "UTC")
    assert from_ms.equals(window_partials(as_us, "t", 0, 0, 500))
    assert as_windows(from_ms) == expected_windows(rows)


def test_clicks_and_sorted_distinct_users_per_minute_and_campaign():
    rows = [
        ("u3", "A", T0 + 1),
        ("u1", "A", T0 + 59_999),
        ("u3", "A", T0 + 30_000),
        ("u2", "B", T0 + 10),
        ("u1", "A", T0 + MINUTE_MS),  # next minute
        ("u2", "B", T0 + MINUTE_MS + 5),
    ]
    partials = window_partials(enriched(rows), "ad_clicks", 4, 100, 106)
    assert partials.schema["clicks"] == pl.UInt64
    assert partials.schema["minute"] == pl.Datetime("ms", "UTC")
    assert partials.select("minute", "campaign_name", "clicks", "user_ids").rows() == [
        (minute_of(T0), "A", 3, ["u1", "u3"]),
        (minute_of(T0), "B", 1, ["u2"]),
        (minute_of(T0 + MINUTE_MS), "A", 1, ["u1"]),
        (minute_of(T0 + MINUTE_MS), "B", 1, ["u2"]),
    ]
    assert partials["kafka_topic"].unique().to_list() == ["ad_clicks"]
    assert partials["kafka_partition"].unique().to_list() == [4]
    assert partials["range_start"].unique().to_list() == [100]
    assert partials["range_end"].unique().to_list() == [106]
    assert partials.schema["kafka_partition"] == pl.UInt32
    assert partials.schema["range_start"] == pl.UInt64


def test_late_events_land_in_their_own_minute():
    late = T0 - 25 * MINUTE_MS + 17
    rows = [("u1", "A", T0 + 5), ("u2", "A", late), ("u3", "A", T0 + 6)]
    windows = as_windows(window_partials(enriched(rows), "t", 0, 0, 3))
    assert windows == {
        (minute_of(T0), "A"): (2, ["u1", "u3"]),
        (minute_of(late), "A"): (1, ["u2"]),
    }


def test_null_campaign_forms_its_own_group_sorted_last():
    rows = [("u1", None, T0), ("u2", "A", T0), ("u1", None, T0 + 1), ("u3", None, T0 + 2)]
    partials = window_partials(enriched(rows), "t", 0, 0, 4)
    assert partials.select("campaign_name", "clicks", "user_ids").rows() == [
        ("A", 1, ["u2"]),
        (None, 3, ["u1", "u3"]),
    ]


def test_empty_input_gives_no_windows():
    partials = window_partials(enriched([]), "t", 0, 0, 1)
    assert partials.height == 0
    assert highlights(partials) == {"windows": 0}


def random_rows(rng: random.Random, n: int) -> list[tuple[str, str | None, int]]:
    campaigns = ["A", "B", "C", None]
    rows = []
    for _ in range(n):
        timestamp = T0 + rng.randrange(5 * MINUTE_MS)
        if rng.random() < 0.05:
            timestamp -= rng.randrange(MINUTE_MS, 30 * MINUTE_MS)  # late
        rows.append((f"u{rng.randrange(40)}", rng.choice(campaigns), timestamp))
    return rows


def test_single_range_matches_a_plain_python_aggregation():
    rows = random_rows(random.Random(5), 2_000)
    assert as_windows(window_partials(enriched(rows), "t", 0, 0, 2_000)) == expected_windows(rows)


def test_merging_partials_of_several_ranges_equals_aggregating_everything():
    rng = random.Random(42)
    rows = random_rows(rng, 3_000)
    cuts = sorted(rng.sample(range(1, len(rows)), 6))
    bounds = list(zip([0, *cuts], [*cuts, len(rows)], strict=True))
    partials = pl.concat(
        [
            window_partials(enriched(rows[start:end], list(range(start, end))), "t", 0, start, end)
            for start, end in bounds
        ]
    )
    # a window appears in several ranges' partials; merging sums clicks and unions user ids
    assert partials.height > partials.select("minute", "campaign_name").unique().height
    merged_clicks: dict = defaultdict(int)
    merged_users: dict = defaultdict(set)
    for row in partials.iter_rows(named=True):
        key = (row["minute"], row["campaign_name"])
        merged_clicks[key] += row["clicks"]
        merged_users[key].update(row["user_ids"])
    merged = {key: (merged_clicks[key], sorted(merged_users[key])) for key in merged_clicks}
    assert merged == expected_windows(rows)
    # and a sum of per-range unique counts would overcount
    summed_uniques = sum(len(u) for u in partials["user_ids"].to_list())
    assert summed_uniques > sum(len(users) for _, users in merged.values())


def test_highlights():
    rows = [("u1", "A", T0)] * 3 + [("u2", "B", T0 + MINUTE_MS)] * 5 + [("u3", None, T0 + 2 * MINUTE_MS)]
    partials = window_partials(enriched(rows), "t", 0, 0, len(rows))
    summary = highlights(partials)
    assert summary["windows"] == 3
    assert summary["first_window"] == str(minute_of(T0))
    assert summary["last_window"] == str(minute_of(T0 + 2 * MINUTE_MS))
    assert summary["top_campaigns"] == {"B": 5, "A": 3, "None": 1}
    assert list(summary["top_campaigns"]) == ["B", "A", "None"]


def test_highlights_top_limits_and_sums_over_windows():
    rows = [(f"u{i}", f"C{i % 8}", T0 + (i % 3) * MINUTE_MS) for i in range(8 * 9)]
    rows += [("x", "C0", T0)] * 10
    summary = highlights(window_partials(enriched(rows), "t", 0, 0, len(rows)), top=2)
    assert summary["windows"] == 3
    assert len(summary["top_campaigns"]) == 2
    assert summary["top_campaigns"]["C0"] == 9 + 10
