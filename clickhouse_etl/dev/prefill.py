"""`bench --prefill-rows N`: the pipeline's tables hold N rows of its demo data before the timed catch-up, as a
long-lived deployment's store would.

The rows are generated inside ClickHouse (INSERT … SELECT from `numbers()`), not produced to Kafka and caught
up: ten million events through Kafka, Redis and the job would take longer than the bench itself, and a
generator can keep every invariant the pipeline's tables keep:
- rows carry the Kafka position of a topic of their own that is never produced to, so the bench's ranges,
  load markers and counts are untouched; offsets are dense per partition except for what a real run leaves
  out (one offset in ten: duplicates and filtered events) and one dead letter per thousand offsets;
- click (event) times span the day that ended an hour before the bench, so the bench's per-run aggregate
  checks read the bench's windows only;
- rows go in one insert unit at a time (INSERT_WINDOW offsets of a partition, one block under the unit's
  token), as load_range writes them, so the store gets the parts and the deduplication log a run leaves;
- every range of `max_records_per_run` offsets gets its aggregate partials, computed by ClickHouse from the
  rows themselves (so each view equals the same aggregation over the table), and a load marker per unit;
- the background merges the inserts started are waited for, so the timed catch-up pays for the size of the
  store, not for the prefill's own merges.
Claims are not made in Redis: the bench empties its claim database first anyway, and the slowdown measured
is the store's.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from clickhouse_connect.driver.client import Client

from clickhouse_etl.core.pipeline.columns import AggregateColumns, columns_of
from clickhouse_etl.core.pipeline.ddl import LOADS, WINDOW_START
from clickhouse_etl.core.pipeline.model import Pipeline
from clickhouse_etl.core.ranges import OffsetRange, split_range
from clickhouse_etl.dev import demo_data, usage_data
from clickhouse_etl.steps.load import INSERT_WINDOW, SINGLE_BLOCK

# What a run leaves out of the table: one offset in ten has no row (duplicates and filtered events), and one
# offset in a thousand is a dead letter instead.
GAP_EVERY = 10
DEAD_LETTER_EVERY = 1_000
SPAN_MS = 24 * 3_600_000
ENDS_BEFORE_BENCH_MS = 3_600_000  # later than the bench's latest late event (30 minutes)
MERGES_SETTLED_SECONDS = 3.0  # no merge running, and the part count unchanged, for this long
MERGES_TIMEOUT_SECONDS = 600.0


class PrefillError(ValueError):
    """The pipeline has no demo shape for the prefill (a pipeline without demo data, or a changed sink)."""


@dataclass(frozen=True)
class PrefillPlan:
    """Where the prefilled rows sit: their topic, partitions and the offsets each partition ends at."""

    topic: str
    rows: int
    partitions: int
    max_records_per_run: int
    prefix: str  # of the generated ids, so they never meet the demo producer's

    def rows_in(self, partition: int) -> int:
        """Row numbers n of the whole prefill with n % partitions == partition."""
        return max(0, (self.rows - partition + self.partitions - 1) // self.partitions)

    @staticmethod
    def rows_below(offset: int) -> int:
        """Rows of a partition at offsets below `offset` (offsets 9, 19, 29, … hold none)."""
        return offset - offset // GAP_EVERY

    @staticmethod
    def offset_of(row: int) -> int:
        """The offset of a partition's row number `row` (inverse of rows_below)."""
        return row + row // (GAP_EVERY - 1)

    def high_watermark(self, partition: int) -> int:
        rows = self.rows_in(partition)
        return self.offset_of(rows - 1) + 1 if rows else 0

    def dead_letters_below(self, offset: int) -> int:
        """Dead letters of a partition at offsets below `offset`: at DEAD_LETTER_EVERY·k + 9, all gaps."""
        first = GAP_EVERY - 1
        return 0 if offset <= first else (offset - first - 1) // DEAD_LETTER_EVERY + 1

    def ranges(self, partition: int) -> list[OffsetRange]:
        """The ranges runs of at most max_records_per_run offsets would have processed."""
        return split_range(self.topic, partition, 0, self.high_watermark(partition), self.max_records_per_run)

    @property
    def dead_letters(self) -> int:
        return sum(self.dead_letters_below(self.high_watermark(p)) for p in range(self.partitions))


@dataclass(frozen=True)
class PrefillReport:
    rows: int
    dead_letters: int
    topic: str
    seconds: float  # generating, inserting and waiting for the merges

    def as_json(self) -> dict[str, object]:
        return {
            "rows": self.rows,
            "dead_letters": self.dead_letters,
            "topic": self.topic,
            "seconds": round(self.seconds, 3),
        }


# --- the rows: per pipeline, one SQL expression per sink column over the row number n and its time --------

