#!/usr/bin/env bash
# Set up and run the whole test suite (unit, decoding, SQLite + PostgreSQL, daemon subprocesses).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
.venv/bin/python -m pytest "$@"
