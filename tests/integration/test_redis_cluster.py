"""Exactly-once with the claims on a real 3-primary Redis Cluster: duplicates across partitions, replays, a
kill -9 of the run, slots moving between nodes while claims flow, and a node killed and restarted mid-way.

The run workers' Celery broker stays on the stack's plain Redis (Celery cannot use a cluster).
"""

from __future__ import annotations

import subprocess
import threading
import time
from collections import Counter
from collections.abc import Iterator

import dagster as dg
import pytest
import redis

from clickhouse_etl.clients import redis_cluster as cluster_client
from clickhouse_etl.clients import redis_resp
from clickhouse_etl.core.pipeline.model import Pipeline
from clickhouse_etl.core.settings import Settings
from clickhouse_etl.dev.redis_cluster import LocalRedisCluster
from clickhouse_etl.tools.catchup import run_range

from .helpers import CLI, cli_env, job_of, produce, run_catch_up, warehouse_snapshot
from .test_ingest import assert_every_offset_accounted, assert_matches_reference

pytestmark = pytest.mark.integration


@pytest.fixture
def cluster_settings(settings: Settings, redis_cluster: LocalRedisCluster) -> Settings:
    """The test's settings with REDIS_URL naming the cluster (Celery keeps the stack's Redis, set explicitly)."""
    return settings.model_copy(update={"redis_url": redis_cluster.url})


@pytest.fixture
def claim_events(monkeypatch: pytest.MonkeyPatch) -> Counter[str]:
    """What the claim client met in this process: error replies by code (MOVED, ASK, CLUSTERDOWN…), and
    `pause` for every backoff while waiting out an outage."""
    seen: Counter[str] = Counter()
    owners_of, pause = cluster_client.owners_of, redis_resp.Patience.pause

    def counting(replies: list) -> tuple:
        owners, errors = owners_of(replies)
        seen.update(redis_resp.error_code(reply) for _, reply in errors)
        return owners, errors

    def counted_pause(patience: redis_resp.Patience, error: Exception) -> None:
        seen["pause"] += 1
        pause(patience, error)

    monkeypatch.setattr(cluster_client, "owners_of", counting)
    monkeypatch.setattr(redis_resp.Patience, "pause", counted_pause)
    return seen


def claims_by_node(cluster: LocalRedisCluster, pipeline: Pipeline) -> dict[int, int]:
    """How many keys each primary holds claims of (the fields of the pipeline's claim hashes)."""
    pattern = f"{pipeline.dedup_key_prefix}:{pipeline.topic}:*"
    counts = {}
    for port in cluster.ports:
        with redis.Redis(host=cluster.host, port=port) as node:
            counts[port] = sum(node.hlen(name) for name in node.scan_iter(match=pattern, count=10_000))
    return counts


def assert_no_failed_run(instance: dg.DagsterInstance) -> None:
    statuses = Counter(run.status for run in instance.get_runs())
    assert set(statuses) == {dg.DagsterRunStatus.SUCCESS}, statuses


def test_exact_content_with_duplicates_across_partitions(
    cluster_settings: Settings, pipeline: Pipeline, instance: dg.DagsterInstance, redis_cluster: LocalRedisCluster
) -> None:
    produce(cluster_settings, pipeline, 12_000)  # 40% of duplicates land on another partition
    report = run_catch_up(cluster_settings, pipeline, instance)
    assert report.events == 12_000 and len(report.ranges) >= 3
    assert_matches_reference(cluster_settings, pipeline)
    assert_every_offset_accounted(pipeline, instance, 12_000)
    by_node = claims_by_node(redis_cluster, pipeline)
    assert all(count > 1_000 for count in by_node.values()), by_node  # spread over the three primaries


def test_replaying_every_range_changes_nothing(
    cluster_settings: Settings, pipeline: Pipeline, instance: dg.DagsterInstance
) -> None:
    produce(cluster_settings, pipeline, 9_000, seed=21)
    report = run_catch_up(cluster_settings, pipeline, instance)
    before = warehouse_snapshot(cluster_settings, pipeline)
    job = job_of(cluster_settings, pipeline)
    for offset_range in report.ranges:
        assert run_range(job, instance, offset_range).success
    assert warehouse_snapshot(cluster_settings, pipeline) == before
    assert_matches_reference(cluster_settings, pipeline)


