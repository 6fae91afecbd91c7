"""Unit tests of clickhouse_etl.steps.dedup (the pure parts; Redis is not involved)."""

from __future__ import annotations

import random

import polars as pl
import pytest

from clickhouse_etl.steps.dedup import first_in_batch, kept_by_claims, position_labels


def events(rows: list[tuple[str, int, int]]) -> pl.DataFrame:
    """rows of (click_id, partition, offset)."""
    return pl.DataFrame(
        {
            "click_id": [r[0] for r in rows],
            "kafka_partition": [r[1] for r in rows],
            "kafka_offset": [r[2] for r in rows],
        },
        schema={"click_id": pl.String, "kafka_partition": pl.UInt32, "kafka_offset": pl.UInt64},
    )


def test_first_in_batch_keeps_the_lowest_offset_per_click_id():
    frame = events([("a", 0, 10), ("b", 0, 11), ("a", 0, 12), ("c", 0, 13), ("b", 0, 14), ("a", 0, 15)])
    assert first_in_batch(frame).to_list() == [True, True, False, True, False, False]


def test_first_in_batch_uses_the_offset_not_the_row_order():
    frame = events([("a", 0, 30), ("a", 0, 20), ("b", 0, 25), ("a", 0, 40)])
    assert first_in_batch(frame).to_list() == [False, True, True, False]


def test_first_in_batch_all_unique_keeps_everything():
    frame = events([(f"id{i}", 1, i) for i in range(50)])
    mask = first_in_batch(frame)
    assert mask.dtype == pl.Boolean
    assert mask.all()
    assert mask.len() == 50


def test_first_in_batch_empty():
    assert first_in_batch(events([])).to_list() == []


def test_first_in_batch_matches_a_plain_python_reference():
    rng = random.Random(1234)
    offsets = rng.sample(range(10_000), 2_000)
    rows = [(f"c{rng.randrange(300)}", 0, offset) for offset in offsets]
    lowest: dict[str, int] = {}
    for click_id, _, offset in rows:
        lowest[click_id] = min(lowest.get(click_id, offset), offset)
    expected = [offset == lowest[click_id] for click_id, _, offset in rows]
    mask = first_in_batch(events(rows)).to_list()
    assert mask == expected
    assert sum(mask) == len(lowest)


def test_position_labels():
    frame = events([("a", 0, 0), ("b", 3, 17), ("c", 12, 18_446_744_073_709_551_615)])
    labels = position_labels(frame)
    assert labels.dtype == pl.String
    assert labels.to_list() == ["0:0", "3:17", "12:18446744073709551615"]


def test_kept_by_claims_new_and_own_claims_are_kept():
    positions = ["0:1", "0:2", "0:3", "0:4", "0:5"]
    previous = [None, b"0:2", "0:3", b"0:99", "1:4"]
    assert kept_by_claims(positions, previous).to_list() == [True, True, True, False, False]


@pytest.mark.parametrize(
    ("owner", "kept"),
    [
        (None, True),
        (b"2:40", True),
        ("2:40", True),
        (b"2:41", False),
        ("1:40", False),
        ("2:4", False),
        ("", False),
        (b"", False),
    ],
)
def test_kept_by_claims_single(owner, kept):
    result = kept_by_claims(["2:40"], [owner])
    assert result.dtype == pl.Boolean
    assert result.to_list() == [kept]


def test_kept_by_claims_never_null():
    result = kept_by_claims(["0:1", "0:2"], [None, None])
    assert result.null_count() == 0
    assert result.to_list() == [True, True]


def test_kept_by_claims_empty():
    assert kept_by_claims([], []).to_list() == []


def test_replay_of_the_same_range_keeps_exactly_what_the_first_run_kept():
    """Simulates the claim protocol (SET NX GET) with a dict standing in for Redis."""
    store: dict[str, bytes] = {}

    def claim(ids: list[str], positions: list[str]) -> list[bytes | None]:
        previous = []
        for click_id, position in zip(ids, positions, strict=True):
            previous.append(store.get(click_id))
            store.setdefault(click_id, position.encode())
        return previous

    first_range = events([("a", 0, 0), ("b", 0, 1), ("a", 0, 2)])
    second_range = events([("b", 0, 3), ("c", 0, 4)])

    def run(frame: pl.DataFrame) -> list[str]:
        candidates = frame.filter(first_in_batch(frame))
        positions = position_labels(candidates).to_list()
        kept = kept_by_claims(positions, claim(candidates["click_id"].to_list(), positions))
        return candidates.filter(kept)["click_id"].to_list()

    assert run(first_range) == ["a", "b"]
    assert run(second_range) == ["c"]  # b is owned by 0:1
    assert run(first_range) == ["a", "b"]  # replay finds its own claims
    assert run(second_range) == ["c"]
