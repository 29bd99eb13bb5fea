#!/usr/bin/env bash
# Install everything needed (first run) and run the test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh 2> >(grep -v "is neither a file nor a directory" >&2)
.venv/bin/ruff check src tests benchmarks
.venv/bin/python -m pytest -q "$@"
