"""The ingest job's ops, one per arrow of the data flow; each is a thin wrapper over a pure step.

Frames travel between ops in memory (in-process executor, in-memory IO manager). Each op hands on a
small dataclass that carries the offset range and the op's own counts and seconds, which the commit op
turns into run metadata.
"""

import json
import os
import socket
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime

import dagster as dg
import polars as pl
from pydantic import Field

from clickhouse_etl import schemas
from clickhouse_etl.failpoints import failpoint
from clickhouse_etl.loading import TableLoad, load_range
from clickhouse_etl.resources import (
    CampaignsSource,
    ClickHouseWarehouse,
    DedupStore,
    IngestRules,
    KafkaSource,
    OffsetGapError,
    OffsetRangeError,
)
from clickhouse_etl.steps import aggregate, decode, dedup, enrich, filtering, transform
from clickhouse_etl.steps.ranges import OffsetRange

# Transient dependency failures (broker, Redis, Postgres, ClickHouse) retry the op with backoff; a run that
# still fails is retried as a whole by the instance (dagster.yaml run_retries).
DEPENDENCY_RETRY = dg.RetryPolicy(max_retries=3, delay=2, backoff=dg.Backoff.EXPONENTIAL, jitter=dg.Jitter.PLUS_MINUS)


class OffsetRangeConfig(dg.Config):
    """The one bounded range a run processes: [start, end) of one topic-partition."""

    topic: str = Field(description="Kafka topic")
    partition: int = Field(ge=0, description="Kafka partition")
    start: int = Field(ge=0, description="First offset of the range (inclusive)")
    end: int = Field(gt=0, description="End of the range (exclusive)")
    force: bool = Field(default=False, description="Replace this range's rows and aggregates in ClickHouse")


@dataclass
class Stage:
    """What one op produced for the next, plus its counts and timing for the run metadata."""

    offset_range: OffsetRange
    frame: pl.DataFrame
    counts: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    dead_letters: pl.DataFrame | None = None
    extra: dict[str, object] = field(default_factory=dict)


def release(*stages: Stage) -> None:
    """Drop frames no later op reads: the in-memory IO manager keeps every output until the run ends.

    Called as an op's last step, after its work succeeded, so a retried op still finds its inputs.
    """
    for stage in stages:
        stage.frame = stage.frame.clear()


def _stage_metadata(stage: Stage) -> dict[str, object]:
    return {**stage.counts, "rows_out": stage.frame.height, "seconds": round(stage.seconds, 4)}


def worker_tags(run_id: str) -> dict[str, str]:
    """Which process runs `run_id`: a run left STARTED by a process that is gone can be failed and re-run.

    The run id is part of it because a retried run inherits its parent's tags, and the parent's (dead)
    process must not make the retry look abandoned.
    """
    return {"etl/host": socket.gethostname(), "etl/pid": str(os.getpid()), "etl/worker_run": run_id}


@dg.op(
    description="Read exactly [start, end) of one topic-partition from Kafka, by assignment.",
    retry_policy=DEPENDENCY_RETRY,
)
def read(context: dg.OpExecutionContext, config: OffsetRangeConfig, kafka: KafkaSource) -> Stage:
    started = time.perf_counter()
    offset_range = OffsetRange(config.topic, config.partition, config.start, config.end)
    # Dagster's default run launcher cannot tell a live run worker from a killed one: record this process.
    context.instance.add_run_tags(context.run_id, worker_tags(context.run_id))
    failpoint("before_read")
    try:
        raw = kafka.read_range(offset_range)
    except (OffsetGapError, OffsetRangeError) as error:
        # Retrying cannot bring offsets back or move a watermark: fail at once, with the reason.
        raise dg.Failure(description=str(error), allow_retries=False) from error
    stage = Stage(offset_range, raw, {"read": raw.height}, time.perf_counter() - started)
    context.add_output_metadata(_stage_metadata(stage))
    failpoint("after_read")
    return stage


