#!/usr/bin/env bash
# The main job: installs, starts the local stack, seeds campaigns, runs a steady producer, and starts
# Dagster (UI on http://127.0.0.1:3000) with the sensor on. Ctrl-C stops Dagster and the producer;
# `clickhouse-etl stack down` stops the services.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/install.sh
export CLICKHOUSE_ETL_DATA_DIR="${CLICKHOUSE_ETL_DATA_DIR:-$PWD/.data}"
clickhouse-etl stack up
clickhouse-etl seed
mkdir -p "$CLICKHOUSE_ETL_DATA_DIR"
clickhouse-etl produce --rate "${DEMO_EVENTS_PER_SECOND:-2000}" --duration "${DEMO_SECONDS:-86400}" \
  >"$CLICKHOUSE_ETL_DATA_DIR/producer.log" 2>&1 &
producer=$!
trap 'kill "$producer" 2>/dev/null || true' EXIT
echo "producer: ${DEMO_EVENTS_PER_SECOND:-2000} events/s (log: $CLICKHOUSE_ETL_DATA_DIR/producer.log)"
echo "try: clickhouse-etl query 'SELECT * FROM analytics.campaign_minute_stats ORDER BY minute DESC LIMIT 10'"
clickhouse-etl dev
