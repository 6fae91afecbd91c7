"""Producing demo data to Kafka: fast, idempotent, with exact counts of what was sent.

Events are generated column-wise (numpy + polars) by a pipeline's demo dataset, so producing never limits a
benchmark; this module sends them and keeps the ground truth of what was sent.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Protocol

import numpy as np
import polars as pl
from confluent_kafka import KafkaException, Producer

from clickhouse_etl.core.settings import Settings


def share_count(total: int, share: float) -> int:
    return round(total * share)


def shares_flags(rng: np.random.Generator, size: int, share: float) -> np.ndarray:
    """Exactly round(size * share) True values at random places."""
    flags = np.zeros(size, dtype=bool)
    flags[rng.choice(size, size=share_count(size, share), replace=False)] = True
    return flags


def duplicates_of(
    rng: np.random.Generator, base: pl.DataFrame, n: int, other_share: float, partitions: list[int]
) -> pl.DataFrame:
    """`n` byte-identical re-sends of random originals (column `send_order` orders them after their original);
    a share `other_share` of them goes to another partition than the original's."""
    originals = base[rng.integers(0, base.height, n)]
    to_other = shares_flags(rng, n, other_share) if len(partitions) > 1 else np.zeros(n, dtype=bool)
    # Another partition: shift the original's partition index by 1..len-1 places in the list.
    position = {p: i for i, p in enumerate(partitions)}
    original_index = np.array([position[p] for p in originals["partition"].to_list()], dtype=np.int64)
    shift = rng.integers(1, max(len(partitions), 2), n)
    other = np.asarray(partitions)[(original_index + shift) % len(partitions)]
    partition = np.where(to_other, other, originals["partition"].to_numpy()).astype(np.int32)
    return originals.with_columns(
        send_order=pl.col("send_order") + pl.Series(rng.integers(1, 500_000, n)),
        partition=pl.Series(partition),
        kind=pl.lit("duplicate"),
        is_duplicate_other_partition=pl.Series(to_other),
    )


LATE_BY_MS = (60_000, 30 * 60_000)
MALFORMED_VARIANTS = ("truncated", "not_json", "wrong_type", "missing_field", "not_object", "empty")


class MessageShares(Protocol):
    """What every dataset's shares dataclass holds; duplicate_other_partition is a share of the duplicates."""

    duplicate: float
    duplicate_other_partition: float
    malformed: float


def check_shares(shares: MessageShares) -> None:
    """Raise unless every share is between 0 and 1 and duplicates and malformed messages leave originals."""
    for name, value in asdict(shares).items():  # type: ignore[call-overload]
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"share {name} must be between 0 and 1, got {value}")
    if shares.duplicate + shares.malformed > 1.0:
        raise ValueError("duplicate + malformed shares exceed 1")


def generate_messages(
    count: int,
    shares: MessageShares,
    partitions: list[int],
    seed: int | None,
    base_messages: Callable[[np.random.Generator, int, str], pl.DataFrame],
    malformed_bodies: Mapping[str, str],
) -> pl.DataFrame:
    """`count` Kafka messages in send order: columns partition, value (bytes), kind and ground truth.

    kind is `event` (made by `base_messages(rng, n, id_prefix)`, with a `send_order` column), `duplicate` (a
    re-send of an earlier event, byte for byte) or `malformed` (`malformed_bodies` per variant, `{p}` and
    `{i}` replaced so every body is unique).
    """
    rng = np.random.default_rng(seed)
    n_duplicate = share_count(count, shares.duplicate)
    n_malformed = share_count(count, shares.malformed)
    n_base = count - n_duplicate - n_malformed
    if n_base <= 0 and count > 0:
        raise ValueError("the shares leave no original events to duplicate")
    prefix = uuid.uuid4().hex[:12] if seed is None else f"{seed:012x}"[-12:]

    base = base_messages(rng, n_base, prefix)
    pieces = [base]
    if n_duplicate:
        pieces.append(duplicates_of(rng, base, n_duplicate, shares.duplicate_other_partition, partitions))
    if n_malformed:
        pieces.append(_malformed(rng, n_malformed, n_base, partitions, prefix, malformed_bodies))
    return pl.concat(pieces, how="diagonal_relaxed").sort("send_order", maintain_order=True).drop("send_order")


def _malformed(
    rng: np.random.Generator,
    n: int,
    n_base: int,
    partitions: list[int],
    prefix: str,
    bodies: Mapping[str, str],
) -> pl.DataFrame:
    variant = [MALFORMED_VARIANTS[i % len(MALFORMED_VARIANTS)] for i in range(n)]
    values = [bodies[v].replace("{p}", prefix).replace("{i}", str(i)).encode() for i, v in enumerate(variant)]
    return pl.DataFrame(
        {
            "send_order": rng.integers(0, max(n_base, 1) * 1000, n),
            "partition": rng.choice(np.asarray(partitions), n).astype(np.int32),
            "value": pl.Series(values, dtype=pl.Binary),
            "kind": "malformed",
            "malformed_variant": variant,
        }
    )


