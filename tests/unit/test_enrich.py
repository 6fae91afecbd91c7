"""Unit tests of clickhouse_etl.steps.enrich."""

from __future__ import annotations

from decimal import Decimal

import polars as pl
import pytest

from clickhouse_etl.steps.enrich import CAMPAIGNS_SCHEMA, enrich_events, snapshot_from_csv

CSV = b'1,Acme Spring Sale #1,1234.50\n2,Globex Black Friday #2,99.99\n3,"Name, with comma",0.01\n'
EVENT_SCHEMA = {
    "click_id": pl.String,
    "user_id": pl.String,
    "ad_id": pl.Int64,
    "timestamp_ms": pl.Int64,
    "ip_address": pl.String,
    "kafka_partition": pl.UInt32,
    "kafka_offset": pl.UInt64,
}


def events(ad_ids: list[int]) -> pl.DataFrame:
    n = len(ad_ids)
    return pl.DataFrame(
        {
            "click_id": [f"c{i}" for i in range(n)],
            "user_id": [f"u{i}" for i in range(n)],
            "ad_id": ad_ids,
            "timestamp_ms": [1_700_000_000_000 + i for i in range(n)],
            "ip_address": ["10.0.0.1"] * n,
            "kafka_partition": [0] * n,
            "kafka_offset": list(range(100, 100 + n)),
        },
        schema=EVENT_SCHEMA,
    )


def test_snapshot_from_csv_parses_rows_with_types():
    snapshot = snapshot_from_csv(CSV)
    assert dict(snapshot.campaigns.schema) == CAMPAIGNS_SCHEMA
    assert snapshot.campaigns.rows() == [
        (1, "Acme Spring Sale #1", Decimal("1234.50")),
        (2, "Globex Black Friday #2", Decimal("99.99")),
        (3, "Name, with comma", Decimal("0.01")),
    ]
    assert snapshot.version.startswith("3-")


def test_empty_csv_gives_an_empty_snapshot():
    snapshot = snapshot_from_csv(b"")
    assert snapshot.campaigns.height == 0
    assert dict(snapshot.campaigns.schema) == CAMPAIGNS_SCHEMA
    assert snapshot.version.startswith("0-")


def test_versions_follow_the_content():
    assert snapshot_from_csv(CSV).version == snapshot_from_csv(bytes(CSV)).version
    assert snapshot_from_csv(b"").version == snapshot_from_csv(b"").version
    changed_budget = CSV.replace(b"99.99", b"99.98")
    changed_name = CSV.replace(b"Acme", b"Acne")
    versions = {
        snapshot_from_csv(c).version for c in (CSV, changed_budget, changed_name, b"", CSV[: CSV.index(b"\n") + 1])
    }
    assert len(versions) == 5


@pytest.fixture
def snapshot():
    return snapshot_from_csv(CSV)


def test_keep_policy_keeps_unmatched_with_null_campaign_fields(snapshot):
    batch = enrich_events(events([2, 77, 1, 3, 88, 2]), snapshot, "keep")
    assert batch.events["click_id"].to_list() == ["c0", "c1", "c2", "c3", "c4", "c5"]
    assert batch.events["kafka_offset"].to_list() == [100, 101, 102, 103, 104, 105]
    assert batch.events["campaign_name"].to_list() == [
        "Globex Black Friday #2",
        None,
        "Acme Spring Sale #1",
        "Name, with comma",
        None,
        "Globex Black Friday #2",
    ]
    assert batch.events["campaign_budget"].to_list() == [
        Decimal("99.99"),
        None,
        Decimal("1234.50"),
        Decimal("0.01"),
        None,
        Decimal("99.99"),
    ]
    assert batch.unmatched["click_id"].to_list() == ["c1", "c4"]
    assert batch.unmatched["ad_id"].to_list() == [77, 88]
    assert set(EVENT_SCHEMA) <= set(batch.events.columns)
    assert batch.events.schema["campaign_budget"] == pl.Decimal(14, 2)


@pytest.mark.parametrize("policy", ["drop", "dead_letter"])
def test_drop_and_dead_letter_remove_unmatched_but_list_them(snapshot, policy):
    batch = enrich_events(events([2, 77, 1, 3, 88, 2]), snapshot, policy)
    assert batch.events["click_id"].to_list() == ["c0", "c2", "c3", "c5"]
    assert batch.events["campaign_name"].null_count() == 0
    assert batch.unmatched["click_id"].to_list() == ["c1", "c4"]
    assert batch.unmatched["kafka_offset"].to_list() == [101, 104]


@pytest.mark.parametrize("policy", ["keep", "drop", "dead_letter"])
def test_everything_unmatched_with_an_empty_snapshot(policy):
    batch = enrich_events(events([1, 2, 3]), snapshot_from_csv(b""), policy)
    assert batch.unmatched["click_id"].to_list() == ["c0", "c1", "c2"]
    assert batch.events.height == (3 if policy == "keep" else 0)


@pytest.mark.parametrize("policy", ["keep", "drop", "dead_letter"])
def test_all_matched_keeps_order_and_count(snapshot, policy):
    ad_ids = [3, 1, 2] * 400
    batch = enrich_events(events(ad_ids), snapshot, policy)
    assert batch.unmatched.height == 0
    assert batch.events["ad_id"].to_list() == ad_ids
    assert batch.events["kafka_offset"].to_list() == list(range(100, 100 + len(ad_ids)))


def test_no_events(snapshot):
    batch = enrich_events(events([]), snapshot, "keep")
    assert batch.events.height == 0
    assert batch.unmatched.height == 0
    assert "campaign_name" in batch.events.columns
