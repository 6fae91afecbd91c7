"""Unit tests of the bench's prefill plan: where the generated rows sit, and the SQL that makes them (the rows
themselves are checked against ClickHouse in tests/integration/test_bench.py)."""

from __future__ import annotations

import itertools
import re

import pytest

from clickhouse_etl.core.pipeline.columns import columns_of
from clickhouse_etl.core.pipeline.loading import load_pipelines
from clickhouse_etl.dev.prefill import (
    DEAD_LETTER_EVERY,
    GAP_EVERY,
    PrefillError,
    PrefillPlan,
    dead_letter_select,
    partials_select,
    sink_select,
)
from clickhouse_etl.steps.load import INSERT_WINDOW

AD_CLICKS, API_USAGE = (loaded.pipeline for loaded in load_pipelines("ad_clicks,api_usage", environment={}))


def plan(rows: int, partitions: int = 3, max_records: int = 1_000_000) -> PrefillPlan:
    return PrefillPlan("prefill_test", rows, partitions, max_records, "0123456789ab")


@pytest.mark.parametrize("rows", [0, 1, 2, 3, 10, 1_000, 2_500_001])
def test_every_row_has_one_partition(rows: int) -> None:
    assert sum(plan(rows).rows_in(p) for p in range(3)) == rows


def test_offsets_leave_the_gaps_a_run_leaves() -> None:
    offsets = [PrefillPlan.offset_of(row) for row in range(1_000)]
    assert offsets == sorted(set(offsets))
    assert all(offset % GAP_EVERY != GAP_EVERY - 1 for offset in offsets)
    assert [PrefillPlan.rows_below(offset) for offset in offsets] == list(range(1_000))
    assert PrefillPlan.rows_below(PrefillPlan.offset_of(999) + 1) == 1_000


def test_dead_letters_sit_in_gaps_below_the_high_watermark() -> None:
    prefill = plan(30_000)
    for partition in range(3):
        high = prefill.high_watermark(partition)
        assert PrefillPlan.rows_below(high) == prefill.rows_in(partition)
        count = prefill.dead_letters_below(high)
        dead = [DEAD_LETTER_EVERY * k + GAP_EVERY - 1 for k in range(count)]
        assert dead and max(dead) < high and all(offset % GAP_EVERY == GAP_EVERY - 1 for offset in dead)
        assert DEAD_LETTER_EVERY * count + GAP_EVERY - 1 >= high  # the next one would be beyond it
    assert prefill.dead_letters == sum(prefill.dead_letters_below(prefill.high_watermark(p)) for p in range(3))


def test_ranges_cover_each_partition_as_runs_would() -> None:
    prefill = plan(7_000_000, max_records=1_000_000)
    for partition in range(3):
        ranges = prefill.ranges(partition)
        assert ranges[0].start == 0 and ranges[-1].end == prefill.high_watermark(partition)
        assert all(r.size <= 1_000_000 for r in ranges)
        assert all(a.end == b.start for a, b in itertools.pairwise(ranges))
        assert {r.topic for r in ranges} == {"prefill_test"}
    assert INSERT_WINDOW < 1_000_000  # a range is several insert units, as a run's is


def test_an_empty_prefill_has_no_ranges() -> None:
    assert plan(0).ranges(0) == [] and plan(0).high_watermark(0) == 0 and plan(0).dead_letters == 0


@pytest.mark.parametrize("pipeline", [AD_CLICKS, API_USAGE], ids=lambda p: p.name)
def test_sink_select_casts_every_sink_column_in_order(pipeline) -> None:
    select = sink_select(pipeline, plan(100), lookup_rows=10)
    sink = columns_of(pipeline).sink
    casts = re.findall(r" AS ([A-Za-z0-9(), ']+)\) AS `(\w+)`", select)
    assert [name for _, name in casts] == [column.name for column in sink]
    assert [kind for kind, _ in casts] == [column.clickhouse_type() for column in sink]
    assert "'prefill_test'" in select and "0123456789ab" in select


def test_a_pipeline_without_demo_shape_is_refused() -> None:
    other = AD_CLICKS.model_copy(update={"name": "other_clicks"})
    with pytest.raises(PrefillError, match="no prefill shape for pipeline other_clicks"):
        sink_select(other, plan(10), lookup_rows=10)


def test_a_sink_column_without_demo_values_is_named() -> None:
    source = AD_CLICKS.source.model_copy(
        update={"fields": {**AD_CLICKS.source.fields, "country": AD_CLICKS.source.fields["user_id"]}}
    )
    sink = AD_CLICKS.sink.model_copy(update={"columns": [*AD_CLICKS.sink.columns, "country"]})
    changed = AD_CLICKS.model_copy(update={"source": source, "sink": sink})
    with pytest.raises(PrefillError, match="column\\(s\\) country"):
        sink_select(changed, plan(10), lookup_rows=10)


def test_dead_letters_are_truncated_objects_of_the_pipelines_fields() -> None:
    select = dead_letter_select(API_USAGE, plan(10))
    assert '{"event_id":"m0123456789ab-' in select and "invalid JSON" in select


@pytest.mark.parametrize("pipeline", [AD_CLICKS, API_USAGE], ids=lambda p: p.name)
def test_partials_select_fills_every_partials_column(pipeline) -> None:
    for aggregate in columns_of(pipeline).aggregates:
        select = partials_select(aggregate, pipeline.sink.table, "analytics")
        assert select.count("CAST(") == len(aggregate.partials_columns())
        assert f"FROM `analytics`.`{pipeline.sink.table}`" in select
        for name, measure in aggregate.aggregate.measures.items():
            if measure.function == "count_distinct":
                assert f"arraySort(groupUniqArray(`{measure.column}`))" in select, name
