"""Unit tests of clickhouse_etl.steps.decode.decode_events, with the ad_clicks pipeline's source fields (other
field types: test_decode_types.py)."""

from __future__ import annotations

import json

import polars as pl
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from clickhouse_etl.core.pipeline.loading import load_pipelines
from clickhouse_etl.steps import decode
from clickhouse_etl.steps.decode import DEAD_LETTER_SCHEMA, FAST_PATH_CHUNK, MAX_TIMESTAMP_MS, RAW_SCHEMA

MAX_BYTES = 65_536
SOURCE = load_pipelines("ad_clicks", environment={})[0].pipeline.source
EVENT_SCHEMA = decode.event_schema(SOURCE)


def decode_events(raw: pl.DataFrame, max_message_bytes: int) -> decode.DecodedBatch:
    """The ad_clicks source with another size limit; timestamps as ms since the epoch, for comparison."""
    batch = decode.decode_events(raw, SOURCE.model_copy(update={"max_message_bytes": max_message_bytes}))
    return batch


def epoch_ms(batch: decode.DecodedBatch) -> list[int]:
    return batch.events["timestamp_ms"].dt.epoch("ms").to_list()


def raw_frame(values: list[bytes | None], partition: int = 0, first_offset: int = 0) -> pl.DataFrame:
    return pl.DataFrame(
        {
            "kafka_partition": [partition] * len(values),
            "kafka_offset": list(range(first_offset, first_offset + len(values))),
            "value": values,
        },
        schema=RAW_SCHEMA,
    )


def click(**fields: object) -> dict[str, object]:
    base: dict[str, object] = {
        "click_id": "c-1",
        "user_id": "u-1",
        "ad_id": 7,
        "timestamp_ms": 1_700_000_000_000,
        "ip_address": "10.1.2.3",
    }
    base.update(fields)
    return {k: v for k, v in base.items() if v is not ...}


def encode(document: object) -> bytes:
    return json.dumps(document).encode()


def decode_one(value: bytes | None, max_message_bytes: int = MAX_BYTES):
    return decode_events(raw_frame([value]), max_message_bytes)


def error_of(value: bytes | None, max_message_bytes: int = MAX_BYTES) -> str:
    batch = decode_one(value, max_message_bytes)
    assert batch.events.height == 0, f"expected a dead letter, got {batch.events.rows()}"
    assert batch.dead_letters.height == 1
    return batch.dead_letters["error"][0]


def outcomes(batch) -> dict[tuple[int, int], tuple]:
    """(partition, offset) → ("event", fields) or ("dead", error); fails if a position is in both or twice."""
    result: dict[tuple[int, int], tuple] = {}
    for row in batch.events.iter_rows(named=True):
        key = (row["kafka_partition"], row["kafka_offset"])
        assert key not in result, f"{key} decoded twice"
        timestamp_ms = int(row["timestamp_ms"].timestamp() * 1000) if row["timestamp_ms"] is not None else None
        fields = (row["click_id"], row["user_id"], row["ad_id"], timestamp_ms, row["ip_address"])
        result[key] = ("event", fields)
    for row in batch.dead_letters.iter_rows(named=True):
        key = (row["kafka_partition"], row["kafka_offset"])
        assert key not in result, f"{key} is both an event and a dead letter (or dead-lettered twice)"
        result[key] = ("dead", row["error"])
    return result


def assert_accounted(raw: pl.DataFrame, batch) -> dict[tuple[int, int], tuple]:
    result = outcomes(batch)
    expected = set(zip(raw["kafka_partition"].to_list(), raw["kafka_offset"].to_list(), strict=True))
    assert set(result) == expected
    assert batch.events.height + batch.dead_letters.height == raw.height
    # In the raw batch's order, which is offset order: dedup owns a key repeated in a window by its first row.
    assert batch.events["kafka_offset"].is_sorted()
    return result


# --------------------------------------------------------------------------------------------------------
# Valid events
# --------------------------------------------------------------------------------------------------------


