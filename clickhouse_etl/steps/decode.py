"""Decode: raw Kafka values → typed events of the pipeline's source fields, and dead letters with a reason.

The fast path parses a whole chunk of values as NDJSON with polars and an explicit all-text schema, then
coerces and validates column-wise. A chunk that fails to parse is narrowed down: values that a strict JSON
parser rejects (or that are not objects) are parsed alone, the rest again as a chunk, bisecting if needed.
Every value therefore gets exactly the result polars gives it when parsed alone, whatever else shares its
batch — which keeps replays of differently sized ranges identical.
"""

from __future__ import annotations

import json
import socket
from dataclasses import dataclass

import orjson
import polars as pl

from clickhouse_etl.core.pipeline.model import Source, SourceField
from clickhouse_etl.core.pipeline.types import DATETIME_MS, UUID_PATTERN

# Text that is an identifier, a name or an address is never this long; ip fields are held to it.
IP_MAX_CHARS = 256
# Timestamps outside [1970, 2100) are rejected: a fixed bound, so a replay decides exactly as the first run.
MAX_TIMESTAMP_MS = 4_102_444_800_000
FAST_PATH_CHUNK = 65_536
JSON_WHITESPACE = b" \t\r\n"
IPV4 = r"^(25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)(\.(25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)){3}$"

RAW_SCHEMA = {"kafka_partition": pl.UInt32, "kafka_offset": pl.UInt64, "value": pl.Binary}
DEAD_LETTER_SCHEMA = {
    "kafka_partition": pl.UInt32,
    "kafka_offset": pl.UInt64,
    "raw_value": pl.Binary,
    "error": pl.String,
}


@dataclass(frozen=True)
class DecodedBatch:
    events: pl.DataFrame
    dead_letters: pl.DataFrame


def event_schema(source: Source) -> dict[str, pl.DataType]:
    """Columns of the decoded events: every source field, typed, then the Kafka position."""
    return {
        **{name: spec.field_type.polars for name, spec in source.fields.items()},
        "kafka_partition": pl.UInt32(),
        "kafka_offset": pl.UInt64(),
    }


def _ndjson(values: pl.Series) -> bytes:
    """The values as NDJSON lines, joined by polars (no Python object per value) when all are UTF-8."""
    text = values.cast(pl.String, strict=False)
    if text.null_count() == values.null_count():
        return text.str.join("\n").cast(pl.Binary).item() or b""
    return b"\n".join(values.to_list())  # the same bytes; invalid UTF-8 is then the parser's to reject


def _parse_chunk(values: pl.Series, text_schema: dict[str, pl.DataType]) -> pl.DataFrame | None:
    """All-text columns for `values`, or None if polars cannot parse them as one NDJSON chunk."""
    try:
        parsed = pl.read_ndjson(_ndjson(values), schema=text_schema)
    except Exception:
        return None
    return parsed if parsed.height == values.len() else None


def may_hold_an_object(value: bytes) -> bool:
    """False where polars' NDJSON reader never reads an object: the value, JSON whitespace stripped, does
    not start with `{` and end with `}` (a unit test holds polars to it). Such values skip its call, which
    costs about a millisecond each."""
    stripped = value.strip(JSON_WHITESPACE)
    return stripped[:1] == b"{" and stripped[-1:] == b"}"


def _parse_alone(value: bytes, text_schema: dict[str, pl.DataType]) -> tuple[dict[str, str | None] | None, str | None]:
    parsed = _parse_chunk(pl.Series([value], dtype=pl.Binary), text_schema) if may_hold_an_object(value) else None
    if parsed is not None:
        return parsed.row(0, named=True), None
    try:
        document = orjson.loads(value)
    except orjson.JSONDecodeError as error:
        return None, f"invalid JSON: {error}"
    if not isinstance(document, dict):
        return None, f"not a JSON object: top-level {type(document).__name__}"
    return None, "invalid JSON: rejected by the NDJSON parser"


def _strictly_valid(value: bytes) -> bool:
    try:
        return isinstance(orjson.loads(value), dict)
    except orjson.JSONDecodeError:
        return False


