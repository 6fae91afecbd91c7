"""The README documents every setting and the two set-up commands CI relies on."""

from pathlib import Path

from clickhouse_etl.core.settings import Settings, environment_variable

README = (Path(__file__).parents[2] / "README.md").read_text()


def test_every_setting_is_documented() -> None:
    missing = [
        environment_variable(name) for name in Settings.model_fields if f"`{environment_variable(name)}`" not in README
    ]
    assert missing == []


def test_readme_names_the_commands_ci_runs() -> None:
    ci = (Path(__file__).parents[2] / ".ci" / "run").read_text()
    assert "bash scripts/test.sh" in README and "scripts/test.sh" in ci
    assert "bash scripts/demo.sh" in README
