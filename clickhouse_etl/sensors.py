"""The Kafka sensor: plans bounded offset ranges from watermarks and launches one run per range.

A tick reads watermarks only (no messages). The cursor is `{topic: {partition: next_offset}}` plus, under
"@waiting_since", the last tick at which each partition had nothing unplanned (for a new partition: when its
tail was first seen). Offsets beyond the cursor arrived after that tick, so a small tail is flushed once the
tick is `max_batch_wait_seconds` ago: with ticks further apart than the wait, every tick flushes, instead of
every other one. Ranges whose runs failed for good are requested again under a new run key: a range is
never skipped.
"""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime

import dagster as dg

from clickhouse_etl import ledger
from clickhouse_etl.catchup import fail_abandoned_runs
from clickhouse_etl.jobs import BACKFILL_REQUEST_JOB_NAME, ingest_clicks, range_run_config, range_tags
from clickhouse_etl.ops import BACKFILL_PLAN_TAG
from clickhouse_etl.resources import KafkaSource
from clickhouse_etl.settings import Settings
from clickhouse_etl.steps.ranges import OffsetRange, plan_ranges

WAITING_KEY = "@waiting_since"  # "@" cannot occur in a Kafka topic name


def range_run_request(
    offset_range: OffsetRange, attempt: int = 0, force: bool = False, extra_tags: dict[str, str] | None = None
) -> dg.RunRequest:
    r = offset_range
    run_key = f"{r.topic}:{r.partition}:{r.start}-{r.end}" + (f":retry-{attempt}" if attempt else "")
    return dg.RunRequest(
        run_key=run_key,
        run_config=range_run_config(r.topic, r.partition, r.start, r.end, force),
        tags={**range_tags(r.topic, r.partition, r.start, r.end), **(extra_tags or {})},
    )


def plan_tick(
    cursor: dict,
    topic: str,
    watermarks: dict[int, tuple[int, int]],
    failed: dict[OffsetRange, int],
    ledger_ends: dict[int, int | None],
    settings: Settings,
    now: float,
    start_offsets: dict[int, int] | None = None,
    busy: frozenset[int] = frozenset(),
) -> tuple[list[dg.RunRequest], dict, dict[int, int]]:
    """Pure planning of one tick: run requests, the new cursor and the lag per partition.

    A partition not in the cursor resumes at its recorded runs' end (ledger_ends), else at the start
    position: the low or high watermark, or start_offsets (a timestamp's offsets) when given.
    A partition with a run queued or running (`busy`) gets no new range this tick: its offsets accumulate
    into one range planned once the run ended, so ranges grow with the load and launch costs are spread
    over more events instead of queueing many small runs (its runs could not overlap anyway: one run per
    topic-partition at a time).
    """
    offsets: dict[str, int] = dict(cursor.get(topic, {}))
    waiting: dict[str, float] = dict(cursor.get(WAITING_KEY, {}))
    requests = [range_run_request(r, attempt=n) for r, n in sorted(failed.items())]
    lag: dict[int, int] = {}
    for partition, (low, high) in sorted(watermarks.items()):
        key = str(partition)
        if key not in offsets:
            known_end = ledger_ends.get(partition)
            if known_end is not None:
                offsets[key] = known_end
            elif start_offsets is not None and partition in start_offsets:
                offsets[key] = start_offsets[partition]
            else:
                offsets[key] = low if settings.start_position == "earliest" else high
        next_offset = offsets[key]
        lag[partition] = max(0, high - next_offset)
        wait_key = f"{topic}/{partition}"
        if partition in busy:
            continue
        if high <= next_offset:
            # Caught up: whatever arrives after this tick has waited at most since now.
            waiting[wait_key] = now
            continue
        waiting.setdefault(wait_key, now)
        ranges = plan_ranges(
            topic,
            partition,
            next_offset,
            high,
            settings.max_records_per_run,
            now - waiting[wait_key],
            settings.max_batch_wait_seconds,
        )
        if ranges:
            requests.extend(range_run_request(r) for r in ranges)
            offsets[key] = ranges[-1].end
            waiting[wait_key] = now
    new_cursor = {**cursor, topic: offsets, WAITING_KEY: waiting}
    return requests, new_cursor, lag


