"""Sensors: per pipeline, one that plans bounded offset ranges from the Kafka watermarks; and one that submits
the runs of planned backfills. Planning itself is pure (clickhouse_etl.core.planning)."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime

import dagster as dg

from clickhouse_etl.core.pipeline.model import Pipeline
from clickhouse_etl.core.planning import PlannedRun, plan_tick
from clickhouse_etl.core.ranges import OffsetRange
from clickhouse_etl.core.settings import Settings
from clickhouse_etl.orchestration import run_records, tags
from clickhouse_etl.orchestration.jobs import BACKFILL_REQUEST_JOB_NAME, range_run_config
from clickhouse_etl.orchestration.launcher import warn_if_runs_wait_without_workers
from clickhouse_etl.orchestration.resources import KafkaResource


def range_run_request(
    pipeline: Pipeline, planned: PlannedRun, force: bool = False, extra_tags: dict[str, str] | None = None
) -> dg.RunRequest:
    return dg.RunRequest(
        run_key=planned.run_key,
        job_name=pipeline.job_name,
        run_config=range_run_config(planned.offset_range, force),
        tags={**tags.range_tags(pipeline.name, planned.offset_range), **(extra_tags or {})},
    )


def lag_observation(topic: str, lag: dict[int, int]) -> dg.AssetObservation:
    """The topic's lag on every tick, as an observation of its asset: the UI plots it over time."""
    return dg.AssetObservation(
        asset_key=["kafka", topic],
        metadata={"lag": sum(lag.values()), **{f"lag_partition_{p}": n for p, n in sorted(lag.items())}},
    )


def build_offsets_sensor(pipeline: Pipeline, settings: Settings, job: dg.JobDefinition) -> dg.SensorDefinition:
    topic, job_name = pipeline.topic, pipeline.job_name

    @dg.sensor(
        name=pipeline.sensor_name,
        job=job,
        minimum_interval_seconds=settings.sensor_interval_seconds,
        default_status=dg.DefaultSensorStatus.RUNNING,
        description=f"Plans bounded offset ranges of topic {topic} for {job_name} from the Kafka watermarks (at "
        f"most {settings.max_records_per_run} records a run; tails flushed after {settings.max_batch_wait_seconds} "
        "s) and re-requests ranges whose runs failed for good.",
    )
    def offsets_sensor(context: dg.SensorEvaluationContext, kafka: KafkaResource) -> dg.SensorResult:
        cursor = json.loads(context.cursor) if context.cursor else {}
        reader = kafka.reader(pipeline.consumer_group)
        watermarks = reader.watermarks(topic)
        # Runs a dead process left STARTED on this machine count as failed, so their ranges are requested again.
        run_records.fail_abandoned_runs(context.instance, job_name, topic, context.log.warning)
        warn_if_runs_wait_without_workers(context.instance, job_name, context.log.warning)
        failed = run_records.failed_for_good(context.instance, job_name, topic)
        ledger_ends: dict[int, int | None] = {}
        if topic not in cursor:  # a fresh (or reset) cursor resumes where recorded runs stopped
            ledger = run_records.read_ledger(context.instance, job_name, topic)
            ledger_ends = {p: entry.planned_end for p, entry in ledger.items()}
        known = cursor.get(topic, {})
        new_partitions = [p for p in watermarks if str(p) not in known and ledger_ends.get(p) is None]
        start_offsets = None
        if new_partitions and settings.start_position not in ("earliest", "latest"):
            start_offsets = reader.start_offsets(topic, settings.start_position, watermarks)
        plan = plan_tick(
            cursor,
            topic,
            watermarks,
            failed,
            ledger_ends,
            settings,
            time.time(),
            start_offsets,
            run_records.busy_partitions(context.instance, job_name, topic),
        )
        context.log.debug(f"lag per partition of {topic}: {plan.lag}; {len(plan.runs)} run(s) requested")
        return dg.SensorResult(
            run_requests=[range_run_request(pipeline, planned) for planned in plan.runs],
            cursor=json.dumps(plan.cursor, sort_keys=True),
            asset_events=[lag_observation(topic, plan.lag)],
        )

    return offsets_sensor


def backfill_run_requests(plan: dict, pipelines: dict[str, Pipeline]) -> list[dg.RunRequest]:
    """The ingest runs of one backfill plan (see ops.plan_backfill_runs); run keys make them once-only."""
    pipeline = pipelines[plan["pipeline"]]
    requests = []
    for start, end in plan["ranges"]:
        planned = PlannedRun(OffsetRange(plan["topic"], plan["partition"], start, end))
        request = range_run_request(
            pipeline, planned, force=plan["force"], extra_tags=tags.backfill_tags(plan["backfill_id"], plan["force"])
        )
        requests.append(request.with_replaced_attrs(run_key=f"backfill:{plan['backfill_id']}:{request.run_key}"))
    return requests


def build_backfill_sensor(pipelines: list[Pipeline], jobs: list[dg.JobDefinition]) -> dg.SensorDefinition:
    by_name = {pipeline.name: pipeline for pipeline in pipelines}

    @dg.sensor(
        name="backfill_sensor",
        jobs=jobs,
        minimum_interval_seconds=10,
        default_status=dg.DefaultSensorStatus.RUNNING,
        description="Submits the bounded ingest runs planned by successful request_backfill runs.",
    )
    def backfill_sensor(context: dg.SensorEvaluationContext) -> dg.SensorResult:
        since = float(context.cursor) if context.cursor else 0.0
        records = context.instance.get_run_records(
            filters=dg.RunsFilter(
                job_name=BACKFILL_REQUEST_JOB_NAME,
                statuses=[dg.DagsterRunStatus.SUCCESS],
                updated_after=datetime.fromtimestamp(since, UTC),
            ),
            limit=50,
            ascending=True,
        )
        requests = []
        for record in records:
            plan = record.dagster_run.tags.get(tags.BACKFILL_PLAN)
            if plan and json.loads(plan).get("pipeline") in by_name:
                requests.extend(backfill_run_requests(json.loads(plan), by_name))
            since = max(since, record.update_timestamp.timestamp())
        return dg.SensorResult(run_requests=requests, cursor=str(since))

    return backfill_sensor
