"""Dagster resources: each wraps one client (Kafka, Redis, PostgreSQL, ClickHouse) and nothing else.

Connection strings may carry credentials, so definitions pass them as `dg.EnvVar` whenever the variable
is set: the UI then shows the variable's name, never its value.
"""

from __future__ import annotations

import bisect
import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import dagster as dg
import polars as pl
import psycopg
from clickhouse_connect.driver.client import Client
from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition
from pydantic import Field

from clickhouse_etl import claims
from clickhouse_etl.clickhouse_store import clickhouse_session
from clickhouse_etl.settings import Settings
from clickhouse_etl.steps.enrich import CampaignsSnapshot, snapshot_from_csv
from clickhouse_etl.steps.ranges import OffsetRange

COLUMN_CHUNK = 65_536  # messages turned into polars columns at a time while a range is read

SNAPSHOT_COPY = (
    "COPY (SELECT ad_id, campaign_name, campaign_budget FROM campaigns ORDER BY ad_id) TO STDOUT (FORMAT CSV)"
)


class OffsetGapError(RuntimeError):
    """Offsets of a requested range no longer exist in Kafka (retention); never skipped silently."""


class OffsetRangeError(ValueError):
    """A requested range reaches beyond the partition's high watermark."""


class KafkaSource(dg.ConfigurableResource):
    """Reads exact offset ranges by assignment (no group rebalancing); commits ends for lag tools."""

    bootstrap_servers: str = Field(description="Kafka bootstrap servers (KAFKA_BOOTSTRAP_SERVERS)")
    consumer_group: str = Field(default="clickhouse-etl", description="Group whose offsets lag tools read")
    extra_config_json: str = Field(default="{}", description="Extra librdkafka settings as JSON (SASL/TLS)")
    fetch_batch: int = Field(default=1_000, description="Messages per consume() call")
    read_timeout_seconds: float = Field(default=60.0, description="Give up when a range yields nothing this long")

    def _config(self, **overrides: object) -> dict[str, object]:
        return {
            "bootstrap.servers": self.bootstrap_servers,
            "group.id": self.consumer_group,
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            # An offset that no longer exists must fail, not silently jump to another position.
            "auto.offset.reset": "error",
            "enable.partition.eof": True,
            "fetch.max.bytes": 104_857_600,
            "max.partition.fetch.bytes": 52_428_800,
            "queued.max.messages.kbytes": 65_536,
            "log_level": 4,
            **json.loads(self.extra_config_json),
            **overrides,
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
        topic, partition, start, end = offset_range.topic, offset_range.partition, offset_range.start, offset_range.end
        offsets: list[pl.Series] = []
        values: list[pl.Series] = []
        # Python objects of at most one column chunk at a time, never of the whole range.
        pending_offsets: list[int] = []
        pending_values: list[bytes | None] = []

        def flush_pending() -> None:
            offsets.append(pl.Series(pending_offsets, dtype=pl.UInt64))
            values.append(pl.Series(pending_values, dtype=pl.Binary))
            pending_offsets.clear()
            pending_values.clear()

        with self.consumer() as consumer:
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
            while position < end:
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
                pending_offsets.extend(batch_offsets)
                pending_values.extend([message.value() for message in batch])
                if len(pending_offsets) >= COLUMN_CHUNK:
                    flush_pending()
            flush_pending()
        offset_column = pl.concat(offsets)
        return pl.DataFrame(
            {
                "kafka_partition": pl.repeat(partition, offset_column.len(), dtype=pl.UInt32, eager=True),
                "kafka_offset": offset_column,
                "value": pl.concat(values),
            }
        )

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

    def start_offsets(self, topic: str, start_position: str) -> dict[int, int]:
        """Per partition, the first offset to process for `earliest`, `latest` or an ISO-8601 timestamp."""
        watermarks = self.watermarks(topic)
        if start_position in ("earliest", "latest"):
            return {p: (low if start_position == "earliest" else high) for p, (low, high) in watermarks.items()}
        timestamp_ms = int(datetime.fromisoformat(start_position).timestamp() * 1000)
        with self.consumer() as consumer:
            found = consumer.offsets_for_times([TopicPartition(topic, p, timestamp_ms) for p in watermarks], timeout=10)
        # No message at or after the timestamp: start at the end (-1 from the broker).
        return {tp.partition: tp.offset if tp.offset >= 0 else watermarks[tp.partition][1] for tp in found}


class DedupStore(dg.ConfigurableResource):
    """Redis claims of click ids: `SET <prefix>:<topic>:<click_id> <partition>:<offset> NX GET EX ttl`."""

    redis_url: str = Field(description="Redis URL (REDIS_URL)")
    key_prefix: str = Field(default="ce:dedup", description="Prefix of the claim keys")
    ttl_seconds: int = Field(default=86_400, description="Lifetime of a claim")

    def claim(self, topic: str, click_ids: pl.Series, positions: pl.Series) -> pl.Series:
        """The previous owner of each id (null where this call made the claim). Raises if Redis fails."""
        keys = (f"{self.key_prefix}:{topic}:" + click_ids).alias("key")
        return claims.claim(self.redis_url, keys, positions, self.ttl_seconds)


class CampaignsUnavailable(RuntimeError):
    """PostgreSQL could not be read and no last good snapshot may (or can) stand in."""


class CampaignsSource(dg.ConfigurableResource):
    """The campaigns dimension in PostgreSQL, read in bulk with COPY; optionally a last good copy on disk."""

    postgres_dsn: str = Field(description="PostgreSQL DSN (POSTGRES_DSN)")
    last_good_path: str = Field(
        default="",
        description="Where the last good snapshot is kept, to stand in while PostgreSQL is down ('' = fail instead)",
    )

    def snapshot(self) -> CampaignsSnapshot:
        try:
            csv_bytes = self._copy()
        except psycopg.Error as error:
            if not self.last_good_path:
                raise
            return self._last_good(error)
        if self.last_good_path:
            self._save_last_good(csv_bytes)
        return snapshot_from_csv(csv_bytes)

    def _copy(self) -> bytes:
        buffer = bytearray()
        with (
            psycopg.connect(self.postgres_dsn, connect_timeout=10) as connection,
            connection.cursor() as cursor,
            cursor.copy(SNAPSHOT_COPY) as copy,
        ):
            for block in copy:
                buffer += block
        return bytes(buffer)

    def _save_last_good(self, csv_bytes: bytes) -> None:
        path = Path(self.last_good_path)
        if path.exists() and path.read_bytes() == csv_bytes:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f"{path.name}.{os.getpid()}.partial")
        partial.write_bytes(csv_bytes)
        partial.replace(path)  # atomic: a reader sees the old or the new snapshot, never half of one

    def _last_good(self, error: psycopg.Error) -> CampaignsSnapshot:
        path = Path(self.last_good_path)
        if not path.exists():
            raise CampaignsUnavailable(
                f"PostgreSQL is unavailable ({error}) and no last good campaigns snapshot was saved at {path}"
            ) from error
        saved_at = datetime.fromtimestamp(path.stat().st_mtime, UTC).isoformat(timespec="seconds")
        snapshot = snapshot_from_csv(path.read_bytes())
        return replace(snapshot, source=f"last good snapshot saved {saved_at} (PostgreSQL unavailable)")


