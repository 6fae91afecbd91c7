"""The ingest job's ops, one per arrow of the data flow; each is a thin wrapper over a pure step.

The ops are shared by every pipeline's job: each job binds its own `pipeline` resource, and every op reads
its section from it. A `Batch` travels down the chain in memory (in-process executor, in-memory IO manager)
carrying the offset range, the events so far, the dead letters, and each stage's counts and seconds, so the
commit op needs nothing but the load's output.
"""

import json
import time
from collections.abc import Iterator
from datetime import UTC, datetime

import dagster as dg
import polars as pl
from pydantic import Field

from clickhouse_etl.clients.kafka import OffsetGapError, OffsetRangeError
from clickhouse_etl.core.backfill import plan_backfill
from clickhouse_etl.core.failpoints import failpoint
from clickhouse_etl.core.ranges import OffsetRange
from clickhouse_etl.orchestration import tags
from clickhouse_etl.orchestration.batch import Batch, Windows, WindowStore
from clickhouse_etl.orchestration.resources import (
    ClaimsResource,
    KafkaResource,
    PipelineResource,
    PipelineTopics,
    PostgresResource,
    RunLimits,
    RunScratch,
    WarehouseResource,
)
from clickhouse_etl.orchestration.run_records import committed_ranges
from clickhouse_etl.steps import aggregate, decode, dedup, enrich, filtering, transform
from clickhouse_etl.steps import load as loading

# Transient dependency failures (broker, Redis, Postgres, ClickHouse) retry the op with backoff; a run that
# still fails is retried as a whole by the instance (dagster.yaml run_retries).
DEPENDENCY_RETRY = dg.RetryPolicy(max_retries=3, delay=2, backoff=dg.Backoff.EXPONENTIAL, jitter=dg.Jitter.PLUS_MINUS)
STAGES = ("read", "decode", "dedup", "enrich", "filter", "transform", "aggregate", "load", "commit")


class RangeConfig(dg.Config):
    """The one bounded range a run processes: [start, end) of one topic-partition."""

    topic: str = Field(description="Kafka topic (the pipeline's)")
    partition: int = Field(ge=0, description="Kafka partition")
    start: int = Field(ge=0, description="First offset of the range (inclusive)")
    end: int = Field(gt=0, description="End of the range (exclusive)")
    force: bool = Field(default=False, description="Replace this range's rows and aggregates in ClickHouse")


def _output_metadata(context: dg.OpExecutionContext, batch: Batch, stage: str, **extra: object) -> None:
    context.add_output_metadata({"rows_out": batch.events.height, "seconds": round(batch.seconds[stage], 4), **extra})


def _raw_dead_letters(raw: pl.DataFrame, rows: pl.DataFrame, reason: pl.Expr) -> pl.DataFrame:
    """Dead letters of events found bad after decoding: their original bytes, joined back by offset."""
    return raw.join(rows, on="kafka_offset", how="inner").select(
        "kafka_partition", "kafka_offset", pl.col("value").alias("raw_value"), reason.alias("error")
    )


@dg.op(
    description="Read exactly [start, end) of one topic-partition from Kafka, by assignment.",
    retry_policy=DEPENDENCY_RETRY,
)
def read(
    context: dg.OpExecutionContext,
    config: RangeConfig,
    kafka: KafkaResource,
    pipeline: PipelineResource,
    scratch: RunScratch,
    limits: RunLimits,
) -> Batch:
    started = time.perf_counter()
    declared = pipeline.pipeline
    if config.topic != declared.topic:
        raise dg.Failure(
            f"pipeline {declared.name} reads topic {declared.topic}, not {config.topic}", allow_retries=False
        )
    offset_range = OffsetRange(config.topic, config.partition, config.start, config.end)
    # Dagster's default run launcher cannot tell a live run worker from a killed one: record this process.
    context.instance.add_run_tags(context.run_id, tags.worker_tags(context.run_id))
    failpoint("before_read")
    one_window = offset_range.size <= loading.INSERT_WINDOW
    store = WindowStore(None) if one_window else WindowStore(scratch.folder, limits.window_memory_bytes)
    reader = kafka.reader(declared.consumer_group)
    try:
        raw = Windows.write(store, "raw", reader.read_windows(offset_range, loading.INSERT_WINDOW))
    except (OffsetGapError, OffsetRangeError) as error:
        # Retrying cannot bring offsets back or move a watermark: fail at once, with the reason.
        raise dg.Failure(description=str(error), allow_retries=False) from error
    batch = Batch(offset_range, config.force, store, events=raw, raw=raw, counts={"read": raw.height})
    batch.seconds["read"] = time.perf_counter() - started
    _output_metadata(context, batch, "read")
    failpoint("after_read")
    return batch


