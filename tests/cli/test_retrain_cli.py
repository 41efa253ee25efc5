"""``medcli retrain``: trains on SYNTHETIC BUSI phantoms and registers a version that
``medcli models list`` shows; bad data exits 2 with a clear message."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from meddaemon.cli.medcli import cli as medcli
from meddaemon.training.phantoms import write_phantoms

FAST = ["--arch", "small_cnn", "--image-size", "32", "--epochs", "2", "--batch-size", "16", "--lr", "1e-3"]


@pytest.fixture(scope="module")
def busi(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_phantoms("busi", tmp_path_factory.mktemp("data") / "busi", count=12, size=48, seed=5).root


def test_retrain_registers_a_version_that_models_list_shows(busi: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    state = ["--state-dir", str(tmp_path / "state")]
    result = runner.invoke(medcli, ["retrain", "busi", "--data", str(busi), *state, *FAST, "--version", "c1", "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["registered"]["status"] == "registered"
    assert summary["input_contract"]["height"] == 32
    assert (tmp_path / "state" / "training" / "busi" / "versions" / "c1" / "MODEL_CARD.md").is_file()
    assert (tmp_path / "state" / "models" / "busi" / "c1" / "model.safetensors").is_file()

    listed = runner.invoke(medcli, ["models", "list", "--json", *state])
    assert listed.exit_code == 0, listed.output
    assert [(r["task"], r["version"], r["status"]) for r in json.loads(listed.stdout)] == [("busi", "c1", "registered")]

    again = runner.invoke(
        medcli, ["retrain", "busi", "--data", str(busi), *state, *FAST, "--epochs", "3", "--resume", "--promote"]
    )
    assert again.exit_code == 0, again.output
    assert "resumed from" in again.output and "active" in again.output
    rows = json.loads(runner.invoke(medcli, ["models", "list", "--json", *state]).stdout)
    assert [r["status"] for r in rows] == ["registered", "active"]


def test_bad_data_exits_2_with_a_message(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    result = CliRunner().invoke(
        medcli, ["retrain", "busi", "--data", str(tmp_path / "empty"), "--state-dir", str(tmp_path / "s"), *FAST]
    )
    assert result.exit_code == 2, result.output
    assert "bad dataset" in result.output and "matches no dataset layout" in result.output


def test_help_explains_the_command() -> None:
    result = CliRunner().invoke(medcli, ["retrain", "--help"])
    assert result.exit_code == 0
    for option in ("--data", "--epochs", "--arch", "--image-size", "--resume", "--promote", "--out", "--json"):
        assert option in result.output


def test_resume_refuses_a_dataset_that_changed(busi: Path, tmp_path: Path) -> None:
    import shutil

    data = tmp_path / "busi"
    shutil.copytree(busi, data)
    runner = CliRunner()
    state = ["--state-dir", str(tmp_path / "state")]
    first = runner.invoke(medcli, ["retrain", "busi", "--data", str(data), *state, *FAST, "--epochs", "1"])
    assert first.exit_code == 0, first.output
    (data / "benign" / "benign (1).png").unlink()
    (data / "benign" / "benign (1)_mask.png").unlink()
    again = runner.invoke(medcli, ["retrain", "busi", "--data", str(data), *state, *FAST, "--resume"])
    assert again.exit_code == 1, again.output
    assert "changed since the checkpoint" in again.output
