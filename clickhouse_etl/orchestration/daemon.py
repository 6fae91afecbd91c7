"""The Dagster daemon of clickhouse-etl: Dagster's own, with its sensor loop as tight as the sensors allow.

Dagster's sensor daemon evaluates sensors at most every 5 seconds (`MIN_INTERVAL_LOOP_TIME` of
dagster._daemon.sensor), whatever a sensor's minimum interval; for a micro-batch pipeline that floor is the
largest part of produce → queryable latency. The daemon started here lets the loop come round as often as
`sensor_interval_seconds`; each sensor's own minimum interval still spaces its ticks. A unit test fails if a
Dagster release renames the constant, rather than the floor silently coming back.
"""

from __future__ import annotations

import dagster._daemon.sensor as sensor_daemon
from dagster._daemon.cli import cli


def run_daemon(workspace: str, sensor_loop_seconds: float, log_level: str = "info") -> None:
    """`dagster-daemon run` over the workspace, in this process, with the sensor loop's floor lowered."""
    sensor_daemon.MIN_INTERVAL_LOOP_TIME = sensor_loop_seconds  # type: ignore[assignment]
    cli.main(args=["run", "-w", workspace, "--log-level", log_level], prog_name="dagster-daemon", obj={})
