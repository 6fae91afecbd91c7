"""The local stack: a KRaft Kafka broker, PostgreSQL and Redis on loopback, and embedded chDB.

`up` is idempotent: a service that already answers at its address is left as it is. What `up` started is
recorded in `<data_dir>/stack.json`, so `down` stops exactly that and nothing else. Services whose address
is not on this machine are external: they are health-checked, never started or stopped.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from urllib.parse import urlsplit

from clickhouse_etl.clients.redis_cluster import ClusterUrl, is_cluster_url
from clickhouse_etl.core.pipeline.model import Pipeline
from clickhouse_etl.core.processes import process_alive
from clickhouse_etl.core.settings import Settings
from clickhouse_etl.dev.datasets import DATASETS
from clickhouse_etl.dev.redis_cluster import cluster_answers
from clickhouse_etl.dev.redis_server import RedisServer, RedisStartError, RedisState, redis_state
from clickhouse_etl.tools.commands import configured_pipelines, ensure_pipeline_tables

LOOPBACK_HOSTS = {"127.0.0.1", "localhost", "::1"}
STACK_STATE_FILE = "stack.json"


class StackError(RuntimeError):
    """A service of the local stack could not be started; the message names it and shows its log."""


@dataclass(frozen=True)
class ServiceStatus:
    name: str
    address: str
    answers: bool
    detail: str = ""


def log_tail(path: Path, lines: int = 25) -> str:
    if not path.exists():
        return f"(no log at {path})"
    text = path.read_text(errors="replace").splitlines()
    return "\n".join(text[-lines:])


def _port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _wait_until(check: Callable[[], bool], timeout: float, alive: Callable[[], bool] = lambda: True) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        if not alive():
            return False
        time.sleep(0.25)
    return check()


def _apt_install(*packages: str) -> None:
    """Install missing Debian packages (the stack's only system dependencies)."""
    if os.geteuid() != 0:
        raise StackError(
            f"missing Debian packages {', '.join(packages)}: run `sudo apt-get install {' '.join(packages)}`"
        )
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    lists = glob.glob("/var/lib/apt/lists/*Packages*")
    if not lists:
        subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
    result = subprocess.run(["apt-get", "install", "-y", "-qq", *packages], env=env, capture_output=True, text=True)
    if result.returncode != 0:
        subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
        subprocess.run(["apt-get", "install", "-y", "-qq", *packages], check=True, env=env)


# ----------------------------------------------------------------------------------------------------------
# Kafka
# ----------------------------------------------------------------------------------------------------------


class KafkaService:
    name = "kafka"

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        first = settings.kafka_bootstrap_servers.split(",")[0].strip()
        host, _, port = first.rpartition(":")
        self.host, self.port = host.strip("[]"), int(port)
        self.controller_port = self.port + 1
        self.home = settings.data_dir / "kafka"
        self.log_path = self.home / "kafka.log"
        self.libs = settings.cache_dir / f"kafka-{settings.kafka_version}" / "libs"

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def local(self) -> bool:
        return self.host in LOOPBACK_HOSTS

    def answers(self, timeout: float = 3.0) -> bool:
        from confluent_kafka.admin import AdminClient

        if not _port_open(self.host, self.port):
            return False
        try:
            admin = AdminClient({"bootstrap.servers": self.address, "log_level": 4, **self.settings.kafka_config})
            admin.list_topics(timeout=timeout)
            return True
        except Exception:
            return False

    def ensure_jars(self) -> Path:
        """Resolve the broker's jars from Maven Central once per version into the cache folder."""
        if list(self.libs.glob("kafka_2.13-*.jar")):
            return self.libs
        if shutil.which("mvn") is None:
            raise StackError("kafka: Maven (mvn) is needed once to fetch the broker jars from Maven Central")
        if shutil.which("java") is None:
            raise StackError("kafka: a Java 17+ runtime (java) is needed to run the broker")
        staging = self.libs.parent / f"libs.partial-{os.getpid()}"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        pom = resources.files("clickhouse_etl.dev") / "stack_files" / "kafka-pom.xml"
        with resources.as_file(pom) as pom_path:
            result = subprocess.run(
                [
                    "mvn",
                    "-q",
                    "-B",
                    "-f",
                    str(pom_path),
                    "dependency:copy-dependencies",
                    f"-Dkafka.version={self.settings.kafka_version}",
                    f"-DoutputDirectory={staging}",
                    "-DincludeScope=runtime",
                ],
                capture_output=True,
                text=True,
            )
        if result.returncode != 0:
            raise StackError(f"kafka: resolving the broker jars with Maven failed:\n{result.stdout[-3000:]}")
        staging.rename(self.libs)
        return self.libs

    def _write_config(self) -> Path:
        storage = self.home / "storage"
        storage.mkdir(parents=True, exist_ok=True)
        config = self.home / "server.properties"
        config.write_text(
            "\n".join(
                [
                    "process.roles=broker,controller",
                    "node.id=1",
                    f"controller.quorum.voters=1@{self.host}:{self.controller_port}",
                    f"listeners=PLAINTEXT://{self.host}:{self.port},CONTROLLER://{self.host}:{self.controller_port}",
                    f"advertised.listeners=PLAINTEXT://{self.host}:{self.port}",
                    "controller.listener.names=CONTROLLER",
                    "listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
                    "inter.broker.listener.name=PLAINTEXT",
                    f"log.dirs={storage}",
                    "num.partitions=1",
                    "auto.create.topics.enable=false",
                    "offsets.topic.replication.factor=1",
                    "offsets.topic.num.partitions=3",
                    "transaction.state.log.replication.factor=1",
                    "transaction.state.log.min.isr=1",
                    "share.coordinator.state.topic.replication.factor=1",
                    "share.coordinator.state.topic.min.isr=1",
                    "group.initial.rebalance.delay.ms=0",
                    "message.max.bytes=10485760",
                    "log.retention.hours=168",
                    "",
                ]
            )
        )
        return config

    def _java(self, *args: str, heap: str) -> list[str]:
        log4j = resources.files("clickhouse_etl.dev") / "stack_files" / "kafka-log4j2.yaml"
        return [
            "java",
            f"-Xmx{heap}",
            "-XX:+UseG1GC",
            "-Djava.awt.headless=true",
            f"-Dlog4j2.configurationFile={log4j}",
            "-cp",
            f"{self.libs}/*",
            *args,
        ]

    def start(self) -> int:
        self.ensure_jars()
        self.home.mkdir(parents=True, exist_ok=True)
        config = self._write_config()
        if not (self.home / "storage" / "meta.properties").exists():
            cluster_id = _kafka_cluster_id()
            result = subprocess.run(
                self._java("kafka.tools.StorageTool", "format", "-t", cluster_id, "-c", str(config), heap="256m"),
                capture_output=True,
                text=True,
            )
            if result.returncode != 0:
                raise StackError(f"kafka: formatting the storage failed:\n{result.stdout}\n{result.stderr}")
        with open(self.log_path, "ab") as log:
            process = subprocess.Popen(
                self._java("kafka.Kafka", str(config), heap=self.settings.kafka_heap),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        if not _wait_until(self.answers, 90, alive=lambda: process.poll() is None):
            process.kill()
            raise StackError(
                f"kafka did not start at {self.address}; last lines of {self.log_path}:\n{log_tail(self.log_path)}"
            )
        return process.pid

    def stop(self, pid: int) -> None:
        _terminate(pid, timeout=30)

    def ensure_topic(self, topic: str, partitions: int) -> str:
        from confluent_kafka.admin import AdminClient, NewTopic

        admin = AdminClient({"bootstrap.servers": self.address, "log_level": 4, **self.settings.kafka_config})
        existing = admin.list_topics(timeout=10).topics
        if topic in existing:
            return f"topic {topic} exists with {len(existing[topic].partitions)} partitions"
        futures = admin.create_topics([NewTopic(topic, num_partitions=partitions, replication_factor=1)])
        futures[topic].result(timeout=30)
        return f"topic {topic} created with {partitions} partitions"


def _kafka_cluster_id() -> str:
    """A random cluster id as Kafka writes them (URL-safe base64 of 16 bytes).

    One in 64 of those starts with "-", which the storage tool's argument parser takes for an option, so
    that is drawn again (Kafka's own Uuid.randomUuid does the same).
    """
    import base64

    while True:
        cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not cluster_id.startswith("-"):
            return cluster_id


def _terminate(pid: int, timeout: float) -> None:
    if not process_alive(pid):
        return
    try:
        os.killpg(pid, signal.SIGTERM)
    except (ProcessLookupError, PermissionError):
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            return
    if not _wait_until(lambda: not process_alive(pid), timeout):
        try:
            os.killpg(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)


# ----------------------------------------------------------------------------------------------------------
# Redis
# ----------------------------------------------------------------------------------------------------------


class RedisService:
    """The stack's Redis: one local redis-server with the claims, and the run workers' broker and results.

    A `REDIS_URL` naming a Redis Cluster (`redis+cluster://…`) is external here: health-checked, never started
    (clickhouse_etl.dev.redis_cluster starts a local one for tests).
    """

    name = "redis"

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.cluster = is_cluster_url(settings.redis_url)
        if self.cluster:
            self.host, self.port = ClusterUrl.parse(settings.redis_url).seeds[0]
        else:
            url = urlsplit(settings.redis_url)
            self.host, self.port = url.hostname or "127.0.0.1", url.port or 6379
        self.home = settings.data_dir / "redis"
        self.server = RedisServer(self.host, self.port, self.home)
        self.log_path = self.server.log_path

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}" + (" (cluster)" if self.cluster else "")

    @property
    def local(self) -> bool:
        return self.host in LOOPBACK_HOSTS and not self.cluster

    def answers(self, timeout: float = 2.0) -> bool:
        if self.cluster:
            return cluster_answers(self.settings.redis_url, timeout)
        return self.state(timeout).status == "ready"

    def state(self, timeout: float = 2.0) -> RedisState:
        return redis_state(self.settings.redis_url, timeout)

    def wait_while_loading(self, echo: Callable[[str], None]) -> None:
        """A Redis that is reading its append-only file (it answers LOADING) is waited for, not started again."""
        if self.cluster or self.state().status != "loading":
            return
        echo(f"{self.name:<10} {self.address:<28} {self.state().describe()}: waiting")
        try:
            self.server.wait_ready(self.server.pid(), self.settings.redis_url, echo)
        except RedisStartError as error:
            raise StackError(str(error)) from None

    def start(self, echo: Callable[[str], None] = lambda _: None) -> int:
        """Start redis-server and wait until it accepts commands (through a long LOADING of a large data set).

        The pid is recorded as soon as the process runs, so `stack down` stops it even if the wait is cut short.
        """
        if shutil.which("redis-server") is None:
            _apt_install("redis-server")
        try:
            pid = self.server.launch()
        except RedisStartError as error:
            raise StackError(str(error)) from None
        _write_state(self.settings, {**_read_state(self.settings), self.name: pid})
        try:
            self.server.wait_ready(pid, self.settings.redis_url, echo)
        except RedisStartError as error:  # it was stopped: forget it
            _write_state(self.settings, {k: v for k, v in _read_state(self.settings).items() if k != self.name})
            raise StackError(str(error)) from None
        return pid

    def stop(self, pid: int) -> None:
        self.server.stop(pid)


# ----------------------------------------------------------------------------------------------------------
# PostgreSQL
# ----------------------------------------------------------------------------------------------------------


def _postgres_bin() -> Path:
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), key=lambda p: int(p.split("/")[4]))
    if not candidates:
        _apt_install("postgresql")
        candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), key=lambda p: int(p.split("/")[4]))
    return Path(candidates[-1]).parent


