"""Local development and measurement: the local stack, demo data, bench, freshness and soak. Never imported by
the production packages (core, clients, steps, orchestration, tools)."""
