"""The reader returns exactly a range's messages whatever lies beyond it, and reads a record batch larger than
its fetch size whole: the consumer fetches ahead of the range in pieces of FETCH_BYTES. Start offsets come
from watermarks already read."""

from __future__ import annotations

import os

import polars as pl
import pytest
from confluent_kafka import Producer

from clickhouse_etl.clients.kafka import FETCH_BYTES, KafkaReader
from clickhouse_etl.core.ranges import OffsetRange
from clickhouse_etl.core.settings import Settings

from .conftest import new_topic

pytestmark = pytest.mark.integration

LARGE = 3 * FETCH_BYTES  # one message, alone in its record batch, three fetch sizes long
TOPIC_MAX_BYTES = 4 * FETCH_BYTES


def _produce(settings: Settings, topic: str, values: list[bytes]) -> None:
    producer = Producer(
        {
            "bootstrap.servers": settings.kafka_bootstrap_servers,
            "message.max.bytes": TOPIC_MAX_BYTES,
            "compression.type": "none",  # the large value is random bytes: its batch stays larger than a fetch
            "enable.idempotence": True,
        }
    )
    for value in values:
        producer.produce(topic, value=value, partition=0)
        producer.poll(0)
    assert producer.flush(30) == 0


def test_ranges_read_exactly_around_a_batch_larger_than_a_fetch(base_settings: Settings) -> None:
    topic = new_topic(base_settings, "reader", partitions=1, config={"max.message.bytes": str(TOPIC_MAX_BYTES)})
    small = [f'{{"n": {i}, "pad": "{"x" * 300}"}}'.encode() for i in range(6_000)]
    large = os.urandom(LARGE)
    values = [*small[:3_000], large, *small[3_000:]]
    _produce(base_settings, topic, values)
    reader = KafkaReader(base_settings.kafka_bootstrap_servers)

    def values_of(start: int, end: int, window: int = 1_000) -> list[bytes]:
        windows = list(reader.read_windows(OffsetRange(topic, 0, start, end), window))
        assert [w for w, _ in windows] == [
            OffsetRange(topic, 0, first, min(first + window, end)) for first in range(start, end, window)
        ]
        for window_range, frame in windows:
            assert frame["kafka_offset"].to_list() == list(range(window_range.start, window_range.end))
        return pl.concat([frame for _, frame in windows])["value"].to_list()

    assert values_of(0, 2_500) == values[:2_500]  # ends well before the partition's end
    assert values_of(2_999, 3_002, window=1) == values[2_999:3_002]  # the large message alone in its window
    assert values_of(3_000, 3_001) == [large]
    assert values_of(0, len(values), window=2_048) == values


def test_start_offsets_from_watermarks_already_read(base_settings: Settings) -> None:
    topic = new_topic(base_settings, "starts", partitions=2)
    _produce(base_settings, topic, [b"{}"] * 5)
    reader = KafkaReader(base_settings.kafka_bootstrap_servers)
    watermarks = reader.watermarks(topic)
    assert watermarks == {0: (0, 5), 1: (0, 0)}
    for position in ("earliest", "latest"):
        assert reader.start_offsets(topic, position, watermarks) == reader.start_offsets(topic, position)
    assert reader.start_offsets(topic, "latest", watermarks) == {0: 5, 1: 0}
