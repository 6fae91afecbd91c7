"""The production deployment's configuration, checked without contacting any service.

Instance files (deploy/dagster.production.yaml, the local dagster.yaml, the instance inlined in
docker-compose.yml, and the guide's Kubernetes Job alternative) go through Dagster's own check, the one
dagster-webserver and dagster-daemon run when they load an instance:
`dagster._core.instance.config.dagster_instance_config` validates the whole file against Dagster's instance
schema (including the `storage: postgres` block, whose schema is Dagster core's `pg_config`, and the rule
that run limits are not set twice). Then `InstanceRef.from_dir` turns the file into the configurable classes
the instance would load (storage, run coordinator, run launcher, compute logs, scheduler, ...), and each
class's config is processed against that class's own schema with the `env:` references resolved.

dagster-postgres and dagster-celery are dependencies of the project, so every class of the production and
compose files is loaded and checked. Only the Kubernetes Job alternative names a package that is not
installed here (dagster_k8s: the image adds it on request); for it the test asserts that the K8sRunLauncher
block carries the keys that launcher cannot start without, and checks the class like any other where the
package is installed.

The deployment files around the instance are checked against the project itself: the Kubernetes manifests
and the compose services run commands the command line accepts, give every process the variables the
instance file refers to, and set no variable the project does not read.

The definitions are built from a production-like environment (TLS/SASL connection strings with passwords)
and must resolve every job, sensor and schedule while no password reaches what the UI is sent. The guide's
replicated DDL must match the project's tables, and its run-purge code is run against a test instance.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shlex
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import dagster as dg
import pytest
import yaml
from dagster._config import process_config
from dagster._core.instance.config import dagster_instance_config
from dagster._core.instance.ref import InstanceRef
from dagster._core.remote_representation.external_data import RepositorySnap, ResourceConfigEnvVarSnap
from dagster._core.storage.dagster_run import DagsterRun
from dagster._core.utils import make_new_run_id
from dagster._serdes import class_from_code_pointer, serialize_value
from dagster._serdes.config_class import ConfigurableClassData

from clickhouse_etl.cli import build_parser
from clickhouse_etl.core.pipeline.ddl import all_statements
from clickhouse_etl.core.pipeline.loading import load_pipelines
from clickhouse_etl.core.ranges import OffsetRange
from clickhouse_etl.core.settings import Settings, environment_variable, load_settings
from clickhouse_etl.orchestration import instance
from clickhouse_etl.orchestration.definitions import configured_definitions
from clickhouse_etl.orchestration.jobs import range_run_config
from clickhouse_etl.orchestration.run_records import read_ledger
from clickhouse_etl.orchestration.tags import PARTITION_SLOT, range_tags

ROOT = Path(__file__).parents[2]
PRODUCTION_YAML = ROOT / "deploy" / "dagster.production.yaml"
KUBERNETES = ROOT / "deploy" / "kubernetes"
LOCAL_YAML = ROOT / "dagster.yaml"
COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
GUIDE = ROOT / "docs" / "production.md"

# Packages the guide's alternatives add to the image (--build-arg EXTRA_PACKAGES); not installed here.
DEPLOYMENT_ONLY_PACKAGES = {"dagster_k8s"}

# Credentials of a production-like environment: none of them may reach what the UI is sent.
SECRETS = {
    "kafka": "kafka-secret-3f9a",
    "redis": "redis-secret-8c21",
    "postgres": "postgres-secret-55e0",
    "clickhouse": "clickhouse-secret-b7d4",
}
PRODUCTION_ENVIRONMENT = {
    "KAFKA_BOOTSTRAP_SERVERS": "broker1.example.com:9093,broker2.example.com:9093",
    "CLICKHOUSE_ETL_KAFKA_CONFIG": json.dumps(
        {
            "security.protocol": "SASL_SSL",
            "sasl.mechanism": "SCRAM-SHA-512",
            "sasl.username": "clickhouse-etl",
            "sasl.password": SECRETS["kafka"],
            "ssl.ca.location": "/etc/kafka-ca/ca.pem",
        }
    ),
    "REDIS_URL": f"rediss://clickhouse-etl:{SECRETS['redis']}@redis.example.com:6380/0",
    "POSTGRES_DSN": (
        f"postgresql://clickhouse_etl:{SECRETS['postgres']}@pg.example.com:5432/clickhouse_etl"
        "?sslmode=verify-full&sslrootcert=/etc/pg-ca/ca.pem"
    ),
    "CLICKHOUSE_DSN": f"https://clickhouse_etl:{SECRETS['clickhouse']}@clickhouse.example.com:8443/",
    "CLICKHOUSE_ETL_TOPIC": "ad_clicks",
    "CLICKHOUSE_ETL_PIPELINES": "ad_clicks,api_usage",
    "CLICKHOUSE_ETL_MAX_RECORDS_PER_RUN": "1000000",
}
# Values the env: references of the production and compose instance files resolve to.
INSTANCE_ENVIRONMENT = {
    "DAGSTER_PG_URL": "postgresql+psycopg2://dagster:pw@pg.example.com:5432/dagster?sslmode=verify-full",
    "CLICKHOUSE_ETL_CELERY_BROKER_URL": "rediss://celery:pw@redis.example.com:6380/1?ssl_cert_reqs=required",
    "CLICKHOUSE_ETL_CELERY_BACKEND_URL": "rediss://celery:pw@redis.example.com:6380/2?ssl_cert_reqs=required",
    "CLICKHOUSE_ETL_CELERY_QUEUE": "dagster",
}
# ... and those of the guide's Kubernetes Job alternative.
K8S_JOB_ENVIRONMENT = {
    "DAGSTER_K8S_JOB_NAMESPACE": "clickhouse-etl",
    "DAGSTER_RUN_IMAGE": "registry.example.com/clickhouse-etl:1.0.0",
}
# Blocks the production and compose instances share with the local dagster.yaml, word for word: the runs go
# to the same kind of workers, queue the same way and are retried the same way.
SHARED_WITH_LOCAL = ("run_launcher", "run_coordinator", "run_retries", "sensors", "python_logs")
DAGSTER_SERVICES = ("dagster-webserver", "dagster-daemon", "dagster-worker")
# The Kubernetes objects the manifests refer to; the guide's commands create the first two.
INSTANCE_CONFIG_MAP = "clickhouse-etl-dagster-instance"
CONNECTIONS_SECRET = "clickhouse-etl-connections"
SETTINGS_CONFIG_MAP = "clickhouse-etl-settings"


def env_references(value: Any) -> set[str]:
    """Names of every `{env: NAME}` in a parsed YAML document."""
    if isinstance(value, dict):
        if set(value) == {"env"}:
            return {value["env"]}
        return set().union(*(env_references(v) for v in value.values()))
    if isinstance(value, list):
        return set().union(*(env_references(v) for v in value))
    return set()


def check_instance_file(config_dir: Path, filename: str, home: Path) -> tuple[dict[str, Any], set[tuple[str, str]]]:
    """Dagster's instance check, then each configurable class against its own schema.

    Returns the validated config and the (module, class) pairs whose package is not importable here.
    """
    config, _ = dagster_instance_config(str(config_dir), config_filename=filename)
    ref = InstanceRef.from_dir(str(home), config_dir=str(config_dir), config_filename=filename)
    not_importable: set[tuple[str, str]] = set()
    for name, data in ref._asdict().items():
        if not isinstance(data, ConfigurableClassData):
            continue
        if importlib.util.find_spec(data.module_name.split(".")[0]) is None:
            not_importable.add((data.module_name, data.class_name))
            continue
        klass = class_from_code_pointer(data.module_name, data.class_name)
        result = process_config(klass.config_type(), yaml.safe_load(data.config_yaml) or {})
        assert result.success, f"{filename}: {name} ({data.class_name}): {result.errors}"
    return dict(config), not_importable


@pytest.fixture
def instance_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in {**INSTANCE_ENVIRONMENT, **K8S_JOB_ENVIRONMENT}.items():
        monkeypatch.setenv(name, value)


def partition_limit(config: dict[str, Any]) -> list[dict[str, Any]]:
    limits = config["concurrency"]["runs"]["tag_concurrency_limits"]
    return [limit for limit in limits if limit["key"] == PARTITION_SLOT]


def compose_instance(tmp_path: Path) -> Path:
    """The compose file's inline dagster.yaml, written to a folder of its own."""
    compose = yaml.safe_load(COMPOSE_FILE.read_text())
    config_dir = tmp_path / "compose"
    config_dir.mkdir(exist_ok=True)
    (config_dir / "dagster.yaml").write_text(compose["configs"]["dagster-instance"]["content"])
    return config_dir


