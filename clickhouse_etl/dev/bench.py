"""`clickhouse-etl bench`: end-to-end throughput of a pipeline's real job against the local stack, and a
naive baseline.

A fresh topic gets N generated events of the pipeline's demo data and the claims go to an emptied Redis
database 15; `catch-up` runs in a child process through the real Dagster job (each of its processes reports
its own peak RSS), with the pipeline written to a file of its own that reads the fresh topic; the loaded
counts are checked before any rate is printed. Beside it, on the same topic and in the same sitting: the raw
pass-through (read, NDJSON, one JSONEachRow insert per batch, no processing: dev/pass_through.py), whose rate
the end-to-end rate is read against; and the naive baseline, which processes the same messages the way
hand-written services do: one Redis SET NX and one PostgreSQL lookup per lookup per event, the network rules,
and a batched insert.
With `--prefill-rows N` the pipeline's tables first get N rows of its demo data (dev/prefill.py), so the
catch-up runs against a store that already holds what a long-lived deployment's would; with `--prefill-claims
N` the claim store holds N claims one TTL old (dev/claims_prefill.py), so its claims cost what they do in a
deployment's steady state.
"""

from __future__ import annotations

import ipaddress
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
from decimal import Decimal
from urllib.parse import urlsplit, urlunsplit

import dagster as dg
import orjson
import psycopg
import redis
from confluent_kafka import Consumer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic
from psycopg import sql

from clickhouse_etl.clients.clickhouse import clickhouse_session
from clickhouse_etl.core.pipeline.columns import columns_of
from clickhouse_etl.core.pipeline.loading import write_pipeline_file
from clickhouse_etl.core.pipeline.model import Lookup, Pipeline
from clickhouse_etl.core.pipeline.types import FieldType
from clickhouse_etl.core.settings import Settings, settings_environment
from clickhouse_etl.dev.claims_prefill import ClaimsPrefill, prefill_claims
from clickhouse_etl.dev.datasets import dataset_for
from clickhouse_etl.dev.pass_through import PassThroughError, PassThroughResult, run_pass_through
from clickhouse_etl.dev.prefill import PrefillReport, prefill_store, store_size
from clickhouse_etl.dev.producing import produce_count
from clickhouse_etl.orchestration.instance import create_instance_storage, install_dagster_yaml
from clickhouse_etl.orchestration.ops import STAGES
from clickhouse_etl.steps.filtering import NetworkRules


class BenchError(RuntimeError):
    """The benchmark's loaded counts did not match what was produced: no rate is reported."""


