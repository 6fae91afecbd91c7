"""`clickhouse-etl freshness` and `clickhouse-etl soak`: a pipeline's sensor under a steady load, measured.

A fresh topic gets a Dagster daemon of its own (its own DAGSTER_HOME, the pipeline written to a file of its
own that reads the topic, its sensor on) and a producer of the pipeline's demo data at a steady rate.
Meanwhile a poller records how far each partition is queryable (the highest offset in a ClickHouse server,
or the group offset a run commits right after its load — the only one read from an embedded store, which
admits one process at a time) and samples the memory of the long-running processes.
Afterwards every message's produce time (its Kafka timestamp) is matched with the first poll that saw its
offset queryable; the loaded counts must equal what was produced, exactly.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import dagster as dg
import numpy as np
import psutil
from confluent_kafka import Consumer, KafkaException, TopicPartition

from clickhouse_etl.clients.clickhouse import clickhouse_session
from clickhouse_etl.core.pipeline.loading import write_pipeline_file
from clickhouse_etl.core.pipeline.model import Pipeline
from clickhouse_etl.core.settings import Settings, settings_environment
from clickhouse_etl.dev.bench import BenchError, create_topic, loaded_counts, with_empty_claim_store
from clickhouse_etl.dev.datasets import dataset_for
from clickhouse_etl.dev.producing import produce_steady, topic_partitions
from clickhouse_etl.orchestration import tags
from clickhouse_etl.orchestration.instance import create_instance_storage, export_dagster_home
from clickhouse_etl.tools.catchup import kafka_reader
from clickhouse_etl.tools.commands import daemon_command, worker_command
from clickhouse_etl.tools.processes import stop_process_group

MIB = 2**20


@dataclass
class Visibility:
    """Per partition, the poll times and how many offsets (from 0) were queryable at each."""

    times: dict[int, list[float]] = field(default_factory=dict)
    queryable_end: dict[int, list[int]] = field(default_factory=dict)

    def record(self, now: float, ends: dict[int, int]) -> None:
        for partition, end in ends.items():
            times = self.times.setdefault(partition, [])
            seen = self.queryable_end.setdefault(partition, [])
            times.append(now)
            seen.append(max(end, seen[-1] if seen else 0))  # a replay's commit may point back: keep the furthest

    def latest(self, partition: int) -> int:
        seen = self.queryable_end.get(partition)
        return seen[-1] if seen else 0

    def latencies(self, partition: int, offsets: np.ndarray, produced_at: np.ndarray) -> np.ndarray:
        """Seconds from produce to the first poll that saw each offset queryable; NaN if none did."""
        times = np.asarray(self.times.get(partition, []), dtype=np.float64)
        ends = np.asarray(self.queryable_end.get(partition, []), dtype=np.int64)
        first_poll = np.searchsorted(ends, offsets, side="right")  # first poll whose end is past the offset
        seen = first_poll < len(ends)
        result = np.full(len(offsets), np.nan)
        result[seen] = times[first_poll[seen]] - produced_at[seen]
        return result


@dataclass
class MemorySamples:
    """RSS of the daemon and its code server over time (run workers come and go and are left out)."""

    times: list[float] = field(default_factory=list)
    rss: dict[str, list[int]] = field(default_factory=dict)

    def record(self, now: float, by_role: dict[str, int]) -> None:
        self.times.append(now)
        for role, value in by_role.items():
            self.rss.setdefault(role, []).append(value)

    def growth(self, role: str, after: float) -> tuple[int, int]:
        """The highest RSS of the first fifth of the samples after `after`, and of the last fifth.

        Peaks against peaks: a run worker's RSS rises and falls with each run's working set, so a sample taken
        between two runs against the peak of a later one would read one run's frames as growth.
        """
        samples = [v for t, v in zip(self.times, self.rss.get(role, []), strict=False) if t >= after]
        if not samples:
            return 0, 0
        fifth = max(1, len(samples) // 5)
        return max(samples[:fifth]), max(samples[-fifth:])


def process_roles(daemon: psutil.Process, workers: psutil.Process | None = None) -> dict[str, int]:
    """RSS of the long-running processes: the daemon, its largest code server, the run workers' largest child.

    The daemon starts a new code server every minute (its workspace reload) and the old one lives on while
    its runs finish, so two or three overlap: each is one process to judge, and summing them would read as
    growth. Processes a default launcher starts per run come and go and are left out.
    """
    by_role: dict[str, int] = {}
    try:
        by_role["daemon"] = daemon.memory_info().rss
        code_servers = [child for child in daemon.children(recursive=True) if " grpc" in " ".join(child.cmdline())]
        if code_servers:
            by_role["code server"] = max(child.memory_info().rss for child in code_servers)
        if workers is not None:
            children = workers.children(recursive=True)
            if children:
                by_role["run worker"] = max(child.memory_info().rss for child in children)
    except psutil.Error:
        pass  # a process that just ended: the next sample counts again
    return by_role


@dataclass
class LiveReport:
    topic: str
    partitions: int
    rate: float
    seconds: float
    warmup_seconds: float
    produced: int
    expected: tuple[int, int]
    loaded: tuple[int, int]
    runs: RunTimings
    latencies: np.ndarray
    produced_at: np.ndarray  # each latency's event's produce time (s since the epoch)
    memory: MemorySamples
    memory_after: float
    settings: Settings

    @property
    def counts_match(self) -> bool:
        return self.loaded == self.expected

    def percentile(self, q: float) -> float:
        return float(np.percentile(self.latencies, q)) if len(self.latencies) else float("nan")

    def final_minute_p95(self) -> float:
        """p95 of the events produced in the last minute of the load: where a backlog that grows shows."""
        final = self.latencies[self.produced_at >= self.produced_at.max() - 60] if len(self.latencies) else []
        return float(np.percentile(final, 95)) if len(final) else float("nan")

    def memory_growth(self) -> dict[str, tuple[int, int]]:
        return {role: self.memory.growth(role, self.memory_after) for role in sorted(self.memory.rss)}

    def memory_flat(self, tolerance: float = 0.2, slack_bytes: int = 64 * MIB) -> bool:
        """No long-running process grew by more than `tolerance` (plus a little slack for caches)."""
        return all(last <= first * (1 + tolerance) + slack_bytes for first, last in self.memory_growth().values())

    def as_json(self) -> dict[str, object]:
        return {
            "topic": self.topic,
            "rate": self.rate,
            "seconds": round(self.seconds, 1),
            "produced": self.produced,
            "expected_loaded": self.expected[0],
            "expected_dead_letters": self.expected[1],
            "loaded": self.loaded[0],
            "dead_letters": self.loaded[1],
            "counts_match": self.counts_match,
            "runs_succeeded": self.runs.succeeded,
            "runs_failed": self.runs.failed,
            "mean_launch_seconds": round(float(np.mean(self.runs.launch_seconds or [0])), 2),
            "p95_launch_seconds": round(float(np.percentile(self.runs.launch_seconds or [0], 95)), 2),
            "mean_queue_seconds": round(float(np.mean(self.runs.queue_seconds or [0])), 2),
            "mean_run_seconds": round(float(np.mean(self.runs.run_seconds or [0])), 2),
            "mean_events_per_run": round(float(np.mean(self.runs.events_per_run or [0]))),
            "latency_seconds": {
                "p50": round(self.percentile(50), 2),
                "p95": round(self.percentile(95), 2),
                "max": round(float(self.latencies.max()), 2) if len(self.latencies) else None,
                "final_minute_p95": round(self.final_minute_p95(), 2),
                "events": len(self.latencies),
            },
            "rss_bytes": {role: {"first": a, "last": b} for role, (a, b) in self.memory_growth().items()},
            "memory_flat": self.memory_flat(),
        }

    def describe(self) -> str:
        s = self.settings
        lines = [
            f"{self.produced:,} events at {self.rate:,.0f} events/s for {self.seconds:.0f} s to {self.topic} "
            f"({self.partitions} partitions); sensor every {s.sensor_interval_seconds} s, tails flushed after "
            f"{s.max_batch_wait_seconds} s, at most {s.max_records_per_run:,} records a run",
            f"runs: {self.runs.succeeded} succeeded, {self.runs.failed} failed; on average "
            f"{np.mean(self.runs.events_per_run or [0]):,.0f} offsets a run, "
            f"{np.mean(self.runs.launch_seconds or [0]):.1f} s from request to start "
            f"(p95 {np.percentile(self.runs.launch_seconds or [0], 95):.1f} s; "
            f"{np.mean(self.runs.queue_seconds or [0]):.1f} s of it in the run queue), "
            f"{np.mean(self.runs.run_seconds or [0]):.1f} s from start to end",
            f"loaded {self.loaded[0]:,} rows and {self.loaded[1]:,} dead letters; expected {self.expected[0]:,} and "
            f"{self.expected[1]:,}: " + ("exact" if self.counts_match else "MISMATCH"),
        ]
        for role, (first, last) in self.memory_growth().items():
            lines.append(f"memory of the {role}: {first / MIB:,.0f} MiB → {last / MIB:,.0f} MiB")
        lines.append(
            f"produce → queryable, {len(self.latencies):,} events after the {self.warmup_seconds:.0f} s warm-up: "
            f"p50 {self.percentile(50):.2f} s, p95 {self.percentile(95):.2f} s, max {self.latencies.max():.2f} s; "
            f"p95 of the last minute's events {self.final_minute_p95():.2f} s"
            if len(self.latencies)
            else "produce → queryable: no event after the warm-up"
        )
        return "\n".join(lines)


class Poller(threading.Thread):
    """Polls queryable offsets every `interval` seconds and the daemon's memory every `memory_interval`."""

    def __init__(
        self,
        settings: Settings,
        pipeline: Pipeline,
        daemon: psutil.Process,
        workers: psutil.Process | None,
        interval: float,
    ) -> None:
        super().__init__(daemon=True)
        self.settings, self.pipeline, self.root, self.workers = settings, pipeline, daemon, workers
        self.interval = interval
        self.topic = pipeline.topic
        self.visibility = Visibility()
        self.memory = MemorySamples()
        self.stopped = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        consumer = Consumer(
            {"bootstrap.servers": self.settings.kafka_bootstrap_servers, "group.id": self.pipeline.consumer_group}
            | self.settings.kafka_config
        )
        partitions = topic_partitions(self.settings, self.topic)
        next_memory_sample = 0.0
        try:
            while not self.stopped.is_set():
                now = time.time()
                # An embedded store admits one process at a time: polling it would hold up the loads it
                # measures. The group offset a run commits right after its load stands in (a little late).
                ends = {} if self.settings.clickhouse_is_embedded else self._clickhouse_ends()
                try:
                    committed = consumer.committed([TopicPartition(self.topic, p) for p in partitions], timeout=10)
                except KafkaException:  # e.g. the group coordinator moving: the next poll counts again
                    committed = []
                for position in committed:
                    ends[position.partition] = max(ends.get(position.partition, 0), position.offset)
                self.visibility.record(now, {p: ends.get(p, 0) for p in partitions})
                if now >= next_memory_sample:
                    self.memory.record(now, process_roles(self.root, self.workers))
                    next_memory_sample = now + 5.0
                self.stopped.wait(max(0.0, now + self.interval - time.time()))
        except BaseException as error:  # reported by the main thread
            self.error = error
        finally:
            consumer.close()

    def _clickhouse_ends(self) -> dict[int, int]:
        database = self.settings.clickhouse_database
        union = " UNION ALL ".join(
            f"SELECT kafka_partition, max(kafka_offset) + 1 AS end FROM `{database}`.`{table}` "
            "WHERE kafka_topic = {t:String} GROUP BY kafka_partition"
            for table in (self.pipeline.sink.table, self.pipeline.sink.dead_letters)
        )
        with clickhouse_session(self.settings.clickhouse_dsn, self.settings.clickhouse_lock_timeout_seconds) as client:
            sql = f"SELECT kafka_partition, max(end) FROM ({union}) GROUP BY kafka_partition"
            rows = client.query(sql, parameters={"t": self.topic}).result_rows
        return {int(p): int(end) for p, end in rows}