POSTGRES_STORAGE = {
    "run_storage": "PostgresRunStorage",
    "event_log_storage": "KeptConnectionPostgresEventLogStorage",
    "schedule_storage": "PostgresScheduleStorage",
}


def storage_classes(config: dict[str, Any]) -> dict[str, str]:
    """Each storage's class, and that every one of them reads its URL from DAGSTER_PG_URL."""
    for storage in POSTGRES_STORAGE:
        assert config[storage]["config"] == {"postgres_url": {"env": "DAGSTER_PG_URL"}}, storage
    return {storage: config[storage]["class"] for storage in POSTGRES_STORAGE}


def test_production_instance_passes_dagsters_config_check(instance_environment: None, tmp_path: Path) -> None:
    config, not_importable = check_instance_file(PRODUCTION_YAML.parent, PRODUCTION_YAML.name, tmp_path)

    assert not_importable == set()  # dagster-postgres, dagster-celery and the project's classes: all checked
    assert storage_classes(dict(config)) == POSTGRES_STORAGE
    assert config["run_launcher"]["class"] == "WarmWorkerRunLauncher"
    assert config["run_coordinator"]["class"] == "PartitionSlotRunCoordinator"
    monitoring = config["run_monitoring"]
    # A lost worker machine leaves its run STARTED: only a runtime limit ends it without a person.
    assert monitoring["max_runtime_seconds"] > 0 and monitoring["cancel_timeout_seconds"] > 0