def _parse_values(values: pl.Series, looks_like_object: pl.Series, text_schema: dict[str, pl.DataType]) -> pl.DataFrame:
    """Text fields and parse_error per value, in order; each value parsed exactly as polars parses it alone.

    Values that do not even look like an object (`{…}`) are parsed alone at once; the rest go in chunks.
    A chunk that fails is narrowed: values a strict parser rejects are parsed alone, the rest bisected.
    """
    pieces: list[pl.DataFrame] = []
    single_indexes: list[int] = []
    single_rows: list[dict[str, str | None]] = []
    single_errors: list[str | None] = []

    def parse_alone(i: int) -> None:
        row, error = _parse_alone(values[i], text_schema)
        single_indexes.append(i)
        single_rows.append(row or dict.fromkeys(text_schema))
        single_errors.append(error)

    def narrow(indexes: pl.Series, prescreen: bool) -> None:
        # Indexes stay a Series: the common case (the whole chunk parses) does no Python work per value.
        chunk = values if indexes.len() == values.len() else values.gather(indexes)  # ascending, no repeats
        parsed = _parse_chunk(chunk, text_schema)
        if parsed is not None:
            pieces.append(parsed.with_columns(index=indexes))
        elif indexes.len() == 1:
            parse_alone(indexes[0])
        elif prescreen:
            valid = pl.Series([_strictly_valid(value) for value in chunk.to_list()], dtype=pl.Boolean)
            for i in indexes.filter(~valid).to_list():
                parse_alone(i)
            rest = indexes.filter(valid)
            if rest.len():
                narrow(rest, prescreen=False)
        else:
            middle = indexes.len() // 2
            narrow(indexes.slice(0, middle), prescreen=False)
            narrow(indexes.slice(middle), prescreen=False)

    objects = looks_like_object.arg_true().cast(pl.UInt32)
    for i in (~looks_like_object).arg_true().to_list():
        parse_alone(i)
    for first in range(0, objects.len(), FAST_PATH_CHUNK):
        narrow(objects.slice(first, FAST_PATH_CHUNK), prescreen=True)

    parse_error = pl.lit(None, dtype=pl.String).alias("parse_error")
    frames = [piece.with_columns(parse_error) for piece in pieces]
    if single_indexes:
        frames.append(
            pl.DataFrame(single_rows, schema=text_schema, orient="row").with_columns(
                index=pl.Series(single_indexes, dtype=pl.UInt32),
                parse_error=pl.Series(single_errors, dtype=pl.String),
            )
        )
    if not frames:
        return pl.DataFrame(schema={**text_schema, "parse_error": pl.String})
    merged = pl.concat(frames, how="vertical")
    # Chunks are parsed in ascending order; only values parsed alone come out of place.
    return (merged.sort("index") if single_indexes else merged).drop("index")


def _one_line(value: bytes) -> bytes:
    """A message spanning several lines as one NDJSON line, meaning unchanged.

    A valid object (pretty-printed, say) is re-serialized compactly; anything else stays as it is and is
    dead-lettered by the strict parser's verdict (a raw line break inside a string is invalid JSON).
    """
    try:
        document = orjson.loads(value)
    except orjson.JSONDecodeError:
        return value
    return orjson.dumps(document) if isinstance(document, dict) else value


def _screen(max_message_bytes: int) -> pl.Expr:
    size = pl.col("value").bin.size()
    return (
        pl.when(pl.col("value").is_null() | (size == 0))
        .then(pl.lit("empty message"))
        .when(size > max_message_bytes)
        .then(pl.format("oversized message: {} bytes > max_message_bytes {}", size, pl.lit(max_message_bytes)))
        .otherwise(pl.lit(None, dtype=pl.String))
    )


def _text_rules(name: str, spec: SourceField) -> tuple[int | None, bool, bool]:
    """(max length, empty allowed, control characters allowed); an ip field is held to an address's rules."""
    if spec.field_type.kind == "ip":
        return IP_MAX_CHARS, False, False
    return spec.max_length, spec.allow_empty, spec.allow_control_characters


def _converted(name: str, spec: SourceField) -> pl.Expr:
    """The typed value of a text column (null where it cannot be converted)."""
    text = pl.col(name)
    field_type = spec.field_type
    kind = field_type.kind
    if kind in ("string", "ip"):
        return text
    if kind == "uuid":
        return text.str.to_lowercase()
    trimmed = text.str.strip_chars()
    if kind == "int64":
        return trimmed.str.to_integer(strict=False)
    if kind == "float64":
        number = trimmed.cast(pl.Float64, strict=False)
        return pl.when(number.is_finite()).then(number)
    if kind == "decimal":
        return trimmed.cast(field_type.polars, strict=False)
    if kind == "bool":
        lowered = trimmed.str.to_lowercase()
        return pl.when(lowered.is_in(["true", "1"])).then(True).when(lowered.is_in(["false", "0"])).then(False)
    # timestamp: an integer count of ms or s since the epoch
    return trimmed.str.to_integer(strict=False)


