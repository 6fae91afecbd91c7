"""Demo datasets: for each packaged pipeline, how to seed its PostgreSQL lookups and generate its events.

`seed`, `produce`, `bench`, `freshness` and `soak` find a pipeline's demo data here by the pipeline's name.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from clickhouse_etl.core.settings import Settings
from clickhouse_etl.dev import demo_data, usage_data
from clickhouse_etl.dev.producing import Generator, ProduceReport


@dataclass(frozen=True)
class DemoDataset:
    pipeline: str
    shares_type: type  # a frozen dataclass of shares with defaults; each field is a --flag of `produce`
    bench_shares: Any  # the mix benchmarks produce
    lookup_table: str  # the PostgreSQL table the pipeline's lookup reads
    lookup_rows: int  # rows `seed` writes to it (its keys 1..N are the known ones)
    ensure_lookup_table: Callable[[Settings], None]  # creates it if missing
    seed_lookup_table: Callable[[Settings, int], int]  # upserts the demo rows; returns how many
    make_generator: Callable[[Any, int], Generator]  # (shares, lookup rows) → generator
    expected: Callable[[ProduceReport], tuple[int, int]]  # rows and dead letters the default rules make

    def generator(self, shares: Any | None = None) -> Generator:
        return self.make_generator(shares if shares is not None else self.shares_type(), self.lookup_rows)

    def share_flags(self) -> dict[str, tuple[str, float]]:
        """`--flag` of `produce` → (share field, default share)."""
        return {
            SHARE_FLAGS[f.name]: (f.name, f.default)  # type: ignore[misc]
            for f in dataclasses.fields(self.shares_type)
        }


# Flags of `produce`, one per share of any dataset (a flag means the same in every dataset that has it).
SHARE_FLAGS = {
    "duplicate": "duplicates",
    "duplicate_other_partition": "duplicates-other-partition",
    "malformed": "malformed",
    "late": "late",
    "numeric_string": "numeric-strings",
    "extra_field": "extra-fields",
    "bot": "bots",
    "unknown_ad": "unknown-ads",
    "ipv6": "ipv6",
    "health_check": "health-checks",
    "unknown_customer": "unknown-customers",
}


def _clicks_generator(shares: demo_data.EventShares, campaigns: int) -> Generator:
    return lambda count, partitions, seed, span_ms: demo_data.generate_events(
        count, shares, partitions, campaigns, seed=seed, span_ms=span_ms
    )


def _usage_generator(shares: usage_data.UsageShares, customers: int) -> Generator:
    return lambda count, partitions, seed, span_ms: usage_data.generate_usage(
        count, shares, partitions, customers, seed=seed, span_ms=span_ms
    )


DATASETS = {
    "ad_clicks": DemoDataset(
        pipeline="ad_clicks",
        shares_type=demo_data.EventShares,
        bench_shares=demo_data.BENCH_SHARES,
        lookup_table="campaigns",
        lookup_rows=100,
        ensure_lookup_table=demo_data.ensure_campaigns_table,
        seed_lookup_table=demo_data.seed_campaigns,
        make_generator=_clicks_generator,
        expected=demo_data.expected_counts,
    ),
    "api_usage": DemoDataset(
        pipeline="api_usage",
        shares_type=usage_data.UsageShares,
        bench_shares=usage_data.BENCH_SHARES,
        lookup_table="customers",
        lookup_rows=50,
        ensure_lookup_table=usage_data.ensure_customers_table,
        seed_lookup_table=usage_data.seed_customers,
        make_generator=_usage_generator,
        expected=usage_data.expected_counts,
    ),
}


def dataset_for(pipeline_name: str) -> DemoDataset:
    try:
        return DATASETS[pipeline_name]
    except KeyError:
        raise ValueError(
            f"no demo data for pipeline {pipeline_name}; demo data exists for {', '.join(DATASETS)}"
        ) from None
