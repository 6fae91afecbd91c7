"""Unit tests of clickhouse_etl.steps.enrich: snapshots typed as the pipeline declares, and the joins' policies."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal

import polars as pl
import pytest

from clickhouse_etl.clients.postgres import snapshot_query
from clickhouse_etl.core.pipeline.loading import load_pipelines
from clickhouse_etl.core.pipeline.model import Lookup
from clickhouse_etl.core.pipeline.types import FieldType
from clickhouse_etl.steps.enrich import Snapshot, SnapshotError, enrich_events, snapshot_from_csv, unmatched_reason

AD_CLICKS = load_pipelines("ad_clicks", environment={})[0].pipeline
CAMPAIGNS = AD_CLICKS.enrich[0]
KEY_TYPES = {"ad_id": AD_CLICKS.source.fields["ad_id"].field_type}
CAMPAIGNS_SCHEMA = {"ad_id": pl.Int64, "campaign_name": pl.String, "campaign_budget": pl.Decimal(14, 2)}

CSV = b'1,Acme Spring Sale #1,1234.50\n2,Globex Black Friday #2,99.99\n3,"Name, with comma",0.01\n'
EVENT_SCHEMA = {
    "click_id": pl.String,
    "user_id": pl.String,
    "ad_id": pl.Int64,
    "timestamp_ms": pl.Datetime("ms", "UTC"),
    "ip_address": pl.String,
    "kafka_partition": pl.UInt32,
    "kafka_offset": pl.UInt64,
}
T0 = datetime(2023, 11, 14, 22, 13, 20, tzinfo=UTC)


def events(ad_ids: list[int]) -> pl.DataFrame:
    """Decoded ad_clicks events with the given ad ids, at offsets 100, 101, …"""
    n = len(ad_ids)
    return pl.DataFrame(
        {
            "click_id": [f"c{i}" for i in range(n)],
            "user_id": [f"u{i}" for i in range(n)],
            "ad_id": ad_ids,
            "timestamp_ms": [T0] * n,
            "ip_address": ["10.0.0.1"] * n,
            "kafka_partition": [0] * n,
            "kafka_offset": list(range(100, 100 + n)),
        },
        schema=EVENT_SCHEMA,
    )


def campaigns_snapshot(csv: bytes, source: str = "postgres") -> Snapshot:
    return snapshot_from_csv(csv, CAMPAIGNS, KEY_TYPES, source)


def with_policy(policy: str) -> Lookup:
    return CAMPAIGNS.model_copy(update={"missing": policy})


def lookup(**spec: object) -> Lookup:
    """A lookup of table `t` from its pipeline-file keys."""
    return Lookup.model_validate({"name": "things", "table": "t", **spec})


# --- snapshots ---------------------------------------------------------------------------------------------------


def test_the_campaigns_lookup_is_the_one_the_tests_assume() -> None:
    """The packaged ad_clicks pipeline joins campaigns by ad_id for their name and budget."""
    assert CAMPAIGNS.name == "campaigns"
    assert CAMPAIGNS.join_key == ["ad_id"]
    assert list(CAMPAIGNS.columns) == ["campaign_name", "campaign_budget"]
    assert CAMPAIGNS.missing == "keep"
    assert list(KEY_TYPES) == ["ad_id"]
    assert KEY_TYPES["ad_id"] == FieldType("int64")


def test_snapshot_from_csv_parses_rows_with_types() -> None:
    """Rows come typed as declared (key int64, name string, budget decimal(14,2)); quoted commas survive."""
    snapshot = campaigns_snapshot(CSV)
    assert dict(snapshot.rows.schema) == CAMPAIGNS_SCHEMA
    assert snapshot.rows.rows() == [
        (1, "Acme Spring Sale #1", Decimal("1234.50")),
        (2, "Globex Black Friday #2", Decimal("99.99")),
        (3, "Name, with comma", Decimal("0.01")),
    ]
    assert snapshot.version.startswith("3-")
    assert snapshot.source == "postgres"


def test_the_source_is_passed_through() -> None:
    """Which read stood in (PostgreSQL or a saved copy) is kept with the snapshot, and not in its version."""
    saved = campaigns_snapshot(CSV, source="last good snapshot")
    assert saved.source == "last good snapshot"
    assert saved.version == campaigns_snapshot(CSV).version
    assert saved.rows.equals(campaigns_snapshot(CSV).rows)


def test_empty_csv_gives_an_empty_snapshot() -> None:
    """An empty table gives no rows, still with the declared schema, and version 0-…"""
    snapshot = campaigns_snapshot(b"")
    assert snapshot.rows.height == 0
    assert dict(snapshot.rows.schema) == CAMPAIGNS_SCHEMA
    assert snapshot.version.startswith("0-")


def test_versions_follow_the_content() -> None:
    """Equal content gives equal versions; any change of a value or of the rows gives another."""
    assert campaigns_snapshot(CSV).version == campaigns_snapshot(bytes(CSV)).version
    assert campaigns_snapshot(b"").version == campaigns_snapshot(b"").version
    changed_budget = CSV.replace(b"99.99", b"99.98")
    changed_name = CSV.replace(b"Acme", b"Acne")
    versions = {
        campaigns_snapshot(c).version for c in (CSV, changed_budget, changed_name, b"", CSV[: CSV.index(b"\n") + 1])
    }
    assert len(versions) == 5


def test_null_and_empty_text_are_told_apart() -> None:
    """In PostgreSQL's CSV an unquoted empty field is NULL and "" is the empty string."""
    snapshot = campaigns_snapshot(b'1,,\n2,"",0.00\n')
    assert snapshot.rows.rows() == [(1, None, None), (2, "", Decimal("0.00"))]


