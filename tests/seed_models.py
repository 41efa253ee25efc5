"""The seeds' trained models as their READMEs describe them, with SYNTHETIC weights (BatchNorm statistics
settled by a few train-mode passes over random inputs), saved as each seed saves them; the references an
imported model is compared with: pytorch-grad-cam on the original module, and Keras 3 on its torch
backend loading seed 003's ``.h5``.

Seed 000: a small CNN on 100x100 grey ultrasound ending in a sigmoid (benign 0, malignant 1).
Seed 001: an ImageNet backbone (ResNet18, VGG16, MobileNetV2) with a 1-channel first convolution and
a new 3-class final Linear. Seed 002: EfficientNetV2-S whose classifier became
``Sequential(Dropout(0.2), SELU(), Linear(1280, 1))``. Seed 003: Keras DenseNet-121 without its top,
global average pooling and ``Dense(14, sigmoid)``. Seed 004: MobileNetV2 on RGB chest X-rays with one
output, the logit of *healthy* (its labels are COVID 0, healthy 1).
"""

from __future__ import annotations

import argparse
import importlib
import os
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
import torch
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from torch import nn
from torchvision import models

#: the input size of the settling passes (the architectures are the real ones; small inputs are quick)
SIZE = 64
#: seed 003's findings (NIH ChestX-ray14)
FINDINGS = 14


def settle_batchnorm(model: nn.Module, channels: int, size: int = SIZE, seed: int = 0) -> nn.Module:
    """A few train-mode passes so BatchNorm running statistics are not the identity (SYNTHETIC "training")."""
    generator = torch.Generator().manual_seed(seed)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.rand(4, channels, size, size, generator=generator) * 2 - 0.5)
    return model.eval()


class Seed000Net(nn.Module):
    """Seed 000's small CNN for 100x100 grey ultrasound, ending in a sigmoid (trained with BCELoss)."""

    def __init__(self) -> None:
        super().__init__()
        blocks: list[nn.Module] = []
        channels = 1
        for i, out in enumerate((32, 64, 128, 256)):
            blocks += [nn.Conv2d(channels, out, 3, padding=1, bias=False), nn.BatchNorm2d(out), nn.ReLU(inplace=True)]
            if i < 3:
                blocks.append(nn.MaxPool2d(2))
            channels = out
        self.features = nn.Sequential(*blocks)
        self.classifier = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(256, 1), nn.Sigmoid())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def seed000() -> Seed000Net:
    torch.manual_seed(0)
    return settle_batchnorm(Seed000Net(), 1, size=100)  # type: ignore[return-value]


def seed001(architecture: str) -> tuple[nn.Module, nn.Module]:
    """(seed 001's model on ``architecture``, its Grad-CAM target layer)."""
    torch.manual_seed(1)
    if architecture == "resnet18":
        m = models.resnet18(weights=None)
        m.conv1 = nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3, bias=False)
        m.fc = nn.Linear(m.fc.in_features, 3)
        return settle_batchnorm(m, 1), m.layer4
    if architecture == "vgg16":
        m = models.vgg16(weights=None)
        m.features[0] = nn.Conv2d(1, 64, kernel_size=3, padding=1)
        m.classifier[6] = nn.Linear(4096, 3)
        return m.eval(), m.features
    m = models.mobilenet_v2(weights=None)
    m.features[0][0] = nn.Conv2d(1, 32, kernel_size=3, stride=2, padding=1, bias=False)
    m.classifier[1] = nn.Linear(m.last_channel, 3)
    return settle_batchnorm(m, 1), m.features


def seed002(settled: bool = True) -> nn.Module:
    """``settled=False``: the freshly initialised network (for tests that need its keys only)."""
    torch.manual_seed(2)
    m = models.efficientnet_v2_s(weights=None)
    m.classifier = nn.Sequential(nn.Dropout(p=0.2, inplace=False), nn.SELU(), nn.Linear(1280, 1))
    return settle_batchnorm(m, 3) if settled else m.eval()


def seed004() -> nn.Module:
    torch.manual_seed(4)
    m = models.mobilenet_v2(weights=None)
    m.classifier[1] = nn.Linear(m.last_channel, 1)
    return settle_batchnorm(m, 3)


