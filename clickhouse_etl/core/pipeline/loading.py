"""Pipeline files: YAML read, `${VARIABLE:-default}` filled in from the environment, validated into models.

Every problem comes back as one line naming the file, the pipeline and the field path, e.g.
`pipelines/usage.yaml: api_usage.enrich[0].join_key: column "cust_id" not in source fields (did you mean
"customer_id"?)`, and a value that came from the environment names its variable too.

`CLICKHOUSE_ETL_PIPELINES` lists what is configured: pipeline files, folders of them, or the names of the
packaged pipelines (`ad_clicks`, `api_usage`), comma-separated. The default is the packaged `ad_clicks`.
"""

from __future__ import annotations

import difflib
import os
import re
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from clickhouse_etl.core.pipeline.columns import PipelineColumns, PipelineDefinitionError, resolve_columns
from clickhouse_etl.core.pipeline.model import Pipeline

DEFAULT_PIPELINES = "ad_clicks"
_VARIABLE = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


class PipelineError(ValueError):
    """A pipeline file that cannot be used; the message names the file, the pipeline and the field path."""


def packaged_folder() -> Path:
    return Path(str(resources.files("clickhouse_etl") / "pipelines"))


def packaged_names() -> list[str]:
    return sorted(path.stem for path in packaged_folder().glob("*.yaml"))


@dataclass(frozen=True)
class LoadedPipeline:
    pipeline: Pipeline
    columns: PipelineColumns
    source: str  # the file it came from, as shown in messages


@dataclass
class _Interpolated:
    document: Any
    variables: dict[tuple[str | int, ...], list[str]] = field(default_factory=dict)  # path → variables used