def test_bool_and_uuid_lookup_columns_are_typed() -> None:
    """bool reads PostgreSQL's t/f (and true/false) as booleans; uuid is kept as lower-case text; NULL stays NULL."""
    things = lookup(join_key="ad_id", columns={"active": "bool", "owner": "uuid", "weight": "float64"})
    csv = (
        b"1,t,550E8400-E29B-41D4-A716-446655440000,0.5\n"
        b"2,f,6ba7b810-9dad-11d1-80b4-00c04fd430c8,2\n"
        b"3,true,,\n"
        b"4,false,6BA7B811-9dad-11d1-80b4-00C04FD430C8,-1.25\n"
        b"5,,,\n"
    )
    snapshot = snapshot_from_csv(csv, things, KEY_TYPES, "postgres")
    assert dict(snapshot.rows.schema) == {
        "ad_id": pl.Int64,
        "active": pl.Boolean,
        "owner": pl.String,
        "weight": pl.Float64,
    }
    assert snapshot.rows.rows() == [
        (1, True, "550e8400-e29b-41d4-a716-446655440000", 0.5),
        (2, False, "6ba7b810-9dad-11d1-80b4-00c04fd430c8", 2.0),
        (3, True, None, None),
        (4, False, "6ba7b811-9dad-11d1-80b4-00c04fd430c8", -1.25),
        (5, None, None, None),
    ]


def test_a_renamed_lookup_column_is_read_by_position_and_named_as_declared() -> None:
    """`column:` names the lookup's column; the CSV holds the key, then the columns in declaration order."""
    things = lookup(
        join_key="ad_id",
        lookup_key="id",
        columns={"campaign_title": {"type": "string", "column": "name"}, "campaign_budget": "decimal(14,2)"},
    )
    assert snapshot_query(things).as_string(None) == (
        'COPY (SELECT "id", "name", "campaign_budget" FROM "t" ORDER BY "id") TO STDOUT (FORMAT CSV)'
    )
    snapshot = snapshot_from_csv(b"7,Spring,10.50\n8,Autumn,3.00\n", things, KEY_TYPES, "postgres")
    assert snapshot.rows.columns == ["ad_id", "campaign_title", "campaign_budget"]
    assert snapshot.rows.rows() == [(7, "Spring", Decimal("10.50")), (8, "Autumn", Decimal("3.00"))]
    batch = enrich_events(events([8, 9, 7]), snapshot, things)
    assert batch.events["campaign_title"].to_list() == ["Autumn", None, "Spring"]
    assert "name" not in batch.events.columns
    assert batch.unmatched["ad_id"].to_list() == [9]


@pytest.mark.parametrize(
    ("csv", "column"),
    [
        (b"x,Name,1.00\n", "ad_id"),  # not an integer key
        (b"1.5,Name,1.00\n", "ad_id"),
        (b"1,Name,not money\n", "campaign_budget"),
        (b"1,Name,123456789012345.00\n", "campaign_budget"),  # more than 14 digits
    ],
)
def test_values_that_do_not_fit_the_declared_types_are_refused(csv: bytes, column: str) -> None:
    """A snapshot value that cannot be the declared type is a SnapshotError naming the lookup, never a NULL."""
    with pytest.raises(SnapshotError, match=r"lookup campaigns: a value does not fit the declared types") as raised:
        campaigns_snapshot(csv)
    assert column in str(raised.value)


