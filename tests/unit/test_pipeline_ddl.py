"""ClickHouse DDL from a pipeline, and the plan for tables that already exist: extend, or refuse with a way out.

The existing tables are described as ClickHouse's system tables describe them, so the comparison is the one
made against a live database (tests/integration/test_pipelines.py does that on chDB).
"""

from __future__ import annotations

import json

import pytest

from clickhouse_etl.core.pipeline.columns import columns_of
from clickhouse_etl.core.pipeline.ddl import (
    COMMENT_KEY,
    ExistingTable,
    SchemaChangeRefused,
    plan_changes,
    schema_statements,
    table_specs,
    view_columns,
)
from clickhouse_etl.core.pipeline.loading import load_pipelines
from clickhouse_etl.core.pipeline.model import Pipeline, SourceField

AD_CLICKS = load_pipelines("ad_clicks", environment={})[0].pipeline
KAFKA_ORDER = "kafka_topic, kafka_partition, kafka_offset"


def existing(pipeline: Pipeline, views: bool = False) -> dict[str, ExistingTable]:
    """The tables exactly as the pipeline would create them (and its views, when asked)."""
    tables = {}
    for spec in table_specs(pipeline, columns_of(pipeline)):
        comment = json.dumps({COMMENT_KEY: spec.comment}) if spec.comment is not None else ""
        columns = {c.name: c.clickhouse_type() for c in spec.columns}
        indexes = frozenset(f"{name}_minmax" for name in spec.indexes)
        tables[spec.name] = ExistingTable(columns, ", ".join(spec.order_by), comment, indexes)
    for aggregate in columns_of(pipeline).aggregates if views else []:
        for window, view in aggregate.aggregate.windows.items():
            tables[view] = ExistingTable(dict.fromkeys(view_columns(aggregate, window), "String"))
    return tables


def with_field(pipeline: Pipeline, name: str, field: SourceField, sink_columns: list[str] | None = None) -> Pipeline:
    source = pipeline.source.model_copy(update={"fields": {**pipeline.source.fields, name: field}})
    sink = pipeline.sink.model_copy(update={"columns": sink_columns}) if sink_columns is not None else pipeline.sink
    return pipeline.model_copy(update={"source": source, "sink": sink})


def statements(pipeline: Pipeline, tables: dict[str, ExistingTable]) -> list[str]:
    return schema_statements(pipeline, columns_of(pipeline), "analytics", 10_000, tables, database_exists=bool(tables))


def test_new_tables_are_created_with_the_contract_schema_and_views() -> None:
    created = statements(AD_CLICKS, {})
    assert created[0] == "CREATE DATABASE IF NOT EXISTS `analytics`"
    sink = next(s for s in created if "`ad_clicks_enriched` (" in s)
    assert "`click_time` DateTime64(3, 'UTC')" in sink
    assert "INDEX click_time_minmax `click_time` TYPE minmax GRANULARITY 1" in sink
    assert "ORDER BY (`kafka_topic`, `kafka_partition`, `kafka_offset`)" in sink
    assert "non_replicated_deduplication_window = 10000" in sink
    minute_view = next(s for s in created if "VIEW `analytics`.`campaign_minute_stats`" in s)
    assert "toUInt64(uniqExactArray(`user_ids`)) AS `unique_users`" in minute_view
    assert "GROUP BY `minute`, `campaign_name`" in minute_view
    hour_view = next(s for s in created if "VIEW `analytics`.`campaign_hour_stats`" in s)
    assert "toStartOfHour(`minute`) AS `hour`" in hour_view


def test_tables_and_views_that_fit_need_no_statement_at_all() -> None:
    # A user allowed only to read and insert can then run the pipeline.
    assert statements(AD_CLICKS, existing(AD_CLICKS, views=True)) == []
    # A missing view is created; a missing index added.
    tables = existing(AD_CLICKS, views=True)
    del tables["campaign_hour_stats"]
    old = tables["ad_clicks_enriched"]
    tables["ad_clicks_enriched"] = ExistingTable(old.columns, old.sorting_key, old.comment)
    changes = statements(AD_CLICKS, tables)
    assert len(changes) == 2
    assert changes[0].startswith(
        "ALTER TABLE `analytics`.`ad_clicks_enriched` ADD INDEX IF NOT EXISTS click_time_minmax"
    )
    assert changes[1].startswith("CREATE OR REPLACE VIEW `analytics`.`campaign_hour_stats`")


