"""The bench command's correctness (its rates are figures to read, never asserted)."""

from __future__ import annotations

import json

import pytest

from clickhouse_etl.settings import Settings

from .helpers import cli

pytestmark = pytest.mark.integration


def test_bench_checks_counts_and_reports_every_figure(settings: Settings) -> None:
    result = cli(settings, "bench", "--events", "20000", "--partitions", "2", "--baseline-events", "2000", "--json")
    assert result.returncode == 0, result.stderr[-3000:]
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    assert figures["events"] == 20_000 and figures["partitions"] == 2
    assert set(figures["stages"]) == {
        "read",
        "decode",
        "dedup",
        "enrich",
        "filter",
        "transform",
        "aggregate",
        "load",
        "commit",
    }
    assert figures["loaded"] > 15_000  # checked against the produced counts before any rate is printed
    assert figures["seconds"] > 0 and figures["events_per_second"] > 0 and figures["peak_rss_bytes"] > 0
    assert figures["baseline_events"] == 2_000 and figures["baseline_events_per_second"] > 0

    text = cli(settings, "bench", "--events", "5000", "--partitions", "1", "--baseline-events", "0")
    assert text.returncode == 0, text.stderr[-3000:]
    assert text.stdout.strip().splitlines()[-1].startswith("end-to-end: ")
