"""Decode: raw Kafka values → typed click events, and dead letters for what cannot be decoded.

The fast path parses a whole chunk of values as NDJSON with polars and an explicit all-text schema, then
coerces and validates column-wise. A chunk that fails to parse is narrowed down: values that a strict JSON
parser rejects (or that are not objects) are parsed alone, the rest again as a chunk, bisecting if needed.
Every value therefore gets exactly the result polars gives it when parsed alone, whatever else shares its
batch — which keeps replays of differently sized ranges identical.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass

import orjson
import polars as pl

REQUIRED_FIELDS = ("click_id", "user_id", "ad_id", "timestamp_ms", "ip_address")
TEXT_SCHEMA = {name: pl.String for name in REQUIRED_FIELDS}
MAX_ID_CHARS = 256
# Timestamps outside [1970, 2100) are rejected: a fixed bound, so a replay decides exactly as the first run.
MAX_TIMESTAMP_MS = 4_102_444_800_000
FAST_PATH_CHUNK = 65_536

RAW_SCHEMA = {"kafka_partition": pl.UInt32, "kafka_offset": pl.UInt64, "value": pl.Binary}
EVENT_SCHEMA = {
    "click_id": pl.String,
    "user_id": pl.String,
    "ad_id": pl.Int64,
    "timestamp_ms": pl.Int64,
    "ip_address": pl.String,
    "kafka_partition": pl.UInt32,
    "kafka_offset": pl.UInt64,
}
DEAD_LETTER_SCHEMA = {
    "kafka_partition": pl.UInt32,
    "kafka_offset": pl.UInt64,
    "raw_value": pl.Binary,
    "error": pl.String,
}

IPV4 = r"^(25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)(\.(25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)){3}$"


@dataclass(frozen=True)
class DecodedBatch:
    events: pl.DataFrame
    dead_letters: pl.DataFrame


def _parse_chunk(values: list[bytes]) -> pl.DataFrame | None:
    """All-text columns for `values`, or None if polars cannot parse them as one NDJSON chunk."""
    try:
        parsed = pl.read_ndjson(b"\n".join(values), schema=TEXT_SCHEMA)
    except Exception:
        return None
    return parsed if parsed.height == len(values) else None


def _parse_alone(value: bytes) -> tuple[dict[str, str | None] | None, str | None]:
    parsed = _parse_chunk([value])
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


def _parse_values(values: pl.Series, looks_like_object: pl.Series) -> pl.DataFrame:
    """Text fields and parse_error per value, in order; each value parsed exactly as polars parses it alone.

    Values that do not even look like an object (`{…}`) are parsed alone at once; the rest go in chunks.
    A chunk that fails is narrowed: values a strict parser rejects are parsed alone, the rest bisected.
    """
    pieces: list[pl.DataFrame] = []
    single_indexes: list[int] = []
    single_rows: list[dict[str, str | None]] = []
    single_errors: list[str | None] = []

    def parse_alone(i: int) -> None:
        row, error = _parse_alone(values[i])
        single_indexes.append(i)
        single_rows.append(row or dict.fromkeys(REQUIRED_FIELDS))
        single_errors.append(error)

    def narrow(indexes: list[int], prescreen: bool) -> None:
        parsed = _parse_chunk(values.gather(indexes).to_list())
        if parsed is not None:
            pieces.append(parsed.with_columns(index=pl.Series(indexes, dtype=pl.UInt32)))
        elif len(indexes) == 1:
            parse_alone(indexes[0])
        elif prescreen:
            chunk = values.gather(indexes).to_list()
            suspects = {i for i, value in zip(indexes, chunk, strict=True) if not _strictly_valid(value)}
            for i in sorted(suspects):
                parse_alone(i)
            rest = [i for i in indexes if i not in suspects]
            if rest:
                narrow(rest, prescreen=False)
        else:
            middle = len(indexes) // 2
            narrow(indexes[:middle], prescreen=False)
            narrow(indexes[middle:], prescreen=False)

    objects = looks_like_object.arg_true().to_list()
    for i in (~looks_like_object).arg_true().to_list():
        parse_alone(i)
    for first in range(0, len(objects), FAST_PATH_CHUNK):
        narrow(objects[first : first + FAST_PATH_CHUNK], prescreen=True)

    parse_error = pl.lit(None, dtype=pl.String).alias("parse_error")
    frames = [piece.with_columns(parse_error) for piece in pieces]
    if single_indexes:
        frames.append(
            pl.DataFrame(single_rows, schema=TEXT_SCHEMA, orient="row").with_columns(
                index=pl.Series(single_indexes, dtype=pl.UInt32),
                parse_error=pl.Series(single_errors, dtype=pl.String),
            )
        )
    if not frames:
        return pl.DataFrame(schema={**TEXT_SCHEMA, "parse_error": pl.String})
    return pl.concat(frames, how="vertical").sort("index").drop("index")


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


def _screen(raw: pl.DataFrame, max_message_bytes: int) -> pl.Expr:
    size = pl.col("value").bin.size()
    return (
        pl.when(pl.col("value").is_null() | (size == 0))
        .then(pl.lit("empty message"))
        .when(size > max_message_bytes)
        .then(pl.format("oversized message: {} bytes > max_message_bytes {}", size, pl.lit(max_message_bytes)))
        .otherwise(pl.lit(None, dtype=pl.String))
    )


def _validation_error() -> pl.Expr:
    """The first reason a row of text fields is not a valid click, or null."""
    checks: list[tuple[pl.Expr, pl.Expr]] = []
    for name in REQUIRED_FIELDS:
        checks.append((pl.col(name).is_null(), pl.lit(f"missing field {name}")))
    for name in ("click_id", "user_id", "ip_address"):
        column = pl.col(name)
        checks.append((column.str.len_chars() == 0, pl.lit(f"{name} is empty")))
        checks.append(
            (column.str.len_chars() > MAX_ID_CHARS, pl.lit(f"{name} is longer than {MAX_ID_CHARS} characters"))
        )
        checks.append((column.str.contains(r"^[\{\[]"), pl.lit(f"{name} must be a string, not an object or array")))
        checks.append((column.str.contains(r"[\x00-\x1f\x7f]"), pl.lit(f"{name} contains control characters")))
    for name in ("ad_id", "timestamp_ms"):
        checks.append(
            (
                pl.col(f"{name}_int").is_null(),
                pl.format(f"{name} is not an integer: {{}}", pl.col(name).str.slice(0, 40)),
            )
        )
    checks.append(
        (
            (pl.col("timestamp_ms_int") < 0) | (pl.col("timestamp_ms_int") >= MAX_TIMESTAMP_MS),
            pl.format("timestamp_ms out of range [0, {}): {}", pl.lit(MAX_TIMESTAMP_MS), pl.col("timestamp_ms_int")),
        )
    )
    checks.append(
        (
            ~pl.col("ip_address").str.contains(IPV4) & ~pl.col("ipv6_valid"),
            pl.format("ip_address is not an IPv4 or IPv6 address: {}", pl.col("ip_address").str.slice(0, 60)),
        )
    )
    expression = pl.when(checks[0][0]).then(checks[0][1])
    for condition, reason in checks[1:]:
        expression = expression.when(condition).then(reason)
    return expression.otherwise(pl.lit(None, dtype=pl.String))


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


def decode_events(raw: pl.DataFrame, max_message_bytes: int) -> DecodedBatch:
    """Split a raw batch (kafka_partition, kafka_offset, value) into typed events and dead letters."""
    screened = raw.with_columns(error=_screen(raw, max_message_bytes))
    candidates = screened.filter(pl.col("error").is_null())
    values = candidates["value"]
    with_breaks = (values.bin.contains(b"\n") | values.bin.contains(b"\r")).arg_true()
    if with_breaks.len():
        one_line = [_one_line(value) for value in values.gather(with_breaks).to_list()]
        values = values.scatter(with_breaks, pl.Series(one_line, dtype=pl.Binary))
    looks_like_object = values.bin.starts_with(b"{") & values.bin.ends_with(b"}")
    text = _parse_values(values, looks_like_object)

    checked = (
        pl.concat([candidates.select("kafka_partition", "kafka_offset", "value"), text], how="horizontal")
        .with_columns(
            ad_id_int=pl.col("ad_id").str.strip_chars().str.to_integer(strict=False),
            timestamp_ms_int=pl.col("timestamp_ms").str.strip_chars().str.to_integer(strict=False),
            ipv6_valid=_valid_ipv6(text["ip_address"].fill_null("")),
        )
        .with_columns(error=pl.coalesce(pl.col("parse_error"), _validation_error()))
    )
    events = checked.filter(pl.col("error").is_null()).select(
        "click_id",
        "user_id",
        pl.col("ad_id_int").alias("ad_id"),
        pl.col("timestamp_ms_int").alias("timestamp_ms"),
        "ip_address",
        "kafka_partition",
        "kafka_offset",
    )
    dead_letters = pl.concat(
        [
            screened.filter(pl.col("error").is_not_null()),
            checked.filter(pl.col("error").is_not_null()).select("kafka_partition", "kafka_offset", "value", "error"),
        ]
    ).select("kafka_partition", "kafka_offset", pl.col("value").fill_null(b"").alias("raw_value"), "error")
    return DecodedBatch(events=events, dead_letters=dead_letters.sort("kafka_offset"))
