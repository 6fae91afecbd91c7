"""The columns a pipeline's frames carry at each stage, and every reference between its sections checked.

Resolution walks the stages in the order a run does — decode, enrich, filter, transform, python, system
columns, aggregate, sink — keeping the columns known so far. Each reference (a dedup key, a join key, a
column a SQL expression reads, a group-by column, a sink column…) is checked against what exists at that
point, and every problem is reported with its path in the file and, where a name is close, a suggestion.
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import polars as pl

from clickhouse_etl.core.pipeline.model import SYSTEM_COLUMNS, Aggregate, Pipeline
from clickhouse_etl.core.pipeline.types import DATETIME_MS, Column, FieldType, clickhouse_type

POSITION_COLUMNS = {"kafka_partition": pl.UInt32(), "kafka_offset": pl.UInt64()}
SYSTEM_TYPES = {"processed_at": DATETIME_MS, "kafka_topic": pl.String(), **POSITION_COLUMNS}
JOINABLE_KINDS = ("string", "int64", "uuid", "bool", "decimal", "ip")
WINDOW_TRUNCATION = {"minute": "1m", "hour": "1h", "day": "1d"}


@dataclass(frozen=True)
class Problem:
    path: str  # e.g. "enrich[0].join_key"
    message: str


class PipelineDefinitionError(ValueError):
    """The pipeline's sections do not fit together; carries every problem found."""

    def __init__(self, problems: list[Problem]) -> None:
        super().__init__("; ".join(f"{p.path}: {p.message}" for p in problems))
        self.problems = problems


def sql_expression(text: str) -> pl.Expr:
    """A SQL expression as a polars expression: parsed by polars' SQL parser, never evaluated as Python."""
    return pl.sql_expr(text)


def converted(expression: pl.Expr, source: pl.DataType, target: FieldType) -> pl.Expr | None:
    """`expression` (of type `source`) as a value of the declared type, or None where no conversion exists.

    Text is parsed (a value that does not parse becomes NULL); a number given for a timestamp counts the
    timestamp's unit since the epoch, as a source field of that type does.
    """
    if target.kind in ("string", "ip", "uuid"):
        if target.kind != "string" and source != pl.String:
            return None
        return expression.cast(pl.String)
    if target.kind == "timestamp":
        if source.is_integer():
            return pl.from_epoch(expression, time_unit=target.unit).cast(target.polars)  # type: ignore[arg-type]
        return expression.cast(target.polars) if isinstance(source, (pl.Datetime, pl.Date)) else None
    if target.kind == "bool":
        return expression.cast(pl.Boolean) if source.is_numeric() or source == pl.Boolean else None
    if source.is_numeric() or source in (pl.Boolean, pl.String) or isinstance(source, pl.Decimal):
        return expression.cast(target.polars, strict=False)
    return None


def resolve_function(reference: str) -> Callable[[pl.DataFrame], pl.DataFrame]:
    """The `module:function` of a python step."""
    module_name, _, function_name = reference.partition(":")
    function = getattr(importlib.import_module(module_name), function_name)
    if not callable(function):
        raise TypeError(f"{reference} is not callable")
    return function


@dataclass(frozen=True)
class AggregateColumns:
    """The partials table of one aggregate: window column, group-by columns, measure states, range."""

    aggregate: Aggregate
    window_column: str
    group_by: list[Column]
    states: dict[str, Column]  # measure name → its state column in the partials table
    measure_inputs: dict[str, Column]  # measure name → the column it reads (count: none)

    def partials_columns(self) -> list[Column]:
        return [
            # Windows start on whole minutes: second precision, as the views return them.
            Column(self.window_column, pl.Datetime("ms", "UTC"), stored_as="DateTime('UTC')"),
            *self.group_by,
            *self.states.values(),
            Column("kafka_topic", pl.String(), low_cardinality=True),
            Column("kafka_partition", pl.UInt32()),
            Column("range_start", pl.UInt64()),
            Column("range_end", pl.UInt64()),
        ]


@dataclass(frozen=True)
class PipelineColumns:
    decoded: dict[str, Column]  # what decode yields: the source fields and the Kafka position
    transformed: dict[str, Column]  # everything the sink and the aggregates may read
    sink: list[Column]  # the sink table's columns, in order
    aggregates: list[AggregateColumns] = field(default_factory=list)

    @property
    def sink_names(self) -> list[str]:
        return [column.name for column in self.sink]


def _suggest(name: str, candidates: list[str]) -> str:
    close = difflib.get_close_matches(name, candidates, n=1, cutoff=0.6)
    return f' (did you mean "{close[0]}"?)' if close else ""


