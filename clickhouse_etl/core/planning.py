"""Sensor planning: which bounded offset ranges to request on one tick, from watermarks and a JSON cursor.

A tick reads watermarks only (no messages). The cursor is `{topic: {partition: next_offset}}` plus, under
"@waiting_since", the last tick at which each partition had nothing unplanned (for a new partition: when its
tail was first seen). Offsets beyond the cursor arrived after that tick, so a small tail is flushed once the
tick is `max_batch_wait_seconds` ago: with ticks further apart than the wait, every tick flushes, instead of
every other one. Ranges whose runs failed for good are requested again with a new attempt number: a range is
never skipped.
"""

from __future__ import annotations

from dataclasses import dataclass

from clickhouse_etl.core.ranges import OffsetRange, plan_ranges
from clickhouse_etl.core.settings import Settings

WAITING_KEY = "@waiting_since"  # "@" cannot occur in a Kafka topic name


@dataclass(frozen=True)
class PlannedRun:
    offset_range: OffsetRange
    attempt: int = 0  # above 0: a range whose runs failed for good, requested again

    @property
    def run_key(self) -> str:
        """Unique for the sensor's whole life: a range requested again needs a new attempt number."""
        r = self.offset_range
        return f"{r.topic}:{r.partition}:{r.start}-{r.end}" + (f":retry-{self.attempt}" if self.attempt else "")


@dataclass(frozen=True)
class TickPlan:
    runs: list[PlannedRun]
    cursor: dict
    lag: dict[int, int]  # per partition: offsets not yet planned


def plan_tick(
    cursor: dict,
    topic: str,
    watermarks: dict[int, tuple[int, int]],
    failed: dict[OffsetRange, int],
    ledger_ends: dict[int, int | None],
    settings: Settings,
    now: float,
    start_offsets: dict[int, int] | None = None,
    busy: frozenset[int] = frozenset(),
) -> TickPlan:
    """Pure planning of one tick: the runs to request, the new cursor and the lag per partition.

    A partition not in the cursor resumes at its recorded runs' end (ledger_ends), else at the start
    position: the low or high watermark, or start_offsets (a timestamp's offsets) when given.
    A partition with a run queued or running (`busy`) gets no new range this tick: its offsets accumulate
    into one range planned once the run ended, so ranges grow with the load and launch costs are spread
    over more events instead of queueing many small runs (its runs could not overlap anyway: one run per
    partition at a time).
    """
    offsets: dict[str, int] = dict(cursor.get(topic, {}))
    waiting: dict[str, float] = dict(cursor.get(WAITING_KEY, {}))
    runs = [PlannedRun(r, attempt=n) for r, n in sorted(failed.items())]
    lag: dict[int, int] = {}
    for partition, (low, high) in sorted(watermarks.items()):
        key = str(partition)
        if key not in offsets:
            known_end = ledger_ends.get(partition)
            if known_end is not None:
                offsets[key] = known_end
            elif start_offsets is not None and partition in start_offsets:
                offsets[key] = start_offsets[partition]
            else:
                offsets[key] = low if settings.start_position == "earliest" else high
        next_offset = offsets[key]
        lag[partition] = max(0, high - next_offset)
        wait_key = f"{topic}/{partition}"
        if partition in busy:
            continue
        if high <= next_offset:
            # Caught up: whatever arrives after this tick has waited at most since now.
            waiting[wait_key] = now
            continue
        waiting.setdefault(wait_key, now)
        ranges = plan_ranges(
            topic,
            partition,
            next_offset,
            high,
            settings.max_records_per_run,
            now - waiting[wait_key],
            settings.max_batch_wait_seconds,
        )
        if ranges:
            runs.extend(PlannedRun(r) for r in ranges)
            offsets[key] = ranges[-1].end
            waiting[wait_key] = now
    return TickPlan(runs, {**cursor, topic: offsets, WAITING_KEY: waiting}, lag)
