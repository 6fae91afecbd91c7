"""Demo data of the ad_clicks pipeline: campaigns for PostgreSQL and realistic ad-click events for Kafka.

Events are generated column-wise (numpy + polars) so producing never limits a benchmark. The mix is
controlled by `EventShares`: re-sent duplicates (to the same or another partition), bot traffic from the
default filtered network, unknown ads, malformed messages, late events, IPv6 clients, numeric strings and
unknown extra fields — everything the pipeline has to handle.
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

BOT_NETWORK_PREFIX = "192.168.1."
UNKNOWN_AD_ID_BASE = 1_000_000
BRANDS = ("Acme", "Globex", "Initech", "Umbrella", "Hooli", "Stark", "Wayne", "Wonka", "Tyrell", "Soylent")
THEMES = ("Spring Sale", "Black Friday", "Back to School", "Summer Launch", "Retargeting", "Brand Awareness")

# One body per malformed variant; {p} and {i} make each unique.
MALFORMED_BODIES = {
    "truncated": '{"click_id":"m{p}-{i}","user_id":"u1","ad_id":3,"timestam',
    "not_json": "click m{p}-{i} from 10.0.0.1 at noon",
    "wrong_type": '{"click_id":"m{p}-{i}","user_id":"u1","ad_id":"three","timestamp_ms":1,"ip_address":"10.1.1.1"}',
    "missing_field": '{"user_id":"u1","ad_id":3,"timestamp_ms":17000000,"ip_address":"10.1.1.1","m":"{p}-{i}"}',
    "not_object": '["m{p}-{i}", 3]',
    "empty": "",
}


@dataclass(frozen=True)
class EventShares:
    """Shares of the produced events; duplicate_other_partition is a share of the duplicates."""

    duplicate: float = 0.05
    duplicate_other_partition: float = 0.3
    bot: float = 0.02
    unknown_ad: float = 0.02
    malformed: float = 0.002
    late: float = 0.03
    ipv6: float = 0.05
    numeric_string: float = 0.02
    extra_field: float = 0.05

    def __post_init__(self) -> None:
        check_shares(self)


# The mix benchmarks produce: more duplicates than the demo, fewer malformed messages.
BENCH_SHARES = EventShares(
    duplicate=0.10,
    duplicate_other_partition=0.3,
    bot=0.02,
    unknown_ad=0.02,
    malformed=0.001,
    late=0.02,
    ipv6=0.05,
    numeric_string=0.01,
    extra_field=0.05,
)


# ----------------------------------------------------------------------------------------------------------
# Campaigns
# ----------------------------------------------------------------------------------------------------------


def demo_campaigns(count: int) -> list[tuple[int, str, str]]:
    """(ad_id, campaign_name, budget) for ad ids 1..count, the same on every call."""
    rng = np.random.default_rng(7)
    budgets = rng.integers(50_000, 5_000_000, size=count)
    return [
        (
            ad_id,
            f"{BRANDS[ad_id % len(BRANDS)]} {THEMES[ad_id % len(THEMES)]} #{ad_id}",
            f"{budgets[ad_id - 1] / 100:.2f}",
        )
        for ad_id in range(1, count + 1)
    ]


CAMPAIGNS_DDL = """
CREATE TABLE IF NOT EXISTS campaigns (
    ad_id BIGINT PRIMARY KEY,
    campaign_name TEXT NOT NULL,
    campaign_budget NUMERIC(14,2) NOT NULL,
    updated_at TIMESTAMPTZ NOT NULL DEFAULT now()
)
"""


def ensure_campaigns_table(settings: Settings) -> None:
    with psycopg.connect(settings.postgres_dsn, autocommit=True) as connection:
        connection.execute(CAMPAIGNS_DDL)


def seed_campaigns(settings: Settings, count: int = 100) -> int:
    """Upsert the demo campaigns; `updated_at` moves only for rows whose values changed."""
    ensure_campaigns_table(settings)
    with psycopg.connect(settings.postgres_dsn) as connection, connection.cursor() as cursor:
        cursor.executemany(
            """
            INSERT INTO campaigns (ad_id, campaign_name, campaign_budget) VALUES (%s, %s, %s)
            ON CONFLICT (ad_id) DO UPDATE
            SET campaign_name = EXCLUDED.campaign_name, campaign_budget = EXCLUDED.campaign_budget,
                updated_at = now()
            WHERE (campaigns.campaign_name, campaigns.campaign_budget)
                  IS DISTINCT FROM (EXCLUDED.campaign_name, EXCLUDED.campaign_budget)
            """,
            demo_campaigns(count),
        )
    return count


# ----------------------------------------------------------------------------------------------------------
# Click events
# ----------------------------------------------------------------------------------------------------------


def generate_events(
    count: int,
    shares: EventShares,
    partitions: list[int],
    campaigns: int = 100,
    seed: int | None = None,
    now_ms: int | None = None,
    span_ms: int = 60_000,
) -> pl.DataFrame:
    """`count` Kafka messages in send order: columns partition, value (bytes), kind and ground truth.

    kind is `event`, `duplicate` (a re-send of an earlier event, byte for byte) or `malformed`.
    """
    now_ms = int(time.time() * 1000) if now_ms is None else now_ms

    def base_messages(rng: np.random.Generator, n: int, prefix: str) -> pl.DataFrame:
        return _base_events(rng, n, shares, campaigns, now_ms, span_ms, prefix, partitions)

    return generate_messages(count, shares, partitions, seed, base_messages, MALFORMED_BODIES)


def _base_events(
    rng: np.random.Generator,
    n: int,
    shares: EventShares,
    campaigns: int,
    now_ms: int,
    span_ms: int,
    prefix: str,
    partitions: list[int],
) -> pl.DataFrame:
    index = np.arange(n)
    bot = shares_flags(rng, n, shares.bot)
    ipv6 = shares_flags(rng, n, shares.ipv6) & ~bot
    unknown = shares_flags(rng, n, shares.unknown_ad)
    late = shares_flags(rng, n, shares.late)
    numeric_string = shares_flags(rng, n, shares.numeric_string)
    extra = shares_flags(rng, n, shares.extra_field)
    ad_id = np.where(unknown, UNKNOWN_AD_ID_BASE + rng.integers(0, 1_000_000, n), rng.integers(1, campaigns + 1, n))
    timestamp = now_ms - span_ms + (index * span_ms) // max(n, 1) + rng.integers(0, 50, n)
    timestamp = np.where(late, timestamp - rng.integers(*LATE_BY_MS, n), timestamp)
    users = max(100, n // 4)
    octets = rng.integers(0, 256, (n, 4))
    frame = pl.DataFrame(
        {
            "send_order": index * 1000,
            "partition": rng.choice(np.asarray(partitions), n).astype(np.int32),
            "seq": index,
            "user": rng.integers(0, users, n),
            "ad_id": ad_id,
            "timestamp_ms": timestamp,
            "o1": rng.integers(11, 192, n),
            "o2": octets[:, 1],
            "o3": octets[:, 2],
            "o4": octets[:, 3],
            "v6a": rng.integers(0, 10_000, n),
            "v6b": rng.integers(0, 10_000, n),
            "is_bot": bot,
            "is_ipv6": ipv6,
            "is_unknown_ad": unknown,
            "is_late": late,
            "is_numeric_string": numeric_string,
            "has_extra_field": extra,
        }
    )
    ip = (
        pl.when(pl.col("is_bot"))
        .then(pl.lit(BOT_NETWORK_PREFIX) + pl.col("o4").cast(pl.String))
        .when(pl.col("is_ipv6"))
        .then(pl.format("2001:db8:{}::{}", "v6a", "v6b"))
        .otherwise(pl.format("{}.{}.{}.{}", "o1", "o2", "o3", "o4"))
    )
    quote = pl.when(pl.col("is_numeric_string")).then(pl.lit('"')).otherwise(pl.lit(""))
    extra_json = (
        pl.when(pl.col("has_extra_field"))
        .then(pl.lit(',"user_agent":"Mozilla/5.0 (X11; Linux x86_64)","context":{"page":"home","depth":2}'))
        .otherwise(pl.lit(""))
    )
    frame = frame.with_columns(
        click_id=pl.lit(f"c{prefix}-") + pl.col("seq").cast(pl.String),
        user_id=pl.lit("u") + pl.col("user").cast(pl.String),
        ip_address=ip,
    )
    value = pl.concat_str(
        [
            pl.lit('{"click_id":"'),
            pl.col("click_id"),
            pl.lit('","user_id":"'),
            pl.col("user_id"),
            pl.lit('","ad_id":'),
            quote,
            pl.col("ad_id").cast(pl.String),
            quote,
            pl.lit(',"timestamp_ms":'),
            quote,
            pl.col("timestamp_ms").cast(pl.String),
            quote,
            pl.lit(',"ip_address":"'),
            pl.col("ip_address"),
            pl.lit('"'),
            extra_json,
            pl.lit("}"),
        ]
    )
    return frame.select(
        "send_order",
        "partition",
        value.cast(pl.Binary).alias("value"),
        pl.lit("event").alias("kind"),
        "click_id",
        "user_id",
        "ad_id",
        "timestamp_ms",
        "ip_address",
        "is_bot",
        "is_ipv6",
        "is_unknown_ad",
        "is_late",
        "is_numeric_string",
        "has_extra_field",
    )


def expected_counts(report: ProduceReport) -> tuple[int, int]:
    """Rows and dead letters the default rules make of what was produced: bots filtered, unknown ads kept."""
    return report.kinds.get("event", 0) - report.flags.get("is_bot", 0), report.kinds.get("malformed", 0)
