"""`clickhouse-etl bench`: end-to-end throughput of the real job against the local stack, and a naive baseline.

A fresh topic gets N generated events and the claims go to an emptied Redis database 15; `catch-up` runs in
a child process (so its peak RSS is its own) through the real Dagster job; the loaded counts are checked
before any rate is printed. The baseline processes the
same messages the way hand-written services do: one Redis SETNX and one PostgreSQL lookup per event, and a
batched insert.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from urllib.parse import urlsplit, urlunsplit

import dagster as dg
import orjson
import psycopg
import redis
from confluent_kafka import Consumer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from clickhouse_etl import demo_data, schemas
from clickhouse_etl.clickhouse_store import clickhouse_session
from clickhouse_etl.jobs import INGEST_JOB_NAME
from clickhouse_etl.settings import Settings, install_dagster_yaml, settings_environment
from clickhouse_etl.steps.filtering import NetworkRules
from clickhouse_etl.steps.transform import ENRICHED_COLUMNS

BENCH_SHARES = demo_data.EventShares(
    duplicate=0.10,
    duplicate_other_partition=0.3,
    bot=0.02,
    unknown_ad=0.02,
    malformed=0.001,
    late=0.02,
    ipv6=0.05,
    numeric_string=0.01,
    extra_field=0.05,
)
STAGES = ("read", "decode", "dedup", "enrich", "filter", "transform", "aggregate", "load", "commit")


class BenchError(RuntimeError):
    """The benchmark's loaded counts did not match what was produced: no rate is reported."""


@dataclass
class BenchResult:
    events: int
    partitions: int
    seconds: float
    runs: int
    stages: dict[str, float] = field(default_factory=dict)  # seconds per stage, summed over runs
    dagster_overhead_seconds_per_run: float = 0.0
    peak_rss_bytes: int = 0
    cpu_seconds: dict[str, float] = field(default_factory=dict)  # catch-up processes and Redis, during catch-up
    loaded: int = 0
    baseline_events: int = 0
    baseline_seconds: float = 0.0

    @property
    def events_per_second(self) -> float:
        return self.events / self.seconds

    @property
    def events_per_cpu_second(self) -> float:
        return self.events / sum(self.cpu_seconds.values()) if self.cpu_seconds else 0.0

    @property
    def baseline_events_per_second(self) -> float:
        return self.baseline_events / self.baseline_seconds if self.baseline_seconds else 0.0

    def as_json(self) -> dict[str, object]:
        return {
            "events": self.events,
            "partitions": self.partitions,
            "seconds": round(self.seconds, 3),
            "events_per_second": round(self.events_per_second),
            "runs": self.runs,
            "stages": {
                name: {"seconds": round(sec, 3), "events_per_second": round(self.events / sec) if sec else None}
                for name, sec in self.stages.items()
            },
            "dagster_overhead_seconds_per_run": round(self.dagster_overhead_seconds_per_run, 3),
            "peak_rss_bytes": self.peak_rss_bytes,
            "cpu_seconds": {name: round(sec, 2) for name, sec in self.cpu_seconds.items()},
            "events_per_cpu_second": round(self.events_per_cpu_second),
            "loaded": self.loaded,
            "baseline_events": self.baseline_events,
            "baseline_events_per_second": round(self.baseline_events_per_second),
            "speedup_vs_baseline": round(self.events_per_second / self.baseline_events_per_second, 1)
            if self.baseline_seconds
            else None,
        }

    def describe(self) -> str:
        lines = [
            f"events: {self.events} over {self.partitions} partitions, {self.runs} run(s), loaded {self.loaded}",
            f"{'stage':<10} {'seconds':>9} {'events/s':>12}",
        ]
        for name, sec in self.stages.items():
            rate = f"{self.events / sec:,.0f}" if sec else "-"
            lines.append(f"{name:<10} {sec:>9.3f} {rate:>12}")
        lines += [
            f"dagster overhead per run: {self.dagster_overhead_seconds_per_run:.2f} s",
            f"peak RSS of the catch-up process: {self.peak_rss_bytes / 2**20:,.0f} MiB",
            "CPU seconds: "
            + ", ".join(f"{name} {sec:.1f}" for name, sec in self.cpu_seconds.items())
            + f" ({self.events_per_cpu_second:,.0f} events per CPU second)",
        ]
        if self.baseline_seconds:
            lines.append(
                f"naive per-event baseline: {self.baseline_events_per_second:,.0f} events/s on the first "
                f"{self.baseline_events} events ({self.events_per_second / self.baseline_events_per_second:.1f}x)"
            )
        lines.append(f"end-to-end: {self.events_per_second:.0f} events/s")
        return "\n".join(lines)


def create_topic(settings: Settings, topic: str, partitions: int) -> None:
    admin = AdminClient({"bootstrap.servers": settings.kafka_bootstrap_servers, **settings.kafka_config})
    admin.create_topics([NewTopic(topic, num_partitions=partitions, replication_factor=1)])[topic].result(30)


