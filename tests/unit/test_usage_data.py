"""Unit tests of clickhouse_etl.dev.usage_data (nothing is produced) and of the api_usage reference's decode."""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from datetime import timedelta
from pathlib import Path
from types import ModuleType

import polars as pl
import pytest

from clickhouse_etl.core.pipeline.loading import load_pipelines
from clickhouse_etl.core.pipeline.model import Source
from clickhouse_etl.dev.producing import LATE_BY_MS, MALFORMED_VARIANTS, ProduceReport
from clickhouse_etl.dev.usage_data import (
    BENCH_SHARES,
    ENDPOINTS,
    HEALTH_ENDPOINTS,
    UNKNOWN_CUSTOMER_PREFIX,
    UsageShares,
    demo_customers,
    expected_counts,
    generate_usage,
)
from clickhouse_etl.steps.decode import RAW_SCHEMA, decode_events

COUNT = 100_000
CUSTOMERS = 50
PARTITIONS = [0, 1, 2]
NOW_MS = 1_700_000_000_000
SPAN_MS = 60_000
SHARES = UsageShares(
    duplicate=0.05,
    duplicate_other_partition=0.3,
    health_check=0.05,
    unknown_customer=0.02,
    malformed=0.002,
    late=0.03,
    numeric_string=0.02,
    extra_field=0.05,
)
FLAGS = {
    "is_health_check": SHARES.health_check,
    "is_unknown_customer": SHARES.unknown_customer,
    "is_late": SHARES.late,
    "is_numeric_string": SHARES.numeric_string,
    "has_extra_field": SHARES.extra_field,
}
CONTRACT_FIELDS = ("event_id", "customer_id", "endpoint", "tokens", "latency_ms", "ts")
NUMERIC_FIELDS = ("tokens", "latency_ms", "ts")


@pytest.fixture(scope="module")
def generated() -> pl.DataFrame:
    return generate_usage(COUNT, SHARES, PARTITIONS, CUSTOMERS, seed=11, now_ms=NOW_MS, span_ms=SPAN_MS)


@pytest.fixture(scope="module")
def originals(generated: pl.DataFrame) -> pl.DataFrame:
    return generated.filter(pl.col("kind") == "event")


def n_base() -> int:
    return COUNT - round(COUNT * SHARES.duplicate) - round(COUNT * SHARES.malformed)


def raw_messages(frame: pl.DataFrame) -> pl.DataFrame:
    """The frame as the decoder reads it, with each message's send position as its offset."""
    return pl.DataFrame(
        {
            "kafka_partition": frame["partition"].cast(pl.UInt32),
            "kafka_offset": pl.int_range(frame.height, eager=True).cast(pl.UInt64),
            "value": frame["value"],
        },
        schema=RAW_SCHEMA,
    )


def api_usage_source() -> Source:
    return load_pipelines("api_usage")[0].pipeline.source


def test_default_shares_are_the_demo_mix() -> None:
    assert UsageShares() == SHARES
    assert BENCH_SHARES.duplicate == 0.10
    assert BENCH_SHARES.malformed == 0.001