@dataclass
class ProduceReport:
    topic: str
    produced: int = 0
    seconds: float = 0.0
    kinds: dict[str, int] = field(default_factory=dict)
    per_partition: dict[int, int] = field(default_factory=dict)
    flags: dict[str, int] = field(default_factory=dict)

    @property
    def rate(self) -> float:
        return self.produced / self.seconds if self.seconds else 0.0

    def add(self, events: pl.DataFrame) -> None:
        self.produced += events.height
        for kind, n in events.group_by("kind").len().iter_rows():
            self.kinds[kind] = self.kinds.get(kind, 0) + n
        for partition, n in events.group_by("partition").len().iter_rows():
            self.per_partition[partition] = self.per_partition.get(partition, 0) + n
        originals = events.filter(pl.col("kind") == "event")
        for flag in originals.columns:
            if flag.startswith(("is_", "has_")) and flag != "is_duplicate_other_partition":
                self.flags[flag] = self.flags.get(flag, 0) + int(originals[flag].sum())

    def describe(self) -> str:
        partitions = ", ".join(f"{p}: {n}" for p, n in sorted(self.per_partition.items()))
        kinds = ", ".join(f"{k}: {n}" for k, n in sorted(self.kinds.items()))
        flags = ", ".join(f"{k.removeprefix('is_').removeprefix('has_')}: {n}" for k, n in sorted(self.flags.items()))
        return (
            f"produced {self.produced} events to topic {self.topic} in {self.seconds:.2f} s "
            f"({self.rate:,.0f} events/s)\n  kinds: {kinds}\n  originals: {flags}\n  partitions: {partitions}"
        )


def topic_partitions(settings: Settings, topic: str) -> list[int]:
    from confluent_kafka.admin import AdminClient

    metadata = AdminClient(
        {"bootstrap.servers": settings.kafka_bootstrap_servers, "log_level": 4, **settings.kafka_config}
    )
    topics = metadata.list_topics(topic=topic, timeout=10).topics
    if topic not in topics or topics[topic].error is not None:
        raise KafkaException(f"topic {topic} does not exist; `clickhouse-etl stack up` creates it")
    return sorted(topics[topic].partitions)


class DeliveryTracker:
    """Counts failed deliveries; with `delivery.report.only.error` successes cost no Python call."""

    def __init__(self) -> None:
        self.failures: list[str] = []

    def __call__(self, error: object, _message: object) -> None:
        if error is not None:
            self.failures.append(str(error))


def _producer(settings: Settings, tracker: DeliveryTracker) -> Producer:
    return Producer(
        {
            "bootstrap.servers": settings.kafka_bootstrap_servers,
            "enable.idempotence": True,
            "linger.ms": 20,
            "batch.size": 1_000_000,
            "batch.num.messages": 100_000,
            "queue.buffering.max.messages": 2_000_000,
            "queue.buffering.max.kbytes": 1_048_576,
            "compression.type": "lz4",
            "delivery.report.only.error": True,
            "on_delivery": tracker,
            "log_level": 4,
            **settings.kafka_config,
        }
    )


def send(producer: Producer, topic: str, events: pl.DataFrame) -> None:
    """Queue every message of `events` (partition, value) in order; delivery happens in the background."""
    produce = producer.produce
    for partition, value in zip(events["partition"].to_list(), events["value"].to_list(), strict=True):
        while True:
            try:
                produce(topic, value, partition=partition)
                break
            except BufferError:
                producer.poll(0.05)
    producer.poll(0)


def finish(producer: Producer, tracker: DeliveryTracker) -> None:
    """Wait for every queued message; raise if any was not delivered."""
    remaining = producer.flush(120)
    if remaining or tracker.failures:
        raise KafkaException(f"{len(tracker.failures) + remaining} messages were not delivered: {tracker.failures[:3]}")


class Generator(Protocol):
    """Makes `count` messages (columns partition, value, kind, and the ground truth of each) in send order."""

    def __call__(self, count: int, partitions: list[int], seed: int | None, span_ms: int) -> pl.DataFrame: ...


def produce_count(
    settings: Settings,
    topic: str,
    count: int,
    generate: Generator,
    partitions: list[int] | None = None,
    seed: int | None = None,
) -> ProduceReport:
    partitions = partitions or topic_partitions(settings, topic)
    report = ProduceReport(topic)
    started = time.perf_counter()
    tracker = DeliveryTracker()
    producer = _producer(settings, tracker)
    chunk = 250_000
    for first in range(0, count, chunk):
        events = generate(min(chunk, count - first), partitions, None if seed is None else seed + first, 60_000)
        send(producer, topic, events)
        report.add(events)
    finish(producer, tracker)
    report.seconds = time.perf_counter() - started
    return report


def produce_steady(
    settings: Settings,
    topic: str,
    rate: float,
    duration: float,
    generate: Generator,
    partitions: list[int] | None = None,
) -> ProduceReport:
    """Produce about `rate` events/s for `duration` seconds, in ticks of a tenth of a second."""
    partitions = partitions or topic_partitions(settings, topic)
    report = ProduceReport(topic)
    tracker = DeliveryTracker()
    producer = _producer(settings, tracker)
    tick = 0.1
    started = time.perf_counter()
    sent_target = 0.0
    while (elapsed := time.perf_counter() - started) < duration:
        sent_target = rate * min(elapsed + tick, duration)
        batch = int(sent_target) - report.produced
        if batch > 0:
            events = generate(batch, partitions, None, max(1, int(tick * 1000)))
            send(producer, topic, events)
            report.add(events)
        time.sleep(max(0.0, started + elapsed + tick - time.perf_counter()))
    finish(producer, tracker)
    report.seconds = time.perf_counter() - started
    return report
