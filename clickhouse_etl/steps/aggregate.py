"""Aggregate: per (minute, campaign) partial aggregates of one offset range.

Partials keep the distinct user ids of their window, so unique users stay exact when any number of
ranges are merged (uniqExact over the union, never a sum of per-range uniques). Windows come from
`click_time`, so a late event lands in its own minute.
"""

from __future__ import annotations

import polars as pl


def window_partials(enriched: pl.DataFrame, topic: str, partition: int, start: int, end: int) -> pl.DataFrame:
    return (
        enriched.group_by(
            pl.col("click_time").dt.truncate("1m").dt.cast_time_unit("ms").alias("minute"), "campaign_name"
        )
        .agg(pl.len().cast(pl.UInt64).alias("clicks"), pl.col("user_id").unique().sort().alias("user_ids"))
        .sort("minute", "campaign_name", nulls_last=True)
        .with_columns(
            kafka_topic=pl.lit(topic),
            kafka_partition=pl.lit(partition, dtype=pl.UInt32),
            range_start=pl.lit(start, dtype=pl.UInt64),
            range_end=pl.lit(end, dtype=pl.UInt64),
        )
    )


def highlights(partials: pl.DataFrame, top: int = 5) -> dict[str, object]:
    """Small summary for run metadata: windows touched, busiest campaigns of the range."""
    if partials.is_empty():
        return {"windows": 0}
    busiest = partials.group_by("campaign_name").agg(pl.col("clicks").sum()).sort("clicks", descending=True).head(top)
    return {
        "windows": partials.select(pl.col("minute").n_unique()).item(),
        "first_window": str(partials["minute"].min()),
        "last_window": str(partials["minute"].max()),
        "top_campaigns": {str(name): int(clicks) for name, clicks in busiest.iter_rows()},
    }
