"""Dagster resources: each wraps one client (Kafka, Redis claims, PostgreSQL, ClickHouse) and nothing else,
plus the pipeline a job runs.

Connection strings may carry credentials, so definitions pass them as `dg.EnvVar` whenever the variable
is set: the UI then shows the variable's name, never its value.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from pathlib import Path

import dagster as dg
import polars as pl
from clickhouse_connect.driver.client import Client
from pydantic import Field, PrivateAttr

from clickhouse_etl.clients import claims
from clickhouse_etl.clients.clickhouse import clickhouse_session
from clickhouse_etl.clients.kafka import KafkaReader
from clickhouse_etl.clients.postgres import SnapshotRead, read_snapshot
from clickhouse_etl.core.pipeline.columns import PipelineColumns, columns_of
from clickhouse_etl.core.pipeline.model import Lookup, Pipeline
from clickhouse_etl.core.processes import process_alive
from clickhouse_etl.core.settings import Settings
from clickhouse_etl.steps.schema import ensure_tables

SCRATCH_PREFIX = "clickhouse-etl-run-"


class KafkaResource(dg.ConfigurableResource):
    """Reads exact offset ranges by assignment (no group rebalancing); commits ends for lag tools."""

    bootstrap_servers: str = Field(description="Kafka bootstrap servers (KAFKA_BOOTSTRAP_SERVERS)")
    extra_config_json: str = Field(default="{}", description="Extra librdkafka settings as JSON (SASL/TLS)")
    fetch_batch: int = Field(default=1_000, description="Messages per consume() call")

    def reader(self, consumer_group: str = "clickhouse-etl") -> KafkaReader:
        return KafkaReader(
            bootstrap_servers=self.bootstrap_servers,
            consumer_group=consumer_group,
            extra_config=json.loads(self.extra_config_json),
            fetch_batch=self.fetch_batch,
        )


class ClaimsResource(dg.ConfigurableResource):
    """Redis holding the dedup claims: hashes of key → `<partition>:<offset>` (clickhouse_etl.clients.claims)."""

    redis_url: str = Field(description="Redis URL (REDIS_URL); redis+cluster:// names a Redis Cluster")
    wait_seconds: float = Field(default=30.0, description="How long a batch's claims wait out a Redis restart")

    def claim(self, namespace: str, keys: pl.Series, positions: pl.Series, ttl_seconds: int) -> pl.Series:
        """The previous owner of each key (null where this call made the claim). Raises if Redis fails."""
        return claims.claim(self.redis_url, namespace, keys, positions, ttl_seconds, self.wait_seconds)


class PostgresResource(dg.ConfigurableResource):
    """PostgreSQL holding the lookups, read in bulk with COPY; optionally a last good copy on disk."""

    postgres_dsn: str = Field(description="PostgreSQL DSN (POSTGRES_DSN)")
    snapshot_folder: str = Field(description="Where last good snapshots are kept (lookups with fallback last_good)")

    def read(self, pipeline: Pipeline, lookup: Lookup) -> SnapshotRead:
        last_good = Path(self.snapshot_folder) / pipeline.name / f"{lookup.name}.csv"
        return read_snapshot(self.postgres_dsn, lookup, last_good if lookup.fallback == "last_good" else None)


class WarehouseResource(dg.ConfigurableResource):
    """ClickHouse through clickhouse-connect: embedded chDB (`chdb://dir`) or a server (`http(s)://…`)."""

    dsn: str = Field(description="ClickHouse DSN (CLICKHOUSE_DSN)")
    database: str = Field(default="analytics", description="Database of the pipelines' tables")
    dedup_window: int = Field(default=10_000, description="Insert blocks remembered per table for deduplication")
    lock_timeout_seconds: float = Field(default=300.0, description="Wait for an embedded store held elsewhere")

    @contextmanager
    def session(self) -> Iterator[Client]:
        with clickhouse_session(self.dsn, self.lock_timeout_seconds) as client:
            yield client

    def ensure_tables(self, client: Client, pipeline: Pipeline) -> None:
        ensure_tables(client, pipeline, self.database, self.dedup_window)


class RunLimits(dg.ConfigurableResource):
    """How large a run may be: backfills are cut into runs of at most this many offsets; and how much memory
    a run keeps its frames' windows in before it writes them to its scratch folder (orchestration.batch)."""

    max_records_per_run: int = Field(default=1_000_000, description="Largest range one run processes")
    memory_budget_mib: int = Field(default=128, description="Memory for the windows of a run's frames")

    @property
    def window_memory_bytes(self) -> int:
        return self.memory_budget_mib * 2**20


