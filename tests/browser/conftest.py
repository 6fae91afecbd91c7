"""A running `clickhouse-etl dev` over real ingested data, and a headless Chromium driven by Playwright.

The stack comes from the integration tests' `fresh_stack` on the same ports, in a folder of its own: when
the integration stack is already up its services are reused, otherwise they are started and stopped again
when this module's tests end, before the integration tests bring up theirs.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import dagster as dg
import pytest
from dagster_celery.tags import DAGSTER_CELERY_TASK_ID_TAG as CELERY_TASK_ID
from integration.conftest import AD_CLICKS, API_USAGE, TEST_PORT_OFFSET, TEST_PORTS, configure, fresh_stack, new_topic
from integration.helpers import CLI, cli_env, free_port, produce
from playwright.sync_api import Page, expect, sync_playwright

from clickhouse_etl.core.pipeline.model import Pipeline
from clickhouse_etl.core.settings import Settings
from clickhouse_etl.dev import stack
from clickhouse_etl.dev.datasets import DATASETS
from clickhouse_etl.orchestration import run_records, tags
from clickhouse_etl.tools.catchup import kafka_reader
from clickhouse_etl.tools.processes import stop_process_group

from .ui import DagsterUI, IngestedData, saved_screenshots, screenshots_folder

# Debian's Chromium (scripts/install.sh installs it): Playwright's own browser download is not used.
CHROMIUM = Path("/usr/bin/chromium")
# Without the background-networking switches Chromium keeps retrying its update and sync services,
# which stalls it on machines whose network is closed.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
# Generous: on a small machine the webserver shares its cores with Kafka, the daemon and the code server.
UI_TIMEOUT_MS = 60_000
DAGSTER_START_TIMEOUT_SECONDS = 180.0

# Enough events and small enough ranges for a dozen runs: the asset plots need several points.
EVENTS = 1_800
RECORDS_PER_RUN = 150
# The sensors plan the produced events, and the run workers execute some twenty runs.
INGEST_TIMEOUT_SECONDS = 240.0


@pytest.fixture(scope="module")
def browser_stack() -> Iterator[Settings]:
    # Module scope: the stack is gone before the integration tests, which start one on the same ports.
    suffix = f"-{TEST_PORT_OFFSET}" if TEST_PORT_OFFSET else ""
    data_dir = Path(tempfile.gettempdir()) / f"clickhouse-etl-browser-tests-{os.getuid()}{suffix}"
    settings = fresh_stack(data_dir, TEST_PORTS)
    for dataset in DATASETS.values():
        dataset.seed_lookup_table(settings, dataset.lookup_rows)
    yield settings
    stack.stack_down(settings, echo=print)


@dataclass(frozen=True)
class Deployment:
    """Both packaged pipelines on topics of their own, and the Dagster home `clickhouse-etl dev` uses."""

    settings: Settings
    dagster_home: Path
    clicks: Pipeline
    usage: Pipeline


@pytest.fixture(scope="module")
def deployment(browser_stack: Settings) -> Deployment:
    clicks = AD_CLICKS.with_topic(new_topic(browser_stack, "browser_clicks"))
    usage = API_USAGE.with_topic(new_topic(browser_stack, "browser_usage"))
    small = browser_stack.model_copy(update={"max_records_per_run": RECORDS_PER_RUN})
    settings = configure(small, [clicks, usage], browser_stack.data_dir / f"pipelines-{uuid.uuid4().hex[:6]}")
    # The data folder's own home: the command line keeps the project's dagster.yaml in it.
    return Deployment(settings, settings.data_dir / "dagster", clicks, usage)


def _caught_up(instance: dg.DagsterInstance, deployment: Deployment, highs: dict[str, dict[int, int]]) -> bool:
    for pipeline in (deployment.clicks, deployment.usage):
        ledger = run_records.read_ledger(instance, pipeline.job_name, pipeline.topic)
        if any(p not in ledger or ledger[p].committed_end != high for p, high in highs[pipeline.topic].items()):
            return False
    return True


@pytest.fixture(scope="module")
def ingested(deployment: Deployment, dagster_ui: DagsterUI) -> IngestedData:
    """Real events of both pipelines, run by the sensors of `clickhouse-etl dev` on its run workers."""
    settings, clicks = deployment.settings, deployment.clicks
    produce(settings, clicks, EVENTS)
    produce(settings, deployment.usage, EVENTS // 3)
    reader = kafka_reader(settings)
    highs = {
        pipeline.topic: {p: high for p, (_, high) in reader.watermarks(pipeline.topic).items()}
        for pipeline in (clicks, deployment.usage)
    }
    enriched_key = dg.AssetKey(["clickhouse", clicks.sink.table])
    with dg.DagsterInstance.from_config(str(deployment.dagster_home)) as instance:
        deadline = time.monotonic() + INGEST_TIMEOUT_SECONDS
        while not _caught_up(instance, deployment, highs):
            assert time.monotonic() < deadline, "the sensors' runs did not load every produced event in time"
            time.sleep(1)
        # Newest first. A run retried would be recorded too, as failed: ask for successes.
        runs = instance.get_runs(
            filters=dg.RunsFilter(
                job_name=clicks.job_name, tags={tags.TOPIC: clicks.topic}, statuses=[dg.DagsterRunStatus.SUCCESS]
            )
        )
        assert runs, "the sensor recorded no successful run"
        # Every run went to a run worker (dagster-celery's task id), none was executed in another process.
        assert all(CELERY_TASK_ID in run.tags for run in runs)
        materializations = instance.fetch_materializations(dg.AssetRecordsFilter(asset_key=enriched_key), limit=100)
    assert len(materializations.records) >= 6, "too few materializations for a plot with several points"
    latest = materializations.records[0].asset_materialization
    assert latest is not None
    return IngestedData(
        settings=settings,
        dagster_home=deployment.dagster_home,
        latest_run_id=runs[0].run_id,
        latest_run_tags=dict(runs[0].tags),
        latest_enriched_metadata={
            key: int(value.value)  # type: ignore[arg-type]
            for key, value in latest.metadata.items()
            if isinstance(value, dg.IntMetadataValue)
        },
    )


@pytest.fixture(scope="session")
def screenshots_dir() -> Path:
    return screenshots_folder()


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    # `pytest -q` hides what tests print: say once where the screenshots are.
    if saved_screenshots:
        terminalreporter.write_line(f"Dagster UI screenshots ({len(saved_screenshots)}): {saved_screenshots[0].parent}")


def _graphql(base_url: str, query: str) -> dict:
    request = urllib.request.Request(
        f"{base_url}/graphql",
        data=json.dumps({"query": query}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.load(response)["data"]


LOCATIONS_QUERY = """
{ workspaceOrError { __typename ... on Workspace { locationEntries {
    name loadStatus locationOrLoadError { __typename ... on PythonError { message } } } } } }