def test_production_and_compose_instances_run_like_the_local_one(tmp_path: Path) -> None:
    local = yaml.safe_load(LOCAL_YAML.read_text())
    production = yaml.safe_load(PRODUCTION_YAML.read_text())
    composed = yaml.safe_load((compose_instance(tmp_path) / "dagster.yaml").read_text())

    shared = {block: local[block] for block in SHARED_WITH_LOCAL}
    local_limits = local["concurrency"]["runs"]["tag_concurrency_limits"]
    for config in (production, composed):
        assert {block: config.get(block) for block in SHARED_WITH_LOCAL} == shared
        assert config["concurrency"]["runs"]["tag_concurrency_limits"] == local_limits
        # Everything the local file monitors, monitored alike (production adds limits of its own).
        monitoring = config["run_monitoring"]
        assert {key: monitoring.get(key) for key in local["run_monitoring"]} == local["run_monitoring"]
        # Several machines share one instance: PostgreSQL storage, no compute log files on a worker's disk.
        assert storage_classes(config) == POSTGRES_STORAGE
        assert config["compute_logs"]["class"] == "NoOpComputeLogManager"


def test_local_instance_passes_dagsters_config_check(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CLICKHOUSE_ETL_DATA_DIR", str(tmp_path / "data"))
    for name, value in instance.instance_environment(load_settings()).items():
        monkeypatch.setenv(name, value)

    config, not_importable = check_instance_file(LOCAL_YAML.parent, LOCAL_YAML.name, tmp_path)

    assert not_importable == set()  # SQLite storage, dagster-celery and the project's coordinator: all installed
    assert config["run_launcher"]["class"] == "WarmWorkerRunLauncher"
    assert config["run_coordinator"]["class"] == "PartitionSlotRunCoordinator"
    assert partition_limit(config)


def test_the_default_launcher_is_one_setting_away(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CLICKHOUSE_ETL_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("CLICKHOUSE_ETL_RUN_LAUNCHER", "default")
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "home"))
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "dagster.yaml").write_text(instance.project_dagster_yaml(load_settings()))

    config, not_importable = check_instance_file(tmp_path / "config", "dagster.yaml", tmp_path / "home")

    assert not_importable == set()
    assert config["run_launcher"] == {"module": "dagster", "class": "DefaultRunLauncher"}
    assert partition_limit(config) and config["run_monitoring"]["enabled"]


