"""The benchmark scripts still run against the library they measure: each explains itself, and the
cheapest ones run a round (heatmaps.py fell behind a change of engine.heatmaps and crashed at every
command, unseen). Their figures are the README's to report, not a test's."""

from __future__ import annotations

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


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_benchmark_explains_itself(script: str):
    done = run(str(BENCHMARKS / script), "--help")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "usage:" in done.stdout


def test_the_heatmap_benchmark_runs_a_round_of_each_path():
    """mobilenet_v2 (CAM, with the maps-only part) and vgg16 (the gradient path), tiny."""
    tiny = ("--batch", "2", "--size", "64", "--repeats", "1", "--warmup", "0", "--vgg-batch", "1")
    done = run(str(BENCHMARKS / "heatmaps.py"), "--arch", "mobilenet_v2", "--arch", "vgg16", *tiny)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [line for line in done.stdout.splitlines() if line.startswith(("| mobilenet_v2", "| vgg16"))]
    assert len(rows) == 2, done.stdout
