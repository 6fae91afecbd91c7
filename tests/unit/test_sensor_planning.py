"""Unit tests of clickhouse_etl.core.planning.plan_tick (pure planning, no Kafka and no Dagster instance), and
of the run requests the sensor makes of its plan."""

from __future__ import annotations

import json
import os
import random

import dagster as dg
import pytest

from clickhouse_etl.core.pipeline.loading import load_pipelines
from clickhouse_etl.core.planning import WAITING_KEY, plan_tick
from clickhouse_etl.core.ranges import OffsetRange
from clickhouse_etl.core.settings import CONNECTION_VARIABLES, ENV_PREFIX, load_settings
from clickhouse_etl.orchestration.jobs import build_ingest_job
from clickhouse_etl.orchestration.resources import resources_from_settings
from clickhouse_etl.orchestration.sensors import range_run_request

TOPIC = "ad_clicks"
NOW = 1_700_000_000.0
PIPELINE = load_pipelines("ad_clicks", environment={})[0].pipeline
INGEST_JOB = build_ingest_job(PIPELINE, resources_from_settings(load_settings()))


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch, tmp_path):
    for name in list(os.environ):
        if name.upper().startswith(ENV_PREFIX) or name.upper() in CONNECTION_VARIABLES.values():
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)


def make_settings(max_records: int = 10, wait: float = 5.0, start_position: str = "earliest"):
    return load_settings(max_records_per_run=max_records, max_batch_wait_seconds=wait, start_position=start_position)


def tick(cursor, watermarks, settings, now=NOW, failed=None, ledger_ends=None, topic=TOPIC, busy=frozenset()):
    """The plan as the sensor submits it: run requests, the new cursor, the lag."""
    plan = plan_tick(cursor, topic, watermarks, failed or {}, ledger_ends or {}, settings, now, busy=busy)
    return [range_run_request(PIPELINE, run) for run in plan.runs], plan.cursor, plan.lag


def planned(requests) -> list[tuple[int, int, int]]:
    return [(int(r.tags["kafka/partition"]), int(r.tags["kafka/start"]), int(r.tags["kafka/end"])) for r in requests]


def test_fresh_cursor_starts_at_the_low_watermark():
    requests, cursor, lag = tick({}, {0: (5, 25), 1: (0, 0), 2: (7, 7)}, make_settings())
    assert planned(requests) == [(0, 5, 15), (0, 15, 25)]
    assert cursor[TOPIC] == {"0": 25, "1": 0, "2": 7}
    assert cursor[WAITING_KEY] == {f"{TOPIC}/{p}": NOW for p in range(3)}  # every partition is caught up now
    assert lag == {0: 20, 1: 0, 2: 0}


def test_fresh_cursor_latest_starts_at_the_high_watermark():
    requests, cursor, lag = tick({}, {0: (5, 25), 1: (0, 3)}, make_settings(start_position="latest"))
    assert requests == []
    assert cursor[TOPIC] == {"0": 25, "1": 3}
    assert lag == {0: 0, 1: 0}


@pytest.mark.parametrize("start_position", ["earliest", "latest"])
def test_ledger_ends_win_over_the_start_position(start_position):
    requests, cursor, lag = tick(
        {}, {0: (0, 40), 1: (0, 40)}, make_settings(start_position=start_position), ledger_ends={0: 20, 1: None}
    )
    expected_1 = [(1, 0, 10), (1, 10, 20), (1, 20, 30), (1, 30, 40)] if start_position == "earliest" else []
    assert planned(requests) == [(0, 20, 30), (0, 30, 40), *expected_1]
    assert cursor[TOPIC] == {"0": 40, "1": 40}
    assert lag[0] == 20
    assert lag[1] == (40 if start_position == "earliest" else 0)


def test_ledger_ends_are_ignored_for_partitions_already_in_the_cursor():
    requests, cursor, _ = tick({TOPIC: {"0": 30}}, {0: (0, 40)}, make_settings(), ledger_ends={0: 10})
    assert planned(requests) == [(0, 30, 40)]
    assert cursor[TOPIC] == {"0": 40}


def test_ranges_are_chunked_with_run_keys_tags_and_valid_run_config():
    requests, _, _ = tick({TOPIC: {"3": 100}}, {3: (0, 135)}, make_settings(max_records=10, wait=0.0))
    assert [r.run_key for r in requests] == [
        "ad_clicks:3:100-110",
        "ad_clicks:3:110-120",
        "ad_clicks:3:120-130",
        "ad_clicks:3:130-135",
    ]
    for request, (start, end) in zip(requests, [(100, 110), (110, 120), (120, 130), (130, 135)], strict=True):
        assert request.job_name == "ingest_clicks"
        assert request.tags == {
            "etl/pipeline": "ad_clicks",
            "kafka/topic": "ad_clicks",
            "kafka/partition": "3",
            "kafka/start": str(start),
            "kafka/end": str(end),
            ".dagster/etl_partition_slot": "ad_clicks:ad_clicks:3",
        }
        config = request.run_config["ops"]["read"]["config"]
        assert config == {"topic": "ad_clicks", "partition": 3, "start": start, "end": end, "force": False}
        validated = dg.validate_run_config(INGEST_JOB, request.run_config)
        assert validated["ops"]["read"]["config"]["start"] == start