def test_valid_events_are_typed_and_keep_their_position():
    values = [encode(click(click_id=f"c{i}", user_id=f"u{i}", ad_id=i, timestamp_ms=1_000 + i)) for i in range(5)]
    batch = decode_events(raw_frame(values, partition=3, first_offset=100), MAX_BYTES)
    assert dict(batch.events.schema) == EVENT_SCHEMA
    assert dict(batch.dead_letters.schema) == DEAD_LETTER_SCHEMA
    assert batch.dead_letters.height == 0
    rows = batch.events.with_columns(pl.col("timestamp_ms").dt.epoch("ms")).rows()
    assert rows == [(f"c{i}", f"u{i}", i, 1_000 + i, "10.1.2.3", 3, 100 + i) for i in range(5)]


def test_events_parsed_alone_keep_their_offset_order():
    """Values with whitespace around the object are parsed one by one, apart from the chunk; the events still
    come out in offset order, which dedup relies on (a key repeated in a window is owned by its first row)."""
    values = [
        encode(click(click_id="a")) + b"  ",
        encode(click(click_id="b")),
        b"\t" + encode(click(click_id="c")),
        encode(click(click_id="d")),
    ]
    batch = decode_events(raw_frame(values, partition=0, first_offset=10), MAX_BYTES)
    assert batch.events["click_id"].to_list() == ["a", "b", "c", "d"]
    assert batch.events["kafka_offset"].to_list() == [10, 11, 12, 13]


def test_numeric_strings_are_coerced_to_integers():
    batch = decode_one(encode(click(ad_id="42", timestamp_ms="1700000000000")))
    assert batch.dead_letters.height == 0
    assert batch.events["ad_id"].to_list() == [42]
    assert epoch_ms(batch) == [1_700_000_000_000]
    assert batch.events.schema["ad_id"] == pl.Int64
    assert batch.events.schema["timestamp_ms"] == pl.Datetime("ms", "UTC")


def test_unknown_extra_fields_are_ignored():
    document = click(
        user_agent="Mozilla/5.0",
        context={"page": "home", "depth": 2, "nested": {"list": [1, {"x": None}]}},
        tags=["a", "b"],
        score=1.5,
        flag=True,
        nothing=None,
    )
    batch = decode_one(encode(document))
    assert batch.dead_letters.height == 0
    assert batch.events.columns == list(EVENT_SCHEMA)
    assert batch.events.with_columns(pl.col("timestamp_ms").dt.epoch("ms")).row(0)[:5] == (
        "c-1",
        "u-1",
        7,
        1_700_000_000_000,
        "10.1.2.3",
    )


def test_valid_ipv6_is_kept():
    batch = decode_one(encode(click(ip_address="2001:db8::1")))
    assert batch.dead_letters.height == 0
    assert batch.events["ip_address"].to_list() == ["2001:db8::1"]


def test_pretty_printed_json_decodes():
    value = json.dumps(click(click_id="pretty"), indent=2).encode()
    assert b"\n" in value
    crlf = value.replace(b"\n", b"\r\n")
    batch = decode_events(raw_frame([value, crlf]), MAX_BYTES)
    assert batch.dead_letters.height == 0
    assert batch.events["click_id"].to_list() == ["pretty", "pretty"]
    assert batch.events["ad_id"].to_list() == [7, 7]


def test_timestamp_bounds_are_inclusive_of_zero_and_exclusive_of_max():
    batch = decode_events(
        raw_frame([encode(click(timestamp_ms=0)), encode(click(timestamp_ms=MAX_TIMESTAMP_MS - 1))]), MAX_BYTES
    )
    assert batch.dead_letters.height == 0
    assert epoch_ms(batch) == [0, MAX_TIMESTAMP_MS - 1]


def test_message_of_exactly_max_bytes_is_not_oversized():
    value = encode(click())
    batch = decode_one(value, max_message_bytes=len(value))
    assert batch.events.height == 1


