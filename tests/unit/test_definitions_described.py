"""A newcomer in the Dagster UI finds a description on every job, op, asset, check, sensor, schedule and resource."""

from __future__ import annotations

import dagster as dg

from clickhouse_etl.definitions import build_definitions
from clickhouse_etl.settings import load_settings


def test_everything_in_the_ui_has_a_description() -> None:
    defs = build_definitions(load_settings())
    repository = defs.get_repository_def()
    jobs = [job for job in repository.get_all_jobs() if not job.name.startswith("__")]
    assert {job.name for job in jobs} >= {"ingest_clicks", "request_backfill", "verify_offsets_and_stats"}
    for job in jobs:
        assert job.description, job.name
    for job_name in ("ingest_clicks", "request_backfill"):
        for op in repository.get_job(job_name).graph.node_defs:
            assert op.description, op.name
    for sensor in repository.sensor_defs:
        assert sensor.description, sensor.name
    for schedule in repository.schedule_defs:
        assert schedule.description, schedule.name
    for key, assets in repository.assets_defs_by_key.items():
        assert assets.descriptions_by_key.get(key), key
    checks = [spec for checks in defs.asset_checks or [] for spec in checks.check_specs]
    assert len(checks) == 2 and all(spec.description for spec in checks)
    for name, resource in defs.resources.items():
        description = resource.description if isinstance(resource, dg.IOManagerDefinition) else type(resource).__doc__
        assert description, name
