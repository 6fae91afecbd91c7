"""The raw pass-through the bench runs beside the pipeline: the floor any Kafka → ClickHouse path stands on.

Every partition of the bench's topic is read by assignment from its low watermark up to the high watermark
read before reading starts, in `consume()` calls of the project's fetch batch, with the consumer settings of
the project's own reader (KafkaReader: fetch sizes, queue sizes), so the comparison measures processing and
nothing else. Message values are joined as NDJSON and each RAW_INSERT_MESSAGES of them go to ClickHouse in
one `INSERT … FORMAT JSONEachRow`, into a table of the JSON fields as text; no decoding, deduplication,
enrichment or anything else. It runs in a process of its own (`python -m clickhouse_etl.dev.pass_through`),
so the CPU time the bench reports is its own, and it reports its own peak RSS; the parent creates its table
before and counts and drops it after.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition

from clickhouse_etl.clients.clickhouse import clickhouse_session
from clickhouse_etl.clients.kafka import KafkaReader
from clickhouse_etl.core.pipeline.columns import POSITION_COLUMNS, columns_of
from clickhouse_etl.core.pipeline.model import Pipeline
from clickhouse_etl.core.processes import peak_rss_bytes
from clickhouse_etl.core.settings import Settings, load_settings, settings_environment

RAW_INSERT_MESSAGES = 65_536
# What the raw insert skips instead of failing on: lines that are not a JSON object (not JSON at all, a
# truncated object, a top-level array or string inside a batch) count as errors and are left out; so is a
# valid line right after a truncated one when a string or object left open runs on into it. Empty lines are
# no row and no error. Values of the wrong type or missing fields are kept as text or NULL (no validation is
# the point). The insert still fails when more than 1,000 lines and more than 5 % of a batch fail: a topic
# that is not JSON at all is an error, not a fast pass-through.
RAW_INSERT_SETTINGS = {
    "input_format_skip_unknown_fields": 1,
    "input_format_allow_errors_num": 1_000,
    "input_format_allow_errors_ratio": 0.05,
}
OPENS_ARRAY = re.compile(rb"\s*\[")


class PassThroughError(RuntimeError):
    """The pass-through failed or its counts do not add up: no figure is reported."""


@dataclass(frozen=True)
class PassThroughResult:
    messages: int  # consumed from the topic
    rows: int  # written, as the inserts reported
    table_rows: int  # counted in its table afterwards
    inserts: int
    seconds: float  # the whole child process, as the catch-up's seconds are
    copy_seconds: float  # from the first consume() to the last insert's answer
    cpu_seconds: float
    peak_rss_bytes: int

    @property
    def messages_per_second(self) -> float:
        return self.messages / self.seconds if self.seconds else 0.0

    def as_json(self) -> dict[str, object]:
        return {
            "messages": self.messages,
            "rows": self.rows,
            "table_rows": self.table_rows,
            "inserts": self.inserts,
            "seconds": round(self.seconds, 3),
            "copy_seconds": round(self.copy_seconds, 3),
            "messages_per_second": round(self.messages_per_second),
            "cpu_seconds": round(self.cpu_seconds, 2),
            "peak_rss_bytes": self.peak_rss_bytes,
        }


# --- pure parts ---------------------------------------------------------------------------------------------


def raw_columns(pipeline: Pipeline) -> list[str]:
    """The pipeline's JSON fields, in the order decode reads them (its decoded columns minus the position)."""
    return [name for name in columns_of(pipeline).decoded if name not in POSITION_COLUMNS]


def raw_table_ddl(database: str, table: str, pipeline: Pipeline) -> str:
    """Every JSON field as Nullable(String): any JSON value reads into text and a missing one is NULL, so a
    value of the wrong type never fails the insert. Unsorted, as nothing orders the values it is given."""
    columns = ",\n    ".join(f"`{name}` Nullable(String)" for name in raw_columns(pipeline))
    return f"CREATE TABLE `{database}`.`{table}` (\n    {columns}\n) ENGINE = MergeTree ORDER BY tuple()"


