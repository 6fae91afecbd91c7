"""The local-stack and benchmark commands of `clickhouse-etl`: stack, seed, produce, bench, freshness, soak."""

from __future__ import annotations

import argparse
import sys

from clickhouse_etl.core.settings import Settings
from clickhouse_etl.dev.datasets import DATASETS, SHARE_FLAGS, dataset_for
from clickhouse_etl.tools.commands import (
    UsageError,
    add_pipeline_options,
    chosen_pipelines,
    ensure_pipeline_tables,
    run_workers_line,
)

# As for the production commands: the stack, the producer and the benchmarks are imported when they run.


def _stack(settings: Settings, args: argparse.Namespace) -> int:
    from clickhouse_etl.dev import stack

    if args.action == "up":
        stack.stack_up(settings)
    elif args.action == "down":
        stack.stack_down(settings)
    else:
        statuses = stack.stack_status(settings)
        for status in statuses:
            answer = "answering" if status.answers else "NOT answering"
            print(f"{status.name:<10} {status.address:<45} {answer:<14} {status.detail}")
        if all(status.answers for status in statuses):
            print(run_workers_line(settings))
        return 0 if all(status.answers for status in statuses) else 1
    return 0


def _seed(settings: Settings, args: argparse.Namespace) -> int:
    pipelines = [p for p in chosen_pipelines(settings, args) if p.name in DATASETS]
    if not pipelines:
        raise UsageError(f"no configured pipeline has demo data; demo data exists for {', '.join(DATASETS)}")
    for pipeline in pipelines:
        dataset = DATASETS[pipeline.name]
        rows = dataset.seed_lookup_table(settings, args.rows or dataset.lookup_rows)
        print(f"seeded {rows} rows into PostgreSQL table {dataset.lookup_table} (pipeline {pipeline.name})")
    return 0


def _produce(settings: Settings, args: argparse.Namespace) -> int:
    from clickhouse_etl.dev.producing import produce_count, produce_steady

    [pipeline] = chosen_pipelines(settings, args, one=True)
    dataset = dataset_for(pipeline.name)
    known = dataset.share_flags()
    given = {flag: getattr(args, flag.replace("-", "_")) for flag in SHARE_FLAGS.values()}
    wrong = [f"--{flag}" for flag, value in given.items() if value is not None and flag not in known]
    if wrong:
        raise UsageError(
            f"{', '.join(wrong)} do(es) not apply to {pipeline.name}; its shares: "
            + ", ".join(f"--{flag}" for flag in known)
        )
    shares = dataset.shares_type(
        **{field: given[flag] for flag, (field, _) in known.items() if given[flag] is not None}
    )
    generate = dataset.make_generator(shares, args.rows or dataset.lookup_rows)
    if args.rate:
        report = produce_steady(settings, pipeline.topic, args.rate, args.duration, generate, args.partitions)
    else:
        report = produce_count(settings, pipeline.topic, args.count, generate, args.partitions, args.seed)
    print(report.describe())
    return 0


def _bench(settings: Settings, args: argparse.Namespace) -> int:
    from clickhouse_etl.dev.bench import BenchError, print_result, run_bench

    [pipeline] = chosen_pipelines(settings, args, one=True)
    for option, value in (("--prefill-rows", args.prefill_rows), ("--prefill-claims", args.prefill_claims)):
        if value < 0:
            raise UsageError(f"{option} must be 0 or more, not {value}")
    if args.prefill_claims and pipeline.dedup is None:
        raise UsageError(f"--prefill-claims: pipeline {pipeline.name} has no dedup section, so it makes no claims")
    ensure_pipeline_tables(settings, [pipeline])
    say = (lambda _: None) if args.json else print
    try:
        result = run_bench(
            settings,
            pipeline,
            args.events,
            args.partitions,
            args.baseline_events,
            say,
            pass_through=args.pass_through,
            prefill_rows=args.prefill_rows,
            prefill_claim_count=args.prefill_claims,
        )
    except BenchError as error:
        print(f"clickhouse-etl bench: {error}", file=sys.stderr)
        return 1
    print_result(result, args.json)
    return 0


