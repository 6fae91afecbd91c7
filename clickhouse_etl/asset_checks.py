"""Asset checks: offsets contiguous per partition, and stats equal to the aggregation over enriched clicks."""

from datetime import UTC, datetime, timedelta

import dagster as dg

from clickhouse_etl import schemas
from clickhouse_etl.checks import compare_window_stats
from clickhouse_etl.jobs import INGEST_JOB_NAME
from clickhouse_etl.ledger import read_ledger
from clickhouse_etl.offsets import partition_offsets
from clickhouse_etl.ops import STATS_CHECK_NAME
from clickhouse_etl.resources import ClickHouseWarehouse, IngestRules, KafkaSource
from clickhouse_etl.settings import Settings

OFFSETS_CHECK_NAME = "offsets_contiguous"
RECENT = timedelta(days=1)


def windows_touched(instance: dg.DagsterInstance, within: timedelta) -> tuple[datetime | None, datetime | None]:
    """First and last window touched by the ingest runs that succeeded within `within` (from their tags)."""
    records = instance.get_run_records(
        filters=dg.RunsFilter(
            job_name=INGEST_JOB_NAME,
            statuses=[dg.DagsterRunStatus.SUCCESS],
            updated_after=datetime.now(UTC) - within,
        )
    )
    firsts = [r.dagster_run.tags.get("etl/first_window") for r in records]
    lasts = [r.dagster_run.tags.get("etl/last_window") for r in records]
    first = min((datetime.fromisoformat(t) for t in firsts if t), default=None)
    last = max((datetime.fromisoformat(t) for t in lasts if t), default=None)
    return first, last


def build_asset_checks(settings: Settings) -> list[dg.AssetChecksDefinition]:
    topic = settings.topic
    view = schemas.MINUTE_STATS_VIEW if settings.aggregation_window == "minute" else schemas.HOUR_STATS_VIEW

    @dg.asset_check(
        asset=dg.AssetKey(["kafka", topic]),
        name=OFFSETS_CHECK_NAME,
        description="Committed ranges of every partition have no gaps and no overlaps.",
    )
    def offsets_contiguous(context: dg.AssetCheckExecutionContext, kafka: KafkaSource) -> dg.AssetCheckResult:
        report = partition_offsets(kafka.watermarks(topic), read_ledger(context.instance, topic))
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

    @dg.asset_check(
        asset=dg.AssetKey(["clickhouse", view]),
        name=STATS_CHECK_NAME,
        description=f"{view} equals count() and uniqExact(user_id) over ad_clicks_enriched, window by window, "
        "for the windows the ingest runs of the last day touched.",
    )
    def stats_match_enriched(
        context: dg.AssetCheckExecutionContext, warehouse: ClickHouseWarehouse, rules: IngestRules
    ) -> dg.AssetCheckResult:
        first, last = windows_touched(context.instance, RECENT)
        if first is None or last is None:
            return dg.AssetCheckResult(passed=True, metadata={"windows_compared": 0, "note": "no recent runs"})
        with warehouse.session() as client:
            check = compare_window_stats(client, warehouse.database, rules.aggregation_window, first, last)  # type: ignore[arg-type]
        return dg.AssetCheckResult(
            passed=check.passed,
            metadata={
                "windows_compared": check.windows_compared,
                "first_window": str(first),
                "last_window": str(last),
                "mismatches": dg.MetadataValue.json(check.mismatches[:20]),
            },
        )

    return [offsets_contiguous, stats_match_enriched]
