"""What integration tests share: producing known data, running the real job, reading ClickHouse back."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime

import dagster as dg

from clickhouse_etl import demo_data, schemas
from clickhouse_etl.catchup import CatchUpReport, catch_up, run_range
from clickhouse_etl.clickhouse_store import clickhouse_session
from clickhouse_etl.definitions import build_definitions
from clickhouse_etl.jobs import INGEST_JOB_NAME
from clickhouse_etl.settings import Settings, settings_environment
from clickhouse_etl.steps.ranges import OffsetRange

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
    environment = {**os.environ, **settings_environment(settings), **extra}
    if dagster_home:
        environment["DAGSTER_HOME"] = dagster_home
    return environment


def run_in_background(
    settings: Settings, instance: dg.DagsterInstance, offset_range: OffsetRange
) -> tuple[threading.Thread, list[dg.ExecuteInProcessResult]]:
    """Run one range in a thread, so the test can break a dependency while the run is in a given stage."""
    job = build_definitions(settings).get_job_def(INGEST_JOB_NAME)
    results: list[dg.ExecuteInProcessResult] = []
    thread = threading.Thread(target=lambda: results.append(run_range(job, instance, offset_range)), daemon=True)
    thread.start()
    return thread, results


def wait_for_step_event(
    instance: dg.DagsterInstance, step_key: str, event_type: dg.DagsterEventType, timeout: float = 120.0
) -> None:
    """Block until some run of the instance logged `event_type` for `step_key`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for run in instance.get_runs():
            for record in instance.all_logs(run.run_id, of_type=event_type):
                if record.step_key == step_key:
                    return
        time.sleep(0.1)
    raise AssertionError(f"no {event_type.value} of {step_key} within {timeout} s")


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


def free_port() -> int:
    """A TCP port nobody listens on right now (for a webserver a test starts)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