def test_compose_instance_passes_dagsters_config_check(instance_environment: None, tmp_path: Path) -> None:
    config, not_importable = check_instance_file(compose_instance(tmp_path), "dagster.yaml", tmp_path / "home")

    assert not_importable == set()
    assert storage_classes(dict(config)) == POSTGRES_STORAGE
    assert config["run_launcher"]["class"] == "WarmWorkerRunLauncher"
    services = yaml.safe_load(COMPOSE_FILE.read_text())["services"]
    assert {"kafka", "redis", "postgres", "clickhouse", *DAGSTER_SERVICES} <= set(services)
    for name in DAGSTER_SERVICES:
        mounted = {c["target"] for c in services[name]["configs"]}
        assert mounted == {services[name]["environment"]["DAGSTER_HOME"] + "/dagster.yaml"}, name


def cli_arguments(command: list[str]) -> Any:
    """A `clickhouse-etl ...` command line as the command line itself parses it (an unknown one fails)."""
    assert command[0] == "clickhouse-etl", command
    return build_parser().parse_args(command[1:])


def test_compose_services_run_the_projects_commands(tmp_path: Path) -> None:
    compose = yaml.safe_load(COMPOSE_FILE.read_text())
    services = compose["services"]
    references = env_references(yaml.safe_load((compose_instance(tmp_path) / "dagster.yaml").read_text()))

    assert references == set(INSTANCE_ENVIRONMENT)
    for name in DAGSTER_SERVICES:
        environment = services[name]["environment"]
        # dagster-webserver derives nothing: every process needs each variable the instance refers to.
        assert references <= set(environment), name
        assert environment["DAGSTER_PG_URL"].startswith("postgresql+psycopg2://")
    environment = services["dagster-worker"]["environment"]
    redis = environment["REDIS_URL"].rsplit("/", 1)[0]
    assert environment["CLICKHOUSE_ETL_CELERY_BROKER_URL"] == f"{redis}/1"
    assert environment["CLICKHOUSE_ETL_CELERY_BACKEND_URL"] == f"{redis}/2"

    assert cli_arguments(services["dagster-daemon"]["command"]).command == "daemon"
    worker = cli_arguments(services["dagster-worker"]["command"])
    assert worker.command == "worker" and "%h" in worker.name  # every scaled replica has a name of its own
    assert "container_name" not in services["dagster-worker"]  # so that `--scale` can start more
    instance_config = yaml.safe_load((compose_instance(tmp_path) / "dagster.yaml").read_text())
    assert instance_config["concurrency"]["runs"]["max_concurrent_runs"] <= worker.concurrency


def test_every_instance_keeps_one_run_per_partition(instance_environment: None, tmp_path: Path) -> None:
    local, _ = dagster_instance_config(str(LOCAL_YAML.parent), config_filename=LOCAL_YAML.name)
    production, _ = dagster_instance_config(str(PRODUCTION_YAML.parent), config_filename=PRODUCTION_YAML.name)
    composed, _ = dagster_instance_config(str(compose_instance(tmp_path)))

    expected = [{"key": PARTITION_SLOT, "value": {"applyLimitPerUniqueValue": True}, "limit": 1}]
    for config in (local, production, composed):
        assert partition_limit(dict(config)) == expected
        assert config["run_retries"]["enabled"] and config["run_monitoring"]["enabled"]
        # Runs of a tick submitted in parallel may be created out of order: a partition's ranges would start so.
        assert "num_submit_workers" not in config.get("sensors", {})
    # Frames live in the run's memory: a dead run worker must fail (then retry all steps), never resume.
    for config in (production, composed):
        assert config["run_monitoring"]["max_resume_run_attempts"] == 0


