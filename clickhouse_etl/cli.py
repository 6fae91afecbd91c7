"""The `clickhouse-etl` command line."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING

from clickhouse_etl.settings import Settings, SettingsError, load_settings, workspace_file

if TYPE_CHECKING:
    from dagster import DagsterInstance

    from clickhouse_etl.offsets import PartitionOffsets


def _stack(settings: Settings, args: argparse.Namespace) -> int:
    from clickhouse_etl import stack

    if args.action == "up":
        stack.stack_up(settings)
    elif args.action == "down":
        stack.stack_down(settings)
    else:
        statuses = stack.stack_status(settings)
        for status in statuses:
            answer = "answering" if status.answers else "NOT answering"
            print(f"{status.name:<10} {status.address:<45} {answer:<14} {status.detail}")
        return 0 if all(status.answers for status in statuses) else 1
    return 0


def _seed(settings: Settings, args: argparse.Namespace) -> int:
    from clickhouse_etl import demo_data

    count = demo_data.seed_campaigns(settings, args.campaigns)
    print(f"seeded {count} campaigns into PostgreSQL table campaigns")
    return 0


def _produce(settings: Settings, args: argparse.Namespace) -> int:
    from clickhouse_etl import demo_data

    shares = demo_data.EventShares(
        duplicate=args.duplicates,
        duplicate_other_partition=args.duplicates_other_partition,
        bot=args.bots,
        unknown_ad=args.unknown_ads,
        malformed=args.malformed,
        late=args.late,
        ipv6=args.ipv6,
        numeric_string=args.numeric_strings,
        extra_field=args.extra_fields,
    )
    topic = args.topic or settings.topic
    if args.rate:
        report = demo_data.produce_steady(
            settings,
            topic,
            rate=args.rate,
            duration=args.duration,
            shares=shares,
            campaigns=args.campaigns,
            partitions=args.partitions,
        )
    else:
        report = demo_data.produce_count(
            settings,
            topic,
            count=args.count,
            shares=shares,
            campaigns=args.campaigns,
            partitions=args.partitions,
            seed=args.seed,
        )
    print(report.describe())
    return 0


def _catch_up(settings: Settings, args: argparse.Namespace) -> int:
    from clickhouse_etl.catchup import CatchUpError, catch_up
    from clickhouse_etl.stack import ensure_schemas

    ensure_schemas(settings)
    topic = args.topic or settings.topic
    with _dagster_instance(settings) as instance:
        try:
            report = catch_up(settings.model_copy(update={"topic": topic}), instance)
        except CatchUpError as error:
            print(f"clickhouse-etl catch-up: {error}", file=sys.stderr)
            return 1
    rate = report.events / report.seconds if report.seconds else 0.0
    print(
        f"caught up: {len(report.ranges)} range(s), {report.events} offsets in {report.seconds:.2f} s "
        f"({rate:,.0f} events/s), {len(report.runs)} run(s) recorded in {settings.dagster_home}"
    )
    return 0


def _backfill(settings: Settings, args: argparse.Namespace) -> int:
    import json
    import subprocess

    import dagster as dg

    from clickhouse_etl.backfill import BackfillError, plan_backfill
    from clickhouse_etl.catchup import CatchUpError, run_ranges
    from clickhouse_etl.definitions import build_definitions
    from clickhouse_etl.jobs import BACKFILL_REQUEST_JOB_NAME, INGEST_JOB_NAME
    from clickhouse_etl.ledger import committed_ranges
    from clickhouse_etl.settings import export_dagster_home

    export_dagster_home(settings)
    topic = args.topic or settings.topic
    if args.no_wait:
        # Hand the request to the Dagster instance: the daemon runs it, and backfill_sensor submits its runs.
        config = {
            "ops": {
                "plan_backfill_runs": {
                    "config": {
                        "topic": topic,
                        "partition": args.partition,
                        "start": args.start,
                        "end": args.end,
                        "force": args.force,
                    }
                }
            }
        }
        command = [
            "dagster",
            "job",
            "launch",
            "-w",
            workspace_file(),
            "-j",
            BACKFILL_REQUEST_JOB_NAME,
            "--config-json",
            json.dumps(config),
        ]
        return subprocess.call(command)
    defs = build_definitions(settings)
    with dg.DagsterInstance.get() as instance, dg.build_resources({"kafka": defs.resources["kafka"]}) as resources:
        committed = committed_ranges(instance, topic, args.partition)
        try:
            watermarks = resources.kafka.watermarks(topic)
            plan = plan_backfill(
                topic,
                args.partition,
                args.start,
                args.end,
                args.force,
                watermarks,
                committed,
                settings.max_records_per_run,
            )
        except BackfillError as error:
            print(f"clickhouse-etl backfill: {error}; nothing was started", file=sys.stderr)
            return 2
        print(
            f"backfill {plan.backfill_id}: [{plan.requested.start}, {plan.requested.end}) of {topic}/{args.partition}"
            f" in {len(plan.ranges)} run(s){' (forced)' if plan.force else ''}"
        )
        try:
            report = run_ranges(defs.get_job_def(INGEST_JOB_NAME), instance, plan.ranges, plan.tags(), plan.force)
        except CatchUpError as error:
            print(f"clickhouse-etl backfill: {error}", file=sys.stderr)
            return 1
    print(
        f"backfill {plan.backfill_id} done: {report.events} offsets in {report.seconds:.2f} s, "
        f"{len(report.runs)} run(s)"
    )
    return 0


def _offsets(settings: Settings, args: argparse.Namespace) -> int:
    from clickhouse_etl.offsets import format_offsets

    topic = args.topic or settings.topic
    with _dagster_instance(settings) as instance:
        report = _offsets_report(settings, topic, instance)
    print(format_offsets(topic, report))
    return 0 if all(p.healthy for p in report) else 1


def _dagster_instance(settings: Settings) -> DagsterInstance:
    import dagster as dg

    from clickhouse_etl.settings import export_dagster_home

    export_dagster_home(settings)
    return dg.DagsterInstance.get()


def _offsets_report(settings: Settings, topic: str, instance: DagsterInstance) -> list[PartitionOffsets]:
    import dagster as dg

    from clickhouse_etl.ledger import read_ledger
    from clickhouse_etl.offsets import partition_offsets
    from clickhouse_etl.resources import resources_from_settings

    with dg.build_resources({"kafka": resources_from_settings(settings)["kafka"]}) as resources:
        return partition_offsets(resources.kafka.watermarks(topic), read_ledger(instance, topic))


def _status(settings: Settings, args: argparse.Namespace) -> int:
    from clickhouse_etl.status import format_status, last_runs, sensor_status

    topic = args.topic or settings.topic
    with _dagster_instance(settings) as instance:
        sensor, runs = sensor_status(instance), last_runs(instance, args.runs)
        offsets = _offsets_report(settings, topic, instance)
    print(format_status(sensor, runs, topic, offsets))
    return 0


def _bench(settings: Settings, args: argparse.Namespace) -> int:
    from clickhouse_etl.bench import BenchError, print_result, run_bench
    from clickhouse_etl.stack import ensure_schemas

    ensure_schemas(settings)
    say = (lambda _: None) if args.json else print
    try:
        result = run_bench(settings, args.events, args.partitions, args.baseline_events, say)
    except BenchError as error:
        print(f"clickhouse-etl bench: {error}", file=sys.stderr)
        return 1
    print_result(result, args.json)
    return 0


def _live(settings: Settings, args: argparse.Namespace) -> int:
    """freshness and soak: the same steady load through the sensor; soak also requires flat memory."""
    from clickhouse_etl.bench import BenchError
    from clickhouse_etl.live import print_report, run_live
    from clickhouse_etl.stack import ensure_schemas

    ensure_schemas(settings)
    seconds = args.minutes * 60 if args.command == "soak" else args.seconds
    say = (lambda _: None) if args.json else print
    try:
        report = run_live(settings, args.rate, seconds, args.warmup, say=say)
    except BenchError as error:
        print(f"clickhouse-etl {args.command}: {error}", file=sys.stderr)
        return 1
    print_report(report, args.json)
    healthy = report.counts_match and (args.command != "soak" or report.memory_flat())
    return 0 if healthy else 1


def _query(settings: Settings, args: argparse.Namespace) -> int:
    from clickhouse_etl.query import format_table, run_query

    columns, rows = run_query(settings, args.sql, writable=args.writable)
    print(format_table(columns, rows))
    return 0


def _dev(settings: Settings, args: argparse.Namespace) -> int:
    import os
    import subprocess

    from clickhouse_etl.settings import export_dagster_home
    from clickhouse_etl.stack import ensure_schemas

    home = export_dagster_home(settings)
    ensure_schemas(settings)
    # Dagster's processes read the same settings: pin the data folder so they find it from any directory.
    os.environ["CLICKHOUSE_ETL_DATA_DIR"] = str(settings.data_dir)
    print(f"Dagster UI on http://{args.host}:{args.port} (DAGSTER_HOME={home}); sensor kafka_offsets_sensor is on")
    command = ["dagster", "dev", "-w", workspace_file(), "-h", args.host, "-p", str(args.port)]
    try:
        return subprocess.call(command)
    except KeyboardInterrupt:
        return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="clickhouse-etl", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    stack = commands.add_parser("stack", help="start, stop or check the local services")
    stack.add_argument("action", choices=["up", "down", "status"])
    stack.set_defaults(handler=_stack)

    seed = commands.add_parser("seed", help="load demo campaigns into PostgreSQL")
    seed.add_argument("--campaigns", type=int, default=100)
    seed.set_defaults(handler=_seed)

    produce = commands.add_parser("produce", help="write realistic ad-click JSON to the topic")
    produce.add_argument("--topic", help="default: the topic setting")
    produce.add_argument("--count", type=int, default=100_000, help="events to produce (default 100000)")
    produce.add_argument("--rate", type=float, help="produce at this many events/s instead of a count")
    produce.add_argument("--duration", type=float, default=60.0, help="seconds to produce at --rate")
    produce.add_argument("--partitions", type=int, nargs="*", help="partitions to write (default: all)")
    produce.add_argument("--campaigns", type=int, default=100, help="ad ids 1..N are known campaigns")
    produce.add_argument("--seed", type=int, help="random seed for reproducible data")
    defaults = _default_shares()
    for flag, share in defaults.items():
        produce.add_argument(
            f"--{flag}", type=float, default=share, metavar="SHARE", help=f"share of events (default {share})"
        )
    produce.set_defaults(handler=_produce)
    catch = commands.add_parser("catch-up", help="process everything available now through the Dagster job")
    catch.add_argument("--topic", help="default: the topic setting")
    catch.set_defaults(handler=_catch_up)

    backfill = commands.add_parser("backfill", help="re-process an exact offset range through the job")
    backfill.add_argument("--topic", help="default: the topic setting")
    backfill.add_argument("--partition", type=int, required=True)
    backfill.add_argument("--start", type=int, required=True, help="first offset (inclusive)")
    backfill.add_argument("--end", type=int, required=True, help="end offset (exclusive)")
    backfill.add_argument("--force", action="store_true", help="replace the range's rows and aggregates")
    backfill.add_argument("--no-wait", action="store_true", help="hand the backfill to the Dagster daemon")
    backfill.set_defaults(handler=_backfill)

    offsets = commands.add_parser("offsets", help="where every partition stands; non-zero on a gap or overlap")
    offsets.add_argument("--topic", help="default: the topic setting")
    offsets.set_defaults(handler=_offsets)

    status = commands.add_parser("status", help="the sensor's state and last tick, the last runs, lag per partition")
    status.add_argument("--topic", help="default: the topic setting")
    status.add_argument("--runs", type=int, default=10, help="how many recent runs to show (default 10)")
    status.set_defaults(handler=_status)

    bench = commands.add_parser("bench", help="end-to-end throughput against the local stack, and a naive baseline")
    bench.add_argument("--events", type=int, default=1_000_000)
    bench.add_argument("--partitions", type=int, default=3)
    bench.add_argument("--baseline-events", type=int, default=30_000, help="0 skips the naive baseline")
    bench.add_argument("--json", action="store_true", help="print one JSON object")
    bench.set_defaults(handler=_bench)

    freshness = commands.add_parser(
        "freshness", help="produce → queryable latency (p50/p95) with the sensor under a steady load"
    )
    freshness.add_argument("--seconds", type=float, default=90.0, help="seconds of steady load (default 90)")
    soak = commands.add_parser(
        "soak", help="a long steady load through the sensor: exact counts and flat memory, or exit 1"
    )
    soak.add_argument("--minutes", type=float, default=10.0, help="minutes of steady load (default 10)")
    for live in (freshness, soak):
        live.add_argument("--rate", type=float, default=20_000.0, help="events/s to produce (default 20000)")
        live.add_argument("--warmup", type=float, default=20.0, help="seconds left out of the latencies (default 20)")
        live.add_argument("--json", action="store_true", help="print one JSON object")
        live.set_defaults(handler=_live)

    dev = commands.add_parser("dev", help="run Dagster (webserver, daemon, sensor) against the settings")
    dev.add_argument("--host", default="127.0.0.1")
    dev.add_argument("--port", type=int, default=3000)
    dev.set_defaults(handler=_dev)

    query = commands.add_parser("query", help="run SQL against ClickHouse and print a table")
    query.add_argument("sql")
    query.add_argument("--writable", action="store_true", help="allow statements that change data")
    query.set_defaults(handler=_query)
    return parser


def _default_shares() -> dict[str, float]:
    from clickhouse_etl.demo_data import EventShares

    defaults = EventShares()
    return {
        "duplicates": defaults.duplicate,
        "duplicates-other-partition": defaults.duplicate_other_partition,
        "bots": defaults.bot,
        "unknown-ads": defaults.unknown_ad,
        "malformed": defaults.malformed,
        "late": defaults.late,
        "ipv6": defaults.ipv6,
        "numeric-strings": defaults.numeric_string,
        "extra-fields": defaults.extra_field,
    }


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = load_settings()
    except SettingsError as error:
        print(f"clickhouse-etl: {error}", file=sys.stderr)
        return 2
    handler: Callable[[Settings, argparse.Namespace], int] = args.handler
    try:
        return handler(settings, args)
    except SettingsError as error:
        print(f"clickhouse-etl: {error}", file=sys.stderr)
        return 2
    except Exception as error:  # known failures get a clear message, not a traceback
        if isinstance(error, _expected_errors()):
            print(f"clickhouse-etl {args.command}: {error}", file=sys.stderr)
            return 1
        raise


def _expected_errors() -> tuple[type[BaseException], ...]:
    from clickhouse_connect.driver.exceptions import ClickHouseError
    from confluent_kafka import KafkaException

    from clickhouse_etl.clickhouse_store import ClickHouseUnavailable
    from clickhouse_etl.stack import StackError

    return (StackError, ClickHouseUnavailable, ClickHouseError, KafkaException)


if __name__ == "__main__":
    sys.exit(main())
