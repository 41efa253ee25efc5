"""What every foreign format shares: the import options, the input contract they give, the label
order of the file, and writing the converted weights as a meddaemon version folder.

A format module turns its file into a state dict in meddaemon's layout for one architecture
(:class:`ConvertedWeights`); :func:`write_converted` checks it against the task (class count, label
order, finite weights) and writes it with :func:`~meddaemon.engine.registry.save_version`, which
verifies the weights strictly and records the self-test, exactly as for a model meddaemon trained.
"""

from __future__ import annotations

import math
import re
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from meddaemon.engine.architectures import ARCHITECTURES, build_model, check_runs_at
from meddaemon.engine.registry import (
    NAME_PATTERN,
    ONNX_ARCHITECTURE,
    Manifest,
    ModelRefused,
    NonFiniteOutputs,
    save_version,
)
from meddaemon.engine.tasks import GREY_MEAN, GREY_STD, IMAGENET_MEAN, IMAGENET_STD, InputContract, TaskSpec
from meddaemon.files import file_sha256

FORMATS = ("auto", "torch", "safetensors", "keras-h5", "onnx")
#: --image-size's bounds: the self-test runs the model on a batch of that size (at 2240, a typo for
#: 224, it took 2 minutes and 3.4 GB; at 100000 it failed to allocate, called unreadable weights)
MIN_IMAGE_SIZE, MAX_IMAGE_SIZE = 8, 1024
#: safetensors refuses a header over 100 MB
SAFETENSORS_MAX_HEADER = 100_000_000
#: the file inside a ``.keras`` archive (Keras 3's ``model.save``) that holds the weights
KERAS_ARCHIVE_WEIGHTS = "model.weights.h5"
OUTPUTS = ("logits", "probabilities")


@dataclass(frozen=True)
class ImportOptions:
    """``medcli models import FILE`` flags; ``None`` takes the task preset's value."""

    task: str
    architecture: str | None = None
    format: str = "auto"
    version: str | None = None
    #: the order of the file's outputs, when it is not the task's (a permutation of the task's labels)
    labels: tuple[str, ...] | None = None
    image_size: int | None = None
    channels: int | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    resize_then_crop: bool | None = None
    per_image_normalisation: bool | None = None
    #: what the original model's forward returns (a torch state dict holds no activation, so for
    #: torch and Keras this is recorded only; an ONNX graph's probabilities are turned back into logits)
    outputs: str = "logits"
    thresholds: Mapping[str, float] | None = None
    #: ONNX only: the last feature map, exposed as an output for CAM
    cam_tensor: str | None = None


@dataclass
class ConvertedWeights:
    """A state dict in meddaemon's layout for ``architecture`` plus how it was obtained."""

    architecture: str
    state: dict[str, Tensor]
    #: meddaemon key -> the file's key, for messages that name what the user knows
    source_keys: dict[str, str] = field(default_factory=dict)
    conversion: list[str] = field(default_factory=list)
    #: what the format module suspects, added to a refusal for wrong keys
    hints: list[str] = field(default_factory=list)
    #: the activation the file says its head ends with (a Keras model's configuration), None where it
    #: does not say: two outputs of a binary task are then taken for a softmax's
    head_activation: str | None = None


@dataclass(frozen=True)
class Source:
    """The file being imported: its name, SHA-256 and detected format."""

    path: Path
    sha256: str
    format: str


def read_source(path: Path, fmt: str) -> Source:
    if not path.is_file():
        raise ModelRefused("missing_file", f"{path} does not exist or is not a file")
    if fmt not in FORMATS:
        raise ModelRefused("unsupported_format", f"format {fmt!r} is not one of {list(FORMATS)}")
    return Source(path=path, sha256=file_sha256(path), format=detect_format(path) if fmt == "auto" else fmt)


def check_unchanged(source: Source) -> None:
    """The file is hashed, then read again to be converted: one replaced meanwhile (a copy still being
    written, a new export) was registered under the other's hash. Hashed again after, it must match."""
    if file_sha256(source.path) != source.sha256:
        raise ModelRefused(
            "unreadable_weights",
            f"{source.path.name} changed while it was imported; import it again once it is written whole",
        )