@dg.op(description="Decode JSON values into typed events; undecodable ones become dead letters with a reason.")
def decode_events(context: dg.OpExecutionContext, batch: Batch, pipeline: PipelineResource) -> Batch:
    started = time.perf_counter()
    source = pipeline.pipeline.source
    dead_letters: list[tuple[OffsetRange, pl.DataFrame]] = []

    def decode_window(window: OffsetRange, raw: pl.DataFrame) -> pl.DataFrame:
        decoded = decode.decode_events(raw, source)
        dead_letters.append((window, decoded.dead_letters))
        return decoded.events

    events = batch.events.map(batch.store, "decoded", decode_window)
    malformed = Windows.write(batch.store, "malformed", dead_letters)
    out = batch.advance(
        "decode",
        started,
        events,
        dead_letters=batch.with_dead_letters(malformed),
        counts={"malformed": malformed.height},
    )
    _output_metadata(context, out, "decode", malformed=malformed.height)
    batch.release(out)
    return out


@dg.op(
    description="Drop duplicates: a Redis claim per key records the position that owns it (its first occurrence).",
    retry_policy=DEPENDENCY_RETRY,
)
def dedup_events(
    context: dg.OpExecutionContext, batch: Batch, claims: ClaimsResource, pipeline: PipelineResource
) -> Batch:
    started = time.perf_counter()
    declared = pipeline.pipeline

    # Window by window, in offset order: a key met again in a later window finds the claim of its first
    # occurrence (a different position), exactly as if the range were one batch. Within a window the rows are
    # in offset order too (one partition's, as read), so a key repeated there is owned by its lowest offset.
    def kept_in_window(_: OffsetRange, events: pl.DataFrame) -> pl.DataFrame:
        if declared.dedup is None:
            return events
        positions = dedup.position_labels(events)
        namespace = dedup.claim_namespace(declared.dedup_key_prefix, declared.topic)
        keys = dedup.dedup_keys(events, declared.dedup.key)
        previous = claims.claim(namespace, keys, positions, declared.dedup.ttl_seconds)
        return events.filter(dedup.kept_by_claims(positions, previous))

    kept = batch.events.map(batch.store, "unique", kept_in_window)
    out = batch.advance("dedup", started, kept, counts={"duplicates": batch.events.height - kept.height})
    _output_metadata(context, out, "dedup", duplicates=out.counts["duplicates"])
    batch.release(out)
    failpoint("after_dedup")
    return out


