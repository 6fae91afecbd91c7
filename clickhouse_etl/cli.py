"""The `clickhouse-etl` command: the production commands (clickhouse_etl.tools) and the local-stack and
benchmark commands (clickhouse_etl.dev), under one name. Only this entry point sees both."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from clickhouse_etl.core.collector import freeze_startup_objects, start_up_without_collections

# The commands' modules (Dagster, polars and the pipelines among them) are imported in the functions below,
# once main has turned the cyclic collector off: a catch-up process's imports took 0.81-0.87 CPU-s when this
# module imported them with the collector on, 0.76-0.82 now. A spawned catch-up worker runs this module again as
# its main module before its own start-up, and imports nothing here.


def build_parser() -> argparse.ArgumentParser:
    from clickhouse_etl.dev import commands as dev_commands
    from clickhouse_etl.tools import commands as tool_commands

    parser = argparse.ArgumentParser(
        prog="clickhouse-etl",
        description="Exactly-once, replayable micro-batch ETL from Kafka into ClickHouse, orchestrated by Dagster.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    tool_commands.add_commands(commands)
    dev_commands.add_commands(commands)
    return parser


def _expected_errors() -> tuple[type[BaseException], ...]:
    from clickhouse_connect.driver.exceptions import ClickHouseError
    from confluent_kafka import KafkaException

    from clickhouse_etl.clients.clickhouse import ClickHouseUnavailable
    from clickhouse_etl.core.pipeline.ddl import SchemaChangeRefused
    from clickhouse_etl.dev.stack import StackError

    return (StackError, ClickHouseUnavailable, ClickHouseError, KafkaException, SchemaChangeRefused)


def main(argv: list[str] | None = None) -> int:
    # Start-up without cyclic collections (clickhouse_etl.core.collector), frozen once the command has started
    # or, for a command whose start-up goes on, by the command itself.
    start_up_without_collections()
    from clickhouse_etl.core.pipeline.loading import PipelineError
    from clickhouse_etl.core.settings import Settings, SettingsError, load_settings
    from clickhouse_etl.tools.commands import UsageError

    args = build_parser().parse_args(argv)
    if not getattr(args, "freezes_startup_objects", False):
        freeze_startup_objects()
    try:
        settings = load_settings()
    except SettingsError as error:
        print(f"clickhouse-etl: {error}", file=sys.stderr)
        return 2
    handler: Callable[[Settings, argparse.Namespace], int] = args.handler
    try:
        return handler(settings, args)
    except (SettingsError, PipelineError, UsageError) as error:
        print(f"clickhouse-etl {args.command}: {error}", file=sys.stderr)
        return 2
    except Exception as error:  # known failures get a clear message, not a traceback
        if isinstance(error, _expected_errors()):
            print(f"clickhouse-etl {args.command}: {error}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
