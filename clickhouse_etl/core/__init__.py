"""Pure core: offset ranges, range planning, the offset ledger, backfill plans, settings and the pipeline model.

Nothing here talks to a service or imports Dagster.
"""
