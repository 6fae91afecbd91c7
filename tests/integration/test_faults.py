"""Dependency outages fail the run closed, offsets do not advance, and a later run loads exactly once."""

from __future__ import annotations

import fcntl
import shutil
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import dagster as dg
import pytest
import redis

from clickhouse_etl.clients import redis_resp
from clickhouse_etl.core.failpoints import FAILPOINT_VARIABLE
from clickhouse_etl.core.pipeline.model import Pipeline
from clickhouse_etl.core.ranges import OffsetRange
from clickhouse_etl.core.settings import Settings
from clickhouse_etl.dev import stack
from clickhouse_etl.orchestration.run_records import read_ledger
from clickhouse_etl.tools.catchup import _first_error, run_range

from .conftest import TEST_PORTS, stack_settings
from .helpers import enriched_rows, job_of, produce, run_catch_up, run_in_background, wait_for_step_event
from .test_ingest import assert_matches_reference

pytestmark = pytest.mark.integration


def first_range(pipeline: Pipeline) -> OffsetRange:
    return OffsetRange(pipeline.topic, 0, 0, 1_000)


def run_once(settings: Settings, pipeline: Pipeline, instance: dg.DagsterInstance) -> dg.ExecuteInProcessResult:
    return run_range(job_of(settings, pipeline), instance, first_range(pipeline))


def assert_nothing_committed(pipeline: Pipeline, instance: dg.DagsterInstance) -> None:
    entry = read_ledger(instance, pipeline.job_name, pipeline.topic).get(0)
    assert entry is None or entry.committed_end is None  # offsets did not advance
    assert entry is not None and first_range(pipeline) in entry.failed  # failed, awaiting retry


@contextmanager
def service_stopped(service: stack.RedisService | stack.PostgresService | stack.KafkaService) -> Iterator[None]:
    """The service is down inside the block and started again after it, whatever happens inside.

    The new pid is recorded, so `stack down` still stops it.
    """
    settings = service.settings
    service.stop(stack.started_pids(settings)[service.name])
    try:
        yield
    finally:
        state = stack.started_pids(settings)
        state[service.name] = service.start()
        stack._write_state(settings, state)


def test_redis_down_fails_closed_and_nothing_is_loaded_without_a_claim(
    settings: Settings, pipeline: Pipeline, instance: dg.DagsterInstance
) -> None:
    produce(settings, pipeline, 3_000, seed=31)
    with service_stopped(stack.RedisService(settings)):
        result = run_once(settings, pipeline, instance)
        assert not result.success
        assert "dedup_events" in _first_error(result) and "Redis" in _first_error(result)
        assert enriched_rows(settings, pipeline) == []
        assert_nothing_committed(pipeline, instance)
    run_catch_up(settings, pipeline, instance)
    assert_matches_reference(settings, pipeline)


def retries_of(result: dg.ExecuteInProcessResult, step_key: str) -> int:
    return len([e for e in result.all_events if e.step_key == step_key and e.event_type_value == "STEP_UP_FOR_RETRY"])


def commit_metadata(result: dg.ExecuteInProcessResult) -> dict[str, object]:
    for event in result.all_events:
        if event.step_key == "commit" and event.event_type_value == "STEP_OUTPUT":
            return {key: value.value for key, value in event.step_output_data.metadata.items()}
    raise AssertionError("the run has no commit output")


def test_redis_stopped_mid_run_retries_with_backoff_and_completes_exactly_once(
    settings: Settings, pipeline: Pipeline, instance: dg.DagsterInstance, monkeypatch: pytest.MonkeyPatch
) -> None:
    produce(settings, pipeline, 3_000, seed=36)
    monkeypatch.setenv(FAILPOINT_VARIABLE, "after_read:sleep=3")  # a window to stop Redis before the claims
    thread, results = run_in_background(settings, pipeline, instance, first_range(pipeline))
    wait_for_step_event(instance, "read", dg.DagsterEventType.STEP_START)
    with service_stopped(stack.RedisService(settings)):
        wait_for_step_event(instance, "dedup_events", dg.DagsterEventType.STEP_UP_FOR_RETRY)
        assert enriched_rows(settings, pipeline) == []  # nothing loaded without a claim
    thread.join(120)
    [result] = results
    assert result.success  # a later attempt of the step found Redis back
    assert retries_of(result, "dedup_events") >= 1
    monkeypatch.delenv(FAILPOINT_VARIABLE)
    run_catch_up(settings, pipeline, instance)
    assert_matches_reference(settings, pipeline)


