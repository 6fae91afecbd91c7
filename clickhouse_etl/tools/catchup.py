"""Catch-up: run a pipeline's ingest job over everything available now, recording each run in Dagster."""

from __future__ import annotations

import functools
import multiprocessing
import queue
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field

import dagster as dg

from clickhouse_etl.clients.kafka import KafkaReader
from clickhouse_etl.core.collector import freeze_startup_objects, pickled_start_up, start_up_pickled
from clickhouse_etl.core.pipeline.model import Pipeline
from clickhouse_etl.core.processes import peak_rss_bytes
from clickhouse_etl.core.ranges import OffsetRange, balanced_run_size, split_evenly
from clickhouse_etl.core.settings import Settings
from clickhouse_etl.orchestration import run_records, tags
from clickhouse_etl.orchestration.instance import CODE_LOCATION
from clickhouse_etl.orchestration.jobs import build_ingest_job, range_run_config
from clickhouse_etl.orchestration.resources import resources_from_settings
from clickhouse_etl.steps.load import INSERT_WINDOW

CATCH_UP_ATTEMPTS = 3
CATCH_UP_TAGS = {tags.TRIGGER: "catch-up"}
# Offsets are cut below max_records_per_run, to balance the processes, only into runs of at least about half
# this: a run's fixed cost (about 0.3 CPU seconds, a quarter second of Dagster) outweighs the balance below it.
# `clickhouse-etl bench` (1M, 333,000 per partition), two processes, in turn: six runs of 167,000 made
# 129,976 / 125,967 events/s, three runs 138,073 / 134,809; at 3M six runs of 500,000 made 177,568 / 192,853,
# four or five runs of up to 1,000,000 made 157,599 / 161,493.
SMALLEST_BALANCING_CUT = 4 * INSERT_WINDOW


class CatchUpError(RuntimeError):
    """A range still failed after its retries, or offsets expired before they were processed."""


@dataclass
class CatchUpReport:
    runs: list[str] = field(default_factory=list)
    ranges: list[OffsetRange] = field(default_factory=list)
    events: int = 0
    seconds: float = 0.0
    # The largest peak resident set among the processes that ran the ranges (each its own: see peak_rss_bytes).
    peak_rss_bytes: int = 0


def kafka_reader(settings: Settings, pipeline: Pipeline | None = None) -> KafkaReader:
    """The settings' Kafka, under the pipeline's consumer group when one is given."""
    return KafkaReader(
        bootstrap_servers=settings.kafka_bootstrap_servers,
        consumer_group=pipeline.consumer_group if pipeline else "clickhouse-etl",
        extra_config=dict(settings.kafka_config),
        fetch_batch=settings.kafka_fetch_batch,
    )


def ingest_job(settings: Settings, pipeline: Pipeline) -> dg.JobDefinition:
    return build_ingest_job(pipeline, resources_from_settings(settings))


def pending_ranges(
    instance: dg.DagsterInstance,
    reader: KafkaReader,
    pipeline: Pipeline,
    max_records: int,
    start_position: str,
    processes: int = 1,
) -> list[OffsetRange]:
    """Ranges from each partition's committed end up to its high watermark now; failed ranges first, as they
    were. The rest is cut into even ranges sized for `processes` processes to finish together."""
    topic = pipeline.topic
    watermarks = reader.watermarks(topic)
    ledgers = run_records.read_ledger(instance, pipeline.job_name, topic)
    start_offsets = reader.start_offsets(topic, start_position, watermarks)
    ranges: list[OffsetRange] = []
    fresh: dict[int, tuple[int, int]] = {}
    for partition, (low, high) in watermarks.items():
        entry = ledgers.get(partition)
        if entry is not None:
            ranges.extend(sorted(entry.failed))
        committed = None if entry is None else entry.committed_end
        planned = None if entry is None else entry.planned_end
        start = planned if planned is not None else start_offsets[partition]
        if committed is not None and committed < low:
            raise CatchUpError(
                f"{topic}/{partition}: offsets [{committed}, {low}) expired in Kafka before {pipeline.name} "
                "processed them; see `clickhouse-etl offsets`"
            )
        if start < high:
            fresh[partition] = (start, high)
    spans = [high - start for start, high in fresh.values()]
    run_size = balanced_run_size(spans, min(processes, len(spans)), max_records, SMALLEST_BALANCING_CUT)
    for partition, (start, high) in fresh.items():
        ranges.extend(split_evenly(topic, partition, start, high, run_size))
    return sorted(set(ranges), key=lambda r: (r.start, r.partition))


