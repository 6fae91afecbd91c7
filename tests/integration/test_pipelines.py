"""Two pipelines on one stack — ad clicks and API usage — each compared exactly with its independent reference,
through concurrent catch-ups, a run SIGKILLed mid-way, replays of every range and a pipeline sharing a topic;
and pipeline changes meeting tables that already hold rows."""

from __future__ import annotations

import subprocess
import uuid
from datetime import UTC
from pathlib import Path

import dagster as dg
import pytest

from clickhouse_etl.core.pipeline.model import Pipeline, SourceField
from clickhouse_etl.core.settings import Settings
from clickhouse_etl.dev.usage_data import UsageShares
from clickhouse_etl.orchestration import run_records, tags
from clickhouse_etl.tools.catchup import run_range

from . import usage_reference
from .conftest import AD_CLICKS, API_USAGE, configure, new_topic
from .helpers import CLI, cli, cli_env, job_of, produce, query, run_catch_up, warehouse_snapshot
from .test_ingest import assert_matches_reference

pytestmark = pytest.mark.integration

USAGE_MIX = UsageShares(
    duplicate=0.10,
    duplicate_other_partition=0.4,
    health_check=0.05,
    unknown_customer=0.05,
    malformed=0.02,
    late=0.05,
    numeric_string=0.05,
    extra_field=0.05,
)


def assert_usage_matches_reference(settings: Settings, pipeline: Pipeline, any_copy: bool = False) -> None:
    """The usage table, its dead letters and its minute aggregates hold exactly what the reference says."""
    messages = usage_reference.read_topic(settings.kafka_bootstrap_servers, pipeline.topic)
    expected = usage_reference.expected_usage(messages, usage_reference.customers(settings.postgres_dsn))
    table, dead_letters = pipeline.sink.table, pipeline.sink.dead_letters
    rows = query(
        settings,
        f"SELECT event_id, customer_id, plan, region, endpoint, tokens, latency_ms, slow, event_time, "
        f"kafka_partition, kafka_offset FROM analytics.{table} WHERE kafka_topic = {{t:String}}",
        t=pipeline.topic,
    )
    loaded = {row[0]: row for row in rows}
    assert len(loaded) == len(rows), "an event_id was loaded more than once"
    assert loaded.keys() == expected.rows.keys()
    assert not expected.ambiguous  # the demo data re-sends duplicates byte for byte
    names = ("event_id", "customer_id", "plan", "region", "endpoint", "tokens", "latency_ms", "slow", "event_time")
    for event_id, row in loaded.items():
        got = dict(zip(names, row[:9], strict=True))
        got["event_time"] = (
            got["event_time"].replace(tzinfo=UTC) if got["event_time"].tzinfo is None else got["event_time"]
        )
        assert got == expected.rows[event_id], event_id
        allowed = expected.copies[event_id] if any_copy else expected.allowed_positions[event_id]
        assert (row[9], row[10]) in allowed, (event_id, row[9], row[10])
    dead = query(
        settings,
        f"SELECT kafka_partition, kafka_offset, raw_value FROM analytics.{dead_letters} "
        "WHERE kafka_topic = {t:String}",
        t=pipeline.topic,
    )
    assert {(p, o): raw.encode() if isinstance(raw, str) else raw for p, o, raw in dead} == expected.dead_letters
    [aggregate] = pipeline.aggregate
    minute = query(
        settings,
        f"SELECT minute, customer_id, plan, requests, tokens, distinct_endpoints, max_latency_ms "
        f"FROM analytics.{aggregate.windows['minute']}",
    )
    from_view = {(m.replace(tzinfo=UTC), c, p): (n, t, d, lat) for m, c, p, n, t, d, lat in minute}
    assert from_view == expected.minute_usage()


def assert_usage_views_equal_the_table(settings: Settings, pipeline: Pipeline) -> None:
    """Hour and day windows, rolled up from minute partials, equal the aggregation over the table itself."""
    for window, start in (("hour", "toStartOfHour"), ("day", "toStartOfDay")):
        view = pipeline.aggregate[0].windows[window]  # type: ignore[index]
        rolled = query(settings, f"SELECT * FROM analytics.{view} ORDER BY ALL")
        direct = query(
            settings,
            f"SELECT toDateTime({start}(event_time), 'UTC') AS w, customer_id, plan, toUInt64(count()), sum(tokens), "
            f"toUInt64(uniqExact(endpoint)), max(latency_ms) FROM analytics.{pipeline.sink.table} "
            "GROUP BY w, customer_id, plan ORDER BY ALL",
        )
        assert rolled == direct and rolled, window