def ndjson(values: list[bytes | None]) -> bytes:
    """Message values as NDJSON lines, in one buffer.

    Tombstones (no value) carry no event and are left out. JSONEachRow reads a buffer that starts with `[` as
    one array of objects and then fails on the whole batch, so a value opening an array never goes first: the
    first value opening an object changes places with it (the order of rows means nothing here).
    """
    try:
        joined = b"\n".join(values)  # type: ignore[arg-type]
    except TypeError:
        values = [value for value in values if value is not None]
        joined = b"\n".join(values)  # type: ignore[arg-type]
    if not OPENS_ARRAY.match(joined):
        return joined
    values = list(values)
    first = next((i for i, value in enumerate(values) if value and value.lstrip().startswith(b"{")), None)
    if first is None:
        return b""  # not one object: nothing to insert
    values[0], values[first] = values[first], values[0]
    return b"\n".join(values)  # type: ignore[arg-type]


def in_batches(values: list[bytes | None], size: int = RAW_INSERT_MESSAGES) -> tuple[list[list[bytes | None]], list]:
    """Full batches of `size` values, and what is left over for the next call."""
    full = len(values) - len(values) % size
    return [values[i : i + size] for i in range(0, full, size)], values[full:]


# --- the child: read, join, insert --------------------------------------------------------------------------


def copy_topic(
    consumer: Consumer,
    topic: str,
    watermarks: dict[int, tuple[int, int]],
    fetch_batch: int,
    insert: Callable[[bytes], int],
    read_timeout_seconds: float,
) -> tuple[int, int, int]:
    """Every message of [low, high) of each partition, inserted RAW_INSERT_MESSAGES at a time: (messages,
    rows written, inserts)."""
    high = {partition: end for partition, (_, end) in watermarks.items()}
    expected = sum(end - start for start, end in watermarks.values())
    done = {partition for partition, (start, end) in watermarks.items() if start >= end}
    consumer.assign([TopicPartition(topic, p, start) for p, (start, end) in watermarks.items() if start < end])
    messages = rows = inserts = 0
    pending: list[bytes | None] = []
    last_progress = time.monotonic()
    while messages < expected and len(done) < len(high):
        batch = consumer.consume(num_messages=fetch_batch, timeout=1.0)
        if not batch:
            if time.monotonic() - last_progress > read_timeout_seconds:
                raise TimeoutError(f"{topic}: no messages for {read_timeout_seconds:.0f} s, {messages} of {expected}")
            continue
        last_progress = time.monotonic()
        if any([message.error() is not None for message in batch]):
            for message in batch:
                error = message.error()
                if error is None:
                    continue
                if error.code() != KafkaError._PARTITION_EOF:
                    raise KafkaException(error)
                if message.offset() >= high[message.partition()]:
                    done.add(message.partition())
            batch = [message for message in batch if message.error() is None]
        # Messages produced after the watermarks were read are not the bench's.
        values = [message.value() for message in batch if message.offset() < high[message.partition()]]
        messages += len(values)
        pending.extend(values)
        if len(pending) >= RAW_INSERT_MESSAGES:
            full, pending = in_batches(pending)
            for chunk in full:
                rows += insert(ndjson(chunk))
                inserts += 1
    if pending:
        rows += insert(ndjson(pending))
        inserts += 1
    return messages, rows, inserts


