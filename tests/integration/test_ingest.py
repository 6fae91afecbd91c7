"""The ingest job against the real stack: exact ClickHouse content, replays, crashes, the sensor."""

from __future__ import annotations

import subprocess
from datetime import UTC

import dagster as dg
import pytest

from clickhouse_etl import demo_data
from clickhouse_etl.catchup import run_range
from clickhouse_etl.definitions import build_definitions
from clickhouse_etl.jobs import INGEST_JOB_NAME
from clickhouse_etl.ledger import read_ledger
from clickhouse_etl.sensors import build_kafka_sensor
from clickhouse_etl.settings import Settings

from .helpers import (
    CLI,
    cli_env,
    dead_letter_rows,
    direct_stats,
    enriched_rows,
    produce,
    run_catch_up,
    stats_by_window,
    warehouse_snapshot,
)
from .reference import campaigns, expected_outcome, read_topic

pytestmark = pytest.mark.integration


def assert_matches_reference(settings: Settings, policy: str = "keep", any_copy: bool = False) -> None:
    """ClickHouse holds exactly what the independent reference says, row by row.

    The kept copy of a duplicate is the first of its partition, as ranges of a partition run in order;
    `any_copy` allows any one copy, for runs retried after a later range of their partition (see README).
    """
    messages = read_topic(settings.kafka_bootstrap_servers, settings.topic)
    expected = expected_outcome(messages, campaigns(settings.postgres_dsn), settings.filter_cidrs, policy)

    rows = enriched_rows(settings)
    loaded = {row[0]: row for row in rows}
    assert len(loaded) == len(rows), "a click_id was loaded more than once"
    assert loaded.keys() == expected.rows.keys()
    for click_id, row in loaded.items():
        want = expected.rows[click_id]
        got = dict(
            zip(
                ("click_id", "user_id", "ad_id", "campaign_name", "campaign_budget", "ip_address"), row[:6], strict=True
            )
        )
        got["click_time"] = row[6].astimezone(UTC) if row[6].tzinfo else row[6].replace(tzinfo=UTC)
        assert got == want, click_id
        allowed = expected.copies[click_id] if any_copy else expected.allowed_positions[click_id]
        assert (row[8], row[9]) in allowed, (click_id, row[8], row[9])

    dead = {(p, o): raw for p, o, raw, _error, _at in dead_letter_rows(settings)}
    assert dead.keys() == expected.dead_letters.keys()
    for position, raw in dead.items():
        raw_bytes = raw if isinstance(raw, bytes) else raw.encode()
        assert raw_bytes == expected.dead_letters[position]
    assert all(error for *_, error, _at in dead_letter_rows(settings))

    # Promise 5: the pre-aggregated view equals the aggregation over the enriched rows, and the reference.
    assert stats_by_window(settings) == direct_stats(settings) == expected.minute_stats()


def assert_every_offset_accounted(settings: Settings, instance: dg.DagsterInstance, total: int) -> None:
    """Promise 1 per committed run: read = loaded + dead-lettered + duplicates + filtered (+ dropped)."""
    entries = read_ledger(instance, settings.topic)
    runs = instance.get_runs(
        filters=dg.RunsFilter(
            job_name=INGEST_JOB_NAME, statuses=[dg.DagsterRunStatus.SUCCESS], tags={"kafka/topic": settings.topic}
        )
    )
    seen: dict[tuple[int, int, int], dict[str, int]] = {}
    for run in runs:
        key = (int(run.tags["kafka/partition"]), int(run.tags["kafka/start"]), int(run.tags["kafka/end"]))
        seen.setdefault(
            key,
            {
                name.removeprefix("etl/"): int(v)
                for name, v in run.tags.items()
                if name.startswith("etl/") and v.isdigit() and name != "etl/attempt"
            },
        )
    assert sum(end - start for _, start, end in seen) == total
    for (_, start, end), counts in seen.items():
        dropped = counts["unmatched"] if settings.missing_campaign_policy == "drop" else 0
        assert counts["read"] == end - start
        assert (
            counts["read"]
            == counts["loaded"] + counts["dead_lettered"] + counts["duplicates"] + counts["filtered"] + dropped
        )
    for entry in entries.values():
        assert entry.gaps() == [] and entry.overlaps() == []


def test_exact_content_for_every_kind_of_input(settings: Settings, instance: dg.DagsterInstance) -> None:
    produce(settings, 30_000)
    report = run_catch_up(settings, instance)
    assert report.events == 30_000
    assert len(report.ranges) >= 6  # several runs per partition
    # Partitions were shared out between this process and a spawned worker (catch_up_workers=2).
    assert len({instance.get_run_by_id(run_id).tags["etl/pid"] for run_id in report.runs}) == 2
    assert_matches_reference(settings)
    assert_every_offset_accounted(settings, instance, 30_000)
    # Nothing left: a second catch-up finds no range to run.
    assert run_catch_up(settings, instance).ranges == []


def test_rerunning_any_range_changes_nothing(settings: Settings, instance: dg.DagsterInstance) -> None:
    produce(settings, 12_000)
    report = run_catch_up(settings, instance)
    before = warehouse_snapshot(settings)
    job = build_definitions(settings).get_job_def(INGEST_JOB_NAME)
    for offset_range in report.ranges:
        assert run_range(job, instance, offset_range).success
    assert warehouse_snapshot(settings) == before  # processed_at too: nothing was written again
    assert_matches_reference(settings)