def start_daemon(settings: Settings, log_path: Path) -> subprocess.Popen:
    """The project's Dagster daemon with the sensor on, in a process group of its own (so it stops as a whole)."""
    with open(log_path, "ab") as log:
        return subprocess.Popen(
            daemon_command(),
            env={**os.environ, **settings_environment(settings)},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def start_run_workers(settings: Settings, log_path: Path) -> subprocess.Popen | None:
    """The run workers the settings' launcher sends runs to (none for Dagster's default launcher)."""
    if settings.run_launcher != "celery":
        return None
    command = worker_command(settings, settings.workers, f"live-{uuid.uuid4().hex[:6]}@{socket.gethostname()}")
    with open(log_path, "ab") as log:
        return subprocess.Popen(
            command,
            env={**os.environ, **settings_environment(settings)},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def produce_times(settings: Settings, topic: str, partition: int, end: int) -> tuple[np.ndarray, np.ndarray]:
    """Offsets and produce times (Kafka CreateTime, seconds) of [0, end) of one partition."""
    consumer = Consumer(
        {
            "bootstrap.servers": settings.kafka_bootstrap_servers,
            "group.id": f"freshness-{uuid.uuid4().hex[:8]}",
            "enable.auto.commit": False,
            "enable.partition.eof": True,
        }
        | settings.kafka_config
    )
    offsets: list[int] = []
    stamps: list[int] = []
    try:
        consumer.assign([TopicPartition(topic, partition, 0)])
        while len(offsets) < end:
            batch = consumer.consume(50_000, timeout=5)
            if not batch:
                raise BenchError(f"{topic}/{partition}: reading produce times stalled at {len(offsets)} of {end}")
            messages = [m for m in batch if m.error() is None and m.offset() < end]
            offsets += [m.offset() for m in messages]
            stamps += [m.timestamp()[1] for m in messages]
            if batch[-1].offset() is not None and batch[-1].offset() >= end - 1:
                break
    finally:
        consumer.close()
    return np.asarray(offsets, dtype=np.int64), np.asarray(stamps, dtype=np.float64) / 1000.0


@dataclass
class RunTimings:
    succeeded: int = 0
    failed: int = 0
    launch_seconds: list[float] = field(default_factory=list)  # requested → started
    queue_seconds: list[float] = field(default_factory=list)  # requested → handed to the launcher (the run queue)
    run_seconds: list[float] = field(default_factory=list)  # started → finished
    events_per_run: list[int] = field(default_factory=list)


def run_timings(dagster_home: str, job_name: str) -> RunTimings:
    timings = RunTimings()
    with dg.DagsterInstance.from_config(dagster_home) as instance:
        for record in instance.get_run_records(dg.RunsFilter(job_name=job_name)):
            status = record.dagster_run.status
            timings.succeeded += status == dg.DagsterRunStatus.SUCCESS
            timings.failed += status == dg.DagsterRunStatus.FAILURE
            if record.start_time and record.end_time:
                created = record.create_timestamp.timestamp()
                timings.launch_seconds.append(record.start_time - created)
                timings.run_seconds.append(record.end_time - record.start_time)
                starting = instance.all_logs(record.dagster_run.run_id, of_type=dg.DagsterEventType.RUN_STARTING)
                if starting:
                    timings.queue_seconds.append(starting[0].timestamp - created)
                run_tags = record.dagster_run.tags
                timings.events_per_run.append(int(run_tags[tags.END]) - int(run_tags[tags.START]))
    return timings


def run_live(
    settings: Settings,
    pipeline: Pipeline,
    rate: float,
    seconds: float,
    warmup: float,
    poll_interval: float = 0.5,
    settle_timeout: float = 300.0,
    say: Callable[[str], None] = print,
) -> LiveReport:
    """Steady load through the sensor for `seconds`; latencies of events produced after `warmup`."""
    settings = with_empty_claim_store(settings)
    dataset = dataset_for(pipeline.name)
    pipeline = pipeline.with_topic(f"live_{uuid.uuid4().hex[:10]}")
    topic = pipeline.topic
    create_topic(settings, topic, settings.topic_partitions)
    partitions = list(range(settings.topic_partitions))
    with tempfile.TemporaryDirectory(prefix="live-dagster-", dir=settings.data_dir) as dagster_home:
        live_settings = settings.model_copy(
            update={
                "pipelines": write_pipeline_file(pipeline, dagster_home),
                "dagster_home": dagster_home,
                # Runs of this measurement go to its own workers, whatever else shares the broker.
                "celery_queue": f"live-{uuid.uuid4().hex[:8]}",
            }
        )
        export_dagster_home(live_settings)
        create_instance_storage(dagster_home)
        log_path = Path(dagster_home) / "daemon.log"
        say(f"starting the Dagster daemon for topic {topic} (log: {log_path})…")
        daemon = start_daemon(live_settings, log_path)
        workers = start_run_workers(live_settings, log_path.with_name("workers.log"))
        worker_process = psutil.Process(workers.pid) if workers else None
        poller = Poller(live_settings, pipeline, psutil.Process(daemon.pid), worker_process, poll_interval)
        try:
            poller.start()
            say(f"producing {rate:,.0f} events/s for {seconds:.0f} s…")
            started = time.time()
            generate = dataset.generator(dataset.bench_shares)
            report = produce_steady(live_settings, topic, rate, seconds, generate, partitions=partitions)
            highs = {p: high for p, (_low, high) in kafka_reader(settings).watermarks(topic).items()}
            say("waiting until every produced offset is queryable…")
            deadline = time.monotonic() + settle_timeout
            while any(poller.visibility.latest(p) < highs[p] for p in partitions):
                if poller.error is not None or daemon.poll() is not None or time.monotonic() > deadline:
                    queryable = [poller.visibility.latest(p) for p in partitions]
                    raise BenchError(
                        f"not every offset became queryable ({queryable} of {[highs[p] for p in partitions]}; "
                        f"poller: {poller.error!r}; daemon log: {log_path})"
                    )
                time.sleep(poll_interval)
        finally:
            poller.stopped.set()
            poller.join(30)
            stop_process_group(daemon)
            if workers is not None:
                stop_process_group(workers)
        latencies, produce_moments = [], []
        for partition in partitions:
            offsets, produced_at = produce_times(live_settings, topic, partition, highs[partition])
            after_warmup = produced_at >= started + warmup
            latencies.append(poller.visibility.latencies(partition, offsets[after_warmup], produced_at[after_warmup]))
            produce_moments.append(produced_at[after_warmup])
        runs = run_timings(dagster_home, pipeline.job_name)
    return LiveReport(
        topic=topic,
        partitions=len(partitions),
        rate=rate,
        seconds=report.seconds,
        warmup_seconds=warmup,
        produced=report.produced,
        expected=dataset.expected(report),
        loaded=loaded_counts(settings, pipeline),
        runs=runs,
        latencies=np.concatenate(latencies) if latencies else np.empty(0),
        produced_at=np.concatenate(produce_moments) if produce_moments else np.empty(0),
        memory=poller.memory,
        memory_after=started + warmup,
        settings=live_settings,
    )


def print_report(report: LiveReport, as_json: bool) -> None:
    print(json.dumps(report.as_json()) if as_json else report.describe())
