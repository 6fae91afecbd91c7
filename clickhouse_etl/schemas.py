"""Schemas of the contract, created idempotently before first use.

PostgreSQL: the `campaigns` dimension table. ClickHouse: enriched clicks, dead letters, the partial
aggregates and the `campaign_minute_stats` view. Every ClickHouse table keeps a non-replicated insert
deduplication window, so an insert carrying a token already seen is skipped (replay safety).
"""

from __future__ import annotations

import psycopg

from clickhouse_etl.clickhouse_store import clickhouse_session
from clickhouse_etl.settings import Settings

ENRICHED_TABLE = "ad_clicks_enriched"
DEAD_LETTER_TABLE = "ad_clicks_dead_letter"
PARTIALS_TABLE = "campaign_window_partials"
MINUTE_STATS_VIEW = "campaign_minute_stats"
HOUR_STATS_VIEW = "campaign_hour_stats"

CAMPAIGNS_DDL = """
CREATE TABLE IF NOT EXISTS campaigns (
    ad_id BIGINT PRIMARY KEY,
    campaign_name TEXT NOT NULL,
    campaign_budget NUMERIC(14,2) NOT NULL,
    updated_at TIMESTAMPTZ NOT NULL DEFAULT now()
)
"""


def clickhouse_ddl(database: str, dedup_window: int) -> list[str]:
    """DDL statements of the analytics database; `database` is a validated identifier."""
    dedup = f"SETTINGS non_replicated_deduplication_window = {int(dedup_window)}"
    return [
        f"CREATE DATABASE IF NOT EXISTS `{database}`",
        f"""CREATE TABLE IF NOT EXISTS `{database}`.{ENRICHED_TABLE} (
            click_id String,
            user_id String,
            ad_id Int64,
            campaign_name LowCardinality(Nullable(String)),
            campaign_budget Nullable(Decimal(14, 2)),
            ip_address String,
            click_time DateTime64(3, 'UTC'),
            processed_at DateTime64(3, 'UTC'),
            kafka_topic LowCardinality(String),
            kafka_partition UInt32,
            kafka_offset UInt64,
            -- Lets the per-run stats check read only the windows a range touched.
            INDEX click_time_minmax click_time TYPE minmax GRANULARITY 1
        ) ENGINE = MergeTree
        ORDER BY (kafka_topic, kafka_partition, kafka_offset)
        {dedup}""",
        # Tables created before the index existed get it too.
        f"ALTER TABLE `{database}`.{ENRICHED_TABLE} ADD INDEX IF NOT EXISTS click_time_minmax click_time "
        "TYPE minmax GRANULARITY 1",
        f"""CREATE TABLE IF NOT EXISTS `{database}`.{DEAD_LETTER_TABLE} (
            kafka_topic LowCardinality(String),
            kafka_partition UInt32,
            kafka_offset UInt64,
            raw_value String,
            error String,
            failed_at DateTime64(3, 'UTC')
        ) ENGINE = MergeTree
        ORDER BY (kafka_topic, kafka_partition, kafka_offset)
        {dedup}""",
        # One row per (minute, campaign) per offset range: ranges never merge into each other, so a forced
        # backfill can replace exactly one range's contribution, and user ids stay exact across ranges.
        f"""CREATE TABLE IF NOT EXISTS `{database}`.{PARTIALS_TABLE} (
            minute DateTime('UTC'),
            campaign_name LowCardinality(Nullable(String)),
            clicks UInt64,
            user_ids Array(String),
            kafka_topic LowCardinality(String),
            kafka_partition UInt32,
            range_start UInt64,
            range_end UInt64
        ) ENGINE = MergeTree
        ORDER BY (kafka_topic, kafka_partition, range_start, minute)
        {dedup}""",
        f"""CREATE VIEW IF NOT EXISTS `{database}`.{MINUTE_STATS_VIEW} AS
        SELECT minute, campaign_name,
               toUInt64(sum(clicks)) AS clicks,
               toUInt64(uniqExactArray(user_ids)) AS unique_users
        FROM `{database}`.{PARTIALS_TABLE}
        GROUP BY minute, campaign_name""",
        f"""CREATE VIEW IF NOT EXISTS `{database}`.{HOUR_STATS_VIEW} AS
        SELECT toStartOfHour(minute) AS hour, campaign_name,
               toUInt64(sum(clicks)) AS clicks,
               toUInt64(uniqExactArray(user_ids)) AS unique_users
        FROM `{database}`.{PARTIALS_TABLE}
        GROUP BY hour, campaign_name""",
    ]


def ensure_postgres_schema(settings: Settings) -> None:
    with psycopg.connect(settings.postgres_dsn, autocommit=True) as connection:
        connection.execute(CAMPAIGNS_DDL)


def ensure_clickhouse_schema(settings: Settings) -> None:
    with clickhouse_session(settings.clickhouse_dsn, settings.clickhouse_lock_timeout_seconds) as client:
        for statement in clickhouse_ddl(settings.clickhouse_database, settings.clickhouse_dedup_window):
            client.command(statement)
