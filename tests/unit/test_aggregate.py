"""Unit tests of clickhouse_etl.steps.aggregate, with expectations computed in plain Python: the ad_clicks
pipeline's clicks and unique users per campaign and minute, and the api_usage pipeline's usage per customer."""

from __future__ import annotations

import random
from collections import defaultdict
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import polars as pl
import pytest
import yaml

from clickhouse_etl.core.pipeline.columns import AggregateColumns, columns_of
from clickhouse_etl.core.pipeline.loading import LoadedPipeline, dump_pipeline, load_pipeline_file, load_pipelines
from clickhouse_etl.core.pipeline.model import Pipeline
from clickhouse_etl.core.ranges import OffsetRange
from clickhouse_etl.steps.aggregate import merged_partials, window_partials, windows_touched
from clickhouse_etl.steps.transform import to_sink_rows

AD_CLICKS = load_pipelines("ad_clicks", environment={})[0].pipeline
API_USAGE = load_pipelines("api_usage", environment={})[0].pipeline
CAMPAIGN_STATS = columns_of(AD_CLICKS).aggregates[0]
CUSTOMER_USAGE = columns_of(API_USAGE).aggregates[0]

MINUTE_MS = 60_000
T0 = 1_700_000_040_000  # a whole minute: 2023-11-14 22:14:00 UTC
PROCESSED_AT = datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC)
MS = pl.Datetime("ms", "UTC")

Click = tuple[str, str | None, int]  # (user_id, campaign_name, timestamp in ms)
Windows = dict[tuple[datetime, str | None], tuple[int, list[str]]]


def as_datetime(timestamp_ms: int) -> datetime:
    return datetime(1970, 1, 1, tzinfo=UTC) + timedelta(milliseconds=timestamp_ms)


def enriched(rows: list[Click], offsets: list[int] | None = None) -> pl.DataFrame:
    """rows of (user_id, campaign_name, timestamp_ms) → the sink rows to_sink_rows makes of them."""
    offsets = offsets if offsets is not None else list(range(len(rows)))
    events = pl.DataFrame(
        {
            "click_id": [f"c{o}" for o in offsets],
            "user_id": [r[0] for r in rows],
            "ad_id": [1 if r[1] is not None else 999 for r in rows],
            "timestamp_ms": [as_datetime(r[2]) for r in rows],
            "ip_address": ["10.0.0.1"] * len(rows),
            "kafka_partition": [0] * len(rows),
            "kafka_offset": offsets,
            "campaign_name": [r[1] for r in rows],
            "campaign_budget": [Decimal("10.00") if r[1] is not None else None for r in rows],
        },
        schema={
            "click_id": pl.String,
            "user_id": pl.String,
            "ad_id": pl.Int64,
            "timestamp_ms": MS,
            "ip_address": pl.String,
            "kafka_partition": pl.UInt32,
            "kafka_offset": pl.UInt64,
            "campaign_name": pl.String,
            "campaign_budget": pl.Decimal(14, 2),
        },
    )
    batch = to_sink_rows(events, AD_CLICKS, columns_of(AD_CLICKS), processed_at=PROCESSED_AT)
    assert batch.rejected.height == 0
    return batch.rows


def click_partials(rows: pl.DataFrame, topic: str, partition: int, start: int, end: int) -> pl.DataFrame:
    return window_partials(rows, CAMPAIGN_STATS, OffsetRange(topic, partition, start, end))