@dataclass
class BenchResult:
    pipeline: str
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
    pass_through: PassThroughResult | None = None
    prefill: PrefillReport | None = None
    claims_prefill: ClaimsPrefill | None = None
    store_rows: int = 0  # rows of the pipeline's table before the catch-up, every topic's
    store_parts: int = 0  # its active parts then
    topic: str = ""  # the bench's own, fresh topic

    @property
    def events_per_second(self) -> float:
        return self.events / self.seconds

    @property
    def ratio_to_pass_through(self) -> float | None:
        """End-to-end rate over the raw pass-through's, on the same messages: ≥ 1 is full processing at least
        as fast as none."""
        if self.pass_through is None or not self.pass_through.messages_per_second:
            return None
        return self.events_per_second / self.pass_through.messages_per_second

    @property
    def events_per_cpu_second(self) -> float:
        return self.events / sum(self.cpu_seconds.values()) if self.cpu_seconds else 0.0

    @property
    def baseline_events_per_second(self) -> float:
        return self.baseline_events / self.baseline_seconds if self.baseline_seconds else 0.0

    def as_json(self) -> dict[str, object]:
        return {
            "pipeline": self.pipeline,
            "topic": self.topic,
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
            "pass_through": self.pass_through.as_json() if self.pass_through else None,
            "ratio_to_pass_through": _rounded(self.ratio_to_pass_through, 3),
            "prefill": self.prefill.as_json() if self.prefill else None,
            "claims_prefill": self.claims_prefill.as_json() if self.claims_prefill else None,
            "store_before": {"rows": self.store_rows, "active_parts": self.store_parts},
        }

    def describe(self) -> str:
        lines = [
            f"pipeline {self.pipeline}: {self.events} events over {self.partitions} partitions, {self.runs} run(s), "
            f"loaded {self.loaded}",
            f"store before the catch-up: {self.store_rows:,} rows in {self.store_parts} active part(s)"
            + (
                f", {self.prefill.rows:,} of them (and {self.prefill.dead_letters:,} dead letters) prefilled "
                f"in {self.prefill.seconds:.1f} s"
                if self.prefill
                else ""
            ),
        ]
        if self.claims_prefill:
            lines.append(
                f"claim store before the catch-up: {self.claims_prefill.claims:,} claims one TTL old (prefilled in "
                f"{self.claims_prefill.seconds:.1f} s): every claim call also reads their bucket"
            )
        lines.append(f"{'stage':<10} {'seconds':>9} {'events/s':>12}")
        for name, sec in self.stages.items():
            rate = f"{self.events / sec:,.0f}" if sec else "-"
            lines.append(f"{name:<10} {sec:>9.3f} {rate:>12}")
        lines += [
            f"dagster overhead per run: {self.dagster_overhead_seconds_per_run:.2f} s",
            f"peak RSS of a catch-up process (the largest): {self.peak_rss_bytes / 2**20:,.0f} MiB",
            "CPU seconds: "
            + ", ".join(f"{name} {sec:.1f}" for name, sec in self.cpu_seconds.items())
            + f" ({self.events_per_cpu_second:,.0f} events per CPU second)",
        ]
        if self.baseline_seconds:
            lines.append(
                f"naive per-event baseline: {self.baseline_events_per_second:,.0f} events/s on the first "
                f"{self.baseline_events} events ({self.events_per_second / self.baseline_events_per_second:.1f}x)"
            )
        end_to_end = f"end-to-end: {self.events_per_second:.0f} events/s"
        if self.pass_through is not None:
            raw = self.pass_through
            lines.append(
                f"raw pass-through (no processing, one process): {raw.messages_per_second:,.0f} messages/s, "
                f"{raw.rows:,} rows in {raw.inserts} insert(s), CPU seconds {raw.cpu_seconds:.1f}, "
                f"peak RSS {raw.peak_rss_bytes / 2**20:,.0f} MiB"
            )
            end_to_end += f", {self.ratio_to_pass_through:.2f}x the raw pass-through"
        lines.append(end_to_end)
        return "\n".join(lines)


def _rounded(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)


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
    """Redis's CPU time, its threads and the children it forks to rewrite its append-only file (the claims'
    persistence costs that too); None where INFO is not allowed (a managed Redis, say)."""
    try:
        cpu = claims.info("cpu")
    except redis.ResponseError:
        return None
    fields = ("used_cpu_user", "used_cpu_sys", "used_cpu_user_children", "used_cpu_sys_children")
    return sum(float(cpu.get(field, 0.0)) for field in fields)