class _Resolver:
    def __init__(self, pipeline: Pipeline) -> None:
        self.pipeline = pipeline
        self.problems: list[Problem] = []
        self.columns: dict[str, Column] = {}
        self.where = "the columns so far"

    def problem(self, path: str, message: str) -> None:
        self.problems.append(Problem(path, message))

    def require(self, path: str, name: str, where: str = "") -> Column | None:
        where = where or self.where
        if name in self.columns:
            return self.columns[name]
        self.problem(path, f'column "{name}" not in {where}{_suggest(name, list(self.columns))}')
        return None

    def add(self, path: str, column: Column) -> None:
        if column.name in self.columns:
            self.problem(path, f'column "{column.name}" already exists')
        self.columns[column.name] = column

    def typed_expression(self, path: str, sql: str) -> tuple[pl.Expr, pl.DataType, bool] | None:
        """The expression, its result type and whether it may be null; None (and a problem) if it is wrong."""
        try:
            expression = sql_expression(sql)
        except Exception as error:
            self.problem(path, f"not a SQL expression polars can evaluate: {error}")
            return None
        roots = expression.meta.root_names()
        missing = [name for name in roots if name not in self.columns]
        for name in missing:
            self.problem(path, f'column "{name}" not in the columns so far{_suggest(name, list(self.columns))}')
        if missing:
            return None
        empty = pl.LazyFrame(schema={name: column.dtype for name, column in self.columns.items()})
        try:
            dtype = empty.select(expression.alias("result")).collect_schema()["result"]
        except Exception as error:
            self.problem(path, f"cannot be evaluated over these columns: {error}")
            return None
        return expression, dtype, any(self.columns[name].nullable for name in roots)

    # --- stages ---
    def source(self) -> None:
        for name, spec in self.pipeline.source.fields.items():
            if name in SYSTEM_COLUMNS:
                self.problem(f"source.fields.{name}", f"{name} is added by every pipeline; rename the field")
                continue
            self.add(f"source.fields.{name}", spec.field_type.column(name, nullable=not spec.required))
        for name, dtype in POSITION_COLUMNS.items():
            self.columns[name] = Column(name, dtype)

    def dedup(self) -> None:
        dedup = self.pipeline.dedup
        if dedup is None:
            return
        for name in dedup.key:
            if name not in self.pipeline.source.fields:
                fields = list(self.pipeline.source.fields)
                self.problem("dedup.key", f'column "{name}" not in source fields{_suggest(name, fields)}')
            elif not self.pipeline.source.fields[name].required:
                self.problem("dedup.key", f'"{name}" is not required: a dedup key needs a value in every event')

    def enrich(self) -> None:
        names = set()
        for i, lookup in enumerate(self.pipeline.enrich):
            path = f"enrich[{i}]"
            if lookup.name in names:
                self.problem(f"{path}.name", f"a lookup named {lookup.name} comes earlier")
            names.add(lookup.name)
            for name in lookup.join_key:
                column = self.require(f"{path}.join_key", name, "source fields")
                if column is not None and self._kind(name) not in JOINABLE_KINDS:
                    self.problem(f"{path}.join_key", f'"{name}" of type {column.dtype} cannot be a join key')
            for name, spec in lookup.columns.items():
                self.add(f"{path}.columns.{name}", spec.field_type.column(name, nullable=True))

    def _kind(self, name: str) -> str:
        spec = self.pipeline.source.fields.get(name)
        return spec.field_type.kind if spec is not None else "computed"

    def filter(self) -> None:
        for i, rule in enumerate(self.pipeline.filter.drop_networks):
            path = f"filter.drop_networks[{i}].field"
            if self.require(path, rule.field, "source fields") is not None and self._kind(rule.field) != "ip":
                self.problem(path, f'"{rule.field}" is not an ip field')
        for i, sql in enumerate(self.pipeline.filter.drop_when):
            typed = self.typed_expression(f"filter.drop_when[{i}]", sql)
            if typed is not None and typed[1] != pl.Boolean:
                self.problem(f"filter.drop_when[{i}]", f"is {typed[1]}, not a condition (true or false)")

    def transform(self) -> None:
        for name, computed in self.pipeline.transform.items():
            path = f"transform.{name}"
            typed = self.typed_expression(path, computed.sql)
            if typed is None:
                self.columns[name] = Column(name, pl.String(), nullable=True)  # keep resolving what follows
                continue
            expression, dtype, nullable = typed
            if computed.type is not None:
                target = FieldType.parse(computed.type)
                if converted(expression, dtype, target) is None:
                    self.problem(path, f"a value of type {dtype} cannot be converted to {target}")
                dtype = target.polars
            if computed.nullable is not None:
                nullable = computed.nullable
            try:
                clickhouse_type(dtype)
            except ValueError as error:
                self.problem(path, str(error))
            self.columns[name] = Column(name, dtype, nullable=nullable)

    def python(self) -> None:
        step = self.pipeline.python
        if step is None:
            return
        try:
            resolve_function(step.function)
        except Exception as error:
            self.problem("python.function", f"cannot load {step.function}: {error}")
        for name, text in step.adds.items():
            self.add(f"python.adds.{name}", FieldType.parse(text).column(name, nullable=True))

    def system(self) -> None:
        for name, dtype in SYSTEM_TYPES.items():
            self.columns[name] = Column(name, dtype, low_cardinality=name == "kafka_topic")

    def aggregates(self) -> list[AggregateColumns]:
        resolved = []
        names: set[str] = set()
        for i, aggregate in enumerate(self.pipeline.aggregate):
            path = f"aggregate[{i}]"
            if aggregate.name in names:
                self.problem(f"{path}.name", f"an aggregate named {aggregate.name} comes earlier")
            names.add(aggregate.name)
            time_column = self.require(f"{path}.time_column", aggregate.time_column)
            if time_column is not None and not isinstance(time_column.dtype, pl.Datetime):
                self.problem(
                    f"{path}.time_column", f'"{aggregate.time_column}" is {time_column.dtype}, not a timestamp'
                )
            group_by = [self.require(f"{path}.group_by", name) for name in aggregate.group_by]
            states: dict[str, Column] = {}
            inputs: dict[str, Column] = {}
            taken = {aggregate.finest_window, *aggregate.group_by, "kafka_topic", "kafka_partition", "range_start"}
            for measure_name, measure in aggregate.measures.items():
                measure_path = f"{path}.measures.{measure_name}"
                state_name = measure.partial_column or measure_name
                if measure_name in taken or state_name in taken:
                    self.problem(measure_path, f'"{state_name}" is already a column of {aggregate.partials}')
                taken |= {measure_name, state_name}
                if measure.column is None:
                    states[measure_name] = Column(state_name, pl.UInt64())
                    continue
                source = self.require(measure_path, measure.column)
                if source is None:
                    continue
                inputs[measure_name] = source
                if measure.function == "count_distinct":
                    states[measure_name] = Column(state_name, pl.List(source.dtype))
                elif measure.function == "sum":
                    if not source.dtype.is_numeric():
                        self.problem(measure_path, f'sum of "{measure.column}" of type {source.dtype}: not a number')
                        continue
                    states[measure_name] = Column(state_name, _sum_type(source.dtype), nullable=True)
                else:
                    states[measure_name] = Column(state_name, source.dtype, nullable=True)
            resolved.append(
                AggregateColumns(
                    aggregate,
                    aggregate.finest_window,
                    [column for column in group_by if column is not None],
                    states,
                    inputs,
                )
            )
        return resolved

    def sink(self) -> list[Column]:
        sink = self.pipeline.sink
        names = sink.columns if sink.columns is not None else list(self.columns)
        chosen = [column for name in names if (column := self.require("sink.columns", name)) is not None]
        chosen_names = [column.name for column in chosen]
        for name in ("kafka_topic", "kafka_partition", "kafka_offset"):
            if name not in chosen_names and sink.columns is not None:
                self.problem("sink.columns", f"{name} is needed: every row keeps its Kafka position")
        for name in sink.order_by:
            if name not in chosen_names:
                self.problem("sink.order_by", f'column "{name}" not in the sink columns{_suggest(name, chosen_names)}')
        low_cardinality = set(sink.low_cardinality)
        for name in low_cardinality:
            if name not in chosen_names:
                self.problem(
                    "sink.low_cardinality", f'column "{name}" not in the sink columns{_suggest(name, chosen_names)}'
                )
        result = []
        for column in chosen:
            if column.name in low_cardinality and column.dtype != pl.String:
                self.problem("sink.low_cardinality", f'"{column.name}" is not a string column')
            lc = column.low_cardinality or column.name in low_cardinality
            result.append(replace(column, low_cardinality=lc))
        tables = self.pipeline.tables
        repeated = sorted({name for name in tables if tables.count(name) > 1})
        if repeated:
            self.problem("sink.table", f"table or view name used twice: {', '.join(repeated)}")
        return result


