"""The pipeline model: a pipeline file validated into typed sections, and the columns each stage carries."""

from clickhouse_etl.core.pipeline.columns import PipelineColumns, columns_of
from clickhouse_etl.core.pipeline.loading import LoadedPipeline, PipelineError, load_pipelines
from clickhouse_etl.core.pipeline.model import Pipeline

__all__ = ["LoadedPipeline", "Pipeline", "PipelineColumns", "PipelineError", "columns_of", "load_pipelines"]