def _timestamp_limit(spec: SourceField) -> int:
    return MAX_TIMESTAMP_MS if spec.field_type.unit == "ms" else MAX_TIMESTAMP_MS // 1000


def _validation_checks(source: Source) -> list[tuple[pl.Expr, pl.Expr]]:
    """(condition, reason) for every way a row of text fields can fail to be a valid event.

    Checks run in a fixed order — missing fields, text rules, conversions, ranges, addresses — so every
    value gets the same reason whatever the rest of the event holds.
    """
    fields = source.fields
    checks: list[tuple[pl.Expr, pl.Expr]] = []
    for name, spec in fields.items():
        if spec.required:
            checks.append((pl.col(name).is_null(), pl.lit(f"missing field {name}")))
    for name, spec in fields.items():
        if not spec.field_type.is_text:
            continue
        column = pl.col(name)
        max_length, allow_empty, allow_control = _text_rules(name, spec)
        if not allow_empty:
            checks.append((column.str.len_chars() == 0, pl.lit(f"{name} is empty")))
        if max_length is not None:
            checks.append(
                (column.str.len_chars() > max_length, pl.lit(f"{name} is longer than {max_length} characters"))
            )
        checks.append((pl.col(f"{name}__nested"), pl.lit(f"{name} must be a string, not an object or array")))
        if not allow_control:
            checks.append((column.str.contains(r"[\x00-\x1f\x7f]"), pl.lit(f"{name} contains control characters")))
    described = {
        "int64": "an integer",
        "timestamp": "an integer",
        "float64": "a finite number",
        "decimal": "a decimal",
        "bool": "a boolean (true or false)",
    }
    for name, spec in fields.items():
        kind = spec.field_type.kind
        if kind in described:
            checks.append(
                (
                    pl.col(name).is_not_null() & pl.col(f"{name}__typed").is_null(),
                    pl.format(f"{name} is not {described[kind]}: {{}}", pl.col(name).str.slice(0, 40)),
                )
            )
    for name, spec in fields.items():
        if spec.field_type.kind == "timestamp":
            limit = _timestamp_limit(spec)
            typed = pl.col(f"{name}__typed")
            checks.append(
                (
                    (typed < 0) | (typed >= limit),
                    pl.format(f"{name} out of range [0, {{}}): {{}}", pl.lit(limit), typed),
                )
            )
    for name, spec in fields.items():
        kind = spec.field_type.kind
        if kind == "ip":
            checks.append(
                (
                    pl.col(name).is_not_null() & ~pl.col(name).str.contains(IPV4) & ~pl.col(f"{name}__ipv6"),
                    pl.format(f"{name} is not an IPv4 or IPv6 address: {{}}", pl.col(name).str.slice(0, 60)),
                )
            )
        elif kind == "uuid":
            checks.append(
                (
                    pl.col(name).is_not_null() & ~pl.col(name).str.contains(UUID_PATTERN),
                    pl.format(f"{name} is not a UUID: {{}}", pl.col(name).str.slice(0, 60)),
                )
            )
    return checks


def _split_by_checks(checked: pl.DataFrame, source: Source) -> tuple[pl.DataFrame, pl.DataFrame]:
    """The rows of `checked` that pass every check, and the others with their `error`: the parse error, else
    the first failed check's reason.

    Conditions are evaluated on every row, reasons (formatted text) only on the few rows that fail one.
    """
    checks = _validation_checks(source)
    flags = [f"__check{i}" for i in range(len(checks))]
    flagged = checked.with_columns(
        *[condition.fill_null(False).alias(flag) for flag, (condition, _) in zip(flags, checks, strict=True)]
    ).with_columns(__failed=pl.any_horizontal(pl.col("parse_error").is_not_null(), *flags))
    reason = pl.lit(None, dtype=pl.String)
    for flag, (_, text) in reversed(list(zip(flags, checks, strict=True))):
        reason = pl.when(pl.col(flag)).then(text).otherwise(reason)
    failed = flagged.filter(pl.col("__failed")).with_columns(error=pl.coalesce(pl.col("parse_error"), reason))
    return flagged.filter(~pl.col("__failed")), failed


