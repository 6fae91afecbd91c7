"""The production commands of `clickhouse-etl`: pipelines, catch-up, backfill, offsets, status, query, dev."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from typing import TYPE_CHECKING

from clickhouse_etl.core.pipeline.loading import LoadedPipeline, PipelineError, load_pipelines, packaged_names
from clickhouse_etl.core.pipeline.model import Pipeline
from clickhouse_etl.core.settings import Settings

if TYPE_CHECKING:
    import dagster as dg

    from clickhouse_etl.core.offsets import PartitionOffsets

# Commands import Dagster, the clients and the steps when they run, not when the command line starts:
# `--help` and `pipelines validate` answer at once.


class UsageError(ValueError):
    """A command asked for something that does not exist (exit code 2)."""


# --- what every command shares -----------------------------------------------------------------------------


def configured_pipelines(settings: Settings) -> list[Pipeline]:
    return [loaded.pipeline for loaded in load_pipelines(settings.pipelines)]


def chosen_pipelines(settings: Settings, args: argparse.Namespace, one: bool = False) -> list[Pipeline]:
    """`--pipeline NAME` (and `--topic T` read by it instead); without a name, every configured pipeline,
    or — for commands about one pipeline — the only one configured."""
    pipelines = configured_pipelines(settings)
    name = getattr(args, "pipeline", None)
    if name:
        chosen = [p for p in pipelines if p.name == name]
        if not chosen:
            raise UsageError(f"no pipeline {name}; configured: {', '.join(p.name for p in pipelines)}")
    elif one and len(pipelines) > 1:
        raise UsageError(f"--pipeline is needed: configured pipelines are {', '.join(p.name for p in pipelines)}")
    else:
        chosen = pipelines
    topic = getattr(args, "topic", None)
    return [p.with_topic(topic) for p in chosen] if topic else chosen


def add_pipeline_options(parser: argparse.ArgumentParser, one: bool = False) -> None:
    when = "when more than one is configured" if one else "default: every configured pipeline"
    parser.add_argument("--pipeline", help=f"pipeline name ({when})")
    parser.add_argument("--topic", help="read this topic instead of the pipeline's")


def ensure_pipeline_tables(settings: Settings, pipelines: list[Pipeline]) -> None:
    """Each pipeline's ClickHouse tables, created or extended; a change needing a migration is refused."""
    from clickhouse_etl.clients.clickhouse import clickhouse_session
    from clickhouse_etl.steps.schema import ensure_tables

    with clickhouse_session(settings.clickhouse_dsn, settings.clickhouse_lock_timeout_seconds) as client:
        for pipeline in pipelines:
            ensure_tables(client, pipeline, settings.clickhouse_database, settings.clickhouse_dedup_window)


def dagster_instance(settings: Settings) -> dg.DagsterInstance:
    from clickhouse_etl.orchestration.instance import export_dagster_home, open_instance

    return open_instance(export_dagster_home(settings))


def run_workers_line(settings: Settings) -> str:
    """Who executes runs: the Celery workers answering on the broker (how many, how busy), or a process each."""
    if settings.run_launcher != "celery":
        return "runs: a process each (Dagster's default run launcher)"
    from clickhouse_etl.orchestration.instance import export_dagster_home
    from clickhouse_etl.orchestration.launcher import describe_workers, launcher_app

    export_dagster_home(settings)
    return describe_workers(launcher_app())


def offsets_report(settings: Settings, pipeline: Pipeline, instance: dg.DagsterInstance) -> list[PartitionOffsets]:
    from clickhouse_etl.core.offsets import partition_offsets
    from clickhouse_etl.orchestration import run_records
    from clickhouse_etl.tools.catchup import kafka_reader

    watermarks = kafka_reader(settings, pipeline).watermarks(pipeline.topic)
    return partition_offsets(watermarks, run_records.read_ledger(instance, pipeline.job_name, pipeline.topic))


# --- commands ----------------------------------------------------------------------------------------------


def _pipelines(settings: Settings, args: argparse.Namespace) -> int:
    spec = args.path or settings.pipelines
    try:
        loaded = load_pipelines(spec)
    except PipelineError as error:
        print(error, file=sys.stderr)
        return 2
    if args.action == "validate":
        for item in loaded:
            print(f"{item.source}: {item.pipeline.name}: valid")
        return 0
    if args.action == "ddl":
        from clickhouse_etl.core.pipeline.ddl import all_statements

        for item in loaded:
            database, window = settings.clickhouse_database, settings.clickhouse_dedup_window
            for statement in all_statements(item.pipeline, item.columns, database, window, args.on_cluster):
                print(f"{statement};\n")
        return 0
    print(_pipeline_table(loaded))
    others = [name for name in packaged_names() if name not in {item.pipeline.name for item in loaded}]
    if others and not args.path:
        print(
            f"\npackaged, not configured: {', '.join(others)} "
            f"(CLICKHOUSE_ETL_PIPELINES={settings.pipelines},{','.join(others)})"
        )
    return 0


