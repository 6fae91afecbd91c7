# Image of clickhouse-etl for the Dagster webserver, the daemon and the run workers (docker-compose.yml,
# deploy/kubernetes/). Not built by the project's tests, which need no Docker engine.
FROM python:3.11-slim

# clickhouse-etl brings what the production instance (deploy/dagster.production.yaml) loads: dagster-postgres
# (storage) and dagster-celery (the run workers), pinned in pyproject.toml to the one Dagster release they
# require (dagster 1.13.27 with 0.29.27). Extra packages go in here, in the same release: for runs as
# Kubernetes Jobs instead of workers, --build-arg EXTRA_PACKAGES=dagster-k8s==0.29.27.
ARG EXTRA_PACKAGES=""

WORKDIR /opt/clickhouse-etl
COPY pyproject.toml README.md workspace.yaml ./
COPY clickhouse_etl ./clickhouse_etl
RUN pip install --no-cache-dir . ${EXTRA_PACKAGES}

# DAGSTER_HOME is set explicitly, so the command line never replaces the dagster.yaml mounted there.
ENV DAGSTER_HOME=/opt/dagster/dagster_home \
    CLICKHOUSE_ETL_DATA_DIR=/var/lib/clickhouse-etl \
    CLICKHOUSE_ETL_CACHE_DIR=/var/lib/clickhouse-etl/cache
RUN useradd --system --uid 10001 --home-dir /var/lib/clickhouse-etl dagster \
    && mkdir -p "$DAGSTER_HOME" "$CLICKHOUSE_ETL_DATA_DIR" \
    && chown dagster "$DAGSTER_HOME" "$CLICKHOUSE_ETL_DATA_DIR"
USER dagster

# The webserver by default; the daemon is `clickhouse-etl daemon`, a run worker `clickhouse-etl worker`.
EXPOSE 3000
CMD ["dagster-webserver", "-h", "0.0.0.0", "-p", "3000", "-w", "/opt/clickhouse-etl/workspace.yaml"]