_SUFFIXES = {
    ".pt": "torch",
    ".pth": "torch",
    ".ckpt": "torch",
    ".bin": "torch",
    ".tar": "torch",
    ".h5": "keras-h5",
    ".hdf5": "keras-h5",
    ".keras": "keras-h5",
    ".onnx": "onnx",
    ".safetensors": "safetensors",
}


def detect_format(path: Path) -> str:
    """By the file's first bytes (HDF5, or a zip holding Keras weights: keras-h5; another zip or a
    pickle: torch; a little-endian header length then a JSON object: safetensors), else by its suffix."""
    with open(path, "rb") as f:
        head = f.read(9)
    if head.startswith(b"\x89HDF\r\n\x1a\n"):
        return "keras-h5"
    if len(head) == 9 and head[8:9] == b"{" and 2 <= int.from_bytes(head[:8], "little") <= SAFETENSORS_MAX_HEADER:
        return "safetensors"
    if head.startswith(b"PK\x03\x04"):
        return "keras-h5" if _is_keras_archive(path) else "torch"
    if head[:1] == b"\x80":
        return "torch"
    fmt = _SUFFIXES.get(path.suffix.lower())
    if fmt is None:
        raise ModelRefused(
            "unsupported_format",
            f"cannot tell the format of {path.name}; pass --format torch, safetensors, keras-h5 or onnx",
        )
    return fmt


def _is_keras_archive(path: Path) -> bool:
    """A ``.keras`` file (Keras 3's ``model.save``): a zip holding ``model.weights.h5``."""
    try:
        with zipfile.ZipFile(path) as archive:
            return KERAS_ARCHIVE_WEIGHTS in archive.namelist()
    except (OSError, zipfile.BadZipFile):
        return False


def contract_for(spec: TaskSpec, options: ImportOptions) -> InputContract:
    """The task preset's input contract with the options' overrides applied."""
    base = spec.contract
    channels = options.channels or base.channels
    if channels not in (1, 3):
        raise ModelRefused("contract_conflict", f"--channels must be 1 or 3, not {channels}")
    if channels == base.channels:
        mean, std = base.mean, base.std
    else:
        mean, std = (GREY_MEAN, GREY_STD) if channels == 1 else (IMAGENET_MEAN, IMAGENET_STD)
    mean, std = options.mean or mean, options.std or std
    if len(mean) != channels or len(std) != channels:
        raise ModelRefused(
            "contract_conflict", f"--mean/--std need {channels} value(s) each (one per channel), not {mean}/{std}"
        )
    size = options.image_size
    changes: dict[str, Any] = {"channels": channels, "mean": tuple(mean), "std": tuple(std)}
    if size is not None:
        changes.update(height=size, width=size)
    if options.resize_then_crop is not None:
        changes["resize"] = "resize_then_crop" if options.resize_then_crop else "stretch"
    if options.per_image_normalisation is not None:
        changes["normalisation"] = "per_image" if options.per_image_normalisation else "fixed"
    try:
        return replace(base, **changes)
    except (TypeError, ValueError) as exc:
        raise ModelRefused("contract_conflict", f"invalid input contract: {exc}") from None


def architecture_for(spec: TaskSpec, options: ImportOptions) -> str:
    architecture = options.architecture or spec.architecture
    if architecture not in ARCHITECTURES:
        raise ModelRefused("wrong_architecture", f"--arch {architecture!r} is not one of {', '.join(ARCHITECTURES)}")
    return architecture


def file_labels(spec: TaskSpec, options: ImportOptions) -> list[str]:
    """The file's output order: ``--labels`` (a permutation of the task's labels) or the task's."""
    if options.labels is None:
        return list(spec.labels)
    labels = list(options.labels)
    if sorted(labels) != sorted(spec.labels):
        raise ModelRefused(
            "task_mismatch",
            f"--labels {labels} are not the labels of task {spec.name!r} {list(spec.labels)} in some order",
        )
    return labels


def final_linear(model: nn.Module) -> str:
    """The qualified name of the network's last Linear (its logits)."""
    names = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not names:
        raise ValueError("the network has no Linear layer")
    return names[-1]


def first_conv(model: nn.Module) -> str:
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            return name
    raise ValueError("the network has no convolution")


