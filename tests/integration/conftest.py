"""The real local stack for integration tests, on ports of its own, started once per session from nothing."""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import dagster as dg
import pytest
import redis
from confluent_kafka.admin import AdminClient, NewTopic

from clickhouse_etl.clients.clickhouse import clickhouse_session
from clickhouse_etl.core.pipeline.loading import load_pipelines, write_pipeline_file
from clickhouse_etl.core.pipeline.model import Pipeline
from clickhouse_etl.core.settings import Settings, load_settings
from clickhouse_etl.dev import stack
from clickhouse_etl.dev.datasets import DATASETS
from clickhouse_etl.dev.redis_cluster import LocalRedisCluster
from clickhouse_etl.tools.commands import ensure_pipeline_tables

# The packaged pipelines as their files declare them (no CLICKHOUSE_ETL_* of the caller reaches them).
AD_CLICKS, API_USAGE = (loaded.pipeline for loaded in load_pipelines("ad_clicks,api_usage", environment={}))

# TEST_STACK_PORT_OFFSET moves the whole test stack (ports and folder), so two sessions can run side by side.
TEST_PORT_OFFSET = int(os.environ.get("TEST_STACK_PORT_OFFSET", "0"))
TEST_PORTS = {
    "kafka": 19092 + TEST_PORT_OFFSET,
    "redis": 16379 + TEST_PORT_OFFSET,
    "postgres": 15432 + TEST_PORT_OFFSET,
}


def stack_settings(data_dir: Path, ports: dict[str, int], **overrides: object) -> Settings:
    return load_settings(
        data_dir=data_dir,
        kafka_bootstrap_servers=f"127.0.0.1:{ports['kafka']}",
        redis_url=f"redis://127.0.0.1:{ports['redis']}/0",
        postgres_dsn=f"postgresql://postgres@127.0.0.1:{ports['postgres']}/clickhouse_etl",
        kafka_heap="512m",
        # Claims wait out a Redis outage for 2 s here, not the default 30: the outage tests expect a stopped
        # Redis to fail the dedup step soon. A test of a Redis restart asks for longer.
        claims_wait_seconds=2.0,
        **overrides,
    )


def fresh_stack(data_dir: Path, ports: dict[str, int]) -> Settings:
    """Stop whatever an earlier session left behind in `data_dir`, wipe it, and bring the stack up."""
    settings = stack_settings(data_dir, ports)
    if data_dir.exists():
        stack.stack_down(settings, echo=lambda _: None)
        shutil.rmtree(data_dir)
    data_dir.mkdir(parents=True)
    try:
        stack.stack_up(settings, echo=print)
    except BaseException:
        stack.stack_down(settings, echo=print)
        raise
    return settings


@pytest.fixture(scope="session")
def stack_dir() -> Path:
    suffix = f"-{TEST_PORT_OFFSET}" if TEST_PORT_OFFSET else ""
    return Path(tempfile.gettempdir()) / f"clickhouse-etl-tests-{os.getuid()}{suffix}"


@pytest.fixture(scope="session")
def base_settings(stack_dir: Path) -> Iterator[Settings]:
    settings = fresh_stack(stack_dir, TEST_PORTS)
    for dataset in DATASETS.values():
        dataset.seed_lookup_table(settings, dataset.lookup_rows)
    yield settings
    stack.stack_down(settings, echo=print)


def new_topic(settings: Settings, prefix: str, partitions: int = 3, config: dict[str, str] | None = None) -> str:
    """A new topic (three partitions unless told; `config`: topic settings): tests never see each other's
    offsets or claims."""
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    admin = AdminClient({"bootstrap.servers": settings.kafka_bootstrap_servers})
    topic = NewTopic(name, num_partitions=partitions, replication_factor=1, config=config or {})
    admin.create_topics([topic])[name].result(30)
    return name


def configure(settings: Settings, pipelines: list[Pipeline], folder: Path, empty: bool = True) -> Settings:
    """The settings with exactly these pipelines configured (written to files, as child processes read them),
    their tables created or extended — and, unless `empty` is false, emptied with the claims flushed."""
    folder.mkdir(parents=True, exist_ok=True)
    files = [write_pipeline_file(pipeline, folder) for pipeline in pipelines]
    configured = settings.model_copy(update={"pipelines": ",".join(files)})
    ensure_pipeline_tables(configured, pipelines)
    if not empty:
        return configured
    with clickhouse_session(configured.clickhouse_dsn, 60) as client:
        for pipeline in pipelines:
            for table in pipeline.tables[:2] + [a.partials for a in pipeline.aggregate]:
                client.command(f"TRUNCATE TABLE IF EXISTS analytics.`{table}`")
    redis.Redis.from_url(configured.redis_url).flushdb()
    return configured


@pytest.fixture
def topic(base_settings: Settings) -> str:
    return new_topic(base_settings, "clicks")


@pytest.fixture
def pipeline(topic: str) -> Pipeline:
    """The ad_clicks pipeline, reading the test's own topic."""
    return AD_CLICKS.with_topic(topic)


@pytest.fixture
def settings(base_settings: Settings, pipeline: Pipeline, tmp_path: Path) -> Settings:
    """Settings of one test: its pipeline, small ranges (many runs), tails flushed at once; empty warehouse."""
    small = base_settings.model_copy(update={"max_records_per_run": 5_000, "max_batch_wait_seconds": 0.0})
    return configure(small, [pipeline], tmp_path / "pipelines")


@pytest.fixture
def instance() -> Iterator[dg.DagsterInstance]:
    with dg.instance_for_test() as test_instance:
        yield test_instance


@pytest.fixture(scope="session")
def redis_cluster(base_settings: Settings, stack_dir: Path) -> Iterator[LocalRedisCluster]:
    """A real 3-primary Redis Cluster of local redis-server processes, on ports of its own (the test stack's
    Redis port + 100, + 101, + 102, moved by TEST_STACK_PORT_OFFSET), created once per session."""
    cluster = LocalRedisCluster(stack_dir.with_name(stack_dir.name + "-redis-cluster"), TEST_PORTS["redis"] + 100)
    cluster.stop()  # what an earlier session may have left running
    shutil.rmtree(cluster.home, ignore_errors=True)
    cluster.start(echo=print)
    yield cluster
    cluster.stop()