def _interpolate(
    node: Any, environment: Mapping[str, str], path: tuple = (), found: _Interpolated | None = None
) -> Any:
    """`${NAME}` and `${NAME:-default}` in string values, from the environment; `$$` is a literal `$`."""
    found = found if found is not None else _Interpolated(None)
    if isinstance(node, dict):
        return {key: _interpolate(value, environment, (*path, key), found) for key, value in node.items()}
    if isinstance(node, list):
        return [_interpolate(value, environment, (*path, i), found) for i, value in enumerate(node)]
    if not isinstance(node, str) or "$" not in node:
        return node

    def substitute(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name, default = match.group(1), match.group(2)
        found.variables.setdefault(path, []).append(name)
        value = environment.get(name)
        if value is None or (value == "" and default is not None):
            if default is None:
                raise _MissingVariable(path, name)
            return default
        return value

    return _VARIABLE.sub(substitute, node)


class _MissingVariable(Exception):
    def __init__(self, path: tuple, name: str) -> None:
        super().__init__(name)
        self.path, self.name = path, name


def _format_path(location: tuple[str | int, ...]) -> str:
    text = ""
    for part in location:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


def _model_at(location: tuple[str | int, ...]) -> type[BaseModel] | None:
    """The model class whose keys are expected at `location` (for suggesting a misspelt key)."""
    current: Any = Pipeline
    for part in location:
        if not (isinstance(current, type) and issubclass(current, BaseModel)):
            return None
        if isinstance(part, str) and part in current.model_fields:
            current = _unwrap(current.model_fields[part].annotation)
        else:
            return None
        while typing.get_origin(current) in (list, dict):
            current = _unwrap(typing.get_args(current)[-1])
    return current if isinstance(current, type) and issubclass(current, BaseModel) else None


def _unwrap(annotation: Any) -> Any:
    """The model inside `X | None` or an Annotated type."""
    while typing.get_origin(annotation) is typing.Annotated:
        annotation = typing.get_args(annotation)[0]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        models = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
        annotation = models[0] if len(models) == 1 else annotation
    return annotation


def _messages(error: ValidationError, interpolated: _Interpolated) -> list[tuple[str, str]]:
    problems = []
    for item in error.errors():
        location = tuple(item["loc"])
        message = str(item["msg"]).removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            model = _model_at(location[:-1])
            keys = list(model.model_fields) if model else []
            close = difflib.get_close_matches(str(location[-1]), keys, n=1)
            message = "unknown key" + (
                f' (did you mean "{close[0]}"?)' if close else f"; known keys: {', '.join(keys)}"
            )
        elif item["type"] == "missing":
            message = "required key missing"
        variables = [name for path, names in interpolated.variables.items() if path == location for name in names]
        if variables:
            message += f" (from {', '.join(sorted(set(variables)))})"
        problems.append((_format_path(location), message))
    return problems


def _shown(path: Path) -> str:
    packaged = packaged_folder()
    if path.parent == packaged:
        return f"{path.name} (packaged)"
    relative = os.path.relpath(path)
    return relative if not relative.startswith("..") else str(path)


def load_pipeline_file(path: Path, environment: Mapping[str, str] | None = None) -> LoadedPipeline:
    """One pipeline file, validated; raises PipelineError with every problem, one line each."""
    shown = _shown(path)
    environment = os.environ if environment is None else environment
    try:
        document = yaml.safe_load(path.read_text())
    except OSError as error:
        raise PipelineError(f"{shown}: cannot be read: {error.strerror}") from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"line {mark.line + 1} column {mark.column + 1}: " if mark else ""
        reason = getattr(error, "problem", None) or str(error)
        raise PipelineError(f"{shown}: {where}not valid YAML: {reason}") from None
    if not isinstance(document, dict):
        raise PipelineError(
            f"{shown}: a pipeline file holds one mapping (name, source, …), not {type(document).__name__}"
        )
    document.setdefault("name", path.stem)
    name = str(document.get("name"))
    interpolated = _Interpolated(None)
    try:
        interpolated.document = _interpolate(document, environment, found=interpolated)
    except _MissingVariable as missing:
        where = _format_path(missing.path)
        raise PipelineError(f"{shown}: {name}.{where}: environment variable {missing.name} is not set") from None
    try:
        pipeline = Pipeline.model_validate(interpolated.document)
    except ValidationError as error:
        lines = [f"{shown}: {name}.{where}: {message}" for where, message in _messages(error, interpolated)]
        raise PipelineError("\n".join(lines)) from None
    try:
        columns = resolve_columns(pipeline)
    except PipelineDefinitionError as error:
        lines = []
        for problem in error.problems:
            variables = [
                n for path, names in interpolated.variables.items() if _format_path(path) == problem.path for n in names
            ]
            suffix = f" (from {', '.join(sorted(set(variables)))})" if variables else ""
            lines.append(f"{shown}: {pipeline.name}.{problem.path}: {problem.message}{suffix}")
        raise PipelineError("\n".join(lines)) from None
    return LoadedPipeline(pipeline, columns, shown)


def _files(entry: str) -> list[Path]:
    if entry in packaged_names():
        return [packaged_folder() / f"{entry}.yaml"]
    path = Path(entry).expanduser()
    if path.is_dir():
        files = sorted([*path.glob("*.yaml"), *path.glob("*.yml")])
        if not files:
            raise PipelineError(f"{entry}: a folder without pipeline files (*.yaml)")
        return files
    if path.exists():
        return [path]
    raise PipelineError(
        f"{entry}: no such pipeline file or folder, and not a packaged pipeline ({', '.join(packaged_names())})"
    )


def load_pipelines(spec: str = DEFAULT_PIPELINES, environment: Mapping[str, str] | None = None) -> list[LoadedPipeline]:
    """The configured pipelines, in order; raises PipelineError naming every bad file and field."""
    entries = [entry.strip() for entry in (spec or DEFAULT_PIPELINES).split(",") if entry.strip()]
    loaded: list[LoadedPipeline] = []
    problems: list[str] = []
    for entry in entries:
        try:
            files = _files(entry)
        except PipelineError as error:
            problems.append(str(error))
            continue
        for path in files:
            try:
                loaded.append(load_pipeline_file(path, environment))
            except PipelineError as error:
                problems.append(str(error))
    problems += _conflicts(loaded)
    if problems:
        raise PipelineError("\n".join(problems))
    return loaded


def _conflicts(loaded: list[LoadedPipeline]) -> list[str]:
    """What two pipelines of one deployment may not share: names, Dagster names, tables, claims."""
    problems = []
    owners: dict[tuple[str, str], LoadedPipeline] = {}
    for item in loaded:
        p = item.pipeline
        claims = (p.topic, p.dedup_key_prefix) if p.dedup else None
        keys = [
            ("name", p.name, "name"),
            ("Dagster job", p.job_name, "dagster.job"),
            ("Dagster sensor", p.sensor_name, "dagster.sensor"),
            *[("ClickHouse table", table, "sink.table") for table in p.tables],
        ]
        if claims is not None:
            keys.append(("claims of topic", f"{claims[0]} under prefix {claims[1]}", "dedup.key_prefix"))
        for kind, value, path in keys:
            other = owners.setdefault((kind, value), item)
            if other is not item:
                problems.append(
                    f"{item.source}: {p.name}.{path}: {kind} {value} is also used by pipeline "
                    f"{other.pipeline.name} ({other.source})"
                )
    return problems


def dump_pipeline(pipeline: Pipeline) -> str:
    """The pipeline as a YAML file (values as resolved: no environment references left)."""
    return yaml.safe_dump(pipeline.model_dump(mode="json", exclude_none=True), sort_keys=False)


def write_pipeline_file(pipeline: Pipeline, folder: str | Path) -> str:
    """The pipeline written to a file of its own, e.g. for child processes (a catch-up, a Dagster daemon)."""
    path = Path(folder) / f"{pipeline.name}.yaml"
    path.write_text(dump_pipeline(pipeline))
    return str(path)
