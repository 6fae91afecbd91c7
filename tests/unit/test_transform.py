"""Unit tests of clickhouse_etl.steps.transform.to_sink_rows: computed columns, the python step, and rows shaped for
the sink table, with expectations written out in plain Python."""

from __future__ import annotations

import re
import sys
import textwrap
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import polars as pl
import pytest

from clickhouse_etl.core.pipeline.columns import columns_of
from clickhouse_etl.core.pipeline.loading import LoadedPipeline, load_pipeline_file, load_pipelines
from clickhouse_etl.steps.transform import PythonStepError, TransformedBatch, to_sink_rows

AD_CLICKS = load_pipelines("ad_clicks", environment={})[0].pipeline
API_USAGE = load_pipelines("api_usage", environment={})[0].pipeline
PROCESSED_AT = datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC)
T0 = datetime(2023, 11, 14, 22, 14, tzinfo=UTC)
MS = pl.Datetime("ms", "UTC")

AD_CLICKS_CONTRACT: dict[str, pl.DataType] = {
    "click_id": pl.String(),
    "user_id": pl.String(),
    "ad_id": pl.Int64(),
    "campaign_name": pl.String(),
    "campaign_budget": pl.Decimal(14, 2),
    "ip_address": pl.String(),
    "click_time": MS,
    "processed_at": MS,
    "kafka_topic": pl.String(),
    "kafka_partition": pl.UInt32(),
    "kafka_offset": pl.UInt64(),
}
API_USAGE_SINK: dict[str, pl.DataType] = {
    "event_id": pl.String(),
    "customer_id": pl.String(),
    "plan": pl.String(),
    "region": pl.String(),
    "endpoint": pl.String(),
    "tokens": pl.Int64(),
    "latency_ms": pl.Float64(),
    "slow": pl.Boolean(),
    "event_time": MS,
    "processed_at": MS,
    "kafka_topic": pl.String(),
    "kafka_partition": pl.UInt32(),
    "kafka_offset": pl.UInt64(),
}


def clicks(rows: list[tuple[str, str | None, datetime]], partition: int = 0, first_offset: int = 0) -> pl.DataFrame:
    """rows of (user_id, campaign_name, click time) → decoded and enriched ad_clicks events."""
    n = len(rows)
    return pl.DataFrame(
        {
            "click_id": [f"c{first_offset + i}" for i in range(n)],
            "user_id": [r[0] for r in rows],
            "ad_id": [1 if r[1] is not None else 999 for r in rows],
            "timestamp_ms": [r[2] for r in rows],
            "ip_address": ["10.0.0.1"] * n,
            "kafka_partition": [partition] * n,
            "kafka_offset": list(range(first_offset, first_offset + n)),
            "campaign_name": [r[1] for r in rows],
            "campaign_budget": [Decimal("10.00") if r[1] is not None else None for r in rows],
        },
        schema={
            "click_id": pl.String,
            "user_id": pl.String,
            "ad_id": pl.Int64,
            "timestamp_ms": MS,
            "ip_address": pl.String,
            "kafka_partition": pl.UInt32,
            "kafka_offset": pl.UInt64,
            "campaign_name": pl.String,
            "campaign_budget": pl.Decimal(14, 2),
        },
    )


def calls(rows: list[tuple[str, str | None, str, int, float, datetime]]) -> pl.DataFrame:
    """rows of (customer_id, plan, endpoint, tokens, latency_ms, ts) → decoded and enriched api_usage events."""
    n = len(rows)
    return pl.DataFrame(
        {
            "event_id": [f"e{i}" for i in range(n)],
            "customer_id": [r[0] for r in rows],
            "endpoint": [r[2] for r in rows],
            "tokens": [r[3] for r in rows],
            "latency_ms": [r[4] for r in rows],
            "ts": [r[5] for r in rows],
            "kafka_partition": [3] * n,
            "kafka_offset": list(range(n)),
            "plan": [r[1] for r in rows],
            "region": ["eu" if r[1] is not None else None for r in rows],
        },
        schema={
            "event_id": pl.String,
            "customer_id": pl.String,
            "endpoint": pl.String,
            "tokens": pl.Int64,
            "latency_ms": pl.Float64,
            "ts": MS,
            "kafka_partition": pl.UInt32,
            "kafka_offset": pl.UInt64,
            "plan": pl.String,
            "region": pl.String,
        },
    )


