"""Keras ``.h5`` weights of a DenseNet-121 (seed 003: Keras 2.1.6 / TF 1.15, DenseNet-121 + Dense(14,
sigmoid)), read with h5py alone: no TensorFlow, no Keras, nothing deserialised but arrays.

Every layout Keras writes is read: its HDF5 layout, from ``model.save_weights`` (layers at the
root) and ``model.save`` (under ``model_weights``), with Keras 2's layer names (``conv1/conv``,
weights ``kernel:0``) or Keras 3's (``conv1_conv``, ``kernel``); and Keras 3's own, which its
``save_weights`` writes to ``.weights.h5`` and its ``save`` puts in a ``.keras`` archive
(``model.weights.h5`` in a zip), read from the archive without unpacking it. That layout names a
layer by its class and its rank among the model's layers of that class (``batch_normalization_17``),
never by its own name; DenseNet-121's layers get theirs from their rank, in the order Keras builds
them (``conv1_bn`` is the first BatchNormalization). The mapping onto torchvision's DenseNet-121
(meddaemon's ``densenet121``):

- convolution kernels HWIO -> OIHW;
- BatchNorm gamma, beta, moving mean, moving variance -> weight, bias, running mean, running var;
  Keras's DenseNet uses epsilon 1.001e-5 where torch uses 1e-5, so the difference is added to the
  running variance (``sqrt(var + 1.001e-5) == sqrt((var + 1e-8) + 1e-5)``);
- the Dense kernel (in, out) transposed to the Linear's (out, in); its sigmoid is meddaemon's own.

Keras's zero padding before the max pool equals torch's -inf padding there, as the pool follows a ReLU.
"""

from __future__ import annotations

import io
import re
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from meddaemon.engine.importers.base import KERAS_ARCHIVE_WEIGHTS, ConvertedWeights
from meddaemon.engine.registry import ModelRefused

if TYPE_CHECKING:
    from meddaemon.engine.tasks import InputContract

#: the most weight values a file may declare: DenseNet-121 and its Dense head hold about 7 million;
#: an HDF5 file of a few kilobytes can declare gigabytes (chunks never written read as zeros)
MAX_VALUES = 1 << 26
KERAS_BN_EPSILON = 1.001e-5
TORCH_BN_EPSILON = 1e-5
DENSENET121_BLOCKS = (6, 12, 24, 16)
FEATURES = "features.0"


#: the weights of a layer in Keras 3's own layout, in the order its ``vars/0``, ``vars/1``... hold them
KERAS3_ROLES = {
    "batch_normalization": ("gamma", "beta", "moving_mean", "moving_variance"),
    "conv2d": ("kernel", "bias"),
    "dense": ("kernel", "bias"),
}


@dataclass
class KerasLayers:
    """{layer name with '/' as '_': {weight role (kernel, gamma, ...): array}} for layers with weights.
    ``by_rank``: the names are Keras 3's class-and-rank names (``conv2d_5``), not the layers' own."""

    layers: dict[str, dict[str, np.ndarray]]
    by_rank: bool = False


def read_layers(path: Path) -> KerasLayers:
    try:
        import h5py
    except ImportError as exc:  # a dependency of meddaemon; only a broken install lacks it
        raise ModelRefused("unsupported_format", "h5py is not installed; it reads Keras .h5 files") from exc
    try:
        budget = _ValueBudget()
        with h5py.File(_weights_file(path), "r") as f:
            found = _rank_layout(f, budget) if _is_rank_layout(f) else KerasLayers(_name_layout(f, budget))
    except (OSError, KeyError, ValueError, TypeError, zipfile.BadZipFile) as exc:
        raise ModelRefused(
            "unreadable_weights", f"{path.name} is truncated, damaged or not Keras weights ({exc})"
        ) from None
    if not found.layers:
        raise ModelRefused("unreadable_weights", f"{path.name} holds no Keras layer weights")
    return found


def _weights_file(path: Path) -> Path | io.BytesIO:
    """The HDF5 file: ``path``, or the weights inside a ``.keras`` archive, read into memory."""
    if not zipfile.is_zipfile(path):
        return path
    with zipfile.ZipFile(path) as archive:
        if KERAS_ARCHIVE_WEIGHTS not in archive.namelist():
            raise ModelRefused(
                "unreadable_weights", f"{path.name} is a zip archive without {KERAS_ARCHIVE_WEIGHTS}: not a .keras file"
            )
        size = archive.getinfo(KERAS_ARCHIVE_WEIGHTS).file_size  # what it unpacks to, at most
        if size > MAX_VALUES * 4 + (16 << 20):
            raise ModelRefused(
                "unreadable_weights",
                f"{path.name}'s {KERAS_ARCHIVE_WEIGHTS} unpacks to {size:,} bytes: too many values",
            )
        return io.BytesIO(archive.read(KERAS_ARCHIVE_WEIGHTS))