def test_kafka_broker_restarted_mid_read_completes_exactly_once(
    settings: Settings, pipeline: Pipeline, instance: dg.DagsterInstance, monkeypatch: pytest.MonkeyPatch
) -> None:
    produce(settings, pipeline, 3_000, seed=38)
    monkeypatch.setenv(FAILPOINT_VARIABLE, "before_read:sleep=2")  # the broker goes away inside the read step
    thread, results = run_in_background(settings, pipeline, instance, OffsetRange(pipeline.topic, 0, 0, 500))
    wait_for_step_event(instance, "read", dg.DagsterEventType.STEP_START)
    with service_stopped(stack.KafkaService(settings)):
        time.sleep(3)  # the read meets a broker that is gone
    thread.join(180)
    [result] = results
    assert result.success, result.all_events[-1]
    monkeypatch.delenv(FAILPOINT_VARIABLE)
    run_catch_up(settings, pipeline, instance)
    assert_matches_reference(settings, pipeline)


def test_postgres_down_with_the_last_good_snapshot_enriches_from_it_and_says_so(
    settings: Settings, pipeline: Pipeline, instance: dg.DagsterInstance, tmp_path
) -> None:
    produce(settings, pipeline, 3_000, seed=37)
    fallback = settings.model_copy(update={"data_dir": tmp_path})
    fallback_pipeline = pipeline.model_copy(
        update={"enrich": [pipeline.enrich[0].model_copy(update={"fallback": "last_good"})]}
    )
    job = job_of(fallback, fallback_pipeline)
    postgres = stack.PostgresService(settings)

    with service_stopped(postgres):  # no snapshot was read yet: nothing can stand in
        nothing_saved = run_range(job, instance, OffsetRange(pipeline.topic, 0, 0, 300))
        assert not nothing_saved.success
        assert "no last good snapshot was saved" in _first_error(nothing_saved)

    from_postgres = run_range(job, instance, OffsetRange(pipeline.topic, 1, 0, 300))
    assert from_postgres.success and commit_metadata(from_postgres)["snapshot_source"] == "postgres"
    assert (tmp_path / "snapshots" / "ad_clicks" / "campaigns.csv").exists()

    with service_stopped(postgres):
        from_saved = run_range(job, instance, OffsetRange(pipeline.topic, 1, 300, 600))
    assert from_saved.success
    metadata = commit_metadata(from_saved)
    assert str(metadata["snapshot_source"]).startswith("last good snapshot saved")
    assert metadata["snapshot_version"] == commit_metadata(from_postgres)["snapshot_version"]
    assert retries_of(from_saved, "enrich_events") == 0  # the saved snapshot stands in at once

    run_catch_up(settings, pipeline, instance)  # the failed range is run again
    assert_matches_reference(settings, pipeline)


def test_postgres_down_fails_the_run_clearly(
    settings: Settings, pipeline: Pipeline, instance: dg.DagsterInstance
) -> None:
    produce(settings, pipeline, 3_000, seed=32)
    with service_stopped(stack.PostgresService(settings)):
        result = run_once(settings, pipeline, instance)
        assert not result.success
        assert "enrich_events" in _first_error(result)
        assert enriched_rows(settings, pipeline) == []
        assert_nothing_committed(pipeline, instance)
    run_catch_up(settings, pipeline, instance)
    assert_matches_reference(settings, pipeline)


