"""Tools over the Dagster wiring: the production commands, catch-up, status and query."""