def _name_layout(f: Any, budget: _ValueBudget) -> dict[str, dict[str, np.ndarray]]:
    """{layer: {role: array}} of the HDF5 layout. A layer's weights are named ``<owner>/<role>``:
    its own name as owner, or (TensorFlow 1's) a scope near it, keyed by the layer's name; a nested
    model (``Sequential([DenseNet121(...), Dense(...)])``, saved by ``model.save``) is one layer
    holding its inner layers' weights, each keyed by its inner layer's name."""
    group = f.get("model_weights", f)
    names = [_text(n) for n in group.attrs.get("layer_names", list(group.keys()))]
    layers: dict[str, dict[str, np.ndarray]] = {}
    for name in names:
        layer = group[name]
        owned: dict[str, dict[str, np.ndarray]] = {}
        for weight_name in (_text(w) for w in layer.attrs.get("weight_names", [])):
            owner, _, role = weight_name.rpartition("/")
            weights = owned.setdefault(owner.removeprefix(f"{name}/"), {})
            role = role.split(":", 1)[0]
            if role in weights:
                raise ModelRefused("wrong_architecture", f"layer {name!r} holds two weights named {weight_name!r}")
            weights[role] = _array(layer[weight_name], f, budget)
        if len(owned) == 1:  # the layer's own weights, whatever scope named them
            owned = {name: next(iter(owned.values()))}
        for owner, weights in owned.items():
            key = owner.replace("/", "_")
            if key in layers:  # the later one took the earlier one's place without a word
                raise ModelRefused("wrong_architecture", f"two layers with weights are named {key!r} (with '/' as '_')")
            layers[key] = weights
    return layers


def _is_rank_layout(f: Any) -> bool:
    return "layer_names" not in f.attrs and "model_weights" not in f and "layers" in f


def _rank_layout(f: Any, budget: _ValueBudget) -> KerasLayers:
    """Keras 3's own layout: ``layers/<class>_<rank>/vars/<i>``, a nested model's under its own
    ``layers/`` (ranks counted in each model apart). The layers of each class are renumbered over the
    whole file, models in the order they are met."""
    ranked: dict[str, list[list[np.ndarray]]] = {}
    models = [f]
    seen = {f.id}
    while models:
        model = models.pop(0)
        for name in sorted(model["layers"], key=_class_and_rank):
            layer = model["layers"][name]
            if "layers" in layer:
                if layer.id in seen:  # a hard link back up the tree: a crafted file looped for ever
                    raise ModelRefused("unreadable_weights", f"the group {layer.name} links back to a group above it")
                seen.add(layer.id)
                models.append(layer)
            elif len(layer.get("vars", ())):
                arrays = [_array(layer["vars"][str(i)], f, budget) for i in range(len(layer["vars"]))]
                ranked.setdefault(_class_and_rank(name)[0], []).append(arrays)
    layers = {}
    for kind, each in ranked.items():
        for rank, arrays in enumerate(each):
            layers[f"{kind}_{rank}" if rank else kind] = dict(zip(_roles(kind, len(arrays)), arrays, strict=True))
    return KerasLayers(layers, by_rank=True)


@dataclass
class _ValueBudget:
    """The values a file's weights may still declare (``MAX_VALUES`` in all), counted before each is read."""

    left: int = MAX_VALUES

    def take(self, item: Any) -> None:
        self.left -= int(item.size)
        if self.left < 0:
            raise ModelRefused(
                "unreadable_weights",
                f"the weights declare more than {MAX_VALUES:,} values (at {item.name}), many times DenseNet-121's",
            )


def _array(item: Any, f: Any, budget: _ValueBudget) -> np.ndarray:
    """A weight's values, from the file itself. HDF5 lets a dataset keep its bytes in another file
    (external storage, a virtual dataset, an external link), which h5py reads without a word: bytes
    of any file on the machine imported as weights, under the SHA-256 of a file that never held them."""
    import h5py

    if not isinstance(item, h5py.Dataset):
        raise ModelRefused("unreadable_weights", f"the weight {item.name} is not an array")
    if item.external or item.is_virtual or item.file != f:
        raise ModelRefused("unreadable_weights", f"the weight {item.name} keeps its values in another file")
    budget.take(item)
    return np.asarray(item, dtype=np.float32)


