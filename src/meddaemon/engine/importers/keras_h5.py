"""Keras ``.h5`` weights of a DenseNet-121 (seed 003: Keras 2.1.6 / TF 1.15, DenseNet-121 + Dense(14,
sigmoid)), read with h5py alone: no TensorFlow, no Keras, nothing deserialised but arrays.

Both layouts Keras writes are read: ``model.save_weights`` (layers at the root) and ``model.save``
(under ``model_weights``); Keras 2's layer names (``conv1/conv``, weights ``kernel:0``) and Keras 3's
(``conv1_conv``, ``kernel``). The mapping onto torchvision's DenseNet-121 (meddaemon's
``densenet121``):

- convolution kernels HWIO -> OIHW;
- BatchNorm gamma, beta, moving mean, moving variance -> weight, bias, running mean, running var;
  Keras's DenseNet uses epsilon 1.001e-5 where torch uses 1e-5, so the difference is added to the
  running variance (``sqrt(var + 1.001e-5) == sqrt((var + 1e-8) + 1e-5)``);
- the Dense kernel (in, out) transposed to the Linear's (out, in); its sigmoid is meddaemon's own.

Keras's zero padding before the max pool equals torch's -inf padding there, as the pool follows a ReLU.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from meddaemon.engine.importers.base import ConvertedWeights
from meddaemon.engine.registry import ModelRefused

KERAS_BN_EPSILON = 1.001e-5
TORCH_BN_EPSILON = 1e-5
DENSENET121_BLOCKS = (6, 12, 24, 16)
FEATURES = "features.0"


def read_layers(path: Path) -> dict[str, dict[str, np.ndarray]]:
    """{layer name with '/' as '_': {weight role (kernel, gamma, ...): array}} for layers with weights."""
    try:
        import h5py
    except ImportError as exc:  # a dependency of meddaemon; only a broken install lacks it
        raise ModelRefused("unsupported_format", "h5py is not installed; it reads Keras .h5 files") from exc
    try:
        with h5py.File(path, "r") as f:
            group = f.get("model_weights", f)
            names = [_text(n) for n in group.attrs.get("layer_names", list(group.keys()))]
            layers: dict[str, dict[str, np.ndarray]] = {}
            for name in names:
                layer = group[name]
                weights = {}
                for weight_name in (_text(w) for w in layer.attrs.get("weight_names", [])):
                    role = weight_name.rsplit("/", 1)[-1].split(":", 1)[0]
                    weights[role] = np.asarray(layer[weight_name], dtype=np.float32)
                if weights:
                    layers[name.replace("/", "_")] = weights
    except (OSError, KeyError, ValueError, TypeError) as exc:
        raise ModelRefused(
            "unreadable_weights", f"{path.name} is truncated, damaged or not Keras .h5 weights ({exc})"
        ) from None
    if not layers:
        raise ModelRefused("unreadable_weights", f"{path.name} holds no Keras layer weights")
    return layers


def _text(value: object) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def convert(path: Path, architecture: str) -> ConvertedWeights:
    if architecture != "densenet121":
        raise ModelRefused(
            "wrong_architecture",
            f"Keras .h5 weights are imported for DenseNet-121 (--arch densenet121), not {architecture}",
        )
    try:
        return densenet121(read_layers(path))
    except KeyError as exc:
        raise ModelRefused("wrong_architecture", f"a DenseNet-121 layer lacks its weight {exc}") from None


def densenet121(layers: dict[str, dict[str, np.ndarray]]) -> ConvertedWeights:
    """Keras DenseNet-121 + one Dense layer onto meddaemon's densenet121 keys; leftovers refused by name."""
    remaining = dict(layers)
    converted = ConvertedWeights(
        "densenet121",
        {},
        conversion=[
            "Keras DenseNet-121 mapped onto torchvision's: kernels HWIO->OIHW, Dense kernel transposed, "
            f"BatchNorm epsilon {KERAS_BN_EPSILON:g} folded into the running variance"
        ],
    )
    missing: list[str] = []

    def take(name: str) -> dict[str, np.ndarray] | None:
        found = remaining.pop(name, None)
        if found is None:
            missing.append(name)
        return found

    def conv(name: str, target: str) -> None:
        weights = take(name)
        if weights is not None:
            _put(converted, f"{target}.weight", weights["kernel"].transpose(3, 2, 0, 1), f"{name}/kernel")

    def batchnorm(name: str, target: str) -> None:
        weights = take(name)
        if weights is None:
            return
        variance = weights["moving_variance"] + (KERAS_BN_EPSILON - TORCH_BN_EPSILON)
        for role, key, value in (
            ("gamma", "weight", weights["gamma"]),
            ("beta", "bias", weights["beta"]),
            ("moving_mean", "running_mean", weights["moving_mean"]),
            ("moving_variance", "running_var", variance),
        ):
            _put(converted, f"{target}.{key}", value, f"{name}/{role}")

    conv("conv1_conv", f"{FEATURES}.conv0")
    batchnorm("conv1_bn", f"{FEATURES}.norm0")
    for block, count in enumerate(DENSENET121_BLOCKS, start=1):
        for index in range(1, count + 1):
            keras, torch_ = f"conv{block + 1}_block{index}", f"{FEATURES}.denseblock{block}.denselayer{index}"
            batchnorm(f"{keras}_0_bn", f"{torch_}.norm1")
            conv(f"{keras}_1_conv", f"{torch_}.conv1")
            batchnorm(f"{keras}_1_bn", f"{torch_}.norm2")
            conv(f"{keras}_2_conv", f"{torch_}.conv2")
        if block < len(DENSENET121_BLOCKS):
            batchnorm(f"pool{block + 1}_bn", f"{FEATURES}.transition{block}.norm")
            conv(f"pool{block + 1}_conv", f"{FEATURES}.transition{block}.conv")
    batchnorm("bn", f"{FEATURES}.norm5")
    dense = [name for name, w in remaining.items() if w.get("kernel") is not None and w["kernel"].ndim == 2]
    if len(dense) == 1:
        weights = remaining.pop(dense[0])
        _put(converted, "head.linear.weight", weights["kernel"].T, f"{dense[0]}/kernel")
        if "bias" in weights:
            _put(converted, "head.linear.bias", weights["bias"], f"{dense[0]}/bias")
    problems = []
    if missing:
        problems.append(f"{len(missing)} DenseNet-121 layer(s) missing: {', '.join(missing[:6])}")
    if len(dense) != 1:
        problems.append(f"{len(dense)} Dense layers where one classifier is needed: {dense}")
    if remaining:
        problems.append(f"{len(remaining)} unmatched layer(s): {', '.join(sorted(remaining)[:6])}")
    if problems:
        raise ModelRefused("wrong_architecture", "the file is not a Keras DenseNet-121 + Dense: " + "; ".join(problems))
    return converted


def _put(converted: ConvertedWeights, key: str, value: np.ndarray, source: str) -> None:
    converted.state[key] = torch.from_numpy(np.ascontiguousarray(value, dtype=np.float32))
    converted.source_keys[key] = source