# Columns of the generated rows every expression may read: the row number n (over the whole prefill, so
# times grow with it across partitions), event_ms (its event time, late for some) and processed_ms.
ROW_SOURCE = """
SELECT
    n,
    {partition:UInt32} AS kafka_partition,
    toUInt64(number + intDiv(number, {gap_rows:UInt64})) AS kafka_offset,
    toInt64({start_ms:Int64} + intDiv(n * {span_ms:UInt64}, {rows:UInt64})) AS on_time_ms,
    on_time_ms + toInt64(sipHash64(n, 'jitter') % 50)
        - if(sipHash64(n, 'late') % 50 = 0, toInt64(60000 + sipHash64(n, 'late by') % 1740000), 0) AS event_ms,
    on_time_ms + 2000 AS processed_ms
FROM (
    SELECT number, {partition:UInt32} + {partitions:UInt64} * number AS n
    FROM numbers({first:UInt64}, {count:UInt64})
)
"""


def _millis(expression: str) -> str:
    return f"fromUnixTimestamp64Milli({expression}, 'UTC')"


def _sql_strings(values: list[str]) -> str:
    """An Array(String) literal (the lookup's demo rows are few)."""
    return "[" + ", ".join("'" + v.replace("\\", "\\\\").replace("'", "\\'") + "'" for v in values) + "]"


