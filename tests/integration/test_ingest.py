"""The ingest job against the real stack: exact ClickHouse content, replays, crashes, the sensor."""

from __future__ import annotations

import subprocess
from datetime import UTC

import dagster as dg
import pytest
from confluent_kafka import TopicPartition

from clickhouse_etl.core.pipeline.model import Pipeline
from clickhouse_etl.core.settings import Settings
from clickhouse_etl.dev.demo_data import EventShares
from clickhouse_etl.orchestration import tags
from clickhouse_etl.orchestration.resources import resources_from_settings
from clickhouse_etl.orchestration.run_records import read_ledger
from clickhouse_etl.orchestration.sensors import build_offsets_sensor
from clickhouse_etl.tools.catchup import kafka_reader, run_range

from .conftest import configure
from .helpers import (
    CLI,
    cli_env,
    dead_letter_rows,
    direct_stats,
    enriched_rows,
    job_of,
    produce,
    run_catch_up,
    stats_by_window,
    warehouse_snapshot,
)
from .reference import campaigns, expected_outcome, read_topic

pytestmark = pytest.mark.integration


def assert_matches_reference(settings: Settings, pipeline: Pipeline, any_copy: bool = False) -> None:
    """ClickHouse holds exactly what the independent reference says, row by row.

    The kept copy of a duplicate is the first of its partition, as ranges of a partition run in order;
    `any_copy` allows any one copy, for runs retried after a later range of their partition (see README).
    """
    messages = read_topic(settings.kafka_bootstrap_servers, pipeline.topic)
    blocked = pipeline.filter.drop_networks[0].cidrs
    expected = expected_outcome(messages, campaigns(settings.postgres_dsn), blocked, pipeline.enrich[0].missing)

    rows = enriched_rows(settings, pipeline)
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

    dead = {(p, o): raw for p, o, raw, _error, _at in dead_letter_rows(settings, pipeline)}
    assert dead.keys() == expected.dead_letters.keys()
    for position, raw in dead.items():
        raw_bytes = raw if isinstance(raw, bytes) else raw.encode()
        assert raw_bytes == expected.dead_letters[position]
    assert all(error for *_, error, _at in dead_letter_rows(settings, pipeline))

    # Promise 5: the pre-aggregated view equals the aggregation over the enriched rows, and the reference.
    assert stats_by_window(settings) == direct_stats(settings) == expected.minute_stats()


def assert_every_offset_accounted(pipeline: Pipeline, instance: dg.DagsterInstance, total: int) -> None:
    """Promise 1 per committed run: read = loaded + dead-lettered + duplicates + filtered + dropped."""
    entries = read_ledger(instance, pipeline.job_name, pipeline.topic)
    runs = instance.get_runs(
        filters=dg.RunsFilter(
            job_name=pipeline.job_name, statuses=[dg.DagsterRunStatus.SUCCESS], tags={tags.TOPIC: pipeline.topic}
        )
    )
    seen: dict[tuple[int, int, int], dict[str, int]] = {}
    for run in runs:
        offset_range = tags.range_of(run.tags)
        assert offset_range is not None
        seen.setdefault((offset_range.partition, offset_range.start, offset_range.end), tags.counts_of(run.tags))
    assert sum(end - start for _, start, end in seen) == total
    for (_, start, end), counts in seen.items():
        assert set(counts) == set(tags.COUNTS)
        if pipeline.enrich[0].missing != "drop":
            assert counts["dropped"] == 0
        assert counts["read"] == end - start
        assert (
            counts["read"]
            == counts["loaded"]
            + counts["dead_lettered"]
            + counts["duplicates"]
            + counts["filtered"]
            + counts["dropped"]
        )
    for entry in entries.values():
        assert entry.gaps() == [] and entry.overlaps() == []


