"""Aggregate: partial aggregates of one offset range, per window and group, for each declared aggregate.

Partials keep mergeable state — counts and sums, minima and maxima, and the distinct values themselves for
exact distinct counts — so any number of ranges merge exactly (uniqExact over the union, never a sum of
per-range uniques). Windows come from the event's time column, so a late event lands in its own window.
"""

from __future__ import annotations

import polars as pl

from clickhouse_etl.core.pipeline.columns import AggregateColumns, window_truncation
from clickhouse_etl.core.ranges import OffsetRange


def _state(aggregate: AggregateColumns, name: str) -> pl.Expr:
    measure = aggregate.aggregate.measures[name]
    state_name = aggregate.states[name].name
    if measure.function == "count":
        return pl.len().cast(pl.UInt64).alias(state_name)
    column = pl.col(measure.column)  # type: ignore[arg-type]
    if measure.function == "count_distinct":
        return column.drop_nulls().unique().sort().alias(state_name)
    # Like ClickHouse: NULLs are skipped, and a group of only NULLs has a NULL sum (not 0).
    value = {"sum": column.sum(), "min": column.min(), "max": column.max()}[measure.function]
    return pl.when(column.count() > 0).then(value).cast(aggregate.states[name].dtype).alias(state_name)


def window_partials(rows: pl.DataFrame, aggregate: AggregateColumns, offset_range: OffsetRange) -> pl.DataFrame:
    time_column = aggregate.aggregate.time_column
    window = (
        pl.col(time_column).dt.truncate(window_truncation(aggregate.window_column)).dt.cast_time_unit("ms")
    ).alias(aggregate.window_column)
    group_names = [column.name for column in aggregate.group_by]
    columns = [column.name for column in aggregate.partials_columns()]
    return (
        rows.group_by(window, *group_names)
        .agg([_state(aggregate, name) for name in aggregate.aggregate.measures])
        .sort(aggregate.window_column, *group_names, nulls_last=True)
        .with_columns(
            kafka_topic=pl.lit(offset_range.topic),
            kafka_partition=pl.lit(offset_range.partition, dtype=pl.UInt32),
            range_start=pl.lit(offset_range.start, dtype=pl.UInt64),
            range_end=pl.lit(offset_range.end, dtype=pl.UInt64),
        )
        .select(columns)
    )


def windows_touched(partials: pl.DataFrame, window_column: str) -> tuple[str, str] | None:
    """First and last window of a range's partials (the per-run aggregate check reads these windows)."""
    if partials.is_empty():
        return None
    return str(partials[window_column].min()), str(partials[window_column].max())
