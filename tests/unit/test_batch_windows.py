"""A range's frames as windows: in files of the run's folder (a range larger than one window) or in memory,
read back exactly, mapped window by window, and deleted once no later stage reads them."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest

from clickhouse_etl.core.ranges import OffsetRange, split_range
from clickhouse_etl.orchestration.batch import Batch, Windows


def windows_of(start: int, end: int, size: int) -> list[tuple[OffsetRange, pl.DataFrame]]:
    return [
        (w, pl.DataFrame({"kafka_offset": pl.arange(w.start, w.end, dtype=pl.UInt64, eager=True)}))
        for w in split_range("t", 0, start, end, size)
    ]


@pytest.mark.parametrize("in_files", [True, False])
def test_windows_round_trip_and_map_one_window_at_a_time(tmp_path: Path, in_files: bool) -> None:
    folder = tmp_path if in_files else None
    frames = Windows.write(folder, "raw", windows_of(10, 35, 10))

    assert frames.height == 25
    assert [(w.start, w.end, frame.height) for w, frame in frames] == [(10, 20, 10), (20, 30, 10), (30, 35, 5)]
    assert len(list(tmp_path.iterdir())) == (3 if in_files else 0)
    seen: list[int] = []

    def evens(window: OffsetRange, frame: pl.DataFrame) -> pl.DataFrame:
        seen.append(window.start)
        return frame.filter(pl.col("kafka_offset") % 2 == 0)

    mapped = frames.map(folder, "evens", evens)
    assert seen == [10, 20, 30]
    assert mapped.window(OffsetRange("t", 0, 20, 30))["kafka_offset"].to_list() == [20, 22, 24, 26, 28]
    frames.delete()
    assert pl.concat([f for _, f in mapped])["kafka_offset"].to_list() == list(range(10, 35, 2))
    assert len(list(tmp_path.iterdir())) == (3 if in_files else 0)


def test_release_deletes_only_what_the_successor_no_longer_reads(tmp_path: Path) -> None:
    raw = Windows.write(tmp_path, "raw", windows_of(0, 20, 10))
    read = Batch(OffsetRange("t", 0, 0, 20), False, tmp_path, events=raw, raw=raw)
    decoded = read.advance("decode", 0.0, raw.map(tmp_path, "decoded", lambda _, f: f))

    read.release(decoded)  # the raw messages go on (later dead letters read them): kept
    assert all(path.exists() for _, path, _ in raw.files)

    shaped = decoded.advance("transform", 0.0, decoded.events.map(tmp_path, "rows", lambda _, f: f), raw=None)
    decoded.release(shaped)  # nothing after the transform reads the raw messages or the decoded events
    assert not any(path.exists() for _, path, _ in raw.files + decoded.events.files)
    assert all(path.exists() for _, path, _ in shaped.events.files)


def test_empty_dead_letters_are_not_carried_and_leave_no_file(tmp_path: Path) -> None:
    batch = Batch(OffsetRange("t", 0, 0, 20), False, tmp_path, events=Windows(()))
    none = Windows.write(tmp_path, "malformed", [(w, f.clear()) for w, f in windows_of(0, 20, 10)])
    assert batch.with_dead_letters(none) == ()
    assert list(tmp_path.iterdir()) == []