def fit_head_to_task(converted: ConvertedWeights, spec: TaskSpec, labels_in_file: Sequence[str], head: str) -> None:
    """Reorder (or fold) the final Linear ``head`` so its outputs are the task's, in the task's order.

    multiclass/multilabel: rows permuted from the file's label order. binary: one logit is the
    sigmoid of ``labels[1]``; a file whose single logit is the other class is negated
    (``sigmoid(-z) = 1 - sigmoid(z)``); a two-logit softmax head is folded into one logit,
    ``z_pos - z_neg`` (``softmax(z)[pos] = sigmoid(z_pos - z_neg)``), and a head of two sigmoids
    (``head_activation``) keeps the positive class's (folded, its probabilities were served changed:
    0.086 for 0.188). Any other count contradicts the task.
    """
    weight_key, bias_key = f"{head}.weight", f"{head}.bias"
    weight = converted.state.get(weight_key)
    if weight is None or weight.ndim != 2:
        return  # named as missing or mis-shaped by the strict load

    bias = converted.state.get(bias_key)
    rows = weight.shape[0]
    where = converted.source_keys.get(weight_key, weight_key)
    if bias is not None and tuple(bias.shape) != (rows,):  # indexed by label below: an IndexError before
        raise ModelRefused(
            "wrong_architecture",
            f"{converted.source_keys.get(bias_key, bias_key)} has shape {tuple(bias.shape)}, not ({rows},) "
            f"as the {rows} rows of {where}",
        )
    if spec.kind == "binary":
        positive, negative = labels_in_file.index(spec.labels[1]), labels_in_file.index(spec.labels[0])
        if rows == 1:
            if positive == 1:
                return
            weight, bias = -weight, None if bias is None else -bias
            converted.conversion.append(
                f"single logit of {spec.labels[0]!r} negated into the logit of {spec.labels[1]!r}"
            )
        elif rows == 2 and converted.head_activation == "sigmoid":
            weight = weight[positive].unsqueeze(0)
            bias = None if bias is None else bias[positive].unsqueeze(0)
            converted.conversion.append(
                f"head of two sigmoids: the logit of {spec.labels[1]!r} kept, that of {spec.labels[0]!r} left out"
            )
        elif rows == 2:
            weight = (weight[positive] - weight[negative]).unsqueeze(0)
            bias = None if bias is None else (bias[positive] - bias[negative]).unsqueeze(0)
            converted.conversion.append(
                f"two-logit softmax head folded into one logit ({spec.labels[1]!r} minus {spec.labels[0]!r})"
            )
        else:
            raise _class_count(where, rows, spec)
    else:
        if rows != len(spec.labels):
            raise _class_count(where, rows, spec)
        order = [labels_in_file.index(label) for label in spec.labels]
        if order == list(range(rows)):
            return
        weight = weight[order]
        bias = None if bias is None else bias[order]
        converted.conversion.append(f"outputs reordered from the file's {list(labels_in_file)} to the task's")
    converted.state[weight_key] = weight.contiguous()
    if bias is not None:
        converted.state[bias_key] = bias.contiguous()


def _class_count(where: str, rows: int, spec: TaskSpec) -> ModelRefused:
    needs = (
        "1 (binary: the sigmoid of the positive class) or 2 (softmax)" if spec.kind == "binary" else len(spec.labels)
    )
    return ModelRefused(
        "class_count_mismatch",
        f"the file's final layer {where} has {rows} output(s) but task {spec.name!r} ({spec.kind}, labels "
        f"{list(spec.labels)}) needs {needs}",
    )


#: the tensor types a weight may be: dense, on the CPU, of real numbers
WEIGHT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.int64, torch.int32, torch.bool)


def check_finite(converted: ConvertedWeights) -> None:
    """Weights of the types a network holds, none of them NaN or infinite. A sparse, meta, complex
    or float8 tensor crashed the check (or, complex, lost its imaginary part to a warning and was
    registered)."""
    odd = [
        converted.source_keys.get(k, k)
        for k, v in converted.state.items()
        if v.layout != torch.strided or v.is_meta or v.dtype not in WEIGHT_DTYPES
    ]
    if odd:
        raise ModelRefused(
            "unreadable_weights",
            f"{len(odd)} tensor(s) are not dense real-valued weights (sparse, meta, complex or float8): "
            f"{', '.join(odd[:5])}{', ...' if len(odd) > 5 else ''}",
        )
    overlapping = [converted.source_keys.get(k, k) for k, v in converted.state.items() if _declares_more_than_stored(v)]
    if overlapping:
        raise ModelRefused(
            "unreadable_weights",
            f"{len(overlapping)} tensor(s) declare more values than the file stores (overlapping strides, as "
            f"expand() or as_strided() make): {', '.join(overlapping[:5])}{', ...' if len(overlapping) > 5 else ''}; "
            "a network's weights never do: save them with .contiguous()",
        )
    bad = [
        converted.source_keys.get(k, k)
        for k, v in converted.state.items()
        if v.is_floating_point() and not bool(torch.isfinite(v).all())
    ]
    if bad:
        raise ModelRefused(
            "non_finite_weights",
            f"{len(bad)} tensor(s) hold NaN or infinite values: {', '.join(bad[:5])}{', ...' if len(bad) > 5 else ''}",
        )