def write_pipeline(folder: Path, text: str) -> LoadedPipeline:
    path = folder / "pipeline.yaml"
    path.write_text(textwrap.dedent(text))
    return load_pipeline_file(path, environment={})


def shape(events: pl.DataFrame, loaded: LoadedPipeline) -> TransformedBatch:
    return to_sink_rows(events, loaded.pipeline, loaded.columns, processed_at=PROCESSED_AT)


# --- ad_clicks: the contract table --------------------------------------------------------------------------------


def test_ad_clicks_rows_have_exactly_the_contract_columns_in_order_and_types() -> None:
    """The sink rows are the contract's eleven columns, in order, with their types; the resolved columns agree."""
    batch = to_sink_rows(clicks([("u1", "A", T0)]), AD_CLICKS, columns_of(AD_CLICKS), processed_at=PROCESSED_AT)
    assert dict(batch.rows.schema) == AD_CLICKS_CONTRACT
    assert batch.rows.columns == list(AD_CLICKS_CONTRACT)
    assert [(c.name, c.dtype) for c in columns_of(AD_CLICKS).sink] == list(AD_CLICKS_CONTRACT.items())


def test_ad_clicks_rows_carry_the_values() -> None:
    """click_time is the decoded timestamp (ms, UTC), processed_at as given, kafka_topic the pipeline's topic."""
    click_time = T0 + timedelta(seconds=1, milliseconds=234)
    events = clicks([("u1", "A", click_time), ("u2", None, T0)], partition=4, first_offset=70)
    batch = to_sink_rows(events, AD_CLICKS, columns_of(AD_CLICKS), processed_at=PROCESSED_AT)
    assert batch.rows.rows() == [
        ("c70", "u1", 1, "A", Decimal("10.00"), "10.0.0.1", click_time, PROCESSED_AT, "ad_clicks", 4, 70),
        ("c71", "u2", 999, None, None, "10.0.0.1", T0, PROCESSED_AT, "ad_clicks", 4, 71),
    ]
    assert batch.rows["click_time"][0] == datetime(2023, 11, 14, 22, 14, 1, 234_000, tzinfo=UTC)
    assert batch.rejected.height == 0
    assert batch.dropped_by_python == 0


def test_click_time_is_milliseconds_in_utc() -> None:
    """click_time is a millisecond UTC timestamp, whatever unit the events' timestamp came in."""
    events = clicks([("u1", "A", T0 + timedelta(milliseconds=5))])
    as_us = events.with_columns(
        pl.lit(T0 + timedelta(microseconds=5_678), dtype=pl.Datetime("us", "UTC")).alias("timestamp_ms")
    )
    assert as_us["timestamp_ms"][0] == T0 + timedelta(microseconds=5_678)
    for frame in (events, as_us):
        rows = to_sink_rows(frame, AD_CLICKS, columns_of(AD_CLICKS), processed_at=PROCESSED_AT).rows
        assert rows.schema["click_time"] == pl.Datetime("ms", "UTC")
        assert rows["click_time"][0] == T0 + timedelta(milliseconds=5)


def test_kafka_topic_is_the_pipelines_topic() -> None:
    """The same pipeline reading another topic writes that topic into every row."""
    pipeline = AD_CLICKS.with_topic("clicks_replay")
    batch = to_sink_rows(clicks([("u1", "A", T0)] * 3), pipeline, columns_of(pipeline), processed_at=PROCESSED_AT)
    assert batch.rows["kafka_topic"].to_list() == ["clicks_replay"] * 3


def test_processed_at_is_in_milliseconds_and_defaults_to_now() -> None:
    """A given processed_at is kept to the millisecond; without one, the time of the call is used."""
    given = datetime(2024, 1, 2, 3, 4, 5, 123_456, tzinfo=UTC)
    rows = to_sink_rows(clicks([("u1", "A", T0)]), AD_CLICKS, columns_of(AD_CLICKS), processed_at=given).rows
    assert rows["processed_at"].to_list() == [datetime(2024, 1, 2, 3, 4, 5, 123_000, tzinfo=UTC)]
    before = datetime.now(UTC) - timedelta(milliseconds=1)
    rows = to_sink_rows(clicks([("u1", "A", T0)] * 2), AD_CLICKS, columns_of(AD_CLICKS)).rows
    after = datetime.now(UTC)
    stamps = rows["processed_at"].to_list()
    assert stamps[0] == stamps[1]
    assert before <= stamps[0] <= after


