"""`clickhouse-etl pipelines` and the Dagster code location with pipeline files, good and bad (no service needed)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from clickhouse_etl.orchestration.instance import workspace_file

BAD = textwrap.dedent(
    """
    name: api_usage
    source:
      topic: usage
      fields:
        event_id: string
        customer_id: string
    dedup: {key: event_id}
    enrich:
      - name: customers
        table: customers
        join_key: cust_id
        columns: {plan: string}
    sink:
      table: usage_events
    """
)
MESSAGE = (
    'pipelines/usage.yaml: api_usage.enrich[0].join_key: column "cust_id" not in source fields '
    '(did you mean "customer_id"?)'
)


def run(*command: str, cwd: Path, **environment: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in __import__("os").environ.items() if not k.startswith("CLICKHOUSE_ETL_")}
    return subprocess.run(command, cwd=cwd, env={**clean, **environment}, capture_output=True, text=True, timeout=300)


@pytest.fixture
def bad_file(tmp_path: Path) -> Path:
    path = tmp_path / "pipelines" / "usage.yaml"
    path.parent.mkdir()
    path.write_text(BAD)
    return path


def test_validate_names_file_pipeline_and_field_and_exits_2(tmp_path: Path, bad_file: Path) -> None:
    result = run(
        sys.executable, "-m", "clickhouse_etl.cli", "pipelines", "validate", "pipelines/usage.yaml", cwd=tmp_path
    )
    assert result.returncode == 2
    assert result.stderr.strip() == MESSAGE
    assert result.stdout == ""


def test_every_command_refuses_a_bad_configured_file_the_same_way(tmp_path: Path, bad_file: Path) -> None:
    result = run(
        sys.executable,
        "-m",
        "clickhouse_etl.cli",
        "offsets",
        cwd=tmp_path,
        CLICKHOUSE_ETL_PIPELINES="pipelines/usage.yaml",
    )
    assert result.returncode == 2
    assert result.stderr.strip() == f"clickhouse-etl offsets: {MESSAGE}"


def test_the_packaged_pipelines_validate_and_list(tmp_path: Path) -> None:
    valid = run(
        sys.executable, "-m", "clickhouse_etl.cli", "pipelines", "validate", "ad_clicks,api_usage", cwd=tmp_path
    )
    assert valid.returncode == 0, valid.stderr
    assert valid.stdout.splitlines() == [
        "ad_clicks.yaml (packaged): ad_clicks: valid",
        "api_usage.yaml (packaged): api_usage: valid",
    ]
    listed = run(
        sys.executable,
        "-m",
        "clickhouse_etl.cli",
        "pipelines",
        "list",
        cwd=tmp_path,
        CLICKHOUSE_ETL_PIPELINES="ad_clicks,api_usage",
    )
    assert listed.returncode == 0, listed.stderr
    rows = [line.split() for line in listed.stdout.splitlines()]
    assert rows[0] == ["pipeline", "topic", "job", "sensor", "table", "file"]
    assert rows[1][:5] == ["ad_clicks", "ad_clicks", "ingest_clicks", "kafka_offsets_sensor", "ad_clicks_enriched"]
    assert rows[2][:5] == ["api_usage", "api_usage", "ingest_api_usage", "api_usage_sensor", "api_usage_events"]


def test_the_ddl_command_prints_every_table_and_view(tmp_path: Path) -> None:
    printed = run(sys.executable, "-m", "clickhouse_etl.cli", "pipelines", "ddl", "api_usage", cwd=tmp_path)
    assert printed.returncode == 0, printed.stderr
    statements = [s for s in printed.stdout.split(";\n") if s.strip()]
    assert len(statements) == 1 + 4 + 3  # database; loads, dead letters, table, partials; three views
    assert (
        "PARTITION BY toYYYYMM(event_time)" in printed.stdout and "TTL event_time + INTERVAL 400 DAY" in printed.stdout
    )


def test_the_code_location_fails_to_load_with_the_same_message(tmp_path: Path, bad_file: Path) -> None:
    dagster = Path(sys.executable).with_name("dagster")
    result = run(
        str(dagster),
        "definitions",
        "validate",
        "-w",
        workspace_file(),
        cwd=tmp_path,
        CLICKHOUSE_ETL_PIPELINES="pipelines/usage.yaml",
        DAGSTER_HOME=str(tmp_path),
    )
    output = result.stdout + result.stderr
    assert "Validation failed for code location clickhouse_etl" in output
    assert f"PipelineError: {MESSAGE}" in output
    assert "ValidationError" not in output  # one message of the project's, not pydantic's report
