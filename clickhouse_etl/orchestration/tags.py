"""The run-tag vocabulary: every tag a run of clickhouse-etl carries, and what reads it.

Tags are indexed by Dagster, so the ledger, the sensors, the checks and the tools find runs by them. The
range and the counts are what a person reads in the runs list; bookkeeping only the project reads lives
under ".dagster/etl_…": Dagster keeps tags under ".dagster/" out of the UI.
"""

from __future__ import annotations

import os
import socket

from clickhouse_etl.core.ranges import OffsetRange

HIDDEN = ".dagster/etl_"  # a tag key has one namespace: ".dagster/etl_<name>"

# The range of a run: the ledger reads committed, in-flight and failed ranges from these.
PIPELINE = "etl/pipeline"
TOPIC = "kafka/topic"
PARTITION = "kafka/partition"
START = "kafka/start"
END = "kafka/end"
# One run per pipeline and partition at a time (dagster.yaml: tag_concurrency_limits on this key).
PARTITION_SLOT = f"{HIDDEN}partition_slot"

# Why a run exists.
TRIGGER = "etl/trigger"  # catch-up | backfill (sensor runs carry Dagster's own sensor tag)
BACKFILL_ID = "etl/backfill_id"
FORCE = "etl/force"
ATTEMPT = f"{HIDDEN}attempt"
BACKFILL_PLAN = f"{HIDDEN}backfill_plan"  # on request_backfill runs: the planned ranges, for backfill_sensor

# What a run did: one tag per count (etl/read, etl/loaded, …), set by the commit step.
COUNT_PREFIX = "etl/"
COUNTS = ("read", "malformed", "duplicates", "unmatched", "dropped", "filtered", "loaded", "dead_lettered")
# Windows a run's aggregates touched: the aggregate checks verify recent runs' windows from these.
WINDOWS_PREFIX = f"{HIDDEN}windows_"

# Which process executes a run: a run left STARTED by a process that is gone is failed and re-run.
HOST = f"{HIDDEN}host"
PID = f"{HIDDEN}pid"
WORKER_RUN = f"{HIDDEN}worker_run"

# Dagster's own.
REPOSITORY = ".dagster/repository"
MAX_RETRIES = "dagster/max_retries"
RETRY_STRATEGY = "dagster/retry_strategy"
WILL_RETRY = "dagster/will_retry"
AUTO_RETRY_RUN_ID = "dagster/auto_retry_run_id"


def range_tags(pipeline: str, offset_range: OffsetRange) -> dict[str, str]:
    r = offset_range
    return {
        PIPELINE: pipeline,
        TOPIC: r.topic,
        PARTITION: str(r.partition),
        START: str(r.start),
        END: str(r.end),
        PARTITION_SLOT: f"{pipeline}:{r.tp}",
    }


def range_of(tags: dict[str, str]) -> OffsetRange | None:
    try:
        return OffsetRange(tags[TOPIC], int(tags[PARTITION]), int(tags[START]), int(tags[END]))
    except (KeyError, ValueError):
        return None


def worker_tags(run_id: str) -> dict[str, str]:
    """Which process runs `run_id`. The run id is part of it because a retried run inherits its parent's
    tags, and the parent's (dead) process must not make the retry look abandoned."""
    return {HOST: socket.gethostname(), PID: str(os.getpid()), WORKER_RUN: run_id}


def count_tags(counts: dict[str, int]) -> dict[str, str]:
    return {f"{COUNT_PREFIX}{name}": str(value) for name, value in counts.items()}


def counts_of(tags: dict[str, str]) -> dict[str, int]:
    return {name: int(tags[f"{COUNT_PREFIX}{name}"]) for name in COUNTS if f"{COUNT_PREFIX}{name}" in tags}


def backfill_tags(backfill_id: str, force: bool) -> dict[str, str]:
    return {BACKFILL_ID: backfill_id, TRIGGER: "backfill", FORCE: str(force).lower()}
