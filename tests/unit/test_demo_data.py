"""Unit tests of clickhouse_etl.dev.demo_data.generate_events and demo_campaigns (nothing is produced)."""

from __future__ import annotations

import ipaddress
import json
import re
from decimal import Decimal

import polars as pl
import pytest

from clickhouse_etl.core.pipeline.loading import load_pipelines
from clickhouse_etl.dev.demo_data import (
    UNKNOWN_AD_ID_BASE,
    EventShares,
    demo_campaigns,
    generate_events,
)
from clickhouse_etl.dev.producing import LATE_BY_MS
from clickhouse_etl.steps.decode import RAW_SCHEMA, decode_events

COUNT = 100_000
CAMPAIGNS = 100
PARTITIONS = [0, 1, 2]
NOW_MS = 1_700_000_000_000
SPAN_MS = 60_000
SHARES = EventShares(
    duplicate=0.05,
    duplicate_other_partition=0.3,
    bot=0.02,
    unknown_ad=0.02,
    malformed=0.002,
    late=0.03,
    ipv6=0.05,
    numeric_string=0.02,
    extra_field=0.05,
)
FLAGS = {
    "is_bot": SHARES.bot,
    "is_unknown_ad": SHARES.unknown_ad,
    "is_late": SHARES.late,
    "is_numeric_string": SHARES.numeric_string,
    "has_extra_field": SHARES.extra_field,
}
CONTRACT_FIELDS = ("click_id", "user_id", "ad_id", "timestamp_ms", "ip_address")


@pytest.fixture(scope="module")
def generated() -> pl.DataFrame:
    return generate_events(COUNT, SHARES, PARTITIONS, CAMPAIGNS, seed=11, now_ms=NOW_MS, span_ms=SPAN_MS)


@pytest.fixture(scope="module")
def originals(generated) -> pl.DataFrame:
    return generated.filter(pl.col("kind") == "event")


def n_base() -> int:
    return COUNT - round(COUNT * SHARES.duplicate) - round(COUNT * SHARES.malformed)


def test_exact_counts_per_kind(generated):
    counts = dict(generated.group_by("kind").len().iter_rows())
    assert counts == {
        "event": n_base(),
        "duplicate": round(COUNT * SHARES.duplicate),
        "malformed": round(COUNT * SHARES.malformed),
    }
    assert generated.height == COUNT


@pytest.mark.parametrize("count", [1, 7, 999, 12_345])
def test_exact_counts_for_awkward_sizes(count):
    shares = EventShares(duplicate=0.1, malformed=0.01)
    frame = generate_events(count, shares, [0, 1], 10, seed=count, now_ms=NOW_MS)
    counts = frame["kind"].value_counts()
    counts = dict(counts.iter_rows())
    assert counts.get("duplicate", 0) == round(count * 0.1)
    assert counts.get("malformed", 0) == round(count * 0.01)
    assert counts["event"] == count - round(count * 0.1) - round(count * 0.01)


def test_zero_events():
    assert generate_events(0, SHARES, PARTITIONS, seed=1).height == 0


def test_shares_leaving_no_originals_are_rejected():
    with pytest.raises(ValueError, match="no original events"):
        generate_events(10, EventShares(duplicate=0.5, malformed=0.5), [0], seed=1)


@pytest.mark.parametrize("flag", list(FLAGS))
def test_flag_shares_among_originals_are_exact(originals, flag):
    assert originals.height == n_base()
    assert originals[flag].sum() == round(n_base() * FLAGS[flag])


def test_ipv6_share_excludes_bots(originals):
    # bots always get an address of the filtered IPv4 network, so the ipv6 flag is drawn and then cleared on bots
    ipv6 = originals["is_ipv6"].sum()
    assert ipv6 <= round(n_base() * SHARES.ipv6)
    assert ipv6 >= round(n_base() * SHARES.ipv6) - originals["is_bot"].sum()
    assert not (originals["is_ipv6"] & originals["is_bot"]).any()


def test_click_ids_of_originals_are_unique(originals):
    assert originals["click_id"].n_unique() == originals.height


def test_every_duplicate_is_a_byte_identical_resend_after_its_original(generated):
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
    assert (same["order"] > same["original_order"]).all()
    # the ground-truth flag says which duplicates went to another partition
    moved = duplicates["partition"] != duplicates["original_partition"]
    assert moved.to_list() == duplicates["is_duplicate_other_partition"].to_list()


def test_share_of_duplicates_to_another_partition(generated):
    duplicates = generated.filter(pl.col("kind") == "duplicate")
    assert duplicates["is_duplicate_other_partition"].sum() == round(duplicates.height * 0.3)


def test_single_partition_keeps_all_duplicates_in_it():
    frame = generate_events(5_000, SHARES, [4], 10, seed=3, now_ms=NOW_MS)
    duplicates = frame.filter(pl.col("kind") == "duplicate")
    assert duplicates.height == 250
    assert not duplicates["is_duplicate_other_partition"].any()
    assert frame["partition"].unique().to_list() == [4]


