"""DistributedDataParallel under torchrun: a real 2-process gloo training on the CPU of SYNTHETIC BUSI
phantoms registers a version whose test ROC-AUC matches a 1-process run of the same global batch
(16 = 2 processes x 8, against 1 x 16) within TOLERANCE."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from meddaemon.cli.common import EXIT_USAGE
from meddaemon.cli.retrain import _follow_rank_0
from meddaemon.engine.tasks import BUILTIN_TASKS
from meddaemon.training.phantoms import write_phantoms
from meddaemon.training.train import TrainConfig
from ports import free_port

TOLERANCE = 0.05
FAST = ["--arch", "small_cnn", "--image-size", "64", "--epochs", "10", "--lr", "1e-3", "--device", "cpu", "--json"]
TORCHRUN = Path(sys.executable).with_name("torchrun")


def run_retrain(launcher: list[str], data: Path, state: Path, batch_size: int, version: str) -> dict[str, object]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    upgrade = [sys.executable, "-m", "meddaemon.cli.medcli", "db", "upgrade", "--state-dir", str(state)]
    subprocess.run(upgrade, capture_output=True, env=env, timeout=120, check=True)  # retrain creates no database
    command = [*launcher, "-m", "meddaemon.cli.medcli", "retrain", "busi", "--data", str(data)]
    command += ["--state-dir", str(state), *FAST, "--batch-size", str(batch_size), "--version", version]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=240, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    summary: dict[str, object] = json.loads(done.stdout[done.stdout.index("{") :])
    return summary


@pytest.mark.slow
@pytest.mark.skipif(not TORCHRUN.is_file(), reason="torchrun is not installed beside this Python")
def test_two_gloo_processes_give_the_metrics_of_one(tmp_path: Path) -> None:
    data = write_phantoms("busi", tmp_path / "busi", count=30, size=64, seed=7).root
    torchrun = [str(TORCHRUN), "--nproc-per-node", "2", "--master-addr", "127.0.0.1", "--master-port"]
    with ThreadPoolExecutor(2) as both:  # independent runs: side by side, as two users would start them
        two_run = both.submit(run_retrain, [*torchrun, str(free_port())], data, tmp_path / "two", 8, "d2")
        one_run = both.submit(run_retrain, [sys.executable], data, tmp_path / "one", 16, "d1")
        two, one = two_run.result(), one_run.result()

    for summary, version in ((two, "d2"), (one, "d1")):
        registered = summary["registered"]
        assert isinstance(registered, dict) and registered["status"] == "registered"
        assert registered["version"] == version
        assert not [f for f in summary["flags"] if f.startswith("COLLAPSE")], summary["flags"]  # type: ignore[union-attr]
    assert (tmp_path / "two" / "models" / "busi" / "d2" / "model.safetensors").is_file()
    # one process wrote the version and the checkpoints: no other rank's leftovers
    assert sorted(p.name for p in (tmp_path / "two" / "training" / "busi" / "versions").iterdir()) == ["d2"]

    auc_two = two["metrics"]["test"]["roc_auc"]  # type: ignore[index]
    auc_one = one["metrics"]["test"]["roc_auc"]  # type: ignore[index]
    assert auc_one >= 0.9 and auc_two >= 0.9, (auc_one, auc_two)
    assert abs(auc_two - auc_one) <= TOLERANCE, (auc_one, auc_two)


@pytest.mark.skipif(not TORCHRUN.is_file(), reason="torchrun is not installed beside this Python")
def test_a_rank_that_fails_ends_the_whole_run_at_once_with_its_message(tmp_path: Path) -> None:
    """Rank 0 refused the dataset (its test split empty) and waited at the last barrier, while rank
    1, which had not checked, waited in training's first collective: both for ever (gloo's timeout is
    30 minutes), torchrun never told. The failing rank leaves at once and torchrun stops the other."""
    data = write_phantoms("busi", tmp_path / "busi", count=1, size=32, seed=7).root
    state = tmp_path / "state"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    upgrade = [sys.executable, "-m", "meddaemon.cli.medcli", "db", "upgrade", "--state-dir", str(state)]
    subprocess.run(upgrade, capture_output=True, env=env, timeout=120, check=True)
    command = [str(TORCHRUN), "--nproc-per-node", "2", "--master-addr", "127.0.0.1", "--master-port", str(free_port())]
    command += ["-m", "meddaemon.cli.medcli", "retrain", "busi", "--data", str(data), "--state-dir", str(state), *FAST]
    run = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True
    )
    try:
        _, stderr = run.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(run.pid, signal.SIGKILL)  # torchrun and both ranks
        run.communicate()
        pytest.fail("the run hung after its rank 0 failed")
    assert run.returncode != 0
    assert "error: bad dataset" in stderr and "split is empty" in stderr, stderr[-2000:]
    assert "DatasetError" not in stderr, stderr[-3000:]  # rank 1's traceback: rank 0 says why, torchrun who failed
    assert not (state / "models" / "busi").exists()


def test_a_rank_other_than_0_that_meets_rank_0_s_refusal_leaves_with_its_code_and_without_a_word(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    """Rank 1 met the refusal rank 0 printed (the dataset) and printed it again as a traceback, when
    it got there before torchrun stopped it (a race the run above does not always lose)."""
    data = write_phantoms("busi", tmp_path / "busi", count=5, size=32, seed=7).root
    for i in range(4):  # over 5% unreadable: the dataset is refused
        (data / "benign" / f"benign (cut {i}).png").write_bytes(b"\x89PNG\r\n\x1a\n SYNTHETIC, cut short")
    spec = BUILTIN_TASKS["busi"]
    config = TrainConfig.from_task(spec, epochs=1, architecture="small_cnn", image_size=32, device="cpu")

    with pytest.raises(SystemExit) as left:
        _follow_rank_0(spec, data, config, tmp_path / "work", False, 1)

    assert left.value.code == EXIT_USAGE
    assert "Traceback" not in capfd.readouterr().err


@pytest.mark.slow
@pytest.mark.skipif(not TORCHRUN.is_file(), reason="torchrun is not installed beside this Python")
def test_ctrl_c_under_torchrun_names_the_torchrun_resume_and_one_process_cannot_resume_it(tmp_path: Path) -> None:
    """The resume printed was a plain medcli one, and it resumed two processes' checkpoint in one:
    another global batch, another model, without a word."""
    data = write_phantoms("busi", tmp_path / "busi", count=10, size=32, seed=7).root
    state = tmp_path / "state"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    upgrade = [sys.executable, "-m", "meddaemon.cli.medcli", "db", "upgrade", "--state-dir", str(state)]
    subprocess.run(upgrade, capture_output=True, env=env, timeout=120, check=True)
    port = str(free_port())  # not torchrun's default: the resume must name it
    command = [str(TORCHRUN), "--nproc-per-node", "2", "--master-addr", "127.0.0.1", "--master-port", port]
    command += ["-m", "meddaemon.cli.medcli", "retrain", "busi", "--data", str(data), "--state-dir", str(state)]
    command += ["--arch", "small_cnn", "--image-size", "32", "--epochs", "500", "--patience", "500", "--device", "cpu"]
    command += ["--batch-size", "8"]
    run = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True
    )
    assert run.stdout is not None
    try:
        for line in run.stdout:
            if line.startswith("epoch 2/500:"):
                break  # epoch 1's checkpoint is written before epoch 2 starts
        os.killpg(run.pid, signal.SIGINT)  # Ctrl-C in the terminal: torchrun and both ranks
        _, stderr = run.communicate(timeout=120)
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
            run.communicate()
    message = next((line for line in stderr.splitlines() if line.startswith("interrupted: ")), stderr)
    resume = shlex.split(message.split("continue with: ", 1)[1])
    launch = ["torchrun", "--nproc-per-node", "2", "--master-port", port, "-m", "meddaemon.cli.medcli", "retrain"]
    assert resume[:8] == launch, message
    assert resume[-1] == "--resume"
    resume[resume.index("--epochs") + 1] = "3"  # resume, but stop sooner
    resume[resume.index("--master-port") + 1] = str(free_port())  # that one may be taken by now

    alone = subprocess.run(
        [sys.executable, *resume[5:]], capture_output=True, text=True, env=env, timeout=240, check=False
    )
    assert alone.returncode == 1 and "made by 2 process(es)" in alone.stderr, alone.stderr[-2000:]
    assert "torchrun --nproc-per-node 2" in alone.stderr

    both = [str(TORCHRUN), *resume[1:]]
    resumed = subprocess.run(both, capture_output=True, text=True, env=env, timeout=240, check=False)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
    assert "resumed from" in resumed.stdout + resumed.stderr
    card = next((state / "models" / "busi").glob("*/MODEL_CARD.md")).read_text()
    assert "batch 8 x 2 processes (global 16)" in card
