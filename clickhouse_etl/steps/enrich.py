"""Enrich: vectorized left joins of the events with lookup snapshots read from PostgreSQL.

A snapshot is the lookup's whole table (or query result) as a frame, read once per run. Its version is a
content hash: equal snapshots have equal versions, and run metadata records which one enriched a range.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import polars as pl

from clickhouse_etl.core.pipeline.model import Lookup
from clickhouse_etl.core.pipeline.types import UUID_PATTERN, FieldType

MATCHED = "__matched"


class SnapshotError(ValueError):
    """A snapshot that cannot enrich: values of the wrong type, or a key with several rows."""


@dataclass(frozen=True)
class Snapshot:
    rows: pl.DataFrame  # the key columns (named as the events' join key) and the lookup's columns
    version: str  # "<rows>-<content hash>"
    source: str = "postgres"  # or which saved snapshot stood in for an unavailable PostgreSQL


def _typed(column: str, field_type: FieldType) -> pl.Expr:
    text = pl.col(column)
    if field_type.kind == "bool":
        return text.replace_strict({"t": True, "f": False, "true": True, "false": False}, return_dtype=pl.Boolean)
    if field_type.kind == "uuid":
        return text.str.to_lowercase()
    return text.cast(field_type.polars, strict=True)


def snapshot_from_csv(csv_bytes: bytes, lookup: Lookup, key_types: dict[str, FieldType], source: str) -> Snapshot:
    """The snapshot of `COPY (SELECT <key…>, <columns…> …) TO STDOUT CSV`, typed as the pipeline declares."""
    names = [*lookup.join_key, *lookup.columns]
    types = {**key_types, **{name: spec.field_type for name, spec in lookup.columns.items()}}
    digest = hashlib.sha256(csv_bytes).hexdigest()[:16]
    if csv_bytes:
        text = pl.read_csv(csv_bytes, has_header=False, new_columns=names, schema=dict.fromkeys(names, pl.String))
    else:
        text = pl.DataFrame(schema=dict.fromkeys(names, pl.String))
    try:
        rows = text.select([_typed(name, types[name]).alias(name) for name in names])
    except (pl.exceptions.PolarsError, ValueError) as error:
        raise SnapshotError(f"lookup {lookup.name}: a value does not fit the declared types: {error}") from None
    for name in names:
        if types[name].kind == "uuid" and not rows[name].drop_nulls().str.contains(UUID_PATTERN).all():
            raise SnapshotError(f"lookup {lookup.name}: column {name} holds a value that is not a UUID")
    # A NULL key matches no event; repeated keys would multiply the events they match.
    keyed = rows.drop_nulls(lookup.join_key)
    repeated = keyed.filter(keyed.select(lookup.join_key).is_duplicated())
    if not repeated.is_empty():
        key = repeated.select(lookup.join_key).row(0)
        raise SnapshotError(f"lookup {lookup.name}: key {key} has {len(repeated)} rows; a lookup needs one per key")
    return Snapshot(rows=rows, version=f"{rows.height}-{digest}", source=source)


@dataclass(frozen=True)
class EnrichedBatch:
    events: pl.DataFrame
    unmatched: pl.DataFrame  # events without a lookup row (kept, dropped or dead-lettered, per policy)


def enrich_events(events: pl.DataFrame, snapshot: Snapshot, lookup: Lookup) -> EnrichedBatch:
    rows = snapshot.rows.with_columns(pl.lit(True).alias(MATCHED))
    joined = events.join(rows, on=lookup.join_key, how="left", maintain_order="left")
    matched = pl.col(MATCHED).is_not_null()
    unmatched = joined.filter(~matched).drop(MATCHED)
    kept = joined if lookup.missing == "keep" else joined.filter(matched)
    return EnrichedBatch(events=kept.drop(MATCHED), unmatched=unmatched)


def unmatched_reason(lookup: Lookup, version: str) -> pl.Expr:
    """Why an unmatched event is dead-lettered: `unknown ad_id 7: not in the campaigns snapshot <version>`."""
    values = [pl.col(name).cast(pl.String) for name in lookup.join_key]
    keys = ", ".join(lookup.join_key)
    text = f"unknown {keys} {{}}: not in the {lookup.name} snapshot {version}"
    return pl.format(text, pl.concat_str(values, separator=", "))