def _roles(kind: str, count: int) -> tuple[str, ...]:
    """The roles of a layer's ``count`` weights: a convolution or Dense without its bias has only its
    kernel; a layer of another class, or with other weights, gets its weights' numbers."""
    roles = KERAS3_ROLES.get(kind, ())
    if count == len(roles) or (count == 1 and roles[:1] == ("kernel",)):
        return roles[:count]
    return tuple(str(i) for i in range(count))


def _class_and_rank(name: str) -> tuple[str, int]:
    """``batch_normalization_17`` -> (``batch_normalization``, 17); ``dense`` -> (``dense``, 0)."""
    match = re.fullmatch(r"(.*?)_(\d+)", name)
    return (match.group(1), int(match.group(2))) if match else (name, 0)


def _text(value: object) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


#: the layer classes of Keras's DenseNet-121 with a pooling and a Dense head (and the models that
#: hold them): a model with any other computation is not the network its weights are served in
DENSENET121_CLASSES = frozenset(
    {
        "InputLayer", "ZeroPadding2D", "Conv2D", "BatchNormalization", "Activation", "MaxPooling2D",
        "AveragePooling2D", "Concatenate", "GlobalAveragePooling2D", "Dropout", "Dense",
        "Functional", "Model", "Sequential",
    }
)  # fmt: skip
#: layers whose computation is Python code kept in the file: never run, so never imported
CODE_LAYERS = frozenset({"Lambda", "TFOpLambda", "SlicingOpLambda"})
#: the activations a Dense head may end with for each kind of task: its own, or none (logits)
HEAD_ACTIVATIONS = {
    "multiclass": {"softmax", "linear"},
    "multilabel": {"sigmoid", "linear"},
    "binary": {"sigmoid", "linear", "softmax"},  # softmax: of two outputs, folded into one logit
}
MODELS = {"Functional", "Model", "Sequential"}


def model_config(path: Path) -> dict[str, Any] | None:
    """The model's architecture as Keras saved it beside its weights (``model.save``: the HDF5 file's
    ``model_config`` attribute, a ``.keras`` archive's ``config.json``), parsed as JSON and nothing
    more; None for weights saved alone (``save_weights``)."""
    import json

    import h5py

    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                if "config.json" not in archive.namelist():
                    return None
                if archive.getinfo("config.json").file_size > (64 << 20):
                    raise ModelRefused("unreadable_weights", f"{path.name}'s config.json is over 64 MiB")
                text = archive.read("config.json")
        else:
            with h5py.File(path, "r") as f:
                text = f.attrs.get("model_config")
        if text is None:
            return None
        config = json.loads(text)
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as exc:
        raise ModelRefused("unreadable_weights", f"{path.name}'s model configuration cannot be read ({exc})") from None
    return config if isinstance(config, dict) else None


