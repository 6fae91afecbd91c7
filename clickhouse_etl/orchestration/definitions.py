"""All Dagster definitions of clickhouse-etl, wired in one place: per configured pipeline a job, a sensor,
lineage assets and asset checks; one backfill request job and its sensor; the verification job.

A pipeline file that cannot be used stops the code location from loading, with the same one-line-per-problem
message `clickhouse-etl pipelines validate` prints.
"""

from __future__ import annotations

import warnings

import dagster as dg

from clickhouse_etl.core.pipeline.loading import load_pipelines
from clickhouse_etl.core.pipeline.model import Pipeline
from clickhouse_etl.core.settings import Settings, current_settings
from clickhouse_etl.orchestration.assets import lineage_assets
from clickhouse_etl.orchestration.checks import build_asset_checks
from clickhouse_etl.orchestration.jobs import build_backfill_request_job, build_ingest_job
from clickhouse_etl.orchestration.resources import PipelineTopics, resources_from_settings
from clickhouse_etl.orchestration.sensors import build_backfill_sensor, build_offsets_sensor

# Definitions copies every sensor when it binds resources and passes the beta `owners` parameter itself, so
# each command and code server would print a warning about a parameter this project never sets.
warnings.filterwarnings(
    "ignore", message=r"Parameter `owners` of initializer `SensorDefinition\.__init__`", category=dg.BetaWarning
)

VERIFY_JOB_NAME = "verify_offsets_and_stats"


def build_definitions(settings: Settings, pipelines: list[Pipeline]) -> dg.Definitions:
    resources = resources_from_settings(settings)
    ingest_jobs = [build_ingest_job(pipeline, resources) for pipeline in pipelines]
    checks = [check for pipeline in pipelines for check in build_asset_checks(pipeline)]
    verify = dg.define_asset_job(
        VERIFY_JOB_NAME,
        selection=dg.AssetSelection.checks(*checks),
        description="Checks that every pipeline's committed offsets are contiguous and its aggregates exact.",
    )
    nightly = dg.ScheduleDefinition(
        name="nightly_verification",
        job=verify,
        cron_schedule="0 3 * * *",
        default_status=dg.DefaultScheduleStatus.STOPPED,
        description="Runs the offsets and aggregate checks every night at 03:00 (off until turned on).",
    )
    sensors = [build_offsets_sensor(p, settings, job) for p, job in zip(pipelines, ingest_jobs, strict=True)]
    return dg.Definitions(
        assets=lineage_assets(pipelines),
        asset_checks=checks,
        jobs=[*ingest_jobs, build_backfill_request_job(pipelines[0].name), verify],
        schedules=[nightly],
        sensors=[*sensors, build_backfill_sensor(pipelines, ingest_jobs)],
        resources={
            # Frames pass between ops in memory, never pickled.
            "io_manager": dg.mem_io_manager,
            **resources,
            "pipeline_topics": PipelineTopics(
                topics={p.name: p.topic for p in pipelines}, jobs={p.name: p.job_name for p in pipelines}
            ),
        },
    )


def configured_definitions(settings: Settings) -> dg.Definitions:
    return build_definitions(settings, [loaded.pipeline for loaded in load_pipelines(settings.pipelines)])


defs = configured_definitions(current_settings())
