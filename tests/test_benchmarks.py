"""The benchmark scripts still run against the library they measure: each explains itself, and the
cheapest ones run a round (heatmaps.py fell behind a change of engine.heatmaps and crashed at every
command, unseen). Their figures are the README's to report, not a test's."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
SCRIPTS = sorted(p.name for p in BENCHMARKS.glob("*.py") if not p.name.startswith("_"))


def run(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, timeout=timeout, cwd=BENCHMARKS.parent
    )


#: each script's ``--help`` run in turn by one interpreter (torch imported once, not once a script)
HELP_OF_EACH = """
import contextlib, io, json, runpy, sys, traceback
answers = {}
sys.path.insert(0, sys.argv[1])
for script in sys.argv[2:]:
    sys.argv = [script, "--help"]
    out, code = io.StringIO(), None
    try:
        with contextlib.redirect_stdout(out):
            runpy.run_path(script, run_name="__main__")
    except SystemExit as stopped:
        code = stopped.code
    except BaseException:
        code = traceback.format_exc()[-2000:]
    answers[script] = [code, out.getvalue()]
print(json.dumps(answers))
"""


@pytest.fixture(scope="module")
def helps() -> dict[str, tuple[object, str]]:
    """Script name -> (its exit code or traceback, what its ``--help`` wrote)."""
    done = run("-c", HELP_OF_EACH, str(BENCHMARKS), *(str(BENCHMARKS / s) for s in SCRIPTS))
    assert done.returncode == 0, done.stderr[-2000:]
    answers = json.loads(done.stdout.splitlines()[-1])
    return {Path(script).name: (code, text) for script, (code, text) in answers.items()}


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_benchmark_explains_itself(script: str, helps: dict[str, tuple[object, str]]):
    code, text = helps[script]
    assert code in (0, None), code
    assert "usage:" in text


def test_the_heatmap_benchmark_runs_a_round_of_each_path():
    """mobilenet_v2 (CAM, with the maps-only part) and vgg16 (the gradient path), tiny."""
    tiny = ("--batch", "2", "--size", "64", "--repeats", "1", "--warmup", "0", "--vgg-batch", "1")
    done = run(str(BENCHMARKS / "heatmaps.py"), "--arch", "mobilenet_v2", "--arch", "vgg16", *tiny)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [line for line in done.stdout.splitlines() if line.startswith(("| mobilenet_v2", "| vgg16"))]
    assert len(rows) == 2, done.stdout


def test_a_once_run_whose_results_came_in_one_batch_has_no_streaming_pace(monkeypatch: pytest.MonkeyPatch):
    """`speed.py --files 16` (one batch: every result stamped at once) ended in a ZeroDivisionError
    after its table, its summary lost."""
    import runpy

    monkeypatch.syspath_prepend(str(BENCHMARKS))
    speed = runpy.run_path(str(BENCHMARKS / "speed.py"))
    one_batch = speed["OnceTimeline"](2.0, 16, 4.0, 1.0, 3.0, 3.1, 3.5, 3.5)
    two_batches = speed["OnceTimeline"](2.0, 17, 4.0, 1.0, 3.0, 3.1, 3.5, 3.9)
    assert one_batch.streaming is None and two_batches.streaming == pytest.approx(40.0)
    assert speed["streaming_paces"]([one_batch, two_batches]) == [pytest.approx(40.0)]