@dg.op(description="Decode JSON values into typed events; undecodable ones become dead letters with a reason.")
def decode_events(context: dg.OpExecutionContext, raw_batch: Stage, rules: IngestRules) -> Stage:
    started = time.perf_counter()
    decoded = decode.decode_events(raw_batch.frame, rules.max_message_bytes)
    stage = Stage(
        raw_batch.offset_range,
        decoded.events,
        {"malformed": decoded.dead_letters.height},
        time.perf_counter() - started,
        dead_letters=decoded.dead_letters,
    )
    context.add_output_metadata(_stage_metadata(stage))
    return stage


@dg.op(
    description="Drop duplicate click_ids: first in the batch, then a Redis claim that records the owner.",
    retry_policy=DEPENDENCY_RETRY,
)
def dedup_events(context: dg.OpExecutionContext, decoded: Stage, dedup_store: DedupStore) -> Stage:
    started = time.perf_counter()
    events = decoded.frame
    candidates = events.filter(dedup.first_in_batch(events))
    positions = dedup.position_labels(candidates)
    previous = dedup_store.claim(decoded.offset_range.topic, candidates["click_id"], positions)
    kept = candidates.filter(dedup.kept_by_claims(positions, previous))
    stage = Stage(
        decoded.offset_range, kept, {"duplicates": events.height - kept.height}, time.perf_counter() - started
    )
    context.add_output_metadata(_stage_metadata(stage))
    release(decoded)
    failpoint("after_dedup")
    return stage


@dg.op(
    description="Left-join the events with the PostgreSQL campaigns snapshot on ad_id.", retry_policy=DEPENDENCY_RETRY
)
def enrich_events(
    context: dg.OpExecutionContext, deduped: Stage, raw_batch: Stage, campaigns: CampaignsSource, rules: IngestRules
) -> Stage:
    started = time.perf_counter()
    snapshot = campaigns.snapshot()
    if snapshot.source != "postgres":
        context.log.warning(f"enriching with the {snapshot.source}, version {snapshot.version}")
    policy = rules.missing_campaign_policy
    enriched = enrich.enrich_events(deduped.frame, snapshot, policy)  # type: ignore[arg-type]
    dead_letters = None
    if policy == "dead_letter" and not enriched.unmatched.is_empty():
        dead_letters = raw_batch.frame.join(
            enriched.unmatched.select("kafka_offset", "ad_id"), on="kafka_offset", how="inner"
        ).select(
            "kafka_partition",
            "kafka_offset",
            pl.col("value").alias("raw_value"),
            pl.format("unknown ad_id {}: not in the campaigns snapshot {}", "ad_id", pl.lit(snapshot.version)).alias(
                "error"
            ),
        )
    stage = Stage(
        deduped.offset_range,
        enriched.events,
        {"unmatched": enriched.unmatched.height},
        time.perf_counter() - started,
        dead_letters=dead_letters,
        extra={
            "snapshot_version": snapshot.version,
            "snapshot_source": snapshot.source,
            "missing_campaign_policy": policy,
        },
    )
    context.add_output_metadata(
        {**_stage_metadata(stage), "snapshot_version": snapshot.version, "snapshot_source": snapshot.source}
    )
    release(deduped, raw_batch)  # decode already read the raw batch
    return stage


@dg.op(description="Drop clicks from the configured IPv4/IPv6 networks (bot traffic).")
def filter_events(context: dg.OpExecutionContext, enriched: Stage, rules: IngestRules) -> Stage:
    started = time.perf_counter()
    blocked = filtering.blocked_mask(enriched.frame, filtering.NetworkRules.parse(rules.filter_cidrs))
    kept = enriched.frame.filter(~blocked)
    stage = Stage(
        enriched.offset_range, kept, {"filtered": enriched.frame.height - kept.height}, time.perf_counter() - started
    )
    context.add_output_metadata(_stage_metadata(stage))
    release(enriched)
    return stage


@dg.op(description="Shape rows for ad_clicks_enriched: click_time, processed_at and the Kafka position.")
def transform_events(context: dg.OpExecutionContext, filtered: Stage) -> Stage:
    started = time.perf_counter()
    rows = transform.to_enriched_rows(filtered.frame, filtered.offset_range.topic)
    stage = Stage(filtered.offset_range, rows, {}, time.perf_counter() - started)
    context.add_output_metadata(_stage_metadata(stage))
    release(filtered)
    return stage