def _run_child(topic: str, table: str) -> dict[str, object]:
    settings = load_settings()
    # The reader's consumer as catch-up builds it (tools.catchup.kafka_reader, not imported: it would bring
    # Dagster into this process), so the reader's fetch configuration is the pass-through's too.
    reader = KafkaReader(
        bootstrap_servers=settings.kafka_bootstrap_servers,
        extra_config=dict(settings.kafka_config),
        fetch_batch=settings.kafka_fetch_batch,
    )
    watermarks = reader.watermarks(topic)
    started = time.perf_counter()
    # The pass-through stays what its figures have always measured: its merges end with it, finished or not.
    with (
        clickhouse_session(
            settings.clickhouse_dsn, settings.clickhouse_lock_timeout_seconds, finish_merges=False
        ) as client,
        reader.consumer() as consumer,
    ):

        def insert(block: bytes) -> int:
            if not block:
                return 0
            summary = client.raw_insert(table, insert_block=block, settings=RAW_INSERT_SETTINGS, fmt="JSONEachRow")
            return int(summary.written_rows)

        messages, rows, inserts = copy_topic(
            consumer, topic, watermarks, reader.fetch_batch, insert, reader.read_timeout_seconds
        )
    return {
        "messages": messages,
        "rows": rows,
        "inserts": inserts,
        "copy_seconds": time.perf_counter() - started,
        "peak_rss_bytes": peak_rss_bytes(),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m clickhouse_etl.dev.pass_through")
    parser.add_argument("--topic", required=True)
    parser.add_argument("--table", required=True, help="database.table to insert into (it exists)")
    args = parser.parse_args(argv)
    print(json.dumps(_run_child(args.topic, args.table)))
    return 0


# --- the parent: its table, the child process, the checks ---------------------------------------------------


def _run_measured(command: list[str], env: dict[str, str]) -> tuple[int, str, str, float, resource.struct_rusage]:
    """Exit code, stdout, stderr, wall seconds and the resource usage of exactly this child (wait4)."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        started = time.perf_counter()
        child = subprocess.Popen(command, env=env, stdout=out, stderr=err)
        try:
            _, status, usage = os.wait4(child.pid, 0)
        except BaseException:  # interrupted: never leave the child holding the embedded store
            child.kill()
            child.wait()
            raise
        seconds = time.perf_counter() - started
        child.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        return child.returncode, out.read().decode(), err.read().decode(errors="replace"), seconds, usage


def run_pass_through(settings: Settings, pipeline: Pipeline) -> PassThroughResult:
    """The pass-through of the pipeline's topic into a fresh table of its own, dropped afterwards."""
    database = settings.clickhouse_database
    table = f"bench_raw_{uuid.uuid4().hex[:8]}"
    qualified = f"`{database}`.`{table}`"
    with clickhouse_session(settings.clickhouse_dsn, settings.clickhouse_lock_timeout_seconds) as client:
        client.command(raw_table_ddl(database, table, pipeline))
    code, table_rows = None, 0
    try:
        code, out, err, seconds, usage = _run_measured(
            [sys.executable, "-m", "clickhouse_etl.dev.pass_through", "--topic", pipeline.topic, "--table", qualified],
            {**os.environ, **settings_environment(settings)},
        )
    finally:
        with clickhouse_session(settings.clickhouse_dsn, settings.clickhouse_lock_timeout_seconds) as client:
            if code == 0:
                table_rows = int(client.command(f"SELECT count() FROM {qualified}"))  # type: ignore[arg-type]
            client.command(f"DROP TABLE IF EXISTS {qualified}")
    if code != 0:
        raise PassThroughError(f"the raw pass-through failed:\n{err[-3000:]}")
    figures = json.loads(out.strip().splitlines()[-1])
    result = PassThroughResult(
        messages=figures["messages"],
        rows=figures["rows"],
        table_rows=table_rows,
        inserts=figures["inserts"],
        seconds=seconds,
        copy_seconds=figures["copy_seconds"],
        cpu_seconds=usage.ru_utime + usage.ru_stime,
        peak_rss_bytes=figures["peak_rss_bytes"],  # its own: getrusage's would not fall below the bench's
    )
    if result.rows != result.table_rows:
        raise PassThroughError(f"the raw pass-through wrote {result.rows} rows, its table holds {result.table_rows}")
    return result


if __name__ == "__main__":
    sys.exit(main())
