"""Shared test set-up: a clean environment, so the developer's own connection variables never leak in."""

import os

for variable in ("KAFKA_BOOTSTRAP_SERVERS", "REDIS_URL", "POSTGRES_DSN", "CLICKHOUSE_DSN", "DAGSTER_HOME"):
    os.environ.pop(variable, None)
for variable in [name for name in os.environ if name.startswith("CLICKHOUSE_ETL_")]:
    os.environ.pop(variable)