@pytest.mark.parametrize(("columns", "csv"), [({"active": "bool"}, b"1,yes\n"), ({"n": "int64"}, b"1,1.5\n")])
def test_bool_and_integer_columns_refuse_other_text(columns: dict[str, str], csv: bytes) -> None:
    """A bool column holds t/f/true/false only; an int64 column holds integers only."""
    things = lookup(join_key="ad_id", columns=columns)
    with pytest.raises(SnapshotError, match="lookup things: a value does not fit the declared types"):
        snapshot_from_csv(csv, things, KEY_TYPES, "postgres")


def test_a_uuid_column_refuses_text_that_is_not_a_uuid() -> None:
    """A uuid lookup column holds UUIDs: other text does not fit the declared type (events' uuids are checked)."""
    things = lookup(join_key="ad_id", columns={"owner": "uuid"})
    with pytest.raises(SnapshotError):
        snapshot_from_csv(b"1,not-a-uuid\n", things, KEY_TYPES, "postgres")


def test_a_key_with_several_rows_is_refused() -> None:
    """A lookup needs one row per key: a repeated key is a SnapshotError naming the key and its row count."""
    with pytest.raises(SnapshotError, match=r"lookup campaigns: key \(2,\) has 3 rows; a lookup needs one per key"):
        campaigns_snapshot(CSV + b"2,Again,1.00\n2,And again,2.00\n")


def test_a_composite_key_with_several_rows_is_refused_but_a_shared_part_is_fine() -> None:
    """With a key of two columns only a repeated pair is refused; pairs sharing one column are distinct keys."""
    things = lookup(join_key=["customer_id", "year"], columns={"plan": "string"})
    key_types = {"customer_id": FieldType("string"), "year": FieldType("int64")}
    fine = snapshot_from_csv(b"a,2023,basic\na,2024,pro\nb,2024,basic\n", things, key_types, "postgres")
    assert fine.rows.height == 3
    with pytest.raises(SnapshotError, match=r"key \('a', 2024\) has 2 rows"):
        snapshot_from_csv(b"a,2023,basic\na,2024,pro\na,2024,team\n", things, key_types, "postgres")


# --- joins and policies ------------------------------------------------------------------------------------------


@pytest.fixture
def snapshot() -> Snapshot:
    return campaigns_snapshot(CSV)


def test_keep_policy_keeps_unmatched_with_null_campaign_fields(snapshot: Snapshot) -> None:
    """keep: every event stays, in order; unmatched ones get NULL campaign columns and are also listed."""
    batch = enrich_events(events([2, 77, 1, 3, 88, 2]), snapshot, with_policy("keep"))
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
    assert batch.events.schema["timestamp_ms"] == pl.Datetime("ms", "UTC")


@pytest.mark.parametrize("policy", ["drop", "dead_letter"])
def test_drop_and_dead_letter_remove_unmatched_but_list_them(snapshot: Snapshot, policy: str) -> None:
    """drop and dead_letter: unmatched events leave the batch and are listed with their positions."""
    batch = enrich_events(events([2, 77, 1, 3, 88, 2]), snapshot, with_policy(policy))
    assert batch.events["click_id"].to_list() == ["c0", "c2", "c3", "c5"]
    assert batch.events["campaign_name"].null_count() == 0
    assert batch.unmatched["click_id"].to_list() == ["c1", "c4"]
    assert batch.unmatched["kafka_offset"].to_list() == [101, 104]


@pytest.mark.parametrize("policy", ["keep", "drop", "dead_letter"])
def test_everything_unmatched_with_an_empty_snapshot(policy: str) -> None:
    """An empty snapshot matches nothing: every event is unmatched, and kept only by keep."""
    batch = enrich_events(events([1, 2, 3]), campaigns_snapshot(b""), with_policy(policy))
    assert batch.unmatched["click_id"].to_list() == ["c0", "c1", "c2"]
    assert batch.events.height == (3 if policy == "keep" else 0)


