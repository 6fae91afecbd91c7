"""The clickhouse-etl command line against the real stack: produce, catch-up, query, bad settings."""

from __future__ import annotations

import json
import re

import dagster as dg
import pytest

from clickhouse_etl.core.pipeline.model import Pipeline
from clickhouse_etl.core.settings import Settings
from clickhouse_etl.orchestration import tags

from .helpers import cli

pytestmark = pytest.mark.integration


def test_produce_catch_up_and_query(settings: Settings, pipeline: Pipeline, tmp_path) -> None:
    produced = cli(settings, "produce", "--count", "20000", "--seed", "3")
    assert produced.returncode == 0, produced.stderr
    assert re.search(r"produced 20000 events to topic \S+ in [\d.]+ s \([\d,]+ events/s\)", produced.stdout)
    assert "duplicate: 1000" in produced.stdout  # the default 5 % share, exactly

    caught_up = cli(settings, "catch-up", dagster_home=str(tmp_path))
    assert caught_up.returncode == 0, caught_up.stderr[-3000:]
    assert re.search(r"ad_clicks caught up: \d+ range\(s\), 20000 offsets", caught_up.stdout)
    assert re.search(r"; peak RSS [1-9][\d,]* MiB \(the largest of its processes\)", caught_up.stdout)
    # Three partitions on the default two processes: the catch-up's worker process ran some of them.
    with dg.DagsterInstance.from_config(str(tmp_path)) as instance:
        processes = {record.dagster_run.tags[tags.PID] for record in instance.get_run_records()}
    assert len(processes) == 2

    counted = cli(
        settings,
        "query",
        f"SELECT count() AS n FROM analytics.ad_clicks_enriched WHERE kafka_topic = '{pipeline.topic}'",
    )
    assert counted.returncode == 0, counted.stderr
    lines = counted.stdout.splitlines()
    assert lines[0].strip() == "n" and int(lines[2]) > 15_000 and lines[-1] == "(1 row)"

    # Read-only unless asked: a write is refused by ClickHouse itself.
    refused = cli(settings, "query", "TRUNCATE TABLE analytics.ad_clicks_enriched")
    assert refused.returncode == 1 and "readonly" in refused.stderr.lower()
    assert refused.stderr.startswith("clickhouse-etl query:") and "Traceback" not in refused.stderr

    # Nothing left; with --json, stdout is one JSON object per pipeline and nothing else.
    again = cli(settings, "catch-up", "--json", dagster_home=str(tmp_path))
    assert again.returncode == 0, again.stderr[-3000:]
    [line] = again.stdout.splitlines()
    figures = json.loads(line)
    assert figures["pipeline"] == "ad_clicks" and figures["ranges"] == figures["events"] == 0
    assert figures["runs"] == [] and figures["peak_rss_bytes"] > 0

    status = cli(settings, "status", "--runs", "3", dagster_home=str(tmp_path))
    assert status.returncode == 0, status.stderr[-3000:]
    assert "sensor kafka_offsets_sensor: RUNNING" in status.stdout  # no daemon here: its default in code
    runs = [line for line in status.stdout.splitlines() if line.strip().startswith("SUCCESS")]
    assert len(runs) == 3 and all(pipeline.topic in line for line in runs)
    assert "lag: 0 offsets in total" in status.stdout


@pytest.mark.parametrize(
    ("variable", "value", "named"),
    [
        ("CLICKHOUSE_ETL_DEDUP_TTL_SECONDS", "-5", "ad_clicks.dedup.ttl_seconds"),
        ("CLICKHOUSE_ETL_FILTER_CIDRS", "10.0.0.0/33", "ad_clicks.filter.drop_networks[0].cidrs"),
        ("REDIS_URL", "http://127.0.0.1:1", "REDIS_URL"),
        ("CLICKHOUSE_ETL_MISSING_CAMPAIGN_POLICY", "ignore", "ad_clicks.enrich[0].missing"),
    ],
)
def test_bad_settings_fail_fast_naming_the_setting(settings: Settings, variable: str, value: str, named: str) -> None:
    # The packaged file reads the contract's variables; the test's own file holds resolved values.
    packaged = settings.model_copy(update={"pipelines": "ad_clicks"})
    result = cli(packaged, "catch-up", extra_env={variable: value})
    assert result.returncode == 2
    assert named in result.stderr and variable in result.stderr and "Traceback" not in result.stderr