def _pipeline_table(loaded: list[LoadedPipeline]) -> str:
    rows = [("pipeline", "topic", "job", "sensor", "table", "file")]
    for item in loaded:
        p = item.pipeline
        rows.append((p.name, p.topic, p.job_name, p.sensor_name, p.sink.table, item.source))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in rows
    )


def _catch_up(settings: Settings, args: argparse.Namespace) -> int:
    import functools
    from contextlib import nullcontext

    from clickhouse_etl.orchestration.instance import export_dagster_home, open_instance
    from clickhouse_etl.tools.catchup import CatchUpError, CatchUpWorkers, catch_up

    pipelines = chosen_pipelines(settings, args)
    # The worker processes start first: they import and open what a run needs while this process does the same.
    home = export_dagster_home(settings)
    opener = functools.partial(open_instance, home)
    workers = CatchUpWorkers(settings, pipelines, opener) if settings.catch_up_workers > 1 else None
    with workers or nullcontext(), open_instance(home) as instance:
        ensure_pipeline_tables(settings, pipelines)

        # With --json, stdout carries the JSON objects alone and the progress lines go to stderr.
        def echo(line: str) -> None:
            print(line, file=sys.stderr if args.json else sys.stdout)

        for pipeline in pipelines:
            try:
                report = catch_up(settings, pipeline, instance, echo, workers)
            except CatchUpError as error:
                print(f"clickhouse-etl catch-up: {pipeline.name}: {error}", file=sys.stderr)
                return 1
            if args.json:
                figures = {
                    "pipeline": pipeline.name,
                    "ranges": len(report.ranges),
                    "events": report.events,
                    "seconds": round(report.seconds, 3),
                    "runs": report.runs,
                    "peak_rss_bytes": report.peak_rss_bytes,
                }
                print(json.dumps(figures))
            else:
                rate = report.events / report.seconds if report.seconds else 0.0
                print(
                    f"{pipeline.name} caught up: {len(report.ranges)} range(s), {report.events} offsets in "
                    f"{report.seconds:.2f} s ({rate:,.0f} events/s), {len(report.runs)} run(s) recorded in "
                    f"{settings.dagster_home}; peak RSS {report.peak_rss_bytes / 2**20:,.0f} MiB (the largest "
                    "of its processes)"
                )
    return 0


def _backfill(settings: Settings, args: argparse.Namespace) -> int:
    import dagster as dg

    from clickhouse_etl.core.backfill import BackfillError, plan_backfill
    from clickhouse_etl.orchestration import run_records, tags
    from clickhouse_etl.orchestration.instance import export_dagster_home, workspace_file
    from clickhouse_etl.orchestration.jobs import BACKFILL_REQUEST_JOB_NAME
    from clickhouse_etl.tools.catchup import CatchUpError, ingest_job, kafka_reader, run_ranges

    [pipeline] = chosen_pipelines(settings, args, one=True)
    export_dagster_home(settings)
    if args.no_wait:
        # Hand the request to the Dagster instance: the daemon runs it, and backfill_sensor submits its runs.
        request = {
            "pipeline": pipeline.name,
            "partition": args.partition,
            "start": args.start,
            "end": args.end,
            "force": args.force,
        }
        config = {"ops": {"plan_backfill_runs": {"config": request}}}
        command = ["dagster", "job", "launch", "-w", workspace_file(), "-j", BACKFILL_REQUEST_JOB_NAME]
        return subprocess.call([*command, "--config-json", json.dumps(config)])
    ensure_pipeline_tables(settings, [pipeline])
    with dg.DagsterInstance.get() as instance:
        committed = run_records.committed_ranges(instance, pipeline.job_name, pipeline.topic, args.partition)
        try:
            watermarks = kafka_reader(settings, pipeline).watermarks(pipeline.topic)
            plan = plan_backfill(
                pipeline.topic,
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
            f"backfill {plan.backfill_id} of {pipeline.name}: [{plan.requested.start}, {plan.requested.end}) of "
            f"{pipeline.topic}/{args.partition} in {len(plan.ranges)} run(s){' (forced)' if plan.force else ''}"
        )
        job = ingest_job(settings, pipeline)
        run_tags = tags.backfill_tags(plan.backfill_id, plan.force)
        try:
            report = run_ranges(job, instance, plan.ranges, run_tags, plan.force)
        except CatchUpError as error:
            print(f"clickhouse-etl backfill: {error}", file=sys.stderr)
            return 1
    print(
        f"backfill {plan.backfill_id} done: {report.events} offsets in {report.seconds:.2f} s, "
        f"{len(report.runs)} run(s)"
    )
    return 0


