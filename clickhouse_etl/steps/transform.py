"""Transform: contract column names and types of `ad_clicks_enriched`, with the Kafka position of each row."""

from __future__ import annotations

from datetime import UTC, datetime

import polars as pl

ENRICHED_COLUMNS = (
    "click_id",
    "user_id",
    "ad_id",
    "campaign_name",
    "campaign_budget",
    "ip_address",
    "click_time",
    "processed_at",
    "kafka_topic",
    "kafka_partition",
    "kafka_offset",
)


def to_enriched_rows(events: pl.DataFrame, topic: str, processed_at: datetime | None = None) -> pl.DataFrame:
    processed_at = processed_at or datetime.now(UTC)
    return events.select(
        "click_id",
        "user_id",
        "ad_id",
        "campaign_name",
        "campaign_budget",
        "ip_address",
        pl.from_epoch("timestamp_ms", time_unit="ms").cast(pl.Datetime("ms", "UTC")).alias("click_time"),
        pl.lit(processed_at).cast(pl.Datetime("ms", "UTC")).alias("processed_at"),
        pl.lit(topic).alias("kafka_topic"),
        "kafka_partition",
        "kafka_offset",
    )