def test_production_instance_references_documented_variables_only() -> None:
    raw = yaml.safe_load(PRODUCTION_YAML.read_text())
    guide = GUIDE.read_text()

    references = env_references(raw)
    assert references == set(INSTANCE_ENVIRONMENT)
    assert [name for name in sorted(references) if f"`{name}`" not in guide] == []
    # No credential in the file itself: the storage URL is a reference, not a value.
    storage_classes(raw)
    # A plain postgresql:// URL makes SQLAlchemy 2.1 pick psycopg 3, which dagster-postgres fails with.
    assert "`postgresql+psycopg2://" in guide


def guides_k8s_job_launcher() -> dict[str, Any]:
    block = re.search(r"```yaml\n(run_launcher:\n  module: dagster_k8s\n.*?)```", GUIDE.read_text(), re.DOTALL)
    assert block, "the guide's K8sRunLauncher block is missing"
    return yaml.safe_load(block.group(1))


def test_guides_kubernetes_job_alternative_passes_dagsters_config_check(
    instance_environment: None, tmp_path: Path
) -> None:
    launcher = guides_k8s_job_launcher()
    alternative = {**yaml.safe_load(PRODUCTION_YAML.read_text()), **launcher}
    (tmp_path / "k8s").mkdir()
    (tmp_path / "k8s" / "dagster.yaml").write_text(yaml.safe_dump(alternative))

    config, not_importable = check_instance_file(tmp_path / "k8s", "dagster.yaml", tmp_path / "home")

    assert config["run_launcher"]["class"] == "K8sRunLauncher"
    assert {module.split(".")[0] for module, _ in not_importable} <= DEPLOYMENT_ONLY_PACKAGES
    if not_importable:
        required = {"instance_config_map", "service_account_name", "job_namespace", "job_image", "env_secrets"}
        assert required <= set(config["run_launcher"]["config"])
    # The launcher mounts the instance ConfigMap into its run pods: the one the manifests mount everywhere.
    assert launcher["run_launcher"]["config"]["instance_config_map"] == INSTANCE_CONFIG_MAP
    guide = GUIDE.read_text()
    assert env_references(launcher) == set(K8S_JOB_ENVIRONMENT)
    assert [name for name in sorted(K8S_JOB_ENVIRONMENT) if f"`{name}`" not in guide] == []


# --- the Kubernetes manifests ------------------------------------------------------------------------------


def manifests() -> list[dict[str, Any]]:
    files = sorted(KUBERNETES.glob("*.yaml"))
    assert files, "no Kubernetes manifests"
    return [doc for path in files for doc in yaml.safe_load_all(path.read_text()) if doc]


def deployments() -> dict[str, dict[str, Any]]:
    return {doc["metadata"]["name"]: doc for doc in manifests() if doc["kind"] == "Deployment"}


def guides_kubectl_create(kind: str, name: str) -> str:
    """The guide's `kubectl create <kind> ... <name> ...` command, continuation lines joined."""
    command = re.search(rf"^kubectl create {kind} {name} \\\n(?:.*\\\n)*.*$", GUIDE.read_text(), re.MULTILINE)
    assert command, f"the guide does not create {kind} {name}"
    return command.group(0).replace("\\\n", " ")


def secret_keys() -> set[str]:
    """The keys the guide's command puts into the connections Secret."""
    return set(re.findall(r"--from-literal=(\w+)=", guides_kubectl_create("secret generic", CONNECTIONS_SECRET)))