def _declares_more_than_stored(tensor: torch.Tensor) -> bool:
    """A few stored bytes declared as a huge tensor (zero strides): checking its values allocated the
    declared size, 12 GB for a 9 MB file."""
    return tensor.numel() * tensor.element_size() > tensor.untyped_storage().nbytes()


def check_first_conv(converted: ConvertedWeights, model: nn.Module, contract: InputContract, spec: TaskSpec) -> None:
    """The file's input channels against the contract's: a conflict names both."""
    key = f"{first_conv(model)}.weight"
    weight = converted.state.get(key)
    if weight is None or weight.ndim != 4 or weight.shape[1] == contract.channels:
        return
    raise ModelRefused(
        "contract_conflict",
        f"the file's first convolution {converted.source_keys.get(key, key)} takes {weight.shape[1]} input "
        f"channel(s) but the input contract (task {spec.name!r}) has {contract.channels}; pass --channels "
        f"{weight.shape[1]} if the model was trained on {weight.shape[1]}-channel images",
    )


def check_options(options: ImportOptions, spec: TaskSpec) -> None:
    """The command's own values, refused (``bad_option``, a usage error) before the file is read:
    a bad --version, --threshold, --mean or --std was refused as the manifest's (``bad_manifest``,
    exit 1) after the conversion, and a threshold no call applies (a multiclass task's, a binary
    task's negative label's) was registered and shown beside results it never decided."""
    if options.version is not None and not NAME_PATTERN.match(options.version):
        raise ModelRefused(
            "bad_option",
            f"--version {options.version!r} must be 1-64 letters, digits, '.', '_' or '-', not starting with '.', "
            "'_' or '-'",
        )
    if options.image_size is not None and not MIN_IMAGE_SIZE <= options.image_size <= MAX_IMAGE_SIZE:
        # a typo (2240 for 224) ran the self-test for minutes on gigabytes; 100000 was "unreadable_weights"
        raise ModelRefused(
            "bad_option", f"--image-size {options.image_size}: from {MIN_IMAGE_SIZE} to {MAX_IMAGE_SIZE} pixels"
        )
    for label, value in (options.thresholds or {}).items():
        if label not in spec.labels:
            raise ModelRefused(
                "bad_option", f"--threshold {label}: not a label of task {spec.name} ({', '.join(spec.labels)})"
            )
        if not 0 <= value <= 1:
            raise ModelRefused("bad_option", f"--threshold {label}={value}: a probability is in [0, 1]")
        # registered and shown, it was never applied: the calls below take no threshold of it
        if spec.kind == "multiclass":
            raise ModelRefused(
                "bad_option",
                f"--threshold {label}: task {spec.name} is multiclass and calls its top class; no threshold is applied",
            )
        if spec.kind == "binary" and label != spec.labels[1]:
            raise ModelRefused(
                "bad_option",
                f"--threshold {label}: task {spec.name} calls {spec.labels[1]} at its threshold and {label} "
                f"below it; give --threshold {spec.labels[1]}=P",
            )
    if options.architecture is not None and options.architecture not in (*ARCHITECTURES, ONNX_ARCHITECTURE):
        # a typo was "wrong_architecture", exit 1, the file's fault, after the file was read
        known = ", ".join((*ARCHITECTURES, ONNX_ARCHITECTURE))
        raise ModelRefused("bad_option", f"--arch {options.architecture!r} is not one of {known}")
    file_labels(spec, options)  # --labels that are not the task's: refused before the file is read too
    for option, values in (("--mean", options.mean), ("--std", options.std)):
        for value in values or ():
            # a zero --std, or a NaN, was refused as the manifest's (exit 1) after the whole conversion
            if not math.isfinite(value) or (option == "--std" and value <= 0):
                above = " above 0 (the image is divided by it)" if option == "--std" else ""
                raise ModelRefused("bad_option", f"{option} {value}: each value is a finite number{above}")