def test_embedded_clickhouse_held_elsewhere_retries_then_fails_without_advancing(
    settings: Settings, pipeline: Pipeline, instance: dg.DagsterInstance
) -> None:
    produce(settings, pipeline, 3_000, seed=33)
    waiting = settings.model_copy(update={"clickhouse_lock_timeout_seconds": 1.0})
    lock_path = settings.chdb_path.with_name(settings.chdb_path.name + ".lock")
    with open(lock_path, "a+") as holder:
        fcntl.flock(holder.fileno(), fcntl.LOCK_EX)  # another "process" holds the store
        result = run_once(waiting, pipeline, instance)
        fcntl.flock(holder.fileno(), fcntl.LOCK_UN)
    assert not result.success
    assert "load" in _first_error(result) and "stayed held by another process" in _first_error(result)
    load_attempts = [e for e in result.all_events if e.step_key == "load" and e.event_type_value == "STEP_UP_FOR_RETRY"]
    assert len(load_attempts) == 3  # retried with backoff before failing
    assert_nothing_committed(pipeline, instance)
    run_catch_up(settings, pipeline, instance)  # the claims of the failed run are its own: nothing lost, nothing twice
    assert_matches_reference(settings, pipeline)


def test_clickhouse_server_refusing_connections_fails_the_run(
    settings: Settings, pipeline: Pipeline, instance: dg.DagsterInstance
) -> None:
    produce(settings, pipeline, 4_000, seed=34)
    refusing = settings.model_copy(
        update={"clickhouse_dsn": "http://127.0.0.1:1", "clickhouse_lock_timeout_seconds": 1.0}
    )
    result = run_once(refusing, pipeline, instance)
    assert not result.success
    assert "load" in _first_error(result) and "unavailable" in _first_error(result)
    assert_nothing_committed(pipeline, instance)


def test_kafka_offsets_gone_are_a_clear_gap(
    settings: Settings, pipeline: Pipeline, instance: dg.DagsterInstance
) -> None:
    from confluent_kafka import TopicPartition
    from confluent_kafka.admin import AdminClient

    produce(settings, pipeline, 3_000, seed=35)
    admin = AdminClient({"bootstrap.servers": settings.kafka_bootstrap_servers})
    # Retention in miniature: delete the records before offset 500 of partition 0.
    deleted = admin.delete_records([TopicPartition(pipeline.topic, 0, 500)])
    for future in deleted.values():
        future.result(30)
    result = run_once(settings, pipeline, instance)  # [0, 1000) starts below the new low watermark
    assert not result.success
    assert "no longer exist" in _first_error(result) and "low watermark 500" in _first_error(result)
    assert not [e for e in result.all_events if e.event_type_value == "STEP_UP_FOR_RETRY"]  # retrying cannot help
    assert_nothing_committed(pipeline, instance)


def fill_redis(client: redis.Redis, keys: int) -> None:
    """`keys` small filler keys in the client's database, in bulk (MSET of 10,000 at a time), then compacted
    into the RDB base of the append-only file: a restart reads them as it reads many claims, answering
    LOADING meanwhile (Redis serves clients every 2 MB of RDB, but only every 1,024 commands of AOF)."""
    pipe = client.pipeline(transaction=False)
    for first in range(0, keys, 10_000):
        pipe.mset({f"filler:{i}": b"0:0" for i in range(first, min(keys, first + 10_000))})
    pipe.execute()
    rewrite_append_only_file(client)


def rewrite_append_only_file(client: redis.Redis) -> None:
    deadline = time.monotonic() + 60
    while client.info("persistence")["aof_rewrite_in_progress"] and time.monotonic() < deadline:
        time.sleep(0.1)  # an automatic rewrite runs already: the one asked for below would be refused
    client.bgrewriteaof()
    while time.monotonic() < deadline:
        persistence = client.info("persistence")
        if not persistence["aof_rewrite_in_progress"] and not persistence["aof_rewrite_scheduled"]:
            return
        time.sleep(0.1)
    raise AssertionError("the append-only file was not rewritten within 60 s")


