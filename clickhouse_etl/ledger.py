"""The offset ledger: where every partition stands, read from the ingest runs recorded in Dagster.

Offsets are stored as run metadata: each run carries its range in indexed tags (`kafka/tp`, `kafka/start`,
`kafka/end`) and a successful run means its range is committed. Everything here derives from those records.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import dagster as dg

from clickhouse_etl.jobs import INGEST_JOB_NAME
from clickhouse_etl.steps.ranges import OffsetRange

IN_FLIGHT = {
    dg.DagsterRunStatus.QUEUED,
    dg.DagsterRunStatus.NOT_STARTED,
    dg.DagsterRunStatus.STARTING,
    dg.DagsterRunStatus.STARTED,
    dg.DagsterRunStatus.CANCELING,
}
FAILED = {dg.DagsterRunStatus.FAILURE, dg.DagsterRunStatus.CANCELED}
WILL_RETRY_TAG = "dagster/will_retry"
AUTO_RETRY_RUN_ID_TAG = "dagster/auto_retry_run_id"


@dataclass
class PartitionLedger:
    """State of one topic-partition's ranges."""

    topic: str
    partition: int
    committed: list[OffsetRange] = field(default_factory=list)
    in_flight: list[OffsetRange] = field(default_factory=list)
    failed: dict[OffsetRange, int] = field(default_factory=dict)  # failed for good → failed runs so far

    @property
    def committed_end(self) -> int | None:
        """End of the contiguous committed ranges from the first committed start (None: nothing yet)."""
        ranges = sorted(set(self.committed))
        if not ranges:
            return None
        end = ranges[0].end
        for r in ranges[1:]:
            if r.start > end:
                break
            end = max(end, r.end)
        return end

    @property
    def planned_end(self) -> int | None:
        """Highest end of any range committed, in flight or failed: where new ranges may start."""
        ends = [r.end for r in (*self.committed, *self.in_flight, *self.failed)]
        return max(ends) if ends else None

    def gaps(self) -> list[tuple[int, int]]:
        ranges = sorted(set(self.committed))
        found, end = [], None
        for r in ranges:
            if end is not None and r.start > end:
                found.append((end, r.start))
            end = r.end if end is None else max(end, r.end)
        return found

    def overlaps(self) -> list[tuple[OffsetRange, OffsetRange]]:
        """Committed ranges that partly overlap; a range nested in another is a replay, not an overlap."""
        found: list[tuple[OffsetRange, OffsetRange]] = []
        reaching: OffsetRange | None = None  # the range reaching furthest so far
        for r in sorted(set(self.committed)):
            if reaching is not None and reaching.start < r.start < reaching.end < r.end:
                found.append((reaching, r))
            if reaching is None or r.end > reaching.end:
                reaching = r
        return found


def _range_of(tags: dict[str, str]) -> OffsetRange | None:
    try:
        return OffsetRange(
            tags["kafka/topic"], int(tags["kafka/partition"]), int(tags["kafka/start"]), int(tags["kafka/end"])
        )
    except (KeyError, ValueError):
        return None


def _retry_pending(run: dg.DagsterRun) -> bool:
    return run.tags.get(WILL_RETRY_TAG) == "true" and AUTO_RETRY_RUN_ID_TAG not in run.tags


def read_ledger(instance: dg.DagsterInstance, topic: str) -> dict[int, PartitionLedger]:
    """Per partition: committed ranges, ranges in flight, ranges failed for good (never skipped)."""
    runs = instance.get_runs(filters=dg.RunsFilter(job_name=INGEST_JOB_NAME, tags={"kafka/topic": topic}))
    by_range: dict[OffsetRange, list[dg.DagsterRun]] = defaultdict(list)
    for run in runs:
        offset_range = _range_of(run.tags)
        if offset_range is not None:
            by_range[offset_range].append(run)
    ledgers: dict[int, PartitionLedger] = {}
    for offset_range, range_runs in by_range.items():
        ledger = ledgers.setdefault(offset_range.partition, PartitionLedger(topic, offset_range.partition))
        statuses = [run.status for run in range_runs]
        if dg.DagsterRunStatus.SUCCESS in statuses:
            ledger.committed.append(offset_range)
        elif any(status in IN_FLIGHT for status in statuses) or any(_retry_pending(run) for run in range_runs):
            ledger.in_flight.append(offset_range)
        else:
            ledger.failed[offset_range] = sum(status in FAILED for status in statuses)
    return ledgers


def committed_ranges(instance: dg.DagsterInstance, topic: str, partition: int) -> list[OffsetRange]:
    """The committed ranges of one topic-partition (what a backfill is cut along)."""
    entry = read_ledger(instance, topic).get(partition)
    return [] if entry is None else entry.committed


def failed_for_good(instance: dg.DagsterInstance, topic: str, limit: int = 200) -> dict[OffsetRange, int]:
    """Ranges whose every run failed and that no retry will pick up → failed runs so far.

    Reads only failed runs and then each one's range; cheap enough for every sensor tick.
    """
    failed_runs = instance.get_runs(
        filters=dg.RunsFilter(job_name=INGEST_JOB_NAME, statuses=list(FAILED), tags={"kafka/topic": topic}),
        limit=limit,
    )
    result: dict[OffsetRange, int] = {}
    for failed_run in failed_runs:
        offset_range = _range_of(failed_run.tags)
        if offset_range is None or offset_range in result:
            continue
        range_runs = instance.get_runs(
            filters=dg.RunsFilter(
                job_name=INGEST_JOB_NAME,
                tags={
                    "kafka/tp": failed_run.tags["kafka/tp"],
                    "kafka/start": str(offset_range.start),
                    "kafka/end": str(offset_range.end),
                },
            )
        )
        statuses = [run.status for run in range_runs]
        if dg.DagsterRunStatus.SUCCESS in statuses or any(s in IN_FLIGHT for s in statuses):
            continue
        if any(_retry_pending(run) for run in range_runs):
            continue
        result[offset_range] = sum(s in FAILED for s in statuses)
    return result
