"""With Dagster's default run launcher (a process per run, the documented alternative to run workers): the
daemon, its code server and run processes, and the webserver SIGKILLed with runs in flight. After the daemon is
started again, every event is in ClickHouse exactly once and the offsets are contiguous."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import dagster as dg
import pytest

from clickhouse_etl.core.pipeline.model import Pipeline
from clickhouse_etl.core.settings import Settings
from clickhouse_etl.tools.catchup import kafka_reader

from .deployment import Deployment
from .helpers import produce
from .test_ingest import assert_matches_reference

pytestmark = pytest.mark.integration


@pytest.fixture
def deployment(settings: Settings, tmp_path: Path) -> Iterator[Deployment]:
    deployed = Deployment(settings.model_copy(update={"run_launcher": "default"}), tmp_path)
    try:
        yield deployed
    finally:
        deployed.stop()


def test_daemon_and_webserver_killed_with_runs_in_flight_lose_nothing(
    settings: Settings, pipeline: Pipeline, deployment: Deployment
) -> None:
    produce(settings, pipeline, 24_000, seed=41)  # ranges of at most 5,000 offsets: several runs per partition
    highs = {p: high for p, (_, high) in kafka_reader(settings).watermarks(pipeline.topic).items()}
    assert deployment.instance.run_launcher.__class__.__name__ == "DefaultRunLauncher"
    # Runs pause after reading, so runs are surely in flight when everything is killed.
    deployment.failpoint_file.write_text("after_read:sleep=30")
    deployment.start_daemon()
    deployment.start_webserver()
    # One run per partition at a time: wait until three are inside their read step (the others queue).
    deployment.wait_until(lambda: len(deployment.runs_reading()) == 3, 180, "three runs reading")
    left_started = deployment.runs_reading()
    deployment.kill("daemon")  # its run processes are in its process group: killed with it
    deployment.kill("webserver")

    deployment.failpoint_file.write_text("")
    deployment.start_daemon("daemon-restarted")
    deployment.wait_until(lambda: deployment.caught_up(pipeline, highs), 300, "catching up after the restart")

    for run in left_started:  # each run the kill interrupted was failed, and its range loaded again
        assert deployment.instance.get_run_by_id(run.run_id).status == dg.DagsterRunStatus.FAILURE
    deployment.assert_ranges_contiguous(pipeline)
    # Runs queued behind the killed ones ran first after the restart, so a duplicate may be kept from a later
    # offset of its partition than its first: still exactly one copy of every click.
    assert_matches_reference(settings, pipeline, any_copy=True)
