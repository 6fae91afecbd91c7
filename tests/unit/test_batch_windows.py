"""A range's frames as windows: in memory within the run's budget, in files of the run's folder beyond it (or all
in memory for a range of one window), read back exactly, mapped window by window, and deleted once no later
stage reads them."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import polars as pl
import pytest

from clickhouse_etl.core.ranges import OffsetRange, split_range
from clickhouse_etl.orchestration.batch import Batch, Windows, WindowStore

WINDOW_BYTES = 80  # ten UInt64 offsets


def windows_of(start: int, end: int, size: int) -> list[tuple[OffsetRange, pl.DataFrame]]:
    return [
        (w, pl.DataFrame({"kafka_offset": pl.arange(w.start, w.end, dtype=pl.UInt64, eager=True)}))
        for w in split_range("t", 0, start, end, size)
    ]


def files_in(folder: Path) -> int:
    return len(list(folder.iterdir()))


@pytest.mark.parametrize(
    "store_of",
    [lambda folder: WindowStore(folder), lambda folder: WindowStore(None), lambda folder: WindowStore(folder, 10**9)],
    ids=["files", "one window", "within the budget"],
)
def test_windows_round_trip_and_map_one_window_at_a_time(
    tmp_path: Path, store_of: Callable[[Path], WindowStore]
) -> None:
    store = store_of(tmp_path)
    frames = Windows.write(store, "raw", windows_of(10, 35, 10))
    in_files = store.folder is not None and store.budget_bytes == 0

    assert frames.height == 25
    assert [(w.start, w.end, frame.height) for w, frame in frames] == [(10, 20, 10), (20, 30, 10), (30, 35, 5)]
    assert files_in(tmp_path) == (3 if in_files else 0)
    seen: list[int] = []

    def evens(window: OffsetRange, frame: pl.DataFrame) -> pl.DataFrame:
        seen.append(window.start)
        return frame.filter(pl.col("kafka_offset") % 2 == 0)

    mapped = frames.map(store, "evens", evens)
    assert seen == [10, 20, 30]
    assert mapped.window(OffsetRange("t", 0, 20, 30))["kafka_offset"].to_list() == [20, 22, 24, 26, 28]
    frames.delete()
    assert pl.concat([f for _, f in mapped])["kafka_offset"].to_list() == list(range(10, 35, 2))
    assert files_in(tmp_path) == (3 if in_files else 0)


def test_windows_beyond_the_budget_go_to_files_and_deleting_gives_the_budget_back(tmp_path: Path) -> None:
    store = WindowStore(tmp_path, budget_bytes=2 * WINDOW_BYTES)

    raw = Windows.write(store, "raw", windows_of(0, 40, 10))
    assert [isinstance(kept, pl.DataFrame) for _, kept, _ in raw.files] == [True, True, False, False]
    assert store.kept_bytes == 2 * WINDOW_BYTES and files_in(tmp_path) == 2

    copied = raw.map(store, "copied", lambda _, frame: frame.clone())  # no room left: every window in a file
    assert store.kept_bytes == 2 * WINDOW_BYTES and files_in(tmp_path) == 6

    raw.delete()
    assert store.kept_bytes == 0 and files_in(tmp_path) == 4 and raw.files == []
    again = copied.map(store, "again", lambda _, frame: frame)  # the budget is free again
    assert [isinstance(kept, pl.DataFrame) for _, kept, _ in again.files] == [True, True, False, False]
    assert pl.concat([f for _, f in again])["kafka_offset"].to_list() == list(range(40))


def test_release_deletes_only_what_the_successor_no_longer_reads(tmp_path: Path) -> None:
    store = WindowStore(tmp_path)
    raw = Windows.write(store, "raw", windows_of(0, 20, 10))
    raw_files = [path for _, path, _ in raw.files]
    read = Batch(OffsetRange("t", 0, 0, 20), False, store, events=raw, raw=raw)
    decoded = read.advance("decode", 0.0, raw.map(store, "decoded", lambda _, f: f))
    decoded_files = [path for _, path, _ in decoded.events.files]

    read.release(decoded)  # the raw messages go on (later dead letters read them): kept
    assert all(path.exists() for path in raw_files)

    shaped = decoded.advance("transform", 0.0, decoded.events.map(store, "rows", lambda _, f: f), raw=None)
    decoded.release(shaped)  # nothing after the transform reads the raw messages or the decoded events
    assert not any(path.exists() for path in raw_files + decoded_files)
    assert all(path.exists() for _, path, _ in shaped.events.files)


def test_empty_dead_letters_are_not_carried_and_leave_no_file(tmp_path: Path) -> None:
    store = WindowStore(tmp_path)
    batch = Batch(OffsetRange("t", 0, 0, 20), False, store, events=Windows([], store))
    none = Windows.write(store, "malformed", [(w, f.clear()) for w, f in windows_of(0, 20, 10)])
    assert batch.with_dead_letters(none) == ()
    assert list(tmp_path.iterdir()) == []