class ClickHouseWarehouse(dg.ConfigurableResource):
    """ClickHouse through clickhouse-connect: embedded chDB (`chdb://dir`) or a server (`http(s)://…`)."""

    dsn: str = Field(description="ClickHouse DSN (CLICKHOUSE_DSN)")
    database: str = Field(default="analytics", description="Database of the analytics tables")
    lock_timeout_seconds: float = Field(default=300.0, description="Wait for an embedded store held elsewhere")

    @contextmanager
    def session(self) -> Iterator[Client]:
        with clickhouse_session(self.dsn, self.lock_timeout_seconds) as client:
            yield client

    def table(self, name: str) -> str:
        return f"`{self.database}`.{name}"


class IngestRules(dg.ConfigurableResource):
    """What the pipeline keeps: message size limit, missing-campaign policy, filtered networks."""

    max_message_bytes: int = Field(default=65_536, description="Larger values are dead-lettered")
    missing_campaign_policy: str = Field(default="keep", description="keep | drop | dead_letter")
    filter_cidrs: list[str] = Field(default=["192.168.1.0/24"], description="Networks whose clicks are dropped")
    aggregation_window: str = Field(default="minute", description="Window of the stats checked: minute | hour")
    max_records_per_run: int = Field(default=1_000_000, description="Largest range one run processes")


def resources_from_settings(settings: Settings) -> dict[str, dg.ConfigurableResource]:
    """The job's resources, configured from the settings; secrets stay environment references."""
    import os

    def connection(variable: str, value: str) -> str:
        return dg.EnvVar(variable) if os.environ.get(variable) else value  # type: ignore[return-value]

    return {
        "kafka": KafkaSource(
            bootstrap_servers=connection("KAFKA_BOOTSTRAP_SERVERS", settings.kafka_bootstrap_servers),
            consumer_group=settings.consumer_group,
            extra_config_json=connection("CLICKHOUSE_ETL_KAFKA_CONFIG", json.dumps(settings.kafka_config)),
            fetch_batch=settings.kafka_fetch_batch,
        ),
        "dedup_store": DedupStore(
            redis_url=connection("REDIS_URL", settings.redis_url),
            key_prefix=settings.dedup_key_prefix,
            ttl_seconds=settings.dedup_ttl_seconds,
        ),
        "campaigns": CampaignsSource(
            postgres_dsn=connection("POSTGRES_DSN", settings.postgres_dsn),
            last_good_path=str(settings.last_good_campaigns_path) if settings.campaigns_fallback == "last_good" else "",
        ),
        "rules": IngestRules(
            max_message_bytes=settings.max_message_bytes,
            missing_campaign_policy=settings.missing_campaign_policy,
            filter_cidrs=settings.filter_cidrs,
            aggregation_window=settings.aggregation_window,
            max_records_per_run=settings.max_records_per_run,
        ),
        "warehouse": ClickHouseWarehouse(
            dsn=connection("CLICKHOUSE_DSN", settings.clickhouse_dsn),
            database=settings.clickhouse_database,
            lock_timeout_seconds=settings.clickhouse_lock_timeout_seconds,
        ),
    }


__all__ = [
    "CampaignsSource",
    "CampaignsUnavailable",
    "ClickHouseWarehouse",
    "DedupStore",
    "IngestRules",
    "KafkaSource",
    "OffsetGapError",
    "OffsetRangeError",
    "resources_from_settings",
]
