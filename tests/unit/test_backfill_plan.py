"""Backfill planning: validation against watermarks, cuts along committed ranges, forced widening."""

import pytest

from clickhouse_etl.core.backfill import BackfillError, plan_backfill
from clickhouse_etl.core.ledger import PartitionLedger
from clickhouse_etl.core.offsets import format_offsets, partition_offsets
from clickhouse_etl.core.ranges import OffsetRange

WATERMARKS = {0: (100, 10_000), 1: (0, 5_000)}


def r(start: int, end: int, partition: int = 0) -> OffsetRange:
    return OffsetRange("t", partition, start, end)


@pytest.mark.parametrize(
    ("partition", "start", "end", "message"),
    [
        (0, 500, 500, "must be below end"),
        (0, 900, 800, "must be below end"),
        (0, 50, 800, "below the low watermark 100"),
        (0, 200, 10_001, "beyond the high watermark 10000"),
        (3, 0, 10, "no partition 3"),
    ],
)
def test_invalid_requests_are_refused(partition: int, start: int, end: int, message: str) -> None:
    with pytest.raises(BackfillError, match=message):
        plan_backfill("t", partition, start, end, False, WATERMARKS, [], 1_000)


def test_uncommitted_range_is_split_into_bounded_contiguous_runs() -> None:
    plan = plan_backfill("t", 0, 100, 2_600, False, WATERMARKS, [], 1_000)
    assert plan.ranges == [r(100, 1_100), r(1_100, 2_100), r(2_100, 2_600)]


def test_pieces_never_straddle_a_committed_range() -> None:
    committed = [r(100, 1_000), r(1_000, 3_000), r(400, 600)]  # the last one is a nested replay
    plan = plan_backfill("t", 0, 500, 3_500, False, WATERMARKS, committed, 10_000)
    assert plan.ranges == [r(500, 1_000), r(1_000, 3_000), r(3_000, 3_500)]
    for piece in plan.ranges:
        assert all(
            piece.end <= c.start or piece.start >= c.end or (c.start <= piece.start and piece.end <= c.end)
            for c in committed
            if c != r(400, 600)
        )


def test_forced_backfill_is_widened_to_whole_committed_ranges() -> None:
    committed = [r(100, 1_000), r(1_000, 3_000), r(3_000, 4_000), r(1_500, 1_700)]
    plan = plan_backfill("t", 0, 1_200, 3_100, True, WATERMARKS, committed, 10_000)
    assert plan.requested == r(1_000, 4_000)
    assert plan.ranges == [r(1_000, 3_000), r(3_000, 4_000)]
    assert plan.force


def test_committed_ranges_of_other_partitions_are_ignored() -> None:
    plan = plan_backfill("t", 1, 0, 3_000, True, WATERMARKS, [r(0, 5_000, partition=0)], 1_000)
    assert plan.ranges == [OffsetRange("t", 1, s, s + 1_000) for s in (0, 1_000, 2_000)]


def test_offsets_report_gap_overlap_expiry_and_lag() -> None:
    ledgers = {
        0: PartitionLedger("t", 0, committed=[r(0, 50), r(0, 50)]),  # expired: low watermark is 100
        1: PartitionLedger(
            "t",
            1,
            committed=[r(0, 100, 1), r(200, 300, 1), r(250, 400, 1), r(260, 280, 1)],
            in_flight=[r(400, 500, 1)],
            failed={r(500, 600, 1): 2},
        ),
    }
    report = {p.partition: p for p in partition_offsets({**WATERMARKS, 2: (0, 70)}, ledgers)}
    assert report[0].gaps == [(50, 100)] and not report[0].healthy
    assert report[1].gaps == [(100, 200)]
    assert report[1].overlaps == [(r(200, 300, 1), r(250, 400, 1))]  # the nested [260, 280) is a replay
    assert report[1].committed_end == 100 and report[1].lag == 4_900
    assert report[2].committed_end is None and report[2].lag == 70 and report[2].healthy
    text = format_offsets("t", list(report.values()))
    assert "GAP [100, 200)" in text and "OVERLAP [200, 300) ~ [250, 400)" in text
    assert "in flight [400, 500)" in text and "failed, awaiting retry [500, 600)" in text