def _nested(values: pl.Series, text: pl.DataFrame, fields: list[str]) -> dict[str, pl.Series]:
    """Per text field, True where the event gave an object or an array instead of a string.

    The all-text parse turns a nested value into its JSON text, which looks like a string starting with
    `{` or `[`; only those few events are parsed again to tell `{"id": {"a": 1}}` from `{"id": "{a}"}`.
    """
    looks_nested = {
        name: (text[name].str.starts_with("{") | text[name].str.starts_with("[")).fill_null(False) for name in fields
    }
    suspects = pl.DataFrame(looks_nested).select(pl.any_horizontal(pl.all())).to_series() if fields else None
    nested = {name: flags.alias(f"{name}__nested") for name, flags in looks_nested.items()}
    for i in [] if suspects is None else suspects.arg_true().to_list():
        try:
            # The first of repeated keys, as the NDJSON reader takes it.
            document = json.loads(values[i], object_pairs_hook=lambda pairs: dict(reversed(pairs)))
        except (ValueError, RecursionError):
            document = {}  # parsed by polars but not by a strict parser: treated as nested, never as text
        for name in fields:
            if looks_nested[name][i]:
                nested[name][i] = not isinstance(document.get(name), str)
    return nested


def is_ipv6_address(address: str) -> bool:
    """The C library's own parser (inet_pton): no zone ids, no leading/trailing spaces."""
    try:
        socket.inet_pton(socket.AF_INET6, address)
    except (OSError, ValueError):
        return False
    return True


def _valid_ipv6(addresses: pl.Series) -> pl.Series:
    candidates = addresses.filter(addresses.str.contains(":")).unique().to_list()
    return addresses.is_in([address for address in candidates if is_ipv6_address(address)])


def _typed(name: str, spec: SourceField) -> pl.Expr:
    """The final column of a field: a timestamp becomes a UTC datetime in ms."""
    typed = pl.col(f"{name}__typed")
    if spec.field_type.kind == "timestamp":
        millis = typed if spec.field_type.unit == "ms" else typed * 1000
        return pl.from_epoch(millis, time_unit="ms").cast(DATETIME_MS).alias(name)
    return typed.cast(spec.field_type.polars).alias(name)


def decode_events(raw: pl.DataFrame, source: Source) -> DecodedBatch:
    """Split a raw batch (kafka_partition, kafka_offset, value) into typed events and dead letters.

    A chunk at a time: every value is decoded on its own merits (see the module's note), so the result is the
    same, while the text, typed and check columns of only one chunk are alive at once.
    """
    if raw.height <= FAST_PATH_CHUNK:
        return _decode_chunk(raw, source)
    decoded = [
        _decode_chunk(raw.slice(first, FAST_PATH_CHUNK), source) for first in range(0, raw.height, FAST_PATH_CHUNK)
    ]
    return DecodedBatch(
        events=pl.concat([chunk.events for chunk in decoded]),
        dead_letters=pl.concat([chunk.dead_letters for chunk in decoded]),
    )


def _decode_chunk(raw: pl.DataFrame, source: Source) -> DecodedBatch:
    text_schema: dict[str, pl.DataType] = {name: pl.String() for name in source.fields}
    screened = raw.with_columns(error=_screen(source.max_message_bytes))
    candidates = screened.filter(pl.col("error").is_null())
    values = candidates["value"]
    with_breaks = (values.bin.contains(b"\n") | values.bin.contains(b"\r")).arg_true()
    if with_breaks.len():
        one_line = [_one_line(value) for value in values.gather(with_breaks).to_list()]
        values = values.scatter(with_breaks, pl.Series(one_line, dtype=pl.Binary))
    looks_like_object = values.bin.starts_with(b"{") & values.bin.ends_with(b"}")
    text = _parse_values(values, looks_like_object, text_schema)

    ip_fields = [name for name, spec in source.fields.items() if spec.field_type.kind == "ip"]
    text_fields = [name for name, spec in source.fields.items() if spec.field_type.is_text]
    checked = pl.concat(
        [candidates.select("kafka_partition", "kafka_offset", "value"), text], how="horizontal"
    ).with_columns(
        [_converted(name, spec).alias(f"{name}__typed") for name, spec in source.fields.items()]
        + [_valid_ipv6(text[name].fill_null("")).alias(f"{name}__ipv6") for name in ip_fields]
        + list(_nested(values, text, text_fields).values())
    )
    valid, failed = _split_by_checks(checked, source)
    events = valid.select(
        *[_typed(name, spec) for name, spec in source.fields.items()], "kafka_partition", "kafka_offset"
    )
    dead_letters = pl.concat(
        [
            screened.filter(pl.col("error").is_not_null()),
            failed.select("kafka_partition", "kafka_offset", "value", "error"),
        ]
    ).select("kafka_partition", "kafka_offset", pl.col("value").fill_null(b"").alias("raw_value"), "error")
    return DecodedBatch(events=events, dead_letters=dead_letters.sort("kafka_offset"))