def image_dagster_home() -> str:
    found = re.search(r"DAGSTER_HOME=(\S+)", DOCKERFILE.read_text())
    assert found, "the Dockerfile sets no DAGSTER_HOME"
    return found.group(1)


def test_kubernetes_manifests_are_the_documented_deployment() -> None:
    kinds = sorted((doc["kind"], doc["metadata"]["name"]) for doc in manifests())
    assert kinds == [
        ("ConfigMap", SETTINGS_CONFIG_MAP),
        ("Deployment", "clickhouse-etl-daemon"),
        ("Deployment", "clickhouse-etl-webserver"),
        ("Deployment", "clickhouse-etl-worker"),
        ("Service", "clickhouse-etl-webserver"),
    ]
    # The instance ConfigMap is made from the production file, as the guide says.
    instance_command = guides_kubectl_create("configmap", INSTANCE_CONFIG_MAP)
    assert f"--from-file=dagster.yaml={PRODUCTION_YAML.relative_to(ROOT)}" in instance_command
    daemon = deployments()["clickhouse-etl-daemon"]
    # Exactly one daemon, also during a rollout.
    assert daemon["spec"]["replicas"] == 1 and daemon["spec"]["strategy"]["type"] == "Recreate"
    images = {d["spec"]["template"]["spec"]["containers"][0]["image"] for d in deployments().values()}
    assert len(images) == 1  # one image for every process


def test_kubernetes_manifests_run_the_projects_commands_with_its_settings() -> None:
    settings_map = next(doc for doc in manifests() if doc["kind"] == "ConfigMap")["data"]
    known = {environment_variable(name) for name in Settings.model_fields} | set(INSTANCE_ENVIRONMENT)
    # Plain settings and secrets are variables the project reads (or the instance file refers to).
    assert set(settings_map) - known == set()
    assert secret_keys() - known == set()
    assert load_pipelines(settings_map["CLICKHOUSE_ETL_PIPELINES"])
    production = yaml.safe_load(PRODUCTION_YAML.read_text())

    for name, deployment in deployments().items():
        pod = deployment["spec"]["template"]["spec"]
        [container] = pod["containers"]
        sources = {(k, v["name"]) for source in container["envFrom"] for k, v in source.items()}
        assert sources == {("secretRef", CONNECTIONS_SECRET), ("configMapRef", SETTINGS_CONFIG_MAP)}, name
        env = {item["name"]: item for item in container["env"]}
        variables = set(env) | set(settings_map) | secret_keys()
        # Every process loads the instance: each variable it refers to is there (dagster-webserver derives none).
        assert set(INSTANCE_ENVIRONMENT) - variables == set(), name
        assert set(env) - known - {"POD_NAME"} == set(), name
        # The production dagster.yaml sits in DAGSTER_HOME, one file, so that the folder stays writable.
        home = env["DAGSTER_HOME"]["value"]
        assert home == image_dagster_home()
        volumes = {volume["name"]: volume for volume in pod["volumes"]}
        [mount] = [m for m in container["volumeMounts"] if m["mountPath"] == f"{home}/dagster.yaml"]
        assert mount["subPath"] == "dagster.yaml"
        assert volumes[mount["name"]]["configMap"]["name"] == INSTANCE_CONFIG_MAP, name

        command = container["command"]
        if name == "clickhouse-etl-webserver":
            assert command[0] == "dagster-webserver"
            assert command[command.index("-w") + 1] == "/opt/clickhouse-etl/workspace.yaml"
            assert "COPY pyproject.toml README.md workspace.yaml ./" in DOCKERFILE.read_text()
        elif name == "clickhouse-etl-daemon":
            assert cli_arguments(command).command == "daemon"
        else:
            worker = cli_arguments(command)
            assert worker.command == "worker"
            # Each worker is named after its pod, from the downward API.
            assert worker.name == "$(POD_NAME)"
            assert env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
            # Launched runs find a free worker process: capacity covers the instance's run limit.
            capacity = deployment["spec"]["replicas"] * worker.concurrency
            assert production["concurrency"]["runs"]["max_concurrent_runs"] <= capacity
            assert pod["terminationGracePeriodSeconds"] >= 60  # time to finish the runs it holds