def _as_postgres_user(command: list[str]) -> list[str]:
    # PostgreSQL refuses to run as root; run it as the Debian package's postgres user then.
    return ["runuser", "-u", "postgres", "--", *command] if os.geteuid() == 0 else command


class PostgresService:
    name = "postgres"

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        url = urlsplit(settings.postgres_dsn)
        self.host, self.port = url.hostname or "127.0.0.1", url.port or 5432
        self.user = url.username or "postgres"
        self.database = url.path.lstrip("/") or "clickhouse_etl"
        self.home = settings.data_dir / "postgres"
        self.log_path = self.home / "postgres.log"

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def local(self) -> bool:
        return self.host in LOOPBACK_HOSTS

    def answers(self, timeout: float = 2.0) -> bool:
        """The server answers (asked through its maintenance database: the DSN's may not exist yet)."""
        import psycopg

        try:
            with psycopg.connect(
                host=self.host, port=self.port, user=self.user, dbname="postgres", connect_timeout=max(1, int(timeout))
            ) as connection:
                connection.execute("SELECT 1")
            return True
        except Exception:
            return False

    def detail(self) -> str:
        """What `stack status` adds when the server answers but the DSN's database is missing."""
        import psycopg

        with psycopg.connect(host=self.host, port=self.port, user=self.user, dbname="postgres") as connection:
            found = connection.execute("SELECT 1 FROM pg_database WHERE datname = %s", (self.database,)).fetchone()
        return "" if found else f"database {self.database} missing (`stack up` creates it)"

    def start(self) -> int | None:
        bin_dir = _postgres_bin()
        pgdata = self.home / "pgdata"
        self.home.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            shutil.chown(self.home, "postgres", "postgres")
            if subprocess.run(_as_postgres_user(["test", "-w", str(self.home)])).returncode != 0:
                raise StackError(
                    f"postgres: user postgres cannot reach {self.home}; give the folders above it "
                    "o+x or set CLICKHOUSE_ETL_DATA_DIR to a folder it can reach"
                )
        if not (pgdata / "PG_VERSION").exists():
            result = subprocess.run(
                _as_postgres_user(
                    [
                        str(bin_dir / "initdb"),
                        "-D",
                        str(pgdata),
                        "-U",
                        self.user,
                        "--auth=trust",
                        "-E",
                        "UTF8",
                        "--locale=C.UTF-8",
                    ]
                ),
                capture_output=True,
                text=True,
            )
            if result.returncode != 0:
                raise StackError(f"postgres: initdb failed:\n{result.stdout}\n{result.stderr}")
        options = f"-p {self.port} -k {self.home} -c listen_addresses={self.host} -c fsync=on"
        result = subprocess.run(
            _as_postgres_user(
                [
                    str(bin_dir / "pg_ctl"),
                    "-D",
                    str(pgdata),
                    "-l",
                    str(self.log_path),
                    "-o",
                    options,
                    "-w",
                    "-t",
                    "60",
                    "start",
                ]
            ),
            capture_output=True,
            text=True,
        )
        if result.returncode != 0 or not _wait_until(self.answers, 30):
            raise StackError(
                f"postgres did not start at {self.address}; last lines of {self.log_path}:\n"
                f"{result.stdout}{result.stderr}\n{log_tail(self.log_path)}"
            )
        self.ensure_database()
        pid_line = (pgdata / "postmaster.pid").read_text().splitlines()[0]
        return int(pid_line)

    def ensure_database(self) -> None:
        import psycopg
        from psycopg import sql

        with psycopg.connect(
            host=self.host, port=self.port, user=self.user, dbname="postgres", autocommit=True
        ) as connection:
            exists = connection.execute("SELECT 1 FROM pg_database WHERE datname = %s", (self.database,)).fetchone()
            if not exists:
                connection.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(self.database)))

    def stop(self, pid: int) -> None:
        pgdata = self.home / "pgdata"
        subprocess.run(
            _as_postgres_user([str(_postgres_bin() / "pg_ctl"), "-D", str(pgdata), "-m", "fast", "-w", "stop"]),
            capture_output=True,
        )
        _terminate(pid, timeout=15)


