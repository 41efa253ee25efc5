"""An evaluation stopped by SIGKILL or Ctrl-C resumes where it stopped: what was written stays,
the rest is scored on the next run, and every file ends up scored exactly once."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from dicom_factory import write_png
from sqlalchemy import func, select

from evaluate_factory import files_written
from meddaemon.cli.common import EXIT_INTERRUPTED
from meddaemon.db.engine import session_factory
from meddaemon.db.models import Evaluation, Result, Scan
from meddaemon.evaluate.pipeline import EvaluationRequest, run_evaluation
from meddaemon.evaluate.store import EvaluationError, one_run_at_a_time

MEDCLI = Path(sys.executable).parent / "medcli"
FILES = 6000  # about 250 written at the first write (1 s) here; with 1,500 a CI run once saw none before all were


@pytest.fixture(scope="module")
def many_images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SYNTHETIC PNGs, enough for a run of a few seconds."""
    folder = tmp_path_factory.mktemp("cohort") / "synthetic_images"
    rng = np.random.default_rng(7)
    for i in range(FILES):
        write_png(folder / f"synthetic_{i:05}.png", rng.integers(0, 255, (64, 64), dtype=np.uint8))
    return folder


def start(world, folder: Path) -> subprocess.Popen[bytes]:  # type: ignore[no-untyped-def]
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEDDAEMON_")}
    args = [str(MEDCLI), "evaluate", str(folder), "--task", "busi", "--workers", "0", "--batch-size", "4", "--heatmaps"]
    args += ["--state-dir", str(world.settings.state_dir), "--db", world.db_url]
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, start_new_session=True)


def wait_for_first_write(world, proc: subprocess.Popen[bytes]) -> int:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        count = files_written(world.db_url)
        if count:
            return count
        time.sleep(0.05)
    raise AssertionError(f"nothing written before the run ended: {proc.communicate()[1].decode()[-2000:]}")


def counts(world) -> tuple[int, int, int]:  # type: ignore[no-untyped-def]
    engine = world.engine()
    with session_factory(engine)() as session:
        scans = session.scalar(select(func.count()).select_from(Scan))
        results = session.scalar(select(func.count()).select_from(Result))
        distinct = session.scalar(select(func.count(func.distinct(Scan.sha256))))
    engine.dispose()
    return int(scans or 0), int(results or 0), int(distinct or 0)


@pytest.mark.slow
@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
@pytest.mark.parametrize("stop", [signal.SIGKILL, signal.SIGINT], ids=["sigkill", "ctrl-c"])
def test_a_stopped_run_resumes_and_scores_every_file_exactly_once(world, many_images: Path, stop: int) -> None:
    proc = start(world, many_images)
    try:
        first = wait_for_first_write(world, proc)
        os.kill(proc.pid, stop)
        rc = proc.wait(30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    before, _, _ = counts(world)
    assert 0 < before < FILES, f"the run must be stopped in the middle ({first} written when stopped, rc {rc})"
    engine = world.engine()
    with session_factory(engine)() as session:
        [row] = session.scalars(select(Evaluation)).all()
        if stop == signal.SIGINT:
            assert rc == EXIT_INTERRUPTED and row.state == "interrupted"
        else:
            assert rc == -signal.SIGKILL and row.state == "running"
    engine.dispose()

    engine = world.engine()
    request = EvaluationRequest(path=many_images, task="busi", workers=1, batch_size=32)
    resumed = run_evaluation(engine, world.settings, request)
    engine.dispose()
    assert resumed.state == "completed" and resumed.summary["failed"] == 0
    assert resumed.summary["reused"] >= before and resumed.summary["scored"] == FILES - resumed.summary["reused"]
    assert counts(world) == (FILES, 3 * FILES, FILES)


@pytest.mark.slow
@pytest.mark.parametrize("db_url", ["sqlite", "postgresql"], indirect=True)
def test_a_second_run_of_an_evaluation_while_the_first_runs_is_refused_and_a_killed_run_holds_nothing(
    world, many_images: Path
) -> None:
    """Two runs of one name at once each added their counts to the row: scored and reused came to
    twice the files. The second is refused, on this host or another sharing the database."""
    proc = start(world, many_images)
    try:
        wait_for_first_write(world, proc)
        engine = world.engine()
        request = EvaluationRequest(path=many_images, task="busi", workers=0)
        with pytest.raises(EvaluationError, match="is being run by another process"):
            run_evaluation(engine, world.settings, request)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)
        # the killed run's hold goes with its connection: PostgreSQL lets the lock go once its backend
        # hears the connection closed, a moment after the kill (it was tried at once, and lost the race)
        deadline = time.monotonic() + 15
        while True:
            try:
                with one_run_at_a_time(engine, "synthetic_images-busi-v1"):
                    break
            except EvaluationError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        engine.dispose()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
