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

from clickhouse_etl.clients.clickhouse import clickhouse_session
from clickhouse_etl.core.pipeline.model import Pipeline
from clickhouse_etl.core.ranges import OffsetRange
from clickhouse_etl.core.settings import Settings, settings_environment
from clickhouse_etl.dev.datasets import dataset_for
from clickhouse_etl.dev.demo_data import EventShares
from clickhouse_etl.dev.producing import ProduceReport, produce_count
from clickhouse_etl.tools.catchup import CatchUpReport, catch_up, ingest_job, run_range

ALL_KINDS = EventShares(
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


def produce(
    settings: Settings, pipeline: Pipeline, count: int, shares: object | None = None, seed: int = 11
) -> ProduceReport:
    """`count` demo events of the pipeline over partitions 0, 1 and 2; ad clicks of every kind by default."""
    if shares is None and pipeline.name == "ad_clicks":
        shares = ALL_KINDS
    generate = dataset_for(pipeline.name).generator(shares)
    return produce_count(settings, pipeline.topic, count, generate, partitions=[0, 1, 2], seed=seed)


def run_catch_up(settings: Settings, pipeline: Pipeline, instance: dg.DagsterInstance) -> CatchUpReport:
    return catch_up(settings, pipeline, instance, echo=lambda _: None)


def job_of(settings: Settings, pipeline: Pipeline) -> dg.JobDefinition:
    return ingest_job(settings, pipeline)


def query(settings: Settings, sql: str, **parameters: object) -> list[tuple]:
    with clickhouse_session(settings.clickhouse_dsn, 60) as client:
        return list(client.query(sql, parameters=parameters).result_rows)


def enriched_rows(settings: Settings, pipeline: Pipeline) -> list[tuple]:
    return query(
        settings,
        f"SELECT click_id, user_id, ad_id, campaign_name, campaign_budget, ip_address, click_time, processed_at, "
        f"kafka_partition, kafka_offset FROM analytics.{pipeline.sink.table} WHERE kafka_topic = {{t:String}} "
        f"ORDER BY kafka_partition, kafka_offset",
        t=pipeline.topic,
    )


def dead_letter_rows(settings: Settings, pipeline: Pipeline) -> list[tuple]:
    return query(
        settings,
        "SELECT kafka_partition, kafka_offset, raw_value, error, failed_at "
        f"FROM analytics.{pipeline.sink.dead_letters} "
        f"WHERE kafka_topic = {{t:String}} ORDER BY kafka_partition, kafka_offset",
        t=pipeline.topic,
    )


def warehouse_snapshot(settings: Settings, pipeline: Pipeline) -> dict[str, list[tuple]]:
    """Everything the pipeline wrote, for before/after comparisons."""
    topic = {"t": pipeline.topic}
    snapshot = {
        "rows": query(
            settings,
            f"SELECT * FROM analytics.{pipeline.sink.table} WHERE kafka_topic = {{t:String}} ORDER BY ALL",
            **topic,
        ),
        "dead_letters": dead_letter_rows(settings, pipeline),
    }
    for aggregate in pipeline.aggregate:
        snapshot[aggregate.partials] = query(
            settings,
            f"SELECT * FROM analytics.{aggregate.partials} WHERE kafka_topic = {{t:String}} ORDER BY ALL",
            **topic,
        )
        for view in aggregate.windows.values():
            snapshot[view] = query(settings, f"SELECT * FROM analytics.{view} ORDER BY ALL")
    return snapshot


def _utc(moment: datetime) -> datetime:
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def stats_by_window(settings: Settings) -> dict[tuple, tuple[int, int]]:
    rows = query(settings, "SELECT minute, campaign_name, clicks, unique_users FROM analytics.campaign_minute_stats")
    return {(_utc(minute), name): (clicks, users) for minute, name, clicks, users in rows}


def direct_stats(settings: Settings) -> dict[tuple, tuple[int, int]]:
    rows = query(
        settings,
        "SELECT toStartOfMinute(click_time), campaign_name, count(), uniqExact(user_id) "
        "FROM analytics.ad_clicks_enriched GROUP BY 1, 2",
    )
    return {(_utc(minute), name): (clicks, users) for minute, name, clicks, users in rows}


CLI = [sys.executable, "-m", "clickhouse_etl.cli"]


def cli_env(settings: Settings, dagster_home: str = "", **extra: str) -> dict[str, str]:
    """The environment a command-line process needs to use the test's stack, pipelines and Dagster home."""
    environment = {**os.environ, **settings_environment(settings), **extra}
    if dagster_home:
        environment["DAGSTER_HOME"] = dagster_home
    return environment


def run_in_background(
    settings: Settings, pipeline: Pipeline, instance: dg.DagsterInstance, offset_range: OffsetRange
) -> tuple[threading.Thread, list[dg.ExecuteInProcessResult]]:
    """Run one range in a thread, so the test can break a dependency while the run is in a given stage."""
    job = job_of(settings, pipeline)
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
