"""Catch-up: run the ingest job over everything available now, recording each run in the Dagster instance."""

from __future__ import annotations

import multiprocessing
import queue
import socket
import time
import uuid
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field

import dagster as dg
from dagster._core.instance.ref import InstanceRef

from clickhouse_etl import ledger
from clickhouse_etl.jobs import INGEST_JOB_NAME, range_run_config, range_tags
from clickhouse_etl.ops import worker_tags
from clickhouse_etl.resources import KafkaSource
from clickhouse_etl.settings import CODE_LOCATION, Settings
from clickhouse_etl.stack import process_alive
from clickhouse_etl.steps.ranges import OffsetRange, split_range

CATCH_UP_ATTEMPTS = 3


class CatchUpError(RuntimeError):
    """A range still failed after its retries, or offsets expired before they were processed."""


@dataclass
class CatchUpReport:
    runs: list[str] = field(default_factory=list)
    ranges: list[OffsetRange] = field(default_factory=list)
    events: int = 0
    seconds: float = 0.0


def pending_ranges(
    instance: dg.DagsterInstance, kafka: KafkaSource, topic: str, max_records: int, start_position: str
) -> list[OffsetRange]:
    """Ranges from each partition's committed end up to its high watermark now; failed ranges first."""
    watermarks = kafka.watermarks(topic)
    ledgers = ledger.read_ledger(instance, topic)
    start_offsets = kafka.start_offsets(topic, start_position)
    ranges: list[OffsetRange] = []
    for partition, (low, high) in watermarks.items():
        entry = ledgers.get(partition)
        if entry is not None:
            ranges.extend(sorted(entry.failed))
        committed = None if entry is None else entry.committed_end
        planned = None if entry is None else entry.planned_end
        start = planned if planned is not None else start_offsets[partition]
        if committed is not None and committed < low:
            raise CatchUpError(
                f"{topic}/{partition}: offsets [{committed}, {low}) expired in Kafka before they "
                "were processed; see `clickhouse-etl offsets`"
            )
        ranges.extend(split_range(topic, partition, start, high, max_records))
    return sorted(set(ranges), key=lambda r: (r.start, r.partition))


def fail_abandoned_runs(instance: dg.DagsterInstance, topic: str, echo: Callable[[str], None] = print) -> int:
    """Mark as failed the runs of this machine whose process is gone (killed mid-run), so they are re-run.

    Every run records the process that executes it (ops.worker_tags): a catch-up or backfill process, or a
    run worker the daemon launched. Dagster's default run launcher cannot check a run worker's health, so
    without this a run whose process was SIGKILLed (with the daemon, say) would stay "in flight" forever.
    """
    host = socket.gethostname()
    abandoned = 0
    for run in instance.get_runs(
        filters=dg.RunsFilter(
            job_name=INGEST_JOB_NAME,
            statuses=[dg.DagsterRunStatus.STARTED, dg.DagsterRunStatus.STARTING],
            tags={"kafka/topic": topic, "etl/host": host},
        )
    ):
        pid = int(run.tags.get("etl/pid", "0"))
        if run.tags.get("etl/worker_run") == run.run_id and pid and not process_alive(pid):
            instance.report_run_failed(run, message=f"process {pid} that ran it is gone (killed mid-run)")
            echo(f"  run {run.run_id} of [{run.tags['kafka/start']}, {run.tags['kafka/end']}) was abandoned: failed")
            abandoned += 1
    return abandoned


def run_range(
    job: dg.JobDefinition,
    instance: dg.DagsterInstance,
    offset_range: OffsetRange,
    force: bool = False,
    tags: dict[str, str] | None = None,
    log_level: str = "WARNING",
) -> dg.ExecuteInProcessResult:
    """One range through the job in this process, recorded in `instance` like any other run."""
    r = offset_range
    run_config = {
        **range_run_config(r.topic, r.partition, r.start, r.end, force),
        "loggers": {"console": {"config": {"log_level": log_level}}},
    }
    run_id = str(uuid.uuid4())
    return job.execute_in_process(
        run_config=run_config,
        instance=instance,
        run_id=run_id,
        tags={
            **range_tags(r.topic, r.partition, r.start, r.end),
            **worker_tags(run_id),
            # Dagster lists a job's runs by this tag: in-process runs appear on the job's page like launched ones.
            ".dagster/repository": f"__repository__@{CODE_LOCATION}",
            # Retried here (run_ranges), not by the daemon: it cannot relaunch a run executed in-process.
            "dagster/max_retries": "0",
            **(tags or {}),
        },
        raise_on_error=False,
    )


def run_ranges(
    job: dg.JobDefinition,
    instance: dg.DagsterInstance,
    ranges: list[OffsetRange],
    tags: dict[str, str],
    force: bool = False,
    echo: Callable[[str], None] = print,
) -> CatchUpReport:
    """Run each range through the job in order, retrying a failed run; raise CatchUpError if one still fails."""
    report = CatchUpReport()
    started = time.perf_counter()
    for offset_range in ranges:
        for attempt in range(1, CATCH_UP_ATTEMPTS + 1):
            result = run_range(job, instance, offset_range, force, tags={**tags, "etl/attempt": str(attempt)})
            report.runs.append(result.run_id)
            if result.success:
                break
            error = _first_error(result)
            echo(f"  {offset_range.label}: run {result.run_id} failed (attempt {attempt}/{CATCH_UP_ATTEMPTS}): {error}")
            if attempt == CATCH_UP_ATTEMPTS:
                raise CatchUpError(f"range {offset_range.label} failed after {CATCH_UP_ATTEMPTS} attempts: {error}")
            time.sleep(2**attempt)
        report.ranges.append(offset_range)
        report.events += offset_range.size
        echo(f"  {offset_range.label}: done (run {result.run_id})")
    report.seconds = time.perf_counter() - started
    return report


