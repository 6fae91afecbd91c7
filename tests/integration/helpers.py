"""What integration tests share: producing known data, running the real job, reading ClickHouse back."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import UTC, datetime

import dagster as dg

from clickhouse_etl import demo_data, schemas
from clickhouse_etl.catchup import CatchUpReport, catch_up
from clickhouse_etl.clickhouse_store import clickhouse_session
from clickhouse_etl.settings import Settings

ALL_KINDS = demo_data.EventShares(
    duplicate=0.10,
    duplicate_other_partition=0.4,
    bot=0.05,
    unknown_ad=0.05,
    malformed=0.02,
    late=0.05,
    ipv6=0.10,
    numeric_string=0.05,
    extra_field=0.05,
)


def produce(settings: Settings, count: int, shares: demo_data.EventShares = ALL_KINDS, seed: int = 11) -> None:
    demo_data.produce_count(settings, settings.topic, count, shares=shares, partitions=[0, 1, 2], seed=seed)


def run_catch_up(settings: Settings, instance: dg.DagsterInstance) -> CatchUpReport:
    return catch_up(settings, instance, echo=lambda _: None)


def query(settings: Settings, sql: str, **parameters: object) -> list[tuple]:
    with clickhouse_session(settings.clickhouse_dsn, 60) as client:
        return list(client.query(sql, parameters=parameters).result_rows)


def enriched_rows(settings: Settings) -> list[tuple]:
    return query(
        settings,
        f"SELECT click_id, user_id, ad_id, campaign_name, campaign_budget, ip_address, click_time, processed_at, "
        f"kafka_partition, kafka_offset FROM analytics.{schemas.ENRICHED_TABLE} WHERE kafka_topic = {{t:String}} "
        f"ORDER BY kafka_partition, kafka_offset",
        t=settings.topic,
    )


def dead_letter_rows(settings: Settings) -> list[tuple]:
    return query(
        settings,
        f"SELECT kafka_partition, kafka_offset, raw_value, error, failed_at FROM analytics.{schemas.DEAD_LETTER_TABLE} "
        f"WHERE kafka_topic = {{t:String}} ORDER BY kafka_partition, kafka_offset",
        t=settings.topic,
    )


def warehouse_snapshot(settings: Settings) -> dict[str, list[tuple]]:
    """Everything the pipeline wrote, for before/after comparisons."""
    return {
        "enriched": enriched_rows(settings),
        "dead_letters": dead_letter_rows(settings),
        "partials": query(settings, f"SELECT * FROM analytics.{schemas.PARTIALS_TABLE} ORDER BY ALL"),
        "stats": query(settings, f"SELECT * FROM analytics.{schemas.MINUTE_STATS_VIEW} ORDER BY ALL"),
    }


def _utc(moment: datetime) -> datetime:
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def stats_by_window(settings: Settings) -> dict[tuple, tuple[int, int]]:
    rows = query(
        settings, f"SELECT minute, campaign_name, clicks, unique_users FROM analytics.{schemas.MINUTE_STATS_VIEW}"
    )
    return {(_utc(minute), name): (clicks, users) for minute, name, clicks, users in rows}


def direct_stats(settings: Settings) -> dict[tuple, tuple[int, int]]:
    rows = query(
        settings,
        f"SELECT toStartOfMinute(click_time), campaign_name, count(), uniqExact(user_id) "
        f"FROM analytics.{schemas.ENRICHED_TABLE} GROUP BY 1, 2",
    )
    return {(_utc(minute), name): (clicks, users) for minute, name, clicks, users in rows}


CLI = [sys.executable, "-m", "clickhouse_etl.cli"]


def cli_env(settings: Settings, dagster_home: str = "", **extra: str) -> dict[str, str]:
    """The environment a command-line process needs to use the test's stack, topic and Dagster home."""
    return {
        **os.environ,
        "CLICKHOUSE_ETL_DATA_DIR": str(settings.data_dir),
        "CLICKHOUSE_DSN": settings.clickhouse_dsn,
        "KAFKA_BOOTSTRAP_SERVERS": settings.kafka_bootstrap_servers,
        "REDIS_URL": settings.redis_url,
        "POSTGRES_DSN": settings.postgres_dsn,
        "CLICKHOUSE_ETL_TOPIC": settings.topic,
        "CLICKHOUSE_ETL_MAX_RECORDS_PER_RUN": str(settings.max_records_per_run),
        **({"DAGSTER_HOME": dagster_home} if dagster_home else {}),
        **extra,
    }


def cli(
    settings: Settings, *args: str, extra_env: dict[str, str] | None = None, dagster_home: str = ""
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, *args],
        env=cli_env(settings, dagster_home, **(extra_env or {})),
        capture_output=True,
        text=True,
        timeout=300,
    )
