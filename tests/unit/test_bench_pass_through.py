"""Unit tests of the bench's raw pass-through: NDJSON joining, its table from a pipeline, and its read loop
against a stand-in consumer (the real one runs in tests/integration/test_bench.py)."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
from confluent_kafka import KafkaError, KafkaException

from clickhouse_etl.core.pipeline.loading import load_pipelines
from clickhouse_etl.dev.pass_through import (
    RAW_INSERT_MESSAGES,
    RAW_INSERT_SETTINGS,
    copy_topic,
    in_batches,
    ndjson,
    raw_columns,
    raw_table_ddl,
)

AD_CLICKS, API_USAGE = (loaded.pipeline for loaded in load_pipelines("ad_clicks,api_usage", environment={}))


# --- NDJSON ---------------------------------------------------------------------------------------------------


def test_values_are_joined_one_a_line() -> None:
    values = [b'{"a":1}', b'{"a":2}', b"not json", b""]
    assert ndjson(values) == b'{"a":1}\n{"a":2}\nnot json\n'
    assert [json.loads(line) for line in ndjson(values[:2]).splitlines()] == [{"a": 1}, {"a": 2}]


def test_tombstones_carry_no_event() -> None:
    assert ndjson([None, b'{"a":1}', None, b'{"a":2}']) == b'{"a":1}\n{"a":2}'
    assert ndjson([None]) == b""
    assert ndjson([]) == b""


@pytest.mark.parametrize("first", [b'["m-1", 3]', b'  ["m-1", 3]', b"[]"])
def test_a_batch_never_starts_with_an_array(first: bytes) -> None:
    """JSONEachRow would read the whole buffer as one array and fail the batch."""
    joined = ndjson([first, b"oops", b'{"a":1}', b'{"a":2}'])
    assert joined.startswith(b'{"a":1}')
    assert sorted(joined.split(b"\n")) == sorted([first, b"oops", b'{"a":1}', b'{"a":2}'])


def test_a_batch_of_only_arrays_is_nothing_to_insert() -> None:
    assert ndjson([b"[1]", b"[2]"]) == b""


def test_empty_values_before_an_array_do_not_hide_it() -> None:
    joined = ndjson([b"", b"[1]", b'{"a":1}'])
    assert joined.lstrip().startswith(b"{")


def test_batches_are_full_and_the_rest_waits() -> None:
    values: list[bytes | None] = [b"{}"] * (2 * RAW_INSERT_MESSAGES + 5)
    full, rest = in_batches(values)
    assert [len(batch) for batch in full] == [RAW_INSERT_MESSAGES, RAW_INSERT_MESSAGES] and len(rest) == 5
    assert in_batches(values[:3]) == ([], values[:3])


# --- its table ------------------------------------------------------------------------------------------------


def test_raw_columns_are_the_pipelines_json_fields() -> None:
    assert raw_columns(AD_CLICKS) == ["click_id", "user_id", "ad_id", "timestamp_ms", "ip_address"]
    assert raw_columns(API_USAGE) == list(API_USAGE.source.fields)


def test_raw_table_holds_every_field_as_nullable_text() -> None:
    ddl = raw_table_ddl("analytics", "bench_raw_x", AD_CLICKS)
    assert ddl.startswith("CREATE TABLE `analytics`.`bench_raw_x` (")
    for name in AD_CLICKS.source.fields:
        assert f"`{name}` Nullable(String)" in ddl
    assert ddl.count("Nullable(String)") == len(AD_CLICKS.source.fields)
    assert ddl.endswith("ENGINE = MergeTree ORDER BY tuple()")


def test_a_new_field_is_a_new_raw_column() -> None:
    source = AD_CLICKS.source.model_copy(
        update={"fields": {**AD_CLICKS.source.fields, "country": AD_CLICKS.source.fields["user_id"]}}
    )
    assert raw_columns(AD_CLICKS.model_copy(update={"source": source}))[-1] == "country"


def test_malformed_lines_are_skipped_within_bounds() -> None:
    assert RAW_INSERT_SETTINGS["input_format_skip_unknown_fields"] == 1
    assert 0 < RAW_INSERT_SETTINGS["input_format_allow_errors_ratio"] < 1
    assert RAW_INSERT_SETTINGS["input_format_allow_errors_num"] > 0


# --- the read loop --------------------------------------------------------------------------------------------


@dataclass
class FakeError:
    code_value: int

    def code(self) -> int:
        return self.code_value


@dataclass
class FakeMessage:
    partition_id: int
    offset_value: int
    payload: bytes | None = None
    failure: FakeError | None = None

    def partition(self) -> int:
        return self.partition_id

    def offset(self) -> int:
        return self.offset_value

    def value(self) -> bytes | None:
        return self.payload

    def error(self) -> FakeError | None:
        return self.failure


class FakeConsumer:
    """Hands out prepared batches; every consume() after them is an empty poll."""

    def __init__(self, batches: list[list[FakeMessage]]) -> None:
        self.batches = batches
        self.assigned: list[tuple[str, int, int]] = []
        self.asked: list[int] = []

    def assign(self, partitions: list) -> None:
        self.assigned = [(tp.topic, tp.partition, tp.offset) for tp in partitions]

    def consume(self, num_messages: int, timeout: float) -> list[FakeMessage]:
        self.asked.append(num_messages)
        return self.batches.pop(0) if self.batches else []


def messages(partition: int, start: int, end: int) -> list[FakeMessage]:
    return [FakeMessage(partition, offset, b'{"p":%d,"o":%d}' % (partition, offset)) for offset in range(start, end)]


def eof(partition: int, offset: int) -> FakeMessage:
    return FakeMessage(partition, offset, failure=FakeError(KafkaError._PARTITION_EOF))


def test_every_partition_is_read_by_assignment_up_to_its_high_watermark() -> None:
    inserted: list[bytes] = []

    def insert(block: bytes) -> int:
        inserted.append(block)
        return len(block.splitlines())

    batches = [messages(0, 0, 600) + messages(1, 5, 405), messages(0, 600, 1000) + messages(1, 405, 410)]
    # A message beyond the high watermark read first (produced later) is not the bench's.
    batches.append([*messages(0, 1000, 1002), eof(1, 410), eof(0, 1000)])
    consumer = FakeConsumer(batches)
    counts = copy_topic(consumer, "t", {0: (0, 1000), 1: (5, 410), 2: (7, 7)}, 1000, insert, 5.0)  # type: ignore[arg-type]
    assert consumer.assigned == [("t", 0, 0), ("t", 1, 5)]  # an empty partition is not read
    assert set(consumer.asked) == {1000}
    assert counts == (1405, 1405, 1)
    lines = [json.loads(line) for block in inserted for line in block.splitlines()]
    assert sorted((line["p"], line["o"]) for line in lines) == sorted(
        [(0, o) for o in range(1000)] + [(1, o) for o in range(5, 410)]
    )


def test_each_full_batch_is_one_insert() -> None:
    sizes: list[int] = []

    def insert(block: bytes) -> int:
        sizes.append(len(block.splitlines()))
        return sizes[-1]

    total = 2 * RAW_INSERT_MESSAGES + 10
    batches = [messages(0, start, min(start + 1000, total)) for start in range(0, total, 1000)]
    counts = copy_topic(FakeConsumer(batches), "t", {0: (0, total)}, 1000, insert, 5.0)  # type: ignore[arg-type]
    assert sizes == [RAW_INSERT_MESSAGES, RAW_INSERT_MESSAGES, 10]
    assert counts == (total, total, 3)


def test_control_records_end_a_partition_at_its_end_of_partition_event() -> None:
    """Transaction markers take offsets without messages: the partition ends when the consumer says so."""
    consumer = FakeConsumer([[*messages(0, 0, 9), eof(0, 10)]])
    assert copy_topic(consumer, "t", {0: (0, 10)}, 1000, lambda block: len(block.splitlines()), 5.0) == (9, 9, 1)  # type: ignore[arg-type]


def test_a_real_kafka_error_fails_the_pass_through() -> None:
    consumer = FakeConsumer([[FakeMessage(0, 0, failure=FakeError(KafkaError._TRANSPORT))]])
    with pytest.raises(KafkaException):
        copy_topic(consumer, "t", {0: (0, 10)}, 1000, lambda block: 0, 5.0)  # type: ignore[arg-type]


def test_a_topic_that_stops_answering_times_out() -> None:
    with pytest.raises(TimeoutError):
        copy_topic(FakeConsumer([]), "t", {0: (0, 10)}, 1000, lambda block: 0, 0.0)  # type: ignore[arg-type]
