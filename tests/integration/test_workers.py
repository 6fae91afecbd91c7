"""Runs on warm Celery run workers, against real processes: a daemon, workers, a webserver and the stack's
Redis as broker. Runs wait for a worker and the daemon says so; two named workers share the partitions; a
worker process past its memory cap is replaced after its run; a worker killed mid-run fails its run and a
run terminated from the UI is revoked, and each range then runs again exactly once; the broker restarted
under load loses no run."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import dagster as dg
import pytest
from dagster_graphql import DagsterGraphQLClient

from clickhouse_etl.core.pipeline.model import Pipeline
from clickhouse_etl.core.processes import process_alive
from clickhouse_etl.core.settings import Settings
from clickhouse_etl.dev import stack
from clickhouse_etl.orchestration import tags
from clickhouse_etl.tools.catchup import kafka_reader

from .deployment import Deployment, child_pids
from .helpers import produce
from .test_faults import service_stopped
from .test_ingest import assert_matches_reference

pytestmark = pytest.mark.integration


@pytest.fixture
def deployment(settings: Settings, tmp_path: Path) -> Iterator[Deployment]:
    deployed = Deployment(settings, tmp_path)
    try:
        yield deployed
    finally:
        deployed.stop()


def high_watermarks(settings: Settings, pipeline: Pipeline) -> dict[int, int]:
    return {p: high for p, (_, high) in kafka_reader(settings).watermarks(pipeline.topic).items()}


def runs_of(deployment: Deployment, pipeline: Pipeline, *statuses: dg.DagsterRunStatus) -> list[dg.DagsterRun]:
    return deployment.instance.get_runs(filters=dg.RunsFilter(job_name=pipeline.job_name, statuses=list(statuses)))


def successful_runs_of_range(deployment: Deployment, pipeline: Pipeline, run: dg.DagsterRun) -> int:
    same_range = {tags.PARTITION: run.tags[tags.PARTITION], tags.START: run.tags[tags.START]}
    return len(
        deployment.instance.get_runs(
            filters=dg.RunsFilter(job_name=pipeline.job_name, statuses=[dg.DagsterRunStatus.SUCCESS], tags=same_range)
        )
    )


def test_runs_wait_for_a_worker_and_the_daemon_says_so_then_two_named_workers_share_the_partitions(
    settings: Settings, pipeline: Pipeline, deployment: Deployment
) -> None:
    produce(settings, pipeline, 24_000, seed=51)  # ranges of at most 5,000 offsets: several runs per partition
    highs = high_watermarks(settings, pipeline)
    deployment.start_daemon()

    waiting = "wait for a run worker"
    deployment.wait_until(lambda: waiting in deployment.log_path("daemon").read_text(), 120, "the daemon's warning")
    assert runs_of(deployment, pipeline, dg.DagsterRunStatus.STARTING)
    assert not runs_of(deployment, pipeline, dg.DagsterRunStatus.STARTED, dg.DagsterRunStatus.SUCCESS)

    alpha = deployment.start_workers("alpha", concurrency=1)
    beta = deployment.start_workers("beta", concurrency=1)
    deployment.wait_until(lambda: deployment.caught_up(pipeline, highs), 300, "catching up")

    runs = runs_of(deployment, pipeline)
    assert {run.status for run in runs} == {dg.DagsterRunStatus.SUCCESS}
    ran_on = {int(run.tags[tags.PID]) for run in runs}
    assert ran_on & child_pids(alpha) and ran_on & child_pids(beta)  # both workers took runs
    assert {run.tags[tags.PARTITION] for run in runs} == {"0", "1", "2"}
    deployment.assert_ranges_contiguous(pipeline)
    assert_matches_reference(settings, pipeline)


def test_a_worker_process_past_its_memory_cap_is_replaced_after_its_run_and_the_runs_go_on(
    settings: Settings, pipeline: Pipeline, deployment: Deployment
) -> None:
    produce(settings, pipeline, 12_000, seed=54)  # ranges of at most 5,000 offsets: several runs
    highs = high_watermarks(settings, pipeline)
    deployment.start_daemon()
    deployment.start_workers("capped", concurrency=1, max_memory_mib=1)  # every run leaves its process past it
    deployment.wait_until(lambda: deployment.caught_up(pipeline, highs), 300, "catching up")

    runs = runs_of(deployment, pipeline)
    assert {run.status for run in runs} == {dg.DagsterRunStatus.SUCCESS}
    ran_on = [int(run.tags[tags.PID]) for run in runs]
    # One worker process at a time, each replaced after its run (uncapped, one process would take them all).
    assert len(runs) > 1 and len(set(ran_on)) == len(runs)
    deployment.assert_ranges_contiguous(pipeline)
    assert_matches_reference(settings, pipeline)


# The GraphQL client of dagster-graphql calls gql in a way gql deprecates; nothing of the project's.
@pytest.mark.filterwarnings("ignore:Using variable_values and operation_name:DeprecationWarning")
def test_a_killed_worker_fails_its_run_and_a_terminated_run_is_revoked_and_each_range_runs_again_once(
    settings: Settings, pipeline: Pipeline, deployment: Deployment
) -> None:
    produce(settings, pipeline, 9_000, seed=52)  # one range per partition
    highs = high_watermarks(settings, pipeline)
    deployment.failpoint_file.write_text("after_read:sleep=120")  # runs hold still after reading
    deployment.start_daemon()
    deployment.start_workers("worker", concurrency=2)
    webserver = deployment.start_webserver()
    deployment.wait_until(lambda: len(deployment.runs_reading()) == 2, 180, "two runs reading")
    killed, terminated = deployment.runs_reading()
    deployment.failpoint_file.write_text("")  # the runs that follow go through

    os.kill(int(killed.tags[tags.PID]), signal.SIGKILL)
    revoked_pid = int(terminated.tags[tags.PID])
    host, port = webserver.split(":")
    DagsterGraphQLClient(host, port_number=int(port)).terminate_run(terminated.run_id)  # what the UI sends
    deployment.wait_until(lambda: deployment.caught_up(pipeline, highs), 300, "catching up")

    assert deployment.instance.get_run_by_id(killed.run_id).status == dg.DagsterRunStatus.FAILURE
    assert deployment.instance.get_run_by_id(terminated.run_id).status == dg.DagsterRunStatus.CANCELED
    # The revoked task's process was killed (its worker reaps it in its own time: a zombie counts as stopped).
    deployment.wait_until(lambda: not process_alive(revoked_pid), 30, "the revoked run's process stopping")
    assert successful_runs_of_range(deployment, pipeline, killed) == 1
    assert successful_runs_of_range(deployment, pipeline, terminated) == 1
    deployment.assert_ranges_contiguous(pipeline)
    assert_matches_reference(settings, pipeline)


def test_the_broker_restarted_under_load_loses_no_run(
    settings: Settings, pipeline: Pipeline, deployment: Deployment
) -> None:
    produce(settings, pipeline, 30_000, seed=53)
    highs = high_watermarks(settings, pipeline)
    deployment.start_daemon()
    deployment.start_workers("worker", concurrency=2)
    deployment.wait_until(lambda: runs_of(deployment, pipeline, dg.DagsterRunStatus.SUCCESS), 180, "a first run")

    # Broker, results and claims gone for a while: runs being handed over, started or finished meet the outage.
    with service_stopped(stack.RedisService(settings)):
        time.sleep(5)
    deployment.wait_until(lambda: deployment.caught_up(pipeline, highs), 300, "catching up after the restart")

    deployment.assert_ranges_contiguous(pipeline)
    # A run that failed in the outage may be run again after a later range of its partition: one copy of each.
    assert_matches_reference(settings, pipeline, any_copy=True)
