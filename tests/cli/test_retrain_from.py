"""``medcli retrain TASK --from VERSION``: training starts from a registered version (here one imported
from a PyTorch checkpoint, SYNTHETIC weights) on SYNTHETIC BUSI phantoms: the new version's initial
weights are the parent's, it keeps the parent's architecture and input contract, and its manifest
names the parent. A version that cannot be trained from is refused by name before any training."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from meddaemon.cli.medcli import cli as medcli
from meddaemon.engine.architectures import build_model
from meddaemon.training.phantoms import write_phantoms

#: the contract the parent was trained on, unlike busi's preset (grey 224x224, stretched, fixed mean/std)
CONTRACT_FLAGS = ["--channels", "3", "--image-size", "40", "--resize-then-crop", "--per-image-normalisation"]


@pytest.fixture(scope="module")
def busi(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_phantoms("busi", tmp_path_factory.mktemp("data") / "busi", count=12, size=48, seed=5).root


def medcli_json(state: list[str], *args: str, code: int = 0) -> Any:
    result = CliRunner().invoke(medcli, [*args, *state])
    assert result.exit_code == code, result.output
    return json.loads(result.stdout) if "--json" in args else result


@pytest.fixture
def state(tmp_path: Path) -> list[str]:
    """A state directory with a database (``medcli db upgrade``) and seed000 imported from a checkpoint:
    a 3-channel small CNN for busi at 40x40, resize-then-crop, per-image normalisation."""
    where = ["--state-dir", str(tmp_path / "state")]
    CliRunner().invoke(medcli, ["db", "upgrade", *where])
    torch.manual_seed(0)
    checkpoint = tmp_path / "seed000.pth"
    torch.save(
        {"state_dict": {f"module.{k}": v for k, v in build_model("small_cnn", 3, 3).state_dict().items()}}, checkpoint
    )
    medcli_json(where, "models", "import", str(checkpoint), "--task", "busi", "--arch", "small_cnn",
                *CONTRACT_FLAGS, "--version", "seed000", "--json")  # fmt: skip
    return where


def test_retraining_from_an_imported_version_starts_from_its_weights_on_its_contract(
    busi: Path, state: list[str], tmp_path: Path
) -> None:
    parent = medcli_json(state, "models", "show", "busi", "seed000", "--json")

    summary = medcli_json(
        state, "retrain", "busi", "--data", str(busi), "--from", "seed000", "--epochs", "0", "--batch-size", "16",
        "--version", "child", "--json",
    )  # fmt: skip

    assert summary["architecture"] == "small_cnn"  # the parent's, not busi's mobilenet_v2
    assert summary["input_contract"] == parent["manifest"]["input_contract"]
    contract = summary["input_contract"]
    assert (contract["channels"], contract["height"], contract["resize"], contract["normalisation"]) == (
        3, 40, "resize_then_crop", "per_image",
    )  # fmt: skip
    child = medcli_json(state, "models", "show", "busi", "child", "--json")
    recorded = child["manifest"]["provenance"]["parent"]
    assert (recorded["task"], recorded["version"], recorded["sha256"]) == ("busi", "seed000", parent["sha256"])
    assert recorded["provenance"]["source_file"] == "seed000.pth"  # the chain leads back to the imported file
    before, after = (
        load_file(Path(parent["path"]) / "model.safetensors"),
        load_file(Path(child["path"]) / "model.safetensors"),
    )
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)  # no step taken: the parent's weights exactly
    card = (tmp_path / "state" / "training" / "busi" / "versions" / "child" / "MODEL_CARD.md").read_text()
    assert "Trained from busi/seed000" in card and "imported from `seed000.pth`" in card


def export_tiny_graph(path: Path) -> Path:
    model = torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4, 3)
    ).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        torch.onnx.export(model, (torch.zeros(1, 1, 40, 40),), str(path), dynamo=False, input_names=["x"],
                          output_names=["y"], dynamic_axes={"x": {0: "n"}, "y": {0: "n"}})  # fmt: skip
    return path


def test_a_version_that_cannot_be_trained_from_is_refused_by_name_before_training(
    busi: Path, state: list[str], tmp_path: Path
) -> None:
    torch.manual_seed(1)
    covid = tmp_path / "covid.pt"
    torch.save(build_model("small_cnn", 1, 1).state_dict(), covid)
    medcli_json(state, "models", "import", str(covid), "--task", "covid", "--arch", "small_cnn", "--version", "cv1")
    graph = export_tiny_graph(tmp_path / "tiny.onnx")
    medcli_json(state, "models", "import", str(graph), "--task", "busi", "--image-size", "40", "--version", "graph")

    def refused(*args: str, code: int = 2) -> str:
        result = medcli_json(state, "retrain", "busi", "--data", str(busi), "--epochs", "1", *args, code=code)
        assert "epoch" not in result.stdout
        return result.stderr

    message = refused("--from", "nope")
    assert "error (unknown_version)" in message and "its versions: seed000, graph" in message
    message = refused("--from", "cv1")
    assert "error (other_task)" in message and "covid/cv1" in message
    assert "error (other_task)" in refused("--from", "covid/cv1")
    message = refused("--from", "seed000", "--arch", "resnet18")
    assert "error (wrong_architecture)" in message and "--arch resnet18" in message and "a small_cnn" in message
    message = refused("--from", "graph")
    assert "error (wrong_architecture)" in message and "ONNX graph" in message
    message = refused("--from", "seed000", "--image-size", "64")
    assert "error (contract_conflict)" in message and "40x40" in message
    small = tmp_path / "mobilenet.pt"  # trained at 32 pixels: a batch of one ends in a 1 x 1 map
    torch.save(build_model("mobilenet_v2", 1, 3).state_dict(), small)
    medcli_json(state, "models", "import", str(small), "--task", "busi", "--arch", "mobilenet_v2",
                "--image-size", "32", "--version", "m32")  # fmt: skip
    message = refused("--from", "m32", "--batch-size", "1")  # the preset's 224 was checked, then PyTorch's error
    assert "a batch size of 1 cannot train mobilenet_v2 at 32 x 32 pixels" in message

    weights = tmp_path / "state" / "models" / "busi" / "seed000" / "model.safetensors"
    damaged = bytearray(weights.read_bytes())
    damaged[-1] ^= 0x01
    weights.write_bytes(bytes(damaged))
    assert "refused (hash_mismatch)" in refused("--from", "seed000", code=1)
    assert not (tmp_path / "state" / "training").exists()  # nothing was trained
