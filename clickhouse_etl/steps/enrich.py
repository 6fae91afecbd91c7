"""Enrich: a vectorized left join of the events with the campaigns snapshot on ad_id."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Literal

import polars as pl

MissingCampaignPolicy = Literal["keep", "drop", "dead_letter"]
CAMPAIGNS_SCHEMA = {"ad_id": pl.Int64, "campaign_name": pl.String, "campaign_budget": pl.Decimal(14, 2)}


@dataclass(frozen=True)
class CampaignsSnapshot:
    campaigns: pl.DataFrame
    version: str  # content hash: equal snapshots have equal versions
    source: str = "postgres"  # or which saved snapshot stood in for an unavailable PostgreSQL


def snapshot_from_csv(csv_bytes: bytes) -> CampaignsSnapshot:
    """Build the snapshot from `COPY (SELECT ad_id, campaign_name, campaign_budget …) TO STDOUT CSV`."""
    campaigns = (
        pl.read_csv(csv_bytes, has_header=False, new_columns=list(CAMPAIGNS_SCHEMA), schema=CAMPAIGNS_SCHEMA)
        if csv_bytes
        else pl.DataFrame(schema=CAMPAIGNS_SCHEMA)
    )
    digest = hashlib.sha256(csv_bytes).hexdigest()[:16]
    return CampaignsSnapshot(campaigns=campaigns, version=f"{campaigns.height}-{digest}")


@dataclass(frozen=True)
class EnrichedBatch:
    events: pl.DataFrame
    unmatched: pl.DataFrame  # events whose ad_id is not in the snapshot (kept, dropped or dead-lettered)


def enrich_events(events: pl.DataFrame, snapshot: CampaignsSnapshot, policy: MissingCampaignPolicy) -> EnrichedBatch:
    joined = events.join(snapshot.campaigns, on="ad_id", how="left", maintain_order="left")
    matched = pl.col("campaign_name").is_not_null()
    unmatched = joined.filter(~matched)
    if policy == "keep":
        return EnrichedBatch(events=joined, unmatched=unmatched)
    return EnrichedBatch(events=joined.filter(matched), unmatched=unmatched)
