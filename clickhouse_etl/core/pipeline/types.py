"""Types of a pipeline's data: the JSON field types a pipeline file declares, and the columns they become.

A source field is declared with one of the field types below; decoding turns it into a polars column, and
the sink table gets the matching ClickHouse column. Columns computed later (SQL transforms, aggregates) are
typed by polars itself, and `clickhouse_type` maps them the same way.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import polars as pl

FIELD_TYPE_NAMES = ("string", "int64", "float64", "decimal(p,s)", "bool", "timestamp(ms)", "timestamp(s)", "ip", "uuid")
_FIELD_TYPE = re.compile(
    r"^(?:(?P<plain>string|int64|float64|bool|ip|uuid)"
    r"|decimal\(\s*(?P<precision>\d+)\s*,\s*(?P<scale>\d+)\s*\)"
    r"|timestamp(?:\(\s*(?P<unit>ms|s)\s*\))?)$"
)
# The largest precision polars and ClickHouse both hold in a Decimal.
MAX_DECIMAL_PRECISION = 38
DATETIME_MS = pl.Datetime("ms", "UTC")
UUID_PATTERN = r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$"


@dataclass(frozen=True)
class FieldType:
    """One declared field type: `kind` plus the decimal's precision and scale or the timestamp's unit."""

    kind: str  # string | int64 | float64 | decimal | bool | timestamp | ip | uuid
    precision: int = 0
    scale: int = 0
    unit: str = ""  # timestamps: "ms" or "s" since the Unix epoch

    @classmethod
    def parse(cls, text: str) -> FieldType:
        match = _FIELD_TYPE.match(text.strip().lower())
        if match is None:
            raise ValueError(f"unknown type {text!r}; one of: {', '.join(FIELD_TYPE_NAMES)}")
        if match["plain"]:
            return cls(match["plain"])
        if match["precision"]:
            precision, scale = int(match["precision"]), int(match["scale"])
            if not 1 <= precision <= MAX_DECIMAL_PRECISION or scale > precision:
                raise ValueError(
                    f"decimal({precision},{scale}): need 1 <= precision <= {MAX_DECIMAL_PRECISION} "
                    "and scale <= precision"
                )
            return cls("decimal", precision=precision, scale=scale)
        return cls("timestamp", unit=match["unit"] or "ms")

    def __str__(self) -> str:
        if self.kind == "decimal":
            return f"decimal({self.precision},{self.scale})"
        if self.kind == "timestamp":
            return f"timestamp({self.unit})"
        return self.kind

    @property
    def is_text(self) -> bool:
        """Kept as text after validation (identifiers, names, addresses)."""
        return self.kind in ("string", "ip", "uuid")

    @property
    def stored_as(self) -> str | None:
        return "UUID" if self.kind == "uuid" else None

    def column(self, name: str, nullable: bool) -> Column:
        return Column(name, self.polars, nullable=nullable, stored_as=self.stored_as)

    @property
    def polars(self) -> pl.DataType:
        return {
            "string": pl.String(),
            "ip": pl.String(),
            "uuid": pl.String(),
            "int64": pl.Int64(),
            "float64": pl.Float64(),
            "bool": pl.Boolean(),
            "timestamp": DATETIME_MS,
            "decimal": pl.Decimal(self.precision or MAX_DECIMAL_PRECISION, self.scale),
        }[self.kind]


@dataclass(frozen=True)
class Column:
    """A column of the frames a run passes on, and of the table it lands in."""

    name: str
    dtype: pl.DataType
    nullable: bool = False
    low_cardinality: bool = False
    stored_as: str | None = None  # a ClickHouse type other than the dtype's own (UUID text, second-precision windows)

    def clickhouse_type(self) -> str:
        base = self.stored_as or clickhouse_type(self.dtype)
        if self.nullable:
            base = f"Nullable({base})"
        if self.low_cardinality:
            base = f"LowCardinality({base})"
        return base


def clickhouse_type(dtype: pl.DataType) -> str:
    """The ClickHouse type holding values of a polars type exactly."""
    names = {
        pl.Int8: "Int8",
        pl.Int16: "Int16",
        pl.Int32: "Int32",
        pl.Int64: "Int64",
        pl.UInt8: "UInt8",
        pl.UInt16: "UInt16",
        pl.UInt32: "UInt32",
        pl.UInt64: "UInt64",
        pl.Float32: "Float32",
        pl.Float64: "Float64",
        pl.Boolean: "Bool",
        pl.String: "String",
        pl.Binary: "String",
        pl.Date: "Date32",
    }
    for polars_type, name in names.items():
        if dtype == polars_type:
            return name
    if isinstance(dtype, pl.Decimal):
        return f"Decimal({dtype.precision or MAX_DECIMAL_PRECISION}, {dtype.scale})"
    if isinstance(dtype, pl.Datetime):
        digits = {"ms": 3, "us": 6, "ns": 9}[dtype.time_unit or "us"]
        return f"DateTime64({digits}, 'UTC')"
    if isinstance(dtype, pl.List):
        return f"Array({clickhouse_type(dtype.inner)})"
    raise ValueError(f"a column of type {dtype} cannot be stored in ClickHouse by this pipeline")


def is_numeric(dtype: pl.DataType) -> bool:
    return dtype.is_numeric()


def is_datetime(dtype: pl.DataType) -> bool:
    return isinstance(dtype, pl.Datetime)
