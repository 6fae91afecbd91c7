"""Catch-up: run a pipeline's ingest job over everything available now, recording each run in Dagster."""

from __future__ import annotations

import multiprocessing
import queue
import time
import uuid
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field

import dagster as dg
from dagster._core.instance.ref import InstanceRef

from clickhouse_etl.clients.kafka import KafkaReader
from clickhouse_etl.core.collector import freeze_startup_objects
from clickhouse_etl.core.pipeline.model import Pipeline
from clickhouse_etl.core.processes import peak_rss_bytes
from clickhouse_etl.core.ranges import OffsetRange, split_range
from clickhouse_etl.core.settings import Settings
from clickhouse_etl.orchestration import run_records, tags
from clickhouse_etl.orchestration.instance import CODE_LOCATION
from clickhouse_etl.orchestration.jobs import build_ingest_job, range_run_config
from clickhouse_etl.orchestration.resources import resources_from_settings

CATCH_UP_ATTEMPTS = 3
CATCH_UP_TAGS = {tags.TRIGGER: "catch-up"}


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
    instance: dg.DagsterInstance, reader: KafkaReader, pipeline: Pipeline, max_records: int, start_position: str
) -> list[OffsetRange]:
    """Ranges from each partition's committed end up to its high watermark now; failed ranges first."""
    topic = pipeline.topic
    watermarks = reader.watermarks(topic)
    ledgers = run_records.read_ledger(instance, pipeline.job_name, topic)
    start_offsets = reader.start_offsets(topic, start_position)
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
                f"{topic}/{partition}: offsets [{committed}, {low}) expired in Kafka before {pipeline.name} "
                "processed them; see `clickhouse-etl offsets`"
            )
        ranges.extend(split_range(topic, partition, start, high, max_records))
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
) -> CatchUpReport:
    """Process every range of the pipeline available now; raise CatchUpError if one still fails after retries.

    Partitions run in parallel in up to `catch_up_workers` processes, this one included (ranges of one
    partition in order, in one process): while one waits on Redis, Kafka or ClickHouse, another computes.
    """
    run_records.fail_abandoned_runs(instance, pipeline.job_name, pipeline.topic, echo)
    reader = kafka_reader(settings, pipeline)
    ranges = pending_ranges(instance, reader, pipeline, settings.max_records_per_run, settings.start_position)
    by_partition: dict[int, list[OffsetRange]] = {}
    for offset_range in ranges:
        by_partition.setdefault(offset_range.partition, []).append(offset_range)
    job = ingest_job(settings, pipeline)
    freeze_startup_objects()
    if settings.catch_up_workers <= 1 or len(by_partition) <= 1:
        return run_ranges(job, instance, ranges, CATCH_UP_TAGS, echo=echo)
    return _run_partitions_in_parallel(job, settings, pipeline, instance, list(by_partition.values()), echo)


def _run_partitions_in_parallel(
    job: dg.JobDefinition,
    settings: Settings,
    pipeline: Pipeline,
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
                future = pool.submit(_run_partition, settings, pipeline, instance.get_ref(), group)
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
    report.peak_rss_bytes = max(report.peak_rss_bytes, peak_rss_bytes())
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
    report.peak_rss_bytes = max(report.peak_rss_bytes, partial.peak_rss_bytes)


def _run_partition(
    settings: Settings, pipeline: Pipeline, instance_ref: InstanceRef, ranges: list[OffsetRange]
) -> CatchUpReport:
    job = ingest_job(settings, pipeline)
    with dg.DagsterInstance.from_ref(instance_ref) as instance:
        freeze_startup_objects()
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