def test_rows_keep_the_events_order_and_count() -> None:
    """Without a python step every event becomes one row, in the events' order."""
    rows = [(f"u{i % 7}", "A" if i % 3 else None, T0 + timedelta(seconds=i)) for i in range(500)]
    batch = to_sink_rows(clicks(rows, first_offset=1_000), AD_CLICKS, columns_of(AD_CLICKS), PROCESSED_AT)
    assert batch.rows["kafka_offset"].to_list() == list(range(1_000, 1_500))
    assert batch.rows["user_id"].to_list() == [r[0] for r in rows]
    assert batch.rows["campaign_name"].to_list() == [r[1] for r in rows]


def test_no_events_give_no_rows_with_the_contract_columns() -> None:
    """An empty batch still has the contract's columns and types."""
    batch = to_sink_rows(clicks([]), AD_CLICKS, columns_of(AD_CLICKS), processed_at=PROCESSED_AT)
    assert batch.rows.height == 0
    assert dict(batch.rows.schema) == AD_CLICKS_CONTRACT
    assert batch.rejected.height == 0
    assert batch.dropped_by_python == 0


# --- api_usage: computed columns ----------------------------------------------------------------------------------


def test_api_usage_computes_slow_and_event_time() -> None:
    """slow = latency_ms >= 1000 and event_time = ts; the sink columns are the declared ones, in order."""
    latencies = [12.5, 999.999, 1000.0, 1500.25, 0.0]
    rows = [
        ("cust-1", "pro", "/v1/chat", 10 * i, latency, T0 + timedelta(seconds=i)) for i, latency in enumerate(latencies)
    ]
    rows[4] = ("cust-2", None, "/v1/embed", 0, 0.0, T0)
    batch = to_sink_rows(calls(rows), API_USAGE, columns_of(API_USAGE), processed_at=PROCESSED_AT)
    assert dict(batch.rows.schema) == API_USAGE_SINK
    assert batch.rows.columns == list(API_USAGE_SINK)
    assert [(c.name, c.dtype) for c in columns_of(API_USAGE).sink] == list(API_USAGE_SINK.items())
    assert batch.rows["slow"].to_list() == [latency >= 1000 for _, _, _, _, latency, _ in rows]
    assert batch.rows["slow"].to_list() == [False, False, True, True, False]
    assert batch.rows["event_time"].to_list() == [r[5] for r in rows]
    assert batch.rows["plan"].to_list() == ["pro"] * 4 + [None]
    assert batch.rows["kafka_topic"].to_list() == ["api_usage"] * 5
    assert batch.rows["kafka_partition"].to_list() == [3] * 5
    assert batch.rejected.height == 0


SHAPES = """
    name: shapes
    source:
      topic: shapes
      fields:
        n: int64
        code: string
        note: {type: string, required: false}
    transform:
      doubled: "n * 2"
      quadrupled: "doubled * 2"
      label: "CASE WHEN quadrupled > 10 THEN 'big' ELSE 'small' END"
      n_text: {sql: n, type: string}
      n_money: {sql: n, type: "decimal(10,2)"}
      code_number: {sql: code, type: int64}
      note_number: {sql: note, type: int64}
    sink:
      table: shapes
      columns: [n, doubled, quadrupled, label, n_text, n_money, code_number, note_number, kafka_topic, kafka_partition,
                kafka_offset]
"""


def shapes_events(rows: list[tuple[int, str, str | None]]) -> pl.DataFrame:
    """rows of (n, code, note) → decoded events of the shapes pipeline, at offsets 0, 1, …"""
    return pl.DataFrame(
        {
            "n": [r[0] for r in rows],
            "code": [r[1] for r in rows],
            "note": [r[2] for r in rows],
            "kafka_partition": [0] * len(rows),
            "kafka_offset": list(range(len(rows))),
        },
        schema={
            "n": pl.Int64,
            "code": pl.String,
            "note": pl.String,
            "kafka_partition": pl.UInt32,
            "kafka_offset": pl.UInt64,
        },
    )


