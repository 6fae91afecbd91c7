"""The README documents every setting, both packaged pipeline files and the set-up commands CI relies on."""

import re
from pathlib import Path

from clickhouse_etl.core.pipeline.loading import packaged_folder
from clickhouse_etl.core.settings import Settings, environment_variable

ROOT = Path(__file__).parents[2]
README = (ROOT / "README.md").read_text()


def test_every_setting_is_documented() -> None:
    missing = [
        environment_variable(name) for name in Settings.model_fields if f"`{environment_variable(name)}`" not in README
    ]
    assert missing == []


def test_every_variable_a_packaged_pipeline_reads_is_documented() -> None:
    files = [path.read_text() for path in packaged_folder().glob("*.yaml")]
    lines = [line for text in files for line in text.splitlines() if not line.startswith("#")]
    variables = {name for line in lines for name in re.findall(r"\$\{(\w+)", line)}
    assert variables and [name for name in sorted(variables) if f"`{name}`" not in README] == []


def test_the_readme_shows_both_packaged_pipeline_files_as_they_are() -> None:
    for path in sorted(packaged_folder().glob("*.yaml")):
        body = "\n".join(line for line in path.read_text().splitlines() if not line.startswith("#")).strip()
        assert body in README, f"README's copy of {path.name} is not the file"


def test_readme_names_the_commands_ci_runs() -> None:
    ci = (ROOT / ".ci" / "run").read_text()
    assert "bash scripts/test.sh" in README and "scripts/test.sh" in ci
    assert "bash scripts/demo.sh" in README


def test_the_local_instance_and_workspace_files_are_the_packaged_ones() -> None:
    """The top-level dagster.yaml and workspace.yaml are what every command installs and loads."""
    for name in ("dagster.yaml", "workspace.yaml"):
        assert (ROOT / name).read_text() == (ROOT / "clickhouse_etl" / "orchestration" / name).read_text()
