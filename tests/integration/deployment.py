"""A local deployment of Dagster processes for one test: its own DAGSTER_HOME and run queue, a daemon, run
workers and a webserver as real processes, each in a process group of its own, all stopped afterwards."""

from __future__ import annotations

import os
import signal
import subprocess
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import dagster as dg
import psutil
from dagster_graphql import DagsterGraphQLClient

from clickhouse_etl.core.failpoints import FAILPOINT_VARIABLE
from clickhouse_etl.core.pipeline.model import Pipeline
from clickhouse_etl.core.settings import Settings, settings_environment
from clickhouse_etl.orchestration import run_records, tags
from clickhouse_etl.orchestration.instance import export_dagster_home, instance_environment, workspace_file
from clickhouse_etl.tools.commands import daemon_command, worker_command
from clickhouse_etl.tools.processes import stop_process_group

from .helpers import free_port

IN_FLIGHT = [dg.DagsterRunStatus.QUEUED, dg.DagsterRunStatus.STARTING, dg.DagsterRunStatus.STARTED]


class Deployment:
    """Dagster processes sharing one instance. A failpoint file (see core.failpoints) reaches every run, and
    can be changed while the processes run."""

    def __init__(self, settings: Settings, folder: Path) -> None:
        self.folder = folder
        self.failpoint_file = folder / "failpoint"
        self.settings = settings.model_copy(
            update={"dagster_home": str(folder / "dagster"), "celery_queue": f"test-{uuid.uuid4().hex[:8]}"}
        )
        export_dagster_home(self.settings)
        self.instance = dg.DagsterInstance.from_config(self.settings.dagster_home)  # storage exists before sharing
        self.processes: dict[str, subprocess.Popen] = {}

    def environment(self) -> dict[str, str]:
        return {
            **os.environ,
            **settings_environment(self.settings),
            **instance_environment(self.settings),
            FAILPOINT_VARIABLE: f"@{self.failpoint_file}",
        }

    def start(self, role: str, command: list[str]) -> subprocess.Popen:
        with open(self.log_path(role), "ab") as log:
            process = subprocess.Popen(
                command, env=self.environment(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        self.processes[role] = process
        return process

    def start_daemon(self, role: str = "daemon") -> subprocess.Popen:
        return self.start(role, daemon_command())

    def start_workers(self, name: str, concurrency: int, max_memory_mib: int | None = None) -> subprocess.Popen:
        settings = self.settings
        if max_memory_mib is not None:
            settings = settings.model_copy(update={"worker_max_memory_mib": max_memory_mib})
        return self.start(name, worker_command(settings, concurrency, f"{name}@{os.uname().nodename}"))

    def start_webserver(self) -> str:
        """The webserver on a free port; returns its host:port once it answers."""
        port = free_port()
        self.start("webserver", ["dagster-webserver", "-w", workspace_file(), "-h", "127.0.0.1", "-p", str(port)])
        client = DagsterGraphQLClient("127.0.0.1", port_number=port)
        self.wait_until(lambda: _answers(client), 120, "webserver")
        return f"127.0.0.1:{port}"

    def log_path(self, role: str) -> Path:
        return self.folder / f"{role}.log"

    def logs(self) -> str:
        return "\n".join(f"--- {role}:\n{self.log_path(role).read_text()[-2500:]}" for role in self.processes)

    def kill(self, role: str) -> None:
        """SIGKILL a process and everything it started at once, as a crashed host would."""
        process = self.processes.pop(role)
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(30)

    def stop(self) -> None:
        for process in self.processes.values():
            stop_process_group(process)
        self.processes.clear()
        self.instance.dispose()

    def wait_until(self, condition: Callable[[], object], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            assert time.monotonic() < deadline, f"{what}: not within {timeout:.0f} s\n{self.logs()}"
            for role, process in self.processes.items():
                assert process.poll() is None, f"the {role} exited\n{self.logs()}"
            time.sleep(0.5)

    def runs_reading(self) -> list[dg.DagsterRun]:
        """Runs whose process has started the read step (it records itself there)."""
        started = self.instance.get_runs(filters=dg.RunsFilter(statuses=[dg.DagsterRunStatus.STARTED]))
        return [run for run in started if run.tags.get(tags.WORKER_RUN) == run.run_id]

    def caught_up(self, pipeline: Pipeline, highs: dict[int, int]) -> bool:
        """Every partition committed up to its high watermark with no range left in flight or failed (a failed
        run's retry may still be on its way when the ranges after it are committed), and no run in flight."""
        entries = run_records.read_ledger(self.instance, pipeline.job_name, pipeline.topic)
        in_flight = self.instance.get_runs_count(dg.RunsFilter(job_name=pipeline.job_name, statuses=IN_FLIGHT))
        return in_flight == 0 and all(
            partition in entries
            and entries[partition].committed_end == high
            and not entries[partition].in_flight
            and not entries[partition].failed
            for partition, high in highs.items()
        )

    def assert_ranges_contiguous(self, pipeline: Pipeline) -> None:
        for entry in run_records.read_ledger(self.instance, pipeline.job_name, pipeline.topic).values():
            assert entry.gaps() == [] and entry.in_flight == []


def _answers(client: DagsterGraphQLClient) -> bool:
    try:
        client._execute("{ version }")
    except Exception:
        return False
    return True


def child_pids(process: subprocess.Popen) -> set[int]:
    return {child.pid for child in psutil.Process(process.pid).children(recursive=True)}