@dataclass
class CatchUpMeasure:
    seconds: float
    peak_rss_bytes: int
    cpu_seconds: dict[str, float]


def _cpu_seconds(usage: resource.struct_rusage) -> float:
    return usage.ru_utime + usage.ru_stime


def _redis_cpu_seconds(claims: redis.Redis) -> float | None:
    """Redis's own CPU time (all its threads); None where INFO is not allowed (a managed Redis, say)."""
    try:
        cpu = claims.info("cpu")
    except redis.ResponseError:
        return None
    return float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"])


def _catch_up_in_child(settings: Settings, topic: str, dagster_home: str) -> CatchUpMeasure:
    child_settings = settings.model_copy(update={"topic": topic, "dagster_home": dagster_home})
    # The instance's storage is created before the clock starts: a deployment's catch-up finds it in place
    # (creating it costs most of a second, once).
    with dg.DagsterInstance.from_config(install_dagster_yaml(child_settings)):
        pass
    env = {**os.environ, **settings_environment(child_settings)}
    claims = redis.Redis.from_url(settings.redis_url)
    redis_cpu, children_before = _redis_cpu_seconds(claims), resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    child = subprocess.run(
        [sys.executable, "-m", "clickhouse_etl.cli", "catch-up"], env=env, capture_output=True, text=True
    )
    seconds = time.perf_counter() - started
    if child.returncode != 0:
        raise BenchError(f"catch-up failed:\n{child.stderr[-3000:]}")
    children_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    # The catch-up process and its workers (it waits for them), and Redis's work on the claims.
    cpu_seconds = {"catch-up": _cpu_seconds(children_after) - _cpu_seconds(children_before)}
    redis_cpu_after = _redis_cpu_seconds(claims)
    if redis_cpu is not None and redis_cpu_after is not None:
        cpu_seconds["redis"] = redis_cpu_after - redis_cpu
    return CatchUpMeasure(seconds, children_after.ru_maxrss * 1024, cpu_seconds)


def _stage_seconds(dagster_home: str) -> tuple[dict[str, float], int, float]:
    """Seconds per stage summed over the runs, the number of runs, and the summed run wall time."""
    totals = dict.fromkeys(STAGES, 0.0)
    wall = 0.0
    with dg.DagsterInstance.from_config(dagster_home) as instance:
        records = instance.get_run_records(
            filters=dg.RunsFilter(job_name=INGEST_JOB_NAME, statuses=[dg.DagsterRunStatus.SUCCESS])
        )
        for record in records:
            wall += (record.end_time or 0) - (record.start_time or 0)
            for event in instance.all_logs(record.dagster_run.run_id, of_type=dg.DagsterEventType.STEP_OUTPUT):
                data = event.dagster_event.step_output_data if event.dagster_event else None
                if data is not None and event.step_key == "commit":
                    for name, value in data.metadata["seconds_per_stage"].value.items():  # type: ignore[union-attr]
                        totals[name] += value
    return totals, len(records), wall


def loaded_counts(settings: Settings, topic: str) -> tuple[int, int]:
    with clickhouse_session(settings.clickhouse_dsn, settings.clickhouse_lock_timeout_seconds) as client:
        enriched = client.command(
            f"SELECT count() FROM `{settings.clickhouse_database}`.{schemas.ENRICHED_TABLE} "
            f"WHERE kafka_topic = {{t:String}}",
            parameters={"t": topic},
        )
        dead = client.command(
            f"SELECT count() FROM `{settings.clickhouse_database}`.{schemas.DEAD_LETTER_TABLE} "
            f"WHERE kafka_topic = {{t:String}}",
            parameters={"t": topic},
        )
    return int(enriched), int(dead)