def _ad_clicks_shape(plan: PrefillPlan, lookup_rows: int) -> dict[str, str]:
    """As demo_data generates them and the pipeline stores them: 2 % unknown ads (NULL campaign), 5 % IPv6,
    no bot addresses (filtered), a quarter as many users as clicks."""
    campaigns = demo_data.demo_campaigns(lookup_rows)
    names = _sql_strings([name for _, name, _ in campaigns])
    budgets = _sql_strings([budget for _, _, budget in campaigns])
    users = max(100, plan.rows // 4)
    known = f"ad_id <= {lookup_rows}"
    ipv4 = (
        "concat(toString(11 + sipHash64(n, 'o1') % 181), '.', toString(sipHash64(n, 'o2') % 256), '.', "
        "toString(sipHash64(n, 'o3') % 256), '.', toString(sipHash64(n, 'o4') % 256))"
    )
    ipv6 = "concat('2001:db8:', toString(sipHash64(n, 'v6a') % 10000), '::', toString(sipHash64(n, 'v6b') % 10000))"
    return {
        "click_id": f"concat('c{plan.prefix}-', toString(n))",
        "user_id": f"concat('u', toString(sipHash64(n, 'user') % {users}))",
        "ad_id": (
            f"if(sipHash64(n, 'unknown') % 50 != 0, 1 + sipHash64(n, 'ad') % {lookup_rows}, "
            f"{demo_data.UNKNOWN_AD_ID_BASE} + sipHash64(n, 'ad') % 1000000)"
        ),
        "campaign_name": f"if({known}, {names}[ad_id], NULL)",
        "campaign_budget": f"if({known}, toDecimal64({budgets}[ad_id], 2), NULL)",
        "ip_address": f"if(sipHash64(n, 'ipv6') % 20 = 0, {ipv6}, {ipv4})",
        "click_time": _millis("event_ms"),
    }


def _api_usage_shape(plan: PrefillPlan, lookup_rows: int) -> dict[str, str]:
    """As usage_data generates them and the pipeline stores them: 2 % unknown customers (NULL plan and
    region), no health checks (filtered), latencies in thousandths of a millisecond."""
    customers = usage_data.demo_customers(lookup_rows)
    plans = _sql_strings([plan_name for _, plan_name, _ in customers])
    regions = _sql_strings([region for _, _, region in customers])
    number = f"(1 + sipHash64(n, 'customer') % {lookup_rows})"
    known = "sipHash64(n, 'unknown') % 50 != 0"
    low, high = usage_data.LATENCY_THOUSANDTHS
    return {
        "event_id": f"concat('e{plan.prefix}-', toString(n))",
        "customer_id": (
            f"if({known}, concat('cust-', leftPad(toString({number}), 4, '0')), "
            f"concat('{usage_data.UNKNOWN_CUSTOMER_PREFIX}', toString(sipHash64(n, 'customer') % 1000000)))"
        ),
        "plan": f"if({known}, {plans}[{number}], NULL)",
        "region": f"if({known}, {regions}[{number}], NULL)",
        "endpoint": f"{_sql_strings(list(usage_data.ENDPOINTS))}[1 + sipHash64(n, 'endpoint') % "
        f"{len(usage_data.ENDPOINTS)}]",
        "tokens": f"1 + sipHash64(n, 'tokens') % {usage_data.MAX_TOKENS}",
        "latency_ms": f"({low} + sipHash64(n, 'latency') % {high - low + 1}) / 1000",
        "slow": "latency_ms >= 1000",
        "event_time": _millis("event_ms"),
    }


ROW_SHAPES: dict[str, Callable[[PrefillPlan, int], dict[str, str]]] = {
    "ad_clicks": _ad_clicks_shape,
    "api_usage": _api_usage_shape,
}


def sink_select(pipeline: Pipeline, plan: PrefillPlan, lookup_rows: int) -> str:
    """SELECT of the sink table's columns, in order, each cast to its column's type, from ROW_SOURCE."""
    shape = ROW_SHAPES.get(pipeline.name)
    if shape is None:
        raise PrefillError(f"no prefill shape for pipeline {pipeline.name}; shapes exist for {', '.join(ROW_SHAPES)}")
    expressions = {
        **shape(plan, lookup_rows),
        "processed_at": _millis("processed_ms"),
        "kafka_topic": f"'{plan.topic}'",
        "kafka_partition": "kafka_partition",
        "kafka_offset": "kafka_offset",
    }
    sink = columns_of(pipeline).sink
    missing = [column.name for column in sink if column.name not in expressions]
    if missing:
        raise PrefillError(
            f"pipeline {pipeline.name}: the prefill has no demo values for column(s) {', '.join(missing)}"
        )
    # Casts keep each column's own name: a later expression reads an earlier column by it (campaign_name
    # reads ad_id), as ClickHouse resolves aliases inside one SELECT.
    selected = [f"CAST({expressions[c.name]} AS {c.clickhouse_type()}) AS `{c.name}`" for c in sink]
    return f"SELECT {', '.join(selected)} FROM ({ROW_SOURCE})"


def dead_letter_select(pipeline: Pipeline, plan: PrefillPlan) -> str:
    """Truncated JSON objects of the pipeline's fields at one offset in DEAD_LETTER_EVERY, with the reason,
    failed when the rows around them were processed."""
    first, *rest = pipeline.source.fields
    cut = (rest[0] if rest else first)[:3]
    raw = f'concat(\'{{"{first}":"m{plan.prefix}-\', toString(kafka_offset), \'","{cut}\')'
    row_number = (
        "({partition:UInt32} + {partitions:UInt64} * (kafka_offset - intDiv(kafka_offset, {gap_every:UInt64})))"
    )
    failed_ms = f"toInt64({{start_ms:Int64}} + intDiv({row_number} * {{span_ms:UInt64}}, {{rows:UInt64}}) + 2000)"
    return (
        f"SELECT '{plan.topic}', {{partition:UInt32}}, kafka_offset, {raw}, "
        f"'invalid JSON: unexpected end of data', {_millis(failed_ms)} "
        f"FROM (SELECT toUInt64({DEAD_LETTER_EVERY} * number + {GAP_EVERY - 1}) AS kafka_offset "
        "FROM numbers({first:UInt64}, {count:UInt64}))"
    )


def partials_select(aggregate: AggregateColumns, sink_table: str, database: str) -> str:
    """One range's partials computed from its rows, as aggregate.window_partials computes them."""
    states = {
        "count": "count()",
        "count_distinct": "arraySort(groupUniqArray(`{column}`))",
        "sum": "sum(`{column}`)",
        "min": "min(`{column}`)",
        "max": "max(`{column}`)",
    }
    window = f"{WINDOW_START[aggregate.window_column]}(`{aggregate.aggregate.time_column}`)"
    groups = [f"`{column.name}`" for column in aggregate.group_by]
    measures = [
        states[measure.function].format(column=measure.column) for measure in aggregate.aggregate.measures.values()
    ]
    values = [
        window,
        *groups,
        *measures,
        "kafka_topic",
        "kafka_partition",
        "{start:UInt64}",
        "{end:UInt64}",
    ]
    selected = [
        f"CAST({value} AS {column.clickhouse_type()})"
        for value, column in zip(values, aggregate.partials_columns(), strict=True)
    ]
    return (
        f"SELECT {', '.join(selected)} FROM `{database}`.`{sink_table}` "
        "WHERE kafka_topic = {topic:String} AND kafka_partition = {partition:UInt32} "
        "AND kafka_offset >= {start:UInt64} AND kafka_offset < {end:UInt64} "
        f"GROUP BY {', '.join([window, *groups, 'kafka_topic', 'kafka_partition'])}"
    )


# --- loading ------------------------------------------------------------------------------------------------


def _insert_select(
    client: Client, database: str, table: str, select: str, token: str, parameters: dict[str, object]
) -> None:
    client.command(
        f"INSERT INTO `{database}`.`{table}` {select}",
        parameters=parameters,
        settings={"insert_deduplication_token": token, "insert_deduplicate": 1, **SINGLE_BLOCK},
    )


def prefill_store(
    client: Client,
    database: str,
    pipeline: Pipeline,
    rows: int,
    partitions: int,
    max_records_per_run: int,
    lookup_rows: int,
    now_ms: int | None = None,
) -> PrefillReport:
    """Load `rows` rows (and their dead letters, partials and load markers) into the pipeline's tables."""
    started = time.perf_counter()
    plan = PrefillPlan(f"prefill_{uuid.uuid4().hex[:10]}", rows, partitions, max_records_per_run, uuid.uuid4().hex[:12])
    now_ms = int(time.time() * 1000) if now_ms is None else now_ms
    generated = {
        "start_ms": now_ms - ENDS_BEFORE_BENCH_MS - SPAN_MS,
        "span_ms": SPAN_MS,
        "rows": max(rows, 1),
        "partitions": partitions,
        "gap_rows": GAP_EVERY - 1,
        "gap_every": GAP_EVERY,
    }
    sink, dead = pipeline.sink.table, pipeline.sink.dead_letters
    # Unit by unit, as load_range writes a range: per window dead letters then rows, then the partials.
    units = [
        (dead, dead_letter_select(pipeline, plan), plan.dead_letters_below),
        (sink, sink_select(pipeline, plan, lookup_rows), plan.rows_below),
    ]
    partials = {a.aggregate.partials: partials_select(a, sink, database) for a in columns_of(pipeline).aggregates}
    for partition in range(partitions):
        for offset_range in plan.ranges(partition):
            markers = []
            for window in split_range(plan.topic, partition, offset_range.start, offset_range.end, INSERT_WINDOW):
                for table, select, below in units:
                    first, count = below(window.start), below(window.end) - below(window.start)
                    if count:
                        parameters = {**generated, "partition": partition, "first": first, "count": count}
                        _insert_select(client, database, table, select, window.insert_token(table), parameters)
                    markers.append((table, window, count))
            where = {"topic": plan.topic, "partition": partition, "start": offset_range.start, "end": offset_range.end}
            for table, select in partials.items():
                _insert_select(client, database, table, select, offset_range.insert_token(table), where)
                made = client.command(
                    f"SELECT count() FROM `{database}`.`{table}` WHERE kafka_topic = {{topic:String}} "
                    "AND kafka_partition = {partition:UInt32} AND range_start = {start:UInt64}",
                    parameters=where,
                )
                markers.append((table, offset_range, int(made)))  # type: ignore[arg-type]
            _insert_markers(client, database, offset_range, markers)
    settle_merges(client, database, [sink, dead, *partials, LOADS.name])
    return PrefillReport(rows, plan.dead_letters, plan.topic, time.perf_counter() - started)


def _insert_markers(
    client: Client, database: str, offset_range: OffsetRange, markers: list[tuple[str, OffsetRange, int]]
) -> None:
    """One marker per unit of the range, in one insert, as load_range records them."""
    loaded_at = datetime.now(UTC)
    client.insert(
        f"`{database}`.`{LOADS.name}`",
        [[table, unit.topic, unit.partition, unit.start, unit.end, count, loaded_at] for table, unit, count in markers],
        column_names=[column.name for column in LOADS.columns],
        settings={"insert_deduplication_token": offset_range.insert_token(LOADS.name), "insert_deduplicate": 1},
    )


def settle_merges(client: Client, database: str, tables: list[str], timeout: float = MERGES_TIMEOUT_SECONDS) -> None:
    """Wait until no merge of `tables` runs and their part counts stay put for MERGES_SETTLED_SECONDS."""
    parameters = {"db": database, "tables": tables}
    deadline = time.monotonic() + timeout
    settled_since, last = time.monotonic(), None
    while time.monotonic() < deadline:
        merging = client.command(
            "SELECT count() FROM system.merges WHERE database = {db:String} AND table IN {tables:Array(String)}",
            parameters=parameters,
        )
        parts = client.command(
            "SELECT count() FROM system.parts WHERE active AND database = {db:String} "
            "AND table IN {tables:Array(String)}",
            parameters=parameters,
        )
        if merging or parts != last:
            settled_since, last = time.monotonic(), parts
        elif time.monotonic() - settled_since >= MERGES_SETTLED_SECONDS:
            return
        time.sleep(0.5)


def store_size(client: Client, database: str, table: str) -> tuple[int, int]:
    """Rows and active parts of a table."""
    rows, parts = client.query(
        "SELECT sum(rows), count() FROM system.parts WHERE active AND database = {db:String} AND table = {t:String}",
        parameters={"db": database, "t": table},
    ).result_rows[0]
    return int(rows or 0), int(parts)
