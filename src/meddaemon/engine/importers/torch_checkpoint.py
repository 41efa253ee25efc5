"""PyTorch checkpoints (``torch.save``): read with ``torch.load(weights_only=True)`` only; and state
dicts saved as safetensors (the Hugging Face hub's, timm's), read with safetensors, which holds
tensors alone.

``weights_only`` unpickles tensors and plain containers and nothing else: a whole pickled
``nn.Module`` (or any ``__reduce__`` payload) is refused by torch's restricted unpickler before a
single object is built, so no code from the file ever runs (``needs_code``). A state dict is taken
bare, from ``{"state_dict": ...}``, ``{"model_state_dict": ...}`` or ``{"model": ...}`` (torchvision's
``references/classification/train.py``), with DataParallel's ``module.``, Lightning's ``model.`` and
``torch.compile``'s ``_orig_mod.`` prefixes stripped, and mapped from torchvision's key layout onto
meddaemon's (``features`` + ``head``, :mod:`meddaemon.engine.architectures`).
"""

from __future__ import annotations

import argparse
import pickle
import re
import warnings
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from meddaemon.engine.architectures import build_model
from meddaemon.engine.importers.base import ConvertedWeights
from meddaemon.engine.registry import ModelRefused

WRAPPER_KEYS = ("state_dict", "model_state_dict", "model")
WRAPPER_PREFIXES = ("module.", "model.", "_orig_mod.")
#: the attributes a training module (PyTorch Lightning's) keeps its loss under: a class-weighted
#: loss's ``weight`` buffer sits in its state dict beside the network's ``model.`` keys
LOSS_PREFIXES = ("criterion.", "loss_fn.", "loss_func.", "loss.", "loss_function.")

_RESNET = (
    ("conv1.", "features.0."),
    ("bn1.", "features.1."),
    ("layer1.", "features.4."),
    ("layer2.", "features.5."),
    ("layer3.", "features.6."),
    ("layer4.", "features.7."),
)
#: torchvision's backbone key prefixes -> meddaemon's, per architecture
BACKBONE_PREFIXES: dict[str, tuple[tuple[str, str], ...]] = {
    "resnet18": _RESNET,
    "resnet34": _RESNET,
    "vgg16": (("features.", "features."), ("classifier.", "head.2.")),
    "mobilenet_v2": (("features.", "features."),),
    "densenet121": (("features.", "features.0."),),
    "efficientnet_v2_s": (("features.", "features."),),
    "efficientnet_v2_s_selu": (("features.", "features."),),
    "small_cnn": (("features.", "features."),),
}
#: where a network's final classifier usually lives (torchvision: ``fc`` or ``classifier``)
HEAD_PREFIXES = ("fc.", "classifier.", "head.", "linear.", "out.", "output.")
SINGLE_LINEAR_HEAD = "head.linear"
#: where torchvision's (and the seeds') final Linear sits, per architecture: a Linear elsewhere means
#: a head with other layers before it, which the architecture would silently leave out
HEAD_LINEAR_AT: dict[str, tuple[str, ...]] = {
    "resnet18": ("fc",),
    "resnet34": ("fc",),
    "mobilenet_v2": ("classifier.1", "classifier"),
    "densenet121": ("classifier",),
    "efficientnet_v2_s": ("classifier.1", "classifier"),
    "efficientnet_v2_s_selu": ("classifier.2",),
}

#: classes ``weights_only`` may build besides tensors and containers: torchvision's ``train.py`` saves
#: its command line (an ``argparse.Namespace``) in every checkpoint, and building one runs no code
#: (``object.__new__``, then its ``__dict__`` filled with values unpickled under the same rules)
SAFE_GLOBALS = [argparse.Namespace]

SAVE_A_STATE_DICT = (
    "save the weights alone instead, where the model's code is: torch.save(model.state_dict(), 'weights.pt')"
)