def check_config(config: dict[str, Any], kind: str) -> str:
    """Refuse a model whose configuration holds what meddaemon's DenseNet-121 + Dense would not
    compute: a Lambda or another layer of code (``needs_code``: it is never run), a layer of another
    class, a convolution or activation other than DenseNet-121's, or a head whose activation is not
    the task's (``wrong_architecture``). Only its weights are read otherwise: such a model was
    imported and served as a plain DenseNet-121, its outputs not the ones it was trained to give.

    Returns the activation the head ends with: the Dense layer's, or that of an ``Activation`` layer
    the model outputs after a linear Dense (as Keras's mixed-precision guide writes a head)."""
    head_activations = _output_activations(config)
    denses = []
    for layer in _config_layers(config):
        kind_of, name = str(layer.get("class_name")), str((layer.get("config") or {}).get("name", "?"))
        settings = layer.get("config") if isinstance(layer.get("config"), dict) else {}
        activation = settings.get("activation")
        if kind_of in CODE_LAYERS:
            raise ModelRefused(
                "needs_code", f"layer {name!r} is a {kind_of}: its computation is code in the file, which is never run"
            )
        if activation is not None and not isinstance(activation, str):
            # a function saved with the model (its bytecode): "unhashable type: 'dict'" called the weights
            # unreadable, or the refusal printed the bytecode
            raise ModelRefused("needs_code", f"layer {name!r}'s activation is code in the file, which is never run")
        if kind_of not in DENSENET121_CLASSES:
            raise ModelRefused(
                "wrong_architecture", f"layer {name!r} is a {kind_of}, not part of Keras's DenseNet-121 + Dense"
            )
        if (kind_of == "Activation" and activation != "relu" and (name, activation) not in head_activations) or (
            kind_of == "Conv2D" and activation not in (None, "linear")
        ):
            raise ModelRefused(
                "wrong_architecture", f"layer {name!r} ({kind_of}) applies {activation!r}, which DenseNet-121 does not"
            )
        if kind_of == "Dense":
            denses.append((name, str(activation or "linear"), settings.get("units")))
    units = denses[-1][2] if denses else None
    for name, activation in [(name, activation) for name, activation, _ in denses] + head_activations:
        if activation not in HEAD_ACTIVATIONS.get(kind, {"linear"}):
            raise ModelRefused(
                "wrong_architecture",
                f"the head {name!r} ends with {activation!r}; a {kind} task's ends with "
                f"{' or '.join(sorted(HEAD_ACTIVATIONS.get(kind, {'linear'})))}",
            )
        if kind == "binary" and activation == "softmax" and units != 2:
            raise ModelRefused(
                "wrong_architecture", f"the head {name!r} is a softmax of {units} outputs; a binary task's has 2"
            )
    if head_activations:
        stacked = [(name, activation) for name, activation, _ in denses if activation != "linear"]
        if len(head_activations) > 1 or stacked:
            twice = [*stacked, *head_activations]
            raise ModelRefused(
                "wrong_architecture",
                f"the head applies {' then '.join(repr(a) for _, a in twice)} (layers "
                f"{', '.join(repr(n) for n, _ in twice)}); a Dense head ends with one activation",
            )
        return head_activations[0][1]
    return denses[-1][1] if denses else "linear"


def _output_activations(config: dict[str, Any]) -> list[tuple[str, str]]:
    """(name, activation) of each ``Activation`` layer other than a ReLU that the model outputs."""
    outputs = _output_names(config)
    found = []
    for layer in _config_layers(config):
        settings = layer.get("config")
        if layer.get("class_name") != "Activation" or not isinstance(settings, dict):
            continue
        if settings.get("activation") != "relu" and settings.get("name") in outputs:
            found.append((str(settings.get("name")), str(settings.get("activation"))))
    return found


def _output_names(config: dict[str, Any]) -> set[str]:
    """The names of the layers a saved model outputs: a functional model's ``output_layers``
    (``["name", 0, 0]``, or a list of them), a Sequential's last layer."""
    settings = config.get("config")
    if isinstance(settings, dict) and "output_layers" in settings:
        found: list[Any] = settings["output_layers"] or []
        entries = [found] if found and isinstance(found[0], str) else found
        return {str(entry[0]) for entry in entries if isinstance(entry, list) and entry}
    layers = settings.get("layers") if isinstance(settings, dict) else settings  # Keras 2's Sequential: a list
    if isinstance(layers, list) and layers and isinstance(layers[-1], dict):
        last = layers[-1].get("config")
        return {str(last.get("name"))} if isinstance(last, dict) else set()
    return set()


def check_input_size(config: dict[str, Any], contract: InputContract, task: str) -> None:
    """Refuse a model saved for a fixed input size other than the contract's (``contract_conflict``,
    naming both), as an ONNX graph's is: Keras keeps it as an input's ``batch_shape`` (Keras 3) or
    ``batch_input_shape`` (Keras 2), channels last unless its layers say ``channels_first``. A
    DenseNet's weights fit any size, so the file imported and was served at the task's size, not the
    one it was trained at."""
    layers = [layer["config"] for layer in _config_layers(config) if isinstance(layer.get("config"), dict)]
    channels_first = any(settings.get("data_format") == "channels_first" for settings in layers)
    for settings in layers:
        for key in ("batch_shape", "batch_input_shape"):
            shape = settings.get(key)
            if not (isinstance(shape, list) and len(shape) == 4):
                continue
            height, width = shape[2:4] if channels_first else shape[1:3]
            fixed = [(d, want) for d, want in ((height, contract.height), (width, contract.width)) if _fixed(d)]
            if all(d == want for d, want in fixed):
                continue
            if _fixed(height) and _fixed(width) and height != width:
                advice = "a contract here is square (--image-size N): resize the model's input to a square first"
            else:
                advice = f"pass --image-size {fixed[0][0]} if the model was trained so"
            raise ModelRefused(
                "contract_conflict",
                f"layer {settings.get('name', '?')!r} takes images of {height}x{width} (height x width) but the "
                f"input contract (task {task!r}) has {contract.height}x{contract.width}; {advice}",
            )