def _offsets(settings: Settings, args: argparse.Namespace) -> int:
    from clickhouse_etl.core.offsets import format_offsets

    healthy = True
    with dagster_instance(settings) as instance:
        for pipeline in chosen_pipelines(settings, args):
            report = offsets_report(settings, pipeline, instance)
            healthy &= all(p.healthy for p in report)
            print(f"pipeline {pipeline.name}\n{format_offsets(pipeline.topic, report)}")
    return 0 if healthy else 1


def _status(settings: Settings, args: argparse.Namespace) -> int:
    from clickhouse_etl.tools.status import format_status, last_runs, sensor_status

    sections = [run_workers_line(settings)]
    with dagster_instance(settings) as instance:
        for pipeline in chosen_pipelines(settings, args):
            sensor = sensor_status(instance, pipeline.sensor_name)
            runs = last_runs(instance, pipeline.job_name, args.runs)
            sections.append(format_status(pipeline, sensor, runs, offsets_report(settings, pipeline, instance)))
    print("\n\n".join(sections))
    return 0


def _query(settings: Settings, args: argparse.Namespace) -> int:
    from clickhouse_etl.tools.query import format_table, run_query

    columns, rows = run_query(settings, args.sql, writable=args.writable)
    print(format_table(columns, rows))
    return 0


def worker_command(settings: Settings, concurrency: int, name: str, verbose: bool = False) -> list[str]:
    """A Celery worker of `concurrency` warm run processes (see clickhouse_etl.orchestration.workers)."""
    return [
        sys.executable,
        "-m",
        "celery",
        *([] if verbose else ["--quiet"]),  # no start-up banner
        "--app",
        "clickhouse_etl.orchestration.workers",
        "worker",
        "--queues",
        settings.celery_queue,
        "--hostname",
        name,
        "--concurrency",
        str(concurrency),
        "--pool",
        "prefork",
        # A child takes a run when it is free, not while another run keeps it busy.
        "-O",
        "fair",
        "--without-gossip",
        "--without-mingle",
        # A child whose peak RSS passed the cap is replaced after its run: memory stays bounded whatever
        # the libraries keep (see Settings.worker_max_memory_mib). Celery counts in KiB.
        *(
            ["--max-memory-per-child", str(settings.worker_max_memory_mib * 1024)]
            if settings.worker_max_memory_mib
            else []
        ),
        "--loglevel",
        "INFO" if verbose else "WARNING",
    ]


def _worker(settings: Settings, args: argparse.Namespace) -> int:
    from clickhouse_etl.orchestration.instance import create_instance_storage, export_dagster_home
    from clickhouse_etl.orchestration.launcher import worker_name

    if settings.run_launcher != "celery":
        raise UsageError("CLICKHOUSE_ETL_RUN_LAUNCHER is default: Dagster starts a process per run, not a worker")
    create_instance_storage(export_dagster_home(settings))
    os.environ["CLICKHOUSE_ETL_DATA_DIR"] = str(settings.data_dir)
    command = worker_command(settings, args.concurrency or settings.workers, args.name or worker_name(0), args.verbose)
    print(f"run worker {args.name or worker_name(0)}: {args.concurrency or settings.workers} process(es)", flush=True)
    os.execv(command[0], command)  # this process becomes the worker: signals reach Celery itself
    return 0


def daemon_command(verbose: bool = False) -> list[str]:
    """The project's Dagster daemon (clickhouse_etl.orchestration.daemon)."""
    return [sys.executable, "-m", "clickhouse_etl.cli", "daemon", *(["--verbose"] if verbose else [])]


def _daemon(settings: Settings, args: argparse.Namespace) -> int:
    from clickhouse_etl.orchestration.daemon import run_daemon
    from clickhouse_etl.orchestration.instance import create_instance_storage, export_dagster_home, workspace_file

    create_instance_storage(export_dagster_home(settings))
    run_daemon(workspace_file(), settings.sensor_interval_seconds, "debug" if args.verbose else "warning")
    return 0


