"""The suite's own scheduling: ``scripts/test.sh`` runs the tests in three pytest-xdist workers with
``--dist loadgroup``, and the tests that share an expensive set-up or must not run beside each other
(a Ray cluster, the served seed models, BUSI training) carry an ``xdist_group`` mark. The mark must
keep them on one worker. pytest 9.2 broke that without an error (every grouped test went wherever,
each worker built the group's set-up again), so a real two-worker run checks it here."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

GROUPED_TESTS = """
import os
from pathlib import Path

import pytest

pytestmark = pytest.mark.xdist_group("together")


@pytest.mark.parametrize("i", range(6))
def test_grouped(i):
    Path(os.environ["WORKERS_SEEN"], f"{i}-{os.environ['PYTEST_XDIST_WORKER']}").touch()


@pytest.mark.parametrize("i", range(6))
def test_free(i):
    pass
"""


def test_tests_of_one_xdist_group_run_on_one_worker(tmp_path: Path) -> None:
    (tmp_path / "test_grouped.py").write_text(GROUPED_TESTS)
    seen = tmp_path / "seen"
    seen.mkdir()
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-n", "2", "--dist", "loadgroup", "-q", "-p", "no:cacheprovider",
         "-c", os.devnull, "--rootdir", str(tmp_path), str(tmp_path)],
        capture_output=True, text=True, timeout=120, env={**os.environ, "WORKERS_SEEN": str(seen)}, check=False,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    workers = {name.split("-", 1)[1] for name in os.listdir(seen)}
    assert len(os.listdir(seen)) == 6
    assert len(workers) == 1, f"the group's tests ran on {sorted(workers)}"
