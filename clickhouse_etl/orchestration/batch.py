"""The batch an ingest run hands from op to op: one range on its way through the stages."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field

import polars as pl

from clickhouse_etl.core.ranges import OffsetRange
from clickhouse_etl.steps.load import TableLoad


@dataclass
class Batch:
    """One range on its way through the stages: what the next stage reads, and what the commit records."""

    offset_range: OffsetRange
    force: bool
    events: pl.DataFrame
    raw: pl.DataFrame | None = None  # the messages as read, for dead letters of later stages
    dead_letters: tuple[pl.DataFrame, ...] = ()  # kafka_partition, kafka_offset, raw_value, error
    counts: dict[str, int] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    facts: dict[str, object] = field(default_factory=dict)  # snapshot versions, windows touched: run metadata
    partials: dict[str, pl.DataFrame] = field(default_factory=dict)  # partials table → this range's partials
    tables: list[TableLoad] = field(default_factory=list)

    def advance(self, stage: str, started: float, events: pl.DataFrame, **changes: object) -> Batch:
        """The batch after `stage`: new events, its counts merged in, its seconds recorded."""
        counts = {**self.counts, **changes.pop("counts", {})}  # type: ignore[dict-item]
        seconds = {**self.seconds, stage: time.perf_counter() - started}
        return dataclasses.replace(self, events=events, counts=counts, seconds=seconds, **changes)  # type: ignore[arg-type]

    def release(self) -> None:
        """Drop frames no later op reads: the in-memory IO manager keeps every output until the run ends.

        Called as an op's last step, after its work succeeded, so a retried op still finds its input.
        """
        self.events = self.events.clear()
        self.raw = None
        self.partials = {}

    def with_dead_letters(self, rows: pl.DataFrame) -> tuple[pl.DataFrame, ...]:
        return (*self.dead_letters, rows) if rows.height else self.dead_letters