def test_exact_content_for_every_kind_of_input(
    settings: Settings, pipeline: Pipeline, instance: dg.DagsterInstance
) -> None:
    produce(settings, pipeline, 30_000)
    report = run_catch_up(settings, pipeline, instance)
    assert report.events == 30_000
    assert len(report.ranges) >= 6  # several runs per partition
    # Partitions were shared out between this process and a spawned worker (catch_up_workers=2).
    assert len({instance.get_run_by_id(run_id).tags[tags.PID] for run_id in report.runs}) == 2
    assert_matches_reference(settings, pipeline)
    assert_every_offset_accounted(pipeline, instance, 30_000)
    # Lag tools see every offset processed: the consumer group's offsets are the partitions' ends.
    reader = kafka_reader(settings, pipeline)
    ends = {partition: high for partition, (_, high) in reader.watermarks(pipeline.topic).items()}
    with reader.consumer() as consumer:
        group = consumer.committed([TopicPartition(pipeline.topic, partition) for partition in ends], timeout=10)
    assert {position.partition: position.offset for position in group} == ends
    # Nothing left: a second catch-up finds no range to run.
    assert run_catch_up(settings, pipeline, instance).ranges == []


def test_rerunning_any_range_changes_nothing(
    settings: Settings, pipeline: Pipeline, instance: dg.DagsterInstance
) -> None:
    produce(settings, pipeline, 12_000)
    report = run_catch_up(settings, pipeline, instance)
    before = warehouse_snapshot(settings, pipeline)
    job = job_of(settings, pipeline)
    for offset_range in report.ranges:
        assert run_range(job, instance, offset_range).success
    assert warehouse_snapshot(settings, pipeline) == before  # processed_at too: nothing was written again
    assert_matches_reference(settings, pipeline)


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
    settings: Settings, pipeline: Pipeline, tmp_path, failpoint: str, loaded_before_kill: bool
) -> None:
    produce(settings, pipeline, 9_000)
    # The process that runs the job is the one killed: one catch-up process, no workers.
    env = cli_env(settings, str(tmp_path), CLICKHOUSE_ETL_FAILPOINT=failpoint, CLICKHOUSE_ETL_CATCH_UP_WORKERS="1")
    crashed = subprocess.run([*CLI, "catch-up"], env=env, capture_output=True, text=True, timeout=300)
    assert crashed.returncode == -9, crashed.stderr[-2000:]
    with dg.DagsterInstance.from_config(str(tmp_path)) as crashed_instance:
        runs = crashed_instance.get_runs()
        assert len(runs) == 1 and runs[0].status == dg.DagsterRunStatus.STARTED  # died mid-run
    assert (len(enriched_rows(settings, pipeline)) > 0) == loaded_before_kill

    del env["CLICKHOUSE_ETL_FAILPOINT"]
    recovered = subprocess.run([*CLI, "catch-up"], env=env, capture_output=True, text=True, timeout=300)
    assert recovered.returncode == 0, recovered.stderr[-2000:]
    assert_matches_reference(settings, pipeline)


def test_replays_after_redis_lost_its_claims_still_duplicate_nothing(
    settings: Settings, pipeline: Pipeline, instance: dg.DagsterInstance
) -> None:
    import redis

    produce(settings, pipeline, 9_000)
    report = run_catch_up(settings, pipeline, instance)
    before = warehouse_snapshot(settings, pipeline)
    redis.Redis.from_url(settings.redis_url).flushdb()  # every claim gone
    job = job_of(settings, pipeline)
    for offset_range in report.ranges:
        assert run_range(job, instance, offset_range).success
    # Ranges already present are not written again, whatever the claims say now.
    assert warehouse_snapshot(settings, pipeline) == before


def test_partitions_added_later_are_picked_up(
    settings: Settings, pipeline: Pipeline, instance: dg.DagsterInstance
) -> None:
    from confluent_kafka.admin import AdminClient, NewPartitions

    from clickhouse_etl.dev.datasets import dataset_for
    from clickhouse_etl.dev.producing import produce_count

    produce(settings, pipeline, 3_000)
    run_catch_up(settings, pipeline, instance)
    admin = AdminClient({"bootstrap.servers": settings.kafka_bootstrap_servers})
    admin.create_partitions([NewPartitions(pipeline.topic, 4)])[pipeline.topic].result(30)
    produce_count(settings, pipeline.topic, 2_000, dataset_for(pipeline.name).generator(), partitions=[3], seed=12)
    report = run_catch_up(settings, pipeline, instance)
    assert {r.partition for r in report.ranges} == {3}
    rows = enriched_rows(settings, pipeline)
    assert {row[8] for row in rows} == {0, 1, 2, 3}
    assert len({row[0] for row in rows}) == len(rows)