def test_a_computed_column_may_read_earlier_computed_columns(tmp_path: Path) -> None:
    """Transforms run in order: quadrupled reads doubled, label reads quadrupled."""
    loaded = write_pipeline(tmp_path, SHAPES)
    batch = shape(shapes_events([(1, "1", None), (2, "2", None), (3, "3", None), (-4, "4", None)]), loaded)
    assert batch.rows.select("n", "doubled", "quadrupled", "label").rows() == [
        (n, 2 * n, 4 * n, "big" if 4 * n > 10 else "small") for n in (1, 2, 3, -4)
    ]
    assert batch.rows.schema["doubled"] == pl.Int64
    assert batch.rows.schema["label"] == pl.String


def test_type_casts_the_computed_value(tmp_path: Path) -> None:
    """`type:` casts the result: an integer as text, as a decimal, and numeric text as an integer."""
    loaded = write_pipeline(tmp_path, SHAPES)
    batch = shape(shapes_events([(7, "12", "5"), (-30, "40", None), (0, "-3", "0")]), loaded)
    assert batch.rows.schema["n_text"] == pl.String
    assert batch.rows.schema["n_money"] == pl.Decimal(10, 2)
    assert batch.rows.schema["code_number"] == pl.Int64
    assert batch.rows.schema["note_number"] == pl.Int64
    assert batch.rows.select("n_text", "n_money", "code_number", "note_number").rows() == [
        ("7", Decimal("7.00"), 12, 5),
        ("-30", Decimal("-30.00"), 40, None),
        ("0", Decimal("0.00"), -3, 0),
    ]
    assert batch.rejected.height == 0


def test_null_in_a_non_nullable_column_rejects_the_row_with_a_reason(tmp_path: Path) -> None:
    """A transform giving NULL where the table admits none: the row goes to `rejected` naming the column, not to
    the rows; NULL in a nullable column (from an optional field) is kept."""
    loaded = write_pipeline(tmp_path, SHAPES)
    nullable = {c.name: c.nullable for c in loaded.columns.sink}
    assert nullable["code_number"] is False  # read from a required field
    assert nullable["note_number"] is True  # read from an optional field
    events = shapes_events([(1, "10", None), (2, "ten", "1"), (3, "30", "three"), (4, "", None), (5, "50", "5")])
    batch = shape(events, loaded)
    assert batch.rows.select("n", "code_number", "note_number").rows() == [(1, 10, None), (3, 30, None), (5, 50, 5)]
    assert dict(batch.rejected.schema) == {"kafka_partition": pl.UInt32, "kafka_offset": pl.UInt64, "error": pl.String}
    assert batch.rejected.rows() == [
        (0, 1, "code_number is NULL after the transform, and the table admits none"),
        (0, 3, "code_number is NULL after the transform, and the table admits none"),
    ]
    assert batch.dropped_by_python == 0


def test_nullable_false_makes_a_computed_null_a_rejection(tmp_path: Path) -> None:
    """`nullable: false` declares a column NULL-free: rows where the expression is NULL are rejected."""
    loaded = write_pipeline(
        tmp_path,
        """
        name: strict
        source:
          topic: strict
          fields:
            n: int64
        transform:
          positive: {sql: "CASE WHEN n > 0 THEN n END", nullable: false}
        sink:
          table: strict
        """,
    )
    events = shapes_events([(5, "", None), (-1, "", None), (0, "", None), (9, "", None)]).select(
        "n", "kafka_partition", "kafka_offset"
    )
    batch = shape(events, loaded)
    assert batch.rows["positive"].to_list() == [5, 9]
    assert batch.rows["kafka_offset"].to_list() == [0, 3]
    assert batch.rejected["kafka_offset"].to_list() == [1, 2]
    assert all("positive" in reason for reason in batch.rejected["error"].to_list())


# --- the python step ------------------------------------------------------------------------------------------------