def _catch_up_in_child(settings: Settings, pipeline: Pipeline, dagster_home: str) -> CatchUpMeasure:
    child_settings = settings.model_copy(
        update={"pipelines": write_pipeline_file(pipeline, dagster_home), "dagster_home": dagster_home}
    )
    # The instance's storage is created before the clock starts: a deployment's catch-up finds it in place
    # (creating it costs most of a second, once).
    create_instance_storage(install_dagster_yaml(child_settings))
    env = {**os.environ, **settings_environment(child_settings)}
    claims = redis.Redis.from_url(settings.redis_url)
    redis_cpu, children_before = _redis_cpu_seconds(claims), resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    child = subprocess.run(
        [sys.executable, "-m", "clickhouse_etl.cli", "catch-up", "--json"], env=env, capture_output=True, text=True
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
    # The peak each catch-up process measured of itself: getrusage's figure for children never falls below
    # this process's own peak, and this one produced the events and opened the embedded store.
    report = json.loads(child.stdout.strip().splitlines()[-1])
    return CatchUpMeasure(seconds, report["peak_rss_bytes"], cpu_seconds)


def _stage_seconds(dagster_home: str, job_name: str) -> tuple[dict[str, float], int, float]:
    """Seconds per stage summed over the runs, the number of runs, and the summed run wall time."""
    totals = dict.fromkeys(STAGES, 0.0)
    wall = 0.0
    with dg.DagsterInstance.from_config(dagster_home) as instance:
        records = instance.get_run_records(
            filters=dg.RunsFilter(job_name=job_name, statuses=[dg.DagsterRunStatus.SUCCESS])
        )
        for record in records:
            wall += (record.end_time or 0) - (record.start_time or 0)
            for event in instance.all_logs(record.dagster_run.run_id, of_type=dg.DagsterEventType.STEP_OUTPUT):
                data = event.dagster_event.step_output_data if event.dagster_event else None
                if data is not None and event.step_key == "commit":
                    for name, value in data.metadata["seconds_per_stage"].value.items():  # type: ignore[union-attr]
                        totals[name] += value
    return totals, len(records), wall


def loaded_counts(settings: Settings, pipeline: Pipeline) -> tuple[int, int]:
    """Rows of the pipeline's topic in its sink table and in its dead letters."""
    counts = []
    with clickhouse_session(settings.clickhouse_dsn, settings.clickhouse_lock_timeout_seconds) as client:
        for table in (pipeline.sink.table, pipeline.sink.dead_letters):
            counts.append(
                client.command(
                    f"SELECT count() FROM `{settings.clickhouse_database}`.`{table}` WHERE kafka_topic = {{t:String}}",
                    parameters={"t": pipeline.topic},
                )
            )
    return int(counts[0]), int(counts[1])


def naive_baseline(settings: Settings, pipeline: Pipeline, partitions: int, events: int) -> float:
    """Seconds a per-event service takes for the first `events` messages of the pipeline's topic.

    Per message: JSON decode and type conversion, a Redis SET NX of the dedup key, one PostgreSQL query per
    lookup, the network rules, renamed columns and processed_at; rows are inserted into a scratch ClickHouse
    table in batches of 10,000. It skips what such a service would hand-code besides (drop_when conditions,
    computed expressions), so it is, if anything, fast.
    """
    claims = redis.Redis.from_url(settings.redis_url)
    database = settings.clickhouse_database
    table = f"`{database}`.bench_naive_{uuid.uuid4().hex[:8]}"
    sink_names = columns_of(pipeline).sink_names
    converters = {name: _python_value(spec.field_type) for name, spec in pipeline.source.fields.items()}
    renamed = {name: c.sql.strip() for name, c in pipeline.transform.items() if c.sql.strip() in converters}
    lookups = [(lookup, _lookup_query(lookup)) for lookup in pipeline.enrich]
    rules = [(rule.field, NetworkRules.parse(rule.cidrs)) for rule in pipeline.filter.drop_networks]
    names = [*converters, *(name for lookup in pipeline.enrich for name in lookup.columns), *renamed]
    names = [n for n in [*names, "processed_at", "kafka_topic", "kafka_partition", "kafka_offset"] if n in sink_names]
    consumer = Consumer(
        {
            "bootstrap.servers": settings.kafka_bootstrap_servers,
            "group.id": "bench-naive",
            "enable.auto.commit": False,
            **settings.kafka_config,
        }
    )
    per_partition = events // partitions
    consumer.assign([TopicPartition(pipeline.topic, p, 0) for p in range(partitions)])
    started = time.perf_counter()
    with (
        psycopg.connect(settings.postgres_dsn) as connection,
        clickhouse_session(settings.clickhouse_dsn, settings.clickhouse_lock_timeout_seconds) as warehouse,
    ):
        warehouse.command(f"CREATE TABLE {table} AS `{database}`.`{pipeline.sink.table}`")
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
                values = {name: convert(event[name]) for name, convert in converters.items()}
            except Exception:
                continue  # a dead letter in the real pipeline
            if pipeline.dedup is not None:
                key = "|".join(str(values[name]) for name in pipeline.dedup.key)
                position = f"{message.partition()}:{message.offset()}"
                if not claims.set(
                    f"bench-naive:{pipeline.topic}:{key}", position, nx=True, ex=pipeline.dedup.ttl_seconds
                ):
                    continue
            for lookup, query in lookups:
                found = connection.execute(query, [values[k] for k in lookup.join_key]).fetchone()
                values.update(zip(lookup.columns, found or [None] * len(lookup.columns), strict=True))
            if any(_blocked(str(values[field]), rule) for field, rule in rules):
                continue
            values |= {name: values[source] for name, source in renamed.items()}
            values |= {
                "processed_at": datetime.now(UTC),
                "kafka_topic": pipeline.topic,
                "kafka_partition": message.partition(),
                "kafka_offset": message.offset(),
            }
            rows.append([values[name] for name in names])
            if len(rows) >= 10_000:
                warehouse.insert(table, rows, column_names=names)
                rows = []
        if rows:
            warehouse.insert(table, rows, column_names=names)
        seconds = time.perf_counter() - started
        warehouse.command(f"DROP TABLE {table}")
    consumer.close()
    return seconds


def _python_value(field_type: FieldType) -> Callable[[object], object]:
    """How a hand-written service turns a JSON value into the column's value."""
    if field_type.kind == "timestamp":
        per_second = 1000 if field_type.unit == "ms" else 1
        return lambda value: datetime.fromtimestamp(int(value) / per_second, UTC)  # type: ignore[call-overload]
    return {
        "int64": int,
        "float64": float,
        "bool": bool,
        "decimal": lambda value: Decimal(str(value)),
    }.get(field_type.kind, str)  # type: ignore[return-value]


def _lookup_query(lookup: Lookup) -> sql.Composed:
    """One row of a lookup by its key, as a per-event service asks for it."""
    source = (
        sql.Identifier(*lookup.table.split("."))
        if lookup.table
        else sql.SQL("({}) AS lookup").format(sql.SQL(lookup.query))  # type: ignore[arg-type]
    )
    return sql.SQL("SELECT {} FROM {} WHERE {}").format(
        sql.SQL(", ").join(sql.Identifier(spec.column or name) for name, spec in lookup.columns.items()),
        source,
        sql.SQL(" AND ").join(sql.SQL("{} = %s").format(sql.Identifier(k)) for k in lookup.key_columns),
    )


def _blocked(address: str, rules: NetworkRules) -> bool:
    ip = ipaddress.ip_address(address)
    networks = rules.ipv4 if ip.version == 4 else rules.ipv6
    return any(ip in network for network in networks)


BENCH_REDIS_DB = 15


def bench_redis_url(redis_url: str) -> str:
    """The same Redis, database 15: the bench starts from an empty claim store every time (comparable runs)."""
    parts = urlsplit(redis_url)
    if parts.scheme.endswith("+cluster"):
        # A cluster has one database, holding live claims: the bench will not empty it.
        raise BenchError(
            "the bench needs a single Redis for its claims (python -m clickhouse_etl.dev.claims_cost "
            "measures a cluster's claims)"
        )
    return urlunsplit(parts._replace(path=f"/{BENCH_REDIS_DB}"))


def with_empty_claim_store(settings: Settings) -> Settings:
    """The settings with claims in the bench's Redis database, emptied first."""
    settings = settings.model_copy(update={"redis_url": bench_redis_url(settings.redis_url)})
    redis.Redis.from_url(settings.redis_url).flushdb(asynchronous=True)  # big after a soak: free in the background
    return settings


def prepare_store(
    settings: Settings, pipeline: Pipeline, prefill_rows: int, partitions: int, say: Callable[[str], None]
) -> tuple[PrefillReport | None, int, int]:
    """The prefill when asked for, and the rows and active parts of the pipeline's table the catch-up meets."""
    database = settings.clickhouse_database
    prefill = None
    with clickhouse_session(settings.clickhouse_dsn, settings.clickhouse_lock_timeout_seconds) as client:
        if prefill_rows:
            say(f"prefilling {pipeline.sink.table} with {prefill_rows} rows of {pipeline.name} demo data…")
            prefill = prefill_store(
                client,
                database,
                pipeline,
                prefill_rows,
                partitions,
                settings.max_records_per_run,
                dataset_for(pipeline.name).lookup_rows,
            )
        rows, parts = store_size(client, database, pipeline.sink.table)
    return prefill, rows, parts


def run_bench(
    settings: Settings,
    pipeline: Pipeline,
    events: int,
    partitions: int,
    baseline_events: int,
    say: Callable[[str], None] = print,
    pass_through: bool = True,
    prefill_rows: int = 0,
    prefill_claim_count: int = 0,
) -> BenchResult:
    settings = with_empty_claim_store(settings)
    dataset = dataset_for(pipeline.name)
    prefill, store_rows, store_parts = prepare_store(settings, pipeline, prefill_rows, partitions, say)
    bench_pipeline = pipeline.with_topic(f"bench_{uuid.uuid4().hex[:10]}")
    claims_prefill = None
    if prefill_claim_count:
        say(f"prefilling the claim store with {prefill_claim_count} claims one TTL old…")
        claims_prefill = prefill_claims(
            settings.redis_url, bench_pipeline, prefill_claim_count, settings.claims_wait_seconds
        )
    create_topic(settings, bench_pipeline.topic, partitions)
    say(f"producing {events} {pipeline.name} events to {bench_pipeline.topic} ({partitions} partitions)…")
    generate = dataset.generator(dataset.bench_shares)
    report = produce_count(settings, bench_pipeline.topic, events, generate, partitions=list(range(partitions)))
    expected_loaded, expected_dead = dataset.expected(report)
    with tempfile.TemporaryDirectory(prefix="bench-dagster-", dir=settings.data_dir) as dagster_home:
        say(f"catching up through {pipeline.job_name}…")
        measure = _catch_up_in_child(settings, bench_pipeline, dagster_home)
        stages, runs, wall = _stage_seconds(dagster_home, pipeline.job_name)
    loaded, dead = loaded_counts(settings, bench_pipeline)
    if (loaded, dead) != (expected_loaded, expected_dead):
        raise BenchError(
            f"loaded {loaded} rows and {dead} dead letters, expected {expected_loaded} and "
            f"{expected_dead}: no rate reported"
        )
    result = BenchResult(
        pipeline=pipeline.name,
        events=events,
        partitions=partitions,
        seconds=measure.seconds,
        runs=runs,
        stages=stages,
        dagster_overhead_seconds_per_run=(wall - sum(stages.values())) / max(runs, 1),
        peak_rss_bytes=measure.peak_rss_bytes,
        cpu_seconds=measure.cpu_seconds,
        loaded=loaded,
        prefill=prefill,
        claims_prefill=claims_prefill,
        store_rows=store_rows,
        store_parts=store_parts,
        topic=bench_pipeline.topic,
    )
    if pass_through:
        say(f"raw pass-through of {bench_pipeline.topic}…")
        try:
            result.pass_through = run_pass_through(settings, bench_pipeline)
        except PassThroughError as error:
            raise BenchError(str(error)) from error
        if result.pass_through.messages != report.produced:
            raise BenchError(
                f"the raw pass-through read {result.pass_through.messages} messages, {report.produced} were "
                "produced: no rate reported"
            )
    if baseline_events:
        say(f"naive per-event baseline on the first {baseline_events} events…")
        result.baseline_events = baseline_events
        result.baseline_seconds = naive_baseline(settings, bench_pipeline, partitions, baseline_events)
    return result


def print_result(result: BenchResult, as_json: bool) -> None:
    print(json.dumps(result.as_json()) if as_json else result.describe())