def run_range(
    job: dg.JobDefinition,
    instance: dg.DagsterInstance,
    offset_range: OffsetRange,
    force: bool = False,
    extra_tags: dict[str, str] | None = None,
    log_level: str = "WARNING",
) -> dg.ExecuteInProcessResult:
    """One range through the job in this process, recorded in `instance` like any other run."""
    run_config = {**range_run_config(offset_range, force), "loggers": {"console": {"config": {"log_level": log_level}}}}
    run_id = str(uuid.uuid4())
    pipeline_name = job.tags[tags.PIPELINE]
    return job.execute_in_process(
        run_config=run_config,
        instance=instance,
        run_id=run_id,
        tags={
            **tags.range_tags(pipeline_name, offset_range),
            **tags.worker_tags(run_id),
            # Dagster lists a job's runs by this tag: in-process runs appear on the job's page like launched ones.
            tags.REPOSITORY: f"__repository__@{CODE_LOCATION}",
            # Retried here (run_ranges), not by the daemon: it cannot relaunch a run executed in-process.
            tags.MAX_RETRIES: "0",
            **(extra_tags or {}),
        },
        raise_on_error=False,
    )


def run_ranges(
    job: dg.JobDefinition,
    instance: dg.DagsterInstance,
    ranges: list[OffsetRange],
    run_tags: dict[str, str],
    force: bool = False,
    echo: Callable[[str], None] = print,
) -> CatchUpReport:
    """Run each range through the job in order, retrying a failed run; raise CatchUpError if one still fails."""
    report = CatchUpReport()
    started = time.perf_counter()
    for offset_range in ranges:
        for attempt in range(1, CATCH_UP_ATTEMPTS + 1):
            result = run_range(job, instance, offset_range, force, {**run_tags, tags.ATTEMPT: str(attempt)})
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
    report.peak_rss_bytes = peak_rss_bytes()
    return report


def catch_up(
    settings: Settings,
    pipeline: Pipeline,
    instance: dg.DagsterInstance,
    echo: Callable[[str], None] = print,
    workers: CatchUpWorkers | None = None,
) -> CatchUpReport:
    """Process every range of the pipeline available now; raise CatchUpError if one still fails after retries.

    Ranges run in parallel in up to `catch_up_workers` processes, this one included (the ranges of one
    partition in order, one at a time): while one waits on Redis, Kafka or ClickHouse, another computes. The
    other processes are `workers` when given (started earlier, for this pipeline among others), else started
    here when the ranges span more than one partition.
    """
    run_records.fail_abandoned_runs(instance, pipeline.job_name, pipeline.topic, echo)
    reader = kafka_reader(settings, pipeline)
    processes = settings.catch_up_workers
    ranges = pending_ranges(
        instance, reader, pipeline, settings.max_records_per_run, settings.start_position, processes
    )
    job = ingest_job(settings, pipeline)
    freeze_startup_objects()
    partitions = len({offset_range.partition for offset_range in ranges})
    if processes <= 1 or partitions <= 1:
        return run_ranges(job, instance, ranges, CATCH_UP_TAGS, echo=echo)
    if workers is not None:
        return _run_ranges_in_parallel(job, pipeline, instance, ranges, workers, echo)
    open_instance = functools.partial(dg.DagsterInstance.from_ref, instance.get_ref())
    with CatchUpWorkers(settings, [pipeline], open_instance, min(processes, partitions) - 1) as started:
        return _run_ranges_in_parallel(job, pipeline, instance, ranges, started, echo)


class CatchUpWorkers:
    """The processes besides this one that catch-up hands ranges to, spawned (not forked: a fork would inherit
    this process's embedded ClickHouse state) and started at once.

    A spawned process spends two to three seconds importing and opening what a run needs (Python, Dagster and
    its storage, polars, the jobs), about as long as the catch-up process itself before its first run. Started
    with the command, before that, a worker's first run begins about a second after the catch-up process's
    first one instead of two and a half (docs/benchmarks.md); the worker's ranges are the longer chain at the
    end. Workers started for nothing to run cost their start-up, about two CPU seconds each.
    """

    def __init__(
        self,
        settings: Settings,
        pipelines: list[Pipeline],
        open_instance: Callable[[], dg.DagsterInstance],
        size: int | None = None,
    ) -> None:
        self.size = settings.catch_up_workers - 1 if size is None else size
        self._pool = ProcessPoolExecutor(
            self.size,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=start_up_pickled,
            initargs=(pickled_start_up(_start_worker, settings, pipelines, open_instance),),
        )
        # The pool spawns a process for a submitted call while none is idle: one call each starts them all now.
        for _ in range(self.size):
            self._pool.submit(_worker_started)

    def submit(self, pipeline: Pipeline, offset_range: OffsetRange) -> Future[WorkerResult]:
        return self._pool.submit(_run_in_worker, pipeline.name, offset_range)

    def __enter__(self) -> CatchUpWorkers:
        return self

    def __exit__(self, *exc_info: object) -> None:
        # Waits for the ranges running; hands out none: after an error, catch-up clears the ranges left first.
        self._pool.shutdown(wait=True)


WorkerResult = tuple[CatchUpReport, list[str]]  # a worker's report of one range, and its progress lines


