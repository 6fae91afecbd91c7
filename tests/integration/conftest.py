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

from clickhouse_etl import demo_data, schemas, stack
from clickhouse_etl.clickhouse_store import clickhouse_session
from clickhouse_etl.settings import Settings, load_settings

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
    demo_data.seed_campaigns(settings, 100)
    yield settings
    stack.stack_down(settings, echo=print)


@pytest.fixture
def topic(base_settings: Settings) -> str:
    """A new three-partition topic per test: tests never see each other's offsets or claims."""
    name = f"clicks_{uuid.uuid4().hex[:10]}"
    admin = AdminClient({"bootstrap.servers": base_settings.kafka_bootstrap_servers})
    admin.create_topics([NewTopic(name, num_partitions=3, replication_factor=1)])[name].result(30)
    return name


@pytest.fixture
def settings(base_settings: Settings, topic: str) -> Settings:
    """Settings of one test: its topic, small ranges (many runs), tails flushed at once; empty warehouse."""
    test_settings = base_settings.model_copy(
        update={"topic": topic, "max_records_per_run": 5_000, "max_batch_wait_seconds": 0.0}
    )
    with clickhouse_session(test_settings.clickhouse_dsn, 60) as client:
        for table in (schemas.ENRICHED_TABLE, schemas.DEAD_LETTER_TABLE, schemas.PARTIALS_TABLE):
            client.command(f"TRUNCATE TABLE IF EXISTS analytics.{table}")
    redis.Redis.from_url(test_settings.redis_url).flushdb()
    return test_settings


@pytest.fixture
def instance() -> Iterator[dg.DagsterInstance]:
    with dg.instance_for_test() as test_instance:
        yield test_instance