def test_empty_input_gives_empty_typed_frames():
    batch = decode_events(raw_frame([]), MAX_BYTES)
    assert batch.events.height == 0
    assert batch.dead_letters.height == 0
    assert dict(batch.events.schema) == EVENT_SCHEMA
    assert dict(batch.dead_letters.schema) == DEAD_LETTER_SCHEMA


# --------------------------------------------------------------------------------------------------------
# Dead letters
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        pytest.param(b"click c1 from 10.0.0.1 at noon", "invalid JSON", id="not-json"),
        pytest.param(b'{"click_id":"c1","user_id":"u1","ad_id":3,"timestam', "invalid JSON", id="truncated"),
        pytest.param(b'["c1", 3]', "not a JSON object: top-level list", id="top-level-array"),
        pytest.param(b'"just a string"', "not a JSON object: top-level str", id="top-level-string"),
        pytest.param(b"42", "not a JSON object: top-level int", id="top-level-int"),
        pytest.param(b"", "empty message", id="empty"),
        pytest.param(None, "empty message", id="null"),
        pytest.param(b"   \t ", "invalid JSON", id="whitespace-only"),
        pytest.param(b"\n\n", "invalid JSON", id="newlines-only"),
        pytest.param(encode(click(click_id=...)), "missing field click_id", id="missing-click-id"),
        pytest.param(encode(click(ip_address=...)), "missing field ip_address", id="missing-ip"),
        pytest.param(encode(click(user_id=None)), "missing field user_id", id="null-user-id"),
        pytest.param(encode(click(ad_id="three")), "ad_id is not an integer: three", id="ad-id-word"),
        pytest.param(encode(click(ad_id=3.5)), "ad_id is not an integer", id="ad-id-float"),
        pytest.param(encode(click(timestamp_ms=-1)), "timestamp_ms out of range", id="negative-timestamp"),
        pytest.param(encode(click(timestamp_ms=MAX_TIMESTAMP_MS)), "timestamp_ms out of range", id="ts-at-max"),
        pytest.param(encode(click(timestamp_ms="soon")), "timestamp_ms is not an integer", id="ts-word"),
        pytest.param(encode(click(ip_address="300.1.1.1")), "ip_address is not an IPv4 or IPv6", id="ip-300"),
        pytest.param(encode(click(ip_address="2001:db8::zz")), "ip_address is not an IPv4 or IPv6", id="bad-ipv6"),
        pytest.param(encode(click(ip_address="10.0.0")), "ip_address is not an IPv4 or IPv6", id="short-ipv4"),
        pytest.param(encode(click(user_id={"id": 1})), "user_id must be a string", id="user-id-object"),
        pytest.param(encode(click(user_id=["a"])), "user_id must be a string", id="user-id-array"),
        pytest.param(encode(click(click_id="a\u0001b")), "click_id contains control characters", id="click-id-ctrl"),
        pytest.param(encode(click(click_id="")), "click_id is empty", id="click-id-empty"),
        pytest.param(encode(click(user_id="x" * 257)), "user_id is longer than 256", id="user-id-too-long"),
    ],
)
def test_dead_letter_reasons(value, reason):
    error = error_of(value)
    assert reason in error, error


def test_oversized_message_is_dead_lettered_before_parsing():
    value = encode(click(pad="x" * 500))
    error = error_of(value, max_message_bytes=100)
    assert error == f"oversized message: {len(value)} bytes > max_message_bytes 100"


def test_dead_letter_keeps_the_original_bytes():
    values = [b"not json", b"", None, b'{\n "click_id": "c", \n "ad_id": "x"\n}']
    batch = decode_events(raw_frame(values, first_offset=10), MAX_BYTES)
    assert batch.events.height == 0
    assert batch.dead_letters["kafka_offset"].to_list() == [10, 11, 12, 13]
    # null values are stored as empty bytes; pretty-printed values keep their line breaks
    assert batch.dead_letters["raw_value"].to_list() == [b"not json", b"", b"", values[3]]