def _dev(settings: Settings, args: argparse.Namespace) -> int:
    """The webserver, the daemon and the run workers, stopped together on Ctrl-C."""
    from clickhouse_etl.orchestration.instance import create_instance_storage, export_dagster_home, workspace_file
    from clickhouse_etl.orchestration.launcher import worker_name

    pipelines = configured_pipelines(settings)
    home = export_dagster_home(settings)
    create_instance_storage(home)
    ensure_pipeline_tables(settings, pipelines)
    # Dagster's processes read the same settings: pin the data folder so they find it from any directory.
    os.environ["CLICKHOUSE_ETL_DATA_DIR"] = str(settings.data_dir)
    sensors = ", ".join(p.sensor_name for p in pipelines)
    print(f"Dagster UI on http://{args.host}:{args.port} (DAGSTER_HOME={home}); sensors on: {sensors}")
    level = "debug" if args.verbose else "warning"
    if args.verbose:
        os.environ["CLICKHOUSE_ETL_LOG_LEVEL"] = "DEBUG"  # the run workers' runs log every event too
    webserver = [
        "dagster-webserver",
        "-w",
        workspace_file(),
        "-h",
        args.host,
        "-p",
        str(args.port),
        "--log-level",
        level,
    ]
    commands = [webserver, daemon_command(args.verbose)]
    if settings.run_launcher == "celery":
        print(f"run workers: {settings.workers} process(es) ({worker_name(0)}); each run logs one line when committed")
        commands.append(worker_command(settings, settings.workers, worker_name(0), args.verbose))
    # One process group: Ctrl-C reaches every process, and whoever stops this command stops them all.
    processes = [subprocess.Popen(command) for command in commands]
    try:
        while all(process.poll() is None for process in processes):
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        for process in processes:
            if process.poll() is None:
                process.terminate()
        for process in processes:
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
    return max((process.returncode or 0) for process in processes)


def add_commands(commands: argparse._SubParsersAction) -> None:
    pipelines = commands.add_parser(
        "pipelines", help="list the configured pipelines, validate pipeline files, or print their ClickHouse DDL"
    )
    pipelines.add_argument("action", choices=["list", "validate", "ddl"])
    pipelines.add_argument(
        "path", nargs="?", help="a file, a folder or packaged names (default: CLICKHOUSE_ETL_PIPELINES)"
    )
    pipelines.add_argument("--on-cluster", help="ddl: replicated tables, every statement ON CLUSTER this cluster")
    pipelines.set_defaults(handler=_pipelines)

    catch = commands.add_parser("catch-up", help="process everything available now through the Dagster job(s)")
    add_pipeline_options(catch)
    catch.add_argument("--json", action="store_true", help="print one JSON object per pipeline after its runs")
    # Its start-up goes on after the command starts (workers, instance, jobs); catch_up freezes it.
    catch.set_defaults(handler=_catch_up, freezes_startup_objects=True)

    backfill = commands.add_parser("backfill", help="re-process an exact offset range through the job")
    add_pipeline_options(backfill, one=True)
    backfill.add_argument("--partition", type=int, required=True)
    backfill.add_argument("--start", type=int, required=True, help="first offset (inclusive)")
    backfill.add_argument("--end", type=int, required=True, help="end offset (exclusive)")
    backfill.add_argument("--force", action="store_true", help="replace the range's rows and aggregates")
    backfill.add_argument("--no-wait", action="store_true", help="hand the backfill to the Dagster daemon")
    backfill.set_defaults(handler=_backfill)

    offsets = commands.add_parser("offsets", help="where every partition stands; non-zero on a gap or overlap")
    add_pipeline_options(offsets)
    offsets.set_defaults(handler=_offsets)

    status = commands.add_parser("status", help="per pipeline: the sensor, the last runs, lag per partition")
    add_pipeline_options(status)
    status.add_argument("--runs", type=int, default=10, help="how many recent runs to show (default 10)")
    status.set_defaults(handler=_status)

    query = commands.add_parser("query", help="run SQL against ClickHouse and print a table")
    query.add_argument("sql")
    query.add_argument("--writable", action="store_true", help="allow statements that change data")
    query.set_defaults(handler=_query)

    dev = commands.add_parser("dev", help="run Dagster (webserver, daemon, sensors) and the run workers")
    dev.add_argument("--host", default="127.0.0.1")
    dev.add_argument("--port", type=int, default=3000)
    dev.add_argument("--verbose", action="store_true", help="every Dagster event, not one line per run")
    dev.set_defaults(handler=_dev)

    daemon = commands.add_parser("daemon", help="the Dagster daemon: sensors, run queue, retries, run monitoring")
    daemon.add_argument("--verbose", action="store_true", help="log every tick and every run the daemon handles")
    daemon.set_defaults(handler=_daemon)

    worker = commands.add_parser("worker", help="a warm run worker: executes the runs the daemon launches")
    worker.add_argument(
        "--concurrency", type=int, help="runs at once, one process each (default CLICKHOUSE_ETL_WORKERS)"
    )
    worker.add_argument("-n", "--name", help="worker name, unique per worker (default clickhouse-etl-0@<host>)")
    worker.add_argument("--verbose", action="store_true", help="log every task the worker receives")
    worker.set_defaults(handler=_worker)
