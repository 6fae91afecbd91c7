#!/usr/bin/env bash
# The test command: installs what is needed, lints, and runs every test. The integration tests start a
# real local stack of their own (Kafka, PostgreSQL, Redis on ports 19092/15432/16379, embedded chDB).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/install.sh
python3 -m ruff check .
python3 -m ruff format --check .
# The slowest tests are listed at the end, so the suite's time stays visible.
python3 -m pytest -q --durations=15 "$@"