def save_as(model: nn.Module, path: Path, how: str) -> Path:
    """``torch.save`` as the seeds do: ``plain`` (a bare state dict), ``module.`` (DataParallel's prefix),
    ``state_dict`` (a dict with the epoch and accuracy beside it), ``model_state_dict`` (a
    ``module.``-prefixed state dict beside the optimizer); and as today's tools do: ``safetensors``
    (the Hugging Face hub's), ``torchvision reference`` (``references/classification/train.py``'s
    checkpoint: ``model`` beside the optimizer's and scheduler's state, the epoch and the command
    line's ``argparse.Namespace``), ``torch.compile``
    (a compiled model's state dict, every key under ``_orig_mod.``), ``torch.compile of DataParallel``
    (PyTorch's order for a compiled data-parallel model: every key under ``_orig_mod.module.``)."""
    state = model.state_dict()
    if how == "safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, path)
        return path
    if how == "torchvision reference":
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=30)
        state = {"model": state, "optimizer": optimizer.state_dict(), "lr_scheduler": scheduler.state_dict()}
        state |= {"epoch": 89, "args": argparse.Namespace(model="resnet18", lr=0.5, weights=None, amp=True)}
    elif how == "torch.compile":
        state = torch.compile(model).state_dict()
    elif how == "torch.compile of DataParallel":
        state = torch.compile(nn.DataParallel(model)).state_dict()
    elif how == "module.":
        state = {f"module.{k}": v for k, v in state.items()}
    elif how == "state_dict":
        state = {"state_dict": state, "epoch": 30, "best_accuracy": 0.8974}
    elif how == "model_state_dict":
        state = {"model_state_dict": {f"module.{k}": v for k, v in state.items()}, "optimizer": "adam"}
    torch.save(state, path)
    return path


class Negated(nn.Module):
    """A one-logit model read as the logit of the other class (seed 004's logit is *healthy*'s, the
    covid task's positive class is covid): pytorch-grad-cam's target for meddaemon's map."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.seed = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return -self.seed(x)


class Seed000Logit(nn.Module):
    """Seed 000's network up to its logit: meddaemon maps the logit (the sigmoid is monotone)."""

    def __init__(self, model: Seed000Net) -> None:
        super().__init__()
        self.seed = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.seed.classifier[:3](self.seed.features(x))


def gradcam(model: nn.Module, layer: nn.Module, x: torch.Tensor, classes: list[int]) -> np.ndarray:
    with GradCAM(model=model, target_layers=[layer]) as cam:
        return cam(input_tensor=x, targets=[ClassifierOutputTarget(c) for c in classes])


# -- seed 003: Keras ---------------------------------------------------------------------------------


def keras_module() -> Any:
    """Keras 3 on its torch backend (the oracle for seed 003's file); skips when it runs on another."""
    os.environ.setdefault("KERAS_BACKEND", "torch")
    keras = importlib.import_module("keras")
    if keras.backend.backend() != "torch":
        pytest.skip(f"keras runs on {keras.backend.backend()} here; the oracle needs its torch backend")
    return keras


def course_model(keras: Any, size: int) -> Any:
    """The course's model: DenseNet121(include_top=False) -> GlobalAveragePooling2D -> Dense(14, sigmoid)."""
    base = keras.applications.DenseNet121(weights=None, include_top=False, input_shape=(size, size, 3))
    pooled = keras.layers.GlobalAveragePooling2D()(base.output)
    return keras.Model(base.input, keras.layers.Dense(FINDINGS, activation="sigmoid")(pooled))


def write_seed003_h5(path: Path) -> Path:
    """Seed 003's ``pretrained_model.h5`` with SYNTHETIC "trained" BatchNorm statistics and head, in
    Keras's HDF5 weights layout. The weights do not depend on the input size, so the model is built small."""
    keras = keras_module()
    from keras.src.legacy.saving import legacy_h5_format

    keras.utils.set_random_seed(3)
    model = course_model(keras, SIZE)
    rng = np.random.default_rng(3)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            n = layer.gamma.shape[0]
            layer.set_weights(
                [rng.uniform(0.5, 1.5, n), rng.normal(0, 0.1, n), rng.normal(0, 0.1, n), rng.uniform(0.5, 1.5, n)]
            )
        elif isinstance(layer, keras.layers.Dense):
            layer.set_weights([rng.normal(0, 0.05, (1024, FINDINGS)), rng.normal(0, 0.1, FINDINGS)])
    with h5py.File(path, "w") as f:
        legacy_h5_format.save_weights_to_hdf5_group(f, model)
    return path


def keras_probabilities(path: Path, x: np.ndarray) -> np.ndarray:
    """What Keras gives for model inputs ``x`` (N, 3, H, W) after loading ``path`` into a fresh course model."""
    keras = keras_module()
    model = course_model(keras, x.shape[-1])
    model.load_weights(str(path))
    return np.asarray(model.predict(np.ascontiguousarray(x.transpose(0, 2, 3, 1)), verbose=0))
