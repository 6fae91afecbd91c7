"""Backfill and replay by offset range.

A requested range is validated against the partition's watermarks and cut into runs of at most
`max_records_per_run`, along the boundaries of the ranges already committed: every run's range is then
either inside one committed range (a replay, which adds nothing) or outside all of them. A forced backfill
is widened to whole committed ranges, because a range's aggregate contribution is replaced as one piece.
"""

from __future__ import annotations

import itertools
import uuid
from collections.abc import Iterable
from dataclasses import dataclass

from clickhouse_etl.core.ranges import OffsetRange, split_range


class BackfillError(ValueError):
    """A backfill request that cannot run; nothing was started."""


@dataclass(frozen=True)
class BackfillPlan:
    backfill_id: str
    requested: OffsetRange
    ranges: list[OffsetRange]
    force: bool


def validate_request(topic: str, partition: int, start: int, end: int, watermarks: dict[int, tuple[int, int]]) -> None:
    if partition not in watermarks:
        raise BackfillError(f"topic {topic} has no partition {partition} (partitions: {sorted(watermarks)})")
    low, high = watermarks[partition]
    if start >= end:
        raise BackfillError(f"start {start} must be below end {end}")
    if start < low:
        raise BackfillError(
            f"start {start} is below the low watermark {low} of {topic}/{partition}: "
            "those offsets no longer exist in Kafka"
        )
    if end > high:
        raise BackfillError(f"end {end} is beyond the high watermark {high} of {topic}/{partition}")


def _outermost(ranges: Iterable[OffsetRange]) -> list[OffsetRange]:
    """Committed ranges not nested in another one (a nested range is an earlier replay)."""
    result: list[OffsetRange] = []
    for r in sorted(set(ranges), key=lambda r: (r.start, -r.end)):
        if not result or r.end > result[-1].end:
            result.append(r)
    return result


def plan_backfill(
    topic: str,
    partition: int,
    start: int,
    end: int,
    force: bool,
    watermarks: dict[int, tuple[int, int]],
    committed: list[OffsetRange],
    max_records: int,
    backfill_id: str | None = None,
) -> BackfillPlan:
    validate_request(topic, partition, start, end, watermarks)
    ranges_here = _outermost(r for r in committed if r.partition == partition and r.start < end and r.end > start)
    if force and ranges_here:
        # Widen to whole committed ranges, within the data Kafka still has.
        start = min(start, *(r.start for r in ranges_here))
        end = max(end, *(r.end for r in ranges_here))
        validate_request(topic, partition, start, end, watermarks)
    cuts = sorted({start, end, *(b for r in ranges_here for b in (r.start, r.end) if start < b < end)})
    ranges = [
        piece
        for first, last in itertools.pairwise(cuts)
        for piece in split_range(topic, partition, first, last, max_records)
    ]
    return BackfillPlan(
        backfill_id=backfill_id or uuid.uuid4().hex[:12],
        requested=OffsetRange(topic, partition, start, end),
        ranges=ranges,
        force=force,
    )
