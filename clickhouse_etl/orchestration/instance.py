"""The Dagster instance and code location files every Dagster process of clickhouse-etl shares."""

from __future__ import annotations

import fcntl
import json
import os
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

from clickhouse_etl.core.settings import Settings

if TYPE_CHECKING:
    import dagster as dg

CODE_LOCATION = "clickhouse_etl"  # as named in workspace.yaml


def _packaged(name: str) -> Path:
    return Path(str(resources.files("clickhouse_etl.orchestration") / name))


def workspace_file() -> str:
    """The packaged workspace.yaml: every Dagster process sees the code location under the same name."""
    return str(_packaged("workspace.yaml"))


# The one line that sends runs to a process per run instead of to the Celery workers.
DEFAULT_LAUNCHER = "run_launcher: {module: dagster, class: DefaultRunLauncher}"


# The event log's folder as the packaged file names it, for any home the file is copied to by hand.
HOME_REFERENCE = "dagster_home: {env: DAGSTER_HOME}"


def project_dagster_yaml(settings: Settings) -> str:
    """The project's dagster.yaml for the settings' home: the event log's folder written out (the instance then
    opens from its folder alone, whatever DAGSTER_HOME says), and Dagster's default run launcher when the
    settings ask for it."""
    text = _packaged("dagster.yaml").read_text()
    text = text.replace(HOME_REFERENCE, f"dagster_home: {json.dumps(str(Path(settings.dagster_home).resolve()))}")
    if settings.run_launcher == "default":
        start = text.index("run_launcher:\n")
        end = text.index("\n\n", start)
        text = text[:start] + DEFAULT_LAUNCHER + text[end:]
    return text


def install_dagster_yaml(settings: Settings) -> str:
    """The settings' Dagster home, with the project's dagster.yaml in it.

    The default home under the data folder is the project's own, so its dagster.yaml is kept current; a
    DAGSTER_HOME chosen by the user gets one only if it has none.
    """
    home = Path(settings.dagster_home)
    home.mkdir(parents=True, exist_ok=True)
    instance_yaml = home / "dagster.yaml"
    project_yaml = project_dagster_yaml(settings)
    owned = home == settings.data_dir / "dagster"
    if not instance_yaml.exists() or (owned and instance_yaml.read_text() != project_yaml):
        instance_yaml.write_text(project_yaml)
    return str(home)


def instance_environment(settings: Settings) -> dict[str, str]:
    """What every Dagster process of the deployment needs in its environment to load the instance."""
    return {
        "DAGSTER_HOME": settings.dagster_home,
        "CLICKHOUSE_ETL_CELERY_BROKER_URL": settings.celery_broker_url,
        "CLICKHOUSE_ETL_CELERY_BACKEND_URL": settings.celery_backend_url,
        "CLICKHOUSE_ETL_CELERY_QUEUE": settings.celery_queue,
    }


def export_dagster_home(settings: Settings) -> str:
    """Make DAGSTER_HOME point where the settings say, with the project's dagster.yaml in it."""
    home = install_dagster_yaml(settings)
    os.environ.update(instance_environment(settings))
    return home


def open_instance(home: str) -> dg.DagsterInstance:
    """The instance at `home`, opened under the home's storage lock, so that its storage exists before Dagster
    processes share it.

    Processes that open a fresh SQLite storage at the same moment each run its schema migrations, and all but
    one fail (`UNIQUE constraint failed: alembic_version.version_num`, `table runs already exists`): `clickhouse-etl
    dev` starts the webserver, the daemon and the run workers together, and a catch-up starts its workers with
    itself. The lock makes processes opening one home at once take turns.
    """
    import dagster as dg

    with open(Path(home) / ".storage.lock", "a") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        return dg.DagsterInstance.from_config(home)


def create_instance_storage(home: str) -> None:
    """Open the instance at `home` once (open_instance), so that its storage exists before processes share it."""
    open_instance(home).dispose()
