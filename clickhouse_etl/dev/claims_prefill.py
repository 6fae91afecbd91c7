"""`bench --prefill-claims N`: the claim store holds N claims of other keys in the bucket one TTL before the
bench, as a deployment's Redis does from its second TTL on.

A claim call reads the keys in the bucket before its own when that bucket exists (claims live at least a TTL:
clients/claims.py), which costs Redis about 1.3 times the CPU per new claim and 1.4 times per duplicate
(docs/production.md). A bench on an emptied claim store has no previous bucket and measures a pipeline's first
TTL only; with a prefill it measures the steady state. The keys (`prefill-<n>`) are no event's, so the bench's
duplicates and counts are untouched. The append-only file rewrite that so many claims at once start is waited
for, so that it does not run in the timed catch-up (whose own claims may start the next one, as a
deployment's do).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import polars as pl
import redis

from clickhouse_etl.clients import claims
from clickhouse_etl.core.pipeline.model import Pipeline
from clickhouse_etl.dev.redis_server import wait_for_aof_rewrite
from clickhouse_etl.steps.dedup import claim_namespace

BATCH = 1_000_000  # claims per call of the claim client: the keys of one batch are built in memory at once


@dataclass(frozen=True)
class ClaimsPrefill:
    claims: int
    seconds: float

    def as_json(self) -> dict[str, object]:
        return {"claims": self.claims, "seconds": round(self.seconds, 2)}


def claim_a_ttl_ago(redis_url: str, namespace: str, count: int, ttl_seconds: int, wait_seconds: float) -> None:
    """`count` claims of keys `prefill-<n>` under `namespace`, made one TTL before now; returns once the server's
    append-only file rewrite, if they started one, is over."""
    for first in range(0, count, BATCH):
        numbers = pl.int_range(first, min(first + BATCH, count), eager=True).cast(pl.String)
        keys, owners = "prefill-" + numbers, "0:" + numbers
        claims.claim(redis_url, namespace, keys, owners, ttl_seconds, wait_seconds, now=time.time() - ttl_seconds)
    wait_for_aof_rewrite(redis.Redis.from_url(redis_url))


def prefill_claims(redis_url: str, pipeline: Pipeline, count: int, wait_seconds: float) -> ClaimsPrefill:
    """`count` claims under the pipeline's claim namespace, one dedup TTL old (claim_a_ttl_ago)."""
    if pipeline.dedup is None:
        raise ValueError(f"pipeline {pipeline.name} has no dedup section: it makes no claims to prefill")
    started = time.perf_counter()
    namespace = claim_namespace(pipeline.dedup_key_prefix, pipeline.topic)
    claim_a_ttl_ago(redis_url, namespace, count, pipeline.dedup.ttl_seconds, wait_seconds)
    return ClaimsPrefill(count, time.perf_counter() - started)