def _sum_type(dtype: pl.DataType) -> pl.DataType:
    if isinstance(dtype, pl.Decimal):
        return pl.Decimal(38, dtype.scale)
    if dtype.is_float():
        return pl.Float64()
    return pl.UInt64() if dtype.is_unsigned_integer() else pl.Int64()


def resolve_columns(pipeline: Pipeline) -> PipelineColumns:
    """Every stage's columns; raises PipelineDefinitionError listing every problem found."""
    resolver = _Resolver(pipeline)
    resolver.source()
    decoded = dict(resolver.columns)
    resolver.dedup()
    resolver.enrich()
    resolver.filter()
    resolver.transform()
    resolver.python()
    resolver.system()
    transformed = dict(resolver.columns)
    sink = resolver.sink()
    # Aggregates read the sink's columns only: the check recomputes them from the table itself.
    resolver.columns = {column.name: column for column in sink}
    resolver.where = "the sink columns"
    aggregates = resolver.aggregates()

    if resolver.problems:
        raise PipelineDefinitionError(resolver.problems)
    return PipelineColumns(decoded=decoded, transformed=transformed, sink=sink, aggregates=aggregates)


def window_truncation(window: str) -> str:
    return WINDOW_TRUNCATION[window]


_resolved: dict[str, PipelineColumns] = {}


def columns_of(pipeline: Pipeline) -> PipelineColumns:
    """resolve_columns, once per distinct pipeline in this process (steps ask for it on every run)."""
    key = pipeline.model_dump_json()
    if key not in _resolved:
        _resolved[key] = resolve_columns(pipeline)
    return _resolved[key]
