"""Dagster processes started together on a fresh instance (what `clickhouse-etl dev` does) all come up: the
storage is created once, not migrated by each of them at the same moment."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import dagster as dg
import pytest

from clickhouse_etl.core.settings import Settings
from clickhouse_etl.orchestration.instance import install_dagster_yaml

pytestmark = pytest.mark.integration

PROCESSES = 4
# Each process waits for the same moment, then does what a starting Dagster process of the deployment does.
OPEN_AT = """
import sys, time
import dagster as dg
from clickhouse_etl.orchestration.instance import create_instance_storage
home, moment = sys.argv[1], float(sys.argv[2])
time.sleep(max(0.0, moment - time.time()))
create_instance_storage(home)
with dg.DagsterInstance.from_config(home) as instance:
    instance.get_runs(limit=1)
"""


def test_processes_opening_a_fresh_instance_at_once_all_start(settings: Settings, tmp_path: Path) -> None:
    home = install_dagster_yaml(settings.model_copy(update={"dagster_home": str(tmp_path / "dagster")}))
    moment = time.time() + 8  # after every interpreter has imported Dagster
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", OPEN_AT, home, str(moment)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(PROCESSES)
    ]
    failures = []
    for process in processes:
        _, stderr = process.communicate(timeout=120)
        if process.returncode != 0:
            failures.append(stderr[-2000:])
    assert not failures, failures[0]
    with dg.DagsterInstance.from_config(home) as instance:
        assert instance.get_runs() == []
