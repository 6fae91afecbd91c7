"""Range planning: which bounded offset ranges to run next, from watermarks and the committed frontier."""

from __future__ import annotations

import itertools
from dataclasses import dataclass


@dataclass(frozen=True, order=True)
class OffsetRange:
    """[start, end) of one topic-partition."""

    topic: str
    partition: int
    start: int
    end: int

    def __post_init__(self) -> None:
        if not 0 <= self.start < self.end:
            raise ValueError(f"invalid offset range [{self.start}, {self.end}): need 0 <= start < end")

    @property
    def size(self) -> int:
        return self.end - self.start

    @property
    def tp(self) -> str:
        return f"{self.topic}:{self.partition}"

    @property
    def label(self) -> str:
        return f"{self.topic}/{self.partition}/{self.start}-{self.end}"

    def insert_token(self, table: str, suffix: str = "") -> str:
        """`<topic>/<partition>/<start>-<end>/<table>`: an insert ClickHouse has seen with it is skipped."""
        return f"{self.label}/{table}{suffix}"


def split_range(topic: str, partition: int, start: int, end: int, max_records: int) -> list[OffsetRange]:
    """[start, end) cut into consecutive ranges of at most max_records."""
    return [
        OffsetRange(topic, partition, first, min(first + max_records, end)) for first in range(start, end, max_records)
    ]


def split_evenly(topic: str, partition: int, start: int, end: int, max_records: int) -> list[OffsetRange]:
    """[start, end) cut into as few consecutive ranges of at most max_records as split_range, of sizes within
    one of each other: 1,000,500 offsets make two runs of 500,250, not one of 1,000,000 and one of 500."""
    if end <= start:
        return []
    pieces = -(-(end - start) // max_records)
    bounds = [start + (end - start) * piece // pieces for piece in range(pieces + 1)]
    return [OffsetRange(topic, partition, first, last) for first, last in itertools.pairwise(bounds)]


def balanced_run_size(spans: list[int], processes: int, max_records: int, min_records: int) -> int:
    """The largest range to run when `processes` processes share the spans, each span's ranges run in order.

    Ranges of at most half a process's share leave at most that much for one process to finish alone once
    the others are done (three partitions whole on two processes leave one running alone for a third of the
    time); never below min_records (even cuts of a span are then at least half of it), under which a run's
    fixed cost outweighs what it balances, nor above max_records.
    """
    if processes <= 1:
        return max_records
    half_share = -(-sum(spans) // (2 * processes))
    return min(max_records, max(min_records, half_share))


def plan_ranges(
    topic: str,
    partition: int,
    next_offset: int,
    high_watermark: int,
    max_records: int,
    tail_age_seconds: float | None,
    max_batch_wait_seconds: float,
) -> list[OffsetRange]:
    """Full ranges up to the high watermark; a smaller tail only once it has waited long enough.

    tail_age_seconds is how long the oldest unplanned offset has been waiting (None: unknown, flush now).
    """
    if high_watermark <= next_offset:
        return []
    ranges = split_range(topic, partition, next_offset, high_watermark, max_records)
    tail = ranges[-1]
    tail_ready = tail.size >= max_records or tail_age_seconds is None or tail_age_seconds >= max_batch_wait_seconds
    return ranges if tail_ready else ranges[:-1]