def test_invalid_run_config_is_rejected_by_the_job():
    with pytest.raises(dg.DagsterInvalidConfigError):
        dg.validate_run_config(INGEST_JOB, {"ops": {"read": {"config": {"topic": "t"}}}})


def test_young_small_tail_waits_and_records_when_it_was_first_seen():
    settings = make_settings(max_records=10, wait=5.0)
    requests, cursor, lag = tick({TOPIC: {"0": 20}}, {0: (0, 25)}, settings, now=NOW)
    assert requests == []
    assert cursor[TOPIC] == {"0": 20}
    assert cursor[WAITING_KEY] == {f"{TOPIC}/0": NOW}
    assert lag == {0: 5}

    # more arrives but the tail is still young: the first-seen time is kept
    requests, cursor, lag = tick(cursor, {0: (0, 27)}, settings, now=NOW + 4.9)
    assert requests == []
    assert cursor[WAITING_KEY] == {f"{TOPIC}/0": NOW}
    assert lag == {0: 7}

    # after max_batch_wait_seconds the tail is flushed and the cursor reaches the high watermark
    requests, cursor, lag = tick(cursor, {0: (0, 27)}, settings, now=NOW + 5.0)
    assert planned(requests) == [(0, 20, 27)]
    assert cursor[TOPIC] == {"0": 27}
    assert cursor[WAITING_KEY] == {f"{TOPIC}/0": NOW + 5.0}
    assert lag == {0: 7}  # lag is measured before this tick's ranges run


def test_data_arriving_after_a_caught_up_tick_is_flushed_at_the_first_tick_past_the_wait():
    """New offsets arrived after the last caught-up tick: their wait counts from that tick, not from the
    (later) tick that first sees them, so ticks further apart than the wait flush every tick."""
    settings = make_settings(max_records=10, wait=5.0)
    _, cursor, _ = tick({TOPIC: {"0": 20}}, {0: (0, 20)}, settings, now=NOW)
    assert cursor[WAITING_KEY] == {f"{TOPIC}/0": NOW}
    requests, cursor, _ = tick(cursor, {0: (0, 23)}, settings, now=NOW + 4.0)
    assert requests == []  # arrived at most 4 s ago
    requests, cursor, _ = tick(cursor, {0: (0, 24)}, settings, now=NOW + 6.0)
    assert planned(requests) == [(0, 20, 24)]
    assert cursor[WAITING_KEY] == {f"{TOPIC}/0": NOW + 6.0}


def test_full_ranges_go_at_once_and_the_remaining_tail_waits():
    settings = make_settings(max_records=10, wait=5.0)
    requests, cursor, _ = tick({TOPIC: {"0": 0}}, {0: (0, 25)}, settings, now=NOW)
    assert planned(requests) == [(0, 0, 10), (0, 10, 20)]
    assert cursor[TOPIC] == {"0": 20}
    assert cursor[WAITING_KEY] == {f"{TOPIC}/0": NOW}

    requests, cursor, _ = tick(cursor, {0: (0, 25)}, settings, now=NOW + 6)
    assert planned(requests) == [(0, 20, 25)]
    assert cursor[TOPIC] == {"0": 25}
    assert cursor[WAITING_KEY] == {f"{TOPIC}/0": NOW + 6}


def test_waiting_restarts_when_caught_up():
    settings = make_settings(max_records=10, wait=5.0)
    cursor = {TOPIC: {"0": 20}, WAITING_KEY: {f"{TOPIC}/0": NOW - 100}}
    requests, cursor, lag = tick(cursor, {0: (0, 20)}, settings, now=NOW)
    assert requests == []
    assert cursor[WAITING_KEY] == {f"{TOPIC}/0": NOW}
    assert lag == {0: 0}


def test_zero_wait_flushes_every_tail_immediately():
    requests, cursor, _ = tick({}, {0: (0, 3), 1: (0, 1)}, make_settings(max_records=10, wait=0.0))
    assert planned(requests) == [(0, 0, 3), (1, 0, 1)]
    assert cursor[TOPIC] == {"0": 3, "1": 1}


def test_failed_ranges_are_requested_again_with_a_new_run_key():
    settings = make_settings(max_records=10, wait=5.0)
    failed = {OffsetRange(TOPIC, 1, 10, 20): 4, OffsetRange(TOPIC, 0, 0, 10): 1}
    cursor = {TOPIC: {"0": 50, "1": 50}}
    requests, new_cursor, _ = tick(cursor, {0: (0, 50), 1: (0, 50)}, settings, failed=failed)
    assert [r.run_key for r in requests] == ["ad_clicks:0:0-10:retry-1", "ad_clicks:1:10-20:retry-4"]
    assert planned(requests) == [(0, 0, 10), (1, 10, 20)]
    for request in requests:
        dg.validate_run_config(INGEST_JOB, request.run_config)
    assert new_cursor[TOPIC] == {"0": 50, "1": 50}  # retries do not move the cursor

    # as long as they stay failed they are requested on every tick, next to new ranges
    requests, _, _ = tick(new_cursor, {0: (0, 60), 1: (0, 50)}, settings, failed=failed, now=NOW + 1)
    assert [r.run_key for r in requests] == [
        "ad_clicks:0:0-10:retry-1",
        "ad_clicks:1:10-20:retry-4",
        "ad_clicks:0:50-60",
    ]