def naive_baseline(settings: Settings, topic: str, partitions: int, events: int) -> float:
    """Seconds the per-event pipeline takes for the first `events` messages of the topic.

    Per message: JSON decode, Redis SET NX, a PostgreSQL lookup of the campaign, the CIDR check, then
    rows are inserted into a scratch ClickHouse table in batches of 10,000.
    """
    rules = NetworkRules.parse(settings.filter_cidrs)
    claims = redis.Redis.from_url(settings.redis_url)
    table = f"`{settings.clickhouse_database}`.bench_naive_{uuid.uuid4().hex[:8]}"
    consumer = Consumer(
        {
            "bootstrap.servers": settings.kafka_bootstrap_servers,
            "group.id": "bench-naive",
            "enable.auto.commit": False,
            **settings.kafka_config,
        }
    )
    per_partition = events // partitions
    consumer.assign([TopicPartition(topic, p, 0) for p in range(partitions)])
    started = time.perf_counter()
    with (
        psycopg.connect(settings.postgres_dsn) as connection,
        clickhouse_session(settings.clickhouse_dsn, settings.clickhouse_lock_timeout_seconds) as warehouse,
    ):
        warehouse.command(f"CREATE TABLE {table} AS `{settings.clickhouse_database}`.{schemas.ENRICHED_TABLE}")
        rows: list[list[object]] = []
        seen = 0
        while seen < per_partition * partitions:
            message = consumer.poll(5)
            if message is None:
                break
            if message.error():
                continue
            seen += 1
            try:
                event = orjson.loads(message.value())
                click_id, ad_id = str(event["click_id"]), int(event["ad_id"])
            except Exception:
                continue  # a dead letter in the real pipeline
            if not claims.set(
                f"bench-naive:{topic}:{click_id}",
                f"{message.partition()}:{message.offset()}",
                nx=True,
                ex=settings.dedup_ttl_seconds,
            ):
                continue
            campaign = connection.execute(
                "SELECT campaign_name, campaign_budget FROM campaigns WHERE ad_id = %s", (ad_id,)
            ).fetchone()
            address = str(event["ip_address"])
            if ":" not in address and any(_ipv4_in(address, n) for n in rules.ipv4):
                continue
            rows.append(
                [
                    click_id,
                    str(event["user_id"]),
                    ad_id,
                    campaign[0] if campaign else None,
                    campaign[1] if campaign else None,
                    address,
                    datetime.fromtimestamp(int(event["timestamp_ms"]) / 1000, UTC),
                    datetime.now(UTC),
                    topic,
                    message.partition(),
                    message.offset(),
                ]
            )
            if len(rows) >= 10_000:
                warehouse.insert(table, rows, column_names=list(ENRICHED_COLUMNS))
                rows = []
        if rows:
            warehouse.insert(table, rows, column_names=list(ENRICHED_COLUMNS))
        seconds = time.perf_counter() - started
        warehouse.command(f"DROP TABLE {table}")
    consumer.close()
    return seconds


def _ipv4_in(address: str, network: object) -> bool:
    import ipaddress

    return ipaddress.IPv4Address(address) in network  # type: ignore[operator]


BENCH_REDIS_DB = 15


def bench_redis_url(redis_url: str) -> str:
    """The same Redis, database 15: the bench starts from an empty claim store every time (comparable runs)."""
    parts = urlsplit(redis_url)
    return urlunsplit(parts._replace(path=f"/{BENCH_REDIS_DB}"))


def with_empty_claim_store(settings: Settings) -> Settings:
    """The settings with claims in the bench's Redis database, emptied first."""
    settings = settings.model_copy(update={"redis_url": bench_redis_url(settings.redis_url)})
    redis.Redis.from_url(settings.redis_url).flushdb(asynchronous=True)  # big after a soak: free in the background
    return settings


def expected_counts(report: demo_data.ProduceReport) -> tuple[int, int]:
    """Rows and dead letters the default rules make of what was produced: bots filtered, unknown ads kept."""
    return report.kinds.get("event", 0) - report.flags.get("is_bot", 0), report.kinds.get("malformed", 0)


def run_bench(
    settings: Settings, events: int, partitions: int, baseline_events: int, say: Callable[[str], None] = print
) -> BenchResult:
    settings = with_empty_claim_store(settings)
    topic = f"bench_{uuid.uuid4().hex[:10]}"
    create_topic(settings, topic, partitions)
    say(f"producing {events} events to {topic} ({partitions} partitions)…")
    report = demo_data.produce_count(settings, topic, events, shares=BENCH_SHARES, partitions=list(range(partitions)))
    expected_loaded, expected_dead = expected_counts(report)
    with tempfile.TemporaryDirectory(prefix="bench-dagster-", dir=settings.data_dir) as dagster_home:
        say("catching up through the ingest job…")
        measure = _catch_up_in_child(settings, topic, dagster_home)
        stages, runs, wall = _stage_seconds(dagster_home)
    loaded, dead = loaded_counts(settings, topic)
    if (loaded, dead) != (expected_loaded, expected_dead):
        raise BenchError(
            f"loaded {loaded} rows and {dead} dead letters, expected {expected_loaded} and "
            f"{expected_dead}: no rate reported"
        )
    result = BenchResult(
        events=events,
        partitions=partitions,
        seconds=measure.seconds,
        runs=runs,
        stages=stages,
        dagster_overhead_seconds_per_run=(wall - sum(stages.values())) / max(runs, 1),
        peak_rss_bytes=measure.peak_rss_bytes,
        cpu_seconds=measure.cpu_seconds,
        loaded=loaded,
    )
    if baseline_events:
        say(f"naive per-event baseline on the first {baseline_events} events…")
        result.baseline_events = baseline_events
        result.baseline_seconds = naive_baseline(settings, topic, partitions, baseline_events)
    return result


def print_result(result: BenchResult, as_json: bool) -> None:
    print(json.dumps(result.as_json()) if as_json else result.describe())
