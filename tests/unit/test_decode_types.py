"""Unit tests of clickhouse_etl.steps.decode.decode_events for every field type a pipeline file can declare: what
each type accepts and how it is typed, what it refuses and with which reason, and optional fields."""

from __future__ import annotations

import json
import textwrap
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import polars as pl
import pytest

from clickhouse_etl.core.pipeline.loading import load_pipeline_file
from clickhouse_etl.core.pipeline.model import Source
from clickhouse_etl.core.pipeline.types import FIELD_TYPE_NAMES
from clickhouse_etl.steps.decode import RAW_SCHEMA, DecodedBatch, decode_events

MISSING = object()  # the field is absent from the event
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
MAX_MS = 4_102_444_800_000  # 2100-01-01 00:00 UTC: the first timestamp refused
MAX_S = 4_102_444_800

# One declaration per field type a pipeline file may use (decimal and timestamp with their parameters).
DECLARED = {
    "string": "string",
    "int64": "int64",
    "float64": "float64",
    "decimal(p,s)": "decimal(5,2)",
    "bool": "bool",
    "timestamp(ms)": "timestamp(ms)",
    "timestamp(s)": "timestamp(s)",
    "ip": "ip",
    "uuid": "uuid",
}
TYPED = {
    "string": pl.String(),
    "int64": pl.Int64(),
    "float64": pl.Float64(),
    "decimal(p,s)": pl.Decimal(5, 2),
    "bool": pl.Boolean(),
    "timestamp(ms)": pl.Datetime("ms", "UTC"),
    "timestamp(s)": pl.Datetime("ms", "UTC"),
    "ip": pl.String(),
    "uuid": pl.String(),
}
UUID = "550e8400-e29b-41d4-a716-446655440000"


def source(**fields: Any) -> Source:
    return Source.model_validate({"topic": "typed", "fields": fields})


def encode(document: Any) -> bytes:
    return document if isinstance(document, bytes) else json.dumps(document).encode()


def decode(src: Source, documents: list[Any]) -> DecodedBatch:
    frame = pl.DataFrame(
        {
            "kafka_partition": [0] * len(documents),
            "kafka_offset": list(range(len(documents))),
            "value": [encode(d) for d in documents],
        },
        schema=RAW_SCHEMA,
    )
    return decode_events(frame, src)


def outcomes(src: Source, documents: list[Any]) -> list[tuple[str, Any]]:
    """Per document, in order: ("event", the value of field x) or ("dead", the reason); each offset exactly once."""
    batch = decode(src, documents)
    events = {row["kafka_offset"]: row["x"] for row in batch.events.iter_rows(named=True)}
    dead = dict(zip(batch.dead_letters["kafka_offset"].to_list(), batch.dead_letters["error"].to_list(), strict=True))
    assert not set(events) & set(dead)
    assert set(events) | set(dead) == set(range(len(documents)))
    return [("event", events[i]) if i in events else ("dead", dead[i]) for i in range(len(documents))]


def event_of(value: Any) -> Any:
    return {} if value is MISSING else {"x": value}


def decoded(spec: Any, value: Any) -> Any:
    """The typed value of field x declared `spec`, asserting the event was accepted."""
    [(kind, result)] = outcomes(source(x=spec), [event_of(value)])
    assert kind == "event", f"{value!r} was refused: {result}"
    return result


def refused(spec: Any, value: Any) -> str:
    """The dead-letter reason of an event whose field x declared `spec` holds `value`."""
    [(kind, result)] = outcomes(source(x=spec), [event_of(value)])
    assert kind == "dead", f"{value!r} was accepted as {result!r}"
    return result


def test_every_declarable_field_type_is_covered() -> None:
    """These tests declare each field type the pipeline files know, so a new type needs its tests here."""
    assert tuple(DECLARED) == FIELD_TYPE_NAMES
    assert tuple(TYPED) == FIELD_TYPE_NAMES