PYTHON_FUNCTIONS = '''
import polars as pl


def _size(frame):
    return pl.when(pl.col("doubled") >= 10).then(pl.lit("big")).otherwise(pl.lit("small")).alias("size")


def even_only(frame):
    """Adds size and keeps the events with an even n."""
    return frame.filter(pl.col("n") % 2 == 0).with_columns(_size(frame))


def as_list(frame):
    return frame.with_columns(_size(frame)).to_dicts()


def adds_a_row(frame):
    extra = frame.head(1).with_columns(pl.lit(10_000, dtype=pl.UInt64).alias("kafka_offset"))
    return pl.concat([frame, extra]).with_columns(_size(frame))


def repeats_an_offset(frame):
    return pl.concat([frame, frame.head(1)]).with_columns(_size(frame))


def drops_a_column(frame):
    return frame.with_columns(_size(frame)).drop("doubled")


def forgets_its_column(frame):
    return frame


def nulls_an_offset(frame):
    extra = frame.head(1).with_columns(pl.lit(None, dtype=pl.UInt64).alias("kafka_offset"))
    return pl.concat([frame, extra]).with_columns(_size(frame))
'''


@pytest.fixture
def stepped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[str], LoadedPipeline]]:
    """A pipeline whose python step is `function` of a module written into tmp_path."""
    module = "python_step_" + re.sub(r"\W", "_", tmp_path.name)
    (tmp_path / f"{module}.py").write_text(PYTHON_FUNCTIONS)
    monkeypatch.syspath_prepend(str(tmp_path))

    def load(function: str) -> LoadedPipeline:
        return write_pipeline(
            tmp_path,
            f"""
            name: stepped
            source:
              topic: stepped
              fields:
                n: int64
            transform:
              doubled: "n * 2"
            python:
              function: {module}:{function}
              adds: {{size: string}}
            sink:
              table: stepped
              columns: [n, doubled, size, processed_at, kafka_topic, kafka_partition, kafka_offset]
            """,
        )

    yield load
    sys.modules.pop(module, None)


def numbers(values: list[int]) -> pl.DataFrame:
    return pl.DataFrame(
        {"n": values, "kafka_partition": [2] * len(values), "kafka_offset": [100 + i for i in range(len(values))]},
        schema={"n": pl.Int64, "kafka_partition": pl.UInt32, "kafka_offset": pl.UInt64},
    )


def test_python_step_adds_its_declared_column_and_may_drop_events(stepped: Callable[[str], LoadedPipeline]) -> None:
    """The function sees the computed columns, adds `size`, drops odd n; dropped_by_python counts the dropped."""
    loaded = stepped("even_only")
    assert [c.name for c in loaded.columns.sink] == [
        "n",
        "doubled",
        "size",
        "processed_at",
        "kafka_topic",
        "kafka_partition",
        "kafka_offset",
    ]
    values = [1, 2, 3, 4, 5, 6, 8]
    batch = shape(numbers(values), loaded)
    kept = [(i, n) for i, n in enumerate(values) if n % 2 == 0]
    assert batch.rows.rows() == [
        (n, 2 * n, "big" if 2 * n >= 10 else "small", PROCESSED_AT, "stepped", 2, 100 + i) for i, n in kept
    ]
    assert batch.rows.schema["size"] == pl.String
    assert batch.dropped_by_python == len(values) - len(kept) == 3
    assert batch.rejected.height == 0


@pytest.mark.parametrize(
    ("function", "message"),
    [
        ("as_list", "returned list, not a polars DataFrame"),
        ("adds_a_row", "may drop events but not add or repeat them"),
        ("repeats_an_offset", "may drop events but not add or repeat them"),
        ("drops_a_column", "dropped or did not add columns: doubled"),
        ("forgets_its_column", "dropped or did not add columns: size"),
    ],
)
def test_python_step_breaking_its_contract_is_an_error(
    stepped: Callable[[str], LoadedPipeline], function: str, message: str
) -> None:
    """A function returning something else than a DataFrame, adding or repeating rows, or losing a column fails."""
    loaded = stepped(function)
    with pytest.raises(PythonStepError, match=re.escape(message)) as raised:
        shape(numbers([1, 2, 3]), loaded)
    assert function in str(raised.value)


def test_python_step_adding_a_row_without_a_position_is_an_error(stepped: Callable[[str], LoadedPipeline]) -> None:
    """A row whose kafka_offset is NULL has no Kafka position: adding one breaks the contract like any added row."""
    loaded = stepped("nulls_an_offset")
    with pytest.raises(PythonStepError):
        shape(numbers([1, 2, 3]), loaded)
