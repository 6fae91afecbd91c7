"""The batch an ingest run hands from op to op: one range on its way through the stages.

A range's frames are kept as windows of offsets (the load's insert windows): every stage reads, transforms and
writes one window at a time, while each stage still runs — and shows in the UI — as one op over the whole range.
The run's WindowStore keeps a window in memory while the run's windows in memory fit its memory budget, and
in an Arrow IPC file of the run's scratch folder beyond it: a run's memory holds at most the budget and one
window's frames whatever the range's size. Writing and reading a file costs about 15 ms per 125,000 events at
each hand-over, so windows that fit stay in memory; a range of one window is always kept in memory.
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl

from clickhouse_etl.core.ranges import OffsetRange
from clickhouse_etl.steps.load import TableLoad

_file_numbers = itertools.count()


@dataclass
class WindowStore:
    """Where one run keeps its frames' windows: in memory while all it keeps there fits `budget_bytes`, in IPC
    files of `folder` beyond. Without a folder (a range of one window) every window stays in memory."""

    folder: Path | None
    budget_bytes: int = 0
    # The estimated size of the windows in memory until each is forgotten. Windows an op kept before it failed
    # are never forgotten: its retry then writes to files sooner, never holding more than the budget.
    kept_bytes: int = 0

    def keep(self, name: str, window: OffsetRange, frame: pl.DataFrame) -> tuple[Path | pl.DataFrame, int]:
        """The frame itself, or the file it was written to; and how many bytes of the budget it now holds."""
        if self.folder is None:
            return frame, 0
        size = frame.estimated_size()
        if self.kept_bytes + size <= self.budget_bytes:
            self.kept_bytes += size
            return frame, size
        path = self.folder / f"{name}-{next(_file_numbers)}-{window.start}.arrow"
        frame.write_ipc(path, compression="uncompressed")
        return path, 0

    def forget(self, held_bytes: int) -> None:
        self.kept_bytes -= held_bytes


@dataclass(eq=False)
class Windows:
    """One frame of a range, per window of offsets in window order: each in memory or in an IPC file."""

    files: list[tuple[OffsetRange, Path | pl.DataFrame, int]]  # window, its frame (or file), rows
    store: WindowStore  # whose budget the frames in memory hold; given back by delete()
    held_bytes: int = 0  # of the store's budget, by this frame's windows in memory

    @classmethod
    def write(cls, store: WindowStore, name: str, windows: Iterable[tuple[OffsetRange, pl.DataFrame]]) -> Windows:
        """The windows, each kept by `store`: in memory within its budget, else in a file."""
        written = cls([], store)
        for window, frame in windows:
            kept, held_bytes = store.keep(name, window, frame)
            written.files.append((window, kept, frame.height))
            written.held_bytes += held_bytes
        return written

    def __iter__(self) -> Iterator[tuple[OffsetRange, pl.DataFrame]]:
        for window, kept, _ in self.files:
            yield window, self._frame(kept)

    @staticmethod
    def _frame(kept: Path | pl.DataFrame) -> pl.DataFrame:
        return pl.read_ipc(kept) if isinstance(kept, Path) else kept

    def window(self, window: OffsetRange) -> pl.DataFrame:
        [kept] = [kept for each, kept, _ in self.files if each == window]
        return self._frame(kept)

    def map(self, store: WindowStore, name: str, step: Callable[[OffsetRange, pl.DataFrame], pl.DataFrame]) -> Windows:
        """The frame after `step`, applied window by window."""
        return Windows.write(store, name, ((window, step(window, frame)) for window, frame in self))

    @property
    def height(self) -> int:
        return sum(rows for _, _, rows in self.files)

    def delete(self) -> None:
        """Remove the files and let go of the frames in memory (giving their share of the budget back)."""
        for _, kept, _ in self.files:
            if isinstance(kept, Path):
                kept.unlink(missing_ok=True)
        self.store.forget(self.held_bytes)
        self.files, self.held_bytes = [], 0


@dataclass
class Batch:
    """One range on its way through the stages: what the next stage reads, and what the commit records."""

    offset_range: OffsetRange
    force: bool
    store: WindowStore  # where the windows of its frames are kept
    events: Windows
    raw: Windows | None = None  # the messages as read, for dead letters of later stages
    dead_letters: tuple[Windows, ...] = ()  # kafka_partition, kafka_offset, raw_value, error
    counts: dict[str, int] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    facts: dict[str, object] = field(default_factory=dict)  # snapshot versions, windows touched: run metadata
    partials: dict[str, pl.DataFrame] = field(default_factory=dict)  # partials table → this range's partials
    tables: list[TableLoad] = field(default_factory=list)

    def advance(self, stage: str, started: float, events: Windows, **changes: object) -> Batch:
        """The batch after `stage`: new events, its counts merged in, its seconds recorded."""
        counts = {**self.counts, **changes.pop("counts", {})}  # type: ignore[dict-item]
        seconds = {**self.seconds, stage: time.perf_counter() - started}
        return dataclasses.replace(self, events=events, counts=counts, seconds=seconds, **changes)  # type: ignore[arg-type]

    def release(self, successor: Batch) -> None:
        """Delete the windows the successor no longer reads: the in-memory IO manager keeps every op's output
        until the run ends, so this batch's frames would otherwise stay on disk (or in memory) as long.

        Called as an op's last step, after its work succeeded, so a retried op still finds its input.
        """
        kept = {id(successor.events), id(successor.raw), *map(id, successor.dead_letters)}
        for frame in (self.events, self.raw, *self.dead_letters):
            if frame is not None and id(frame) not in kept:
                frame.delete()

    def with_dead_letters(self, rows: Windows) -> tuple[Windows, ...]:
        if rows.height:
            return (*self.dead_letters, rows)
        rows.delete()
        return self.dead_letters