def test_two_pipelines_at_once_exact_through_a_kill_and_replays(
    base_settings: Settings, tmp_path: Path, instance: dg.DagsterInstance
) -> None:
    clicks = AD_CLICKS.with_topic(new_topic(base_settings, "clicks"))
    usage = API_USAGE.with_topic(new_topic(base_settings, "usage"))
    small = base_settings.model_copy(update={"max_records_per_run": 4_000, "max_batch_wait_seconds": 0.0})
    settings = configure(small, [clicks, usage], tmp_path / "pipelines")
    produce(settings, clicks, 12_000, seed=51)
    produce(settings, usage, 12_000, shares=USAGE_MIX, seed=52)

    # Both pipelines catch up at once, in two processes; the usage one is SIGKILLed in the middle of a run.
    home = str(tmp_path / "dagster")
    one_process = {"CLICKHOUSE_ETL_CATCH_UP_WORKERS": "1"}
    processes = {
        name: subprocess.Popen(
            [*CLI, "catch-up", "--pipeline", name],
            env=cli_env(settings, home, **one_process, **extra),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name, extra in (("ad_clicks", {}), ("api_usage", {"CLICKHOUSE_ETL_FAILPOINT": "after_dedup"}))
    }
    outcomes = {name: (process.wait(600), process.communicate()[1]) for name, process in processes.items()}
    assert outcomes["ad_clicks"][0] == 0, outcomes["ad_clicks"][1][-2000:]
    assert outcomes["api_usage"][0] == -9, outcomes["api_usage"][1][-2000:]
    with dg.DagsterInstance.from_config(home) as recorded:
        [killed] = recorded.get_runs(filters=dg.RunsFilter(job_name=usage.job_name))
        assert killed.status == dg.DagsterRunStatus.STARTED

    # One catch-up of both recovers the killed run's range; more data of both arrives and is caught up.
    recovered = cli(settings, "catch-up", dagster_home=home)
    assert recovered.returncode == 0, recovered.stderr[-2000:]
    assert "ad_clicks caught up: 0 range(s)" in recovered.stdout and "api_usage caught up" in recovered.stdout
    produce(settings, clicks, 6_000, seed=53)
    produce(settings, usage, 6_000, shares=USAGE_MIX, seed=54)
    with dg.DagsterInstance.from_config(home) as recorded:
        earlier = {record.dagster_run.run_id for record in recorded.get_run_records()}
    more = cli(settings, "catch-up", dagster_home=home)
    assert more.returncode == 0, more.stderr[-2000:]
    # On the default two processes: the worker started with the command ran ranges of both pipelines.
    with dg.DagsterInstance.from_config(home) as recorded:
        new_runs = [
            record.dagster_run for record in recorded.get_run_records() if record.dagster_run.run_id not in earlier
        ]
    processes = {
        job: {run.tags[tags.PID] for run in new_runs if run.job_name == job}
        for job in (clicks.job_name, usage.job_name)
    }
    assert len(processes[clicks.job_name] | processes[usage.job_name]) == 2
    assert processes[clicks.job_name] == processes[usage.job_name]

    assert_matches_reference(settings, clicks)
    assert_usage_matches_reference(settings, usage)
    assert_usage_views_equal_the_table(settings, usage)

    # Every committed range of both pipelines run again: nothing changes in either pipeline's tables.
    before = {p.name: warehouse_snapshot(settings, p) for p in (clicks, usage)}
    with dg.DagsterInstance.from_config(home) as recorded:
        for pipeline in (clicks, usage):
            job = job_of(settings, pipeline)
            for entry in run_records.read_ledger(recorded, pipeline.job_name, pipeline.topic).values():
                assert entry.gaps() == [] and entry.overlaps() == [] and not entry.failed
                for offset_range in entry.committed:
                    assert run_range(job, recorded, offset_range).success
    assert {p.name: warehouse_snapshot(settings, p) for p in (clicks, usage)} == before


def test_two_pipelines_reading_one_topic_keep_claims_and_tables_of_their_own(
    base_settings: Settings, tmp_path: Path, instance: dg.DagsterInstance
) -> None:
    topic = new_topic(base_settings, "usage_shared")
    usage = API_USAGE.with_topic(topic)
    # The same file under another name and tables: a second team's view of the same events.
    aggregate = usage.aggregate[0].model_copy(
        update={
            "name": "eu_usage",
            "windows": {"minute": "eu_usage_minute"},
            "partials_table": None,
        }
    )
    sink = usage.sink.model_copy(update={"table": "eu_usage_events"})
    copy = usage.model_copy(update={"name": "eu_usage", "aggregate": [aggregate], "sink": sink})
    settings = configure(base_settings, [usage, copy], tmp_path / "pipelines")
    produce(settings, usage, 6_000, shares=USAGE_MIX, seed=55)
    for pipeline in (usage, copy):
        report = run_catch_up(settings, pipeline, instance)
        assert report.events == 6_000  # each pipeline reads every offset, with ledgers of their own
    # Claims are per pipeline: the second did not find the first's claims and dropped nothing for them.
    assert_usage_matches_reference(settings, usage)
    assert_usage_matches_reference(settings, copy)


def test_a_new_nullable_field_extends_the_table_and_an_incompatible_change_is_refused(
    base_settings: Settings, tmp_path: Path, instance: dg.DagsterInstance
) -> None:
    usage = API_USAGE.with_topic(new_topic(base_settings, "usage_changes"))
    sink = usage.sink.model_copy(update={"table": f"usage_changes_{uuid.uuid4().hex[:8]}"})
    aggregate = usage.aggregate[0].model_copy(
        update={"name": f"{sink.table}_agg", "windows": {"minute": f"{sink.table}_minute"}, "partials_table": None}
    )
    before = usage.model_copy(update={"sink": sink, "aggregate": [aggregate]})
    settings = configure(base_settings, [before], tmp_path / "before")
    produce(settings, before, 3_000, shares=USAGE_MIX, seed=56)
    run_catch_up(settings, before, instance)
    rows_before = query(settings, f"SELECT * FROM analytics.{sink.table} ORDER BY ALL")
    assert rows_before

    # A nullable field is added: the table gains the column, the rows already there are untouched.
    fields = {**before.source.fields, "region_hint": SourceField(type="string", required=False)}
    columns = [c for c in (before.sink.columns or []) if c != "processed_at"]
    grown_sink = sink.model_copy(update={"columns": [*columns[:5], "region_hint", *columns[5:], "processed_at"]})
    grown = before.model_copy(
        update={"source": before.source.model_copy(update={"fields": fields}), "sink": grown_sink}
    )
    grown_settings = configure(settings, [grown], tmp_path / "grown", empty=False)
    described = dict(query(settings, f"SELECT name, type FROM system.columns WHERE table = '{sink.table}'"))
    assert described["region_hint"] == "Nullable(String)"
    unchanged = query(settings, f"SELECT * EXCEPT (region_hint) FROM analytics.{sink.table} ORDER BY ALL")
    assert unchanged == rows_before
    produce(grown_settings, grown, 2_000, shares=USAGE_MIX, seed=57)
    run_catch_up(grown_settings, grown, instance)
    assert query(settings, f"SELECT count() FROM analytics.{sink.table} WHERE region_hint IS NULL")[0][0] > len(
        rows_before
    )

    # A type change is refused, with the way to migrate, and nothing is written.
    fields = {**grown.source.fields, "tokens": SourceField(type="float64")}
    changed = grown.model_copy(update={"source": grown.source.model_copy(update={"fields": fields})})
    changed_settings = grown_settings.model_copy(update={"pipelines": str(tmp_path / "changed.yaml")})
    from clickhouse_etl.core.pipeline.loading import write_pipeline_file

    Path(write_pipeline_file(changed, tmp_path)).rename(tmp_path / "changed.yaml")
    rows_grown = query(settings, f"SELECT * FROM analytics.{sink.table} ORDER BY ALL")
    produce(grown_settings, grown, 500, shares=USAGE_MIX, seed=58)
    refused = cli(changed_settings, "catch-up", dagster_home=str(tmp_path / "home"))
    assert refused.returncode == 1, refused.stdout + refused.stderr
    assert "column tokens is Int64" in refused.stderr and "the pipeline makes it Float64" in refused.stderr
    assert "Migrate it yourself" in refused.stderr and "Traceback" not in refused.stderr
    assert query(settings, f"SELECT * FROM analytics.{sink.table} ORDER BY ALL") == rows_grown