@dg.op(description="Partial (minute, campaign) aggregates of this range: clicks and the distinct users.")
def aggregate_windows(context: dg.OpExecutionContext, transformed: Stage) -> Stage:
    started = time.perf_counter()
    r = transformed.offset_range
    partials = aggregate.window_partials(transformed.frame, r.topic, r.partition, r.start, r.end)
    stage = Stage(
        r,
        partials,
        {"windows": partials.height},
        time.perf_counter() - started,
        extra={"highlights": aggregate.highlights(partials)},
    )
    context.add_output_metadata(_stage_metadata(stage))
    return stage


@dataclass
class LoadResult:
    offset_range: OffsetRange
    tables: list[TableLoad]
    seconds: float


STATS_CHECK_NAME = "matches_enriched_clicks"


@dg.op(
    description="Insert enriched rows, dead letters and partial aggregates into ClickHouse, idempotently.",
    retry_policy=DEPENDENCY_RETRY,
)
def load(
    context: dg.OpExecutionContext,
    config: OffsetRangeConfig,
    transformed: Stage,
    aggregated: Stage,
    decoded: Stage,
    enriched: Stage,
    warehouse: ClickHouseWarehouse,
) -> LoadResult:
    started = time.perf_counter()
    dead_letters = pl.concat(
        [frame for frame in (decoded.dead_letters, enriched.dead_letters) if frame is not None]
    ).sort("kafka_offset")
    failed_at = datetime.now(UTC)
    dead_letter_rows = dead_letters.select(
        pl.lit(transformed.offset_range.topic).alias("kafka_topic"),
        "kafka_partition",
        "kafka_offset",
        "raw_value",
        "error",
        pl.lit(failed_at).cast(pl.Datetime("ms", "UTC")).alias("failed_at"),
    )
    # A forced reload is one replacement per attempt: a retried attempt deletes and inserts again.
    force_token = f"force-{context.run_id}-{context.retry_number}" if config.force else None
    with warehouse.session() as client:
        failpoint("during_load")
        tables = load_range(
            client,
            warehouse.database,
            transformed.offset_range,
            transformed.frame,
            dead_letter_rows,
            aggregated.frame,
            force_token,
        )
        failpoint("after_load")
    result = LoadResult(transformed.offset_range, tables, time.perf_counter() - started)
    context.add_output_metadata(
        {f"{t.table}_rows": t.rows for t in tables}
        | {
            "already_present": ", ".join(t.table for t in tables if not t.inserted and t.rows) or "none",
            "seconds": round(result.seconds, 4),
        }
    )
    release(transformed, aggregated)  # aggregate already read the enriched rows
    return result


STATS_CHECK_NAME = "matches_enriched_clicks"


