"""Loading the definitions prints nothing: commands and code servers start without warnings."""

from __future__ import annotations

import subprocess
import sys


def test_loading_the_definitions_prints_no_warning() -> None:
    loaded = subprocess.run(
        [
            sys.executable,
            "-c",
            "from clickhouse_etl.orchestration.definitions import configured_definitions\n"
            "from clickhouse_etl.core.settings import Settings\n"
            "configured_definitions(Settings(pipelines='ad_clicks,api_usage')).get_repository_def()\n",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "Warning" not in loaded.stderr, loaded.stderr
