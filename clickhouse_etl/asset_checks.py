"""Asset checks: offsets contiguous per partition, and stats equal to the aggregation over enriched clicks."""

import dagster as dg

from clickhouse_etl import schemas
from clickhouse_etl.checks import compare_window_stats
from clickhouse_etl.ledger import read_ledger
from clickhouse_etl.offsets import partition_offsets
from clickhouse_etl.ops import STATS_CHECK_NAME
from clickhouse_etl.resources import ClickHouseWarehouse, IngestRules, KafkaSource
from clickhouse_etl.settings import Settings

OFFSETS_CHECK_NAME = "offsets_contiguous"


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
        description=f"{view} equals count() and uniqExact(user_id) over ad_clicks_enriched, window by window.",
    )
    def stats_match_enriched(warehouse: ClickHouseWarehouse, rules: IngestRules) -> dg.AssetCheckResult:
        with warehouse.session() as client:
            check = compare_window_stats(client, warehouse.database, rules.aggregation_window)  # type: ignore[arg-type]
        return dg.AssetCheckResult(
            passed=check.passed,
            metadata={
                "windows_compared": check.windows_compared,
                "mismatches": dg.MetadataValue.json(check.mismatches[:20]),
            },
        )

    return [offsets_contiguous, stats_match_enriched]
