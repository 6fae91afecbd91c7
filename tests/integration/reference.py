"""An independent, plain-Python statement of what the pipeline must produce for a topic's messages.

It shares no code with clickhouse_etl: it reads Kafka with a plain consumer and decides every message with
`json` and `ipaddress`, so a test comparing ClickHouse with it checks the real pipeline against the contract.
"""

from __future__ import annotations

import ipaddress
import json
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import psycopg
from confluent_kafka import Consumer, TopicPartition

REQUIRED = ("click_id", "user_id", "ad_id", "timestamp_ms", "ip_address")


def read_topic(bootstrap: str, topic: str, partitions: int = 3) -> list[tuple[int, int, bytes]]:
    """Every message of the topic as (partition, offset, value)."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "reference", "enable.auto.commit": False})
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


def campaigns(postgres_dsn: str) -> dict[int, tuple[str, Decimal]]:
    with psycopg.connect(postgres_dsn) as connection:
        rows = connection.execute("SELECT ad_id, campaign_name, campaign_budget FROM campaigns").fetchall()
    return {ad_id: (name, budget) for ad_id, name, budget in rows}


def decode(value: bytes) -> dict | None:
    """The click of a message, or None when it must be dead-lettered."""
    try:
        document = json.loads(value)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(document, dict) or any(document.get(name) is None for name in REQUIRED):
        return None
    try:
        ad_id, timestamp_ms = int(document["ad_id"]), int(document["timestamp_ms"])
        ipaddress.ip_address(document["ip_address"])
    except (TypeError, ValueError):
        return None
    if not 0 <= timestamp_ms < 4_102_444_800_000:
        return None
    return {
        "click_id": str(document["click_id"]),
        "user_id": str(document["user_id"]),
        "ad_id": ad_id,
        "timestamp_ms": timestamp_ms,
        "ip_address": document["ip_address"],
    }


@dataclass
class Expected:
    rows: dict[str, dict] = field(default_factory=dict)  # click_id → enriched business fields
    allowed_positions: dict[str, set[tuple[int, int]]] = field(default_factory=dict)
    copies: dict[str, set[tuple[int, int]]] = field(default_factory=dict)  # every position of the click_id
    dead_letters: dict[tuple[int, int], bytes] = field(default_factory=dict)
    duplicates: int = 0
    filtered: int = 0
    unmatched: int = 0
    total: int = 0

    def minute_stats(self) -> dict[tuple[datetime, str | None], tuple[int, int]]:
        clicks: dict[tuple[datetime, str | None], int] = defaultdict(int)
        users: dict[tuple[datetime, str | None], set[str]] = defaultdict(set)
        for row in self.rows.values():
            key = (row["click_time"].replace(second=0, microsecond=0), row["campaign_name"])
            clicks[key] += 1
            users[key].add(row["user_id"])
        return {key: (clicks[key], len(users[key])) for key in clicks}


def expected_outcome(
    messages: list[tuple[int, int, bytes]],
    known: dict[int, tuple[str, Decimal]],
    blocked: list[str],
    policy: str = "keep",
) -> Expected:
    networks = [ipaddress.ip_network(cidr) for cidr in blocked]
    expected = Expected(total=len(messages))
    copies: dict[str, list[tuple[int, int]]] = defaultdict(list)
    clicks: dict[str, dict] = {}
    for partition, offset, value in messages:
        click = decode(value)
        if click is None:
            expected.dead_letters[(partition, offset)] = value
            continue
        copies[click["click_id"]].append((partition, offset))
        clicks[click["click_id"]] = click
    for click_id, positions in copies.items():
        expected.duplicates += len(positions) - 1
        click = clicks[click_id]
        campaign = known.get(click["ad_id"])
        if campaign is None:
            expected.unmatched += 1
            if policy == "drop":
                continue
            if policy == "dead_letter":
                first = min(positions)
                expected.dead_letters[first] = next(v for p, o, v in messages if (p, o) == first)
                continue
        address = ipaddress.ip_address(click["ip_address"])
        mapped = getattr(address, "ipv4_mapped", None)
        if any(address in n or (mapped is not None and mapped in n) for n in networks):
            expected.filtered += 1
            continue
        first_per_partition: dict[int, int] = {}
        for partition, offset in positions:
            first_per_partition[partition] = min(offset, first_per_partition.get(partition, offset))
        expected.allowed_positions[click_id] = set(first_per_partition.items())
        expected.copies[click_id] = set(positions)
        expected.rows[click_id] = {
            "click_id": click_id,
            "user_id": click["user_id"],
            "ad_id": click["ad_id"],
            "campaign_name": None if campaign is None else campaign[0],
            "campaign_budget": None if campaign is None else campaign[1],
            "ip_address": click["ip_address"],
            "click_time": datetime.fromtimestamp(click["timestamp_ms"] // 1000, UTC)
            + timedelta(milliseconds=click["timestamp_ms"] % 1000),
        }
    return expected