@pytest.mark.parametrize("policy", ["keep", "drop", "dead_letter"])
def test_all_matched_keeps_order_and_count(snapshot: Snapshot, policy: str) -> None:
    """When every event matches, each policy keeps all of them, in their order."""
    ad_ids = [3, 1, 2] * 400
    batch = enrich_events(events(ad_ids), snapshot, with_policy(policy))
    assert batch.unmatched.height == 0
    assert batch.events["ad_id"].to_list() == ad_ids
    assert batch.events["kafka_offset"].to_list() == list(range(100, 100 + len(ad_ids)))


def test_no_events(snapshot: Snapshot) -> None:
    """No events: nothing enriched or unmatched, and the lookup's columns are still there."""
    batch = enrich_events(events([]), snapshot, with_policy("keep"))
    assert batch.events.height == 0
    assert batch.unmatched.height == 0
    assert "campaign_name" in batch.events.columns
    assert "campaign_budget" in batch.events.columns


def test_a_composite_join_key_matches_only_whole_pairs() -> None:
    """Key [customer_id, year]: an event matches the row with both values; one equal value is not a match."""
    things = lookup(join_key=["customer_id", "year"], columns={"plan": "string", "seats": "int64"})
    key_types = {"customer_id": FieldType("string"), "year": FieldType("int64")}
    snapshot = snapshot_from_csv(b"a,2023,basic,1\na,2024,pro,5\nb,2024,team,20\n", things, key_types, "postgres")
    pairs = [("a", 2024), ("b", 2023), ("a", 2023), ("c", 2024), ("b", 2024)]
    frame = pl.DataFrame(
        {
            "customer_id": [p[0] for p in pairs],
            "year": [p[1] for p in pairs],
            "kafka_partition": [0] * len(pairs),
            "kafka_offset": list(range(len(pairs))),
        },
        schema={"customer_id": pl.String, "year": pl.Int64, "kafka_partition": pl.UInt32, "kafka_offset": pl.UInt64},
    )
    rows = {("a", 2023): ("basic", 1), ("a", 2024): ("pro", 5), ("b", 2024): ("team", 20)}
    batch = enrich_events(frame, snapshot, things)
    assert batch.events.select("customer_id", "year", "plan", "seats").rows() == [
        (c, y, *rows.get((c, y), (None, None))) for c, y in pairs
    ]
    assert batch.unmatched.select("customer_id", "year").rows() == [("b", 2023), ("c", 2024)]
    assert batch.unmatched["kafka_offset"].to_list() == [1, 3]
    reasons = batch.unmatched.select(unmatched_reason(things, snapshot.version)).to_series().to_list()
    assert reasons == [
        f"unknown customer_id, year b, 2023: not in the things snapshot {snapshot.version}",
        f"unknown customer_id, year c, 2024: not in the things snapshot {snapshot.version}",
    ]


def test_uuid_keys_match_whatever_the_case_of_the_snapshot() -> None:
    """Decoded uuids are lower-case; a snapshot's upper-case uuid key matches them."""
    things = lookup(join_key="account", columns={"owner": "string"})
    snapshot = snapshot_from_csv(
        b"550E8400-E29B-41D4-A716-446655440000,Ada\n", things, {"account": FieldType("uuid")}, "postgres"
    )
    frame = pl.DataFrame(
        {"account": ["550e8400-e29b-41d4-a716-446655440000"], "kafka_partition": [0], "kafka_offset": [5]},
        schema={"account": pl.String, "kafka_partition": pl.UInt32, "kafka_offset": pl.UInt64},
    )
    batch = enrich_events(frame, snapshot, things)
    assert batch.events["owner"].to_list() == ["Ada"]
    assert batch.unmatched.height == 0


def test_unmatched_reason_names_the_key_value_lookup_and_version(snapshot: Snapshot) -> None:
    """The dead-letter reason of an unmatched event: `unknown ad_id 77: not in the campaigns snapshot <version>`."""
    lookup_ = with_policy("dead_letter")
    batch = enrich_events(events([2, 77, 1, 88]), snapshot, lookup_)
    reasons = batch.unmatched.select(unmatched_reason(lookup_, snapshot.version).alias("reason"))["reason"]
    assert reasons.dtype == pl.String
    assert reasons.to_list() == [
        f"unknown ad_id 77: not in the campaigns snapshot {snapshot.version}",
        f"unknown ad_id 88: not in the campaigns snapshot {snapshot.version}",
    ]
    assert snapshot.version.startswith("3-")