# Killed once its claims are on the cluster's nodes: the retry must find itself the owner of every key. (The
# kill after the load exercises the load markers, which the single-Redis fault tests cover.)
@pytest.mark.parametrize("failpoint", ["after_dedup"])
def test_run_killed_after_its_claims_is_recovered_exactly_once(
    cluster_settings: Settings, pipeline: Pipeline, tmp_path, failpoint: str
) -> None:
    produce(cluster_settings, pipeline, 6_000, seed=22)
    env = cli_env(
        cluster_settings, str(tmp_path), CLICKHOUSE_ETL_FAILPOINT=failpoint, CLICKHOUSE_ETL_CATCH_UP_WORKERS="1"
    )
    crashed = subprocess.run([*CLI, "catch-up"], env=env, capture_output=True, text=True, timeout=300)
    assert crashed.returncode == -9, crashed.stderr[-2000:]
    del env["CLICKHOUSE_ETL_FAILPOINT"]
    recovered = subprocess.run([*CLI, "catch-up"], env=env, capture_output=True, text=True, timeout=300)
    assert recovered.returncode == 0, recovered.stderr[-2000:]
    assert_matches_reference(cluster_settings, pipeline)


@pytest.fixture
def slots_moving(redis_cluster: LocalRedisCluster) -> Iterator[list[float]]:
    """300 slots move from the first node to the second and back, over and over, until the test is done; the
    times at which each move finished. A move in progress is completed, so no slot is left migrating."""
    done = threading.Event()
    finished: list[float] = []
    first, second = redis_cluster.ports[:2]

    def move() -> None:
        source, target = first, second
        while not done.is_set():
            redis_cluster.move_slots(source, target, 300)
            finished.append(time.monotonic())
            source, target = target, source

    mover = threading.Thread(target=move, daemon=True)
    mover.start()
    yield finished
    done.set()
    mover.join(300)
    check = subprocess.run(
        ["redis-cli", "--cluster", "check", f"{redis_cluster.host}:{first}"], capture_output=True, text=True
    )
    assert check.returncode == 0 and "[OK] All 16384 slots covered" in check.stdout, check.stdout[-2000:]


def test_slots_moving_between_nodes_while_claims_flow(
    cluster_settings: Settings,
    pipeline: Pipeline,
    instance: dg.DagsterInstance,
    slots_moving: list[float],
    claim_events: Counter[str],
) -> None:
    # Small ranges in this process only: many runs, each meeting the slot map as it is at that moment.
    moving = cluster_settings.model_copy(update={"max_records_per_run": 1_000, "catch_up_workers": 1})
    produce(moving, pipeline, 6_000, seed=23)
    started = time.monotonic()
    report = run_catch_up(moving, pipeline, instance)
    ended = time.monotonic()
    assert any(started < moment < ended for moment in slots_moving), "no slot move finished during the catch-up"
    assert claim_events["MOVED"] + claim_events["ASK"] > 0, claim_events
    assert_no_failed_run(instance)
    assert_matches_reference(moving, pipeline)
    before = warehouse_snapshot(moving, pipeline)
    job = job_of(moving, pipeline)
    for offset_range in report.ranges:  # the claims moved with their slots: a replay finds every owner
        assert run_range(job, instance, offset_range).success
    assert warehouse_snapshot(moving, pipeline) == before


def test_a_node_killed_and_restarted_mid_way_costs_a_pause_not_a_run(
    cluster_settings: Settings,
    pipeline: Pipeline,
    instance: dg.DagsterInstance,
    redis_cluster: LocalRedisCluster,
    claim_events: Counter[str],
) -> None:
    small = cluster_settings.model_copy(
        update={"max_records_per_run": 1_000, "catch_up_workers": 1, "claims_wait_seconds": 60}
    )
    produce(small, pipeline, 9_000, seed=24)
    node = redis_cluster.ports[2]

    def bounce() -> None:
        time.sleep(1.5)
        redis_cluster.stop_node(node, kill=True)  # no shutdown: what its append-only file holds is what it has
        time.sleep(2)
        redis_cluster.start_node(node)

    bouncer = threading.Thread(target=bounce, daemon=True)
    bouncer.start()
    run_catch_up(small, pipeline, instance)
    bouncer.join(60)
    redis_cluster.wait_ok()
    assert_no_failed_run(instance)
    assert claim_events["pause"] > 0, claim_events  # the claims met the outage and waited it out
    retries = [
        event
        for run in instance.get_runs()
        for event in instance.all_logs(run.run_id, of_type=dg.DagsterEventType.STEP_UP_FOR_RETRY)
    ]
    assert retries == []  # no step failed
    assert_matches_reference(small, pipeline)
