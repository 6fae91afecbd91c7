"""Windowed aggregation stays exact across many small runs, retries, replays, forced reloads and late events."""

from __future__ import annotations

import dagster as dg
import pytest

from clickhouse_etl.core.pipeline.model import Pipeline
from clickhouse_etl.core.settings import Settings
from clickhouse_etl.dev.demo_data import EventShares
from clickhouse_etl.orchestration.definitions import VERIFY_JOB_NAME, build_definitions
from clickhouse_etl.tools.catchup import run_range

from .helpers import direct_stats, enriched_rows, job_of, produce, query, run_catch_up, stats_by_window

pytestmark = pytest.mark.integration

LATE_HEAVY = EventShares(duplicate=0.1, duplicate_other_partition=0.5, late=0.3, unknown_ad=0.05, bot=0.03)


def test_stats_stay_exact_across_runs_replays_forced_reloads_and_late_events(
    settings: Settings, pipeline: Pipeline, instance: dg.DagsterInstance
) -> None:
    small = settings.model_copy(update={"max_records_per_run": 1_500})
    produce(small, pipeline, 9_000, shares=LATE_HEAVY, seed=5)
    first = run_catch_up(small, pipeline, instance)
    assert len(first.ranges) >= 6
    # More data later, with events late by up to 30 minutes landing in windows earlier runs touched.
    produce(small, pipeline, 6_000, shares=LATE_HEAVY, seed=6)
    second = run_catch_up(small, pipeline, instance)
    assert second.ranges and stats_by_window(small) == direct_stats(small)
    windows_before = stats_by_window(small)
    assert len(windows_before) > 50

    job = job_of(small, pipeline)
    ranges = [*first.ranges, *second.ranges]
    # Replays (as a retry would) change nothing.
    for offset_range in ranges[::3]:
        assert run_range(job, instance, offset_range).success
    assert stats_by_window(small) == windows_before
    # Forced reloads replace exactly those ranges' rows and contributions: same stats, new processed_at.
    processed_before = {row[0]: row[7] for row in enriched_rows(small, pipeline)}
    forced = ranges[1::4]
    for offset_range in forced:
        assert run_range(job, instance, offset_range, force=True).success
    assert stats_by_window(small) == windows_before == direct_stats(small)
    rows = enriched_rows(small, pipeline)
    assert len({row[0] for row in rows}) == len(rows) == len(processed_before)
    replaced = [row for row in rows if row[7] != processed_before[row[0]]]
    in_forced = [row for row in rows if any(r.partition == row[8] and r.start <= row[9] < r.end for r in forced)]
    assert replaced and sorted(replaced) == sorted(in_forced)
    # One partial row per window and range: forced reloads did not stack contributions.
    duplicated_partials = query(
        small,
        "SELECT count() FROM (SELECT minute, campaign_name, kafka_partition, range_start, count() AS n "
        "FROM analytics.campaign_window_partials GROUP BY ALL HAVING n > 1)",
    )
    assert duplicated_partials == [(0,)]

    # The asset checks (as the nightly verification job runs them) pass: offsets contiguous, stats exact
    # for the windows the recent runs touched.
    assert verification(small, pipeline, instance) == {
        ("ad_clicks_enriched", "offsets_contiguous"): True,
        ("campaign_minute_stats", "matches_sink_table"): True,
        ("campaign_hour_stats", "matches_sink_table"): True,
    }
    # A contribution counted twice is caught.
    query(
        small,
        "INSERT INTO analytics.campaign_window_partials SELECT * FROM analytics.campaign_window_partials LIMIT 1",
    )
    found = verification(small, pipeline, instance)
    assert found[("campaign_minute_stats", "matches_sink_table")] is False
    assert found[("campaign_hour_stats", "matches_sink_table")] is False


def verification(settings: Settings, pipeline: Pipeline, instance: dg.DagsterInstance) -> dict[tuple[str, str], bool]:
    defs = build_definitions(settings, [pipeline])
    result = defs.resolve_job_def(VERIFY_JOB_NAME).execute_in_process(instance=instance, raise_on_error=False)
    return {
        (evaluation.asset_key.path[-1], evaluation.check_name): evaluation.passed
        for evaluation in (
            event.event_specific_data
            for event in result.all_events
            if event.event_type == dg.DagsterEventType.ASSET_CHECK_EVALUATION
        )
    }


def test_hour_view_matches_direct_hourly_aggregation(
    settings: Settings, pipeline: Pipeline, instance: dg.DagsterInstance
) -> None:
    produce(settings, pipeline, 5_000, shares=LATE_HEAVY, seed=8)
    run_catch_up(settings, pipeline, instance)
    hourly = query(settings, "SELECT hour, campaign_name, clicks, unique_users FROM analytics.campaign_hour_stats")
    direct = query(
        settings,
        "SELECT toStartOfHour(click_time), campaign_name, count(), uniqExact(user_id) "
        "FROM analytics.ad_clicks_enriched GROUP BY 1, 2",
    )
    normalize = lambda rows: sorted((str(w)[:19], c or "", n, u) for w, c, n, u in rows)  # noqa: E731
    assert normalize(hourly) == normalize(direct) and hourly