def read_state_dict(path: Path, fmt: str = "torch") -> tuple[dict[str, Tensor], list[str]]:
    """The file's state dict (unwrapped, prefixes stripped) and what was done to get it."""
    if fmt == "safetensors":
        return unwrap(read_safetensors(path), path.name)
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's own advice to load with weights_only=False
            with open(path, "rb") as handle:  # a path ending in .safetensors, torch hands to safetensors
                loaded = torch.load(handle, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if FRAME_REFUSED in str(exc) and zipfile.is_zipfile(path):
            raise ModelRefused(
                "unreadable_weights",
                f"{path.name} was saved with pickle protocol 4 or 5, which torch's safe loader cannot read; "
                "save it again with torch.save's default protocol: torch.save(model.state_dict(), 'weights.pt')",
            ) from None
        what = _needing_code(str(exc))
        if what is None:  # a pickle cut short, or no pickle at all (an .h5 given --format torch): damage
            raise ModelRefused(
                "unreadable_weights",
                f"{path.name} is truncated, damaged or not a PyTorch checkpoint (UnpicklingError: "
                f"{_unpickler_reason(str(exc))})",
            ) from None
        raise ModelRefused(
            "needs_code",
            f"{path.name} holds {what}, which needs code to unpickle; it is never run and the file is not "
            f"imported. A whole pickled model cannot be imported: {SAVE_A_STATE_DICT}",
        ) from None
    except (RuntimeError, EOFError, KeyError, ValueError, OSError) as exc:
        raise ModelRefused(
            "unreadable_weights",
            f"{path.name} is truncated, damaged or not a PyTorch checkpoint ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0][:200] if str(exc) else 'no detail'})",
        ) from None
    return unwrap(loaded, path.name)


#: how torch's weights-only unpickler names what it refused to build: a class or function of a module
#: it allows none of, or of a module it blocks outright (``os``, ``posix``)
_REFUSED_GLOBAL = (  # the name up to torch's words after it: damage may have put a space inside it
    re.compile(r"Unsupported global: GLOBAL (.+?) was not an allowed global"),
    re.compile(r"Unsupported global: GLOBAL (\S+)"),
    re.compile(r"unsupported GLOBAL (.+?) whose module \S+ is blocked"),
)


#: the weights-only unpickler's answer to pickle's FRAME opcode (protocols 4 and 5)
FRAME_REFUSED = "Unsupported operand 149"


def _unpickler_reason(message: str) -> str:
    """What the weights-only unpickler met, without torch's prose around it: that prose advises
    loading with ``weights_only=False``, which runs the file's code (never done here)."""
    _, marker, after = message.partition("WeightsUnpickler error:")
    detail = " ".join(after.split("Check the documentation")[0].split()) if marker else message.splitlines()[0]
    if any(pattern.search(detail) for pattern in _REFUSED_GLOBAL):  # named by bytes damaged in place
        return "a global name that no Python code has: bytes damaged inside the pickle"
    if "weights_only" in detail:
        return "no detail"
    return "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in detail[:200]) or "no detail"


def _needing_code(message: str) -> str | None:
    """What the weights-only unpickler refused that would need code to unpickle, or None (damage)."""
    for pattern in _REFUSED_GLOBAL:
        found = pattern.search(message)
        if found is not None:  # a name no Python code has is bytes damaged inside a real global's
            return f"an object of {found.group(1)}" if _PYTHON_NAME.fullmatch(found.group(1)) else None
    if FRAME_REFUSED in message:  # not in torch.save's zip: a pickle.dump at protocol 4 or 5
        return "a pickle written by pickle.dump (not torch.save)"
    return None


#: a global as Python code names it: ``module.sub.Name``
_PYTHON_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")


def read_safetensors(path: Path) -> dict[str, Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(path, device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise ModelRefused(
            "unreadable_weights", f"{path.name} is truncated, damaged or not safetensors ({exc})"
        ) from None


def unwrap(loaded: Any, name: str) -> tuple[dict[str, Tensor], list[str]]:
    steps: list[str] = []
    if isinstance(loaded, Mapping):
        for key in WRAPPER_KEYS:
            if isinstance(loaded.get(key), Mapping):
                loaded = loaded[key]
                steps.append(f"state dict taken from {key!r}")
                break
    if not isinstance(loaded, Mapping) or not loaded:
        raise ModelRefused(
            "unreadable_weights",
            f"{name} holds a {type(loaded).__name__}, not a state dict of tensors; {SAVE_A_STATE_DICT}",
        )
    others = sorted(str(k) for k, v in loaded.items() if not isinstance(v, Tensor))
    if others:
        raise ModelRefused(
            "unreadable_weights",
            f"{name} is not a state dict: {', '.join(others[:6])} are not tensors (a checkpoint dict holds its "
            f"weights under {' or '.join(repr(k) for k in WRAPPER_KEYS)})",
        )
    state = {str(k): v for k, v in loaded.items()}
    loss = sorted(k for k in state if k.startswith(LOSS_PREFIXES))
    network = [k for k in state if k not in loss]
    if loss and network and any(all(k.startswith(p) for k in network) for p in WRAPPER_PREFIXES):
        # the 315 keys of the network were named unmatched, its prefix kept for the one key of the loss
        state = {k: v for k, v in state.items() if k not in loss}
        steps.append(f"the training loss's {', '.join(loss)} left out (not the network's)")
    # wrappers nest in any order (torch.compile of a DataParallel: '_orig_mod.module.'): strip until none is left
    while prefix := next((p for p in WRAPPER_PREFIXES if all(k.startswith(p) for k in state)), None):
        state = {k[len(prefix) :]: v for k, v in state.items()}
        steps.append(f"{prefix!r} prefix stripped")
    return state, steps


def to_meddaemon_layout(
    state: Mapping[str, Tensor], architecture: str, channels: int, outputs: int
) -> ConvertedWeights:
    """Rename ``state`` from torchvision's layout (or meddaemon's own) to ``architecture``'s keys.

    Keys that match nothing stay as they are, to be named by the strict load. The one Linear of a
    single-Linear head is found under any of :data:`HEAD_PREFIXES` where ``_misplaced_head`` allows
    it (seed heads are often ``Sequential(Dropout, Linear)``, and CheXNet's ``Sequential(Linear,
    Sigmoid)``; ``Sequential(Dropout, SELU, Linear)`` is ``efficientnet_v2_s_selu``'s).
    """
    expected = build_model(architecture, channels, outputs).state_dict()
    if set(state) <= set(expected):
        return ConvertedWeights(architecture, dict(state), {k: k for k in state}, ["meddaemon layout"])
    out: dict[str, Tensor] = {}
    source: dict[str, str] = {}
    head: dict[str, Tensor] = {}
    for key, value in state.items():
        target = _backbone_key(key, architecture)
        if target is not None and target in expected:
            out[target], source[target] = value, key
        elif key.startswith(HEAD_PREFIXES):
            head[key] = value
        else:
            out[key], source[key] = value, key
    hints: list[str] = []
    conversion = [f"torchvision {architecture} layout mapped onto meddaemon's"]
    if f"{SINGLE_LINEAR_HEAD}.weight" in expected:
        linears = [k[: -len(".weight")] for k, v in head.items() if k.endswith(".weight") and v.ndim == 2]
        misplaced = _misplaced_head(linears[0], architecture) if len(linears) == 1 else None
        if misplaced:
            hints.append(misplaced)
        elif len(linears) == 1:
            if linears[0] not in HEAD_LINEAR_AT.get(architecture, (linears[0],)):
                conversion.append(
                    f"head Linear {linears[0]} taken as {architecture}'s: a layer before it, without weights, taken "
                    "for a Dropout (nothing at inference), one after it for the activation --outputs names"
                )
            for part in ("weight", "bias"):
                key = f"{linears[0]}.{part}"
                if key in head:
                    out[f"{SINGLE_LINEAR_HEAD}.{part}"], source[f"{SINGLE_LINEAR_HEAD}.{part}"] = head.pop(key), key
    for key, value in head.items():  # not a head meddaemon has: reported as unmatched
        out[key], source[key] = value, key
    return ConvertedWeights(architecture, out, source, conversion, hints)


def _misplaced_head(linear: str, architecture: str) -> str | None:
    """Why the file's one head Linear is not where ``architecture`` has it (a head with other layers
    before it, which would be silently left out), or None. A ``Sequential`` in place of a plain
    Linear may hold it first (``Sequential(Linear, Sigmoid)``, CheXNet's) or second (``Sequential(Dropout,
    Linear)``, as torchvision's own MobileNetV2 head): the weightless layer beside it is taken for
    the activation ``--outputs`` names, or a Dropout (ResNet and DenseNet features are pooled after
    a ReLU, so a ReLU there is nothing either)."""
    expected = HEAD_LINEAR_AT.get(architecture)
    if expected is None or linear in expected:
        return None
    plain = [name for name in expected if not name.rsplit(".", 1)[-1].isdigit()]
    if any(linear in (f"{name}.0", f"{name}.1") for name in plain):
        return None
    hint = ""
    if architecture == "efficientnet_v2_s" and linear == "classifier.2":
        hint = " (seed 002's Sequential(Dropout, SELU, Linear) head is --arch efficientnet_v2_s_selu)"
    return (
        f"the file's final Linear is {linear}, where {architecture}'s is {' or '.join(expected)}: its head has "
        f"layers {architecture} does not have{hint}"
    )


def _backbone_key(key: str, architecture: str) -> str | None:
    for prefix, target in BACKBONE_PREFIXES.get(architecture, ()):
        if key.startswith(prefix):
            return target + key[len(prefix) :]
    return None


def convert(path: Path, architecture: str, channels: int, outputs: int, fmt: str = "torch") -> ConvertedWeights:
    state, steps = read_state_dict(path, fmt)
    converted = to_meddaemon_layout(state, architecture, channels, outputs)
    converted.conversion[:0] = steps
    return converted
