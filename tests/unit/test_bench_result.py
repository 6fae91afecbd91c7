"""Unit tests of the bench's figures: the ratio to the raw pass-through, the JSON shape and the printed lines."""

from __future__ import annotations

import json

import pytest

from clickhouse_etl.dev.bench import BenchResult
from clickhouse_etl.dev.pass_through import PassThroughResult
from clickhouse_etl.dev.prefill import PrefillReport


def result(**figures: object) -> BenchResult:
    base: dict[str, object] = {
        "pipeline": "ad_clicks",
        "events": 1_000_000,
        "partitions": 3,
        "seconds": 10.0,
        "runs": 3,
        "stages": {"read": 2.0, "load": 1.0},
        "peak_rss_bytes": 600 * 2**20,
        "cpu_seconds": {"catch-up": 12.0, "redis": 3.0},
        "loaded": 880_000,
        "store_rows": 12_000_000,
        "store_parts": 9,
    }
    return BenchResult(**{**base, **figures})  # type: ignore[arg-type]


RAW = PassThroughResult(
    messages=1_000_000,
    rows=999_000,
    table_rows=999_000,
    inserts=16,
    seconds=8.0,
    copy_seconds=6.5,
    cpu_seconds=7.25,
    peak_rss_bytes=500 * 2**20,
)
PREFILL = PrefillReport(rows=10_000_000, dead_letters=11_112, topic="prefill_x", seconds=22.5)


def test_ratio_is_end_to_end_over_the_raw_pass_through() -> None:
    assert RAW.messages_per_second == 125_000
    assert result(pass_through=RAW).ratio_to_pass_through == pytest.approx(100_000 / 125_000)
    assert result().ratio_to_pass_through is None


def test_json_carries_the_pass_through_the_ratio_and_the_store() -> None:
    figures = json.loads(json.dumps(result(pass_through=RAW, prefill=PREFILL).as_json()))
    assert figures["events_per_second"] == 100_000
    assert figures["pass_through"] == {
        "messages": 1_000_000,
        "rows": 999_000,
        "table_rows": 999_000,
        "inserts": 16,
        "seconds": 8.0,
        "copy_seconds": 6.5,
        "messages_per_second": 125_000,
        "cpu_seconds": 7.25,
        "peak_rss_bytes": 500 * 2**20,
    }
    assert figures["ratio_to_pass_through"] == 0.8
    assert figures["prefill"] == {"rows": 10_000_000, "dead_letters": 11_112, "topic": "prefill_x", "seconds": 22.5}
    assert figures["store_before"] == {"rows": 12_000_000, "active_parts": 9}


def test_json_without_pass_through_or_prefill_says_so() -> None:
    figures = result().as_json()
    assert figures["pass_through"] is None and figures["ratio_to_pass_through"] is None
    assert figures["prefill"] is None and figures["store_before"] == {"rows": 12_000_000, "active_parts": 9}


def test_printed_ratio_stands_next_to_the_rate_on_the_last_line() -> None:
    lines = result(pass_through=RAW).describe().splitlines()
    assert lines[-1] == "end-to-end: 100000 events/s, 0.80x the raw pass-through"
    assert lines[-2].startswith("raw pass-through (no processing, one process): 125,000 messages/s")
    assert "CPU seconds 7.2" in lines[-2] and "peak RSS 500 MiB" in lines[-2]
    assert result().describe().splitlines()[-1] == "end-to-end: 100000 events/s"


def test_header_reports_the_store_and_its_prefill() -> None:
    header = result(prefill=PREFILL).describe().splitlines()[1]
    assert header.startswith("store before the catch-up: 12,000,000 rows in 9 active part(s)")
    assert "10,000,000 of them (and 11,112 dead letters) prefilled in 22.5 s" in header
    assert "prefilled" not in result().describe().splitlines()[1]
