"""Pipeline files: the packaged ones, environment values, and one clear message per problem (nothing connected)."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from clickhouse_etl.core.pipeline.columns import columns_of
from clickhouse_etl.core.pipeline.loading import PipelineError, dump_pipeline, load_pipeline_file, load_pipelines

USAGE = textwrap.dedent(
    """
    name: api_usage
    source:
      topic: usage
      fields:
        event_id: string
        customer_id: string
        endpoint: {type: string, required: false}
        tokens: int64
        ts: timestamp(ms)
    dedup: {key: event_id}
    enrich:
      - name: customers
        table: customers
        join_key: customer_id
        columns: {plan: string}
    sink:
      table: usage_events
    """
)


def write(folder: Path, name: str, text: str) -> Path:
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


def problems_of(spec: str, environment: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(PipelineError) as raised:
        load_pipelines(spec, environment=environment or {})
    return str(raised.value).splitlines()


@pytest.fixture
def folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)  # messages show paths relative to the working folder
    return tmp_path


# --- the packaged pipelines -----------------------------------------------------------------------------------


def test_the_default_is_the_packaged_ad_clicks_pipeline_with_the_contract_table() -> None:
    [loaded] = load_pipelines(environment={})
    pipeline = loaded.pipeline
    assert (pipeline.name, pipeline.topic, pipeline.job_name, pipeline.sensor_name) == (
        "ad_clicks",
        "ad_clicks",
        "ingest_clicks",
        "kafka_offsets_sensor",
    )
    assert [(c.name, c.clickhouse_type()) for c in loaded.columns.sink] == [
        ("click_id", "String"),
        ("user_id", "String"),
        ("ad_id", "Int64"),
        ("campaign_name", "LowCardinality(Nullable(String))"),
        ("campaign_budget", "Nullable(Decimal(14, 2))"),
        ("ip_address", "String"),
        ("click_time", "DateTime64(3, 'UTC')"),
        ("processed_at", "DateTime64(3, 'UTC')"),
        ("kafka_topic", "LowCardinality(String)"),
        ("kafka_partition", "UInt32"),
        ("kafka_offset", "UInt64"),
    ]
    assert pipeline.tables == [
        "ad_clicks_enriched",
        "ad_clicks_dead_letter",
        "campaign_window_partials",
        "campaign_minute_stats",
        "campaign_hour_stats",
    ]
    assert pipeline.consumer_group == "clickhouse-etl"
    assert pipeline.dedup_key_prefix == "ce:dedup"
    assert pipeline.dedup is not None and pipeline.dedup.ttl_seconds == 86_400
    assert pipeline.enrich[0].missing == "keep" and pipeline.enrich[0].fallback == "fail"
    assert pipeline.filter.drop_networks[0].cidrs == ["192.168.1.0/24"]


def test_both_packaged_pipelines_load_together() -> None:
    loaded = load_pipelines("ad_clicks,api_usage", environment={})
    assert [item.pipeline.name for item in loaded] == ["ad_clicks", "api_usage"]
    usage = loaded[1]
    assert usage.pipeline.job_name == "ingest_api_usage"
    assert usage.columns.aggregates[0].aggregate.windows == {
        "minute": "customer_usage_minute",
        "hour": "customer_usage_hour",
        "day": "customer_usage_day",
    }


def test_the_contract_settings_reach_the_ad_clicks_pipeline() -> None:
    environment = {
        "CLICKHOUSE_ETL_TOPIC": "clicks.v2",
        "CLICKHOUSE_ETL_DEDUP_TTL_SECONDS": "3600",
        "CLICKHOUSE_ETL_DEDUP_KEY_PREFIX": "x:claims",
        "CLICKHOUSE_ETL_MISSING_CAMPAIGN_POLICY": "dead_letter",
        "CLICKHOUSE_ETL_CAMPAIGNS_FALLBACK": "last_good",
        "CLICKHOUSE_ETL_FILTER_CIDRS": "10.0.0.0/8, 2001:db8::/32",
        "CLICKHOUSE_ETL_CONSUMER_GROUP": "lag-tools",
        "CLICKHOUSE_ETL_MAX_MESSAGE_BYTES": "1024",
    }
    pipeline = load_pipelines(environment=environment)[0].pipeline
    assert pipeline.topic == "clicks.v2"
    assert pipeline.dedup is not None and pipeline.dedup.ttl_seconds == 3600
    assert pipeline.dedup_key_prefix == "x:claims"
    assert (pipeline.enrich[0].missing, pipeline.enrich[0].fallback) == ("dead_letter", "last_good")
    assert pipeline.filter.drop_networks[0].cidrs == ["10.0.0.0/8", "2001:db8::/32"]
    assert pipeline.consumer_group == "lag-tools"
    assert pipeline.source.max_message_bytes == 1024


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ('["10.0.0.0/8", "2001:db8::/32"]', ["10.0.0.0/8", "2001:db8::/32"]),
        ("[]", []),
        ("", ["192.168.1.0/24"]),  # empty is unset: the file's default
    ],
)
def test_cidr_lists_from_the_environment(value: str, expected: list[str]) -> None:
    pipeline = load_pipelines(environment={"CLICKHOUSE_ETL_FILTER_CIDRS": value})[0].pipeline
    assert pipeline.filter.drop_networks[0].cidrs == expected


@pytest.mark.parametrize(
    ("variable", "value", "path"),
    [
        ("CLICKHOUSE_ETL_DEDUP_TTL_SECONDS", "-1", "dedup.ttl_seconds"),
        ("CLICKHOUSE_ETL_DEDUP_TTL_SECONDS", "a day", "dedup.ttl_seconds"),
        ("CLICKHOUSE_ETL_FILTER_CIDRS", "10.0.0.0/33", "filter.drop_networks[0].cidrs"),
        ("CLICKHOUSE_ETL_FILTER_CIDRS", '["10.0.0.0/8",', "filter.drop_networks[0].cidrs"),
        ("CLICKHOUSE_ETL_MISSING_CAMPAIGN_POLICY", "ignore", "enrich[0].missing"),
        ("CLICKHOUSE_ETL_TOPIC", "bad topic", "source.topic"),
        ("CLICKHOUSE_ETL_MAX_MESSAGE_BYTES", "10", "source.max_message_bytes"),
    ],
)
def test_a_bad_environment_value_names_file_pipeline_field_and_variable(variable: str, value: str, path: str) -> None:
    [problem] = problems_of("ad_clicks", {variable: value})
    assert problem.startswith(f"ad_clicks.yaml (packaged): ad_clicks.{path}: ")
    assert problem.endswith(f"(from {variable})")


# --- one clear message per problem ---------------------------------------------------------------------------


def test_a_join_key_not_in_the_source_names_file_pipeline_path_and_suggests(folder: Path) -> None:
    write(folder, "pipelines/usage.yaml", USAGE.replace("join_key: customer_id", "join_key: cust_id"))
    assert problems_of("pipelines/usage.yaml") == [
        'pipelines/usage.yaml: api_usage.enrich[0].join_key: column "cust_id" not in source fields '
        '(did you mean "customer_id"?)'
    ]


def test_a_misspelt_key_is_refused_with_a_suggestion(folder: Path) -> None:
    write(folder, "usage.yaml", USAGE.replace("dedup: {key: event_id}", "dedup: {key: event_id, tll_seconds: 60}"))
    assert problems_of("usage.yaml") == [
        'usage.yaml: api_usage.dedup.tll_seconds: unknown key (did you mean "ttl_seconds"?)'
    ]


def test_every_problem_of_a_file_is_reported(folder: Path) -> None:
    broken = (
        USAGE.replace("tokens: int64", "tokens: integer")
        .replace("join_key: customer_id", "join_key: customer")
        .replace("table: usage_events", "tabel: usage_events")
    )
    write(folder, "usage.yaml", broken)
    problems = problems_of("usage.yaml")
    assert any(
        p.startswith("usage.yaml: api_usage.source.fields.tokens.type: unknown type 'integer'") for p in problems
    )
    assert 'usage.yaml: api_usage.sink.tabel: unknown key (did you mean "table"?)' in problems
    assert "usage.yaml: api_usage.sink.table: required key missing" in problems


def test_yaml_syntax_errors_give_the_line(folder: Path) -> None:
    write(folder, "bad.yaml", "name: x\nsource: [unclosed\n")
    [problem] = problems_of("bad.yaml")
    assert problem.startswith("bad.yaml: line 3 column 1: not valid YAML")


def test_an_unset_variable_without_default_is_named(folder: Path) -> None:
    write(folder, "usage.yaml", USAGE.replace("topic: usage", "topic: ${USAGE_TOPIC}"))
    assert problems_of("usage.yaml") == [
        "usage.yaml: api_usage.source.topic: environment variable USAGE_TOPIC is not set"
    ]
    loaded = load_pipelines("usage.yaml", environment={"USAGE_TOPIC": "usage.v3"})
    assert loaded[0].pipeline.topic == "usage.v3"


@pytest.mark.parametrize(
    ("change", "path", "message"),
    [
        (("filter", "filter:\n  drop_when:\n    - \"endpont = '/health'\""), "filter.drop_when[0]", 'column "endpont"'),
        (("filter", 'filter:\n  drop_when:\n    - "tokens + 1"'), "filter.drop_when[0]", "not a condition"),
        (("filter", 'filter:\n  drop_when:\n    - "tokens >"'), "filter.drop_when[0]", "not a SQL expression"),
        (
            ("filter", "filter:\n  drop_networks:\n    - {field: endpoint, cidrs: 10.0.0.0/8}"),
            "filter.drop_networks[0].field",
            "not an ip field",
        ),
        (("dedup", "dedup: {key: endpoint}"), "dedup.key", "is not required"),
        (
            ("sink", "sink:\n  table: usage_events\n  columns: [event_id, tokens]"),
            "sink.columns",
            "kafka_topic is needed",
        ),
        (("sink", "sink:\n  table: usage_events\n  order_by: [event_time]"), "sink.order_by", 'column "event_time"'),
        (
            (
                "aggregate",
                "aggregate:\n  - {name: a, time_column: tokens, measures: {n: count}, windows: {minute: a_minute}}",
            ),
            "aggregate[0].time_column",
            "not a timestamp",
        ),
        (
            (
                "aggregate",
                "aggregate:\n  - {name: a, time_column: ts, measures: {s: {sum: endpoint}}, windows: {hour: a_hour}}",
            ),
            "aggregate[0].measures.s",
            "not a number",
        ),
        (
            (
                "aggregate",
                "aggregate:\n  - {name: a, time_column: ts, measures: {n: count}, windows: {minute: usage_events}}",
            ),
            "sink.table",
            "used twice",
        ),
        (("transform", 'transform:\n  slow: "latency > 5"'), "transform.slow", 'column "latency"'),
        (("python", "python: {function: 'no_such_module_anywhere:f'}"), "python.function", "cannot load"),
    ],
)
def test_references_between_sections_are_checked(
    folder: Path, change: tuple[str, str], path: str, message: str
) -> None:
    section_name, section = change
    text = USAGE.replace("sink:\n  table: usage_events\n", "") if section_name == "sink" else USAGE
    write(folder, "usage.yaml", text + section + "\n")
    problems = problems_of("usage.yaml")
    assert any(p.startswith(f"usage.yaml: api_usage.{path}: ") and message in p for p in problems), problems


def test_two_pipelines_may_not_share_a_table_a_job_or_claims(folder: Path) -> None:
    write(folder, "one/usage.yaml", USAGE)
    write(folder, "two/usage.yaml", USAGE.replace("name: api_usage", "name: api_usage_copy"))
    problems = problems_of("one/usage.yaml,two/usage.yaml")
    assert (
        "two/usage.yaml: api_usage_copy.sink.table: ClickHouse table usage_events is also used by pipeline "
        "api_usage (one/usage.yaml)" in problems
    )
    assert any("claims of topic usage under prefix" in p for p in problems) is False  # prefixes differ by name


def test_two_pipelines_may_read_one_topic(folder: Path) -> None:
    write(folder, "p/a.yaml", USAGE)
    write(
        folder, "p/b.yaml", USAGE.replace("name: api_usage", "name: usage_copy").replace("usage_events", "usage_copy")
    )
    loaded = load_pipelines("p", environment={})
    assert {item.pipeline.topic for item in loaded} == {"usage"}
    assert len({item.pipeline.dedup_key_prefix for item in loaded}) == 2


def test_a_file_dumped_loads_back_as_the_same_pipeline(folder: Path) -> None:
    for loaded in load_pipelines("ad_clicks,api_usage", environment={}):
        path = write(folder, f"{loaded.pipeline.name}.yaml", dump_pipeline(loaded.pipeline))
        again = load_pipeline_file(path, environment={})
        assert again.pipeline == loaded.pipeline
        assert columns_of(again.pipeline) == loaded.columns


def test_an_unknown_entry_lists_the_packaged_pipelines(folder: Path) -> None:
    [problem] = problems_of("clicks")
    assert problem == "clicks: no such pipeline file or folder, and not a packaged pipeline (ad_clicks, api_usage)"