def test_a_pipeline_file_with_every_field_type_decodes_typed_columns(tmp_path: Path) -> None:
    """From a pipeline file: one field of each type; the events have their typed columns, then the position."""
    fields = "\n".join(f"    f{i}: {declared!r}" for i, declared in enumerate(DECLARED.values()))
    path = tmp_path / "typed.yaml"
    path.write_text(
        f"name: typed\nsource:\n  topic: typed\n  fields:\n{textwrap.indent(fields, '  ')}\nsink: {{table: t}}\n"
    )
    src = load_pipeline_file(path, environment={}).pipeline.source
    values = ["text", "42", 2.5, "12.34", True, 1_700_000_000_123, 1_700_000_000, "10.1.2.3", UUID.upper()]
    batch = decode(src, [{f"f{i}": value for i, value in enumerate(values)}])
    assert batch.dead_letters.height == 0
    assert dict(batch.events.schema) == {
        **{f"f{i}": dtype for i, dtype in enumerate(TYPED.values())},
        "kafka_partition": pl.UInt32(),
        "kafka_offset": pl.UInt64(),
    }
    assert batch.events.row(0) == (
        "text",
        42,
        2.5,
        Decimal("12.34"),
        True,
        datetime(2023, 11, 14, 22, 13, 20, 123_000, tzinfo=UTC),
        datetime(2023, 11, 14, 22, 13, 20, tzinfo=UTC),
        "10.1.2.3",
        UUID,
        0,
        0,
    )


def test_empty_batch_has_the_typed_columns() -> None:
    """No values: no events and no dead letters, the events still typed as declared."""
    batch = decode(source(**{f"f{i}": d for i, d in enumerate(DECLARED.values())}), [])
    assert batch.events.height == 0
    assert batch.dead_letters.height == 0
    assert list(batch.events.schema.values())[: len(TYPED)] == list(TYPED.values())


# --- string -------------------------------------------------------------------------------------------------------

STRICT_TEXT = {"type": "string", "max_length": 5, "allow_empty": False, "allow_control_characters": False}


@pytest.mark.parametrize("value", ["abcde", "a", "éééé", "日本語テキ", "a b c", "12"])
def test_string_within_its_rules_is_kept_as_is(value: str) -> None:
    """Text up to max_length characters (not bytes), non-empty, without control characters."""
    assert len(value) <= 5
    assert decoded(STRICT_TEXT, value) == value


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("abcdef", "x is longer than 5 characters"),
        ("éééééé", "x is longer than 5 characters"),
        ("", "x is empty"),
        ("a\tb", "x contains control characters"),
        ("a\nb", "x contains control characters"),
        ("\x00", "x contains control characters"),
        ("a\x7f", "x contains control characters"),
        ({}, "x must be a string, not an object or array"),
        ([1], "x must be a string, not an object or array"),
        (["a"], "x must be a string, not an object or array"),
    ],
)
def test_string_breaking_its_rules_is_refused(value: Any, reason: str) -> None:
    """max_length, allow_empty: false and allow_control_characters: false each refuse with their own reason."""
    assert refused(STRICT_TEXT, value) == reason


@pytest.mark.parametrize("value", ["", "a\tb\n\x00\x1f\x7f", "x" * 10_000])
def test_string_by_default_accepts_empty_long_and_control_text(value: str) -> None:
    """A plain string field has no length limit and accepts the empty string and control characters."""
    assert decoded("string", value) == value


@pytest.mark.parametrize("value", [{"a": 1}, ["a", "b"], [], {"nested": {"deeper": [1, 2]}}])
def test_string_by_default_refuses_objects_and_arrays(value: Any) -> None:
    """Even without rules, a string field refuses a JSON object or array."""
    assert refused("string", value) == "x must be a string, not an object or array"


def test_a_string_starting_with_a_bracket_is_still_a_string() -> None:
    """A JSON string is text whatever its first character: only real objects and arrays are refused."""
    values = ["[v1]/chat", "{draft}", "[", "{"]
    assert outcomes(source(x="string"), [{"x": value} for value in values]) == [("event", value) for value in values]


def test_string_numbers_are_kept_as_their_text() -> None:
    """A JSON number given for a string field is kept as its text."""
    assert decoded("string", 12) == "12"


# --- int64 ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (7, 7),
        (0, 0),
        (-12, -12),
        ("7", 7),
        (" 7 ", 7),
        ("-5", -5),
        ("+5", 5),
        (9_223_372_036_854_775_807, 9_223_372_036_854_775_807),
        (-9_223_372_036_854_775_808, -9_223_372_036_854_775_808),
    ],
)
def test_int64_accepts_integers_and_numeric_strings(value: Any, expected: int) -> None:
    """Integers and integer text (trimmed) become Int64 values."""
    assert decoded("int64", value) == expected


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (1.5, "1.5"),
        ("1.5", "1.5"),
        ("seven", "seven"),
        ("1e3", "1e3"),
        ("0x10", "0x10"),
        ("", ""),
        (True, "true"),
        (9_223_372_036_854_775_808, "9223372036854775808"),
    ],
)
def test_int64_refuses_fractions_words_and_overflow(value: Any, text: str) -> None:
    """A value that is not an integer in range is refused, quoting the value."""
    assert refused("int64", value) == f"x is not an integer: {text}"


