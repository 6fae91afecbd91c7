"""Jobs: one ingest job per pipeline (the shared ops bound to its `pipeline` resource), and the backfill request."""

from __future__ import annotations

import logging

import dagster as dg

from clickhouse_etl.core.pipeline.model import Pipeline
from clickhouse_etl.core.ranges import OffsetRange
from clickhouse_etl.core.settings import current_settings
from clickhouse_etl.orchestration import tags
from clickhouse_etl.orchestration.ops import (
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
from clickhouse_etl.orchestration.resources import PipelineResource

BACKFILL_REQUEST_JOB_NAME = "request_backfill"


@dg.logger(
    config_schema={
        "log_level": dg.Field(str, is_required=False, description="DEBUG shows every Dagster event of the run"),
        "name": dg.Field(str, is_required=False, default_value="dagster"),
    },
    description="Run logs on stderr: colored text, or with CLICKHOUSE_ETL_LOG_FORMAT=json one JSON object a line "
    "carrying the run id, the step and the run's tags (pipeline, topic, partition, start, end) for log shippers. "
    "At INFO (CLICKHOUSE_ETL_LOG_LEVEL, the default) a run logs one line, its range and counts, when committed.",
)
def console_logger(init_context: dg.InitLoggerContext) -> logging.Logger:
    settings = current_settings()
    chosen = dg.json_console_logger if settings.log_format == "json" else dg.colored_console_logger
    config = {"log_level": settings.log_level, **init_context.logger_config}
    return chosen.logger_fn(dg.build_init_logger_context(logger_config=config))


@dg.graph(description="One bounded offset range through every stage of the data flow, in one process.")
def ingest() -> None:
    commit(load(aggregate_windows(transform_events(filter_events(enrich_events(dedup_events(decode_events(read()))))))))


def build_ingest_job(pipeline: Pipeline, resources: dict[str, dg.ConfigurableResource]) -> dg.JobDefinition:
    """The pipeline's ingest job: the shared ops and resources, and its own `pipeline` resource."""
    return ingest.to_job(
        name=pipeline.job_name,
        description=f"{pipeline.description or pipeline.name} — one bounded range of topic {pipeline.topic} per run: "
        f"read, decode, dedup, enrich, filter, transform and aggregate it, load {pipeline.sink.table} idempotently "
        "and record the offsets.",
        executor_def=dg.in_process_executor,
        resource_defs={"io_manager": dg.mem_io_manager, **resources, "pipeline": PipelineResource.of(pipeline)},
        logger_defs={"console": console_logger},
        # Frames stay in memory between ops, so a retry must re-run every step (ALL_STEPS), never from failure.
        tags={tags.RETRY_STRATEGY: "ALL_STEPS", tags.PIPELINE: pipeline.name},
    )


def range_run_config(offset_range: OffsetRange, force: bool = False) -> dict:
    """Run config of one range; the project's console logger is named, or Dagster would log every event."""
    r = offset_range
    read_config = {"topic": r.topic, "partition": r.partition, "start": r.start, "end": r.end, "force": force}
    return {"ops": {"read": {"config": read_config}}, "loggers": {"console": {"config": {}}}}


def build_backfill_request_job(default_pipeline: str) -> dg.JobDefinition:
    """The Launchpad's way to backfill: its default config is the preset to edit (pipeline, partition, range)."""

    @dg.job(
        name=BACKFILL_REQUEST_JOB_NAME,
        description="Backfill or replay an offset range of a pipeline: validates it against the watermarks "
        "(start < end, low <= start, end <= high) and plans bounded runs of the pipeline's ingest job, which "
        "backfill_sensor submits. force=true replaces the range's rows and aggregate contributions.",
        executor_def=dg.in_process_executor,
        config=dg.RunConfig(
            ops={
                "plan_backfill_runs": BackfillRequestConfig(
                    pipeline=default_pipeline, partition=0, start=0, end=1, force=False
                )
            }
        ),
    )
    def request_backfill() -> None:
        plan_backfill_runs()

    return request_backfill