def test_mixed_batch_accounts_every_offset_once():
    values = [
        encode(click(click_id="ok-1")),
        b"not json",
        encode(click(click_id="ok-2", ad_id="5")),
        b"[1, 2]",
        b"",
        encode(click(timestamp_ms=-5)),
        encode(click(click_id="ok-3", ip_address="::1")),
        b"   ",
        json.dumps(click(click_id="ok-4"), indent=4).encode(),
        encode(click(user_id={"nested": True})),
    ]
    raw = raw_frame(values, partition=1, first_offset=500)
    batch = decode_events(raw, MAX_BYTES)
    result = assert_accounted(raw, batch)
    assert batch.events["click_id"].to_list() == ["ok-1", "ok-2", "ok-3", "ok-4"]
    assert batch.events["kafka_offset"].to_list() == [500, 502, 506, 508]
    assert sorted(k[1] for k, v in result.items() if v[0] == "dead") == [501, 503, 504, 505, 507, 509]
    assert batch.dead_letters["kafka_offset"].is_sorted()


# --------------------------------------------------------------------------------------------------------
# Determinism per message, whatever else shares the batch
# --------------------------------------------------------------------------------------------------------

TRICKY_VALUES: list[bytes | None] = [
    b"not json",
    b'{"click_id":"c1","user_id":"u1","ad_id":3,"timestam',
    b'["m", 3]',
    b"",
    None,
    b"   ",
    b"\t",
    b"{}",
    b"null",
    b'"text"',
    b"17",
    b'{"a":1}{"b":2}',
    b'{"a":1} {"b":2}',
    b'{"click_id":"x"} trailing',
    b"\xff\xfe{}",
    b'{"click_id":"\xff","user_id":"u","ad_id":1,"timestamp_ms":1,"ip_address":"1.1.1.1"}',
    b'{"click_id":"\\ud800","user_id":"u","ad_id":1,"timestamp_ms":1,"ip_address":"1.1.1.1"}',
    b'{"click_id":"a","user_id":"u","ad_id":1e400,"timestamp_ms":1,"ip_address":"1.1.1.1"}',
    b'{"click_id":"a","user_id":"u","ad_id":99999999999999999999999,"timestamp_ms":1,"ip_address":"1.1.1.1"}',
    b'{"click_id":"a","user_id":"u","ad_id":1.0,"timestamp_ms":1e3,"ip_address":"1.1.1.1"}',
    b'{"click_id":"a","click_id":"b","user_id":"u","ad_id":1,"timestamp_ms":1,"ip_address":"1.1.1.1"}',
    b'{"click_id":"a","user_id":"u","ad_id":1,"timestamp_ms":1,"ip_address":"1.1.1.1","deep":'
    + b"[" * 3000
    + b"]" * 3000
    + b"}",
    b'{"click_id":"a","user_id":"u","ad_id":NaN,"timestamp_ms":1,"ip_address":"1.1.1.1"}',
    b'{"click_id":"a","user_id":"u","ad_id":true,"timestamp_ms":1,"ip_address":"1.1.1.1"}',
    b'{"click_id":"a\nb","user_id":"u","ad_id":1,"timestamp_ms":1,"ip_address":"1.1.1.1"}',
    b'{"click_id":"a","user_id":"u","ad_id":" 12 ","timestamp_ms":"+5","ip_address":"1.1.1.1"}',
    b'{"click_id":"a","user_id":"u","ad_id":1,"timestamp_ms":1,"ip_address":"fe80::1%eth0"}',
    b'{"click_id":"a","user_id":"u","ad_id":1,"timestamp_ms":1,"ip_address":"01.2.3.4"}',
    encode(click(click_id="x" * 300)),
    encode(click(ad_id="three")),
    encode(click(timestamp_ms=-1)),
    encode(click(timestamp_ms=MAX_TIMESTAMP_MS)),
    encode(click(ip_address="300.1.1.1")),
    encode(click(ip_address="2001:db8::1")),
    encode(click(user_id={"id": 1})),
    encode(click(click_id="c\u0007")),
    encode(click(ad_id=...)),
    encode(click(click_id="ünï©ødé ✓", user_id="😀")),
    json.dumps(click(click_id="pretty"), indent=2).encode(),
    json.dumps(click(click_id="pretty-crlf"), indent=2).replace("\n", "\r\n").encode(),
    encode(click(pad="y" * 9_000)),  # oversized at the limit used below
]
DETERMINISM_MAX_BYTES = 8_192