def _live(settings: Settings, args: argparse.Namespace) -> int:
    """freshness and soak: the same steady load through the sensor; soak also requires flat memory."""
    from clickhouse_etl.dev.bench import BenchError
    from clickhouse_etl.dev.live import print_report, run_live

    [pipeline] = chosen_pipelines(settings, args, one=True)
    ensure_pipeline_tables(settings, [pipeline])
    seconds = args.minutes * 60 if args.command == "soak" else args.seconds
    say = (lambda _: None) if args.json else print
    try:
        report = run_live(settings, pipeline, args.rate, seconds, args.warmup, say=say)
    except BenchError as error:
        print(f"clickhouse-etl {args.command}: {error}", file=sys.stderr)
        return 1
    print_report(report, args.json)
    healthy = report.counts_match and (args.command != "soak" or report.memory_flat())
    return 0 if healthy else 1


def add_commands(commands: argparse._SubParsersAction) -> None:
    stack_parser = commands.add_parser("stack", help="start, stop or check the local services")
    stack_parser.add_argument("action", choices=["up", "down", "status"])
    stack_parser.set_defaults(handler=_stack)

    seed = commands.add_parser("seed", help="load the demo lookup rows (campaigns, customers) into PostgreSQL")
    seed.add_argument("--pipeline", help="pipeline name (default: every configured pipeline with demo data)")
    seed.add_argument("--rows", "--campaigns", type=int, help="rows to write (default: the pipeline's demo size)")
    seed.set_defaults(handler=_seed)

    produce = commands.add_parser("produce", help="write realistic demo events of a pipeline to its topic")
    add_pipeline_options(produce, one=True)
    produce.add_argument("--count", type=int, default=100_000, help="events to produce (default 100000)")
    produce.add_argument("--rate", type=float, help="produce at this many events/s instead of a count")
    produce.add_argument("--duration", type=float, default=60.0, help="seconds to produce at --rate")
    produce.add_argument("--partitions", type=int, nargs="*", help="partitions to write (default: all)")
    produce.add_argument("--rows", "--campaigns", type=int, help="lookup keys 1..N are known (as seeded)")
    produce.add_argument("--seed", type=int, help="random seed for reproducible data")
    for name, flag in SHARE_FLAGS.items():
        defaults = {
            f"{pipeline}: {shares}"
            for pipeline, dataset in DATASETS.items()
            for f, (field, shares) in dataset.share_flags().items()
            if field == name
        }
        produce.add_argument(
            f"--{flag}", type=float, metavar="SHARE", help=f"share of events (default {', '.join(sorted(defaults))})"
        )
    produce.set_defaults(handler=_produce)

    bench = commands.add_parser("bench", help="end-to-end throughput against the local stack, and a naive baseline")
    add_pipeline_options(bench, one=True)
    bench.add_argument("--events", type=int, default=1_000_000)
    bench.add_argument("--partitions", type=int, default=3)
    bench.add_argument("--baseline-events", type=int, default=30_000, help="0 skips the naive baseline")
    bench.add_argument(
        "--pass-through",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also time a raw pass-through of the same topic (consume, NDJSON, JSONEachRow insert; default on)",
    )
    bench.add_argument(
        "--prefill-rows",
        type=int,
        default=0,
        metavar="N",
        help="first load N rows of demo data into the pipeline's tables, as a long-lived store holds (default 0)",
    )
    bench.add_argument(
        "--prefill-claims",
        type=int,
        default=0,
        metavar="N",
        help="first make N claims one dedup TTL old, so claims cost what they do after a deployment's first TTL",
    )
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
        live.add_argument("--pipeline", help="pipeline name (when more than one is configured)")
        live.add_argument("--rate", type=float, default=20_000.0, help="events/s to produce (default 20000)")
        live.add_argument("--warmup", type=float, default=20.0, help="seconds left out of the latencies (default 20)")
        live.add_argument("--json", action="store_true", help="print one JSON object")
        live.set_defaults(handler=_live)
