#!/usr/bin/env bash
# The main job: installs, starts the local stack, seeds the demo lookup rows, runs a steady producer per
# packaged pipeline (ad clicks and API usage), and starts Dagster (UI on http://127.0.0.1:3000) with their
# sensors on. Ctrl-C stops Dagster and the producers; `clickhouse-etl stack down` stops the services.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/install.sh
export CLICKHOUSE_ETL_DATA_DIR="${CLICKHOUSE_ETL_DATA_DIR:-$PWD/.data}"
export CLICKHOUSE_ETL_PIPELINES="${CLICKHOUSE_ETL_PIPELINES:-ad_clicks,api_usage}"
clickhouse-etl stack up
clickhouse-etl seed
mkdir -p "$CLICKHOUSE_ETL_DATA_DIR"
producers=()
trap 'kill "${producers[@]}" 2>/dev/null || true' EXIT
for pipeline in ad_clicks api_usage; do
  clickhouse-etl produce --pipeline "$pipeline" --rate "${DEMO_EVENTS_PER_SECOND:-2000}" \
    --duration "${DEMO_SECONDS:-86400}" >"$CLICKHOUSE_ETL_DATA_DIR/producer-$pipeline.log" 2>&1 &
  producers+=($!)
  echo "producer of $pipeline: ${DEMO_EVENTS_PER_SECOND:-2000} events/s (log: $CLICKHOUSE_ETL_DATA_DIR/producer-$pipeline.log)"
done
echo "try: clickhouse-etl query 'SELECT * FROM analytics.campaign_minute_stats ORDER BY minute DESC LIMIT 10'"
echo "     clickhouse-etl query 'SELECT * FROM analytics.customer_usage_minute ORDER BY minute DESC LIMIT 10'"
clickhouse-etl dev
