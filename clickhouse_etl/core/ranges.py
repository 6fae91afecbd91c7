"""Range planning: which bounded offset ranges to run next, from watermarks and the committed frontier."""

from __future__ import annotations

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
