"""The ingest job: one bounded Kafka offset range through every step of the data flow, in one process."""

from __future__ import annotations

import logging

import dagster as dg

from clickhouse_etl.ops import (
    BackfillRequestConfig,
    aggregate_windows,
    commit,
    decode_events,
    dedup_events,
    enrich_events,
    filter_events,
    load,
    plan_backfill_runs,
    read,
    transform_events,
)
from clickhouse_etl.settings import current_settings

INGEST_JOB_NAME = "ingest_clicks"
BACKFILL_REQUEST_JOB_NAME = "request_backfill"


@dg.logger(
    config_schema=dg.colored_console_logger.config_schema,
    description="Run logs on stderr: colored text, or with CLICKHOUSE_ETL_LOG_FORMAT=json one JSON object a line "
    "carrying the run id, the step and the run's tags (topic, partition, start, end) for log shippers.",
)
def console_logger(init_context: dg.InitLoggerContext) -> logging.Logger:
    chosen = dg.json_console_logger if current_settings().log_format == "json" else dg.colored_console_logger
    return chosen.logger_fn(init_context)


# Frames stay in memory between ops, so a retry must re-run every step (ALL_STEPS), never from failure.
INGEST_JOB_TAGS = {"dagster/retry_strategy": "ALL_STEPS"}


@dg.job(
    name=INGEST_JOB_NAME,
    description="Read [start, end) of one Kafka topic-partition, decode, dedup (Redis), enrich (PostgreSQL "
    "snapshot), filter, transform and aggregate it, load ClickHouse idempotently and record the offsets.",
    executor_def=dg.in_process_executor,
    tags=INGEST_JOB_TAGS,
    logger_defs={"console": console_logger},
)
def ingest_clicks() -> None:
    raw_batch = read()
    decoded = decode_events(raw_batch)
    deduped = dedup_events(decoded)
    enriched = enrich_events(deduped, raw_batch)
    filtered = filter_events(enriched)
    transformed = transform_events(filtered)
    aggregated = aggregate_windows(transformed)
    loaded = load(transformed, aggregated, decoded, enriched)
    commit(loaded, raw_batch, decoded, deduped, enriched, filtered, transformed, aggregated)


def range_run_config(topic: str, partition: int, start: int, end: int, force: bool = False) -> dict:
    """Run config of one range; `read` and `load` both take it."""
    config = {"topic": topic, "partition": partition, "start": start, "end": end, "force": force}
    return {"ops": {"read": {"config": config}, "load": {"config": config}}}


def range_tags(topic: str, partition: int, start: int, end: int) -> dict[str, str]:
    """Indexed run tags: find runs of a range, limit one run per topic-partition at a time."""
    return {
        "kafka/topic": topic,
        "kafka/partition": str(partition),
        "kafka/tp": f"{topic}:{partition}",
        "kafka/start": str(start),
        "kafka/end": str(end),
    }


def build_backfill_request_job(topic: str) -> dg.JobDefinition:
    """The Launchpad's way to backfill: its default config is the preset to edit (topic, partition, range)."""

    @dg.job(
        name=BACKFILL_REQUEST_JOB_NAME,
        description="Backfill or replay an offset range: validates it against the watermarks (start < end, "
        "low <= start, end <= high) and plans bounded ingest_clicks runs, which backfill_sensor submits. "
        "force=true replaces the range's rows and aggregate contributions.",
        executor_def=dg.in_process_executor,
        config=dg.RunConfig(
            ops={"plan_backfill_runs": BackfillRequestConfig(topic=topic, partition=0, start=0, end=1, force=False)}
        ),
    )
    def request_backfill() -> None:
        plan_backfill_runs()

    return request_backfill
