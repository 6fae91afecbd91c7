"""Transform: computed columns (SQL expressions evaluated by polars), the optional python step, and the
rows shaped for the sink table — `processed_at` and the Kafka position always included.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

import polars as pl

from clickhouse_etl.core.pipeline.columns import PipelineColumns, converted, resolve_function, sql_expression
from clickhouse_etl.core.pipeline.model import Pipeline
from clickhouse_etl.core.pipeline.types import DATETIME_MS, FieldType


class PythonStepError(RuntimeError):
    """The pipeline's python function broke its contract (a DataFrame in, a DataFrame of those events out)."""


@dataclass(frozen=True)
class TransformedBatch:
    rows: pl.DataFrame  # the sink table's columns
    rejected: pl.DataFrame  # kafka_partition, kafka_offset, error: NULL where the table admits none
    dropped_by_python: int


def computed_columns(events: pl.DataFrame, pipeline: Pipeline) -> pl.DataFrame:
    """The transform section, in order: each expression may read the columns computed before it."""
    for name, computed in pipeline.transform.items():
        events = events.with_columns(sql_expression(computed.sql).alias(name))
        if computed.type is not None:
            conversion = converted(pl.col(name), events.schema[name], FieldType.parse(computed.type))
            events = events.with_columns(conversion.alias(name))  # type: ignore[union-attr]  # checked at load
    return events


def run_python_step(events: pl.DataFrame, pipeline: Pipeline) -> pl.DataFrame:
    """The python function over the events; it may add its declared columns and drop events, nothing else."""
    step = pipeline.python
    if step is None:
        return events
    result = resolve_function(step.function)(events)
    if not isinstance(result, pl.DataFrame):
        raise PythonStepError(f"{step.function} returned {type(result).__name__}, not a polars DataFrame")
    missing = [name for name in [*events.columns, *step.adds] if name not in result.columns]
    if missing:
        raise PythonStepError(f"{step.function} dropped or did not add columns: {', '.join(missing)}")
    offsets = result["kafka_offset"]
    known = offsets.is_in(events["kafka_offset"].implode())
    if offsets.null_count() or offsets.is_duplicated().any() or not known.all():
        raise PythonStepError(
            f"{step.function} may drop events but not add or repeat them: every row must keep a Kafka position"
        )
    return result.select(*events.columns, *step.adds)


def to_sink_rows(
    events: pl.DataFrame, pipeline: Pipeline, columns: PipelineColumns, processed_at: datetime | None = None
) -> TransformedBatch:
    processed_at = processed_at or datetime.now(UTC)
    before_python = computed_columns(events, pipeline)
    shaped = run_python_step(before_python, pipeline).with_columns(
        pl.lit(processed_at).cast(DATETIME_MS).alias("processed_at"),
        pl.lit(pipeline.topic).alias("kafka_topic"),
    )
    rows = shaped.select([pl.col(c.name).cast(c.dtype, strict=False) for c in columns.sink])
    required = [c.name for c in columns.sink if not c.nullable]
    null_in = pl.coalesce(
        [
            pl.when(pl.col(name).is_null()).then(
                pl.lit(f"{name} is NULL after the transform, and the table admits none")
            )
            for name in required
        ]
        or [pl.lit(None, dtype=pl.String)]
    )
    checked = rows.with_columns(null_in.alias("__error"))
    rejected = checked.filter(pl.col("__error").is_not_null()).select(
        "kafka_partition", "kafka_offset", pl.col("__error").alias("error")
    )
    return TransformedBatch(
        rows=checked.filter(pl.col("__error").is_null()).drop("__error"),
        rejected=rejected,
        dropped_by_python=before_python.height - shaped.height,
    )
