"""A range larger than one insert window goes through every stage window by window, its frames in memory
within the run's budget or in files of the run's own folder beyond it: the result is exactly the range's
either way, a replay writes nothing, and no file is left."""

from __future__ import annotations

import tempfile
from pathlib import Path

import dagster as dg
import pytest

from clickhouse_etl.core.pipeline.ddl import LOADS
from clickhouse_etl.core.pipeline.model import Pipeline
from clickhouse_etl.core.settings import Settings
from clickhouse_etl.orchestration.resources import SCRATCH_PREFIX
from clickhouse_etl.steps import load as loading
from clickhouse_etl.tools.catchup import run_range

from .helpers import direct_stats, job_of, produce, query, run_catch_up, stats_by_window, warehouse_snapshot
from .test_ingest import assert_every_offset_accounted, assert_matches_reference

pytestmark = pytest.mark.integration

WINDOW = 700  # about five windows per range of this test


@pytest.mark.parametrize("budget_mib", [0, 128], ids=["windows in files", "windows in memory"])
def test_ranges_of_several_windows_load_exactly_and_replay_unchanged(
    budget_mib: int,
    settings: Settings,
    pipeline: Pipeline,
    instance: dg.DagsterInstance,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    monkeypatch.setattr(loading, "INSERT_WINDOW", WINDOW)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # the runs' folders, where this test sees them
    # The smaller window holds in this process only.
    in_process = settings.model_copy(update={"catch_up_workers": 1, "run_memory_budget_mib": budget_mib})
    produce(settings, pipeline, 9_000, seed=71)

    report = run_catch_up(in_process, pipeline, instance)

    assert report.events == 9_000 and all(r.size > WINDOW for r in report.ranges)
    assert_matches_reference(settings, pipeline)
    assert_every_offset_accounted(pipeline, instance, 9_000)
    assert stats_by_window(settings) == direct_stats(settings)
    # One marker per window of each range, for the sink table and the dead letters alike.
    windows = sum(-(-r.size // WINDOW) for r in report.ranges)
    markers = query(
        settings,
        f"SELECT table, count() FROM analytics.{LOADS.name} WHERE kafka_topic = {{t:String}} GROUP BY table",
        t=pipeline.topic,
    )
    assert {table: n for table, n in markers if table != "campaign_window_partials"} == {
        pipeline.sink.table: windows,
        pipeline.sink.dead_letters: windows,
    }
    before = warehouse_snapshot(settings, pipeline)
    job = job_of(in_process, pipeline)
    for offset_range in report.ranges:
        assert run_range(job, instance, offset_range).success
    assert warehouse_snapshot(settings, pipeline) == before
    assert list(tmp_path.glob(f"{SCRATCH_PREFIX}*")) == []  # every run removed its folder
