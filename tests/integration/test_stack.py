"""The local stack from nothing: every service answers, `up` is idempotent, `down` stops only its own."""

from __future__ import annotations

import socket
import subprocess
import time
import uuid
from pathlib import Path

import psycopg
import pytest
import redis
from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from clickhouse_etl.clients.clickhouse import clickhouse_session
from clickhouse_etl.core.processes import process_alive
from clickhouse_etl.core.settings import Settings
from clickhouse_etl.dev import stack

from .conftest import fresh_stack, stack_settings

pytestmark = pytest.mark.integration


def port_open(port: int) -> bool:
    with socket.socket() as probe:
        probe.settimeout(0.5)
        return probe.connect_ex(("127.0.0.1", port)) == 0


def test_every_service_answers(base_settings: Settings) -> None:
    statuses = {status.name: status for status in stack.stack_status(base_settings)}
    assert set(statuses) == {"kafka", "postgres", "redis", "clickhouse"}
    assert all(status.answers for status in statuses.values()), statuses

    # Kafka: a produce/consume round trip on a new topic (auto-creation is off, so create it).
    topic = f"roundtrip_{uuid.uuid4().hex[:8]}"
    admin = AdminClient({"bootstrap.servers": base_settings.kafka_bootstrap_servers})
    admin.create_topics([NewTopic(topic, num_partitions=1, replication_factor=1)])[topic].result(30)
    producer = Producer({"bootstrap.servers": base_settings.kafka_bootstrap_servers})
    producer.produce(topic, b"hello", partition=0)
    assert producer.flush(30) == 0
    consumer = Consumer({"bootstrap.servers": base_settings.kafka_bootstrap_servers, "group.id": "roundtrip"})
    consumer.assign([TopicPartition(topic, 0, 0)])
    message = consumer.poll(15)
    consumer.close()
    assert message is not None and message.error() is None and message.value() == b"hello"

    # Auto topic creation is off: producing to an unknown topic does not create it.
    assert "no_such_topic" not in admin.list_topics(timeout=10).topics

    client = redis.Redis.from_url(base_settings.redis_url)
    client.set("stack-test", "1", ex=10)
    assert client.get("stack-test") == b"1"

    with psycopg.connect(base_settings.postgres_dsn) as connection:
        assert connection.execute("SELECT count(*) FROM campaigns").fetchone()[0] == 100
        assert connection.execute("SELECT current_database()").fetchone()[0] == "clickhouse_etl"

    with clickhouse_session(base_settings.clickhouse_dsn, 60) as ch:
        ch.command("CREATE TABLE IF NOT EXISTS default.stack_test (n UInt32) ENGINE = MergeTree ORDER BY n")
        ch.command("TRUNCATE TABLE default.stack_test")
        ch.insert("default.stack_test", [[1], [2], [3]], column_names=["n"])
        assert ch.query("SELECT sum(n) FROM default.stack_test").result_rows == [(6,)]
        tables = {row[0] for row in ch.query("SHOW TABLES FROM analytics").result_rows}
    assert {"ad_clicks_enriched", "ad_clicks_dead_letter", "campaign_minute_stats"} <= tables


def test_stack_up_twice_is_harmless(base_settings: Settings) -> None:
    pids_before = stack.started_pids(base_settings)
    lines: list[str] = []
    stack.stack_up(base_settings, echo=lines.append)
    assert stack.started_pids(base_settings) == pids_before
    assert sum("already answering" in line for line in lines) == 3
    assert all(status.answers for status in stack.stack_status(base_settings))


def test_stack_up_creates_a_database_the_running_server_lacks(base_settings: Settings) -> None:
    database = f"clickhouse_etl_{uuid.uuid4().hex[:8]}"
    other = base_settings.model_copy(
        update={"postgres_dsn": base_settings.postgres_dsn.rsplit("/", 1)[0] + f"/{database}"}
    )
    [before] = [status for status in stack.stack_status(other) if status.name == "postgres"]
    assert before.answers and before.detail == f"database {database} missing (`stack up` creates it)"

    lines: list[str] = []
    stack.stack_up(other, echo=lines.append)

    [after] = [status for status in stack.stack_status(other) if status.name == "postgres"]
    assert after.answers and after.detail == "started by stack up"
    with psycopg.connect(other.postgres_dsn) as connection:
        assert connection.execute("SELECT current_database()").fetchone()[0] == database


def test_down_stops_what_up_started_and_nothing_else(stack_dir: Path) -> None:
    ports = {"kafka": 29092, "redis": 26379, "postgres": 25432}
    data_dir = stack_dir.with_name(stack_dir.name + "-down")  # PostgreSQL's user must reach it: not tmp_path
    settings = fresh_stack(data_dir, ports)
    started = stack.started_pids(settings)
    # A Redis the stack did not start, in the same data folder: `down` must leave it alone.
    foreign = subprocess.Popen(
        ["redis-server", "--port", "26380", "--bind", "127.0.0.1", "--save", ""],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        assert set(started) == {"kafka", "postgres", "redis"}
        deadline = time.monotonic() + 10
        while not port_open(26380) and time.monotonic() < deadline:
            time.sleep(0.1)
        stack.stack_down(settings, echo=print)
        for pid in started.values():
            assert not process_alive(pid)
        for port in (*ports.values(), ports["kafka"] + 1):
            assert not port_open(port), port
        assert port_open(26380) and foreign.poll() is None
        assert stack.started_pids(settings) == {}
        assert not any(status.answers for status in stack.stack_status(settings) if status.name != "clickhouse")
    finally:
        foreign.terminate()
        foreign.wait(10)
        stack.stack_down(settings, echo=print)


def test_a_service_that_cannot_start_is_named_with_its_log(tmp_path: Path) -> None:
    # Something that is not Redis holds the Redis port: redis-server cannot bind and `up` must say so.
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        settings = stack_settings(tmp_path / "broken", {"kafka": 39092, "redis": port, "postgres": 35432})
        service = stack.RedisService(settings)
        with pytest.raises(stack.StackError) as failure:
            service.start()
    message = str(failure.value)
    assert "redis did not start" in message and str(port) in message
    assert "redis.log" in message