def version_name(source: Source, options: ImportOptions) -> str:
    if options.version is not None:
        return options.version
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", source.path.stem).strip("._-")[:40] or "imported"
    return f"{stem}-{source.sha256[:8]}"


def provenance(source: Source, options: ImportOptions, conversion: Sequence[str], **extra: Any) -> dict[str, Any]:
    return {
        "source_file": source.path.name,
        "sha256": source.sha256,
        "format": source.format,
        "conversion": "; ".join(conversion) if conversion else "none",
        "outputs": options.outputs,
        **extra,
    }


def write_converted(
    converted: ConvertedWeights,
    source: Source,
    spec: TaskSpec,
    options: ImportOptions,
    out_dir: Path,
) -> Manifest:
    """Check ``converted`` against the task and write it as a version folder (safetensors + manifest)."""
    contract = contract_for(spec, options)
    labels_in_file = file_labels(spec, options)
    model = build_model(converted.architecture, contract.channels, spec.num_outputs)
    check_finite(converted)
    check_first_conv(converted, model, contract, spec)
    fit_head_to_task(converted, spec, labels_in_file, final_linear(model))
    _load_strictly(model, converted)
    if options.image_size is not None:  # the option's fault: the self-test's error called the file damaged
        try:
            check_runs_at(model, converted.architecture, contract.channels, contract.height, contract.width)
        except ValueError as exc:
            raise ModelRefused("bad_option", f"--image-size {contract.height}: {exc}; give a larger one") from None
    if options.outputs not in OUTPUTS:
        raise ModelRefused("bad_manifest", f"--outputs must be one of {list(OUTPUTS)}, not {options.outputs!r}")
    if options.outputs == "probabilities":
        converted.conversion.append(
            "the original ends with a sigmoid/softmax, which has no weights: meddaemon applies it to the logits"
        )
    try:
        return save_version(
            model,
            task=spec.name,
            version=version_name(source, options),
            labels=spec.labels,
            kind=spec.kind,
            architecture=converted.architecture,
            input_contract=contract,
            out_dir=out_dir,
            thresholds=dict(options.thresholds) if options.thresholds else None,
            training_data_fingerprint=f"imported:{source.sha256}",
            provenance=provenance(source, options, converted.conversion, labels_in_file=labels_in_file),
        )
    except NonFiniteOutputs as exc:
        raise ModelRefused("non_finite_output", str(exc)) from None
    except ValueError as exc:
        raise ModelRefused("bad_manifest", str(exc)) from None


def _load_strictly(model: nn.Module, converted: ConvertedWeights) -> None:
    """Every key of the model from the file, each of the model's shape; the rest named in the refusal."""
    expected = model.state_dict()
    state = converted.state
    for key, value in expected.items():  # old checkpoints have no BatchNorm step counters
        if key not in state and key.endswith("num_batches_tracked"):
            state[key] = torch.zeros_like(value)
    name = converted.source_keys.get
    missing = sorted(set(expected) - set(state))
    unmatched = sorted(name(k, k) for k in set(state) - set(expected))
    shapes = [
        f"{name(k, k)} {tuple(state[k].shape)} (expected {tuple(v.shape)} for {k})"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    problems = []
    if unmatched:
        problems.append(f"{len(unmatched)} unmatched key(s) in the file: {_some(unmatched)}")
    if missing:
        problems.append(f"{len(missing)} key(s) of {converted.architecture} missing from the file: {_some(missing)}")
    if shapes:
        problems.append(f"{len(shapes)} mis-shaped key(s): {_some(shapes)}")
    if problems:
        raise ModelRefused(
            "wrong_architecture",
            f"the file does not hold {converted.architecture} weights: " + "; ".join(problems + converted.hints),
        )
    for key, value in expected.items():
        if state[key].dtype != value.dtype:
            state[key] = state[key].to(value.dtype)
    model.load_state_dict(state, strict=True)


def _some(items: Sequence[str], n: int = 6) -> str:
    return ", ".join(items[:n]) + (f", ... ({len(items) - n} more)" if len(items) > n else "")