@dg.op(
    description="Left-join the events with each lookup's PostgreSQL snapshot; unmatched events per policy.",
    retry_policy=DEPENDENCY_RETRY,
)
def enrich_events(
    context: dg.OpExecutionContext, batch: Batch, postgres: PostgresResource, pipeline: PipelineResource
) -> Batch:
    started = time.perf_counter()
    declared = pipeline.pipeline
    key_types = {name: spec.field_type for name, spec in declared.source.fields.items()}
    snapshots: dict[str, enrich.Snapshot] = {}
    for lookup in declared.enrich:
        read = postgres.read(declared, lookup)
        try:
            snapshot = enrich.snapshot_from_csv(
                read.csv, lookup, {k: key_types[k] for k in lookup.join_key}, read.source
            )
        except enrich.SnapshotError as error:
            raise dg.Failure(str(error), allow_retries=False) from error
        if snapshot.source != "postgres":
            context.log.warning(f"enriching with the {snapshot.source}, version {snapshot.version}")
        snapshots[lookup.name] = snapshot
    unmatched = {"unmatched": 0, "dropped": 0}
    dead_letters: list[tuple[OffsetRange, pl.DataFrame]] = []

    def enrich_window(window: OffsetRange, events: pl.DataFrame) -> pl.DataFrame:
        for lookup in declared.enrich:
            snapshot = snapshots[lookup.name]
            enriched = enrich.enrich_events(events, snapshot, lookup)
            events = enriched.events
            unmatched["unmatched"] += enriched.unmatched.height
            if lookup.missing == "drop":
                unmatched["dropped"] += enriched.unmatched.height
            elif lookup.missing == "dead_letter" and enriched.unmatched.height:
                reason = enrich.unmatched_reason(lookup, snapshot.version)
                rows = enriched.unmatched.select("kafka_offset", reason.alias("reason"))
                assert batch.raw is not None
                dead_letters.append((window, _raw_dead_letters(batch.raw.window(window), rows, pl.col("reason"))))
        return events

    events = batch.events.map(batch.store, "enriched", enrich_window)
    versions = {name: {"version": s.version, "source": s.source} for name, s in snapshots.items()}
    out = batch.advance(
        "enrich",
        started,
        events,
        dead_letters=batch.with_dead_letters(Windows.write(batch.store, "unmatched", dead_letters)),
        counts=unmatched,
        facts={**batch.facts, "snapshots": versions},
    )
    _output_metadata(
        context,
        out,
        "enrich",
        unmatched=unmatched["unmatched"],
        **{f"snapshot_version_{name}": s["version"] for name, s in versions.items()},
    )
    batch.release(out)
    return out


@dg.op(description="Drop events from the configured networks or matching the configured SQL conditions.")
def filter_events(context: dg.OpExecutionContext, batch: Batch, pipeline: PipelineResource) -> Batch:
    started = time.perf_counter()
    rules = pipeline.pipeline.filter
    kept = batch.events.map(
        batch.store, "filtered", lambda _, events: events.filter(~filtering.dropped_mask(events, rules))
    )
    out = batch.advance("filter", started, kept, counts={"filtered": batch.events.height - kept.height})
    _output_metadata(context, out, "filter", filtered=out.counts["filtered"])
    batch.release(out)
    return out


@dg.op(description="Computed columns, the python step if any, and rows shaped for the sink table.")
def transform_events(context: dg.OpExecutionContext, batch: Batch, pipeline: PipelineResource) -> Batch:
    started = time.perf_counter()
    declared, columns = pipeline.pipeline, pipeline.columns
    processed_at = datetime.now(UTC)  # one moment for the whole range
    rejected: list[tuple[OffsetRange, pl.DataFrame]] = []
    dropped_by_python = 0

    def shape_window(window: OffsetRange, events: pl.DataFrame) -> pl.DataFrame:
        nonlocal dropped_by_python
        try:
            shaped = transform.to_sink_rows(events, declared, columns, processed_at)
        except transform.PythonStepError as error:
            raise dg.Failure(str(error), allow_retries=False) from error
        if shaped.rejected.height:
            assert batch.raw is not None
            reasons = shaped.rejected.drop("kafka_partition")
            rejected.append((window, _raw_dead_letters(batch.raw.window(window), reasons, pl.col("error"))))
        dropped_by_python += shaped.dropped_by_python
        return shaped.rows

    rows = batch.events.map(batch.store, "rows", shape_window)
    out = batch.advance(
        "transform",
        started,
        rows,
        raw=None,  # no later stage dead-letters
        dead_letters=batch.with_dead_letters(Windows.write(batch.store, "rejected", rejected)),
        counts={"filtered": batch.counts["filtered"] + dropped_by_python},
    )
    _output_metadata(context, out, "transform", rejected=sum(frame.height for _, frame in rejected))
    batch.release(out)
    return out


