"""The one settings surface of clickhouse-etl: connections, where things live, and how runs are sized.

Connections come from the conventional variables (`KAFKA_BOOTSTRAP_SERVERS`, `REDIS_URL`, `POSTGRES_DSN`,
`CLICKHOUSE_DSN`, `DAGSTER_HOME`) and default to the local stack. Every other setting is a field below and
can be given as `CLICKHOUSE_ETL_<NAME>` (e.g. `CLICKHOUSE_ETL_MAX_RECORDS_PER_RUN`). What a pipeline does —
topic, fields, dedup key, lookups, filters, aggregates, tables — is declared in its pipeline file
(`CLICKHOUSE_ETL_PIPELINES`). A wrong value fails fast with an error that names the setting and its variable.
"""

from __future__ import annotations

import json
import re
from datetime import datetime
from functools import cache
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit, urlunsplit

from pydantic import AliasChoices, Field, ValidationError, ValidationInfo, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict
from pydantic_settings import SettingsError as PydanticSettingsError

from clickhouse_etl.core.pipeline.loading import DEFAULT_PIPELINES

ENV_PREFIX = "CLICKHOUSE_ETL_"
IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
CLUSTER_SCHEMES = ("redis+cluster", "rediss+cluster")  # REDIS_URL naming a Redis Cluster by seed nodes

# Connection fields read from their conventional variable names, not from the CLICKHOUSE_ETL_ prefix.
CONNECTION_VARIABLES = {
    "kafka_bootstrap_servers": "KAFKA_BOOTSTRAP_SERVERS",
    "redis_url": "REDIS_URL",
    "postgres_dsn": "POSTGRES_DSN",
    "clickhouse_dsn": "CLICKHOUSE_DSN",
    "dagster_home": "DAGSTER_HOME",
}


class SettingsError(ValueError):
    """A setting has a wrong value; the message names the setting and its environment variable."""


CONNECTION_VARIABLES_REVERSED = {v: k for k, v in CONNECTION_VARIABLES.items()}


