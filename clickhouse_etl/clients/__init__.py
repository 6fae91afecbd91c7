"""Clients of the real services — Kafka, Redis claims, PostgreSQL snapshots, ClickHouse — without Dagster."""
