"""All Dagster definitions of clickhouse-etl, wired in one place."""

from __future__ import annotations

import warnings

import dagster as dg

from clickhouse_etl import schemas
from clickhouse_etl.asset_checks import build_asset_checks
from clickhouse_etl.jobs import build_backfill_request_job, ingest_clicks
from clickhouse_etl.resources import resources_from_settings
from clickhouse_etl.sensors import build_backfill_sensor, build_kafka_sensor
from clickhouse_etl.settings import Settings, current_settings

# Definitions copies every sensor when it binds resources and passes the beta `owners` parameter itself, so
# each command and code server would print a warning about a parameter this project never sets.
warnings.filterwarnings(
    "ignore", message=r"Parameter `owners` of initializer `SensorDefinition\.__init__`", category=dg.BetaWarning
)


def lineage_assets(settings: Settings) -> list[dg.AssetSpec]:
    """The tables the ingest job materializes, so the UI shows lineage and plots the recorded counts."""
    topic = dg.AssetSpec(
        ["kafka", settings.topic],
        description=f"Kafka topic {settings.topic} (JSON ad clicks)",
        group_name="sources",
        kinds={"kafka"},
    )
    campaigns = dg.AssetSpec(
        ["postgres", "campaigns"],
        description="Campaigns dimension table in PostgreSQL",
        group_name="sources",
        kinds={"postgres"},
    )
    enriched = dg.AssetSpec(
        ["clickhouse", schemas.ENRICHED_TABLE],
        deps=[topic, campaigns],
        group_name="analytics",
        description="Deduplicated, enriched, filtered clicks; every row carries its Kafka position.",
        kinds={"clickhouse"},
    )
    dead_letters = dg.AssetSpec(
        ["clickhouse", schemas.DEAD_LETTER_TABLE],
        deps=[topic],
        group_name="analytics",
        kinds={"clickhouse"},
        description="Messages that could not be decoded (or unknown ads under the dead_letter policy), with reason.",
    )
    stats = dg.AssetSpec(
        ["clickhouse", schemas.MINUTE_STATS_VIEW],
        deps=[enriched],
        group_name="analytics",
        kinds={"clickhouse"},
        description="Clicks and exact unique users per (minute, campaign), merged from per-range partials.",
    )
    return [topic, campaigns, enriched, dead_letters, stats]


VERIFY_JOB_NAME = "verify_offsets_and_stats"


def build_definitions(settings: Settings) -> dg.Definitions:
    checks = build_asset_checks(settings)
    verify = dg.define_asset_job(
        VERIFY_JOB_NAME,
        selection=dg.AssetSelection.checks(*checks),
        description="Checks that committed offsets are contiguous and the stats equal the enriched clicks.",
    )
    nightly = dg.ScheduleDefinition(
        name="nightly_verification",
        job=verify,
        cron_schedule="0 3 * * *",
        default_status=dg.DefaultScheduleStatus.STOPPED,
        description="Runs the offsets and aggregate checks every night at 03:00 (off until turned on).",
    )
    return dg.Definitions(
        assets=lineage_assets(settings),
        asset_checks=checks,
        jobs=[ingest_clicks, build_backfill_request_job(settings.topic), verify],
        schedules=[nightly],
        sensors=[build_kafka_sensor(settings), build_backfill_sensor()],
        # Frames pass between ops in memory, never pickled.
        resources={"io_manager": dg.mem_io_manager, **resources_from_settings(settings)},
    )


defs = build_definitions(current_settings())