@dg.op(description="Partial aggregates of this range per window and group, for each declared aggregate.")
def aggregate_windows(context: dg.OpExecutionContext, batch: Batch, pipeline: PipelineResource) -> Batch:
    started = time.perf_counter()
    per_window: dict[str, list[pl.DataFrame]] = {c.aggregate.partials: [] for c in pipeline.columns.aggregates}
    for _, rows in batch.events:
        for columns in pipeline.columns.aggregates:
            per_window[columns.aggregate.partials].append(aggregate.window_partials(rows, columns, batch.offset_range))
    partials: dict[str, pl.DataFrame] = {}
    windows: dict[str, list[str]] = {}
    for columns in pipeline.columns.aggregates:
        frame = aggregate.merged_partials(per_window[columns.aggregate.partials], columns)
        partials[columns.aggregate.partials] = frame
        touched = aggregate.windows_touched(frame, columns.window_column)
        if touched is not None:
            windows[columns.aggregate.name] = list(touched)
    out = batch.advance(
        "aggregate", started, batch.events, partials=partials, facts={**batch.facts, "windows": windows}
    )
    _output_metadata(context, out, "aggregate", windows=sum(frame.height for frame in partials.values()))
    return out


@dg.op(
    description="Insert the sink rows, dead letters and partial aggregates into ClickHouse, idempotently.",
    retry_policy=DEPENDENCY_RETRY,
)
def load(
    context: dg.OpExecutionContext, batch: Batch, warehouse: WarehouseResource, pipeline: PipelineResource
) -> Batch:
    started = time.perf_counter()
    declared = pipeline.pipeline
    r = batch.offset_range
    failed_at = datetime.now(UTC)

    def windows() -> Iterator[loading.WindowRows]:
        for window, rows in batch.events:
            parts = [frames.window(window) for frames in batch.dead_letters]
            dead_letters = (
                pl.concat(parts).sort("kafka_offset") if parts else pl.DataFrame(schema=decode.DEAD_LETTER_SCHEMA)
            )
            dead_letter_rows = dead_letters.select(
                pl.lit(r.topic).alias("kafka_topic"),
                "kafka_partition",
                "kafka_offset",
                "raw_value",
                "error",
                pl.lit(failed_at).cast(pl.Datetime("ms", "UTC")).alias("failed_at"),
            )
            yield loading.WindowRows(window, rows, dead_letter_rows)

    tables = loading.RangeTables(declared.sink.table, declared.sink.dead_letters, windows, batch.partials)
    # A forced reload is one replacement per attempt: a retried attempt deletes and inserts again.
    force_token = f"force-{context.run_id}-{context.retry_number}" if batch.force else None
    with warehouse.session() as client:
        warehouse.ensure_tables(client, declared)
        failpoint("during_load")
        loaded = loading.load_range(client, warehouse.database, r, tables, force_token)
        failpoint("after_load")
    sizes = {t.table: t.rows for t in loaded}
    out = batch.advance(
        "load",
        started,
        Windows([], batch.store),
        tables=loaded,
        counts={"loaded": batch.events.height, "dead_lettered": sizes.get(declared.sink.dead_letters, 0)},
        partials={},
        dead_letters=(),
    )
    context.add_output_metadata(
        {f"{t.table}_rows": t.rows for t in loaded}
        | {
            "already_present": ", ".join(t.table for t in loaded if not t.inserted and t.rows) or "none",
            "seconds": round(out.seconds["load"], 4),
        }
    )
    batch.release(out)
    return out


