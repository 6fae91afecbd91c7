"""Demo data of the api_usage pipeline: customers for PostgreSQL and metered API calls for Kafka.

Events are generated column-wise (numpy + polars) so producing never limits a benchmark. The mix is
controlled by `UsageShares`: re-sent duplicates (to the same or another partition), health checks the
pipeline drops, calls of unknown customers, malformed messages, late events, numeric strings and unknown
extra fields — everything the pipeline has to handle.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import polars as pl
import psycopg

from clickhouse_etl.core.settings import Settings
from clickhouse_etl.dev.producing import (
    LATE_BY_MS,
    ProduceReport,
    check_shares,
    generate_messages,
    shares_flags,
)

ENDPOINTS = ("/v1/chat", "/v1/embeddings", "/v1/completions", "/v1/images", "/v1/moderations")
# The pipeline file drops exactly these endpoints.
HEALTH_ENDPOINTS = ("/health", "/healthz", "/ready")
UNKNOWN_CUSTOMER_PREFIX = "cust-unknown-"
PLANS = ("free", "pro", "enterprise")
PLAN_WEIGHTS = (0.5, 0.35, 0.15)
REGIONS = ("eu-west", "us-east", "ap-south")
MAX_TOKENS = 4_000
# Latency in thousandths of a millisecond, so the JSON text holds exactly three decimals.
LATENCY_THOUSANDTHS = (5_000, 2_500_000)

# One body per malformed variant; {p} and {i} make each unique.
MALFORMED_BODIES = {
    "truncated": '{"event_id":"m{p}-{i}","customer_id":"cust-0001","endpoint":"/v1/chat","tok',
    "not_json": "POST /v1/chat cust-0001 m{p}-{i} 200 OK",
    "wrong_type": (
        '{"event_id":"m{p}-{i}","customer_id":"cust-0001","endpoint":"/v1/chat","tokens":"many",'
        '"latency_ms":12.5,"ts":1700000000000}'
    ),
    "missing_field": (
        '{"customer_id":"cust-0001","endpoint":"/v1/chat","tokens":3,"latency_ms":12.5,"ts":1700000000000,'
        '"m":"{p}-{i}"}'
    ),
    "not_object": '["m{p}-{i}", "cust-0001", 3]',
    "empty": "",
}


@dataclass(frozen=True)
class UsageShares:
    """Shares of the produced events; duplicate_other_partition is a share of the duplicates."""

    duplicate: float = 0.05
    duplicate_other_partition: float = 0.3
    health_check: float = 0.05
    unknown_customer: float = 0.02
    malformed: float = 0.002
    late: float = 0.03
    numeric_string: float = 0.02
    extra_field: float = 0.05

    def __post_init__(self) -> None:
        check_shares(self)


# The mix benchmarks produce: more duplicates than the demo, fewer malformed messages.
BENCH_SHARES = UsageShares(
    duplicate=0.10,
    duplicate_other_partition=0.3,
    health_check=0.02,
    unknown_customer=0.02,
    malformed=0.001,
    late=0.02,
    numeric_string=0.01,
    extra_field=0.05,
)


# ----------------------------------------------------------------------------------------------------------
# Customers
# ----------------------------------------------------------------------------------------------------------


def demo_customers(count: int) -> list[tuple[str, str, str]]:
    """(customer_id, plan, region) for customers 1..count, the same on every call.

    One row of draws per customer keeps the first rows equal whatever the count, so a smaller seed is a
    prefix of a larger one.
    """
    draws = np.random.default_rng(7).random((count, 2))
    plans = np.searchsorted(np.cumsum(PLAN_WEIGHTS), draws[:, 0], side="right").clip(0, len(PLANS) - 1)
    regions = (draws[:, 1] * len(REGIONS)).astype(np.int64)
    return [
        (f"cust-{number:04d}", PLANS[plan], REGIONS[region])
        for number, plan, region in zip(range(1, count + 1), plans, regions, strict=True)
    ]


CUSTOMERS_DDL = """
CREATE TABLE IF NOT EXISTS customers (
    customer_id TEXT PRIMARY KEY,
    plan TEXT NOT NULL,
    region TEXT NOT NULL,
    updated_at TIMESTAMPTZ NOT NULL DEFAULT now()
)
"""


def ensure_customers_table(settings: Settings) -> None:
    """Create the lookup table the pipeline enriches from, so a run finds it even before `seed`."""
    with psycopg.connect(settings.postgres_dsn, autocommit=True) as connection:
        connection.execute(CUSTOMERS_DDL)


def seed_customers(settings: Settings, count: int = 50) -> int:
    """Upsert the demo customers; `updated_at` moves only for rows whose values changed."""
    ensure_customers_table(settings)
    with psycopg.connect(settings.postgres_dsn) as connection, connection.cursor() as cursor:
        cursor.executemany(
            """
            INSERT INTO customers (customer_id, plan, region) VALUES (%s, %s, %s)
            ON CONFLICT (customer_id) DO UPDATE
            SET plan = EXCLUDED.plan, region = EXCLUDED.region, updated_at = now()
            WHERE (customers.plan, customers.region) IS DISTINCT FROM (EXCLUDED.plan, EXCLUDED.region)
            """,
            demo_customers(count),
        )
    return count


# ----------------------------------------------------------------------------------------------------------
# Usage events
# ----------------------------------------------------------------------------------------------------------


def generate_usage(
    count: int,
    shares: UsageShares,
    partitions: list[int],
    customers: int = 50,
    seed: int | None = None,
    now_ms: int | None = None,
    span_ms: int = 60_000,
) -> pl.DataFrame:
    """`count` Kafka messages in send order: columns partition, value (bytes), kind and ground truth.

    kind is `event`, `duplicate` (a re-send of an earlier event, byte for byte) or `malformed`.
    """
    now_ms = int(time.time() * 1000) if now_ms is None else now_ms

    def base_messages(rng: np.random.Generator, n: int, prefix: str) -> pl.DataFrame:
        return _base_usage(rng, n, shares, customers, now_ms, span_ms, prefix, partitions)

    return generate_messages(count, shares, partitions, seed, base_messages, MALFORMED_BODIES)


def _base_usage(
    rng: np.random.Generator,
    n: int,
    shares: UsageShares,
    customers: int,
    now_ms: int,
    span_ms: int,
    prefix: str,
    partitions: list[int],
) -> pl.DataFrame:
    index = np.arange(n)
    health = shares_flags(rng, n, shares.health_check)
    unknown = shares_flags(rng, n, shares.unknown_customer)
    late = shares_flags(rng, n, shares.late)
    numeric_string = shares_flags(rng, n, shares.numeric_string)
    extra = shares_flags(rng, n, shares.extra_field)
    endpoint = np.where(
        health,
        np.asarray(HEALTH_ENDPOINTS)[rng.integers(0, len(HEALTH_ENDPOINTS), n)],
        np.asarray(ENDPOINTS)[rng.integers(0, len(ENDPOINTS), n)],
    )
    timestamp = now_ms - span_ms + (index * span_ms) // max(n, 1) + rng.integers(0, 50, n)
    timestamp = np.where(late, timestamp - rng.integers(*LATE_BY_MS, n), timestamp)
    frame = pl.DataFrame(
        {
            "send_order": index * 1000,
            "partition": rng.choice(np.asarray(partitions), n).astype(np.int32),
            "seq": index,
            "customer": rng.integers(1, customers + 1, n),
            "unknown_number": rng.integers(1, 1_000_000, n),
            "endpoint": pl.Series(endpoint, dtype=pl.String),
            "tokens": rng.integers(1, MAX_TOKENS + 1, n),
            "latency": rng.integers(LATENCY_THOUSANDTHS[0], LATENCY_THOUSANDTHS[1] + 1, n),
            "ts": timestamp,
            "is_health_check": health,
            "is_unknown_customer": unknown,
            "is_late": late,
            "is_numeric_string": numeric_string,
            "has_extra_field": extra,
        }
    )
    customer = (
        pl.when(pl.col("is_unknown_customer"))
        .then(pl.lit(UNKNOWN_CUSTOMER_PREFIX) + pl.col("unknown_number").cast(pl.String))
        .otherwise(pl.lit("cust-") + pl.col("customer").cast(pl.String).str.zfill(4))
    )
    latency_text = pl.format(
        "{}.{}", pl.col("latency") // 1000, (pl.col("latency") % 1000).cast(pl.String).str.zfill(3)
    )
    quote = pl.when(pl.col("is_numeric_string")).then(pl.lit('"')).otherwise(pl.lit(""))
    extra_json = (
        pl.when(pl.col("has_extra_field"))
        .then(pl.lit(',"user_agent":"curl/8.5","context":{"sdk":"python","version":2}'))
        .otherwise(pl.lit(""))
    )
    frame = frame.with_columns(
        event_id=pl.lit(f"e{prefix}-") + pl.col("seq").cast(pl.String),
        customer_id=customer,
        latency_text=latency_text,
    ).with_columns(
        # Parsed from the text, not divided: polars' division is not always the float the text denotes.
        latency_ms=pl.col("latency_text").cast(pl.Float64),
    )
    value = pl.concat_str(
        [
            pl.lit('{"event_id":"'),
            pl.col("event_id"),
            pl.lit('","customer_id":"'),
            pl.col("customer_id"),
            pl.lit('","endpoint":"'),
            pl.col("endpoint"),
            pl.lit('","tokens":'),
            quote,
            pl.col("tokens").cast(pl.String),
            quote,
            pl.lit(',"latency_ms":'),
            quote,
            pl.col("latency_text"),
            quote,
            pl.lit(',"ts":'),
            quote,
            pl.col("ts").cast(pl.String),
            quote,
            extra_json,
            pl.lit("}"),
        ]
    )
    return frame.select(
        "send_order",
        "partition",
        value.cast(pl.Binary).alias("value"),
        pl.lit("event").alias("kind"),
        "event_id",
        "customer_id",
        "endpoint",
        "tokens",
        "latency_ms",
        "ts",
        "is_health_check",
        "is_unknown_customer",
        "is_late",
        "is_numeric_string",
        "has_extra_field",
    )


def expected_counts(report: ProduceReport) -> tuple[int, int]:
    """Rows and dead letters under the pipeline file's rules: health checks dropped, unknown customers kept."""
    return report.kinds.get("event", 0) - report.flags.get("is_health_check", 0), report.kinds.get("malformed", 0)