def test_failed_ranges_are_kept_even_when_no_watermarks_are_known():
    failed = {OffsetRange(TOPIC, 2, 0, 5): 2}
    requests, _, lag = tick({}, {}, make_settings(), failed=failed)
    assert [r.run_key for r in requests] == ["ad_clicks:2:0-5:retry-2"]
    assert lag == {}


def test_cursor_round_trips_through_json_and_plans_identically():
    settings = make_settings(max_records=10, wait=5.0)
    other_topic = {"other": {"0": 7}, WAITING_KEY: {"other/0": NOW - 100}}
    _, cursor, _ = tick(other_topic, {0: (0, 25), 1: (0, 4)}, settings, now=NOW)
    restored = json.loads(json.dumps(cursor, sort_keys=True))
    assert restored == cursor
    assert restored["other"] == {"0": 7}  # other topics' state is kept
    assert restored[WAITING_KEY]["other/0"] == NOW - 100
    watermarks = {0: (0, 31), 1: (0, 9)}
    a = tick(cursor, watermarks, settings, now=NOW + 2)
    b = tick(restored, watermarks, settings, now=NOW + 2)
    assert planned(a[0]) == planned(b[0])
    assert [r.run_key for r in a[0]] == [r.run_key for r in b[0]]
    assert a[1] == b[1]
    assert a[2] == b[2]


def test_input_cursor_is_not_mutated():
    cursor = {TOPIC: {"0": 0}, WAITING_KEY: {}}
    snapshot = json.dumps(cursor, sort_keys=True)
    tick(cursor, {0: (0, 25)}, make_settings())
    assert json.dumps(cursor, sort_keys=True) == snapshot


def test_lag_per_partition():
    cursor = {TOPIC: {"0": 10, "1": 30, "2": 50}}
    _, _, lag = tick(cursor, {0: (0, 25), 1: (0, 30), 2: (0, 40), 3: (5, 9)}, make_settings())
    assert lag == {0: 15, 1: 0, 2: 0, 3: 4}  # a cursor ahead of the watermark is no negative lag


@pytest.mark.parametrize("seed", range(5))
def test_simulated_ticks_cover_every_offset_exactly_once(seed):
    """Many ticks with growing watermarks: planned ranges tile [low, final high) without gap or overlap."""
    rng = random.Random(seed)
    max_records = rng.choice([1, 7, 50])
    wait = rng.choice([0.0, 2.0, 5.0])
    settings = make_settings(max_records=max_records, wait=wait)
    partitions = {p: rng.randrange(0, 20) for p in range(3)}
    highs = dict(partitions)
    cursor: dict = {}
    now = NOW
    covered: dict[int, list[tuple[int, int]]] = {p: [] for p in partitions}
    for _ in range(60):
        for p in highs:
            highs[p] += rng.choice([0, 0, 1, 3, max_records, 2 * max_records + 1])
        now += rng.choice([0.5, 1.0, 3.0])
        requests, cursor, _ = tick(cursor, {p: (partitions[p], highs[p]) for p in highs}, settings, now=now)
        cursor = json.loads(json.dumps(cursor))
        for partition, start, end in planned(requests):
            assert end - start <= max_records
            covered[partition].append((start, end))
    # a quiet period flushes every tail
    requests, cursor, _ = tick(cursor, {p: (partitions[p], highs[p]) for p in highs}, settings, now=now + wait + 1)
    for partition, start, end in planned(requests):
        covered[partition].append((start, end))
    for p, ranges in covered.items():
        position = partitions[p]
        for start, end in ranges:
            assert start == position, (p, ranges)
            position = end
        assert position == highs[p]
        assert cursor[TOPIC][str(p)] == highs[p]
    assert set(cursor[WAITING_KEY]) == {f"{TOPIC}/{p}" for p in partitions}


def test_a_busy_partition_accumulates_into_one_larger_range():
    settings = make_settings(max_records=100, wait=0.0)
    cursor = {TOPIC: {"0": 10, "1": 10}}
    requests, cursor, lag = tick(cursor, {0: (0, 30), 1: (0, 30)}, settings, busy=frozenset({0}))
    assert planned(requests) == [(1, 10, 30)]  # partition 0 waits for its run to end
    assert cursor[TOPIC] == {"0": 10, "1": 30}
    assert lag == {0: 20, 1: 20}
    requests, cursor, _ = tick(cursor, {0: (0, 70), 1: (0, 30)}, settings, now=NOW + 5)
    assert planned(requests) == [(0, 10, 70)]  # one range for everything that accumulated
