"""How catch-up hands out ranges to its processes: a partition's ranges in order, one at a time."""

from __future__ import annotations

import itertools

from clickhouse_etl.core.ranges import OffsetRange
from clickhouse_etl.tools.catchup import RangesLeft


def ranges_of(partition: int, *bounds: int) -> list[OffsetRange]:
    return [OffsetRange("t", partition, start, end) for start, end in itertools.pairwise(bounds)]


def test_a_partition_runs_one_range_at_a_time_in_offset_order() -> None:
    left = RangesLeft([*ranges_of(0, 0, 10, 20, 30), *ranges_of(1, 0, 5)])
    first = left.take()
    assert first == OffsetRange("t", 0, 0, 10)  # the partition with the most offsets left goes first
    assert left.take() == OffsetRange("t", 1, 0, 5)  # partition 0 is running: the other one
    assert left.take() is None  # both running
    left.done(first)
    assert left.take() == OffsetRange("t", 0, 10, 20)
    assert left.take() is None


def test_a_range_given_back_is_the_next_one_of_its_partition() -> None:
    left = RangesLeft(ranges_of(2, 0, 10, 20))
    taken = left.take()
    assert taken is not None and left.take() is None
    left.give_back(taken)
    assert left.take() == taken


def test_cleared_nothing_more_is_handed_out() -> None:
    left = RangesLeft([*ranges_of(0, 0, 10, 20), *ranges_of(1, 0, 10)])
    left.clear()
    assert left.take() is None


def test_every_range_is_handed_out_exactly_once() -> None:
    ranges = [*ranges_of(0, 0, 4, 8, 12), *ranges_of(1, 0, 7, 14), *ranges_of(2, 0, 3)]
    left = RangesLeft(ranges)
    handed: list[OffsetRange] = []
    while (offset_range := left.take()) is not None:
        handed.append(offset_range)
        left.done(offset_range)
    assert sorted(handed) == sorted(ranges)
    for partition in (0, 1, 2):
        mine = [r for r in handed if r.partition == partition]
        assert mine == sorted(mine)
