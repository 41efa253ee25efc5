#!/usr/bin/env bash
# The main job on the embedded defaults: SQLite under demo/state, a busi model trained on SYNTHETIC
# phantoms, and a demo inbox of SYNTHETIC scans (PNG and DICOM in several transfer syntaxes, plus a
# few broken files) processed by the daemon: results, heatmaps, PDF reports, archive.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test   # the demo inbox is written with the tests' DICOM factory (needs pyjpegls)
rm -rf demo
# a busi model trained on SYNTHETIC ultrasound phantoms in BUSI's published layout (about 30 s on 2 cores)
.venv/bin/medcli synth busi --out demo/datasets/Dataset_BUSI_with_GT --count 60 --size 128 --seed 0
.venv/bin/medcli db upgrade --state-dir demo/state   # only `start` and `db upgrade` create the database
.venv/bin/medcli retrain busi --data demo/datasets/Dataset_BUSI_with_GT --state-dir demo/state \
  --arch small_cnn --image-size 64 --epochs 20 --lr 0.001 --promote --force   # SYNTHETIC phantoms are easy: a perfect score may be flagged IMPLAUSIBLE
.venv/bin/python scripts/make_demo_inbox.py demo/inbox
.venv/bin/meddaemon start --watch demo/inbox --create-watch --state-dir demo/state --once --stable-seconds 0.5
.venv/bin/meddaemon status --watch demo/inbox --state-dir demo/state
echo
echo "Files are now in demo/state/{work,archive,failed}; run the daemon for real with:"
echo "  .venv/bin/meddaemon start --watch demo/inbox --state-dir demo/state"