class RangesLeft:
    """The ranges still to run, per partition in offset order. A partition's next range is handed out once its
    previous one is done, from the partition with the most offsets left: processes then finish together,
    where handing out whole partitions left one process running the last partition alone."""

    def __init__(self, ranges: list[OffsetRange]) -> None:
        self._left: dict[int, deque[OffsetRange]] = {}
        for offset_range in ranges:
            self._left.setdefault(offset_range.partition, deque()).append(offset_range)
        self._running: set[int] = set()
        self._lock = threading.Lock()

    def take(self) -> OffsetRange | None:
        """The next range to run; None while every partition with ranges left has one running."""
        with self._lock:
            ready = [partition for partition, left in self._left.items() if left and partition not in self._running]
            if not ready:
                return None
            partition = max(ready, key=lambda each: sum(offset_range.size for offset_range in self._left[each]))
            self._running.add(partition)
            return self._left[partition].popleft()

    def done(self, offset_range: OffsetRange) -> None:
        with self._lock:
            self._running.discard(offset_range.partition)

    def give_back(self, offset_range: OffsetRange) -> None:
        with self._lock:
            self._left[offset_range.partition].appendleft(offset_range)
            self._running.discard(offset_range.partition)

    def clear(self) -> None:
        with self._lock:
            for left in self._left.values():
                left.clear()


def _run_ranges_in_parallel(
    job: dg.JobDefinition,
    pipeline: Pipeline,
    instance: dg.DagsterInstance,
    ranges: list[OffsetRange],
    workers: CatchUpWorkers,
    echo: Callable[[str], None],
) -> CatchUpReport:
    """Each range goes to whichever process is free first: this one or a worker.

    A worker that finishes is handed the next ready range at once (from its future's callback), so no
    process idles while ranges wait.
    """
    started = time.perf_counter()
    left = RangesLeft(ranges)
    finished: queue.Queue[Future[WorkerResult]] = queue.Queue()
    report = CatchUpReport()
    partitions = len({offset_range.partition for offset_range in ranges})
    idle_workers = min(workers.size, partitions - 1)
    # Reentrant: a future that is already done runs its callback inside add_done_callback, under this lock.
    handing_out = threading.RLock()

    def hand_out() -> None:
        nonlocal idle_workers
        with handing_out:
            while idle_workers:
                offset_range = left.take()
                if offset_range is None:
                    return
                try:
                    future = workers.submit(pipeline, offset_range)
                except (RuntimeError, BrokenProcessPool):  # shutting down or broken: this process takes it
                    left.give_back(offset_range)
                    return
                idle_workers -= 1
                future.add_done_callback(functools.partial(worker_done, offset_range))

    def worker_done(offset_range: OffsetRange, future: Future[WorkerResult]) -> None:
        nonlocal idle_workers
        left.done(offset_range)
        with handing_out:
            idle_workers += 1
        hand_out()
        finished.put(future)

    hand_out()
    try:
        for _ in ranges:
            offset_range = left.take()
            if offset_range is None:  # wait for a worker's range: it may free its partition's next one
                partial, lines = _worker_result(finished.get())
                for line in lines:
                    echo(line)
            else:
                partial = run_ranges(job, instance, [offset_range], CATCH_UP_TAGS, echo=echo)
                left.done(offset_range)
                hand_out()
            _merge(report, partial)
    except BaseException:
        left.clear()  # hand out nothing more; the workers' exit waits for the ranges already running
        raise
    report.seconds = time.perf_counter() - started
    report.peak_rss_bytes = max(report.peak_rss_bytes, peak_rss_bytes())
    return report


def _worker_result(future: Future[WorkerResult]) -> WorkerResult:
    try:
        return future.result()
    except BrokenProcessPool as error:
        raise CatchUpError(f"a catch-up worker process died ({error}); run catch-up again to resume") from None


def _merge(report: CatchUpReport, partial: CatchUpReport) -> None:
    report.runs += partial.runs
    report.ranges += partial.ranges
    report.events += partial.events
    report.peak_rss_bytes = max(report.peak_rss_bytes, partial.peak_rss_bytes)


# A worker process's instance and each pipeline's job, by pipeline name.
_worker: tuple[dg.DagsterInstance, dict[str, dg.JobDefinition]] | None = None


def _start_worker(
    settings: Settings, pipelines: list[Pipeline], open_instance: Callable[[], dg.DagsterInstance]
) -> None:
    """A worker process builds the jobs and opens the instance once, for every range it is handed."""
    global _worker
    jobs = {pipeline.name: ingest_job(settings, pipeline) for pipeline in pipelines}
    _worker = (open_instance(), jobs)
    freeze_startup_objects()


def _worker_started() -> None:
    """Nothing: submitted to start a worker process (its initializer) before it has a range."""


def _run_in_worker(pipeline_name: str, offset_range: OffsetRange) -> WorkerResult:
    """One range in a worker; its progress lines go back to the catch-up process, which echoes them."""
    assert _worker is not None, "the pool's initializer builds the worker's jobs"
    instance, jobs = _worker
    lines: list[str] = []
    try:
        return run_ranges(jobs[pipeline_name], instance, [offset_range], CATCH_UP_TAGS, echo=lines.append), lines
    except CatchUpError as error:  # the failed attempts' lines travel with the error
        raise CatchUpError("\n".join([*lines, str(error)])) from None


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
