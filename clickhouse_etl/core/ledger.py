"""The offset ledger: where every partition stands, derived from the runs recorded for its ranges.

Offsets are stored as run metadata: each run carries its range, and a successful run means its range is
committed. A range whose every run failed, with no retry coming, is failed for good and must be run again:
it is never skipped. Reading the runs is the orchestration layer's job; everything here is derived.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import Enum

from clickhouse_etl.core.ranges import OffsetRange


class RunState(Enum):
    SUCCEEDED = "succeeded"
    IN_FLIGHT = "in_flight"  # queued, starting, running — or failed with a retry on its way
    FAILED = "failed"  # failed or canceled, no retry coming


@dataclass(frozen=True)
class RecordedRun:
    offset_range: OffsetRange
    state: RunState


class RangeOutcome(Enum):
    COMMITTED = "committed"
    IN_FLIGHT = "in_flight"
    FAILED_FOR_GOOD = "failed_for_good"


def range_outcome(states: Iterable[RunState]) -> RangeOutcome:
    """One range's fate from all its runs: any success commits it; a live or retrying run keeps it open."""
    states = set(states)
    if RunState.SUCCEEDED in states:
        return RangeOutcome.COMMITTED
    if RunState.IN_FLIGHT in states:
        return RangeOutcome.IN_FLIGHT
    return RangeOutcome.FAILED_FOR_GOOD


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


def ledger_from_runs(topic: str, runs: Iterable[RecordedRun]) -> dict[int, PartitionLedger]:
    """Per partition: committed ranges, ranges in flight, ranges failed for good (with their failed runs)."""
    by_range: dict[OffsetRange, list[RunState]] = defaultdict(list)
    for run in runs:
        by_range[run.offset_range].append(run.state)
    ledgers: dict[int, PartitionLedger] = {}
    for offset_range, states in by_range.items():
        ledger = ledgers.setdefault(offset_range.partition, PartitionLedger(topic, offset_range.partition))
        outcome = range_outcome(states)
        if outcome is RangeOutcome.COMMITTED:
            ledger.committed.append(offset_range)
        elif outcome is RangeOutcome.IN_FLIGHT:
            ledger.in_flight.append(offset_range)
        else:
            ledger.failed[offset_range] = states.count(RunState.FAILED)
    return ledgers
