"""Backfill and replay by offset range; the offsets report; where a new topic starts."""

from __future__ import annotations

import json
import subprocess
import time
from datetime import UTC, datetime
from pathlib import Path

import dagster as dg
import pytest

from clickhouse_etl.core.pipeline.columns import columns_of
from clickhouse_etl.core.pipeline.model import Pipeline
from clickhouse_etl.core.ranges import OffsetRange
from clickhouse_etl.core.settings import Settings
from clickhouse_etl.orchestration import tags
from clickhouse_etl.orchestration.definitions import build_definitions
from clickhouse_etl.orchestration.jobs import BACKFILL_REQUEST_JOB_NAME
from clickhouse_etl.orchestration.sensors import build_backfill_sensor
from clickhouse_etl.tools.catchup import run_range

from .helpers import CLI, cli, cli_env, enriched_rows, job_of, produce, run_catch_up, warehouse_snapshot
from .test_ingest import assert_matches_reference

pytestmark = pytest.mark.integration


def without_processed_at(pipeline: Pipeline, snapshot: dict[str, list[tuple]]) -> dict[str, list[tuple]]:
    at = columns_of(pipeline).sink_names.index("processed_at")
    return {
        **snapshot,
        "rows": [row[:at] + row[at + 1 :] for row in snapshot["rows"]],
        "dead_letters": [row[:4] for row in snapshot["dead_letters"]],
    }


def runs_of(home: Path, job_name: str = "ingest_clicks") -> list[dg.DagsterRun]:
    with dg.DagsterInstance.from_config(str(home)) as instance:
        return list(instance.get_runs(filters=dg.RunsFilter(job_name=job_name)))


def test_backfill_of_a_loaded_range_changes_nothing_and_force_reproduces_it(
    settings: Settings, pipeline: Pipeline, tmp_path
) -> None:
    produce(settings, pipeline, 12_000, seed=21)
    home = str(tmp_path)
    assert cli(settings, "catch-up", dagster_home=home).returncode == 0
    before = warehouse_snapshot(settings, pipeline)

    # Not forced, and deliberately not aligned with the ranges catch-up ran: nothing changes.
    plain = cli(settings, "backfill", "--partition", "1", "--start", "700", "--end", "3300", dagster_home=home)
    assert plain.returncode == 0, plain.stderr[-2000:]
    assert warehouse_snapshot(settings, pipeline) == before

    forced = cli(
        settings, "backfill", "--partition", "1", "--start", "700", "--end", "3300", "--force", dagster_home=home
    )
    assert forced.returncode == 0, forced.stderr[-2000:]
    after = warehouse_snapshot(settings, pipeline)
    assert without_processed_at(pipeline, after) == without_processed_at(pipeline, before)
    # processed_at shows the replay, for exactly the widened committed ranges of partition 1.
    names = columns_of(pipeline).sink_names
    at, partition, offset = (names.index(n) for n in ("processed_at", "kafka_partition", "kafka_offset"))
    changed = {
        (row[partition], row[offset])
        for old, row in zip(before["rows"], after["rows"], strict=True)
        if old[at] != row[at]
    }
    assert changed and {p for p, _ in changed} == {1}
    assert min(o for _, o in changed) < 700 and max(o for _, o in changed) >= 3300  # widened to whole ranges
    backfill_runs = [r for r in runs_of(tmp_path) if r.tags.get(tags.TRIGGER) == "backfill"]
    assert {r.tags[tags.FORCE] for r in backfill_runs} == {"true", "false"}
    assert_matches_reference(settings, pipeline)
    offsets = cli(settings, "offsets", dagster_home=home)
    assert offsets.returncode == 0, offsets.stdout  # replays nested in committed ranges are not overlaps


