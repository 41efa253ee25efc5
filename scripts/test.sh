#!/usr/bin/env bash
# Set up and run the whole test suite (unit, decoding, SQLite + PostgreSQL, daemon subprocesses).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/system-packages.sh
bash scripts/setup.sh test
bash scripts/system-packages.sh
.venv/bin/python -m pytest "$@"