def minute_of(timestamp_ms: int) -> datetime:
    return datetime.fromtimestamp((timestamp_ms // MINUTE_MS) * MINUTE_MS / 1000, tz=UTC)


def expected_windows(rows: list[Click]) -> Windows:
    clicks: dict[tuple[datetime, str | None], int] = defaultdict(int)
    users: dict[tuple[datetime, str | None], set[str]] = defaultdict(set)
    for user_id, campaign, timestamp_ms in rows:
        key = (minute_of(timestamp_ms), campaign)
        clicks[key] += 1
        users[key].add(user_id)
    return {key: (clicks[key], sorted(users[key])) for key in clicks}


def as_windows(partials: pl.DataFrame) -> Windows:
    result = {}
    for row in partials.iter_rows(named=True):
        key = (row["minute"], row["campaign_name"])
        assert key not in result, f"window {key} appears twice"
        result[key] = (row["clicks"], row["user_ids"])
    return result


def random_rows(rng: random.Random, n: int) -> list[Click]:
    campaigns = ["A", "B", "C", None]
    rows = []
    for _ in range(n):
        timestamp = T0 + rng.randrange(5 * MINUTE_MS)
        if rng.random() < 0.05:
            timestamp -= rng.randrange(MINUTE_MS, 30 * MINUTE_MS)  # late
        rows.append((f"u{rng.randrange(40)}", rng.choice(campaigns), timestamp))
    return rows


# --- ad_clicks: clicks and unique users per campaign and minute ---------------------------------------------------


def test_campaign_stats_is_the_aggregate_the_tests_assume() -> None:
    """The packaged ad_clicks aggregate: clicks and the user ids per minute and campaign_name."""
    assert CAMPAIGN_STATS.window_column == "minute"
    assert CAMPAIGN_STATS.aggregate.time_column == "click_time"
    assert [c.name for c in CAMPAIGN_STATS.group_by] == ["campaign_name"]
    assert {name: column.name for name, column in CAMPAIGN_STATS.states.items()} == {
        "clicks": "clicks",
        "unique_users": "user_ids",
    }


def test_partials_do_not_depend_on_the_click_time_unit() -> None:
    """The same partials, windows in ms UTC, whether click_time is held in ms or µs."""
    rows = random_rows(random.Random(9), 500)
    frame = enriched(rows)
    as_ms = frame.with_columns(pl.col("click_time").dt.cast_time_unit("ms"))
    as_us = frame.with_columns(pl.col("click_time").dt.cast_time_unit("us"))
    assert as_ms.schema["click_time"] == pl.Datetime("ms", "UTC")
    from_ms = click_partials(as_ms, "t", 0, 0, 500)
    assert from_ms.schema["minute"] == pl.Datetime("ms", "UTC")
    assert from_ms.equals(click_partials(as_us, "t", 0, 0, 500))
    assert as_windows(from_ms) == expected_windows(rows)


def test_clicks_and_sorted_distinct_users_per_minute_and_campaign() -> None:
    """Per (minute, campaign): the click count and the sorted distinct user ids, with the range's position."""
    rows = [
        ("u3", "A", T0 + 1),
        ("u1", "A", T0 + 59_999),
        ("u3", "A", T0 + 30_000),
        ("u2", "B", T0 + 10),
        ("u1", "A", T0 + MINUTE_MS),  # next minute
        ("u2", "B", T0 + MINUTE_MS + 5),
    ]
    partials = click_partials(enriched(rows), "ad_clicks", 4, 100, 106)
    assert partials.columns == [
        "minute",
        "campaign_name",
        "clicks",
        "user_ids",
        "kafka_topic",
        "kafka_partition",
        "range_start",
        "range_end",
    ]
    assert partials.schema["clicks"] == pl.UInt64
    assert partials.schema["user_ids"] == pl.List(pl.String)
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
    assert partials.schema["range_end"] == pl.UInt64


def test_late_events_land_in_their_own_minute() -> None:
    """An event 25 minutes late counts in its own minute, not in the minute it arrived with."""
    late = T0 - 25 * MINUTE_MS + 17
    rows = [("u1", "A", T0 + 5), ("u2", "A", late), ("u3", "A", T0 + 6)]
    windows = as_windows(click_partials(enriched(rows), "t", 0, 0, 3))
    assert windows == {
        (minute_of(T0), "A"): (2, ["u1", "u3"]),
        (minute_of(late), "A"): (1, ["u2"]),
    }


def test_null_campaign_forms_its_own_group_sorted_last() -> None:
    """Clicks without a campaign are one group of their own, after the named campaigns."""
    rows = [("u1", None, T0), ("u2", "A", T0), ("u1", None, T0 + 1), ("u3", None, T0 + 2)]
    partials = click_partials(enriched(rows), "t", 0, 0, 4)
    assert partials.select("campaign_name", "clicks", "user_ids").rows() == [
        ("A", 1, ["u2"]),
        (None, 3, ["u1", "u3"]),
    ]


def test_empty_input_gives_no_windows() -> None:
    """No rows: no partials (still with their columns), and no windows touched."""
    partials = click_partials(enriched([]), "t", 0, 0, 1)
    assert partials.height == 0
    assert partials.schema["minute"] == pl.Datetime("ms", "UTC")
    assert partials.schema["clicks"] == pl.UInt64
    assert windows_touched(partials, "minute") is None


def test_single_range_matches_a_plain_python_aggregation() -> None:
    """On random clicks (some late, some without campaign) the partials equal a plain-Python aggregation."""
    rows = random_rows(random.Random(5), 2_000)
    assert as_windows(click_partials(enriched(rows), "t", 0, 0, 2_000)) == expected_windows(rows)


def test_merging_partials_of_several_ranges_equals_aggregating_everything() -> None:
    """Summing clicks and uniting user ids over ranges' partials gives the aggregate of all the clicks."""
    rng = random.Random(42)
    rows = random_rows(rng, 3_000)
    cuts = sorted(rng.sample(range(1, len(rows)), 6))
    bounds = list(zip([0, *cuts], [*cuts, len(rows)], strict=True))
    partials = pl.concat(
        [
            click_partials(enriched(rows[start:end], list(range(start, end))), "t", 0, start, end)
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


def test_windows_touched_and_clicks_per_campaign() -> None:
    """windows_touched gives the first and last minute; clicks summed over windows give each campaign's total."""
    rows = [("u1", "A", T0)] * 3 + [("u2", "B", T0 + MINUTE_MS)] * 5 + [("u3", None, T0 + 2 * MINUTE_MS)]
    partials = click_partials(enriched(rows), "t", 0, 0, len(rows))
    assert partials.height == 3
    assert windows_touched(partials, "minute") == (str(minute_of(T0)), str(minute_of(T0 + 2 * MINUTE_MS)))
    totals: dict[str | None, int] = defaultdict(int)
    for row in partials.iter_rows(named=True):
        totals[row["campaign_name"]] += row["clicks"]
    assert dict(totals) == {"B": 5, "A": 3, None: 1}


def test_clicks_of_a_campaign_sum_over_its_windows() -> None:
    """A campaign clicked in three minutes has three partial rows whose clicks add up to its clicks."""
    rows = [(f"u{i}", f"C{i % 8}", T0 + (i % 3) * MINUTE_MS) for i in range(8 * 9)]
    rows += [("x", "C0", T0)] * 10
    partials = click_partials(enriched(rows), "t", 0, 0, len(rows))
    assert partials["minute"].n_unique() == 3
    assert windows_touched(partials, "minute") == (str(minute_of(T0)), str(minute_of(T0 + 2 * MINUTE_MS)))
    c0 = partials.filter(pl.col("campaign_name") == "C0")
    assert c0.height == 3
    assert sum(c0["clicks"].to_list()) == 9 + 10 == sum(1 for r in rows if r[1] == "C0")


# --- api_usage: requests, tokens, distinct endpoints and max latency per customer and plan -----------------------


Call = tuple[str, str | None, str, int | None, float | None, int]  # customer, plan, endpoint, tokens, latency, ts ms
UsageKey = tuple[datetime, str, str | None]


def usage_rows(pipeline: Pipeline, rows: list[Call], offsets: list[int] | None = None) -> pl.DataFrame:
    """Decoded and enriched api_usage events → the sink rows to_sink_rows makes of them."""
    offsets = offsets if offsets is not None else list(range(len(rows)))
    events = pl.DataFrame(
        {
            "event_id": [f"e{o}" for o in offsets],
            "customer_id": [r[0] for r in rows],
            "endpoint": [r[2] for r in rows],
            "tokens": [r[3] for r in rows],
            "latency_ms": [r[4] for r in rows],
            "ts": [as_datetime(r[5]) for r in rows],
            "kafka_partition": [3] * len(rows),
            "kafka_offset": offsets,
            "plan": [r[1] for r in rows],
            "region": ["eu"] * len(rows),
        },
        schema={
            "event_id": pl.String,
            "customer_id": pl.String,
            "endpoint": pl.String,
            "tokens": pl.Int64,
            "latency_ms": pl.Float64,
            "ts": MS,
            "kafka_partition": pl.UInt32,
            "kafka_offset": pl.UInt64,
            "plan": pl.String,
            "region": pl.String,
        },
    )
    batch = to_sink_rows(events, pipeline, columns_of(pipeline), processed_at=PROCESSED_AT)
    assert batch.rejected.height == 0
    return batch.rows


def usage_partials(
    pipeline: Pipeline, aggregate: AggregateColumns, rows: list[Call], start: int = 0, end: int | None = None
) -> pl.DataFrame:
    offsets = list(range(start, start + len(rows)))
    frame = usage_rows(pipeline, rows, offsets)
    return window_partials(frame, aggregate, OffsetRange("api_usage", 3, start, end or start + max(len(rows), 1)))


def _sum(values: list[Any]) -> Any:
    present = [v for v in values if v is not None]
    return sum(present) if present else None


def _max(values: list[Any]) -> Any:
    present = [v for v in values if v is not None]
    return max(present) if present else None


def _min(values: list[Any]) -> Any:
    present = [v for v in values if v is not None]
    return min(present) if present else None


def truncate(moment: datetime, window: str) -> datetime:
    if window == "minute":
        return moment.replace(second=0, microsecond=0)
    if window == "hour":
        return moment.replace(minute=0, second=0, microsecond=0)
    return moment.replace(hour=0, minute=0, second=0, microsecond=0)


def expected_usage(rows: list[Call], window: str = "minute") -> dict[UsageKey, tuple[int, Any, list[str], Any]]:
    """Per (window, customer_id, plan): requests, tokens sum, sorted distinct endpoints, max latency (NULLs skipped)."""
    groups: dict[UsageKey, list[Call]] = defaultdict(list)
    for row in rows:
        groups[(truncate(as_datetime(row[5]), window), row[0], row[1])].append(row)
    return {
        key: (
            len(calls),
            _sum([c[3] for c in calls]),
            sorted({c[2] for c in calls}),
            _max([c[4] for c in calls]),
        )
        for key, calls in groups.items()
    }


def as_usage(partials: pl.DataFrame) -> dict[UsageKey, tuple[int, Any, list[str], Any]]:
    result = {}
    for row in partials.iter_rows(named=True):
        key = (row["minute"], row["customer_id"], row["plan"])
        assert key not in result, f"window {key} appears twice"
        result[key] = (row["requests"], row["tokens"], row["distinct_endpoints"], row["max_latency_ms"])
    return result


def random_calls(rng: random.Random, n: int, *, nulls: bool = False, days: int = 1) -> list[Call]:
    customers = ["acme", "globex", "initech"]
    plans = ["free", "pro", None]
    endpoints = ["/v1/chat", "/v1/embed", "/v1/models", "/v2/chat"]
    start = 1_704_067_200_000  # 2024-01-01 00:00 UTC
    rows: list[Call] = []
    for _ in range(n):
        tokens = None if nulls and rng.random() < 0.3 else rng.randrange(0, 5_000)
        latency = None if nulls and rng.random() < 0.3 else round(rng.uniform(1, 3_000), 3)
        ts = start + rng.randrange(days * 24 * 60 * MINUTE_MS)
        rows.append((rng.choice(customers), rng.choice(plans), rng.choice(endpoints), tokens, latency, ts))
    return rows


@pytest.fixture(scope="module")
def nullable_usage(tmp_path_factory: pytest.TempPathFactory) -> LoadedPipeline:
    """api_usage with optional tokens and latency_ms, and a min measure besides the max."""
    document = yaml.safe_load(dump_pipeline(API_USAGE))
    document["source"]["fields"]["tokens"] = {"type": "int64", "required": False}
    document["source"]["fields"]["latency_ms"] = {"type": "float64", "required": False}
    document["aggregate"][0]["measures"]["min_latency_ms"] = {"min": "latency_ms"}
    path = tmp_path_factory.mktemp("pipelines") / "api_usage.yaml"
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return load_pipeline_file(path, environment={})


def test_customer_usage_is_the_aggregate_the_tests_assume() -> None:
    """The packaged api_usage aggregate: per minute, customer_id and plan; windows minute, hour and day."""
    assert CUSTOMER_USAGE.window_column == "minute"
    assert CUSTOMER_USAGE.aggregate.time_column == "event_time"
    assert [c.name for c in CUSTOMER_USAGE.group_by] == ["customer_id", "plan"]
    assert list(CUSTOMER_USAGE.aggregate.windows) == ["minute", "hour", "day"]


def test_requests_tokens_endpoints_and_max_latency_per_minute_customer_and_plan() -> None:
    """Per (minute, customer, plan): request count, token sum, sorted distinct endpoints, max latency."""
    base = 1_704_067_200_000  # 2024-01-01 00:00 UTC
    rows: list[Call] = [
        ("acme", "pro", "/v1/embed", 100, 20.5, base + 1),
        ("acme", "pro", "/v1/chat", 250, 1_200.0, base + 59_999),
        ("acme", "pro", "/v1/chat", 50, 3.25, base + 30_000),
        ("acme", "free", "/v1/chat", 7, 10.0, base + 2),  # same customer, another plan: another group
        ("globex", None, "/v1/models", 0, 99.0, base + 3),
        ("acme", "pro", "/v1/chat", 1, 5.0, base + MINUTE_MS),  # next minute
    ]
    partials = usage_partials(API_USAGE, CUSTOMER_USAGE, rows, start=40, end=46)
    minute = datetime(2024, 1, 1, tzinfo=UTC)
    assert partials.select(
        "minute", "customer_id", "plan", "requests", "tokens", "distinct_endpoints", "max_latency_ms"
    ).rows() == [
        (minute, "acme", "free", 1, 7, ["/v1/chat"], 10.0),
        (minute, "acme", "pro", 3, 400, ["/v1/chat", "/v1/embed"], 1_200.0),
        (minute, "globex", None, 1, 0, ["/v1/models"], 99.0),
        (minute + timedelta(minutes=1), "acme", "pro", 1, 1, ["/v1/chat"], 5.0),
    ]
    assert dict(partials.schema) == {
        "minute": pl.Datetime("ms", "UTC"),
        "customer_id": pl.String,
        "plan": pl.String,
        "requests": pl.UInt64,
        "tokens": pl.Int64,
        "distinct_endpoints": pl.List(pl.String),
        "max_latency_ms": pl.Float64,
        "kafka_topic": pl.String,
        "kafka_partition": pl.UInt32,
        "range_start": pl.UInt64,
        "range_end": pl.UInt64,
    }
    assert partials.select("kafka_topic", "kafka_partition", "range_start", "range_end").unique().rows() == [
        ("api_usage", 3, 40, 46)
    ]
    assert windows_touched(partials, "minute") == (str(minute), str(minute + timedelta(minutes=1)))


def test_usage_with_a_null_plan_is_a_group_sorted_last() -> None:
    """Calls of a customer without a plan (no lookup row) form their own group, after that customer's plans."""
    base = 1_704_067_200_000
    rows: list[Call] = [
        ("acme", None, "/a", 1, 1.0, base),
        ("acme", "pro", "/a", 2, 2.0, base),
        ("acme", None, "/b", 3, 3.0, base),
    ]
    partials = usage_partials(API_USAGE, CUSTOMER_USAGE, rows)
    assert partials.select("customer_id", "plan", "requests", "tokens").rows() == [
        ("acme", "pro", 1, 2),
        ("acme", None, 2, 4),
    ]


def test_usage_matches_a_plain_python_aggregation() -> None:
    """On random calls over a day the partials equal a plain-Python aggregation per minute, customer and plan."""
    rows = random_calls(random.Random(11), 3_000)
    assert as_usage(usage_partials(API_USAGE, CUSTOMER_USAGE, rows)) == expected_usage(rows)


def test_a_group_whose_measured_column_is_all_null_has_null_sum_min_and_max(nullable_usage: LoadedPipeline) -> None:
    """Like ClickHouse, NULLs are skipped; a group with only NULLs has a NULL sum, min and max, not 0."""
    usage = nullable_usage.columns.aggregates[0]
    assert usage.states["tokens"].nullable
    assert usage.states["max_latency_ms"].nullable
    base = 1_704_067_200_000
    rows: list[Call] = [
        ("acme", "pro", "/a", None, None, base),
        ("acme", "pro", "/b", None, None, base + 1),
        ("globex", "pro", "/a", None, 7.5, base),
        ("globex", "pro", "/a", 4, None, base + 2),
        ("globex", "pro", "/a", 0, 2.5, base + 3),
        ("initech", "pro", "/a", 0, 0.0, base),  # zeros are values, not NULLs
    ]
    partials = usage_partials(nullable_usage.pipeline, usage, rows)
    assert partials.select("customer_id", "requests", "tokens", "max_latency_ms", "min_latency_ms").rows() == [
        ("acme", 2, None, None, None),
        ("globex", 3, 4, 7.5, 2.5),
        ("initech", 1, 0, 0.0, 0.0),
    ]
    assert partials.schema["min_latency_ms"] == pl.Float64


def test_nullable_measures_match_a_plain_python_aggregation(nullable_usage: LoadedPipeline) -> None:
    """On random calls with NULL tokens and latencies the partials equal a NULL-skipping plain-Python aggregation."""
    usage = nullable_usage.columns.aggregates[0]
    rows = random_calls(random.Random(12), 3_000, nulls=True)
    partials = usage_partials(nullable_usage.pipeline, usage, rows)
    assert as_usage(partials) == expected_usage(rows)
    minima: dict[UsageKey, Any] = defaultdict(list)
    for row in rows:
        minima[(truncate(as_datetime(row[5]), "minute"), row[0], row[1])].append(row[4])
    assert {
        (row["minute"], row["customer_id"], row["plan"]): row["min_latency_ms"]
        for row in partials.iter_rows(named=True)
    } == {key: _min(values) for key, values in minima.items()}


def merge(partials: pl.DataFrame, window: str) -> dict[UsageKey, tuple[int, Any, list[str], Any]]:
    """Minute partials merged in plain Python into a coarser window, as the hour and day views merge them."""
    requests: dict[UsageKey, int] = defaultdict(int)
    tokens: dict[UsageKey, list[Any]] = defaultdict(list)
    endpoints: dict[UsageKey, set[str]] = defaultdict(set)
    latency: dict[UsageKey, list[Any]] = defaultdict(list)
    for row in partials.iter_rows(named=True):
        key = (truncate(row["minute"], window), row["customer_id"], row["plan"])
        requests[key] += row["requests"]
        tokens[key].append(row["tokens"])
        endpoints[key].update(row["distinct_endpoints"])
        latency[key].append(row["max_latency_ms"])
    return {key: (requests[key], _sum(tokens[key]), sorted(endpoints[key]), _max(latency[key])) for key in requests}


@pytest.mark.parametrize("window", ["hour", "day"])
@pytest.mark.parametrize("nulls", [False, True])
def test_merging_minute_partials_of_several_ranges_into_hours_and_days_equals_aggregating_directly(
    nullable_usage: LoadedPipeline, window: str, nulls: bool
) -> None:
    """Minute partials of several ranges, merged per hour or day, equal aggregating all the calls per hour or day."""
    pipeline, usage = (
        (nullable_usage.pipeline, nullable_usage.columns.aggregates[0]) if nulls else (API_USAGE, CUSTOMER_USAGE)
    )
    rng = random.Random(2024 + nulls)
    rows = random_calls(rng, 4_000, nulls=nulls, days=3)
    cuts = sorted(rng.sample(range(1, len(rows)), 5))
    bounds = list(zip([0, *cuts], [*cuts, len(rows)], strict=True))
    partials = pl.concat([usage_partials(pipeline, usage, rows[start:end], start, end) for start, end in bounds])
    assert partials.select("range_start").unique().height == len(bounds)
    merged = merge(partials, window)
    assert merged == expected_usage(rows, window)
    assert len(merged) < partials.height  # windows really were merged
    # summing per-range distinct counts would overcount the distinct endpoints
    summed = sum(len(e) for e in partials["distinct_endpoints"].to_list())
    assert summed > sum(len(endpoints) for _, _, endpoints, _ in merged.values())


def nullable_usage_rows(rng: random.Random, n: int) -> pl.DataFrame:
    """Rows with what the api_usage aggregate reads: some tokens and latencies null, a few late events."""
    base = 1_700_000_000_000
    return pl.DataFrame(
        {
            "event_time": [as_datetime(base + rng.randrange(0, 5 * MINUTE_MS)) for _ in range(n)],
            "customer_id": [f"c{rng.randrange(4)}" for _ in range(n)],
            "plan": [rng.choice(["free", "pro", None]) for _ in range(n)],
            "tokens": [rng.choice([None, rng.randrange(1, 500)]) for _ in range(n)],
            "endpoint": [rng.choice(["/a", "/b", "/c", None]) for _ in range(n)],
            "latency_ms": [rng.choice([None, rng.random() * 900]) for _ in range(n)],
        },
        schema={
            "event_time": MS,
            "customer_id": pl.String,
            "plan": pl.String,
            "tokens": pl.Int64,
            "endpoint": pl.String,
            "latency_ms": pl.Float64,
        },
    )


@pytest.mark.parametrize("pieces", [1, 2, 7])
def test_partials_of_a_range_merged_from_its_windows_equal_the_whole_ranges(pieces: int) -> None:
    """A run aggregates its range window by window: merged, that is exactly the range's partials — for a
    count, a distinct count, a sum and a maximum, NULLs and empty groups included."""
    rng = random.Random(pieces)
    offset_range = OffsetRange("t", 0, 0, 4_000)
    for rows, columns in (
        (enriched(random_rows(rng, 4_000)), CAMPAIGN_STATS),
        (nullable_usage_rows(rng, 4_000), CUSTOMER_USAGE),
    ):
        cuts = sorted(rng.sample(range(1, rows.height), pieces - 1))
        parts = [rows.slice(a, b - a) for a, b in zip([0, *cuts], [*cuts, rows.height], strict=True)]
        merged = merged_partials([window_partials(part, columns, offset_range) for part in parts], columns)
        assert merged.equals(window_partials(rows, columns, offset_range), null_equal=True)
