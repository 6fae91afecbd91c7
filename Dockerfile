# Image of clickhouse-etl for the Dagster webserver, the daemon and the run workers (docker-compose.yml,
# Kubernetes). Untested here: the project is developed and tested without a Docker engine.
FROM python:3.11-slim

# Dagster's libraries pin the exact core release (dagster 1.13.N needs dagster-postgres / dagster-k8s 0.29.N);
# pip picks the matching pair. dagster-postgres: instance storage; dagster-k8s: the Kubernetes run launcher.
ARG DAGSTER_LIBRARIES="dagster-postgres~=0.29.0 dagster-k8s~=0.29.0"

WORKDIR /opt/clickhouse-etl
COPY pyproject.toml README.md workspace.yaml ./
COPY clickhouse_etl ./clickhouse_etl
RUN pip install --no-cache-dir . ${DAGSTER_LIBRARIES}

# DAGSTER_HOME is set explicitly, so the command line never replaces the dagster.yaml mounted there.
ENV DAGSTER_HOME=/opt/dagster/dagster_home \
    CLICKHOUSE_ETL_DATA_DIR=/var/lib/clickhouse-etl \
    CLICKHOUSE_ETL_CACHE_DIR=/var/lib/clickhouse-etl/cache
RUN useradd --system --uid 10001 --home-dir /var/lib/clickhouse-etl dagster \
    && mkdir -p "$DAGSTER_HOME" "$CLICKHOUSE_ETL_DATA_DIR" \
    && chown dagster "$DAGSTER_HOME" "$CLICKHOUSE_ETL_DATA_DIR"
USER dagster

EXPOSE 3000
CMD ["dagster-webserver", "-h", "0.0.0.0", "-p", "3000", "-w", "/opt/clickhouse-etl/workspace.yaml"]
