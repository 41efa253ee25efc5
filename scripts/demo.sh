#!/usr/bin/env bash
# The main job on the embedded defaults: SQLite under demo/state, a demo inbox of SYNTHETIC scans
# (PNG and DICOM in several transfer syntaxes, plus a few broken files), processed by the daemon.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test   # the demo inbox is written with the tests' DICOM factory (needs pyjpegls)
rm -rf demo
.venv/bin/python scripts/make_demo_inbox.py demo/inbox
.venv/bin/meddaemon start --watch demo/inbox --state-dir demo/state --once --stable-seconds 0.5
.venv/bin/meddaemon status --watch demo/inbox --state-dir demo/state
echo
echo "Files are now in demo/state/{work,archive,failed}; run the daemon for real with:"
echo "  .venv/bin/meddaemon start --watch demo/inbox --state-dir demo/state"
