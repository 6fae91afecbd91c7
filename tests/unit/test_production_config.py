"""The production deployment's configuration, checked without contacting any service.

Instance files (deploy/dagster.production.yaml, the local dagster.yaml, the instance inlined in
docker-compose.yml) go through Dagster's own check, the one dagster-webserver and dagster-daemon run when
they load an instance: `dagster._core.instance.config.dagster_instance_config` validates the whole file
against Dagster's instance schema (including the `storage: postgres` block, whose schema is Dagster core's
`pg_config`, and the rule that run limits are not set twice). Then `InstanceRef.from_dir` turns the file
into the configurable classes the instance would load (storage, run coordinator, run launcher, compute
logs, scheduler, ...), and each class's config is processed against that class's own schema with the
`env:` references resolved.

Only class loading is left out for the classes of packages that the deployment image installs but the
development environment does not (dagster_postgres, dagster_k8s: their releases pin an exact Dagster core
release). For them the test asserts which classes those are, and that the K8sRunLauncher block carries the
keys that launcher cannot start without. Where those packages are installed, their classes are checked
like every other class: nothing is skipped.

The definitions are built from a production-like environment (TLS/SASL connection strings with passwords)
and must resolve every job, sensor and schedule while no password reaches what the UI is sent. The guide's
replicated DDL must match the project's tables, and its run-purge code is run against a test instance.
"""

from __future__ import annotations

import importlib.util
import json
import re
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

from clickhouse_etl.core.pipeline.ddl import all_statements
from clickhouse_etl.core.pipeline.loading import load_pipelines
from clickhouse_etl.core.ranges import OffsetRange
from clickhouse_etl.core.settings import load_settings
from clickhouse_etl.orchestration.definitions import configured_definitions
from clickhouse_etl.orchestration.jobs import range_run_config
from clickhouse_etl.orchestration.run_records import read_ledger
from clickhouse_etl.orchestration.tags import PARTITION_SLOT, range_tags

ROOT = Path(__file__).parents[2]
PRODUCTION_YAML = ROOT / "deploy" / "dagster.production.yaml"
LOCAL_YAML = ROOT / "dagster.yaml"
COMPOSE_FILE = ROOT / "docker-compose.yml"
GUIDE = ROOT / "docs" / "production.md"

# Installed in the deployment image only; everything but importing their classes is still checked.
DEPLOYMENT_ONLY_PACKAGES = {"dagster_postgres", "dagster_k8s"}

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
# Values the env: references of the instance files resolve to.
INSTANCE_ENVIRONMENT = {
    "DAGSTER_PG_URL": "postgresql://dagster:pw@pg.example.com:5432/dagster?sslmode=verify-full",
    "DAGSTER_K8S_JOB_NAMESPACE": "clickhouse-etl",
    "DAGSTER_RUN_IMAGE": "registry.example.com/clickhouse-etl:1.0.0",
}


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
    for name, value in INSTANCE_ENVIRONMENT.items():
        monkeypatch.setenv(name, value)


def partition_limit(config: dict[str, Any]) -> list[dict[str, Any]]:
    limits = config["concurrency"]["runs"]["tag_concurrency_limits"]
    return [limit for limit in limits if limit["key"] == PARTITION_SLOT]


def test_production_instance_passes_dagsters_config_check(instance_environment: None, tmp_path: Path) -> None:
    config, not_importable = check_instance_file(PRODUCTION_YAML.parent, PRODUCTION_YAML.name, tmp_path)

    assert "postgres" in config["storage"]
    assert config["run_launcher"]["class"] == "K8sRunLauncher"
    # Only the deployment-only packages may be missing here, and only their classes go unloaded.
    assert {module.split(".")[0] for module, _ in not_importable} <= DEPLOYMENT_ONLY_PACKAGES
    if ("dagster_k8s", "K8sRunLauncher") in not_importable:
        launcher = config["run_launcher"]["config"]
        assert {"instance_config_map", "service_account_name", "job_image", "env_secrets"} <= set(launcher)


def test_local_instance_passes_dagsters_config_check(tmp_path: Path) -> None:
    config, not_importable = check_instance_file(LOCAL_YAML.parent, LOCAL_YAML.name, tmp_path)

    assert not_importable == set()  # SQLite storage and the default launcher: all of Dagster core
    assert partition_limit(config)


def test_compose_instance_passes_dagsters_config_check(instance_environment: None, tmp_path: Path) -> None:
    compose = yaml.safe_load(COMPOSE_FILE.read_text())
    config_dir = tmp_path / "compose"
    config_dir.mkdir()
    (config_dir / "dagster.yaml").write_text(compose["configs"]["dagster-instance"]["content"])

    config, not_importable = check_instance_file(config_dir, "dagster.yaml", tmp_path / "home")

    assert "postgres" in config["storage"]
    assert {module.split(".")[0] for module, _ in not_importable} <= DEPLOYMENT_ONLY_PACKAGES
    services = compose["services"]
    assert {"kafka", "redis", "postgres", "clickhouse", "dagster-webserver", "dagster-daemon"} <= set(services)
    mounted = {c["target"] for c in services["dagster-daemon"]["configs"]}
    assert mounted == {services["dagster-daemon"]["environment"]["DAGSTER_HOME"] + "/dagster.yaml"}


def test_every_instance_keeps_one_run_per_partition(instance_environment: None, tmp_path: Path) -> None:
    local, _ = dagster_instance_config(str(LOCAL_YAML.parent), config_filename=LOCAL_YAML.name)
    production, _ = dagster_instance_config(str(PRODUCTION_YAML.parent), config_filename=PRODUCTION_YAML.name)
    compose_dir = tmp_path / "compose"
    compose_dir.mkdir()
    compose = yaml.safe_load(COMPOSE_FILE.read_text())
    (compose_dir / "dagster.yaml").write_text(compose["configs"]["dagster-instance"]["content"])
    composed, _ = dagster_instance_config(str(compose_dir))

    expected = [{"key": PARTITION_SLOT, "value": {"applyLimitPerUniqueValue": True}, "limit": 1}]
    for config in (local, production, composed):
        assert partition_limit(dict(config)) == expected
        assert config["run_retries"]["enabled"] and config["run_monitoring"]["enabled"]
    # Frames live in the run's memory: a dead run pod must fail (then retry all steps), never resume.
    assert production["run_monitoring"]["max_resume_run_attempts"] == 0


def test_production_instance_references_documented_variables_only() -> None:
    raw = yaml.safe_load(PRODUCTION_YAML.read_text())
    guide = GUIDE.read_text()

    references = env_references(raw)
    assert references == set(INSTANCE_ENVIRONMENT)
    assert [name for name in sorted(references) if f"`{name}`" not in guide] == []
    # No credential in the file itself: the storage URL is a reference, not a value.
    assert raw["storage"]["postgres"]["postgres_url"] == {"env": "DAGSTER_PG_URL"}


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