def _fixed(dimension: Any) -> bool:
    """A size the saved model fixed (None, or -1, is any)."""
    return isinstance(dimension, int) and dimension > 0


def _config_layers(config: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every layer of a model's configuration, those of the models nested in it too."""
    pending: list[Any] = [config]
    while pending:
        layer = pending.pop()
        if not isinstance(layer, dict):
            continue
        if layer is not config:
            yield layer
        if layer is config or layer.get("class_name") in MODELS:
            inner = layer.get("config")
            layers = inner.get("layers", []) if isinstance(inner, dict) else inner  # Keras 2's Sequential: a list
            pending.extend(layers if isinstance(layers, list) else [])


def convert(path: Path, architecture: str, kind: str, contract: InputContract, task: str) -> ConvertedWeights:
    import h5py

    if not (h5py.is_hdf5(path) or zipfile.is_zipfile(path)):  # only named .h5: not "the wrong architecture"
        raise ModelRefused(
            "unreadable_weights", f"{path.name} is neither an HDF5 file nor a .keras archive: damaged or another format"
        )
    if architecture != "densenet121":
        raise ModelRefused(
            "wrong_architecture",
            f"Keras .h5 weights are imported for DenseNet-121 (--arch densenet121), not {architecture}",
        )
    config = model_config(path)
    head_activation = None
    if config is not None:
        head_activation = check_config(config, kind)
        check_input_size(config, contract, task)
    found = read_layers(path)
    layers = densenet121_by_rank(found.layers) if found.by_rank else found.layers
    try:
        converted = densenet121(layers)
    except KeyError as exc:
        raise ModelRefused("wrong_architecture", f"a DenseNet-121 layer lacks its weight {exc}") from None
    converted.head_activation = head_activation
    if config is None:
        converted.conversion.append(
            "weights alone (no model configuration in the file): the network is taken to be DenseNet-121 + "
            f"Dense, its head's activation the {kind} task's"
        )
    return converted


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

    for kind, name, target in densenet121_layers():
        (conv if kind == "conv2d" else batchnorm)(name, target)
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


def densenet121_layers() -> Iterator[tuple[str, str, str]]:
    """Keras DenseNet-121's layers with weights, in the order Keras builds them: (class as Keras 3
    names it, the layer's name, the key of meddaemon's densenet121 it goes to)."""
    yield "conv2d", "conv1_conv", f"{FEATURES}.conv0"
    yield "batch_normalization", "conv1_bn", f"{FEATURES}.norm0"
    for block, count in enumerate(DENSENET121_BLOCKS, start=1):
        for index in range(1, count + 1):
            keras, torch_ = f"conv{block + 1}_block{index}", f"{FEATURES}.denseblock{block}.denselayer{index}"
            yield "batch_normalization", f"{keras}_0_bn", f"{torch_}.norm1"
            yield "conv2d", f"{keras}_1_conv", f"{torch_}.conv1"
            yield "batch_normalization", f"{keras}_1_bn", f"{torch_}.norm2"
            yield "conv2d", f"{keras}_2_conv", f"{torch_}.conv2"
        if block < len(DENSENET121_BLOCKS):
            yield "batch_normalization", f"pool{block + 1}_bn", f"{FEATURES}.transition{block}.norm"
            yield "conv2d", f"pool{block + 1}_conv", f"{FEATURES}.transition{block}.conv"
    yield "batch_normalization", "bn", f"{FEATURES}.norm5"


def densenet121_by_rank(layers: dict[str, dict[str, np.ndarray]]) -> dict[str, dict[str, np.ndarray]]:
    """Keras 3's class-and-rank names (``batch_normalization_1``) given DenseNet-121's own
    (``conv2_block1_0_bn``) by rank; layers past DenseNet-121's keep theirs (and are refused as unmatched)."""
    named = dict(layers)
    ranks: dict[str, int] = {}
    for kind, name, _ in densenet121_layers():
        rank = ranks.get(kind, 0)
        ranks[kind] = rank + 1
        found = named.pop(f"{kind}_{rank}" if rank else kind, None)
        if found is not None:
            named[name] = found
    return named


def _put(converted: ConvertedWeights, key: str, value: np.ndarray, source: str) -> None:
    converted.state[key] = torch.from_numpy(np.ascontiguousarray(value, dtype=np.float32))
    converted.source_keys[key] = source
