"""The bench command's correctness (its rates are figures to read, never asserted)."""

from __future__ import annotations

import json

import polars as pl
import pytest
import redis

from clickhouse_etl.clients import claims
from clickhouse_etl.clients.clickhouse import clickhouse_session
from clickhouse_etl.core.pipeline.columns import columns_of
from clickhouse_etl.core.pipeline.model import Pipeline
from clickhouse_etl.core.settings import Settings
from clickhouse_etl.dev.bench import bench_redis_url
from clickhouse_etl.steps.dedup import claim_namespace
from clickhouse_etl.steps.verify import compare_view
from clickhouse_etl.tools.catchup import kafka_reader

from .helpers import cli, query

pytestmark = pytest.mark.integration


def test_bench_checks_counts_and_reports_every_figure(settings: Settings, pipeline: Pipeline) -> None:
    result = cli(
        settings,
        *("bench", "--events", "20000", "--partitions", "2", "--baseline-events", "2000", "--json"),
        *("--prefill-rows", "30000", "--prefill-claims", "50000"),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    assert figures["pipeline"] == "ad_clicks"
    assert figures["events"] == 20_000 and figures["partitions"] == 2
    assert set(figures["stages"]) == {
        "read",
        "decode",
        "dedup",
        "enrich",
        "filter",
        "transform",
        "aggregate",
        "load",
        "commit",
    }
    assert figures["loaded"] > 15_000  # checked against the produced counts before any rate is printed
    assert figures["seconds"] > 0 and figures["events_per_second"] > 0 and figures["peak_rss_bytes"] > 0
    # CPU of the catch-up processes and of Redis (the local stack allows INFO), and the rate per CPU second.
    assert figures["cpu_seconds"]["catch-up"] > 0 and figures["cpu_seconds"]["redis"] > 0
    assert figures["events_per_cpu_second"] > 0
    assert figures["baseline_events"] == 2_000 and figures["baseline_events_per_second"] > 0

    # The raw pass-through read every message of the bench's topic, and its table held what its inserts wrote
    # (the malformed lines of the demo data skipped); the table is gone afterwards.
    raw = figures["pass_through"]
    watermarks = kafka_reader(settings).watermarks(figures["topic"])
    assert raw["messages"] == sum(high - low for low, high in watermarks.values()) == 20_000
    assert raw["rows"] == raw["table_rows"] and 0.99 * raw["messages"] < raw["rows"] < raw["messages"]
    assert raw["inserts"] == 1 and raw["cpu_seconds"] > 0 and raw["peak_rss_bytes"] > 0
    assert figures["ratio_to_pass_through"] == pytest.approx(
        figures["events_per_second"] / raw["messages_per_second"], rel=0.01
    )
    assert query(settings, "SELECT name FROM system.tables WHERE name LIKE 'bench_raw_%'") == []

    # The prefill: the table held its rows before the catch-up, and every aggregate view still equals the
    # aggregation over the table, prefilled windows included.
    assert figures["prefill"]["rows"] == 30_000 and figures["prefill"]["dead_letters"] > 0
    assert figures["store_before"]["rows"] == 30_000
    with clickhouse_session(settings.clickhouse_dsn, 60) as client:
        for aggregate in columns_of(pipeline).aggregates:
            for window in aggregate.aggregate.windows:
                check = compare_view(client, "analytics", pipeline.sink.table, aggregate, window)
                assert check.passed and check.windows_compared > 1_000, check.mismatches[:3]

    # The claims prefill: one TTL old, under the bench topic's namespace, in a bucket of its own (the previous
    # one of every claim call), none of them an event's (the counts above were exact).
    assert figures["claims_prefill"]["claims"] == 50_000
    claim_store = redis.Redis.from_url(bench_redis_url(settings.redis_url))
    namespace = claim_namespace(pipeline.dedup_key_prefix, figures["topic"])
    hashes = claim_store.scan_iter(match=f"{namespace}:*", count=1_000)
    buckets = sorted({int(name.decode().rpartition(":")[2]) for name in hashes})
    assert len(buckets) == 2  # the prefill's, and the catch-up's a TTL later
    [shard] = claims.shards_of(pl.Series(["prefill-0"])).tolist()
    assert claim_store.hget(claims.hash_key(namespace, shard, buckets[0]), "prefill-0") == b"0:0"

    text = cli(
        settings, "bench", "--events", "5000", "--partitions", "1", "--baseline-events", "0", "--no-pass-through"
    )
    assert text.returncode == 0, text.stderr[-3000:]
    assert text.stdout.strip().splitlines()[-1].startswith("end-to-end: ")
    assert "pass-through" not in text.stdout


def test_freshness_runs_the_sensor_and_checks_counts(settings: Settings) -> None:
    result = cli(settings, "freshness", "--seconds", "8", "--rate", "2000", "--warmup", "2", "--json")
    assert result.returncode == 0, result.stderr[-3000:]
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    assert figures["counts_match"] and figures["loaded"] == figures["expected_loaded"] > 10_000
    assert figures["dead_letters"] == figures["expected_dead_letters"]
    assert figures["runs_succeeded"] >= 3 and figures["runs_failed"] == 0  # one partition at least a run each
    latency = figures["latency_seconds"]
    assert latency["events"] > 0 and 0 < latency["p50"] <= latency["p95"] <= latency["max"]
    assert {"daemon", "code server"} <= set(figures["rss_bytes"])
