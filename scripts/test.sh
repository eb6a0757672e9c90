#!/usr/bin/env bash
# Install, lint and run the whole test suite (every lane: unit, server, pacs, browser, cluster, study).
# Skip reasons are printed (-rs) with the 25 slowest tests; with CI set, any skip fails the run (tests/conftest.py).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
.venv/bin/ruff check .
exec .venv/bin/python -m pytest -q -rs --durations=25 -p no:cacheprovider "$@"