def catch_up(
    settings: Settings,
    instance: dg.DagsterInstance,
    echo: Callable[[str], None] = print,
) -> CatchUpReport:
    """Process every range available now; raise CatchUpError if one still fails after retries.

    Partitions run in parallel in up to `catch_up_workers` processes, this one included (ranges of one
    partition in order, in one process): while one waits on Redis, Kafka or ClickHouse, another computes.
    """
    from clickhouse_etl.definitions import build_definitions

    defs = build_definitions(settings)
    fail_abandoned_runs(instance, settings.topic, echo)
    with dg.build_resources({"kafka": defs.resources["kafka"]}) as resources:  # resolves EnvVar settings
        ranges = pending_ranges(
            instance, resources.kafka, settings.topic, settings.max_records_per_run, settings.start_position
        )
    by_partition: dict[int, list[OffsetRange]] = {}
    for offset_range in ranges:
        by_partition.setdefault(offset_range.partition, []).append(offset_range)
    job = defs.get_job_def(INGEST_JOB_NAME)
    if settings.catch_up_workers <= 1 or len(by_partition) <= 1:
        return run_ranges(job, instance, ranges, CATCH_UP_TAGS, echo=echo)
    return _run_partitions_in_parallel(job, settings, instance, list(by_partition.values()), echo)


def _run_partitions_in_parallel(
    job: dg.JobDefinition,
    settings: Settings,
    instance: dg.DagsterInstance,
    groups: list[list[OffsetRange]],
    echo: Callable[[str], None],
) -> CatchUpReport:
    """Each partition's ranges go to whichever process is free first: this one or a spawned worker.

    A worker that finishes is handed the next partition at once (from its future's callback), so no
    process idles while partitions wait. Workers are spawned, not forked: a fork would inherit this
    process's embedded ClickHouse state.
    """
    started = time.perf_counter()
    pending = deque(groups)
    finished: queue.Queue[Future[CatchUpReport]] = queue.Queue()
    report = CatchUpReport()
    workers = min(settings.catch_up_workers - 1, len(groups) - 1)
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:

        def hand_out_next(_: Future[CatchUpReport] | None = None) -> None:
            try:
                group = pending.popleft()
            except IndexError:
                return
            try:
                future = pool.submit(_run_partition, settings, instance.get_ref(), group)
            except (RuntimeError, BrokenProcessPool):  # shutting down or broken: this process takes it
                pending.appendleft(group)
                return
            future.add_done_callback(finished.put)
            future.add_done_callback(hand_out_next)

        for _ in range(workers):
            hand_out_next()
        merged = 0
        try:
            while merged < len(groups):
                try:
                    group = pending.popleft()
                except IndexError:
                    _merge(report, _worker_report(finished.get()))
                else:
                    _merge(report, run_ranges(job, instance, group, CATCH_UP_TAGS, echo=echo))
                merged += 1
        except BaseException:
            pending.clear()  # hand out nothing more; the pool's exit waits for the partitions already running
            raise
    report.seconds = time.perf_counter() - started
    return report


def _worker_report(future: Future[CatchUpReport]) -> CatchUpReport:
    try:
        return future.result()
    except BrokenProcessPool as error:
        raise CatchUpError(f"a catch-up worker process died ({error}); run catch-up again to resume") from None


def _merge(report: CatchUpReport, partial: CatchUpReport) -> None:
    report.runs += partial.runs
    report.ranges += partial.ranges
    report.events += partial.events


CATCH_UP_TAGS = {"etl/trigger": "catch-up"}


def _run_partition(settings: Settings, instance_ref: InstanceRef, ranges: list[OffsetRange]) -> CatchUpReport:
    from clickhouse_etl.definitions import build_definitions

    job = build_definitions(settings).get_job_def(INGEST_JOB_NAME)
    with dg.DagsterInstance.from_ref(instance_ref) as instance:
        return run_ranges(job, instance, ranges, CATCH_UP_TAGS)


def _first_error(result: dg.ExecuteInProcessResult) -> str:
    """The failed step and its error chain, outermost first (retries exhausted ← what the op raised ← …)."""
    for event in result.all_events:
        if event.is_step_failure and event.step_failure_data and event.step_failure_data.error:
            messages, error = [], event.step_failure_data.error
            while error is not None and len(messages) < 4:
                lines = error.message.strip().splitlines()
                if lines:
                    messages.append(
                        lines[-1] if error.cls_name is None else f"{error.cls_name}: {lines[-1].split(': ', 1)[-1]}"
                    )
                error = error.cause
            return f"{event.step_key}: " + " <- ".join(messages)
    return "run failed"
