#!/usr/bin/env bash
# Installs the test dependencies, then runs the linter and the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install --quiet torch==2.13.0 -r requirements-dev.txt
python3 -m ruff check .
python3 -m pytest -q "$@"
