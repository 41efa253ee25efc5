"""The networks: every architecture for 1 or 3 channels and any number of outputs, split into
features and head, and ImageNet initialisation only from files already on this machine."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torchvision import models

from meddaemon.engine.architectures import ARCHITECTURES, MissingPretrainedWeights, build_model


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_every_architecture_takes_grey_images_and_gives_one_logit_per_output(architecture: str):
    model = build_model(architecture, in_channels=1, num_outputs=3).eval()
    x = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        activation, logits = model.forward_features(x)
        torch.testing.assert_close(model(x), logits)
    assert logits.shape == (2, 3) and activation.ndim == 4
    assert (model.cam_linear is None) == (architecture in ("vgg16", "efficientnet_v2_s_selu"))


def test_densenet_features_end_with_a_relu_that_is_not_in_place():
    last = build_model("densenet121", 1, 2).features[-1]
    assert isinstance(last, torch.nn.ReLU) and not last.inplace


def test_imagenet_weights_missing_from_this_machine_is_a_clear_error(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    with pytest.raises(MissingPretrainedWeights, match="nothing is downloaded") as info:
        build_model("resnet18", 1, 3, init="imagenet")
    assert "resnet18-" in str(info.value) and str(tmp_path) in str(info.value)


@pytest.mark.parametrize("fmt", ["safetensors", "pth"])
def test_imagenet_weights_from_a_local_file_are_loaded_and_summed_for_grey(tmp_path: Path, fmt: str):
    torch.manual_seed(0)
    reference = models.resnet18(weights=None)  # stands in for the ImageNet file (SYNTHETIC weights)
    path = tmp_path / f"resnet18.{fmt}"
    if fmt == "safetensors":
        save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, str(path))
    else:
        torch.save(reference.state_dict(), path)

    model = build_model("resnet18", 1, 3, init="imagenet", imagenet_weights=path)

    first = model.features[0]
    assert first.in_channels == 1
    torch.testing.assert_close(first.weight, reference.conv1.weight.sum(dim=1, keepdim=True))
    torch.testing.assert_close(model.features[4][0].conv1.weight, reference.layer1[0].conv1.weight)


def test_imagenet_weights_are_read_from_torchs_cache(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    cache = tmp_path / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    reference = models.mobilenet_v2(weights=None)
    torch.save(reference.state_dict(), cache / "mobilenet_v2-b0353104.pth")
    model = build_model("mobilenet_v2", 3, 2, init="imagenet")
    torch.testing.assert_close(model.features[0][0].weight, reference.features[0][0].weight)


def test_unknown_architecture_names_the_choices():
    with pytest.raises(ValueError, match="resnet18"):
        build_model("resnet1000", 1, 2)
