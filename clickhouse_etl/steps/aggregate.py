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


def _merged_state(aggregate: AggregateColumns, name: str) -> pl.Expr:
    """The state of a group over several partials of it: what `_state` gives over all their rows."""
    function = aggregate.aggregate.measures[name].function
    state = aggregate.states[name]
    column = pl.col(state.name)
    if function == "count":
        return column.sum().cast(pl.UInt64).alias(state.name)
    if function == "count_distinct":
        return column.explode().drop_nulls().unique().sort().alias(state.name)
    value = {"sum": column.sum(), "min": column.min(), "max": column.max()}[function]
    return pl.when(column.count() > 0).then(value).cast(state.dtype).alias(state.name)


def merged_partials(partials: list[pl.DataFrame], aggregate: AggregateColumns) -> pl.DataFrame:
    """Partials of consecutive parts of one range merged into the range's own, exactly as `window_partials`
    over all their rows would give them."""
    if len(partials) == 1:
        return partials[0]
    keys = [aggregate.window_column, *(column.name for column in aggregate.group_by)]
    columns = [column.name for column in aggregate.partials_columns()]
    first = partials[0]
    return (
        pl.concat(partials)
        .group_by(keys)
        .agg(
            [_merged_state(aggregate, name) for name in aggregate.aggregate.measures]
            + [pl.col(name).first() for name in ("kafka_topic", "kafka_partition", "range_start", "range_end")]
        )
        .sort(keys, nulls_last=True)
        .select(columns)
        .cast(dict(first.schema))  # type: ignore[arg-type]
    )


def windows_touched(partials: pl.DataFrame, window_column: str) -> tuple[str, str] | None:
    """First and last window of a range's partials (the per-run aggregate check reads these windows)."""
    if partials.is_empty():
        return None
    return str(partials[window_column].min()), str(partials[window_column].max())
