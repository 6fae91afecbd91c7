"""What the browser tests share: the ingested data to compare with, the running UI, and the screenshots."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from playwright.sync_api import Page

from clickhouse_etl.core.settings import Settings

SCREENSHOTS_ENV = "TEST_SCREENSHOTS_DIR"
# Under the project folder (ignored by git), so a run's screenshots are easy to find; the variable moves them.
DEFAULT_SCREENSHOTS = Path(__file__).resolve().parents[2] / "test-artifacts" / "screenshots"
saved_screenshots: list[Path] = []


@dataclass(frozen=True)
class IngestedData:
    """What the runs recorded in the Dagster instance, read back from it to compare with what the UI shows."""

    settings: Settings
    dagster_home: Path
    latest_run_id: str
    latest_run_tags: dict[str, str]
    latest_enriched_metadata: dict[str, int]


@dataclass(frozen=True)
class DagsterUI:
    base_url: str
    location_name: str


def screenshots_folder() -> Path:
    folder = Path(os.environ.get(SCREENSHOTS_ENV) or DEFAULT_SCREENSHOTS)
    folder.mkdir(parents=True, exist_ok=True)
    # Only this session's screenshots (named NN-...), so a failed run never leaves an older pass's pictures.
    for old in folder.glob("[0-9][0-9]-*.png"):
        old.unlink()
    return folder


def save_screenshot(page: Page, folder: Path, name: str) -> Path:
    path = folder / f"{name}.png"
    page.screenshot(path=str(path))
    saved_screenshots.append(path)
    print(f"screenshot: {path}")
    return path
