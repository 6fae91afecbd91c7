"""Unit tests of clickhouse_etl.core.ranges."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from clickhouse_etl.core.ranges import OffsetRange, balanced_run_size, plan_ranges, split_evenly, split_range


@pytest.mark.parametrize(("start", "end"), [(5, 5), (6, 5), (-1, 3), (-5, -1), (0, 0)])
def test_offset_range_rejects_invalid_bounds(start, end):
    with pytest.raises(ValueError, match="invalid offset range"):
        OffsetRange("t", 0, start, end)


def test_offset_range_properties():
    r = OffsetRange("ad_clicks", 2, 0, 1)
    assert r.size == 1
    assert r.tp == "ad_clicks:2"
    assert r.label == "ad_clicks/2/0-1"
    big = OffsetRange("ad_clicks", 2, 1_000, 250_000)
    assert big.size == 249_000


def test_insert_token_format():
    r = OffsetRange("ad_clicks", 1, 100, 200)
    assert r.insert_token("ad_clicks_enriched") == "ad_clicks/1/100-200/ad_clicks_enriched"
    assert r.insert_token("campaign_window_partials", suffix="#2") == "ad_clicks/1/100-200/campaign_window_partials#2"


def test_insert_tokens_differ_per_range_and_table():
    tokens = {
        OffsetRange(topic, p, s, e).insert_token(table)
        for topic in ("a", "b")
        for p in (0, 1)
        for s, e in ((0, 10), (0, 11), (1, 10))
        for table in ("x", "y")
    }
    assert len(tokens) == 2 * 2 * 3 * 2


def test_offset_ranges_are_hashable_and_ordered():
    a = OffsetRange("t", 0, 0, 10)
    b = OffsetRange("t", 0, 10, 20)
    c = OffsetRange("t", 1, 0, 5)
    assert sorted([c, b, a]) == [a, b, c]
    assert {a: 1}[OffsetRange("t", 0, 0, 10)] == 1


def test_split_range_example():
    assert split_range("t", 3, 10, 35, 10) == [
        OffsetRange("t", 3, 10, 20),
        OffsetRange("t", 3, 20, 30),
        OffsetRange("t", 3, 30, 35),
    ]
    assert split_range("t", 3, 10, 30, 10) == [OffsetRange("t", 3, 10, 20), OffsetRange("t", 3, 20, 30)]
    assert split_range("t", 3, 10, 10, 10) == []


@pytest.mark.parametrize("split", [split_range, split_evenly])
@settings(max_examples=200, deadline=None)
@given(
    start=st.integers(min_value=0, max_value=10**12),
    length=st.integers(min_value=0, max_value=5_000),
    max_records=st.integers(min_value=1, max_value=1_500),
)
def test_splits_are_contiguous_without_overlap_bounded_and_fewest(split, start, length, max_records):
    end = start + length
    ranges = split("t", 7, start, end, max_records)
    if length == 0:
        assert ranges == []
        return
    assert ranges[0].start == start
    assert ranges[-1].end == end
    for before, after in itertools.pairwise(ranges):
        assert before.end == after.start
    assert all(r.topic == "t" and r.partition == 7 for r in ranges)
    assert all(1 <= r.size <= max_records for r in ranges)
    assert sum(r.size for r in ranges) == length
    assert len(ranges) == -(-length // max_records)
    if split is split_range:  # full ranges and a remainder
        assert all(r.size == max_records for r in ranges[:-1])
    else:  # sizes within one of each other
        assert max(r.size for r in ranges) - min(r.size for r in ranges) <= 1


def test_split_evenly_leaves_no_small_remainder():
    assert split_evenly("t", 0, 0, 1_000_500, 1_000_000) == [
        OffsetRange("t", 0, 0, 500_250),
        OffsetRange("t", 0, 500_250, 1_000_500),
    ]
    assert split_evenly("t", 3, 10, 35, 10) == [
        OffsetRange("t", 3, 10, 18),
        OffsetRange("t", 3, 18, 26),
        OffsetRange("t", 3, 26, 35),
    ]
    assert split_evenly("t", 3, 10, 10, 10) == []


def test_balanced_run_size_halves_a_process_share_within_its_bounds():
    # Three partitions of 1M on two processes: runs of at most 750,000, so each partition makes two.
    assert balanced_run_size([1_000_000] * 3, 2, 1_000_000, 125_000) == 750_000
    assert balanced_run_size([1_000_000] * 3, 1, 1_000_000, 125_000) == 1_000_000  # one process: no cut
    assert balanced_run_size([1_000_000] * 3, 2, 500_000, 125_000) == 500_000  # never above max_records
    assert balanced_run_size([100_000] * 3, 2, 1_000_000, 125_000) == 125_000  # never below min_records
    assert balanced_run_size([100_000] * 3, 2, 5_000, 125_000) == 5_000  # max_records first


def test_plan_nothing_when_caught_up():
    assert plan_ranges("t", 0, 100, 100, 10, None, 5.0) == []
    assert plan_ranges("t", 0, 100, 90, 10, None, 5.0) == []  # cursor ahead of the watermark


def test_plan_full_ranges_only_while_the_tail_is_young():
    ranges = plan_ranges("t", 0, 0, 25, 10, tail_age_seconds=1.0, max_batch_wait_seconds=5.0)
    assert ranges == [OffsetRange("t", 0, 0, 10), OffsetRange("t", 0, 10, 20)]


def test_plan_nothing_for_a_young_small_tail():
    assert plan_ranges("t", 0, 40, 45, 10, tail_age_seconds=4.999, max_batch_wait_seconds=5.0) == []


@pytest.mark.parametrize("age", [5.0, 5.001, 3_600.0, None])
def test_plan_flushes_an_old_or_unknown_tail(age):
    ranges = plan_ranges("t", 0, 0, 25, 10, tail_age_seconds=age, max_batch_wait_seconds=5.0)
    assert ranges == [OffsetRange("t", 0, 0, 10), OffsetRange("t", 0, 10, 20), OffsetRange("t", 0, 20, 25)]


def test_plan_zero_wait_flushes_immediately():
    assert plan_ranges("t", 1, 7, 8, 10, tail_age_seconds=0.0, max_batch_wait_seconds=0.0) == [
        OffsetRange("t", 1, 7, 8)
    ]


@pytest.mark.parametrize("age", [0.0, 1.0, None])
def test_plan_a_tail_of_max_size_is_always_planned(age):
    assert plan_ranges("t", 0, 0, 30, 10, tail_age_seconds=age, max_batch_wait_seconds=5.0) == [
        OffsetRange("t", 0, 0, 10),
        OffsetRange("t", 0, 10, 20),
        OffsetRange("t", 0, 20, 30),
    ]


@settings(max_examples=200, deadline=None)
@given(
    next_offset=st.integers(min_value=0, max_value=10**9),
    pending=st.integers(min_value=0, max_value=3_000),
    max_records=st.integers(min_value=1, max_value=700),
    age=st.one_of(st.none(), st.floats(min_value=0, max_value=100)),
    wait=st.floats(min_value=0, max_value=100),
)
def test_plan_ranges_properties(next_offset, pending, max_records, age, wait):
    high = next_offset + pending
    ranges = plan_ranges("t", 0, next_offset, high, max_records, age, wait)
    if pending == 0:
        assert ranges == []
        return
    full = pending // max_records
    flush = age is None or age >= wait
    if flush:
        assert ranges[-1].end == high
    expected_count = -(-pending // max_records) if flush else full
    assert len(ranges) == expected_count
    if ranges:
        assert ranges[0].start == next_offset
        assert ranges == split_range("t", 0, next_offset, ranges[-1].end, max_records)
    # every planned range is full unless it is a flushed tail ending at the watermark
    assert all(r.size == max_records or (flush and r.end == high) for r in ranges)