# --- float64 -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [(2.5, 2.5), (7, 7.0), (-0.125, -0.125), ("2.5", 2.5), (" 3.25 ", 3.25), ("1e3", 1000.0), (1e308, 1e308)],
)
def test_float64_accepts_numbers_and_numeric_strings(value: Any, expected: float) -> None:
    """Numbers and numeric text (trimmed, exponents allowed) become Float64 values."""
    result = decoded("float64", value)
    assert isinstance(result, float)
    assert result == expected


@pytest.mark.parametrize("value", ["NaN", "nan", "Infinity", "-Infinity", "inf", "1e309", "abc", "", True])
def test_float64_refuses_nan_infinity_and_words(value: Any) -> None:
    """Only finite numbers: NaN, infinities (also by overflow) and words are refused, quoting the value."""
    reason = refused("float64", value)
    assert reason.startswith("x is not a finite number: ")
    assert reason == f"x is not a finite number: {json.dumps(value) if value is True else value}"


@pytest.mark.parametrize("raw", [b'{"x": NaN}', b'{"x": Infinity}', b'{"x": -Infinity}'])
def test_float64_bare_nan_and_infinity_are_not_json(raw: bytes) -> None:
    """NaN and Infinity without quotes are not JSON: the event is dead-lettered."""
    [(kind, reason)] = outcomes(source(x="float64"), [raw])
    assert kind == "dead"
    assert reason.startswith("invalid JSON")


# --- decimal(p,s) --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("123.45", Decimal("123.45")),
        ("999.99", Decimal("999.99")),
        ("-999.99", Decimal("-999.99")),
        (1.5, Decimal("1.50")),
        (0, Decimal("0.00")),
        (" 12.3 ", Decimal("12.30")),
    ],
)
def test_decimal_values_are_typed_with_their_precision_and_scale(value: Any, expected: Decimal) -> None:
    """decimal(5,2): numbers and numeric text become Decimal(5, 2) values."""
    batch = decode(source(x="decimal(5,2)"), [{"x": value}])
    assert batch.events.schema["x"] == pl.Decimal(5, 2)
    assert batch.events["x"].to_list() == [expected]


@pytest.mark.parametrize(
    ("value", "text"),
    [("1000", "1000"), ("1234.5", "1234.5"), ("-1000.00", "-1000.00"), ("abc", "abc"), ("1,5", "1,5"), (True, "true")],
)
def test_decimal_refuses_overflow_and_words(value: Any, text: str) -> None:
    """decimal(5,2) holds at most 3 integer digits: more is refused, as are words, quoting the value."""
    assert refused("decimal(5,2)", value) == f"x is not a decimal: {text}"


def test_decimal_of_the_largest_precision() -> None:
    """decimal(38,0) holds 38 digits and refuses 39."""
    assert decoded("decimal(38,0)", "9" * 38) == Decimal("9" * 38)
    assert decoded("decimal(38,0)", "-" + "9" * 38) == Decimal("-" + "9" * 38)
    assert refused("decimal(38,0)", "1" * 39) == f"x is not a decimal: {'1' * 39}"


# --- bool ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (True, True),
        (False, False),
        (1, True),
        (0, False),
        ("true", True),
        ("false", False),
        ("1", True),
        ("0", False),
        ("TRUE", True),
        ("False", False),
        (" true ", True),
    ],
)
def test_bool_accepts_true_false_one_and_zero(value: Any, expected: bool) -> None:
    """true/false and 1/0, as JSON values or their text (any case, trimmed), become booleans."""
    assert decoded("bool", value) is expected


@pytest.mark.parametrize(
    ("value", "text"), [("yes", "yes"), ("no", "no"), ("t", "t"), (2, "2"), (-1, "-1"), (1.5, "1.5"), ("", "")]
)
def test_bool_refuses_anything_else(value: Any, text: str) -> None:
    """yes/no, t, other numbers and the empty string are refused, quoting the value."""
    assert refused("bool", value) == f"x is not a boolean (true or false): {text}"


