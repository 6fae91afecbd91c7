"""The runs recorded in the Dagster instance, read as the offset ledger needs them.

Offsets are stored as run metadata: each ingest run carries its range in indexed tags, and its status says
whether the range is committed. Runs are found by their pipeline's job name, so two pipelines reading the
same topic keep ledgers of their own.
"""

from __future__ import annotations

import socket
from collections.abc import Callable

import dagster as dg

from clickhouse_etl.core.ledger import (
    PartitionLedger,
    RangeOutcome,
    RecordedRun,
    RunState,
    ledger_from_runs,
    range_outcome,
)
from clickhouse_etl.core.processes import process_alive
from clickhouse_etl.core.ranges import OffsetRange
from clickhouse_etl.orchestration import tags

IN_FLIGHT = [
    dg.DagsterRunStatus.QUEUED,
    dg.DagsterRunStatus.NOT_STARTED,
    dg.DagsterRunStatus.STARTING,
    dg.DagsterRunStatus.STARTED,
    dg.DagsterRunStatus.CANCELING,
]
FAILED = [dg.DagsterRunStatus.FAILURE, dg.DagsterRunStatus.CANCELED]


def run_state(run: dg.DagsterRun) -> RunState:
    if run.status == dg.DagsterRunStatus.SUCCESS:
        return RunState.SUCCEEDED
    retry_pending = run.tags.get(tags.WILL_RETRY) == "true" and tags.AUTO_RETRY_RUN_ID not in run.tags
    if run.status in IN_FLIGHT or retry_pending:
        return RunState.IN_FLIGHT
    return RunState.FAILED


def _recorded(runs: list[dg.DagsterRun]) -> list[RecordedRun]:
    recorded = []
    for run in runs:
        offset_range = tags.range_of(run.tags)
        if offset_range is not None:
            recorded.append(RecordedRun(offset_range, run_state(run)))
    return recorded


def read_ledger(instance: dg.DagsterInstance, job_name: str, topic: str) -> dict[int, PartitionLedger]:
    """Per partition: committed ranges, ranges in flight, ranges failed for good (never skipped)."""
    runs = instance.get_runs(filters=dg.RunsFilter(job_name=job_name, tags={tags.TOPIC: topic}))
    return ledger_from_runs(topic, _recorded(runs))


def committed_ranges(instance: dg.DagsterInstance, job_name: str, topic: str, partition: int) -> list[OffsetRange]:
    """The committed ranges of one topic-partition (what a backfill is cut along)."""
    runs = instance.get_runs(
        filters=dg.RunsFilter(job_name=job_name, tags={tags.TOPIC: topic, tags.PARTITION: str(partition)})
    )
    entry = ledger_from_runs(topic, _recorded(runs)).get(partition)
    return [] if entry is None else entry.committed


def failed_for_good(
    instance: dg.DagsterInstance, job_name: str, topic: str, limit: int = 200
) -> dict[OffsetRange, int]:
    """Ranges whose every run failed and that no retry will pick up → failed runs so far.

    Reads only failed runs and then each one's range; cheap enough for every sensor tick.
    """
    failed_runs = instance.get_runs(
        filters=dg.RunsFilter(job_name=job_name, statuses=FAILED, tags={tags.TOPIC: topic}), limit=limit
    )
    result: dict[OffsetRange, int] = {}
    for failed_run in failed_runs:
        offset_range = tags.range_of(failed_run.tags)
        if offset_range is None or offset_range in result:
            continue
        range_runs = instance.get_runs(
            filters=dg.RunsFilter(
                job_name=job_name,
                tags={
                    tags.TOPIC: topic,
                    tags.PARTITION: str(offset_range.partition),
                    tags.START: str(offset_range.start),
                    tags.END: str(offset_range.end),
                },
            )
        )
        states = [run_state(run) for run in range_runs]
        if range_outcome(states) is RangeOutcome.FAILED_FOR_GOOD:
            result[offset_range] = states.count(RunState.FAILED)
    return result


def busy_partitions(instance: dg.DagsterInstance, job_name: str, topic: str) -> frozenset[int]:
    """Partitions of the topic with an ingest run of this job queued, starting or running."""
    runs = instance.get_runs(
        filters=dg.RunsFilter(
            job_name=job_name,
            statuses=[
                dg.DagsterRunStatus.NOT_STARTED,
                dg.DagsterRunStatus.QUEUED,
                dg.DagsterRunStatus.STARTING,
                dg.DagsterRunStatus.STARTED,
            ],
            tags={tags.TOPIC: topic},
        )
    )
    return frozenset(int(run.tags[tags.PARTITION]) for run in runs)


def fail_abandoned_runs(
    instance: dg.DagsterInstance, job_name: str, topic: str, echo: Callable[[str], None] = print
) -> int:
    """End the runs of this machine whose process is gone (killed mid-run), so their ranges run again.

    Every run records the process that executes it (tags.worker_tags): a catch-up or backfill process, a
    run process the default launcher started, or a Celery worker's child. Neither Dagster's default launcher
    nor a Celery result backend can tell that such a process was SIGKILLed (the task stays STARTED), so
    without this the run would stay "in flight" forever. A run being canceled whose process is gone was
    stopped (its task revoked): it counts as canceled; any other as failed.
    """
    host = socket.gethostname()
    abandoned = 0
    for run in instance.get_runs(
        filters=dg.RunsFilter(
            job_name=job_name,
            statuses=[dg.DagsterRunStatus.STARTED, dg.DagsterRunStatus.STARTING, dg.DagsterRunStatus.CANCELING],
            tags={tags.TOPIC: topic, tags.HOST: host},
        )
    ):
        pid = int(run.tags.get(tags.PID, "0"))
        if run.tags.get(tags.WORKER_RUN) != run.run_id or not pid or process_alive(pid):
            continue
        where = f"[{run.tags[tags.START]}, {run.tags[tags.END]})"
        if run.status == dg.DagsterRunStatus.CANCELING:
            instance.report_run_canceled(run, message=f"process {pid} that ran it was stopped")
            echo(f"  run {run.run_id} of {where} was stopped: canceled")
        else:
            instance.report_run_failed(run, message=f"process {pid} that ran it is gone (killed mid-run)")
            echo(f"  run {run.run_id} of {where} was abandoned: failed")
        abandoned += 1
    return abandoned