def busy_partitions(instance: dg.DagsterInstance, topic: str) -> frozenset[int]:
    """Partitions of the topic with an ingest run queued, starting or running."""
    runs = instance.get_runs(
        filters=dg.RunsFilter(
            job_name=ingest_clicks.name,
            statuses=[
                dg.DagsterRunStatus.NOT_STARTED,
                dg.DagsterRunStatus.QUEUED,
                dg.DagsterRunStatus.STARTING,
                dg.DagsterRunStatus.STARTED,
            ],
            tags={"kafka/topic": topic},
        )
    )
    return frozenset(int(run.tags["kafka/partition"]) for run in runs)


def lag_observation(topic: str, lag: dict[int, int]) -> dg.AssetObservation:
    """The topic's lag on every tick, as an observation of its asset: the UI plots it over time."""
    return dg.AssetObservation(
        asset_key=["kafka", topic],
        metadata={"lag": sum(lag.values()), **{f"lag_partition_{p}": n for p, n in sorted(lag.items())}},
    )


def build_kafka_sensor(settings: Settings) -> dg.SensorDefinition:
    @dg.sensor(
        name="kafka_offsets_sensor",
        job=ingest_clicks,
        minimum_interval_seconds=settings.sensor_interval_seconds,
        default_status=dg.DefaultSensorStatus.RUNNING,
        description=f"Plans bounded offset ranges of topic {settings.topic} from the Kafka watermarks (at most "
        f"{settings.max_records_per_run} records a run; tails flushed after {settings.max_batch_wait_seconds} s) "
        "and re-requests ranges whose runs failed for good.",
    )
    def kafka_offsets_sensor(context: dg.SensorEvaluationContext, kafka: KafkaSource) -> dg.SensorResult:
        cursor = json.loads(context.cursor) if context.cursor else {}
        topic = settings.topic
        watermarks = kafka.watermarks(topic)
        # Runs a dead catch-up or backfill process left STARTED on this machine count as failed, so their
        # ranges are requested again below.
        fail_abandoned_runs(context.instance, topic, context.log.warning)
        failed = ledger.failed_for_good(context.instance, topic)
        ledger_ends: dict[int, int | None] = {}
        if topic not in cursor:  # a fresh (or reset) cursor resumes where recorded runs stopped
            ledger_ends = {p: entry.planned_end for p, entry in ledger.read_ledger(context.instance, topic).items()}
        known = cursor.get(topic, {})
        new_partitions = [p for p in watermarks if str(p) not in known and ledger_ends.get(p) is None]
        start_offsets = None
        if new_partitions and settings.start_position not in ("earliest", "latest"):
            start_offsets = kafka.start_offsets(topic, settings.start_position)
        requests, new_cursor, lag = plan_tick(
            cursor,
            topic,
            watermarks,
            failed,
            ledger_ends,
            settings,
            time.time(),
            start_offsets,
            busy_partitions(context.instance, topic),
        )
        context.log.info(f"lag per partition of {topic}: {lag}; {len(requests)} run(s) requested")
        return dg.SensorResult(
            run_requests=requests,
            cursor=json.dumps(new_cursor, sort_keys=True),
            asset_events=[lag_observation(topic, lag)],
        )

    return kafka_offsets_sensor


def backfill_run_requests(plan: dict) -> list[dg.RunRequest]:
    """The ingest runs of one backfill plan (see ops.plan_backfill_runs); run keys make them once-only."""
    requests = []
    for start, end in plan["ranges"]:
        r = OffsetRange(plan["topic"], plan["partition"], start, end)
        request = range_run_request(
            r,
            force=plan["force"],
            extra_tags={
                "etl/backfill_id": plan["backfill_id"],
                "etl/trigger": "backfill",
                "etl/force": str(plan["force"]).lower(),
            },
        )
        requests.append(request.with_replaced_attrs(run_key=f"backfill:{plan['backfill_id']}:{request.run_key}"))
    return requests


def build_backfill_sensor() -> dg.SensorDefinition:
    @dg.sensor(
        name="backfill_sensor",
        job=ingest_clicks,
        minimum_interval_seconds=10,
        default_status=dg.DefaultSensorStatus.RUNNING,
        description="Submits the bounded ingest_clicks runs planned by successful request_backfill runs.",
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
            plan = record.dagster_run.tags.get(BACKFILL_PLAN_TAG)
            if plan:
                requests.extend(backfill_run_requests(json.loads(plan)))
            since = max(since, record.update_timestamp.timestamp())
        return dg.SensorResult(run_requests=requests, cursor=str(since))

    return backfill_sensor
