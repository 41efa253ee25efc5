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


@pytest.mark.parametrize("command", [["medcli", "models", "list"], ["meddaemon", "status"]])
def test_a_ctrl_c_while_a_command_is_imported_is_an_interruption_not_a_traceback(command: list[str], tmp_path: Path):
    """Importing the command line takes most of a second: a Ctrl-C then printed a KeyboardInterrupt
    traceback through every import under way, where once the command runs it says "interrupted"."""
    import os
    import shutil
    import signal
    import time

    script = shutil.which(command[0], path=str(Path(sys.executable).parent))
    assert script is not None, f"{command[0]} is not installed beside {sys.executable}"
    run = subprocess.Popen(
        [script, *command[1:], "--state-dir", str(tmp_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    time.sleep(0.3)  # the imports take 0.8 s here
    os.killpg(run.pid, signal.SIGINT)
    _, err = run.communicate(timeout=60)
    assert run.returncode == 130 and "error: interrupted (Ctrl-C)" in err, err
    assert "Traceback" not in err, err