class PipelineTopics(dg.ConfigurableResource):
    """Every configured pipeline's topic and ingest job: a backfill request names the pipeline only."""

    topics: dict[str, str] = Field(description="Pipeline → Kafka topic")
    jobs: dict[str, str] = Field(description="Pipeline → ingest job")


@cache
def _parsed(spec: str) -> Pipeline:
    return Pipeline.model_validate_json(spec)


class RunScratch(dg.ConfigurableResource):
    """A folder of the run's own for the windows of its frames (see orchestration.batch), removed when the run
    ends. Folders that killed runs left behind are removed by the next run on the machine."""

    parent: str = Field(default="", description="Where run folders go (default: the system's temporary folder)")
    _folder: Path | None = PrivateAttr(default=None)

    def setup_for_execution(self, context: dg.InitResourceContext) -> None:
        parent = Path(self.parent or tempfile.gettempdir())
        for left_behind in parent.glob(f"{SCRATCH_PREFIX}*"):
            pid = left_behind.name.removeprefix(SCRATCH_PREFIX).split("-")[0]
            if pid.isdigit() and not process_alive(int(pid)):
                shutil.rmtree(left_behind, ignore_errors=True)
        self._folder = Path(tempfile.mkdtemp(prefix=f"{SCRATCH_PREFIX}{os.getpid()}-", dir=parent))

    def teardown_after_execution(self, context: dg.InitResourceContext) -> None:
        if self._folder is not None:
            shutil.rmtree(self._folder, ignore_errors=True)

    @property
    def folder(self) -> Path:
        assert self._folder is not None, "the run's scratch folder exists only while the run executes"
        return self._folder


class PipelineResource(dg.ConfigurableResource):
    """The pipeline a job runs, as declared in its file (resolved): every op reads its section from it."""

    spec: str = Field(description="The pipeline, as JSON")

    @classmethod
    def of(cls, pipeline: Pipeline) -> PipelineResource:
        return cls(spec=pipeline.model_dump_json())

    @property
    def pipeline(self) -> Pipeline:
        return _parsed(self.spec)

    @property
    def columns(self) -> PipelineColumns:
        return columns_of(self.pipeline)


def _connection(variable: str, value: str) -> str:
    return dg.EnvVar(variable) if os.environ.get(variable) else value  # type: ignore[return-value]


def resources_from_settings(settings: Settings) -> dict[str, dg.ConfigurableResource]:
    """The shared resources, configured from the settings; secrets stay environment references."""
    return {
        "kafka": KafkaResource(
            bootstrap_servers=_connection("KAFKA_BOOTSTRAP_SERVERS", settings.kafka_bootstrap_servers),
            extra_config_json=_connection("CLICKHOUSE_ETL_KAFKA_CONFIG", json.dumps(settings.kafka_config)),
            fetch_batch=settings.kafka_fetch_batch,
        ),
        "claims": ClaimsResource(
            redis_url=_connection("REDIS_URL", settings.redis_url), wait_seconds=settings.claims_wait_seconds
        ),
        "postgres": PostgresResource(
            postgres_dsn=_connection("POSTGRES_DSN", settings.postgres_dsn),
            snapshot_folder=str(settings.data_dir / "snapshots"),
        ),
        "warehouse": WarehouseResource(
            dsn=_connection("CLICKHOUSE_DSN", settings.clickhouse_dsn),
            database=settings.clickhouse_database,
            dedup_window=settings.clickhouse_dedup_window,
            lock_timeout_seconds=settings.clickhouse_lock_timeout_seconds,
        ),
        "limits": RunLimits(
            max_records_per_run=settings.max_records_per_run, memory_budget_mib=settings.run_memory_budget_mib
        ),
        "scratch": RunScratch(),
    }
