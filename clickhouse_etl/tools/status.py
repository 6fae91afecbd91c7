"""`clickhouse-etl status`: per pipeline, its sensor, its last runs and the lag of every partition."""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import UTC, datetime

import dagster as dg
from dagster._core.scheduler.instigation import InstigatorType

from clickhouse_etl.core.offsets import PartitionOffsets, format_offsets
from clickhouse_etl.core.pipeline.model import Pipeline
from clickhouse_etl.orchestration import tags


@dataclass
class SensorStatus:
    state: str  # RUNNING / STOPPED, or how the code declares it when it has no stored state yet
    last_tick: float | None = None
    last_tick_status: str | None = None
    last_tick_runs: int = 0
    cursor: str | None = None


@dataclass
class RunSummary:
    run_id: str
    status: str
    label: str
    loaded: str
    finished: float | None


def sensor_status(instance: dg.DagsterInstance, name: str) -> SensorStatus:
    states = [s for s in instance.all_instigator_state(instigator_type=InstigatorType.SENSOR) if s.name == name]
    if not states:
        return SensorStatus(state="RUNNING by default; no tick yet (is the daemon running?)")
    state = states[0]
    # DECLARED_IN_CODE: nobody toggled it in the UI, so the code's default (RUNNING) applies.
    declared = state.status.value == "DECLARED_IN_CODE"
    status = SensorStatus(state="RUNNING (its default in code)" if declared else state.status.value)
    ticks = instance.get_ticks(state.instigator_origin_id, state.selector_id, limit=1)
    if ticks:
        tick = ticks[0]
        status.last_tick, status.last_tick_status = tick.timestamp, tick.status.value
        status.last_tick_runs, status.cursor = len(tick.run_ids), tick.cursor
    return status


def last_runs(instance: dg.DagsterInstance, job_name: str, limit: int = 10) -> list[RunSummary]:
    records = instance.get_run_records(dg.RunsFilter(job_name=job_name), limit=limit)
    summaries = []
    for record in records:
        run_tags = record.dagster_run.tags
        where = f"{run_tags.get(tags.TOPIC)}/{run_tags.get(tags.PARTITION)}"
        label = f"{where} [{run_tags.get(tags.START)}, {run_tags.get(tags.END)})"
        summaries.append(
            RunSummary(
                run_id=record.dagster_run.run_id,
                status=record.dagster_run.status.value,
                label=label,
                loaded=run_tags.get(f"{tags.COUNT_PREFIX}loaded", "-"),
                finished=record.end_time,
            )
        )
    return summaries


def _when(timestamp: float | None, now: float) -> str:
    if timestamp is None:
        return "-"
    moment = datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    return f"{moment} ({now - timestamp:,.0f} s ago)"


def format_status(
    pipeline: Pipeline,
    sensor: SensorStatus,
    runs: list[RunSummary],
    offsets: list[PartitionOffsets],
    now: float | None = None,
) -> str:
    now = time.time() if now is None else now
    lines = [f"pipeline {pipeline.name}", f"sensor {pipeline.sensor_name}: {sensor.state}"]
    if sensor.last_tick is not None:
        lines.append(
            f"  last tick {_when(sensor.last_tick, now)}: {sensor.last_tick_status}, {sensor.last_tick_runs} run(s)"
        )
        lines.append(f"  cursor {sensor.cursor}")
    job = pipeline.job_name
    lines.append(f"last runs of {job}:" if runs else f"no runs of {job} yet")
    for run in runs:
        lines.append(
            f"  {run.status:<9} {run.label:<40} loaded {run.loaded:>9}  finished {_when(run.finished, now)}  "
            f"run {run.run_id[:8]}"
        )
    total_lag = sum(p.lag for p in offsets)
    lines.append(f"lag: {total_lag:,} offsets in total")
    lines.append(format_offsets(pipeline.topic, offsets))
    return "\n".join(lines)