def test_redis_restarted_during_a_catch_up_costs_a_pause_not_a_failed_run(
    settings: Settings,
    pipeline: Pipeline,
    instance: dg.DagsterInstance,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    """Redis stops while claims flow and comes back with enough data to answer LOADING for a while (about
    2 s here): the claims wait it out (CLICKHOUSE_ETL_CLAIMS_WAIT_SECONDS), no step fails, nothing twice."""
    service = stack.RedisService(settings)
    filler = redis.Redis.from_url(settings.redis_url, db=3)
    fill_redis(filler, 1_500_000)
    met: list[str] = []
    waiting = threading.Event()
    pause = redis_resp.Patience.pause

    def recorded_pause(patience: redis_resp.Patience, error: Exception) -> None:
        met.append(str(error))
        waiting.set()
        pause(patience, error)

    monkeypatch.setattr(redis_resp.Patience, "pause", recorded_pause)
    # While Redis is being stopped, runs wait after their read: the catch-up cannot finish its claims before
    # Redis is down, however fast it runs.
    hold = tmp_path / "failpoint"
    monkeypatch.setenv(FAILPOINT_VARIABLE, f"@{hold}")
    # In this process, with claims that wait out the restart (the tests' settings wait 2 s).
    small = settings.model_copy(update={"max_records_per_run": 1_000, "catch_up_workers": 1, "claims_wait_seconds": 60})
    produce(small, pipeline, 6_000, seed=39)
    outcome: list[BaseException | None] = []
    try:
        catching_up = threading.Thread(target=lambda: outcome.append(_caught_up(small, pipeline, instance)))
        catching_up.start()
        wait_for_step_event(instance, "dedup_events", dg.DagsterEventType.STEP_SUCCESS)  # claims flow
        hold.write_text("after_read:sleep=2")
        with service_stopped(service):
            hold.write_text("")
            assert waiting.wait(60), "no claim met the stopped Redis"
            time.sleep(0.3)  # a claim is backing off, not yet by 2 s, when Redis starts loading
        catching_up.join(300)
        assert outcome == [None]
        assert any("refused" in error.lower() for error in met) and any("LOADING" in error for error in met), met
        assert "DB loaded from" in service.log_path.read_text().split("Server initialized")[-1]
        assert {run.status for run in instance.get_runs()} == {dg.DagsterRunStatus.SUCCESS}
        assert not [
            event
            for run in instance.get_runs()
            for event in instance.all_logs(run.run_id, of_type=dg.DagsterEventType.STEP_UP_FOR_RETRY)
        ]
        assert_matches_reference(settings, pipeline)
    finally:
        filler.flushdb()
        rewrite_append_only_file(filler)  # later restarts of the stack's Redis need not read the filler again


def _caught_up(settings: Settings, pipeline: Pipeline, instance: dg.DagsterInstance) -> BaseException | None:
    try:
        run_catch_up(settings, pipeline, instance)
    except BaseException as error:  # surfaced by the test thread
        return error
    return None


def test_stack_waits_for_a_redis_loading_its_dataset_and_records_it_meanwhile(stack_dir: Path) -> None:
    """`stack up` after a restart: Redis answers LOADING for a while; its pid is recorded before the wait ends
    (so `stack down` stops it whatever happens), and up waits until it answers."""
    ports = {**TEST_PORTS, "redis": TEST_PORTS["redis"] + 200}
    settings = stack_settings(stack_dir.with_name(stack_dir.name + "-redis-loading"), ports)
    service = stack.RedisService(settings)
    stack.stack_down(settings, echo=lambda _: None)  # what an earlier session may have left
    shutil.rmtree(service.home, ignore_errors=True)
    first = service.start()
    try:
        fill_redis(redis.Redis.from_url(settings.redis_url), 1_500_000)
        service.stop(first)
        seen: list[tuple[str, int | None]] = []
        said: list[str] = []
        starting = threading.Thread(target=lambda: said.append(str(service.start(echo=said.append))))
        starting.start()
        while starting.is_alive():
            seen.append((service.state().describe(), stack.started_pids(settings).get("redis")))
            time.sleep(0.1)
        starting.join()
        pid = int(said[-1])
        loading = [(detail, recorded) for detail, recorded in seen if detail.startswith("loading its dataset")]
        assert loading, seen
        assert all(recorded == pid for _, recorded in loading)  # recorded while it was still loading
        assert service.answers() and redis.Redis.from_url(settings.redis_url).dbsize() == 1_500_000
    finally:
        stack.stack_down(settings, echo=lambda _: None)
        shutil.rmtree(service.home, ignore_errors=True)
    assert not service.answers() and stack.started_pids(settings) == {}
