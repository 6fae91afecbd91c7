"""The freshness and soak report: memory judged peak against peak, and the last minute's latencies."""

from __future__ import annotations

import numpy as np

from clickhouse_etl.core.settings import Settings
from clickhouse_etl.dev.live import MIB, LiveReport, MemorySamples, RunTimings


def _report(memory: MemorySamples, latencies: list[float], produced_at: list[float]) -> LiveReport:
    return LiveReport(
        topic="live_test",
        partitions=3,
        rate=1000.0,
        seconds=600.0,
        warmup_seconds=20.0,
        produced=len(latencies),
        expected=(10, 1),
        loaded=(10, 1),
        runs=RunTimings(),
        latencies=np.asarray(latencies, dtype=np.float64),
        produced_at=np.asarray(produced_at, dtype=np.float64),
        memory=memory,
        memory_after=20.0,
        settings=Settings(),
    )


def _samples(worker_mib: list[int]) -> MemorySamples:
    memory = MemorySamples()
    for second, rss in enumerate(worker_mib):
        memory.record(float(second), {"run worker": rss * MIB, "daemon": 180 * MIB})
    return memory


def test_a_worker_whose_runs_come_and_go_is_flat_and_one_that_keeps_growing_is_not() -> None:
    # Between runs the worker holds 600 MiB, during one 1,100 MiB: the same peaks early and late.
    steady = [600 if second % 10 < 5 else 1_100 for second in range(300)]
    report = _report(_samples(steady), [1.0], [100.0])
    assert report.memory_growth()["run worker"] == (1_100 * MIB, 1_100 * MIB)
    assert report.memory_flat()

    growing = [600 + second * 5 for second in range(300)]
    assert not _report(_samples(growing), [1.0], [100.0]).memory_flat()


def test_the_last_minute_p95_reads_only_the_events_produced_in_the_final_minute() -> None:
    produced_at = [float(second) for second in range(2_000)]
    # Latency grows with the backlog: the final minute's events waited 10 s and more, the earlier ones 1 s.
    latencies = [1.0 if second < 1_940 else 10.0 + (second - 1_940) / 60 for second in range(2_000)]
    report = _report(MemorySamples(), latencies, produced_at)
    assert report.percentile(95) < 10.0
    assert 10.5 < report.final_minute_p95() <= 11.0
    assert report.as_json()["latency_seconds"]["final_minute_p95"] == round(report.final_minute_p95(), 2)