@dg.op(
    description="Record offsets, counts per stage and the snapshot version; commit the group offset.",
    retry_policy=DEPENDENCY_RETRY,
)
def commit(
    context: dg.OpExecutionContext,
    loaded: LoadResult,
    raw_batch: Stage,
    decoded: Stage,
    deduped: Stage,
    enriched: Stage,
    filtered: Stage,
    transformed: Stage,
    aggregated: Stage,
    kafka: KafkaSource,
) -> dict[str, int]:
    failpoint("before_commit")
    started = time.perf_counter()
    r = loaded.offset_range
    kafka.commit_group_offset(r)
    loaded_rows = next(t.rows for t in loaded.tables if t.table == schemas.ENRICHED_TABLE)
    counts = {
        "read": raw_batch.counts["read"],
        "malformed": decoded.counts["malformed"],
        "duplicates": deduped.counts["duplicates"],
        "unmatched": enriched.counts["unmatched"],
        "filtered": filtered.counts["filtered"],
        "loaded": loaded_rows,
        "dead_lettered": decoded.counts["malformed"]
        + (0 if enriched.dead_letters is None else enriched.dead_letters.height),
    }
    seconds = {
        "read": raw_batch.seconds,
        "decode": decoded.seconds,
        "dedup": deduped.seconds,
        "enrich": enriched.seconds,
        "filter": filtered.seconds,
        "transform": transformed.seconds,
        "aggregate": aggregated.seconds,
        "load": loaded.seconds,
        "commit": time.perf_counter() - started,
    }
    metadata: dict[str, object] = {
        "topic": r.topic,
        "partition": r.partition,
        "start": r.start,
        "end": r.end,
        **{f"count_{name}": value for name, value in counts.items()},
        "snapshot_version": str(enriched.extra["snapshot_version"]),
        "snapshot_source": str(enriched.extra["snapshot_source"]),
        "missing_campaign_policy": str(enriched.extra["missing_campaign_policy"]),
        "seconds_per_stage": dg.MetadataValue.json({k: round(v, 4) for k, v in seconds.items()}),
        "aggregate_highlights": dg.MetadataValue.json(aggregated.extra["highlights"]),
    }
    for asset_key, asset_metadata in (
        (["kafka", r.topic], {"partition": r.partition, "end": r.end, "read": counts["read"]}),
        (
            ["clickhouse", schemas.ENRICHED_TABLE],
            {
                "loaded": loaded_rows,
                "duplicates": counts["duplicates"],
                "filtered": counts["filtered"],
                "unmatched": counts["unmatched"],
                "partition": r.partition,
                "end": r.end,
            },
        ),
        (
            ["clickhouse", schemas.DEAD_LETTER_TABLE],
            {"dead_lettered": counts["dead_lettered"], "partition": r.partition},
        ),
        (
            ["clickhouse", schemas.MINUTE_STATS_VIEW],
            {"windows": aggregated.counts["windows"], "partition": r.partition},
        ),
    ):
        context.log_event(
            dg.AssetMaterialization(
                asset_key=asset_key, metadata=asset_metadata, description=f"offsets [{r.start}, {r.end}) of {r.tp}"
            )
        )
    context.add_output_metadata(metadata)
    # Counts as run tags too: the runs list shows them and tools can filter on them.
    tags = {f"etl/{name}": str(value) for name, value in counts.items()}
    highlights = aggregated.extra["highlights"]
    if highlights.get("windows"):  # type: ignore[union-attr]
        # Windows this range touched: the stats check verifies recent runs' windows from these tags.
        tags |= {"etl/first_window": str(highlights["first_window"]), "etl/last_window": str(highlights["last_window"])}  # type: ignore[index]
    context.instance.add_run_tags(context.run_id, tags)
    context.log.info(f"committed {r.label}: {counts}")
    failpoint("after_commit")
    return counts


class BackfillRequestConfig(dg.Config):
    """An offset range to re-process; validated against the watermarks and split into bounded runs."""

    topic: str = Field(description="Kafka topic")
    partition: int = Field(ge=0, description="Kafka partition")
    start: int = Field(ge=0, description="First offset (inclusive), at or above the low watermark")
    end: int = Field(gt=0, description="End offset (exclusive), at most the high watermark")
    force: bool = Field(default=False, description="Replace the range's rows and aggregate contributions")


BACKFILL_PLAN_TAG = "etl/backfill_plan"


@dg.op(description="Validate a backfill request and plan its bounded runs; the backfill sensor submits them.")
def plan_backfill_runs(
    context: dg.OpExecutionContext, config: BackfillRequestConfig, kafka: KafkaSource, rules: IngestRules
) -> dict[str, object]:
    from clickhouse_etl.backfill import plan_backfill
    from clickhouse_etl.ledger import committed_ranges

    committed = committed_ranges(context.instance, config.topic, config.partition)
    plan = plan_backfill(
        config.topic,
        config.partition,
        config.start,
        config.end,
        config.force,
        kafka.watermarks(config.topic),
        committed,
        rules.max_records_per_run,
        backfill_id=context.run_id[:12],
    )
    summary = {
        "backfill_id": plan.backfill_id,
        "topic": config.topic,
        "partition": config.partition,
        "force": config.force,
        "ranges": [[r.start, r.end] for r in plan.ranges],
    }
    context.instance.add_run_tags(context.run_id, {BACKFILL_PLAN_TAG: json.dumps(summary, separators=(",", ":"))})
    context.add_output_metadata({"runs_planned": len(plan.ranges), "plan": dg.MetadataValue.json(summary)})
    return summary
