"""Asset checks per pipeline: its committed offsets are contiguous, and every aggregate view equals the same
aggregation computed over the sink table."""

from datetime import UTC, datetime, timedelta

import dagster as dg

from clickhouse_etl.core.offsets import partition_offsets
from clickhouse_etl.core.pipeline.columns import AggregateColumns, columns_of
from clickhouse_etl.core.pipeline.model import Pipeline
from clickhouse_etl.orchestration import tags
from clickhouse_etl.orchestration.resources import KafkaResource, WarehouseResource
from clickhouse_etl.orchestration.run_records import read_ledger
from clickhouse_etl.steps.verify import compare_view

OFFSETS_CHECK_NAME = "offsets_contiguous"
AGGREGATE_CHECK_NAME = "matches_sink_table"
RECENT = timedelta(days=1)


def windows_touched(
    instance: dg.DagsterInstance, job_name: str, aggregate: str, within: timedelta
) -> tuple[datetime | None, datetime | None]:
    """First and last window of `aggregate` touched by the job's runs that succeeded within `within`."""
    records = instance.get_run_records(
        filters=dg.RunsFilter(
            job_name=job_name, statuses=[dg.DagsterRunStatus.SUCCESS], updated_after=datetime.now(UTC) - within
        )
    )
    bounds = [r.dagster_run.tags.get(f"{tags.WINDOWS_PREFIX}{aggregate}") for r in records]
    pairs = [[datetime.fromisoformat(t) for t in b.split(",")] for b in bounds if b]
    if not pairs:
        return None, None
    return min(first for first, _ in pairs), max(last for _, last in pairs)


def _aggregate_check(pipeline: Pipeline, columns: AggregateColumns, window: str, view: str) -> dg.AssetChecksDefinition:
    @dg.asset_check(
        asset=dg.AssetKey(["clickhouse", view]),
        name=AGGREGATE_CHECK_NAME,
        description=f"{view} equals the same aggregation computed directly over {pipeline.sink.table}, window by "
        f"window, for the windows the {pipeline.job_name} runs of the last day touched.",
    )
    def aggregate_matches(context: dg.AssetCheckExecutionContext, warehouse: WarehouseResource) -> dg.AssetCheckResult:
        first, last = windows_touched(context.instance, pipeline.job_name, columns.aggregate.name, RECENT)
        if first is None or last is None:
            return dg.AssetCheckResult(passed=True, metadata={"windows_compared": 0, "note": "no recent runs"})
        with warehouse.session() as client:
            check = compare_view(client, warehouse.database, pipeline.sink.table, columns, window, first, last)
        return dg.AssetCheckResult(
            passed=check.passed,
            metadata={
                "windows_compared": check.windows_compared,
                "first_window": str(first),
                "last_window": str(last),
                "mismatches": dg.MetadataValue.json(check.mismatches[:20]),
            },
        )

    return aggregate_matches


def build_asset_checks(pipeline: Pipeline) -> list[dg.AssetChecksDefinition]:
    topic, job_name = pipeline.topic, pipeline.job_name

    @dg.asset_check(
        asset=dg.AssetKey(["clickhouse", pipeline.sink.table]),
        name=OFFSETS_CHECK_NAME,
        description=f"The ranges of topic {topic} committed by {job_name} have no gaps and no overlaps, per partition.",
    )
    def offsets_contiguous(context: dg.AssetCheckExecutionContext, kafka: KafkaResource) -> dg.AssetCheckResult:
        report = partition_offsets(kafka.reader().watermarks(topic), read_ledger(context.instance, job_name, topic))
        problems = {
            str(p.partition): {"gaps": p.gaps, "overlaps": [[a.label, b.label] for a, b in p.overlaps]}
            for p in report
            if not p.healthy
        }
        return dg.AssetCheckResult(
            passed=not problems,
            metadata={
                "lag": dg.MetadataValue.json({str(p.partition): p.lag for p in report}),
                "problems": dg.MetadataValue.json(problems),
            },
        )

    checks = [offsets_contiguous]
    for columns in columns_of(pipeline).aggregates:
        for window, view in columns.aggregate.windows.items():
            checks.append(_aggregate_check(pipeline, columns, window, view))
    return checks
