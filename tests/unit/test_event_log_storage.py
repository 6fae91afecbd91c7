"""The local event log storage is Dagster's run-sharded SQLite storage keeping its connections: it stores
and reads what Dagster's does, keeps a bounded number of shards open, and lets go of them when disposed."""

from __future__ import annotations

from pathlib import Path

import dagster as dg
import pytest
from dagster._core.storage.dagster_run import DagsterRun
from dagster._core.utils import make_new_run_id

from clickhouse_etl.core.settings import load_settings
from clickhouse_etl.orchestration import storage
from clickhouse_etl.orchestration.instance import install_dagster_yaml, project_dagster_yaml
from clickhouse_etl.orchestration.storage import KeptConnectionSqliteEventLogStorage


@pytest.fixture
def instance(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dg.DagsterInstance:
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path))
    monkeypatch.setenv("CLICKHOUSE_ETL_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("CLICKHOUSE_ETL_RUN_LAUNCHER", "default")  # no broker needed to open the instance
    (tmp_path / "dagster.yaml").write_text(project_dagster_yaml(load_settings()))
    with dg.DagsterInstance.from_config(str(tmp_path)) as opened:
        yield opened


def test_the_project_instance_uses_it_and_events_round_trip(instance: dg.DagsterInstance, tmp_path: Path) -> None:
    event_log = instance.event_log_storage
    assert isinstance(event_log, KeptConnectionSqliteEventLogStorage)
    runs = [instance.add_run(DagsterRun(job_name="j", run_id=make_new_run_id())) for _ in range(3)]
    for run in runs:
        for n in range(5):
            instance.report_engine_event(f"event {n} of {run.run_id}", run)

    for run in runs:
        messages = [record.dagster_event.message for record in instance.all_logs(run.run_id)]
        assert messages == [f"event {n} of {run.run_id}" for n in range(5)]
    # One database file per run, as Dagster's own storage keeps them (its tools and upgrades expect that).
    assert {path.stem for path in (tmp_path / "history" / "runs").glob("*.db")} >= {run.run_id for run in runs}
    connection = event_log._engines[runs[-1].run_id].raw_connection()
    try:
        assert connection.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        connection.close()


def test_open_shards_are_bounded_and_released(instance: dg.DagsterInstance, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(storage, "KEPT_SHARDS", 3)
    event_log = instance.event_log_storage
    runs = [instance.add_run(DagsterRun(job_name="j", run_id=make_new_run_id())) for _ in range(6)]
    for run in runs:
        instance.report_engine_event("started", run)

    assert len(event_log._engines) == 3
    assert list(event_log._engines)[-1] == runs[-1].run_id  # the shard used last is kept
    assert len(instance.all_logs(runs[0].run_id)) == 1  # an evicted shard opens again when read

    event_log.dispose()
    assert event_log._engines == {}


def test_an_installed_instance_opens_from_its_folder_alone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DAGSTER_HOME", raising=False)
    monkeypatch.setenv("CLICKHOUSE_ETL_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("CLICKHOUSE_ETL_RUN_LAUNCHER", "default")
    home = install_dagster_yaml(load_settings())

    with dg.DagsterInstance.from_config(home) as opened:
        run = opened.add_run(DagsterRun(job_name="j", run_id=make_new_run_id()))
        opened.report_engine_event("recorded", run)
    assert (Path(home) / "history" / "runs" / f"{run.run_id}.db").exists()


def test_new_run_databases_are_copies_of_one_initialized_template(instance: dg.DagsterInstance, tmp_path: Path) -> None:
    runs = [instance.add_run(DagsterRun(job_name="j", run_id=make_new_run_id())) for _ in range(3)]
    for run in runs:
        instance.report_engine_event("started", run)

    runs_folder = tmp_path / "history" / "runs"
    assert (runs_folder / storage.TEMPLATE_NAME).exists()
    # Dagster's own listing of run databases (used by its upgrade and wipe) sees the runs, not the template.
    assert set(instance.event_log_storage.get_all_run_ids()) >= {run.run_id for run in runs}
    assert storage.TEMPLATE_NAME.removesuffix(".db") not in instance.event_log_storage.get_all_run_ids()
    # A copy is a complete database: Dagster's migration check finds it at the head revision.
    instance.upgrade()
    assert [r.dagster_event.message for r in instance.all_logs(runs[0].run_id)] == ["started"]