def test_guides_worker_commands_are_the_command_lines() -> None:
    """Every `clickhouse-etl worker|daemon ...` line of the guide's shell blocks parses."""
    blocks = re.findall(r"```bash\n(.*?)```", GUIDE.read_text(), re.DOTALL)
    lines = [line for block in blocks for line in block.splitlines() if line.startswith("clickhouse-etl ")]
    commands = [shlex.split(line.split("#")[0].replace("$(hostname)", "host")) for line in lines]
    assert any(command[1] == "worker" for command in commands)
    for command in commands:
        cli_arguments(command)


@pytest.fixture
def production_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name, value in PRODUCTION_ENVIRONMENT.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dagster_home"))
    monkeypatch.setenv("CLICKHOUSE_ETL_DATA_DIR", str(tmp_path / "data"))


def test_definitions_load_with_production_settings(production_environment: None) -> None:
    settings = load_settings()
    assert not settings.clickhouse_is_embedded
    assert settings.kafka_config["security.protocol"] == "SASL_SSL"

    defs = configured_definitions(settings)

    ingest = defs.resolve_job_def("ingest_clicks")
    for job_name in ("ingest_api_usage", "request_backfill", "verify_offsets_and_stats"):
        defs.resolve_job_def(job_name)
    for sensor_name in ("kafka_offsets_sensor", "api_usage_sensor", "backfill_sensor"):
        defs.resolve_sensor_def(sensor_name)
    defs.resolve_schedule_def("nightly_verification")
    # What a sensor's run request carries is valid run config for the job as deployed.
    dg.validate_run_config(ingest, range_run_config(OffsetRange("ad_clicks", 0, 0, 1_000_000)))


# Dagster's own snapshot code reads a deprecated schedule property; nothing of the project's.
@pytest.mark.filterwarnings("ignore:Property `ScheduleDefinition.environment_vars`:DeprecationWarning")
def test_connections_reach_the_resources_but_not_the_ui(production_environment: None) -> None:
    defs = configured_definitions(load_settings())
    repository = defs.get_repository_def()

    # Everything the code location sends to the webserver: jobs, sensors, schedules, resources, assets.
    snapshot = RepositorySnap.from_def(repository)
    shown = serialize_value(snapshot)
    assert [name for name, secret in SECRETS.items() if secret in shown] == []
    configured = {resource.name: resource.configured_values for resource in snapshot.resources}
    assert configured["kafka"]["bootstrap_servers"] == ResourceConfigEnvVarSnap(name="KAFKA_BOOTSTRAP_SERVERS")
    assert configured["kafka"]["extra_config_json"] == ResourceConfigEnvVarSnap(name="CLICKHOUSE_ETL_KAFKA_CONFIG")
    assert configured["claims"]["redis_url"] == ResourceConfigEnvVarSnap(name="REDIS_URL")
    assert configured["postgres"]["postgres_dsn"] == ResourceConfigEnvVarSnap(name="POSTGRES_DSN")
    assert configured["warehouse"]["dsn"] == ResourceConfigEnvVarSnap(name="CLICKHOUSE_DSN")

    # At run time the references resolve to the real values; building resources opens no connection.
    with dg.build_resources({name: defs.resources[name] for name in ("kafka", "claims", "warehouse")}) as res:
        consumer_config = res.kafka.reader()._config()
        assert consumer_config["security.protocol"] == "SASL_SSL"
        assert consumer_config["sasl.password"] == SECRETS["kafka"]
        assert consumer_config["bootstrap.servers"] == PRODUCTION_ENVIRONMENT["KAFKA_BOOTSTRAP_SERVERS"]
        assert res.claims.redis_url.startswith("rediss://")
        assert res.warehouse.dsn == PRODUCTION_ENVIRONMENT["CLICKHOUSE_DSN"]


