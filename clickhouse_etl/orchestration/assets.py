"""Lineage: the topics, lookups and tables the pipelines read and write, so the UI shows where data flows
and plots the counts each run records on them."""

from __future__ import annotations

import dagster as dg

from clickhouse_etl.core.pipeline.model import Pipeline


def lineage_assets(pipelines: list[Pipeline]) -> list[dg.AssetSpec]:
    """One spec per asset key: pipelines reading the same topic or lookup share its asset."""
    specs: dict[dg.AssetKey, dg.AssetSpec] = {}

    def add(spec: dg.AssetSpec) -> dg.AssetSpec:
        return specs.setdefault(spec.key, spec)

    for pipeline in pipelines:
        topic = add(
            dg.AssetSpec(
                ["kafka", pipeline.topic],
                description=f"Kafka topic {pipeline.topic} (JSON events)",
                group_name="sources",
                kinds={"kafka"},
            )
        )
        lookups = [
            add(
                dg.AssetSpec(
                    ["postgres", lookup.asset_name],
                    description=f"PostgreSQL {'table ' + lookup.table if lookup.table else 'query ' + lookup.name}, "
                    f"snapshotted once per run to enrich {pipeline.name}",
                    group_name="sources",
                    kinds={"postgres"},
                )
            )
            for lookup in pipeline.enrich
        ]
        sink = add(
            dg.AssetSpec(
                ["clickhouse", pipeline.sink.table],
                deps=[topic, *lookups],
                group_name=pipeline.name,
                description=f"{pipeline.description or pipeline.name} Every row carries its Kafka position.",
                kinds={"clickhouse"},
            )
        )
        add(
            dg.AssetSpec(
                ["clickhouse", pipeline.sink.dead_letters],
                deps=[topic],
                group_name=pipeline.name,
                kinds={"clickhouse"},
                description=f"Messages of {pipeline.topic} that {pipeline.name} could not use, with the reason.",
            )
        )
        for aggregate in pipeline.aggregate:
            measures = ", ".join(aggregate.measures)
            for window, view in aggregate.windows.items():
                groups = ", ".join([window, *aggregate.group_by])
                add(
                    dg.AssetSpec(
                        ["clickhouse", view],
                        deps=[sink],
                        group_name=pipeline.name,
                        kinds={"clickhouse"},
                        description=f"{measures} per ({groups}), exact, merged from per-range partials.",
                    )
                )
    return list(specs.values())