def test_partitions_are_roughly_uniform(generated):
    counts = dict(generated.group_by("partition").len().iter_rows())
    assert set(counts) == set(PARTITIONS)
    expected = COUNT / len(PARTITIONS)
    for partition, n in counts.items():
        assert abs(n - expected) <= 0.05 * expected, (partition, n)
    chi_square = sum((n - expected) ** 2 / expected for n in counts.values())
    assert chi_square < 30  # 2 degrees of freedom: p ≈ 3e-7


def test_partitions_only_from_the_given_list():
    frame = generate_events(3_000, SHARES, [5, 9], 10, seed=2, now_ms=NOW_MS)
    assert set(frame["partition"].to_list()) == {5, 9}


def test_every_original_value_parses_into_the_contract_fields(originals):
    for row in originals.iter_rows(named=True):
        document = json.loads(row["value"])
        assert set(CONTRACT_FIELDS) <= set(document)
        ad_id, timestamp_ms = document["ad_id"], document["timestamp_ms"]
        if row["is_numeric_string"]:
            assert isinstance(ad_id, str) and isinstance(timestamp_ms, str)
        else:
            assert isinstance(ad_id, int) and isinstance(timestamp_ms, int)
        assert document["click_id"] == row["click_id"]
        assert document["user_id"] == row["user_id"]
        assert int(ad_id) == row["ad_id"]
        assert int(timestamp_ms) == row["timestamp_ms"]
        assert document["ip_address"] == row["ip_address"]
        ipaddress.ip_address(document["ip_address"])  # a valid address
        extras = set(document) - set(CONTRACT_FIELDS)
        assert bool(extras) == row["has_extra_field"]


def test_ground_truth_of_the_flags(originals):
    bot_network = ipaddress.ip_network("192.168.1.0/24")
    for row in originals.iter_rows(named=True):
        ip = ipaddress.ip_address(row["ip_address"])
        assert (ip in bot_network if ip.version == 4 else False) == row["is_bot"], row
        assert (ip.version == 6) == row["is_ipv6"], row
        if row["is_unknown_ad"]:
            assert row["ad_id"] > CAMPAIGNS
            assert row["ad_id"] >= UNKNOWN_AD_ID_BASE
        else:
            assert 1 <= row["ad_id"] <= CAMPAIGNS
        # timestamps follow send order across the span; late ones are 1 to 30 minutes behind their slot
        seq = int(row["click_id"].rsplit("-", 1)[1])
        slot = NOW_MS - SPAN_MS + (seq * SPAN_MS) // n_base()
        if row["is_late"]:
            assert slot - LATE_BY_MS[1] <= row["timestamp_ms"] < slot + 50 - LATE_BY_MS[0], row
        else:
            assert slot <= row["timestamp_ms"] < slot + 50, row


def test_malformed_values_are_not_valid_clicks(generated):
    malformed = generated.filter(pl.col("kind") == "malformed")
    assert malformed.height == round(COUNT * SHARES.malformed)
    for value in malformed["value"].to_list():
        try:
            document = json.loads(value)
        except ValueError:
            continue
        assert (
            not isinstance(document, dict)
            or not set(CONTRACT_FIELDS) <= set(document)
            or not all(re.fullmatch(r"-?\d+", str(document[f])) for f in ("ad_id", "timestamp_ms"))
        ), value


def test_decode_dead_letters_exactly_the_malformed_messages(generated):
    """Cross-check with the decode step: originals and duplicates decode, malformed ones do not."""
    raw = pl.DataFrame(
        {
            "kafka_partition": generated["partition"].cast(pl.UInt32),
            "kafka_offset": pl.int_range(generated.height, eager=True).cast(pl.UInt64),
            "value": generated["value"],
        },
        schema=RAW_SCHEMA,
    )
    batch = decode_events(raw, load_pipelines("ad_clicks", environment={})[0].pipeline.source)
    malformed_offsets = generated.with_row_index("offset").filter(pl.col("kind") == "malformed")["offset"]
    assert sorted(batch.dead_letters["kafka_offset"].to_list()) == sorted(malformed_offsets.to_list())
    assert batch.events.height == generated.height - malformed_offsets.len()


def test_reproducible_with_the_same_seed():
    a = generate_events(5_000, SHARES, PARTITIONS, CAMPAIGNS, seed=99, now_ms=NOW_MS)
    b = generate_events(5_000, SHARES, PARTITIONS, CAMPAIGNS, seed=99, now_ms=NOW_MS)
    c = generate_events(5_000, SHARES, PARTITIONS, CAMPAIGNS, seed=100, now_ms=NOW_MS)
    assert a.equals(b)
    assert not a.equals(c)
    assert set(a["click_id"].drop_nulls().to_list()).isdisjoint(c["click_id"].drop_nulls().to_list())


def test_demo_campaigns():
    campaigns = demo_campaigns(250)
    assert [c[0] for c in campaigns] == list(range(1, 251))
    names = [c[1] for c in campaigns]
    assert len(set(names)) == 250
    assert all(name.endswith(f"#{ad_id}") for ad_id, name, _ in campaigns)
    for _, _, budget in campaigns:
        assert re.fullmatch(r"\d+\.\d{2}", budget)
        assert Decimal("500.00") <= Decimal(budget) < Decimal("50000.00")
    assert demo_campaigns(250) == campaigns
    assert demo_campaigns(10) == campaigns[:10]
    assert demo_campaigns(0) == []