def test_sensor_plans_ranges_and_runs_record_metadata(
    settings: Settings, pipeline: Pipeline, instance: dg.DagsterInstance
) -> None:
    produce(settings, pipeline, 12_000, shares=EventShares(malformed=0.0))
    job = job_of(settings, pipeline)
    sensor = build_offsets_sensor(pipeline, settings, job)
    kafka = resources_from_settings(settings)["kafka"]
    context = dg.build_sensor_context(instance=instance, resources={"kafka": kafka})
    result = sensor.evaluate_tick(context)
    requests = result.run_requests or []
    assert len(requests) >= 3
    # The tick records the lag of every partition as an observation of the topic's asset (plotted in the UI).
    [observation] = result.asset_events
    assert observation.asset_key == dg.AssetKey(["kafka", pipeline.topic])
    assert observation.metadata["lag"].value == 12_000
    assert {k for k in observation.metadata if k.startswith("lag_partition_")} == {
        f"lag_partition_{p}" for p in range(3)
    }
    assert {r.tags[tags.PARTITION_SLOT] for r in requests} == {f"ad_clicks:{pipeline.topic}:{p}" for p in range(3)}
    for request in requests:
        dg.validate_run_config(job, request.run_config)
        outcome = job.execute_in_process(run_config=request.run_config, tags=request.tags, instance=instance)
        assert outcome.success
        commit_output = outcome.output_for_node("commit")
        assert commit_output["read"] == int(request.tags["kafka/end"]) - int(request.tags["kafka/start"])
        run = instance.get_run_by_id(outcome.run_id)
        assert run is not None and int(run.tags["etl/read"]) == commit_output["read"]
        assert run.tags[tags.PIPELINE] == "ad_clicks"
    # Lineage assets got materializations with the counts (the UI plots them).
    materialization = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=dg.AssetKey(["clickhouse", "ad_clicks_enriched"])), limit=1
    ).records[0]
    assert "loaded" in materialization.asset_materialization.metadata
    # Caught up: the next tick with the new cursor requests nothing.
    next_context = dg.build_sensor_context(instance=instance, cursor=result.cursor, resources={"kafka": kafka})
    assert not sensor.evaluate_tick(next_context).run_requests
    assert_matches_reference(settings, pipeline)


@pytest.mark.parametrize("policy", ["drop", "dead_letter"])
def test_missing_campaign_policies(
    settings: Settings, pipeline: Pipeline, instance: dg.DagsterInstance, tmp_path, policy: str
) -> None:
    lookup = pipeline.enrich[0].model_copy(update={"missing": policy})
    policy_pipeline = pipeline.model_copy(update={"enrich": [lookup]})
    policy_settings = configure(settings, [policy_pipeline], tmp_path / "policy")
    produce(policy_settings, policy_pipeline, 6_000, shares=EventShares(duplicate=0.0, unknown_ad=0.1, malformed=0.01))
    run_catch_up(policy_settings, policy_pipeline, instance)
    assert_matches_reference(policy_settings, policy_pipeline)
    assert_every_offset_accounted(policy_pipeline, instance, 6_000)


def test_a_replayed_range_that_loaded_nothing_stays_empty_after_redis_lost_its_claims(
    settings: Settings, pipeline: Pipeline, instance: dg.DagsterInstance
) -> None:
    """Partition 1 holds only re-sends of partition 0's events: its ranges load no row. Once Redis lost every
    claim, a replay of them would claim those ids afresh — their load markers keep them from loading twice."""
    from confluent_kafka import Producer

    from clickhouse_etl.dev.demo_data import generate_events

    events = generate_events(2_000, EventShares(duplicate=0.0, malformed=0.0), [0], seed=61)
    producer = Producer({"bootstrap.servers": settings.kafka_bootstrap_servers})
    for partition in (0, 1):  # partition 0 first: it claims every id
        for value in events["value"].to_list():
            producer.produce(pipeline.topic, value, partition=partition)
        producer.flush(30)
        report = run_catch_up(settings, pipeline, instance)
    loaded = enriched_rows(settings, pipeline)
    assert {row[8] for row in loaded} == {0} and len(loaded) == len({row[0] for row in loaded})
    import redis

    redis.Redis.from_url(settings.redis_url).flushdb()
    job = job_of(settings, pipeline)
    for offset_range in [r for r in report.ranges if r.partition == 1]:
        assert run_range(job, instance, offset_range).success
    assert enriched_rows(settings, pipeline) == loaded
