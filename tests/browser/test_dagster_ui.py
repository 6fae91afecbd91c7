"""The Dagster UI over real ingested data of two pipelines: a job and a sensor per pipeline, a successful run with
its metadata (and no bookkeeping tags in the way), the asset plots."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import quote

from playwright.sync_api import Locator, Page, expect

from .ui import DagsterUI, IngestedData, save_screenshot

INGEST_JOB_NAME = "ingest_clicks"

# Pixels of the plotted series (the UI's accent colour, blue-violet) that a line through several points
# covers at least; axes, grid and labels are grey and a lone point is far smaller.
MIN_SERIES_PIXELS = 300
SERIES_PIXELS_JS = """canvas => {
    const data = canvas.getContext('2d').getImageData(0, 0, canvas.width, canvas.height).data;
    let series = 0;
    for (let i = 0; i < data.length; i += 4) {
        const [red, green, blue, alpha] = [data[i], data[i + 1], data[i + 2], data[i + 3]];
        if (alpha > 128 && blue - red > 80 && blue - green > 80) series++;
    }
    return series;
}"""


def metadata_value(page: Page, key: str) -> Locator:
    """The value cell next to `key` in an event's metadata table."""
    return page.locator("tr").filter(has=page.get_by_text(key, exact=True)).locator("td").nth(1)


def test_job_run_succeeded_with_range_and_counts(
    ui_page: Page, dagster_ui: DagsterUI, ingested: IngestedData, screenshots_dir: Path
) -> None:
    page = ui_page
    tags = ingested.latest_run_tags

    # A job and a sensor per pipeline.
    page.goto(f"{dagster_ui.base_url}/overview/jobs")
    for job in (INGEST_JOB_NAME, "ingest_api_usage", "request_backfill"):
        expect(page.get_by_text(job, exact=True).first).to_be_visible()
    save_screenshot(page, screenshots_dir, "00-jobs-per-pipeline")
    page.goto(f"{dagster_ui.base_url}/overview/automation")
    for sensor in ("kafka_offsets_sensor", "api_usage_sensor", "backfill_sensor"):
        expect(page.get_by_text(sensor, exact=True).first).to_be_visible()
    save_screenshot(page, screenshots_dir, "00-sensors-per-pipeline")

    page.goto(f"{dagster_ui.base_url}/locations/{dagster_ui.location_name}/jobs/{INGEST_JOB_NAME}")
    for op in ("read", "dedup_events", "enrich_events", "load", "commit"):
        expect(page.get_by_text(op, exact=True).first).to_be_visible()
    save_screenshot(page, screenshots_dir, "01-job-ingest_clicks")

    # The job's runs in the runs list; the latest is first, with its status and the tags commit recorded.
    page.goto(f"{dagster_ui.base_url}/runs?{quote('q[0]')}={quote(f'job:{INGEST_JOB_NAME}')}")
    run_link = page.locator(f'a[href="/runs/{ingested.latest_run_id}"]').first
    row = page.locator("[data-index]").filter(has=run_link)
    expect(row.get_by_text("Success", exact=True)).to_be_visible()
    for key in ("etl/pipeline", "kafka/start", "kafka/end", "etl/read", "etl/loaded"):
        expect(row.get_by_text(f"{key}: {tags[key]}", exact=True)).to_be_visible()
    # Bookkeeping tags (the worker process, the attempt, the concurrency slot) stay out of the runs list.
    expect(row.get_by_text("etl_pid")).to_have_count(0)
    expect(row.get_by_text("etl_partition_slot")).to_have_count(0)
    save_screenshot(page, screenshots_dir, "02-runs-ingest_clicks")

    run_link.click()
    page.wait_for_url(f"**/runs/{ingested.latest_run_id}")
    expect(page.get_by_text("Success", exact=True)).to_be_visible()
    expect(page.get_by_text(f"Run of {INGEST_JOB_NAME}")).to_be_visible()

    # Only the commit step's events: its output carries the range and the counts of every stage.
    page.goto(f"{dagster_ui.base_url}/runs/{ingested.latest_run_id}?logs={quote('step:commit')}")
    expect(metadata_value(page, "start")).to_have_text(tags["kafka/start"])
    expect(metadata_value(page, "start")).to_be_visible()
    expect(metadata_value(page, "end").first).to_have_text(tags["kafka/end"])
    expect(metadata_value(page, "count_read")).to_have_text(tags["etl/read"])
    expect(metadata_value(page, "count_read")).to_be_visible()
    expect(metadata_value(page, "count_loaded")).to_have_text(tags["etl/loaded"])
    expect(metadata_value(page, "count_duplicates")).to_have_text(tags["etl/duplicates"])
    save_screenshot(page, screenshots_dir, "03-run-commit-metadata")


def test_enriched_asset_plots_its_materialization_metadata(
    ui_page: Page, dagster_ui: DagsterUI, ingested: IngestedData, screenshots_dir: Path
) -> None:
    page = ui_page
    page.goto(f"{dagster_ui.base_url}/assets/clickhouse/ad_clicks_enriched?view=overview")
    expect(page.get_by_text("Latest materialization")).to_be_visible()

    # The metadata table (key, timestamp, value) shows the latest materialization's values ...
    latest = ingested.latest_enriched_metadata
    for key in ("loaded", "duplicates", "end"):
        row = page.locator("tr").filter(has=page.get_by_text(key, exact=True))
        expect(row.locator("td").last).to_have_text(str(latest[key]))
    save_screenshot(page, screenshots_dir, "04-asset-ad_clicks_enriched-metadata")

    # ... and its Plots view draws each numeric key over the materializations.
    page.get_by_role("button", name="Plots").click()
    for key in ("loaded", "duplicates", "filtered", "unmatched"):
        # The innermost block holding both the plot's title and a canvas is that plot.
        plot = page.locator("div").filter(has=page.get_by_text(key, exact=True)).filter(has=page.locator("canvas"))
        canvas = plot.last.locator("canvas")
        expect(canvas).to_be_visible()
        expect(canvas).to_have_attribute("role", "img")
        # Chart.js draws after layout (and may animate): wait until the series' line is on the canvas.
        page.wait_for_function(
            f"canvas => ({SERIES_PIXELS_JS})(canvas) >= {MIN_SERIES_PIXELS}", arg=canvas.element_handle()
        )
    save_screenshot(page, screenshots_dir, "05-asset-ad_clicks_enriched-plots")
