"""The run launcher that sends runs to warm Celery run workers, and what the deployment can ask about them.

The workers themselves (the Celery app, its task, the warm-up of each worker process) are in
clickhouse_etl.orchestration.workers; everything here is imported by the daemon, the webserver, the sensor and
the command line, which only send runs and ask how the workers are.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass

import dagster as dg
from celery import Celery
from dagster._core.instance.ref import InstanceRef
from dagster._core.launcher import LaunchRunContext, RunLauncher
from dagster._grpc.types import ExecuteRunArgs
from dagster._serdes import pack_value
from dagster_celery.launcher import CeleryRunLauncher
from dagster_celery.tags import DAGSTER_CELERY_TASK_ID_TAG
from dagster_celery.tasks import TASK_EXECUTE_JOB_NAME

# A run handed to the workers that has not started after this long, with no worker answering, is said to wait.
WAITING_RUN_SECONDS = 10.0


class WarmWorkerRunLauncher(CeleryRunLauncher):
    """dagster-celery's launcher, sending the task by name, with a run terminated (from the UI) stopped for good.

    dagster-celery builds its task anew for every launch (and Celery warns each time that the name is taken);
    the task is the workers' (`workers.execute_run`), so a launch only needs its name.

    Celery stops a revoked task's process with SIGTERM, which Dagster turns into an interrupt of the running
    step; a step with a retry policy (every dependency-facing op here) is then retried in the same process,
    so the run would go on. SIGKILL stops it where it is — each step is idempotent, as for any crash — and
    the run, left CANCELING, is marked canceled by the sensor (same machine) or by run monitoring.
    """

    def launch_run(self, context: LaunchRunContext) -> None:
        run = context.dagster_run
        assert run.job_code_origin is not None
        args = ExecuteRunArgs(
            job_origin=run.job_code_origin,
            run_id=run.run_id,
            instance_ref=self._instance.get_ref(),
            set_exit_code_on_failure=True,
        )
        task = self.celery.signature(
            TASK_EXECUTE_JOB_NAME, kwargs={"execute_job_args_packed": pack_value(args)}, immutable=True
        )
        self._launch_celery_task_run(run=run, task_signature=task, routing_key=TASK_EXECUTE_JOB_NAME)

    def terminate(self, run_id: str) -> bool:
        run = self._instance.get_run_by_id(run_id)
        if run is None or DAGSTER_CELERY_TASK_ID_TAG not in run.tags:
            return False
        self._instance.report_run_canceling(run)  # as Dagster's own launchers do; dagster-celery's does not
        self.celery.AsyncResult(run.tags[DAGSTER_CELERY_TASK_ID_TAG]).revoke(terminate=True, signal="SIGKILL")
        return True


def launcher_app() -> Celery:
    """The Celery app of the instance's run launcher (DAGSTER_HOME's dagster.yaml), with its tasks."""
    ref = InstanceRef.from_dir(os.environ["DAGSTER_HOME"])
    launcher = ref.run_launcher_data.rehydrate(as_type=RunLauncher) if ref.run_launcher_data else None
    if not isinstance(launcher, CeleryRunLauncher):
        raise RuntimeError(f"the instance in {os.environ['DAGSTER_HOME']} does not send runs to Celery workers")
    return launcher.celery


@dataclass(frozen=True)
class WorkerState:
    name: str
    busy: int  # runs executing now
    processes: int


def workers_answering(app: Celery, timeout: float = 1.0) -> list[WorkerState]:
    """The workers that answer right now, with how many runs each executes."""
    inspector = app.control.inspect(timeout=timeout)
    active = inspector.active() or {}
    stats = inspector.stats() or {}
    states = []
    for name in sorted(set(active) | set(stats)):
        processes = int((stats.get(name) or {}).get("pool", {}).get("max-concurrency", 1))
        states.append(WorkerState(name, len(active.get(name) or []), processes))
    return states


def worker_name(index: int) -> str:
    return f"clickhouse-etl-{index}@{socket.gethostname()}"


def describe_workers(app: Celery) -> str:
    """One line for people: how many workers answer and how busy they are, or plainly that none does."""
    states = workers_answering(app)
    if not states:
        return "run workers: NONE answering; runs wait for one (start it with `clickhouse-etl worker`)"
    busy, processes = sum(s.busy for s in states), sum(s.processes for s in states)
    each = ", ".join(f"{s.name} {s.busy}/{s.processes} busy" for s in states)
    return f"run workers: {len(states)} answering, {busy} of {processes} processes busy ({each})"


def warn_if_runs_wait_without_workers(instance: dg.DagsterInstance, job_name: str, warn: Callable[[str], None]) -> None:
    """Say so when runs of the job were handed to the workers a while ago and no worker answers at all.

    Runs waiting for a free worker under load are normal and not reported; a deployment with no worker left
    (never started, all stopped, wrong queue) would otherwise wait silently until run monitoring's start
    timeout fails its runs.
    """
    launcher = instance.run_launcher
    if not isinstance(launcher, CeleryRunLauncher):
        return
    records = instance.get_run_records(dg.RunsFilter(job_name=job_name, statuses=[dg.DagsterRunStatus.STARTING]))
    now = time.time()
    waiting = [r for r in records if now - r.update_timestamp.timestamp() >= WAITING_RUN_SECONDS]
    if not waiting or launcher.celery.control.inspect(timeout=1.0, limit=1).ping():
        return
    oldest = max(now - r.update_timestamp.timestamp() for r in waiting)
    warn(
        f"{len(waiting)} run(s) of {job_name} wait for a run worker (the oldest for {oldest:.0f} s), and no worker "
        f"answers on queue {launcher.default_queue!r}: start one with `clickhouse-etl worker`"
    )
