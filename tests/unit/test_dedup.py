"""Unit tests of clickhouse_etl.steps.dedup (the pure parts; Redis is not involved)."""

from __future__ import annotations

import random

import polars as pl
import pytest

from clickhouse_etl.core.pipeline.loading import load_pipelines
from clickhouse_etl.steps.dedup import claim_namespace, dedup_keys, kept_by_claims, position_labels

AD_CLICKS = load_pipelines("ad_clicks", environment={})[0].pipeline
KEY = ["click_id"]


def encoded(*values: object) -> str:
    """A key of several fields: each field's byte length and text, joined by "|"."""
    return "|".join(f"{len(str(v).encode())}:{v}" for v in values)


def events(rows: list[tuple[str, int, int]]) -> pl.DataFrame:
    """rows of (click_id, partition, offset)."""
    return pl.DataFrame(
        {
            "click_id": [r[0] for r in rows],
            "kafka_partition": [r[1] for r in rows],
            "kafka_offset": [r[2] for r in rows],
        },
        schema={"click_id": pl.String, "kafka_partition": pl.UInt32, "kafka_offset": pl.UInt64},
    )


def pair_events(rows: list[tuple[str, int, int]]) -> pl.DataFrame:
    """rows of (a, b, offset): events whose key is the pair (a, b), one a string and one an integer."""
    return pl.DataFrame(
        {
            "a": [r[0] for r in rows],
            "b": [r[1] for r in rows],
            "kafka_partition": [0] * len(rows),
            "kafka_offset": [r[2] for r in rows],
        },
        schema={"a": pl.String, "b": pl.Int64, "kafka_partition": pl.UInt32, "kafka_offset": pl.UInt64},
    )


def test_the_ad_clicks_pipeline_dedups_by_click_id() -> None:
    """The key the tests below use is the one the packaged pipeline declares."""
    assert AD_CLICKS.dedup is not None
    assert AD_CLICKS.dedup.key == KEY


# --- composite keys ----------------------------------------------------------------------------------------------


def test_composite_keys_repeat_only_when_every_field_repeats() -> None:
    """With key [a, b] an event is a duplicate only when both fields repeat; sharing one field is not enough."""
    frame = pair_events([("x", 1, 10), ("x", 2, 11), ("y", 1, 12), ("x", 1, 13), ("y", 1, 14), ("x", 2, 15)])
    assert dedup_keys(frame, ["a", "b"]).is_first_distinct().to_list() == [True, True, True, False, False, False]
    # the same events keyed by one field only
    assert dedup_keys(frame, ["a"]).is_first_distinct().to_list() == [True, False, True, False, False, False]


def test_composite_keys_repeat_exactly_as_their_tuples_do() -> None:
    """On random pairs, two events share a key exactly when they share the (a, b) pair."""
    rng = random.Random(77)
    rows = [(f"k{rng.randrange(20)}", rng.randrange(15), offset) for offset in range(3_000)]
    seen: set[tuple[str, int]] = set()
    expected = []
    for a, b, _ in rows:
        expected.append((a, b) not in seen)
        seen.add((a, b))
    firsts = dedup_keys(pair_events(rows), ["a", "b"]).is_first_distinct().to_list()
    assert firsts == expected
    assert sum(firsts) == len(seen)


def test_dedup_keys_of_one_string_field_are_the_field_itself() -> None:
    """A single string key is used as it is, without any encoding."""
    frame = events([("a", 0, 0), ("b:c", 0, 1), ("", 0, 2)])
    keys = dedup_keys(frame, KEY)
    assert keys.dtype == pl.String
    assert keys.to_list() == ["a", "b:c", ""]


def test_dedup_keys_of_one_non_string_field_are_its_text() -> None:
    """A single integer key becomes its decimal text."""
    frame = pair_events([("x", 7, 0), ("y", -12, 1), ("z", 9_223_372_036_854_775_807, 2)])
    keys = dedup_keys(frame, ["b"])
    assert keys.dtype == pl.String
    assert keys.to_list() == ["7", "-12", "9223372036854775807"]


def test_dedup_keys_of_several_fields_are_their_lengths_and_texts() -> None:
    """Several fields are cast to text, each prefixed by its byte length, in the order of the key."""
    frame = pair_events([("x", 1, 0), ("y", 22, 1)])
    assert dedup_keys(frame, ["a", "b"]).to_list() == [encoded("x", 1), encoded("y", 22)]
    assert dedup_keys(frame, ["b", "a"]).to_list() == [encoded(1, "x"), encoded(22, "y")]


def test_dedup_keys_of_distinct_pairs_are_distinct() -> None:
    """Pairs that differ never share a key, e.g. ("x1", 2) and ("x", 12)."""
    rows = [("x1", 2, 0), ("x", 12, 1), ("x", 1, 2), ("x1", 1, 3), ("1", 1, 4), ("", 11, 5)]
    keys = dedup_keys(pair_events(rows), ["a", "b"]).to_list()
    assert keys == [encoded(a, b) for a, b, _ in rows]
    assert len(set(keys)) == len(rows)


def test_dedup_keys_stay_apart_whatever_the_text_holds() -> None:
    """Text holding the separators themselves cannot make two different pairs collide."""
    frame = pl.DataFrame(
        {"a": ["x|1:y", "x", "x\x1fy", "é|"], "b": ["z", "y|1:z", "z", "1:"], "kafka_offset": [0, 1, 2, 3]}
    )
    keys = dedup_keys(frame, ["a", "b"]).to_list()
    assert len(set(keys)) == 4


