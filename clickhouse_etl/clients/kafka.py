"""Kafka: exact offset ranges read by assignment (no group rebalancing), watermarks, group commits for lag tools."""

from __future__ import annotations

import bisect
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime

import polars as pl
from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition

from clickhouse_etl.core.collector import collections_paused
from clickhouse_etl.core.processes import return_free_heap
from clickhouse_etl.core.ranges import OffsetRange, split_range

COLUMN_CHUNK = 65_536  # messages turned into polars columns at a time while a range is read
FETCH_BYTES = 1_048_576  # fetched from a partition at a time, and queued at most (see KafkaReader._config)


class OffsetGapError(RuntimeError):
    """Offsets of a requested range no longer exist in Kafka (retention); never skipped silently."""


class OffsetRangeError(ValueError):
    """A requested range reaches beyond the partition's high watermark."""


@dataclass(frozen=True)
class KafkaReader:
    bootstrap_servers: str
    consumer_group: str = "clickhouse-etl"
    extra_config: dict[str, object] = field(default_factory=dict)  # SASL/TLS settings passed through
    fetch_batch: int = 1_000  # messages per consume() call
    read_timeout_seconds: float = 60.0  # give up when a range yields nothing this long

    def _config(self) -> dict[str, object]:
        return {
            "bootstrap.servers": self.bootstrap_servers,
            "group.id": self.consumer_group,
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            # An offset that no longer exists must fail, not silently jump to another position.
            "auto.offset.reset": "error",
            "enable.partition.eof": True,
            # Fetches of 1 MiB, at most 1 MiB queued, fetched again as soon as the queue has room. The consumer
            # fetches ahead of what is consumed and cannot be told where a range ends: with 16 MiB, a range that
            # ended before the partition's end had up to 16 MiB more fetched and decompressed for nothing, 0.1
            # CPU-s each (docs/benchmarks.md). A batch larger than the fetch size is still fetched whole.
            "fetch.max.bytes": max(FETCH_BYTES, int(str(self.extra_config.get("message.max.bytes", 0)))),
            "max.partition.fetch.bytes": FETCH_BYTES,
            "queued.max.messages.kbytes": FETCH_BYTES // 1024,
            "fetch.queue.backoff.ms": 0,
            "log_level": 4,
            **self.extra_config,
        }

    @contextmanager
    def consumer(self) -> Iterator[Consumer]:
        consumer = Consumer(self._config())
        try:
            yield consumer
        finally:
            consumer.close()

    def watermarks(self, topic: str) -> dict[int, tuple[int, int]]:
        """{partition: (low, high)} for every partition of the topic."""
        with self.consumer() as consumer:
            metadata = consumer.list_topics(topic, timeout=10).topics.get(topic)
            if metadata is None or metadata.error is not None:
                raise KafkaException(f"topic {topic} does not exist")
            return {
                partition: consumer.get_watermark_offsets(TopicPartition(topic, partition), timeout=10)
                for partition in sorted(metadata.partitions)
            }

    def read_range(self, offset_range: OffsetRange) -> pl.DataFrame:
        """Exactly the messages of [start, end) as (kafka_partition, kafka_offset, value)."""
        return pl.concat([frame for _, frame in self.read_windows(offset_range, offset_range.size)])

    def read_windows(self, offset_range: OffsetRange, window_size: int) -> Iterator[tuple[OffsetRange, pl.DataFrame]]:
        """Exactly the messages of [start, end), one frame per window of `window_size` offsets counted from
        `start` — every window, one without a message too — each handed over as soon as it is complete."""
        topic, partition, start, end = offset_range.topic, offset_range.partition, offset_range.start, offset_range.end
        windows = split_range(topic, partition, start, end, window_size)
        current = 0  # the window being filled
        offsets: list[pl.Series] = []
        values: list[pl.Series] = []
        # Python objects of at most one column chunk at a time, never of a whole window.
        pending_offsets: list[int] = []
        pending_values: list[bytes | None] = []

        def flush_pending() -> None:
            offsets.append(pl.Series(pending_offsets, dtype=pl.UInt64))
            values.append(pl.Series(pending_values, dtype=pl.Binary))
            pending_offsets.clear()
            pending_values.clear()

        def completed_window() -> pl.DataFrame:
            flush_pending()
            offset_column = pl.concat(offsets)
            frame = pl.DataFrame(
                {
                    "kafka_partition": pl.repeat(partition, offset_column.len(), dtype=pl.UInt32, eager=True),
                    "kafka_offset": offset_column,
                    "value": pl.concat(values),
                }
            )
            offsets.clear()
            values.clear()
            return frame

        # Message objects by the million, none of them in a cycle: the collector would only walk them.
        with self.consumer() as consumer, collections_paused():
            low, high = consumer.get_watermark_offsets(TopicPartition(topic, partition), timeout=10)
            if start < low:
                raise OffsetGapError(
                    f"{topic}/{partition}: offsets [{start}, {min(low, end)}) no longer exist "
                    f"(low watermark {low}, retention); the range cannot be read"
                )
            if end > high:
                raise OffsetRangeError(f"{topic}/{partition}: range end {end} is beyond the high watermark {high}")
            consumer.assign([TopicPartition(topic, partition, start)])
            position = start
            last_progress = time.monotonic()
            while current < len(windows):
                if position < end:
                    batch = consumer.consume(num_messages=min(self.fetch_batch, end - position), timeout=1.0)
                    if not batch:
                        if time.monotonic() - last_progress > self.read_timeout_seconds:
                            raise TimeoutError(
                                f"{topic}/{partition}: no messages at offset {position} for "
                                f"{self.read_timeout_seconds:.0f} s"
                            )
                        continue
                    last_progress = time.monotonic()
                    # One pass per attribute over the batch: no per-message Python branching on the hot path.
                    end_of_partition = position
                    if any([message.error() is not None for message in batch]):
                        end_of_partition = self._handle_errors(batch, offset_range, position)
                        batch = [message for message in batch if message.error() is None]
                    batch_offsets = [message.offset() for message in batch]
                    if batch_offsets and batch_offsets[-1] >= end:  # never read past end
                        keep = bisect.bisect_left(batch_offsets, end)
                        batch, batch_offsets = batch[:keep], batch_offsets[:keep]
                        position = end
                    elif batch_offsets:
                        position = batch_offsets[-1] + 1
                    # Past the last message (control records of transactions end a range without data).
                    position = max(position, end_of_partition)
                    first = 0
                    while first < len(batch_offsets):
                        last = bisect.bisect_left(batch_offsets, windows[current].end, lo=first)
                        pending_offsets.extend(batch_offsets[first:last])
                        pending_values.extend([message.value() for message in batch[first:last]])
                        if len(pending_offsets) >= COLUMN_CHUNK:
                            flush_pending()
                        if last == len(batch_offsets):
                            break
                        yield windows[current], completed_window()  # the batch goes on in the next window
                        current, first = current + 1, last
                while current < len(windows) and windows[current].end <= position:
                    yield windows[current], completed_window()
                    current += 1
        # The consumer's fetch queue and message buffers, freed at close, would otherwise stay resident in the C
        # heap while the later stages of the run allocate on top of them.
        return_free_heap()

    @staticmethod
    def _handle_errors(batch: list, offset_range: OffsetRange, position: int) -> int:
        """Raise on a real error; end-of-partition events only move the position (past control records)."""
        for message in batch:
            error = message.error()
            if error is None:
                continue
            if error.code() == KafkaError._PARTITION_EOF:
                position = max(position, message.offset())
            elif error.code() == KafkaError._AUTO_OFFSET_RESET:
                raise OffsetGapError(f"{offset_range.tp}: offset {position} is out of range (retention): {error}")
            else:
                raise KafkaException(error)
        return position

    def commit_group_offset(self, offset_range: OffsetRange) -> None:
        """Commit `end` for the consumer group, only so external lag tools see progress."""
        with self.consumer() as consumer:
            consumer.commit(
                offsets=[TopicPartition(offset_range.topic, offset_range.partition, offset_range.end)],
                asynchronous=False,
            )

    def start_offsets(
        self, topic: str, start_position: str, watermarks: dict[int, tuple[int, int]] | None = None
    ) -> dict[int, int]:
        """Per partition, the first offset to process for `earliest`, `latest` or an ISO-8601 timestamp
        (`watermarks`: the topic's, when the caller has just read them)."""
        watermarks = self.watermarks(topic) if watermarks is None else watermarks
        if start_position in ("earliest", "latest"):
            return {p: (low if start_position == "earliest" else high) for p, (low, high) in watermarks.items()}
        timestamp_ms = int(datetime.fromisoformat(start_position).timestamp() * 1000)
        with self.consumer() as consumer:
            found = consumer.offsets_for_times([TopicPartition(topic, p, timestamp_ms) for p in watermarks], timeout=10)
        # No message at or after the timestamp: start at the end (-1 from the broker).
        return {tp.partition: tp.offset if tp.offset >= 0 else watermarks[tp.partition][1] for tp in found}
