"""The Dagster daemon (with its code server and run workers) and the webserver SIGKILLed with runs in flight:
after the daemon is started again, every event is in ClickHouse exactly once and the offsets are contiguous."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import dagster as dg
import pytest

from clickhouse_etl.core.failpoints import FAILPOINT_VARIABLE
from clickhouse_etl.core.pipeline.model import Pipeline
from clickhouse_etl.core.settings import Settings, settings_environment
from clickhouse_etl.dev.live import start_daemon, stop_process_group
from clickhouse_etl.orchestration import run_records, tags
from clickhouse_etl.orchestration.instance import export_dagster_home, workspace_file
from clickhouse_etl.tools.catchup import kafka_reader

from .helpers import free_port, produce
from .test_ingest import assert_matches_reference

pytestmark = pytest.mark.integration


def start_webserver(settings: Settings, log_path: Path) -> subprocess.Popen:
    with open(log_path, "ab") as log:
        return subprocess.Popen(
            ["dagster-webserver", "-w", workspace_file(), "-h", "127.0.0.1", "-p", str(free_port())],
            env={**os.environ, **settings_environment(settings)},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def kill_process_group(process: subprocess.Popen) -> None:
    """SIGKILL a process and everything it started (its process group) at once, as a crashed host would."""
    os.killpg(process.pid, signal.SIGKILL)
    process.wait(30)


def runs_reading(instance: dg.DagsterInstance) -> list[dg.DagsterRun]:
    """Runs whose worker has started the read step (it records itself there)."""
    started = instance.get_runs(filters=dg.RunsFilter(statuses=[dg.DagsterRunStatus.STARTED]))
    return [run for run in started if run.tags.get(tags.WORKER_RUN) == run.run_id]


def caught_up(instance: dg.DagsterInstance, pipeline: Pipeline, highs: dict[int, int]) -> bool:
    entries = run_records.read_ledger(instance, pipeline.job_name, pipeline.topic)
    in_flight = instance.get_runs_count(
        dg.RunsFilter(
            job_name=pipeline.job_name,
            statuses=[dg.DagsterRunStatus.QUEUED, dg.DagsterRunStatus.STARTING, dg.DagsterRunStatus.STARTED],
        )
    )
    return in_flight == 0 and all(
        partition in entries and entries[partition].committed_end == high for partition, high in highs.items()
    )


def test_daemon_and_webserver_killed_with_runs_in_flight_lose_nothing(
    settings: Settings, pipeline: Pipeline, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    produce(settings, pipeline, 24_000, seed=41)  # ranges of at most 5,000 offsets: several runs per partition
    highs = {p: high for p, (_, high) in kafka_reader(settings).watermarks(pipeline.topic).items()}
    home = tmp_path / "dagster"
    daemon_settings = settings.model_copy(update={"dagster_home": str(home)})
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    export_dagster_home(daemon_settings)
    # Run workers pause after reading, so runs are surely in flight when everything is killed.
    monkeypatch.setenv(FAILPOINT_VARIABLE, "after_read:sleep=30")
    with dg.DagsterInstance.from_config(str(home)) as instance:  # storage exists before the processes share it
        daemon = start_daemon(daemon_settings, tmp_path / "daemon.log")
        webserver = start_webserver(daemon_settings, tmp_path / "webserver.log")
        try:
            # One run per partition at a time: wait until three are inside their read step (the others queue).
            deadline = time.monotonic() + 180
            while len(runs_reading(instance)) < 3:
                assert time.monotonic() < deadline, (tmp_path / "daemon.log").read_text()[-3000:]
                time.sleep(0.2)
            left_started = runs_reading(instance)
            kill_process_group(daemon)
            kill_process_group(webserver)

            monkeypatch.delenv(FAILPOINT_VARIABLE)
            daemon = start_daemon(daemon_settings, tmp_path / "daemon-restarted.log")
            deadline = time.monotonic() + 300
            while not caught_up(instance, pipeline, highs):
                assert time.monotonic() < deadline, (tmp_path / "daemon-restarted.log").read_text()[-3000:]
                assert daemon.poll() is None, "the restarted daemon exited"
                time.sleep(2)
        finally:
            stop_process_group(daemon)
            if webserver.poll() is None:
                stop_process_group(webserver)
        for run in left_started:  # each run the kill interrupted was failed, and its range loaded again
            assert instance.get_run_by_id(run.run_id).status == dg.DagsterRunStatus.FAILURE
        for entry in run_records.read_ledger(instance, pipeline.job_name, pipeline.topic).values():
            assert entry.gaps() == [] and entry.in_flight == []
    # Runs queued behind the killed ones ran first after the restart, so a duplicate may be kept from a later
    # offset of its partition than its first: still exactly one copy of every click.
    assert_matches_reference(settings, pipeline, any_copy=True)