# --- timestamp(ms) and timestamp(s) --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (1_700_000_000_123, datetime(2023, 11, 14, 22, 13, 20, 123_000, tzinfo=UTC)),
        ("1700000000123", datetime(2023, 11, 14, 22, 13, 20, 123_000, tzinfo=UTC)),
        (0, EPOCH),
        (MAX_MS - 1, datetime(2099, 12, 31, 23, 59, 59, 999_000, tzinfo=UTC)),
    ],
)
def test_timestamp_ms_is_a_utc_datetime_in_milliseconds(value: Any, expected: datetime) -> None:
    """timestamp(ms): milliseconds since the epoch become a Datetime("ms", "UTC")."""
    batch = decode(source(x="timestamp(ms)"), [{"x": value}])
    assert batch.events.schema["x"] == pl.Datetime("ms", "UTC")
    assert batch.events["x"].to_list() == [expected]
    assert expected == EPOCH + timedelta(milliseconds=int(value))


def test_timestamp_without_a_unit_is_milliseconds() -> None:
    """A bare `timestamp` is timestamp(ms)."""
    assert decoded("timestamp", 1_700_000_000_123) == decoded("timestamp(ms)", 1_700_000_000_123)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (1_700_000_000, datetime(2023, 11, 14, 22, 13, 20, tzinfo=UTC)),
        ("1700000000", datetime(2023, 11, 14, 22, 13, 20, tzinfo=UTC)),
        (0, EPOCH),
        (MAX_S - 1, datetime(2099, 12, 31, 23, 59, 59, tzinfo=UTC)),
    ],
)
def test_timestamp_s_is_seconds_multiplied_into_milliseconds(value: Any, expected: datetime) -> None:
    """timestamp(s): seconds since the epoch, held as a Datetime("ms", "UTC") of the same instant."""
    batch = decode(source(x="timestamp(s)"), [{"x": value}])
    assert batch.events.schema["x"] == pl.Datetime("ms", "UTC")
    assert batch.events["x"].to_list() == [expected]
    assert batch.events["x"].dt.epoch("ms").to_list() == [int(value) * 1000]


@pytest.mark.parametrize(
    ("declared", "value", "reason"),
    [
        ("timestamp(ms)", MAX_MS, f"x out of range [0, {MAX_MS}): {MAX_MS}"),
        ("timestamp(ms)", -1, f"x out of range [0, {MAX_MS}): -1"),
        ("timestamp(s)", MAX_S, f"x out of range [0, {MAX_S}): {MAX_S}"),
        ("timestamp(s)", -1, f"x out of range [0, {MAX_S}): -1"),
        ("timestamp(s)", 1_700_000_000_000, f"x out of range [0, {MAX_S}): 1700000000000"),  # milliseconds given
        ("timestamp(ms)", 1.5, "x is not an integer: 1.5"),
        ("timestamp(s)", "2023-11-14T22:13:20Z", "x is not an integer: 2023-11-14T22:13:20Z"),
    ],
)
def test_timestamps_out_of_range_or_not_integers_are_refused(declared: str, value: Any, reason: str) -> None:
    """Timestamps must be integers in [1970, 2100): the reason names the bound in the field's own unit."""
    assert refused(declared, value) == reason


# --- ip ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    ["10.1.2.3", "0.0.0.0", "255.255.255.255", "::1", "::", "2001:db8::1", "2001:DB8::1", "::ffff:10.0.0.1", "fe80::1"],
)
def test_ip_accepts_ipv4_and_ipv6_addresses_as_given(value: str) -> None:
    """IPv4 and IPv6 addresses are kept as text, exactly as given."""
    assert decoded("ip", value) == value


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("256.1.1.1", "x is not an IPv4 or IPv6 address: 256.1.1.1"),
        ("1.2.3", "x is not an IPv4 or IPv6 address: 1.2.3"),
        ("1.2.3.4.5", "x is not an IPv4 or IPv6 address: 1.2.3.4.5"),
        ("01.2.3.4", "x is not an IPv4 or IPv6 address: 01.2.3.4"),
        (" 10.1.2.3", "x is not an IPv4 or IPv6 address:  10.1.2.3"),
        ("2001:db8:::1", "x is not an IPv4 or IPv6 address: 2001:db8:::1"),
        ("fe80::1%eth0", "x is not an IPv4 or IPv6 address: fe80::1%eth0"),
        ("not an ip", "x is not an IPv4 or IPv6 address: not an ip"),
        (167_772_161, "x is not an IPv4 or IPv6 address: 167772161"),
        ("", "x is empty"),
        ("10.1.2.3\n", "x contains control characters"),
        ("1" * 300, "x is longer than 256 characters"),
    ],
)
def test_ip_refuses_malformed_addresses(value: Any, reason: str) -> None:
    """Anything but an address is refused; an ip field is also held to an address's length and characters."""
    assert refused("ip", value) == reason