# ----------------------------------------------------------------------------------------------------------
# ClickHouse (embedded chDB or a server) — nothing to start
# ----------------------------------------------------------------------------------------------------------


class ClickHouseService:
    name = "clickhouse"
    local = False  # never started: chDB is in-process, a server is external
    log_path = Path("/dev/null")

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    @property
    def address(self) -> str:
        if self.settings.clickhouse_is_embedded:
            return f"embedded chDB at {self.settings.chdb_path}"
        url = urlsplit(self.settings.clickhouse_dsn)
        return f"{url.scheme}://{url.hostname}:{url.port or ''}"

    def answers(self, timeout: float = 10.0) -> bool:
        from clickhouse_etl.clients.clickhouse import clickhouse_session

        try:
            with clickhouse_session(self.settings.clickhouse_dsn, timeout) as client:
                return client.command("SELECT 1") == 1
        except Exception:
            return False


# ----------------------------------------------------------------------------------------------------------
# The stack
# ----------------------------------------------------------------------------------------------------------


def _services(settings: Settings) -> list[KafkaService | RedisService | PostgresService]:
    return [KafkaService(settings), PostgresService(settings), RedisService(settings)]


def _state_path(settings: Settings) -> Path:
    return settings.data_dir / STACK_STATE_FILE


def _read_state(settings: Settings) -> dict[str, int]:
    path = _state_path(settings)
    return json.loads(path.read_text()) if path.exists() else {}


