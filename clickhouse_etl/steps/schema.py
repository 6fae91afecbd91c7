"""The pipeline's ClickHouse tables and views, created or brought in line with the pipeline — or refused.

The plan (clickhouse_etl.core.pipeline.ddl) compares what the pipeline declares with what the database
holds; here the database is read and the plan applied. A process applies it once per pipeline version.
"""

from __future__ import annotations

from clickhouse_connect.driver.client import Client

from clickhouse_etl.core.pipeline.columns import columns_of
from clickhouse_etl.core.pipeline.ddl import LOADS, ExistingTable, schema_statements
from clickhouse_etl.core.pipeline.model import Pipeline

_applied: set[tuple[str, str]] = set()


def existing_tables(client: Client, database: str, names: list[str]) -> dict[str, ExistingTable]:
    """The tables and views of `names` that exist, as the system tables describe them."""
    tables = client.query(
        "SELECT name, sorting_key, comment FROM system.tables "
        "WHERE database = {db:String} AND name IN {names:Array(String)}",
        parameters={"db": database, "names": names},
    ).result_rows
    columns = client.query(
        "SELECT table, name, type FROM system.columns WHERE database = {db:String} AND table IN {names:Array(String)} "
        "ORDER BY table, position",
        parameters={"db": database, "names": names},
    ).result_rows
    indexes = client.query(
        "SELECT table, name FROM system.data_skipping_indices WHERE database = {db:String} "
        "AND table IN {names:Array(String)}",
        parameters={"db": database, "names": names},
    ).result_rows
    by_table: dict[str, dict[str, str]] = {}
    for table, name, column_type in columns:
        by_table.setdefault(table, {})[name] = column_type
    return {
        name: ExistingTable(by_table.get(name, {}), sorting_key, comment, frozenset(i for t, i in indexes if t == name))
        for name, sorting_key, comment in tables
    }


def ensure_tables(client: Client, pipeline: Pipeline, database: str, dedup_window: int) -> None:
    """Create or extend the pipeline's tables; raises SchemaChangeRefused for a change that needs a migration."""
    key = (database, pipeline.model_dump_json())
    if key in _applied:
        return
    columns = columns_of(pipeline)
    existing = existing_tables(client, database, [LOADS.name, *pipeline.tables])
    database_exists = (
        client.command("SELECT count() FROM system.databases WHERE name = {db:String}", parameters={"db": database})
        == 1
    )
    for statement in schema_statements(pipeline, columns, database, dedup_window, existing, database_exists):
        client.command(statement)
    _applied.add(key)