def _normalized(statement: str) -> str:
    """A DDL statement without comments, quoting and layout, so two spellings of one statement compare equal."""
    statement = re.sub(r"--[^\n]*", "", statement).replace("`", "")
    statement = re.sub(r"\s+", " ", statement)
    return re.sub(r"\s*([(),])\s*", r"\1", statement).strip()


def test_guides_replicated_tables_are_what_the_ddl_command_prints() -> None:
    block = re.search(r"```sql\n(.*?)```", GUIDE.read_text(), re.DOTALL)
    assert block, "the guide's replicated DDL block is missing"
    guide_statements = [_normalized(s) for s in block.group(1).split(";\n") if s.strip()]
    [ad_clicks] = load_pipelines("ad_clicks", environment={})
    printed = all_statements(ad_clicks.pipeline, ad_clicks.columns, "analytics", 10_000, cluster="{cluster}")
    assert guide_statements == [_normalized(s) for s in printed]
    assert all("ReplicatedMergeTree" in s for s in guide_statements if " TABLE " in s)


def _purge_function() -> Any:
    """The purge function exactly as the guide shows it."""
    block = re.search(r"```python\n(# purge_runs\.py.*?)```", GUIDE.read_text(), re.DOTALL)
    assert block, "the guide's purge_runs.py block is missing"
    namespace: dict[str, Any] = {"__name__": "purge_runs"}
    exec(compile(block.group(1), "purge_runs.py", "exec"), namespace)
    return namespace["purge_ingest_runs"]


def test_guides_run_purge_keeps_the_offset_ledger_whole() -> None:
    purge_ingest_runs = _purge_function()
    success, failure, started = dg.DagsterRunStatus.SUCCESS, dg.DagsterRunStatus.FAILURE, dg.DagsterRunStatus.STARTED
    history = [
        ("first", 0, 0, 100, success),
        ("failed attempt", 0, 100, 200, failure),
        ("second", 0, 100, 200, success),
        ("third", 0, 200, 300, success),
        ("in flight", 0, 300, 400, started),
        ("before a gap", 1, 0, 50, success),
        ("after a gap", 1, 60, 100, success),
    ]
    with dg.instance_for_test() as instance:
        run_ids = {}
        for label, partition, start, end, status in history:
            run_ids[label] = make_new_run_id()
            instance.add_run(
                DagsterRun(
                    job_name="ingest_clicks",
                    run_id=run_ids[label],
                    status=status,
                    tags=range_tags("ad_clicks", OffsetRange("ad_clicks", partition, start, end)),
                )
            )
        before = datetime.now(UTC) + timedelta(minutes=1)  # every run counts as old
        planned_ends = {
            p: entry.planned_end for p, entry in read_ledger(instance, "ingest_clicks", "ad_clicks").items()
        }

        purge = lambda before, delete=False: purge_ingest_runs(instance, "ingest_clicks", "ad_clicks", before, delete)  # noqa: E731
        assert purge(datetime.now(UTC) - timedelta(days=1)) == []
        dry_run = purge(before)
        assert len(instance.get_runs()) == len(history)  # a dry run deletes nothing
        deleted = purge(before, delete=True)

        assert sorted(deleted) == sorted(dry_run) == sorted(run_ids[k] for k in ("first", "failed attempt", "second"))
        ledger = read_ledger(instance, "ingest_clicks", "ad_clicks")
        assert [(r.start, r.end) for r in ledger[0].committed] == [(200, 300)]
        assert [(r.start, r.end) for r in ledger[0].in_flight] == [(300, 400)]
        assert ledger[0].gaps() == [] and ledger[0].failed == {}
        # Past a gap nothing is purged, so the gap stays visible.
        assert ledger[1].gaps() == [(50, 60)]
        assert {p: entry.planned_end for p, entry in ledger.items()} == planned_ends
        assert purge(before) == []