def regular_value(i: int) -> bytes:
    ad_id: object = i % 97 if i % 11 else str(i % 97)
    ip = f"10.{i % 256}.{(i // 256) % 256}.{i % 7}" if i % 13 else f"2001:db8::{i % 65_536:x}"
    extra = ',"ctx":{"page":"p","n":[1,2]}' if i % 17 == 0 else ""
    return (
        f'{{"click_id":"r{i}","user_id":"u{i % 1000}","ad_id":{json.dumps(ad_id)},'
        f'"timestamp_ms":{1_700_000_000_000 + i},"ip_address":"{ip}"{extra}}}'
    ).encode()


def outcome_alone(value: bytes | None) -> tuple:
    batch = decode_one(value, DETERMINISM_MAX_BYTES)
    (only,) = outcomes(batch).values()
    return only


@pytest.fixture(scope="module")
def alone_outcomes() -> list[tuple]:
    return [outcome_alone(v) for v in TRICKY_VALUES]


def test_tricky_values_cover_both_outcomes_and_every_parse_path(alone_outcomes):
    kinds = {kind for kind, _ in alone_outcomes}
    assert kinds == {"event", "dead"}
    errors = [payload for kind, payload in alone_outcomes if kind == "dead"]
    # strict parser rejects (nesting deeper than its limit included); size screening
    assert any(e.startswith("invalid JSON: ") and "NDJSON" not in e for e in errors)
    assert any("depth limit" in e for e in errors)
    assert any(e.startswith("oversized message") for e in errors)
    assert any(e.startswith("not a JSON object") for e in errors)


def test_small_batch_decodes_each_value_as_alone(alone_outcomes):
    values: list[bytes | None] = [regular_value(i) for i in range(50)]
    for j, tricky in enumerate(TRICKY_VALUES):
        values.insert((j * 7) % len(values), tricky)
    raw = raw_frame(values)
    result = assert_accounted(raw, decode_events(raw, DETERMINISM_MAX_BYTES))
    for j, tricky in enumerate(TRICKY_VALUES):
        offsets = [i for i, v in enumerate(values) if v is tricky]
        assert offsets, j
        for offset in offsets:
            assert result[(0, offset)] == alone_outcomes[j], (j, tricky)


def test_large_mixed_batch_decodes_each_value_as_alone(alone_outcomes):
    n = FAST_PATH_CHUNK + 4_500
    values: list[bytes | None] = [regular_value(i) for i in range(n)]
    tricky_at: dict[int, int] = {}
    # sprinkle the tricky values over both fast-path chunks, including around the chunk boundary
    spots = [0, 1, FAST_PATH_CHUNK - 2, FAST_PATH_CHUNK - 1, FAST_PATH_CHUNK, FAST_PATH_CHUNK + 1, n - 1]
    spots += list(range(37, n, 1_511))
    for k, spot in enumerate(spots):
        j = k % len(TRICKY_VALUES)
        values[spot] = TRICKY_VALUES[j]
        tricky_at[spot] = j
    raw = raw_frame(values, partition=2)
    batch = decode_events(raw, DETERMINISM_MAX_BYTES)
    result = assert_accounted(raw, batch)

    for spot, j in tricky_at.items():
        assert result[(2, spot)] == alone_outcomes[j], (spot, TRICKY_VALUES[j])

    # every regular value is an event in the large batch, with the fields it has alone
    regular = [i for i in range(n) if i not in tricky_at]
    assert all(result[(2, i)][0] == "event" for i in regular)
    for i in regular[::4_999]:
        assert result[(2, i)] == outcome_alone(values[i])

    # the same values cut into differently sized batches decode identically
    for size in (1_000, 7_919):
        pieces = {}
        for first in range(0, n, size):
            pieces.update(outcomes(decode_events(raw.slice(first, size), DETERMINISM_MAX_BYTES)))
        assert pieces == result


