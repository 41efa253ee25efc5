"""``meddaemon --help``, ``meddaemon health`` (a container probe every 30 s) and ``medcli --help``
start without the deep-learning stack: each runs in a fresh interpreter that then reports what it
imported."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from meddaemon.db.engine import create_db_engine
from meddaemon.db.migrate import upgrade

HEAVY = ("torch", "torchvision", "onnxruntime")

RUN_AND_REPORT = """
import json, sys
from meddaemon.cli.{module} import cli
try:
    cli.main({args!r}, prog_name="x")
except SystemExit as exit:
    code = exit.code
print(json.dumps({{"code": code, "heavy": [m for m in {heavy!r} if m in sys.modules]}}), file=sys.stderr)
"""


def imported(module: str, args: list[str]) -> dict[str, object]:
    script = RUN_AND_REPORT.format(module=module, args=args, heavy=HEAVY)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True)
    report: dict[str, object] = json.loads(done.stderr.strip().splitlines()[-1])
    return report


@pytest.mark.parametrize(("module", "args"), [("daemon", ["--help"]), ("medcli", ["--help"])])
def test_help_does_not_import_torch(module: str, args: list[str]):
    assert imported(module, args) == {"code": 0, "heavy": []}


def test_health_does_not_import_torch(tmp_path: Path):
    engine = create_db_engine(f"sqlite:///{tmp_path / 'meddaemon.db'}")
    upgrade(engine)
    engine.dispose()
    report = imported("daemon", ["health", "--state-dir", str(tmp_path)])
    assert report == {"code": 2, "heavy": []}  # down: no daemon runs on this database