@pytest.mark.parametrize("shares", [{"late": 1.5}, {"health_check": -0.1}, {"duplicate": 0.6, "malformed": 0.5}])
def test_invalid_shares_are_rejected(shares: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        UsageShares(**shares)


def test_exact_counts_per_kind(generated: pl.DataFrame) -> None:
    counts = dict(generated.group_by("kind").len().iter_rows())
    assert counts == {
        "event": n_base(),
        "duplicate": round(COUNT * SHARES.duplicate),
        "malformed": round(COUNT * SHARES.malformed),
    }
    assert generated.height == COUNT


@pytest.mark.parametrize("count", [1, 7, 999, 12_345])
def test_exact_counts_for_awkward_sizes(count: int) -> None:
    shares = UsageShares(duplicate=0.1, malformed=0.01)
    frame = generate_usage(count, shares, [0, 1], 10, seed=count, now_ms=NOW_MS)
    counts = dict(frame["kind"].value_counts().iter_rows())
    assert counts.get("duplicate", 0) == round(count * 0.1)
    assert counts.get("malformed", 0) == round(count * 0.01)
    assert counts["event"] == count - round(count * 0.1) - round(count * 0.01)


def test_zero_events() -> None:
    assert generate_usage(0, SHARES, PARTITIONS, seed=1).height == 0


def test_shares_leaving_no_originals_are_rejected() -> None:
    with pytest.raises(ValueError, match="no original events"):
        generate_usage(10, UsageShares(duplicate=0.5, malformed=0.5), [0], seed=1)


@pytest.mark.parametrize("flag", list(FLAGS))
def test_flag_shares_among_originals_are_exact(originals: pl.DataFrame, flag: str) -> None:
    assert originals.height == n_base()
    assert originals[flag].sum() == round(n_base() * FLAGS[flag])


def test_event_ids_of_originals_are_unique(originals: pl.DataFrame) -> None:
    assert originals["event_id"].n_unique() == originals.height


def test_event_ids_differ_between_unseeded_calls() -> None:
    a = generate_usage(1_000, SHARES, PARTITIONS, now_ms=NOW_MS)
    b = generate_usage(1_000, SHARES, PARTITIONS, now_ms=NOW_MS)
    assert set(a["event_id"].drop_nulls().to_list()).isdisjoint(b["event_id"].drop_nulls().to_list())


def test_every_duplicate_is_a_byte_identical_resend_after_its_original(generated: pl.DataFrame) -> None:
    indexed = generated.with_row_index("order")
    first_seen = (
        indexed.filter(pl.col("kind") == "event")
        .select("value", pl.col("order").alias("original_order"), pl.col("partition").alias("original_partition"))
        .unique("value")
    )
    duplicates = indexed.filter(pl.col("kind") == "duplicate").join(first_seen, on="value", how="left")
    assert duplicates.height == round(COUNT * SHARES.duplicate)
    assert duplicates["original_order"].null_count() == 0, "a duplicate's value is not an original's value"
    assert (duplicates["order"] > duplicates["original_order"]).all()
    same = duplicates.filter(pl.col("partition") == pl.col("original_partition"))
    assert same.height > 0
    # the ground-truth flag says which duplicates went to another partition
    moved = duplicates["partition"] != duplicates["original_partition"]
    assert moved.to_list() == duplicates["is_duplicate_other_partition"].to_list()


def test_share_of_duplicates_to_another_partition(generated: pl.DataFrame) -> None:
    duplicates = generated.filter(pl.col("kind") == "duplicate")
    assert duplicates["is_duplicate_other_partition"].sum() == round(duplicates.height * 0.3)


def test_single_partition_keeps_all_duplicates_in_it() -> None:
    frame = generate_usage(5_000, SHARES, [4], 10, seed=3, now_ms=NOW_MS)
    duplicates = frame.filter(pl.col("kind") == "duplicate")
    assert duplicates.height == 250
    assert not duplicates["is_duplicate_other_partition"].any()
    assert frame["partition"].unique().to_list() == [4]


def test_partitions_only_from_the_given_list() -> None:
    frame = generate_usage(3_000, SHARES, [5, 9], 10, seed=2, now_ms=NOW_MS)
    assert set(frame["partition"].to_list()) == {5, 9}
    assert frame.schema["partition"] == pl.Int32
    assert frame.schema["value"] == pl.Binary


def test_every_original_value_parses_into_the_contract_fields(originals: pl.DataFrame) -> None:
    for row in originals.iter_rows(named=True):
        text = row["value"].decode()
        document = json.loads(text)
        assert set(CONTRACT_FIELDS) <= set(document)
        numbers = [document[name] for name in NUMERIC_FIELDS]
        if row["is_numeric_string"]:
            assert all(isinstance(number, str) for number in numbers), text
        else:
            assert isinstance(document["tokens"], int) and isinstance(document["ts"], int), text
            assert isinstance(document["latency_ms"], float), text
        assert document["event_id"] == row["event_id"]
        assert document["customer_id"] == row["customer_id"]
        assert document["endpoint"] == row["endpoint"]
        assert int(document["tokens"]) == row["tokens"]
        assert float(document["latency_ms"]) == row["latency_ms"]
        assert int(document["ts"]) == row["ts"]
        # latency is written with exactly three decimals
        assert re.search(r'"latency_ms":"?\d+\.\d{3}"?[,}]', text), text
        extras = set(document) - set(CONTRACT_FIELDS)
        assert bool(extras) == row["has_extra_field"]


def test_value_ranges(originals: pl.DataFrame) -> None:
    assert originals["tokens"].min() >= 1
    assert originals["tokens"].max() <= 4_000
    assert originals["latency_ms"].min() >= 5
    assert originals["latency_ms"].max() <= 2_500
    # both sides of the pipeline's `slow` threshold occur
    assert (originals["latency_ms"] >= 1000).any()
    assert (originals["latency_ms"] < 1000).any()
    assert set(originals.filter(~pl.col("is_health_check"))["endpoint"].unique().to_list()) == set(ENDPOINTS)


def test_ground_truth_of_the_flags(originals: pl.DataFrame) -> None:
    for row in originals.iter_rows(named=True):
        endpoint = row["endpoint"]
        assert (endpoint in HEALTH_ENDPOINTS) == row["is_health_check"], row
        assert endpoint in HEALTH_ENDPOINTS or endpoint in ENDPOINTS, row
        if row["is_unknown_customer"]:
            assert re.fullmatch(re.escape(UNKNOWN_CUSTOMER_PREFIX) + r"\d+", row["customer_id"]), row
        else:
            match = re.fullmatch(r"cust-(\d{4})", row["customer_id"])
            assert match and 1 <= int(match[1]) <= CUSTOMERS, row
        # timestamps follow send order across the span; late ones are 1 to 30 minutes behind their slot
        seq = int(row["event_id"].rsplit("-", 1)[1])
        slot = NOW_MS - SPAN_MS + (seq * SPAN_MS) // n_base()
        if row["is_late"]:
            assert slot - LATE_BY_MS[1] <= row["ts"] < slot + 50 - LATE_BY_MS[0], row
        else:
            assert slot <= row["ts"] < slot + 50, row


def test_malformed_variants_cycle(generated: pl.DataFrame) -> None:
    malformed = generated.filter(pl.col("kind") == "malformed")
    assert malformed.height == round(COUNT * SHARES.malformed)
    counts = dict(malformed["malformed_variant"].value_counts().iter_rows())
    assert set(counts) == set(MALFORMED_VARIANTS)
    assert max(counts.values()) - min(counts.values()) <= 1
    assert malformed.filter(pl.col("malformed_variant") == "empty")["value"].to_list() == [b""] * counts["empty"]


def test_decode_dead_letters_exactly_the_malformed_messages(generated: pl.DataFrame) -> None:
    """Cross-check with the decode step: originals and duplicates decode to their ground truth, malformed ones
    are dead letters."""
    batch = decode_events(raw_messages(generated), api_usage_source())
    indexed = generated.with_row_index("offset")
    malformed_offsets = indexed.filter(pl.col("kind") == "malformed")["offset"]
    assert sorted(batch.dead_letters["kafka_offset"].to_list()) == sorted(malformed_offsets.to_list())
    assert batch.events.height == generated.height - malformed_offsets.len()
    truth = indexed.filter(pl.col("kind") != "malformed").select("offset", *CONTRACT_FIELDS)
    decoded = batch.events.sort("kafka_offset").select(
        pl.col("kafka_offset").alias("offset"),
        "event_id",
        "customer_id",
        "endpoint",
        "tokens",
        "latency_ms",
        pl.col("ts").dt.epoch("ms").alias("ts"),
    )
    assert decoded.to_dicts() == truth.with_columns(pl.col("offset").cast(pl.UInt64)).to_dicts()


def test_expected_counts(generated: pl.DataFrame, originals: pl.DataFrame) -> None:
    report = ProduceReport("api_usage")
    report.add(generated)
    loaded, dead_letters = expected_counts(report)
    assert loaded == n_base() - originals["is_health_check"].sum()
    assert dead_letters == round(COUNT * SHARES.malformed)


def test_reproducible_with_the_same_seed() -> None:
    a = generate_usage(5_000, SHARES, PARTITIONS, CUSTOMERS, seed=99, now_ms=NOW_MS)
    b = generate_usage(5_000, SHARES, PARTITIONS, CUSTOMERS, seed=99, now_ms=NOW_MS)
    c = generate_usage(5_000, SHARES, PARTITIONS, CUSTOMERS, seed=100, now_ms=NOW_MS)
    assert a.equals(b)
    assert not a.equals(c)
    assert set(a["event_id"].drop_nulls().to_list()).isdisjoint(c["event_id"].drop_nulls().to_list())


def test_demo_customers() -> None:
    customers = demo_customers(250)
    assert [c[0] for c in customers] == [f"cust-{n:04d}" for n in range(1, 251)]
    assert {plan for _, plan, _ in customers} == {"free", "pro", "enterprise"}
    assert {region for _, _, region in customers} == {"eu-west", "us-east", "ap-south"}
    assert demo_customers(250) == customers
    assert demo_customers(10) == customers[:10]
    assert demo_customers(0) == []


# ----------------------------------------------------------------------------------------------------------
# The independent reference of the integration tests (tests/integration/usage_reference.py), checked here
# because its decode needs no services.
# ----------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reference() -> ModuleType:
    # Loaded from its file: the integration folder is a package of tests, not something unit tests import.
    path = Path(__file__).resolve().parents[1] / "integration" / "usage_reference.py"
    spec = importlib.util.spec_from_file_location("usage_reference", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is created
    spec.loader.exec_module(module)
    return module


def usage(**fields: object) -> bytes:
    base: dict[str, object] = {
        "event_id": "e-1",
        "customer_id": "cust-0001",
        "endpoint": "/v1/chat",
        "tokens": 12,
        "latency_ms": 34.5,
        "ts": 1_700_000_000_000,
    }
    base.update(fields)
    return json.dumps({k: v for k, v in base.items() if v is not ...}).encode()


# (message, fields of the event it decodes to, or None for a dead letter)
REFERENCE_CASES = [
    (usage(), {}),
    (usage(event_id=12), {"event_id": "12"}),
    (usage(event_id=1.5e3), {"event_id": "1500"}),
    (usage(event_id=True), {"event_id": "true"}),
    (usage(event_id={"a": 1}), None),
    (usage(customer_id="[x"), {"customer_id": "[x"}),
    (usage(endpoint=["/v1/chat"]), None),
    (b'{"event_id":"{a}","event_id":{"a":1}' + usage()[len(b'{"event_id": "e-1"') :], {"event_id": "{a}"}),
    (usage(event_id=""), None),
    (usage(endpoint=""), {"endpoint": ""}),
    (usage(event_id="a\u0001b"), None),
    (usage(customer_id="a\u0001b"), {"customer_id": "a\u0001b"}),
    (usage(event_id="x" * 256), {"event_id": "x" * 256}),
    (usage(event_id="x" * 257), None),
    (usage(endpoint="/" * 2049), None),
    (usage(tokens=1.5), None),
    (usage(tokens="1.5"), None),
    (usage(tokens=2.0), {"tokens": 2}),
    (usage(tokens=" 42 "), {"tokens": 42}),
    (usage(tokens=True), None),
    (usage(tokens=2**63), None),
    (usage(latency_ms="12.5"), {"latency_ms": 12.5}),
    (usage(latency_ms="inf"), None),
    (usage(latency_ms=7), {"latency_ms": 7.0}),
    (usage(ts="1700000000000"), {"ts": 1_700_000_000_000}),
    (usage(ts=-1), None),
    (usage(ts=4_102_444_800_000), None),
    (usage(ts=...), None),
    (usage(ts=None), None),
    (usage(user_agent="curl/8.5", context={"sdk": "python"}), {}),
    (usage(big=2**128), None),
    (usage(latency_ms=...)[:-1] + b', "latency_ms": NaN}', None),
    (b'{"event_id":"first","event_id":"second"' + usage()[len(b'{"event_id": "e-1"') :], {"event_id": "first"}),
    (b'[{"event_id": "e-1"}]', None),
    (b"", None),
    (usage(padding="x" * 65_536), None),
]


@pytest.mark.parametrize(("message", "fields"), REFERENCE_CASES)
def test_reference_decode_agrees_with_the_decode_step(
    reference: ModuleType, message: bytes, fields: dict[str, object] | None
) -> None:
    expected = None
    if fields is not None:
        expected = {**json.loads(usage()), **fields}
    assert reference.decode(message) == expected
    raw = pl.DataFrame({"kafka_partition": [0], "kafka_offset": [0], "value": [message]}, schema=RAW_SCHEMA)
    batch = decode_events(raw, api_usage_source())
    if expected is None:
        assert batch.events.height == 0 and batch.dead_letters.height == 1
    else:
        event = batch.events.row(0, named=True)
        event["ts"] = (event["ts"] - reference.EPOCH) // timedelta(milliseconds=1)
        assert {name: event[name] for name in CONTRACT_FIELDS} == expected


def test_reference_outcome_matches_the_generated_ground_truth(reference: ModuleType) -> None:
    frame = generate_usage(20_000, SHARES, PARTITIONS, CUSTOMERS, seed=5, now_ms=NOW_MS)
    offsets = frame.with_columns(offset=pl.int_range(pl.len()).over("partition"))
    messages = list(offsets.select("partition", "offset", "value").iter_rows())
    known = {customer_id: (plan, region) for customer_id, plan, region in demo_customers(CUSTOMERS)}
    expected = reference.expected_usage(messages, known)
    originals = frame.filter(pl.col("kind") == "event")
    report = ProduceReport("api_usage")
    report.add(frame)
    assert (len(expected.rows), len(expected.dead_letters)) == expected_counts(report)
    assert expected.duplicates == frame.filter(pl.col("kind") == "duplicate").height
    assert expected.filtered == originals["is_health_check"].sum()
    assert expected.unmatched == originals["is_unknown_customer"].sum()
    assert not expected.ambiguous
    for row in originals.filter(~pl.col("is_health_check")).iter_rows(named=True):
        kept = expected.rows[row["event_id"]]
        plan, region = (None, None) if row["is_unknown_customer"] else known[row["customer_id"]]
        assert (kept["plan"], kept["region"]) == (plan, region)
        assert kept["slow"] == (row["latency_ms"] >= 1000)
        assert (kept["tokens"], kept["latency_ms"]) == (row["tokens"], row["latency_ms"])
    minutes = expected.minute_usage()
    assert sum(requests for requests, _, _, _ in minutes.values()) == len(expected.rows)
    assert sum(tokens for _, tokens, _, _ in minutes.values()) == sum(r["tokens"] for r in expected.rows.values())
