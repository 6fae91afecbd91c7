"""clickhouse-etl: exactly-once, replayable micro-batch ETL from Kafka into ClickHouse, run by Dagster."""

__version__ = "0.1.0"