# --------------------------------------------------------------------------------------------------------
# Property: never raises, every offset accounted exactly once, batch == alone
# --------------------------------------------------------------------------------------------------------

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
)
json_values = st.recursive(
    json_scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)
field_values = (
    json_values
    | st.integers(min_value=-10, max_value=MAX_TIMESTAMP_MS + 10).map(str)
    | st.sampled_from(["10.0.0.1", "300.1.1.1", "2001:db8::1", "::ffff:1.2.3.4", "", " 5 ", "c\u0000"])
)


@st.composite
def json_documents(draw) -> bytes:
    document = {}
    for name in ("click_id", "user_id", "ad_id", "timestamp_ms", "ip_address"):
        if draw(st.booleans()) or draw(st.booleans()):
            document[name] = draw(field_values)
    document.update(draw(st.dictionaries(st.text(max_size=8), json_values, max_size=3)))
    text = json.dumps(document, ensure_ascii=draw(st.booleans()), indent=draw(st.sampled_from([None, 2])))
    return text.encode()


message_values = (
    st.binary(max_size=200)
    | json_documents()
    | json_values.map(lambda v: json.dumps(v).encode())
    | st.text(max_size=60).map(str.encode)
    | st.none()
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(values=st.lists(message_values, max_size=8))
def test_property_never_raises_and_accounts_every_offset(values):
    raw = raw_frame(values, partition=4, first_offset=1_000)
    batch = decode_events(raw, 300)
    result = assert_accounted(raw, batch)
    assert batch.events.schema == pl.Schema(EVENT_SCHEMA)
    for (_, offset), (kind, payload) in result.items():
        if kind == "event":
            click_id, user_id, ad_id, timestamp_ms, ip = payload
            assert click_id and user_id and ip
            assert 0 <= timestamp_ms < MAX_TIMESTAMP_MS
            assert isinstance(ad_id, int)
        else:
            assert isinstance(payload, str) and payload
        # the same value alone decodes exactly the same way
        alone = decode_events(raw_frame([values[offset - 1_000]], partition=4, first_offset=offset), 300)
        assert outcomes(alone) == {(4, offset): (kind, payload)}


def test_raw_line_break_inside_a_string_is_a_dead_letter():
    value = b'{"click_id":"a\nb","user_id":"u","ad_id":1,"timestamp_ms":1,"ip_address":"1.1.1.1"}'
    with pytest.raises(json.JSONDecodeError):
        json.loads(value)  # strict JSON rejects it
    assert "invalid JSON" in error_of(value)


def test_absurdly_deep_nesting_is_a_dead_letter_not_a_crash():
    value = b'{"click_id":"x","a":' + b'{"a":' * 100_000 + b"1" + b"}" * 100_001
    assert error_of(value, max_message_bytes=10**9).startswith("invalid JSON")


@settings(max_examples=300, deadline=None)
@given(
    value=message_values
    | st.sampled_from([v for v in TRICKY_VALUES if v is not None])
    | st.tuples(message_values, st.sampled_from([b" ", b"\n", b"x", b"{}", b"\x00"])).map(
        lambda p: (p[0] or b"") + p[1]
    )
)
def test_polars_reads_no_object_from_a_value_that_cannot_hold_one(value):
    # decode skips polars' costly single-value call for such values; this holds polars to that promise.
    if value is None or decode.may_hold_an_object(value):
        return
    text_schema = {name: pl.String() for name in SOURCE.fields}  # as decode parses them
    assert decode._parse_chunk(pl.Series([value], dtype=pl.Binary), text_schema) is None