"""


def _wait_for_code_location(base_url: str, process: subprocess.Popen, log_path: Path) -> str:
    """The name of the loaded code location, once the webserver answers and has loaded the definitions."""
    deadline = time.monotonic() + DAGSTER_START_TIMEOUT_SECONDS
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"clickhouse-etl dev exited with {process.returncode}:\n{log_path.read_text()[-3000:]}")
        try:
            workspace = _graphql(base_url, LOCATIONS_QUERY)["workspaceOrError"]
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            workspace = None
        entries = (workspace or {}).get("locationEntries") or []
        if entries and all(entry["loadStatus"] == "LOADED" for entry in entries):
            (entry,) = entries
            loaded = entry["locationOrLoadError"]
            if loaded["__typename"] != "RepositoryLocation":
                pytest.fail(f"code location {entry['name']} failed to load: {loaded.get('message')}")
            return entry["name"]
        time.sleep(0.5)
    pytest.fail(f"Dagster UI did not load its code location in time:\n{log_path.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def dagster_ui(deployment: Deployment, screenshots_dir: Path) -> Iterator[DagsterUI]:
    """`clickhouse-etl dev` on a free port: webserver, daemon with both pipelines' sensors, and run workers."""
    port = free_port()
    log_path = screenshots_dir / "dagster-dev.log"
    with log_path.open("w") as log:
        process = subprocess.Popen(
            [*CLI, "dev", "--host", "127.0.0.1", "--port", str(port)],
            env=cli_env(deployment.settings, str(deployment.dagster_home)),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group, so teardown reaches every process it starts
        )
    try:
        base_url = f"http://127.0.0.1:{port}"
        location = _wait_for_code_location(base_url, process, log_path)
        yield DagsterUI(base_url, location)
    finally:
        stop_process_group(process)


@pytest.fixture
def ui_page(dagster_ui: DagsterUI, tmp_path: Path) -> Iterator[Page]:
    """A page of a fresh headless Chromium."""
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: scripts/install.sh installs Debian's chromium")
    expect.set_options(timeout=UI_TIMEOUT_MS)
    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"),
            executable_path=str(CHROMIUM),
            args=CHROMIUM_ARGS,
            headless=True,
            viewport={"width": 1600, "height": 1100},
        )
        try:
            page = context.new_page()
            page.set_default_timeout(UI_TIMEOUT_MS)
            page.goto(dagster_ui.base_url)  # the project's dagster.yaml turns the first-visit modal off
            yield page
        finally:
            context.close()
