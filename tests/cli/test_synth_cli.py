"""``medcli synth``: writes a phantom dataset its adapter reads, explains itself, refuses a full folder."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import CliRunner

from meddaemon.cli.medcli import cli as medcli
from meddaemon.training.datasets import load_dataset


def test_synth_writes_a_dataset_in_the_published_layout(tmp_path: Path) -> None:
    out = tmp_path / "Dataset_BUSI_with_GT"
    result = CliRunner().invoke(medcli, ["synth", "busi", "--out", str(out), "--count", "3", "--size", "48"])
    assert result.exit_code == 0, result.output
    assert "wrote 9 SYNTHETIC busi images" in result.output
    assert load_dataset(out).counts() == {"benign": 3, "malignant": 3, "normal": 3}
    assert (out / "benign" / "benign (1)_mask.png").is_file()


def test_synth_help_names_the_layouts_and_the_defaults() -> None:
    result = CliRunner().invoke(medcli, ["synth", "--help"])
    assert result.exit_code == 0
    for words in ("Data_Entry_2017.csv", "benign (1)_mask.png", "_idx5_x", "metadata.csv", "SYNTHETIC", "--seed"):
        assert words in result.output


def test_synth_refuses_a_folder_that_holds_files_as_bad_usage(tmp_path: Path) -> None:
    (tmp_path / "mine.txt").write_text("keep")
    result = CliRunner().invoke(medcli, ["synth", "covid", "--out", str(tmp_path)])
    assert result.exit_code == 2  # --out must be new or empty: bad usage, not a file that cannot be written
    assert "is not empty" in result.output


def test_synth_refuses_a_task_without_phantoms(tmp_path: Path) -> None:
    result = CliRunner().invoke(medcli, ["synth", "mammography", "--out", str(tmp_path / "x")])
    assert result.exit_code == 2
    assert "busi" in result.output


@pytest.mark.parametrize("task", ["busi", "histopathology"])
def test_a_size_the_phantoms_cannot_take_is_a_usage_error_exit_2(tmp_path: Path, task: str) -> None:
    """--size 20 passed click's range (16) and was refused by the phantoms with exit 1; histopathology
    took 16 to 31, a dataset its task refused whole (contract_mismatch: under its 32-pixel minimum)."""
    result = CliRunner().invoke(medcli, ["synth", task, "--out", str(tmp_path / "x"), "--size", "20"])
    assert result.exit_code == 2, result.output
    assert "Invalid value for '--size': 20 is not in the range x>=32" in result.output
    assert not (tmp_path / "x").exists()


def test_synth_into_a_folder_it_cannot_make_is_one_line_exit_1(tmp_path: Path) -> None:
    """It was a traceback (NotADirectoryError), exit 1."""
    blocker = tmp_path / "a-file"
    blocker.write_text("SYNTHETIC: not a folder")
    result = CliRunner().invoke(medcli, ["synth", "busi", "--out", str(blocker / "x")])
    assert result.exit_code == 1, result.output
    assert f"error: cannot write {blocker / 'x'}" in result.stderr and "Traceback" not in result.output


def interrupted_synth(out: Path, partial: Path, meanwhile: Callable[[], object] = lambda: None) -> str:
    """``medcli synth chestxray14 --out OUT`` sent SIGINT once 20 images are in its ``.partial``
    folder (in ``partial``), ``meanwhile`` done just before; asserts exit 130, returns stderr."""
    medcli_path = Path(sys.executable).parent / "medcli"
    proc = subprocess.Popen(
        [str(medcli_path), "synth", "chestxray14", "--out", str(out), "--count", "1000000"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while len(list(partial.glob(f".{out.name}.*.partial/images/*.png"))) < 20:
            assert time.monotonic() < deadline and proc.poll() is None, proc.communicate()
            time.sleep(0.05)
        meanwhile()
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    return err


def test_synth_interrupted_exits_130_and_leaves_no_dataset_half_written(tmp_path: Path) -> None:
    """Ctrl-C was click's "Aborted!", exit 1, and left images without their labels nor the
    README.txt saying SYNTHETIC, which the next run refused as not empty."""
    err = interrupted_synth(tmp_path / "nih", tmp_path)
    assert "interrupted (Ctrl-C)" in err and "Aborted" not in err
    assert list(tmp_path.iterdir()) == []


def test_synth_writes_into_an_empty_folder_given_even_through_a_link(tmp_path: Path) -> None:
    """Written beside the folder and renamed over it, a dataset failed for a link to an empty folder
    (and for the working folder, and for a mount point) after being written whole."""
    (tmp_path / "target").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "target")
    result = CliRunner().invoke(medcli, ["synth", "busi", "--out", str(tmp_path / "link"), "--count", "2"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "link").is_symlink() and (tmp_path / "target" / "README.txt").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "target"]


def test_synth_interrupted_in_a_folder_it_was_given_removes_what_it_wrote_and_nothing_else(tmp_path: Path) -> None:
    """Emptying the folder on failure deleted what another program had written there meanwhile."""
    out = tmp_path / "given"
    out.mkdir()
    interrupted_synth(out, out, lambda: (out / "colleague-notes.txt").write_text("SYNTHETIC: not synth's"))
    assert [p.name for p in out.iterdir()] == ["colleague-notes.txt"]


def test_an_output_under_a_file_says_which_file_is_no_folder(tmp_path: Path) -> None:
    (tmp_path / "notes").write_text("SYNTHETIC")
    result = CliRunner().invoke(medcli, ["synth", "busi", "--out", str(tmp_path / "notes" / "busi")])
    assert result.exit_code == 1
    assert (
        result.output
        == f"error: cannot write {tmp_path / 'notes' / 'busi'}: {tmp_path / 'notes'} is a file, not a folder\n"
    )