def _write_state(settings: Settings, state: dict[str, int]) -> None:
    path = _state_path(settings)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(state, indent=2))


def stack_up(settings: Settings, echo: Callable[[str], None] = print) -> None:
    """Start every local service that does not answer yet; create the pipelines' topics and tables."""
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    state = _read_state(settings)
    for service in _services(settings):
        if isinstance(service, RedisService):
            service.wait_while_loading(echo)  # after a restart, Redis reads its append-only file for a while
        if service.answers():
            echo(f"{service.name:<10} {service.address:<28} already answering")
            if isinstance(service, PostgresService):
                service.ensure_database()  # a server of an earlier `stack up` may lack this DSN's database
            continue
        if not service.local:
            raise StackError(f"{service.name} at {service.address} does not answer (external service, not started)")
        pid = service.start(echo) if isinstance(service, RedisService) else service.start()
        if pid is not None:
            state[service.name] = pid
            _write_state(settings, state)
        echo(f"{service.name:<10} {service.address:<28} started (pid {pid}), log: {service.log_path}")
    kafka = KafkaService(settings)
    pipelines = configured_pipelines(settings)
    for topic in dict.fromkeys(p.topic for p in pipelines):
        echo(f"{'kafka':<10} {kafka.ensure_topic(topic, settings.topic_partitions)}")
    tables = ensure_schemas(settings, pipelines)
    echo(f"{'postgres':<10} database and demo lookup tables ready: {', '.join(tables) or 'none'}")
    echo(f"{'clickhouse':<10} {ClickHouseService(settings).address}: database {settings.clickhouse_database} ready")