@pytest.mark.parametrize(
    ("failpoint", "loaded_before_kill"),
    [
        ("after_read", False),
        ("after_dedup", False),
        ("during_load", False),
        ("after_load", True),
        ("before_commit", True),
        ("after_commit", True),
    ],
)
def test_run_killed_at_a_stage_boundary_is_recovered_exactly_once(
    settings: Settings, instance: dg.DagsterInstance, tmp_path, failpoint: str, loaded_before_kill: bool
) -> None:
    produce(settings, 9_000)
    # The process that runs the job is the one killed: one catch-up process, no workers.
    env = cli_env(settings, str(tmp_path), CLICKHOUSE_ETL_FAILPOINT=failpoint, CLICKHOUSE_ETL_CATCH_UP_WORKERS="1")
    crashed = subprocess.run([*CLI, "catch-up"], env=env, capture_output=True, text=True, timeout=300)
    assert crashed.returncode == -9, crashed.stderr[-2000:]
    with dg.DagsterInstance.from_config(str(tmp_path)) as crashed_instance:
        runs = crashed_instance.get_runs()
        assert len(runs) == 1 and runs[0].status == dg.DagsterRunStatus.STARTED  # died mid-run
    assert (len(enriched_rows(settings)) > 0) == loaded_before_kill

    del env["CLICKHOUSE_ETL_FAILPOINT"]
    recovered = subprocess.run([*CLI, "catch-up"], env=env, capture_output=True, text=True, timeout=300)
    assert recovered.returncode == 0, recovered.stderr[-2000:]
    assert_matches_reference(settings)


def test_replays_after_redis_lost_its_claims_still_duplicate_nothing(
    settings: Settings, instance: dg.DagsterInstance
) -> None:
    import redis

    produce(settings, 9_000)
    report = run_catch_up(settings, instance)
    before = warehouse_snapshot(settings)
    redis.Redis.from_url(settings.redis_url).flushdb()  # every claim gone
    job = build_definitions(settings).get_job_def(INGEST_JOB_NAME)
    for offset_range in report.ranges:
        assert run_range(job, instance, offset_range).success
    # Ranges already present are not written again, whatever the claims say now.
    assert warehouse_snapshot(settings) == before


def test_partitions_added_later_are_picked_up(settings: Settings, instance: dg.DagsterInstance) -> None:
    from confluent_kafka.admin import AdminClient, NewPartitions

    produce(settings, 3_000)
    run_catch_up(settings, instance)
    admin = AdminClient({"bootstrap.servers": settings.kafka_bootstrap_servers})
    admin.create_partitions([NewPartitions(settings.topic, 4)])[settings.topic].result(30)
    demo_data.produce_count(settings, settings.topic, 2_000, partitions=[3], seed=12)
    report = run_catch_up(settings, instance)
    assert {r.partition for r in report.ranges} == {3}
    rows = enriched_rows(settings)
    assert {row[8] for row in rows} == {0, 1, 2, 3}
    assert len({row[0] for row in rows}) == len(rows)


def test_sensor_plans_ranges_and_runs_record_metadata(settings: Settings, instance: dg.DagsterInstance) -> None:
    produce(settings, 12_000, shares=demo_data.EventShares(malformed=0.0))
    defs = build_definitions(settings)
    sensor = build_kafka_sensor(settings)
    context = dg.build_sensor_context(instance=instance, resources={"kafka": defs.resources["kafka"]})
    result = sensor.evaluate_tick(context)
    requests = result.run_requests or []
    assert len(requests) >= 3
    # The tick records the lag of every partition as an observation of the topic's asset (plotted in the UI).
    [observation] = result.asset_events
    assert observation.asset_key == dg.AssetKey(["kafka", settings.topic])
    assert observation.metadata["lag"].value == 12_000
    assert {k for k in observation.metadata if k.startswith("lag_partition_")} == {
        f"lag_partition_{p}" for p in range(3)
    }
    assert {r.tags["kafka/tp"] for r in requests} == {f"{settings.topic}:{p}" for p in range(3)}
    job = defs.get_job_def(INGEST_JOB_NAME)
    for request in requests:
        dg.validate_run_config(job, request.run_config)
        outcome = job.execute_in_process(run_config=request.run_config, tags=request.tags, instance=instance)
        assert outcome.success
        commit_output = outcome.output_for_node("commit")
        assert commit_output["read"] == int(request.tags["kafka/end"]) - int(request.tags["kafka/start"])
        run = instance.get_run_by_id(outcome.run_id)
        assert run is not None and int(run.tags["etl/read"]) == commit_output["read"]
    # Lineage assets got materializations with the counts (the UI plots them).
    materialization = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=dg.AssetKey(["clickhouse", "ad_clicks_enriched"])), limit=1
    ).records[0]
    assert "loaded" in materialization.asset_materialization.metadata
    # Caught up: the next tick with the new cursor requests nothing.
    next_context = dg.build_sensor_context(
        instance=instance, cursor=result.cursor, resources={"kafka": defs.resources["kafka"]}
    )
    assert not sensor.evaluate_tick(next_context).run_requests
    assert_matches_reference(settings)


@pytest.mark.parametrize("policy", ["drop", "dead_letter"])
def test_missing_campaign_policies(settings: Settings, instance: dg.DagsterInstance, policy: str) -> None:
    policy_settings = settings.model_copy(update={"missing_campaign_policy": policy})
    produce(policy_settings, 6_000, shares=demo_data.EventShares(duplicate=0.0, unknown_ad=0.1, malformed=0.01))
    run_catch_up(policy_settings, instance)
    assert_matches_reference(policy_settings, policy)
    assert_every_offset_accounted(policy_settings, instance, 6_000)