def test_a_new_nullable_field_adds_its_column_after_the_one_before_it() -> None:
    columns = [c.name for c in columns_of(AD_CLICKS).sink]
    grown = with_field(
        AD_CLICKS, "user_agent", SourceField(type="string", required=False), [*columns[:6], "user_agent", *columns[6:]]
    )
    changes = statements(grown, existing(AD_CLICKS))
    assert (
        "ALTER TABLE `analytics`.`ad_clicks_enriched` "
        "ADD COLUMN IF NOT EXISTS `user_agent` Nullable(String) AFTER `ip_address`" in changes
    )


def test_a_new_required_field_is_refused_with_the_way_to_migrate() -> None:
    columns = [c.name for c in columns_of(AD_CLICKS).sink]
    grown = with_field(AD_CLICKS, "country", SourceField(type="string"), [*columns, "country"])
    with pytest.raises(SchemaChangeRefused, match=r"column country is new and not nullable.*required: false"):
        statements(grown, existing(AD_CLICKS))


def test_a_type_change_is_refused() -> None:
    tables = existing(AD_CLICKS)
    tables["ad_clicks_enriched"].columns["ad_id"] = "String"
    with pytest.raises(
        SchemaChangeRefused, match="column ad_id is String in ad_clicks_enriched, the pipeline makes it Int64"
    ):
        statements(AD_CLICKS, tables)


def test_a_removed_required_column_is_refused_a_removed_nullable_one_is_not() -> None:
    tables = existing(AD_CLICKS)
    tables["ad_clicks_enriched"].columns["legacy_score"] = "Float64"
    with pytest.raises(SchemaChangeRefused, match=r"column legacy_score .* is no longer produced"):
        statements(AD_CLICKS, tables)
    tables["ad_clicks_enriched"].columns["legacy_score"] = "Nullable(Float64)"
    statements(AD_CLICKS, tables)


def test_another_order_is_refused() -> None:
    sink = AD_CLICKS.sink.model_copy(update={"order_by": ["click_id"]})
    with pytest.raises(SchemaChangeRefused, match=r"is ordered by .*asks for \(click_id\)"):
        statements(AD_CLICKS.model_copy(update={"sink": sink}), existing(AD_CLICKS))


def test_another_dedup_key_is_refused() -> None:
    dedup = AD_CLICKS.dedup.model_copy(update={"key": ["click_id", "user_id"]})  # type: ignore[union-attr]
    with pytest.raises(SchemaChangeRefused, match=r"dedup key of ad_clicks_enriched was \['click_id'\]"):
        statements(AD_CLICKS.model_copy(update={"dedup": dedup}), existing(AD_CLICKS))


def test_a_new_measure_is_refused_for_the_windows_already_loaded() -> None:
    aggregate = AD_CLICKS.aggregate[0]
    measures = {
        **aggregate.measures,
        "last_click": aggregate.measures["clicks"].model_copy(update={"function": "max", "column": "click_time"}),
    }
    grown = AD_CLICKS.model_copy(update={"aggregate": [aggregate.model_copy(update={"measures": measures})]})
    with pytest.raises(SchemaChangeRefused, match=r"campaign_window_partials.*in a new aggregate"):
        statements(grown, existing(AD_CLICKS))


def test_tables_created_before_the_comment_adopt_it() -> None:
    tables = existing(AD_CLICKS)
    old = tables["ad_clicks_enriched"]
    tables["ad_clicks_enriched"] = ExistingTable(old.columns, old.sorting_key, "")
    [spec] = [spec for spec in table_specs(AD_CLICKS, columns_of(AD_CLICKS)) if spec.name == "ad_clicks_enriched"]
    changes = plan_changes("analytics", spec, tables["ad_clicks_enriched"])
    [comment] = [s for s in changes if "MODIFY COMMENT" in s]
    # The dedup key is recorded; the table is not marked: the ranges loaded before have no markers.
    assert "click_id" in comment and "load_markers" not in comment


def test_tables_created_here_are_marked_for_their_loads() -> None:
    created = statements(AD_CLICKS, {})
    assert any(s.startswith("CREATE TABLE IF NOT EXISTS `analytics`.`clickhouse_etl_loads`") for s in created)
    for table in ("ad_clicks_enriched", "ad_clicks_dead_letter", "campaign_window_partials"):
        [create] = [s for s in created if f"`{table}` (" in s]
        assert '\\"load_markers\\": true' in create or '"load_markers": true' in create


def test_every_refusal_of_a_change_is_reported_at_once() -> None:
    tables = existing(AD_CLICKS)
    tables["ad_clicks_enriched"].columns["ad_id"] = "String"
    tables["ad_clicks_dead_letter"].columns["error"] = "Int8"
    with pytest.raises(SchemaChangeRefused) as refused:
        statements(AD_CLICKS, tables)
    assert "ad_clicks_enriched" in str(refused.value) and "ad_clicks_dead_letter" in str(refused.value)
