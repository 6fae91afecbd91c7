"""A newcomer in the Dagster UI finds a description on every job, op, asset, check, sensor, schedule and resource,
and a job and a sensor per pipeline."""

from __future__ import annotations

import dagster as dg

from clickhouse_etl.core.pipeline.loading import load_pipelines
from clickhouse_etl.core.settings import load_settings
from clickhouse_etl.orchestration.definitions import build_definitions


def test_everything_in_the_ui_has_a_description() -> None:
    pipelines = [loaded.pipeline for loaded in load_pipelines("ad_clicks,api_usage", environment={})]
    defs = build_definitions(load_settings(), pipelines)
    repository = defs.get_repository_def()
    jobs = [job for job in repository.get_all_jobs() if not job.name.startswith("__")]
    assert {job.name for job in jobs} == {
        "ingest_clicks",
        "ingest_api_usage",
        "request_backfill",
        "verify_offsets_and_stats",
    }
    assert {sensor.name for sensor in repository.sensor_defs} == {
        "kafka_offsets_sensor",
        "api_usage_sensor",
        "backfill_sensor",
    }
    for job in jobs:
        assert job.description, job.name
    for job_name in ("ingest_clicks", "ingest_api_usage", "request_backfill"):
        for op in repository.get_job(job_name).graph.node_defs:
            assert op.description, op.name
    for sensor in repository.sensor_defs:
        assert sensor.description, sensor.name
    for schedule in repository.schedule_defs:
        assert schedule.description, schedule.name
    for key, assets in repository.assets_defs_by_key.items():
        assert assets.descriptions_by_key.get(key), key
    checks = [spec for checks in defs.asset_checks or [] for spec in checks.check_specs]
    # Per pipeline: offsets contiguous, and one exactness check per aggregate view (2 for ad clicks, 3 for usage).
    assert len(checks) == 2 + 1 + 3 + 1 and all(spec.description for spec in checks)
    for name, resource in defs.resources.items():
        description = resource.description if isinstance(resource, dg.IOManagerDefinition) else type(resource).__doc__
        assert description, name
