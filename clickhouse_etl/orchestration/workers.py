"""Warm run workers: the run launcher that sends runs to Celery, and the Celery app that executes them.

A run worker imports Dagster, polars, chDB and the pipelines once, opens the Dagster instance once, and then
executes run after run in the same process (the whole run in-process, as dagster-celery's own task does),
where Dagster's default launcher starts a fresh interpreter for every run. The app is the run launcher's
own, rebuilt from the instance's dagster.yaml, so workers and launcher always agree on broker, backend and
queue.

Pool: prefork, with the heavy imports done in each child after the fork (`worker_process_init`). polars
starts threads when it is imported and a process must not be forked after that, so the parent imports only
Celery and Dagster's task; each child then stays warm for its whole life. A child executes one run at a
time (prefetch 1, acknowledged when done), and revoking a run's task (terminating it in the UI) stops just
that child. The embedded chDB store admits one process at a time: loads take its lock and release it.
"""

from __future__ import annotations

from functools import cache

import dagster as dg
from celery.signals import worker_process_init
from dagster._cli.api import _execute_run_command_body
from dagster._grpc.types import ExecuteRunArgs
from dagster._serdes import unpack_value
from dagster_celery.tasks import TASK_EXECUTE_JOB_NAME

from clickhouse_etl.core.collector import freeze_startup_objects, start_up_without_collections
from clickhouse_etl.orchestration.launcher import launcher_app


@cache
def worker_instance() -> dg.DagsterInstance:
    """The Dagster instance of this worker process, open for its whole life (the daemon keeps one too);
    dagster-celery's task opens (parses, connects) a new one for every run."""
    return dg.DagsterInstance.get()


@worker_process_init.connect
def _warm_up(**_: object) -> None:
    """Each child imports the code location and opens the instance once: every run finds them ready."""
    start_up_without_collections()
    import clickhouse_etl.orchestration.definitions  # noqa: F401

    worker_instance()
    freeze_startup_objects()


def execute_run(_task: object, execute_job_args_packed: str) -> int:
    """The workers' task: dagster-celery's, with the worker's instance. 1 if the run failed, else 0."""
    args = unpack_value(execute_job_args_packed, as_type=ExecuteRunArgs)
    return _execute_run_command_body(
        run_id=args.run_id,
        instance=worker_instance(),
        write_stream_fn=lambda _event: None,  # the events are in the instance's event log already
        set_exit_code_on_failure=args.set_exit_code_on_failure is not False,
    )


app = launcher_app()  # what `celery --app clickhouse_etl.orchestration.workers` runs
# track_started: the result backend says STARTED while the run executes, which run monitoring reads.
app.task(bind=True, name=TASK_EXECUTE_JOB_NAME, track_started=True)(execute_run)
