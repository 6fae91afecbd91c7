"""An independent, plain-Python statement of what the api_usage pipeline must write for a topic's messages.

It shares no code with clickhouse_etl: it reads Kafka with a plain consumer and decides every message with
`json` alone, by the rules of the api_usage pipeline file and of the decode step, so a test comparing
ClickHouse with it checks the real pipeline against the contract.

The decode step parses with polars' NDJSON reader into text columns and converts the text afterwards; the
rules below restate what that means for a message, e.g. a JSON number given for a text field is read as its
text (`{"event_id": 12}` has the event id "12") and an integral float is an integer (`"tokens": 2.0` is 2).
"""

from __future__ import annotations

import json
import math
import re
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import psycopg
from confluent_kafka import Consumer, TopicPartition

MAX_MESSAGE_BYTES = 65_536
MAX_TIMESTAMP_MS = 4_102_444_800_000
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
# Integer literals the NDJSON reader holds; one outside this range dead-letters its message wherever it is.
JSON_INTEGER_MIN, JSON_INTEGER_MAX = -(2**127), 2**128 - 1
# The text fields of the pipeline file: (longest text, empty text allowed, control characters allowed).
TEXT_FIELDS = {
    "event_id": (256, False, False),
    "customer_id": (256, False, True),
    "endpoint": (2048, True, True),
}
FIELDS = (*TEXT_FIELDS, "tokens", "latency_ms", "ts")
HEALTH_ENDPOINTS = frozenset({"/health", "/healthz", "/ready"})
SLOW_LATENCY_MS = 1000
# Unicode White_Space, trimmed around a number given as text; str.strip() would also trim \x1c-\x1f.
WHITESPACE = (
    "\t\n\x0b\x0c\r \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009\u200a"
    "\u2028\u2029\u202f\u205f\u3000"
)
INTEGER = re.compile(r"[+-]?[0-9]+")
NUMBER = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
CONTROL_CHARACTERS = re.compile(r"[\x00-\x1f\x7f]")
SURROGATES = re.compile(r"[\ud800-\udfff]")
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def read_topic(bootstrap: str, topic: str, partitions: int = 3) -> list[tuple[int, int, bytes]]:
    """Every message of the topic as (partition, offset, value)."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "usage-reference", "enable.auto.commit": False})
    messages: list[tuple[int, int, bytes]] = []
    try:
        for partition in range(partitions):
            low, high = consumer.get_watermark_offsets(TopicPartition(topic, partition), timeout=10)
            if high <= low:
                continue
            consumer.assign([TopicPartition(topic, partition, low)])
            while True:
                message = consumer.poll(5)
                assert message is not None, "reference consumer timed out"
                if message.error():
                    continue
                messages.append((partition, message.offset(), message.value() or b""))
                if message.offset() >= high - 1:
                    break
    finally:
        consumer.close()
    return messages


def customers(postgres_dsn: str) -> dict[str, tuple[str, str]]:
    """customer_id → (plan, region) of the lookup table."""
    with psycopg.connect(postgres_dsn) as connection:
        rows = connection.execute("SELECT customer_id, plan, region FROM customers").fetchall()
    return {customer_id: (plan, region) for customer_id, plan, region in rows}


class _Refused(ValueError):
    """JSON that Python reads but the pipeline's parser refuses."""


def _integer_literal(text: str) -> int:
    value = int(text)
    if not JSON_INTEGER_MIN <= value <= JSON_INTEGER_MAX:
        raise _Refused(f"integer literal out of range: {text[:40]}")
    return value