class Settings(BaseSettings):
    """Every setting of the deployment, the local stack and the demo data."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, extra="ignore", populate_by_name=True, validate_default=True
    )

    # --- connections (conventional variable names; local stack defaults) ---
    kafka_bootstrap_servers: str = Field(
        default="127.0.0.1:9092", validation_alias=AliasChoices("KAFKA_BOOTSTRAP_SERVERS", "kafka_bootstrap_servers")
    )
    redis_url: str = Field(default="redis://127.0.0.1:6379/0", validation_alias=AliasChoices("REDIS_URL", "redis_url"))
    postgres_dsn: str = Field(
        default="postgresql://postgres@127.0.0.1:5432/clickhouse_etl",
        validation_alias=AliasChoices("POSTGRES_DSN", "postgres_dsn"),
    )
    clickhouse_dsn: str = Field(
        default="",
        validation_alias=AliasChoices("CLICKHOUSE_DSN", "clickhouse_dsn"),
        description="chdb://<dir> for embedded chDB (default: <data_dir>/clickhouse) or http(s)://… for a server",
    )
    dagster_home: str = Field(default="", validation_alias=AliasChoices("DAGSTER_HOME", "dagster_home"))
    kafka_config: dict[str, str] = Field(
        default_factory=dict,
        description="Extra librdkafka settings passed through (SASL/TLS), as a JSON object",
    )

    # --- where things live ---
    data_dir: Path = Field(default=Path(".data"), description="Folder for the local stack's data and logs")
    cache_dir: Path = Field(
        default=Path.home() / ".cache" / "clickhouse-etl",
        description="Folder for downloaded Kafka jars, reused across data folders",
    )

    # --- the pipelines ---
    pipelines: str = Field(
        default=DEFAULT_PIPELINES,
        description="Pipeline files, folders of them, or packaged pipeline names (ad_clicks, api_usage), "
        "comma-separated",
    )
    topic_partitions: int = Field(default=3, ge=1, le=1000, description="Partitions of a topic the stack creates")
    start_position: str = Field(
        default="earliest",
        description="Where a partition new to a pipeline starts: earliest | latest | an ISO-8601 timestamp",
    )
    log_format: Literal["text", "json"] = Field(
        default="text", description="Run logs on stderr: colored text, or JSON lines with run id and range tags"
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        default="INFO", description="Run logs from this level on: INFO logs one line per run, DEBUG every event"
    )
    max_records_per_run: int = Field(default=1_000_000, ge=1, description="Largest offset range one run processes")
    run_memory_budget_mib: int = Field(
        default=128,
        ge=0,
        description="Memory a run keeps the windows of its frames in; beyond it, they go to its scratch folder",
    )
    max_batch_wait_seconds: float = Field(
        default=5.0, ge=0, description="A tail smaller than a full range is flushed once it waited this long"
    )
    sensor_interval_seconds: int = Field(
        default=1, ge=1, description="Minimum seconds between sensor ticks (the project's daemon loops that often)"
    )
    catch_up_workers: int = Field(
        default=2,
        ge=1,
        le=64,
        description="Processes catch-up runs ranges in (each takes the next ready range when free)",
    )
    # librdkafka hands out a batch at a higher cost per message the larger the batch asked for: a 333,000
    # message partition reads in about half the time at 1,000 per consume() call as at 100,000.
    kafka_fetch_batch: int = Field(default=1_000, ge=1, description="Messages fetched per consume() call")
    clickhouse_database: str = Field(default="analytics", description="ClickHouse database of the tables")
    clickhouse_dedup_window: int = Field(
        default=10_000, ge=1, description="Insert blocks remembered per table for insert deduplication"
    )
    clickhouse_lock_timeout_seconds: float = Field(
        default=300.0, gt=0, description="How long to wait for the embedded ClickHouse store held elsewhere"
    )
    # A restarted Redis refuses connections, then answers LOADING while it reads its append-only file (1.5 to
    # 4.5 s per million claims here): a claim call waits that out instead of failing the step.
    claims_wait_seconds: float = Field(
        default=30.0,
        ge=0,
        description="How long one batch's claims wait out a Redis restart or failover before the step fails",
    )

    # --- run execution ---
    run_launcher: Literal["celery", "default"] = Field(
        default="celery",
        description="celery: runs go to warm Celery workers; default: Dagster starts a process per run",
    )
    celery_broker_url: str = Field(
        default="", description="Celery broker of the run workers (default: REDIS_URL's server, database 1)"
    )
    celery_backend_url: str = Field(
        default="", description="Celery result backend of the run workers (default: REDIS_URL's server, database 2)"
    )
    celery_queue: str = Field(
        default="dagster",
        pattern=r"^[A-Za-z0-9_.-]+$",
        description="Queue of the deployment's runs: workers of another deployment on the same broker take none",
    )
    # One per partition of the default topic: a run never waits for a free process (its request → start time
    # is the launch itself), and two cores are oversubscribed only while three runs overlap.
    workers: int = Field(default=3, ge=1, le=64, description="Run worker processes `worker` and `dev` start")
    # A warm process peaks at about 1.5 GiB under a sustained load (its imports, 300 MiB of them shared code
    # pages, and a run's working set), and what libraries keep from run to run (the embedded chDB about 2 MiB
    # of every session it opens and closes) would add up over days. A process past the cap is replaced after
    # its run, for a few CPU seconds of imports; a cap within the working set would replace one every few
    # runs (measured at 1,536 MiB: a replacement every 11 runs, request → start p95 6.6 s against 0.7 s).
    worker_max_memory_mib: int = Field(
        default=2048,
        ge=0,
        description="A run worker process whose peak RSS passed this is replaced after its run (0: never)",
    )

    # --- the local stack ---
    kafka_version: str = Field(default="4.1.1", description="Apache Kafka broker version the stack runs")
    kafka_heap: str = Field(default="768m", description="JVM heap (-Xmx) of the local Kafka broker")

    @field_validator("clickhouse_database")
    @classmethod
    def _check_database(cls, value: str) -> str:
        if not IDENTIFIER.match(value):
            raise ValueError(f"{value!r} is not a plain ClickHouse identifier ([A-Za-z_][A-Za-z0-9_]*)")
        return value

    @field_validator("start_position")
    @classmethod
    def _check_start(cls, value: str) -> str:
        if value not in ("earliest", "latest"):
            try:
                moment = datetime.fromisoformat(value)
            except ValueError:
                raise ValueError("must be 'earliest', 'latest' or an ISO-8601 timestamp") from None
            if moment.tzinfo is None:
                raise ValueError("a start timestamp needs a time zone, e.g. 2026-11-25T00:00:00Z")
        return value

    @field_validator("kafka_bootstrap_servers")
    @classmethod
    def _check_bootstrap(cls, value: str) -> str:
        for server in value.split(","):
            host, _, port = server.strip().rpartition(":")
            if not host or not port.isdigit():
                raise ValueError(f"{server!r} is not host:port")
        return value

    @field_validator("celery_broker_url", "celery_backend_url")
    @classmethod
    def _check_celery(cls, value: str) -> str:
        if value and urlsplit(value).scheme not in ("redis", "rediss"):
            raise ValueError("must be a redis:// or rediss:// URL")
        return value

    @field_validator("redis_url")
    @classmethod
    def _check_redis(cls, value: str) -> str:
        scheme, _, rest = value.partition("://")
        if scheme in CLUSTER_SCHEMES:
            location, _, database = rest.partition("?")[0].partition("/")
            for seed in location.rpartition("@")[2].split(","):
                host, _, port = seed.strip().rpartition(":")
                if not host or not port.isdigit():
                    raise ValueError(f"{seed!r} is not host:port (redis+cluster://host:port,host:port)")
            if database not in ("", "0"):
                raise ValueError("a Redis Cluster has only database 0")
        elif urlsplit(value).scheme not in ("redis", "rediss", "unix"):
            raise ValueError("must be a redis://, rediss://, unix://, redis+cluster:// or rediss+cluster:// URL")
        return value

    @field_validator("celery_broker_url", "celery_backend_url")
    @classmethod
    def _celery_needs_a_plain_redis(cls, value: str, info: ValidationInfo) -> str:
        # Celery's Redis transport speaks to one server: it cannot live in a cluster, nor be derived from one.
        redis_url = info.data.get("redis_url", "")
        if not value and redis_url.partition("://")[0] in CLUSTER_SCHEMES:
            raise ValueError(
                "must be set when REDIS_URL names a Redis Cluster: Celery's Redis transport needs one plain "
                "Redis server (a redis:// or rediss:// URL), for the broker and for the result backend"
            )
        return value

    @field_validator("postgres_dsn")
    @classmethod
    def _check_postgres(cls, value: str) -> str:
        if urlsplit(value).scheme not in ("postgresql", "postgres"):
            raise ValueError("must be a postgresql:// URL")
        return value

    @field_validator("clickhouse_dsn")
    @classmethod
    def _check_clickhouse(cls, value: str) -> str:
        if value and urlsplit(value).scheme not in ("chdb", "http", "https", "clickhouse", "clickhouses"):
            raise ValueError("must be chdb://<dir> or an http(s):// URL")
        return value

    @model_validator(mode="after")
    def _derive_paths(self) -> Settings:
        self.data_dir = self.data_dir.expanduser().resolve()
        self.cache_dir = self.cache_dir.expanduser().resolve()
        if not self.clickhouse_dsn:
            self.clickhouse_dsn = f"chdb://{self.data_dir / 'clickhouse'}"
        if not self.dagster_home:
            self.dagster_home = str(self.data_dir / "dagster")
        # The run workers' broker and results live in Redis databases of their own, apart from the claims.
        if not self.celery_broker_url:
            self.celery_broker_url = _redis_database(self.redis_url, 1)
        if not self.celery_backend_url:
            self.celery_backend_url = _redis_database(self.redis_url, 2)
        return self

    # --- derived facts other modules need ---
    @property
    def clickhouse_is_embedded(self) -> bool:
        return self.clickhouse_dsn.startswith("chdb://")

    @property
    def chdb_path(self) -> Path:
        return Path(self.clickhouse_dsn.removeprefix("chdb://"))


def _redis_database(url: str, database: int) -> str:
    """The same Redis server, another database; over TLS, with the certificate check Celery insists on naming."""
    parts = urlsplit(url)
    if parts.scheme not in ("redis", "rediss"):
        return url
    query = parts.query
    if parts.scheme == "rediss" and "ssl_cert_reqs=" not in query:
        query = "&".join(filter(None, [query, "ssl_cert_reqs=required"]))
    return urlunsplit(parts._replace(path=f"/{database}", query=query))


def environment_variable(field_name: str) -> str:
    return CONNECTION_VARIABLES.get(field_name, ENV_PREFIX + field_name.upper())


def load_settings(**overrides: Any) -> Settings:
    """Read the settings from the environment; a wrong value raises SettingsError naming it."""
    try:
        return Settings(**overrides)
    except ValidationError as error:
        problems = []
        for item in error.errors():
            field_name = str(item["loc"][0]) if item["loc"] else "?"
            field_name = CONNECTION_VARIABLES_REVERSED.get(field_name, field_name)
            problems.append(f"setting {field_name} ({environment_variable(field_name)}): {item['msg']}")
        raise SettingsError("invalid settings:\n  " + "\n  ".join(problems)) from None
    except (json.JSONDecodeError, PydanticSettingsError) as error:
        # pydantic-settings reports a value it could not parse as JSON without the variable; name it here.
        match = re.search(r'field "(\w+)"', str(error))
        where = f"setting {match.group(1)} ({environment_variable(match.group(1))})" if match else "a setting"
        raise SettingsError(f"invalid settings:\n  {where}: not valid JSON ({error.__cause__ or error})") from None


def settings_environment(settings: Settings) -> dict[str, str]:
    """Environment variables that give a child process (a catch-up, a Dagster daemon) exactly these settings."""
    environment = {}
    for name, value in settings.model_dump(mode="json").items():
        if value is not None:
            environment[environment_variable(name)] = value if isinstance(value, str) else json.dumps(value)
    return environment


@cache
def current_settings() -> Settings:
    """Settings of this process, read once."""
    return load_settings()