def test_forced_backfills_of_several_partitions_in_parallel(settings: Settings, pipeline: Pipeline, tmp_path) -> None:
    produce(settings, pipeline, 9_000, seed=22)
    home = str(tmp_path)
    assert cli(settings, "catch-up", dagster_home=home).returncode == 0
    before = without_processed_at(pipeline, warehouse_snapshot(settings, pipeline))
    positions = [(r[8], r[9]) for r in enriched_rows(settings, pipeline)]
    highs = {p: max(o for q, o in positions if q == p) for p in range(3)}
    processes = [
        subprocess.Popen(
            [*CLI, "backfill", "--partition", str(p), "--start", "0", "--end", str(highs[p] + 1), "--force"],
            env=cli_env(settings, home),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for p in range(3)
    ]
    for process in processes:
        _out, err = process.communicate(timeout=600)
        assert process.returncode == 0, err[-2000:]
    assert without_processed_at(pipeline, warehouse_snapshot(settings, pipeline)) == before
    assert_matches_reference(settings, pipeline)


@pytest.mark.parametrize(
    ("start", "end", "message"),
    [
        ("500", "500", "start 500 must be below end 500"),
        ("10", "999999", "beyond the high watermark"),
    ],
)
def test_invalid_backfill_ranges_are_refused_and_start_nothing(
    settings: Settings, pipeline: Pipeline, tmp_path, start: str, end: str, message: str
) -> None:
    produce(settings, pipeline, 3_000, seed=23)
    result = cli(settings, "backfill", "--partition", "0", "--start", start, "--end", end, dagster_home=str(tmp_path))
    assert result.returncode == 2 and message in result.stderr and "nothing was started" in result.stderr
    assert "Traceback" not in result.stderr
    assert runs_of(tmp_path) == []
    missing = cli(settings, "backfill", "--partition", "7", "--start", "0", "--end", "5", dagster_home=str(tmp_path))
    assert missing.returncode == 2 and "no partition 7" in missing.stderr


def test_offsets_reports_lag_and_detects_a_gap_and_an_overlap(
    settings: Settings, pipeline: Pipeline, instance: dg.DagsterInstance, tmp_path
) -> None:
    produce(settings, pipeline, 6_000, seed=24)
    home = str(tmp_path)
    with dg.DagsterInstance.from_config(home) as recorded:
        job = job_of(settings, pipeline)
        t = pipeline.topic
        for r in (
            OffsetRange(t, 0, 0, 500),
            OffsetRange(t, 0, 800, 1200),
            OffsetRange(t, 1, 0, 600),
            OffsetRange(t, 1, 400, 900),
        ):
            assert run_range(job, recorded, r).success
    report = cli(settings, "offsets", dagster_home=home)
    assert report.returncode == 1
    assert report.stdout.splitlines()[0] == "pipeline ad_clicks"
    lines = {line.split()[0]: line for line in report.stdout.splitlines()[3:]}
    assert "GAP [500, 800)" in lines["0"] and "OVERLAP [0, 600) ~ [400, 900)" in lines["1"]
    assert lines["2"].split()[3] == "-" and int(lines["2"].split()[4]) > 0  # nothing committed: all lag
    assert int(lines["0"].split()[3]) == 500  # committed end stops at the gap


def test_backfill_from_the_launchpad_job_is_submitted_by_the_sensor(
    settings: Settings, pipeline: Pipeline, instance: dg.DagsterInstance
) -> None:
    settings = settings.model_copy(update={"max_records_per_run": 1_000})
    produce(settings, pipeline, 4_000, seed=25)
    defs = build_definitions(settings, [pipeline])
    request = defs.get_job_def(BACKFILL_REQUEST_JOB_NAME)
    config = {
        "ops": {
            "plan_backfill_runs": {
                "config": {"pipeline": "ad_clicks", "partition": 2, "start": 0, "end": 1_200, "force": True}
            }
        }
    }
    assert request.execute_in_process(run_config=config, instance=instance).success
    invalid = request.execute_in_process(
        run_config={
            "ops": {"plan_backfill_runs": {"config": {**config["ops"]["plan_backfill_runs"]["config"], "end": 10**9}}}
        },
        instance=instance,
        raise_on_error=False,
    )
    assert not invalid.success
    sensor = build_backfill_sensor([pipeline], [defs.get_job_def(pipeline.job_name)])
    result = sensor.evaluate_tick(dg.build_sensor_context(instance=instance))
    requests = result.run_requests or []
    assert [(r.tags[tags.START], r.tags[tags.END]) for r in requests] == [
        ("0", "1000"),
        ("1000", "1200"),  # split at max_records_per_run
    ]
    assert all(r.job_name == "ingest_clicks" for r in requests)
    assert all(r.tags[tags.FORCE] == "true" and r.run_config["ops"]["read"]["config"]["force"] for r in requests)
    ingest = defs.get_job_def(pipeline.job_name)
    for r in requests:
        assert ingest.execute_in_process(run_config=r.run_config, tags=r.tags, instance=instance).success
    # The next tick has nothing new to submit.
    again = sensor.evaluate_tick(dg.build_sensor_context(instance=instance, cursor=result.cursor))
    assert not again.run_requests


def test_a_new_topic_can_start_at_a_timestamp(
    settings: Settings, pipeline: Pipeline, instance: dg.DagsterInstance
) -> None:
    produce(settings, pipeline, 3_000, seed=26)
    time.sleep(1.5)
    start = datetime.now(UTC)
    time.sleep(1.5)
    produce(settings, pipeline, 2_000, seed=27)
    from_timestamp = settings.model_copy(update={"start_position": start.isoformat()})
    report = run_catch_up(from_timestamp, pipeline, instance)
    assert report.events == 2_000
    assert all(r.start > 0 for r in report.ranges)
    assert json.dumps(sorted({r.partition for r in report.ranges})) == "[0, 1, 2]"


def test_no_wait_hands_the_request_to_the_dagster_instance(settings: Settings, pipeline: Pipeline, tmp_path) -> None:
    produce(settings, pipeline, 2_000, seed=28)
    home = tmp_path / "home"
    result = cli(
        settings, "backfill", "--partition", "0", "--start", "0", "--end", "100", "--no-wait", dagster_home=str(home)
    )
    assert result.returncode == 0, result.stderr[-2000:]
    requests = runs_of(home, BACKFILL_REQUEST_JOB_NAME)
    assert len(requests) == 1  # queued for the daemon; backfill_sensor submits its runs once it has run
    config = requests[0].run_config["ops"]["plan_backfill_runs"]["config"]
    assert (config["pipeline"], config["partition"], config["start"], config["end"], config["force"]) == (
        "ad_clicks",
        0,
        0,
        100,
        False,
    )