def _float_literal(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _Refused(f"number is not finite: {text[:40]}")
    return value


def _no_constant(name: str) -> Any:
    raise _Refused(f"{name} is not JSON")


def _first_key_wins(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A repeated key keeps its first value, as the NDJSON reader does (Python's json keeps the last)."""
    document: dict[str, Any] = {}
    for key, value in pairs:
        document.setdefault(key, value)
    return document


def _has_lone_surrogate(document: Any) -> bool:
    """An escaped lone surrogate (e.g. "\\ud800") is no text; a strict parser refuses the message.

    Walked with a stack, not recursion: a document nested hundreds deep is valid and must not fail here.
    """
    pending = [document]
    while pending:
        node = pending.pop()
        if isinstance(node, str):
            if SURROGATES.search(node):
                return True
        elif isinstance(node, dict):
            pending.extend(node.keys())
            pending.extend(node.values())
        elif isinstance(node, list):
            pending.extend(node)
    return False


def _as_text(value: Any) -> str | None:
    """A field's value as the text the decoder sees: numbers as written out in full, objects as JSON text."""
    if value is None:
        return None
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        # Shortest round-trip digits in positional notation; an integral value has no fraction (2.0 → "2").
        return format(Decimal(repr(value)), "f").removesuffix(".0")
    if isinstance(value, str):
        return value
    return json.dumps(value)


def _integer(text: str) -> int | None:
    trimmed = text.strip(WHITESPACE)
    if not INTEGER.fullmatch(trimmed):
        return None
    value = int(trimmed)
    return value if INT64_MIN <= value <= INT64_MAX else None


def _finite_number(text: str) -> float | None:
    trimmed = text.strip(WHITESPACE)
    if not NUMBER.fullmatch(trimmed):
        return None
    value = float(trimmed)
    return value if math.isfinite(value) else None


def _valid_text(name: str, text: str) -> bool:
    max_length, allow_empty, allow_control = TEXT_FIELDS[name]
    if not text:
        return allow_empty
    if len(text) > max_length:
        return False
    return allow_control or CONTROL_CHARACTERS.search(text) is None


def decode(value: bytes) -> dict | None:
    """The usage event of a message, or None when the pipeline must dead-letter it."""
    if not value or len(value) > MAX_MESSAGE_BYTES:
        return None
    try:
        document = json.loads(
            value.decode("utf-8"),
            parse_int=_integer_literal,
            parse_float=_float_literal,
            parse_constant=_no_constant,
            object_pairs_hook=_first_key_wins,
        )
    except (ValueError, RecursionError):
        return None
    if not isinstance(document, dict) or _has_lone_surrogate(document):
        return None
    if any(isinstance(document.get(name), (dict, list)) for name in TEXT_FIELDS):
        return None  # an object or array where text belongs
    texts = {name: _as_text(document.get(name)) for name in FIELDS}
    present = {name: text for name, text in texts.items() if text is not None}
    if len(present) < len(FIELDS):
        return None
    if not all(_valid_text(name, present[name]) for name in TEXT_FIELDS):
        return None
    tokens, latency_ms, ts = _integer(present["tokens"]), _finite_number(present["latency_ms"]), _integer(present["ts"])
    if tokens is None or latency_ms is None or ts is None or not 0 <= ts < MAX_TIMESTAMP_MS:
        return None
    return {
        "event_id": present["event_id"],
        "customer_id": present["customer_id"],
        "endpoint": present["endpoint"],
        "tokens": tokens,
        "latency_ms": latency_ms,
        "ts": ts,
    }


@dataclass
class ExpectedUsage:
    rows: dict[str, dict] = field(default_factory=dict)  # event_id → the row's business fields
    # Where the kept copy of an event may sit: the first copy in each partition (whichever run claims first).
    allowed_positions: dict[str, set[tuple[int, int]]] = field(default_factory=dict)
    copies: dict[str, set[tuple[int, int]]] = field(default_factory=dict)  # every position of the event_id
    # event_ids whose allowed copies differ in content: the row depends on which partition claims first.
    ambiguous: set[str] = field(default_factory=set)
    dead_letters: dict[tuple[int, int], bytes] = field(default_factory=dict)
    duplicates: int = 0
    filtered: int = 0
    unmatched: int = 0
    total: int = 0

    def minute_usage(self) -> dict[tuple[datetime, str, str | None], tuple[int, int, int, float]]:
        """(minute, customer_id, plan) → (requests, tokens, distinct endpoints, max latency_ms)."""
        requests: dict[tuple[datetime, str, str | None], int] = defaultdict(int)
        tokens: dict[tuple[datetime, str, str | None], int] = defaultdict(int)
        endpoints: dict[tuple[datetime, str, str | None], set[str]] = defaultdict(set)
        latency: dict[tuple[datetime, str, str | None], float] = {}
        for row in self.rows.values():
            key = (row["event_time"].replace(second=0, microsecond=0), row["customer_id"], row["plan"])
            requests[key] += 1
            tokens[key] += row["tokens"]
            endpoints[key].add(row["endpoint"])
            latency[key] = max(latency.get(key, row["latency_ms"]), row["latency_ms"])
        return {key: (requests[key], tokens[key], len(endpoints[key]), latency[key]) for key in requests}


def expected_usage(
    messages: list[tuple[int, int, bytes]], known_customers: dict[str, tuple[str, str]]
) -> ExpectedUsage:
    """What the pipeline writes for `messages` (partition, offset, value) with the `known_customers` lookup.

    Stages in the pipeline's order: decode, dedup by event_id, enrich (an unknown customer is kept without
    plan and region), drop health checks. Dedup comes first, so every count is of distinct events.
    """
    expected = ExpectedUsage(total=len(messages))
    copies: dict[str, list[tuple[int, int]]] = defaultdict(list)
    events: dict[tuple[int, int], dict] = {}
    for partition, offset, value in messages:
        event = decode(value)
        if event is None:
            expected.dead_letters[(partition, offset)] = value
            continue
        copies[event["event_id"]].append((partition, offset))
        events[(partition, offset)] = event
    for event_id, positions in copies.items():
        expected.duplicates += len(positions) - 1
        first_per_partition: dict[int, int] = {}
        for partition, offset in positions:
            first_per_partition[partition] = min(offset, first_per_partition.get(partition, offset))
        allowed = sorted(first_per_partition.items())
        candidates = [events[position] for position in allowed]
        if any(candidate != candidates[0] for candidate in candidates):
            expected.ambiguous.add(event_id)
        event = candidates[0]
        customer = known_customers.get(event["customer_id"])
        if customer is None:
            expected.unmatched += 1
        if event["endpoint"] in HEALTH_ENDPOINTS:
            expected.filtered += 1
            continue
        expected.allowed_positions[event_id] = set(allowed)
        expected.copies[event_id] = set(positions)
        expected.rows[event_id] = {
            "event_id": event_id,
            "customer_id": event["customer_id"],
            "plan": None if customer is None else customer[0],
            "region": None if customer is None else customer[1],
            "endpoint": event["endpoint"],
            "tokens": event["tokens"],
            "latency_ms": event["latency_ms"],
            "slow": event["latency_ms"] >= SLOW_LATENCY_MS,
            "event_time": EPOCH + timedelta(milliseconds=event["ts"]),
        }
    return expected
