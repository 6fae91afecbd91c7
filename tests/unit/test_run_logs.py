"""Run logs as JSON lines carry the run id, the step and the range tags, for log shippers."""

from __future__ import annotations

import json

import dagster as dg
import pytest

from clickhouse_etl.core.ranges import OffsetRange
from clickhouse_etl.core.settings import current_settings
from clickhouse_etl.orchestration.jobs import console_logger
from clickhouse_etl.orchestration.tags import range_tags


@dg.op
def say_committed(context) -> None:
    context.log.info("committed t/0/0-10")


@dg.job(logger_defs={"console": console_logger})
def logging_job() -> None:
    say_committed()


@pytest.mark.parametrize("log_format", ["json", "text"])
def test_console_logger_format(
    log_format: str, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("CLICKHOUSE_ETL_LOG_FORMAT", log_format)
    current_settings.cache_clear()
    try:
        result = logging_job.execute_in_process(
            run_config={"loggers": {"console": {"config": {"log_level": "INFO"}}}},
            tags=range_tags("p", OffsetRange("t", 0, 0, 10)),
        )
    finally:
        current_settings.cache_clear()
    lines = [line for line in capfd.readouterr().err.splitlines() if "committed t/0/0-10" in line]
    assert lines
    if log_format == "text":
        assert not lines[0].startswith("{")
        return
    record = json.loads(lines[0])
    meta = record["dagster_meta"]
    assert meta["run_id"] == result.run_id and meta["step_key"] == "say_committed"
    assert {meta["job_tags"][k] for k in ("kafka/topic", "kafka/partition", "kafka/start", "kafka/end")} == {
        "t",
        "0",
        "10",
    }


@pytest.mark.parametrize(("level", "events_shown"), [("INFO", False), ("DEBUG", True)])
def test_a_run_logs_one_line_at_info_and_every_event_at_debug(
    level: str, events_shown: bool, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("CLICKHOUSE_ETL_LOG_LEVEL", level)
    current_settings.cache_clear()
    try:
        # The logger named without a level, as every range's run config names it: the settings' level applies.
        assert logging_job.execute_in_process(run_config={"loggers": {"console": {"config": {}}}}).success
    finally:
        current_settings.cache_clear()
    err = capfd.readouterr().err
    assert "committed t/0/0-10" in err
    assert ("STEP_START" in err) == events_shown
