"""``medcli synth``: writes a phantom dataset its adapter reads, explains itself, refuses a full folder."""

from __future__ import annotations

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


def test_synth_refuses_a_folder_that_holds_files(tmp_path: Path) -> None:
    (tmp_path / "mine.txt").write_text("keep")
    result = CliRunner().invoke(medcli, ["synth", "covid", "--out", str(tmp_path)])
    assert result.exit_code == 1
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