@dg.op(
    description="Record offsets, counts per stage and the snapshot versions; commit the group offset.",
    retry_policy=DEPENDENCY_RETRY,
)
def commit(
    context: dg.OpExecutionContext, batch: Batch, kafka: KafkaResource, pipeline: PipelineResource
) -> dict[str, int]:
    failpoint("before_commit")
    started = time.perf_counter()
    declared = pipeline.pipeline
    r = batch.offset_range
    kafka.reader(declared.consumer_group).commit_group_offset(r)
    counts = {name: batch.counts.get(name, 0) for name in tags.COUNTS}
    seconds = {**batch.seconds, "commit": time.perf_counter() - started}
    snapshots: dict[str, dict[str, str]] = batch.facts.get("snapshots", {})  # type: ignore[assignment]
    windows: dict[str, list[str]] = batch.facts.get("windows", {})  # type: ignore[assignment]
    metadata: dict[str, object] = {
        "pipeline": declared.name,
        "topic": r.topic,
        "partition": r.partition,
        "start": r.start,
        "end": r.end,
        **{f"count_{name}": value for name, value in counts.items()},
        "snapshot_version": ";".join(s["version"] for s in snapshots.values()),
        "snapshot_source": ";".join(s["source"] for s in snapshots.values()),
        "snapshots": dg.MetadataValue.json(snapshots),
        "seconds_per_stage": dg.MetadataValue.json({k: round(v, 4) for k, v in seconds.items()}),
        "windows_touched": dg.MetadataValue.json(windows),
    }
    where = f"offsets [{r.start}, {r.end}) of {r.tp}"
    materializations = [
        (["kafka", r.topic], {"partition": r.partition, "end": r.end, "read": counts["read"]}),
        (
            ["clickhouse", declared.sink.table],
            {
                "loaded": counts["loaded"],
                "duplicates": counts["duplicates"],
                "filtered": counts["filtered"],
                "unmatched": counts["unmatched"],
                "partition": r.partition,
                "end": r.end,
            },
        ),
        (
            ["clickhouse", declared.sink.dead_letters],
            {"dead_lettered": counts["dead_lettered"], "partition": r.partition},
        ),
    ]
    for aggregate_spec in declared.aggregate:
        touched = windows.get(aggregate_spec.name)
        for view in aggregate_spec.windows.values():
            materializations.append(
                (["clickhouse", view], {"windows_touched": 1 if touched else 0, "partition": r.partition})
            )
    for asset_key, asset_metadata in materializations:
        context.log_event(dg.AssetMaterialization(asset_key=asset_key, metadata=asset_metadata, description=where))
    context.add_output_metadata(metadata)
    # Counts as run tags too: the runs list shows them and tools filter on them.
    run_tags = tags.count_tags(counts) | {f"{tags.WINDOWS_PREFIX}{name}": ",".join(w) for name, w in windows.items()}
    context.instance.add_run_tags(context.run_id, run_tags)
    context.log.info(f"committed {declared.name} {r.label}: {counts}")
    failpoint("after_commit")
    return counts


class BackfillRequestConfig(dg.Config):
    """An offset range to re-process; validated against the watermarks and split into bounded runs."""

    pipeline: str = Field(description="Pipeline whose range is processed again")
    partition: int = Field(ge=0, description="Kafka partition of the pipeline's topic")
    start: int = Field(ge=0, description="First offset (inclusive), at or above the low watermark")
    end: int = Field(gt=0, description="End offset (exclusive), at most the high watermark")
    force: bool = Field(default=False, description="Replace the range's rows and aggregate contributions")


@dg.op(description="Validate a backfill request and plan its bounded runs; the backfill sensor submits them.")
def plan_backfill_runs(
    context: dg.OpExecutionContext,
    config: BackfillRequestConfig,
    kafka: KafkaResource,
    pipeline_topics: PipelineTopics,
    limits: RunLimits,
) -> dict[str, object]:
    if config.pipeline not in pipeline_topics.jobs:
        known = ", ".join(sorted(pipeline_topics.jobs))
        raise dg.Failure(f"no pipeline {config.pipeline} (pipelines: {known})", allow_retries=False)
    topic, job_name = pipeline_topics.topics[config.pipeline], pipeline_topics.jobs[config.pipeline]
    plan = plan_backfill(
        topic,
        config.partition,
        config.start,
        config.end,
        config.force,
        kafka.reader().watermarks(topic),
        committed_ranges(context.instance, job_name, topic, config.partition),
        limits.max_records_per_run,
        backfill_id=context.run_id[:12],
    )
    summary = {
        "backfill_id": plan.backfill_id,
        "pipeline": config.pipeline,
        "topic": topic,
        "partition": config.partition,
        "force": config.force,
        "ranges": [[r.start, r.end] for r in plan.ranges],
    }
    context.instance.add_run_tags(context.run_id, {tags.BACKFILL_PLAN: json.dumps(summary, separators=(",", ":"))})
    context.add_output_metadata({"runs_planned": len(plan.ranges), "plan": dg.MetadataValue.json(summary)})
    return summary