# --- uuid ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [UUID, UUID.upper(), "550E8400-e29b-41D4-a716-446655440000"])
def test_uuid_is_accepted_in_any_case_and_stored_lower_case(value: str) -> None:
    """UUIDs are matched case-insensitively and kept lower-case."""
    assert decoded("uuid", value) == UUID


@pytest.mark.parametrize(
    "value",
    [
        UUID.replace("-", ""),
        UUID[:-1],
        UUID[:-1] + "g",
        UUID + "0",
        " " + UUID,
        "urn:uuid:" + UUID,
        "",
    ],
)
def test_uuid_refuses_malformed_text(value: str) -> None:
    """Anything but the 8-4-4-4-12 hex form is refused, quoting the value."""
    assert refused("uuid", value) == f"x is not a UUID: {value}"


# --- every type together, and optional fields ----------------------------------------------------------------------

GOOD = {
    "string": "text",
    "int64": 42,
    "float64": 2.5,
    "decimal(p,s)": "1.25",
    "bool": False,
    "timestamp(ms)": 1_700_000_000_000,
    "timestamp(s)": 1_700_000_000,
    "ip": "::1",
    "uuid": UUID,
}
BAD = {
    "string": {"nested": True},
    "int64": "forty-two",
    "float64": "NaN",
    "decimal(p,s)": "12345",
    "bool": "yes",
    "timestamp(ms)": -5,
    "timestamp(s)": MAX_S,
    "ip": "10.0.0.256",
    "uuid": "not-a-uuid",
}


@pytest.mark.parametrize("name", FIELD_TYPE_NAMES)
def test_a_batch_decides_each_value_as_if_alone(name: str) -> None:
    """Good and bad values of one type in one batch get the outcome each gets alone."""
    declared = DECLARED[name]
    values = [GOOD[name], BAD[name], MISSING, None, GOOD[name]]
    together = outcomes(source(x=declared), [event_of(v) for v in values])
    alone = [outcomes(source(x=declared), [event_of(v)])[0] for v in values]
    assert together == alone
    assert [kind for kind, _ in together] == ["event", "dead", "dead", "dead", "event"]
    assert together[2] == together[3] == ("dead", "missing field x")


@pytest.mark.parametrize("name", FIELD_TYPE_NAMES)
def test_an_optional_field_takes_missing_and_null_as_null_but_refuses_a_bad_value(name: str) -> None:
    """`required: false`: absent or null is NULL; a present value is still checked like a required one."""
    optional = {"type": DECLARED[name], "required": False}
    results = outcomes(
        source(x=optional), [event_of(MISSING), event_of(None), event_of(GOOD[name]), event_of(BAD[name])]
    )
    assert results[0] == ("event", None)
    assert results[1] == ("event", None)
    assert results[2][0] == "event"
    assert results[2][1] is not None
    assert results[3] == ("dead", refused(DECLARED[name], BAD[name]))
    batch = decode(source(x=optional), [{}])
    assert batch.events.schema["x"] == TYPED[name]


@pytest.mark.parametrize("name", FIELD_TYPE_NAMES)
@pytest.mark.parametrize("value", [MISSING, None])
def test_a_required_field_missing_or_null_is_refused(name: str, value: Any) -> None:
    """A required field that is absent or null dead-letters the event with `missing field <name>`."""
    assert refused(DECLARED[name], value) == "missing field x"


def test_a_missing_field_is_reported_before_a_bad_value_of_another() -> None:
    """Checks run in a fixed order: missing fields first, whatever the other fields hold."""
    src = source(a="int64", b="uuid")
    [(kind, reason)] = outcomes(src, [{"a": "not a number"}])
    assert (kind, reason) == ("dead", "missing field b")


def test_a_bad_value_dead_letters_the_whole_event_keeping_its_bytes() -> None:
    """One bad field refuses the event; the dead letter keeps the original bytes and the position."""
    src = source(a="int64", b="bool", c={"type": "string", "required": False})
    documents = [{"a": 1, "b": True}, {"a": 2, "b": "maybe", "c": "x"}, {"a": "3", "b": "0", "c": None}]
    batch = decode(src, documents)
    assert batch.events.select("a", "b", "c", "kafka_offset").rows() == [(1, True, None, 0), (3, False, None, 2)]
    assert batch.dead_letters.select("kafka_offset", "raw_value", "error").rows() == [
        (1, encode(documents[1]), "b is not a boolean (true or false): maybe")
    ]