def test_claim_namespace_is_prefix_and_topic() -> None:
    """Claims are kept under `<prefix>:<topic>`, so two topics or prefixes never share a claim."""
    assert claim_namespace("ce:dedup", "ad_clicks") == "ce:dedup:ad_clicks"
    pairs = [("ce:dedup", "ad_clicks"), ("ce:dedup", "t2"), ("p", "ad_clicks")]
    assert len({claim_namespace(prefix, topic) for prefix, topic in pairs}) == 3


def test_claim_namespace_of_the_ad_clicks_pipeline() -> None:
    """The packaged pipeline claims its click ids under `ce:dedup:<topic>`."""
    assert claim_namespace(AD_CLICKS.dedup_key_prefix, AD_CLICKS.topic) == "ce:dedup:ad_clicks"
    assert dedup_keys(events([("c-9", 0, 0)]), KEY).to_list() == ["c-9"]


# --- positions and claims ---------------------------------------------------------------------------------------


def test_position_labels() -> None:
    """The owner stored in a claim is `<partition>:<offset>`, up to the largest offset."""
    frame = events([("a", 0, 0), ("b", 3, 17), ("c", 12, 18_446_744_073_709_551_615)])
    labels = position_labels(frame)
    assert labels.dtype == pl.String
    assert labels.to_list() == ["0:0", "3:17", "12:18446744073709551615"]


def test_kept_by_claims_new_and_own_claims_are_kept() -> None:
    """A new claim or one this position already owns keeps the event; another owner drops it."""
    positions = ["0:1", "0:2", "0:3", "0:4", "0:5"]
    previous = [None, b"0:2", "0:3", b"0:99", "1:4"]
    assert kept_by_claims(positions, previous).to_list() == [True, True, True, False, False]


@pytest.mark.parametrize(
    ("owner", "kept"),
    [
        (None, True),
        (b"2:40", True),
        ("2:40", True),
        (b"2:41", False),
        ("1:40", False),
        ("2:4", False),
        ("", False),
        (b"", False),
    ],
)
def test_kept_by_claims_single(owner: bytes | str | None, kept: bool) -> None:
    """Only an exact match of the owner (as bytes or text) counts as this position's own claim."""
    result = kept_by_claims(["2:40"], [owner])
    assert result.dtype == pl.Boolean
    assert result.to_list() == [kept]


def test_kept_by_claims_accepts_series() -> None:
    """The same decisions when positions and owners come as polars Series."""
    positions = pl.Series(["0:1", "0:2", "0:3"], dtype=pl.String)
    owners = pl.Series([None, "0:2", "0:9"], dtype=pl.String)
    assert kept_by_claims(positions, owners).to_list() == [True, True, False]


def test_kept_by_claims_never_null() -> None:
    """New claims give True, never NULL."""
    result = kept_by_claims(["0:1", "0:2"], [None, None])
    assert result.null_count() == 0
    assert result.to_list() == [True, True]


def test_kept_by_claims_empty() -> None:
    """No positions, no decisions."""
    assert kept_by_claims([], []).to_list() == []


def test_replay_of_the_same_range_keeps_exactly_what_the_first_run_kept() -> None:
    """Simulates the claim protocol (set if absent, answer the previous owner; a key repeated in one range is owned
    by its first occurrence) with a dict standing in for Redis."""
    store: dict[str, bytes] = {}

    def claim(keys: list[str], positions: list[str]) -> list[bytes | None]:
        previous = []
        for key, position in zip(keys, positions, strict=True):
            previous.append(store.get(key))
            store.setdefault(key, position.encode())
        return previous

    first_range = events([("a", 0, 0), ("b", 0, 1), ("a", 0, 2)])
    second_range = events([("b", 0, 3), ("c", 0, 4)])

    def run(frame: pl.DataFrame) -> list[str]:
        positions = position_labels(frame).to_list()
        keys = dedup_keys(frame, KEY).to_list()
        kept = kept_by_claims(positions, claim(keys, positions))
        return frame.filter(kept)["click_id"].to_list()

    assert run(first_range) == ["a", "b"]
    assert run(second_range) == ["c"]  # b is owned by 0:1
    assert run(first_range) == ["a", "b"]  # replay finds its own claims
    assert run(second_range) == ["c"]
    assert set(store) == {"a", "b", "c"}


def test_replay_with_a_composite_key_keeps_exactly_what_the_first_run_kept() -> None:
    """The claim protocol with key [a, b]: a pair seen in an earlier range is dropped, a replay keeps its own."""
    store: dict[str, bytes] = {}

    def run(frame: pl.DataFrame) -> list[tuple[str, int]]:
        positions = position_labels(frame).to_list()
        keys = dedup_keys(frame, ["a", "b"]).to_list()
        previous = []
        for key, position in zip(keys, positions, strict=True):
            previous.append(store.get(key))
            store.setdefault(key, position.encode())
        kept = frame.filter(kept_by_claims(positions, previous))
        return list(zip(kept["a"].to_list(), kept["b"].to_list(), strict=True))

    first_range = pair_events([("x", 1, 0), ("x", 2, 1), ("x", 1, 2)])
    second_range = pair_events([("x", 2, 3), ("y", 1, 4), ("x", 3, 5)])
    assert run(first_range) == [("x", 1), ("x", 2)]
    assert run(second_range) == [("y", 1), ("x", 3)]  # (x, 2) is owned by 0:1
    assert run(first_range) == [("x", 1), ("x", 2)]
    assert run(second_range) == [("y", 1), ("x", 3)]
