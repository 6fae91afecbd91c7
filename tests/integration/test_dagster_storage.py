"""The production instance's storage (deploy/dagster.production.yaml) against the stack's real PostgreSQL: a
run's events are recorded in full through the event log that keeps its connections, and the connections it
keeps stay few however many events it wrote."""

from __future__ import annotations

import uuid
from pathlib import Path
from urllib.parse import urlsplit

import dagster as dg
import psycopg
import pytest
import yaml

from clickhouse_etl.core.pipeline.model import Pipeline
from clickhouse_etl.core.settings import Settings
from clickhouse_etl.orchestration import storage
from clickhouse_etl.orchestration.storage import KeptConnectionPostgresEventLogStorage

from .helpers import produce, run_catch_up
from .test_ingest import assert_matches_reference

pytestmark = pytest.mark.integration

PRODUCTION_YAML = Path(__file__).parents[2] / "deploy" / "dagster.production.yaml"
STORAGES = ("run_storage", "event_log_storage", "schedule_storage")


def connections_to(settings: Settings, database: str) -> int:
    with psycopg.connect(settings.postgres_dsn, autocommit=True) as connection:
        return connection.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = %s", (database,)).fetchone()[0]


@pytest.fixture
def production_storage_home(settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, str]:
    database = f"dagster_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(settings.postgres_dsn, autocommit=True) as connection:
        connection.execute(f'CREATE DATABASE "{database}"')
    server = urlsplit(settings.postgres_dsn)
    monkeypatch.setenv(
        "DAGSTER_PG_URL", f"postgresql+psycopg2://{server.username}@{server.netloc.split('@')[-1]}/{database}"
    )
    production = yaml.safe_load(PRODUCTION_YAML.read_text())
    (tmp_path / "dagster.yaml").write_text(yaml.safe_dump({name: production[name] for name in STORAGES}))
    return tmp_path, database


def test_runs_are_recorded_in_full_through_few_kept_connections(
    settings: Settings, pipeline: Pipeline, production_storage_home: tuple[Path, str]
) -> None:
    home, database = production_storage_home
    produce(settings, pipeline, 6_000, seed=61)
    with dg.DagsterInstance.from_config(str(home)) as instance:
        assert isinstance(instance.event_log_storage, KeptConnectionPostgresEventLogStorage)
        report = run_catch_up(settings, pipeline, instance)

        runs = instance.get_runs(filters=dg.RunsFilter(job_name=pipeline.job_name))
        assert len(runs) >= 3 and {run.status for run in runs} == {dg.DagsterRunStatus.SUCCESS}
        events = [instance.all_logs(run.run_id) for run in runs]
        assert all(len(logs) > 50 for logs in events)  # every step's events, each written through the pool
        assert all(logs[-1].dagster_event.event_type == dg.DagsterEventType.RUN_SUCCESS for logs in events)
        assert report.events == 6_000
        # The runs wrote hundreds of events; the event log holds at most its pool open.
        assert 1 <= connections_to(settings, database) <= 1 + storage.EXTRA_CONNECTIONS
    assert connections_to(settings, database) == 0  # disposed with the instance
    assert_matches_reference(settings, pipeline)