def ensure_schemas(settings: Settings, pipelines: list[Pipeline]) -> list[str]:
    """The demo lookup tables of the packaged pipelines in PostgreSQL, and every pipeline's ClickHouse tables."""
    tables = []
    for pipeline in pipelines:
        if pipeline.name in DATASETS:
            DATASETS[pipeline.name].ensure_lookup_table(settings)
            tables.append(DATASETS[pipeline.name].lookup_table)
    ensure_pipeline_tables(settings, pipelines)
    return tables


def stack_down(settings: Settings, echo: Callable[[str], None] = print) -> None:
    """Stop what `stack up` started, and nothing else."""
    state = _read_state(settings)
    by_name = {service.name: service for service in _services(settings)}
    for name, pid in list(state.items()):
        service = by_name.get(name)
        if service is None:
            continue
        if process_alive(pid):
            service.stop(pid)
            echo(f"{name:<10} stopped (pid {pid})")
        else:
            echo(f"{name:<10} was not running")
        del state[name]
        _write_state(settings, state)
    if not by_name.keys() & _read_state(settings).keys():
        _state_path(settings).unlink(missing_ok=True)


def stack_status(settings: Settings) -> list[ServiceStatus]:
    state = _read_state(settings)
    statuses = []
    for service in [*_services(settings), ClickHouseService(settings)]:
        managed = (
            "started by stack up"
            if service.name in state
            else ("embedded" if service.name == "clickhouse" else "not managed")
        )
        answers = service.answers()
        detail = (service.detail() if answers and isinstance(service, PostgresService) else "") or managed
        if isinstance(service, RedisService) and not answers and not service.cluster:
            redis_now = service.state()
            if redis_now.status == "loading":
                detail = f"{redis_now.describe()}; {managed}"  # e.g. loading its dataset (40%, about 12 s left)
        statuses.append(ServiceStatus(service.name, service.address, answers, detail))
    return statuses


def started_pids(settings: Settings) -> dict[str, int]:
    return _read_state(settings)
