"""Model versions on disk and in the database (docs/design.md section 6).

A model version is a folder with exactly two files that matter:

- ``model.safetensors``: the ``state_dict`` of a :func:`~meddaemon.engine.architectures.build_model`
  network. Weights are only ever read with safetensors; nothing is ever unpickled (no ``torch.load``),
  and a file of any other type is refused.
- ``manifest.json``: a :class:`Manifest`, which says what the network is (architecture, labels, kind,
  input contract), what it was trained on, the SHA-256 of the weights file, and a self-test: a
  deterministic input (:func:`self_test_input`) and the probabilities the network gave for it when
  it was saved.

:func:`load_version` refuses a version (:class:`ModelRefused`, with a stable ``reason`` code) unless
the weights file has the manifest's SHA-256 (checked *before* the file is parsed), parses as
safetensors, matches the declared architecture key for key and shape for shape, and reproduces the
self-test probabilities within the manifest's tolerance in fp32. A ``MODEL_CARD.md`` and the figures
it links may sit beside them (``engine/card.py``): documents, copied with the version, never verified.

The database side keeps the registry under ``Settings.models_dir`` (``<state_dir>/models``) as
``<task>/<version>/``; a version is ``registered`` when imported, ``active`` when promoted (at most
one per task), ``retired`` for good. Promoting a version puts the previously active one of its task
back to ``registered``: it stays available to be promoted again (a rollback is one ``promote``);
only ``retire`` takes a version out of service for good.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import re
import shutil
import stat
import struct
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO

import torch
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker
from torch import Tensor, nn

from meddaemon import __version__
from meddaemon.db.bulk import insert_missing
from meddaemon.db.engine import transaction, with_lock_retry, with_unique_retry
from meddaemon.db.models import ModelGraph, ModelVersion, Task, utcnow
from meddaemon.engine.architectures import ARCHITECTURES, build_model
from meddaemon.engine.card import card_files
from meddaemon.engine.preprocess import normalise
from meddaemon.engine.tasks import BUILTIN_TASKS, KINDS, InputContract, TaskSpec
from meddaemon.files import (
    PASSING_ERRNOS,
    file_sha256,
    fsync_dir,
    make_folders,
    remove_stale_temporaries,
    temporary_path,
    write_atomically,
)
from meddaemon.stored_paths import stored_file, stored_name

log = logging.getLogger(__name__)

WEIGHTS_FILE = "model.safetensors"
MANIFEST_FILE = "manifest.json"
#: An imported ONNX graph takes the place of the safetensors weights; its manifest's architecture is "onnx".
ONNX_FILE = "model.onnx"
ONNX_ARCHITECTURE = "onnx"
BACKENDS = ("auto", "eager", "onnx")
STATUSES = ("registered", "active", "retired")
#: Files that look like model weights in a format that is never loaded (pickle-based).
PICKLE_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin", ".pkl", ".pickle", ".tar", ".joblib", ".npy", ".npz")
MAX_MANIFEST_BYTES = 16 * 1024 * 1024
MAX_SELF_TEST_BATCH = 64
MAX_SELF_TEST_ATOL = 0.01
DEFAULT_SELF_TEST_ATOL = 1e-4
#: Task and version names become folder names: no separators, no leading dot.
NAME_PATTERN = re.compile(r"\A[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z")  # \Z: "$" lets a final newline in

#: Reasons a model version is refused (``ModelRefused.reason``).
REFUSAL_REASONS = (
    "missing_file",
    "unsupported_format",
    "bad_manifest",
    "hash_mismatch",
    "unreadable_weights",
    "wrong_architecture",
    "self_test_failed",
    "non_finite_output",
    "unknown_task",
    "task_mismatch",
    # converting a foreign file (engine/importers/)
    "bad_option",
    "needs_code",
    "class_count_mismatch",
    "contract_conflict",
    "non_finite_weights",
    "unsupported_onnx",
)


class RegistryError(Exception):
    """A registry operation cannot be done: ``reason`` is a stable code, ``message`` a sentence."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message

    def __reduce__(self) -> tuple[type[RegistryError], tuple[str, str]]:
        return (type(self), (self.reason, self.message))


class ModelRefused(RegistryError):
    """A model version failed verification; it is neither registered nor served.

    ``reason`` is one of :data:`REFUSAL_REASONS`.
    """


class ManifestError(ValueError):
    """A manifest field is missing or invalid; the message names the field."""


class NonFiniteOutputs(ValueError):
    """Weights that are finite and still give NaN or infinite outputs (a negative BatchNorm variance,
    values that overflow): nothing to save."""


# --------------------------------------------------------------------------------------------
# the manifest


@dataclass(frozen=True)
class Manifest:
    task: str
    version: str
    labels: list[str]
    kind: str
    architecture: str
    #: {channels, height, width, mean, std, modalities} (+ any other ``InputContract`` field)
    input_contract: dict[str, Any]
    preprocessing: dict[str, Any]
    thresholds: dict[str, float]
    training_data_fingerprint: str
    metrics: dict[str, Any]
    sha256: str
    code_version: str
    created: str
    #: {seed, batch, expected_probabilities, atol}
    self_test: dict[str, Any]
    backend: str = "auto"
    heatmaps: bool = True
    #: where an imported version came from: {source_file, sha256, format, conversion, ...}; empty when
    #: meddaemon trained it
    provenance: dict[str, Any] = field(default_factory=dict)
    #: ONNX versions only: {input, logits, single_image, outputs[, activation, cam_weight, cam_weight_transposed]}
    onnx: dict[str, Any] = field(default_factory=dict)

    @property
    def weights_file(self) -> str:
        return ONNX_FILE if self.architecture == ONNX_ARCHITECTURE else WEIGHTS_FILE

    @property
    def num_outputs(self) -> int:
        """Logits of the head: one for binary (the positive class, ``labels[1]``), else one per label."""
        return 1 if self.kind == "binary" else len(self.labels)

    @property
    def contract(self) -> InputContract:
        return InputContract.from_dict(self.input_contract)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str | bytes) -> Manifest:
        try:
            data = json.loads(text)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ManifestError(f"not valid JSON: {exc}") from None
        return cls.from_dict(data)

    @classmethod
    def from_dict(cls, data: Any) -> Manifest:
        """A validated manifest; :class:`ManifestError` names the first bad field."""
        if not isinstance(data, Mapping):
            raise ManifestError(f"must be a JSON object, not {type(data).__name__}")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - set(fields))
        if unknown:
            raise ManifestError(
                f"unknown field(s) {unknown} (written by a newer meddaemon?); known fields: {sorted(fields)}"
            )
        required = [
            name
            for name, f in fields.items()
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        ]
        missing = [name for name in required if name not in data]
        if missing:
            raise ManifestError(f"missing field(s) {missing}")
        values = {name: data[name] for name in fields if name in data}
        return cls(**_validated(values))


def _validated(v: dict[str, Any]) -> dict[str, Any]:
    out = dict(v)

    def fail(name: str, why: str) -> None:
        raise ManifestError(f"field {name!r}: {why}")

    for name in ("task", "version"):
        if not isinstance(v[name], str) or not NAME_PATTERN.match(v[name]):
            fail(name, f"{v[name]!r} must be 1-64 letters, digits, '.', '_' or '-', not starting with '.', '_' or '-'")
    kind = v["kind"]
    if kind not in KINDS:
        fail("kind", f"{kind!r} is not one of {list(KINDS)}")
    labels = v["labels"]
    if not isinstance(labels, list) or not all(isinstance(x, str) and x for x in labels):
        fail("labels", "must be a list of non-empty strings")
    if len(labels) < 2:
        fail("labels", "needs at least two labels")
    if len(set(labels)) != len(labels):
        fail("labels", f"has duplicates: {labels}")
    if kind == "binary" and len(labels) != 2:
        fail("labels", f"a binary model has exactly two labels [negative, positive], not {len(labels)}")
    if v["architecture"] not in (*ARCHITECTURES, ONNX_ARCHITECTURE):
        fail("architecture", f"{v['architecture']!r} is not one of {[*ARCHITECTURES, ONNX_ARCHITECTURE]}")
    onnx_info = v.get("onnx", {})
    if not isinstance(onnx_info, Mapping):
        fail("onnx", "must be an object")
    if v["architecture"] == ONNX_ARCHITECTURE and not {"input", "logits"} <= set(onnx_info):
        fail("onnx", "an ONNX version names its graph's 'input' and 'logits'")
    out["onnx"] = dict(onnx_info)
    out["input_contract"] = _validated_contract(v["input_contract"])
    if not isinstance(v["preprocessing"], Mapping):
        fail("preprocessing", "must be an object")
    out["preprocessing"] = dict(v["preprocessing"])
    thresholds = v["thresholds"]
    if not isinstance(thresholds, Mapping):
        fail("thresholds", "must be an object {label: threshold}")
    clean: dict[str, float] = {}
    for label, value in thresholds.items():
        if label not in labels:
            fail("thresholds", f"{label!r} is not one of the labels {labels}")
        if not _is_number(value) or not 0.0 <= float(value) <= 1.0:
            fail("thresholds", f"threshold of {label!r} must be a number in [0, 1], not {value!r}")
        clean[label] = float(value)
    out["thresholds"] = clean
    for name in ("training_data_fingerprint", "code_version", "created"):
        if not isinstance(v[name], str):
            fail(name, "must be a string")
    try:
        created = datetime.fromisoformat(v["created"])
    except ValueError:
        fail("created", f"{v['created']!r} is not an ISO 8601 date and time")
    if created.tzinfo is None:
        fail("created", f"{v['created']!r} has no time zone (expected UTC, e.g. 2024-01-31T12:00:00+00:00)")
    if not isinstance(v["metrics"], Mapping):
        fail("metrics", "must be an object")
    out["metrics"] = dict(v["metrics"])
    sha = v["sha256"]
    if not isinstance(sha, str) or not re.fullmatch(r"[0-9a-f]{64}", sha):
        fail("sha256", "must be 64 lowercase hexadecimal digits")
    if v.get("backend", "auto") not in BACKENDS:
        fail("backend", f"{v['backend']!r} is not one of {list(BACKENDS)}")
    if not isinstance(v.get("heatmaps", True), bool):
        fail("heatmaps", "must be true or false")
    if not isinstance(v.get("provenance", {}), Mapping):
        fail("provenance", "must be an object")
    out["provenance"] = dict(v.get("provenance", {}))
    out["self_test"] = _validated_self_test(v["self_test"], len(labels))
    return out


def _validated_contract(contract: Any) -> dict[str, Any]:
    def fail(why: str) -> None:
        raise ManifestError(f"field 'input_contract': {why}")

    if not isinstance(contract, Mapping):
        fail("must be an object {channels, height, width, mean, std, modalities}")
    required = ("channels", "height", "width", "mean", "std", "modalities")
    missing = [k for k in required if k not in contract]
    if missing:
        fail(f"missing {missing}")
    allowed = {f.name for f in dataclasses.fields(InputContract)}
    unknown = sorted(set(contract) - allowed)
    if unknown:
        fail(f"unknown key(s) {unknown}; known: {sorted(allowed)}")
    out = dict(contract)
    for key in ("channels", "height", "width"):
        if not isinstance(contract[key], int) or isinstance(contract[key], bool) or contract[key] < 1:
            fail(f"{key} must be a positive integer, not {contract[key]!r}")
    channels = contract["channels"]
    for key in ("mean", "std"):
        values = contract[key]
        if not isinstance(values, list | tuple) or not all(_is_number(x) for x in values):
            fail(f"{key} must be a list of numbers")
        if len(values) != channels:
            fail(f"{key} has {len(values)} values for {channels} channel(s)")
        out[key] = [float(x) for x in values]
    if any(x <= 0 for x in out["std"]):
        fail("std values must be > 0")
    modalities = contract["modalities"]
    if not isinstance(modalities, list | tuple) or not all(isinstance(m, str) for m in modalities):
        fail("modalities must be a list of strings (empty accepts any)")
    out["modalities"] = list(modalities)
    try:
        InputContract.from_dict(out)
    except (TypeError, ValueError) as exc:
        fail(str(exc))
    return out


def _validated_self_test(st: Any, n_labels: int) -> dict[str, Any]:
    def fail(why: str) -> None:
        raise ManifestError(f"field 'self_test': {why}")

    if not isinstance(st, Mapping):
        fail("must be an object {seed, batch, expected_probabilities, atol}")
    missing = [k for k in ("seed", "batch", "expected_probabilities", "atol") if k not in st]
    if missing:
        fail(f"missing {missing}")
    unknown = sorted(set(st) - {"seed", "batch", "expected_probabilities", "atol"})
    if unknown:
        fail(f"unknown key(s) {unknown}")
    seed, batch, atol = st["seed"], st["batch"], st["atol"]
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**63:
        fail(f"seed must be a non-negative integer, not {seed!r}")
    if not isinstance(batch, int) or isinstance(batch, bool) or not 1 <= batch <= MAX_SELF_TEST_BATCH:
        fail(f"batch must be an integer in [1, {MAX_SELF_TEST_BATCH}], not {batch!r}")
    if not _is_number(atol) or not 0 < float(atol) <= MAX_SELF_TEST_ATOL:
        fail(f"atol must be a number in (0, {MAX_SELF_TEST_ATOL}], not {atol!r}")
    expected = st["expected_probabilities"]
    if (
        not isinstance(expected, list)
        or len(expected) != batch
        or not all(isinstance(row, list) and len(row) == n_labels for row in expected)
    ):
        fail(f"expected_probabilities must be {batch} rows of {n_labels} probabilities (one per label)")
    if not all(_is_number(x) and 0.0 <= float(x) <= 1.0 for row in expected for x in row):
        fail("expected_probabilities must be numbers in [0, 1]")
    return {
        "seed": seed,
        "batch": batch,
        "expected_probabilities": [[float(x) for x in row] for row in expected],
        "atol": float(atol),
    }


def _is_number(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


# --------------------------------------------------------------------------------------------
# outputs and the self-test


def probabilities(logits: Tensor, kind: str) -> Tensor:
    """(B, len(labels)) probabilities from a head's logits.

    multiclass: softmax over the labels; multilabel: a sigmoid per label; binary: the head has one
    logit, the sigmoid is the probability of ``labels[1]`` (the positive class) and the result is
    ``[1 - p, p]``.
    """
    if logits.ndim != 2:
        raise ValueError(f"logits must be (batch, outputs), not {tuple(logits.shape)}")
    if kind == "multiclass":
        return torch.softmax(logits, dim=1)
    if kind == "multilabel":
        return torch.sigmoid(logits)
    if kind == "binary":
        if logits.shape[1] != 1:
            raise ValueError(f"a binary head has one logit, not {logits.shape[1]}")
        p = torch.sigmoid(logits)
        return torch.cat([1 - p, p], dim=1)
    raise ValueError(f"unknown kind {kind!r}; choose one of {list(KINDS)}")


def self_test_input(contract: InputContract | Mapping[str, Any], seed: int, batch: int) -> Tensor:
    """A deterministic (batch, C, H, W) float32 input in the model's normalised input space.

    Pixel values are drawn uniformly in [0, 1] by a CPU ``torch.Generator`` seeded with ``seed`` (the
    same numbers on every machine), then normalised as the contract says (``preprocess.normalise``),
    as a real scan is.
    """
    c = contract if isinstance(contract, InputContract) else InputContract.from_dict(contract)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    pixels = torch.rand((batch, c.channels, c.height, c.width), generator=generator, dtype=torch.float32)
    return torch.from_numpy(normalise(pixels.numpy(), c))


@contextmanager
def _strict_fp32() -> Iterator[None]:
    """fp32 as written: no TF32 on CUDA while the self-test runs (it would move outputs by ~1e-3)."""
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


def _run_self_test(model: nn.Module, manifest_like: Mapping[str, Any], device: torch.device) -> Tensor:
    """The model's probabilities (on the CPU, fp32) for the self-test input."""
    st = manifest_like["self_test"]
    x = self_test_input(manifest_like["input_contract"], st["seed"], st["batch"]).to(device)
    model.eval()
    with _strict_fp32(), torch.inference_mode(), torch.autocast(device.type, enabled=False):
        logits = model(x).float()
    return probabilities(logits, manifest_like["kind"]).cpu()


# --------------------------------------------------------------------------------------------
# saving and loading


@dataclass
class LoadedModel:
    """A verified model version: its manifest and the network, in eval mode on its device."""

    manifest: Manifest
    model: nn.Module
    folder: Path = field(default_factory=Path)


def safetensors_bytes(state: Mapping[str, Tensor], metadata: Mapping[str, str]) -> bytes:
    """``state`` as a safetensors file whose bytes depend on nothing else: safetensors writes its
    metadata in the order of a Rust HashMap, which each process seeds anew, so the same weights of a
    seeded, deterministic run were registered under a different SHA-256 each time. The header is
    written again with the metadata's keys sorted: the same length, the same tensors and offsets."""
    from safetensors.torch import save

    data = save(dict(state), metadata=dict(metadata))
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + length])
    ordered = {"__metadata__": dict(sorted(header.pop("__metadata__", {}).items())), **header}
    text = json.dumps(ordered, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    if len(text) > length:  # safetensors wrote it another way than assumed: keep its bytes
        return data
    return data[:8] + text.ljust(length, b" ") + data[8 + length :]


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def save_version(
    model: nn.Module,
    *,
    task: str,
    version: str,
    labels: Sequence[str],
    kind: str,
    architecture: str,
    input_contract: InputContract | Mapping[str, Any],
    out_dir: Path | str,
    preprocessing: Mapping[str, Any] | None = None,
    thresholds: Mapping[str, float] | None = None,
    training_data_fingerprint: str = "",
    metrics: Mapping[str, Any] | None = None,
    backend: str = "auto",
    heatmaps: bool = True,
    provenance: Mapping[str, Any] | None = None,
    self_test_seed: int = 0,
    self_test_batch: int = 2,
    self_test_atol: float = DEFAULT_SELF_TEST_ATOL,
    created: datetime | None = None,
    overwrite: bool = False,
) -> Manifest:
    """Write ``out_dir/model.safetensors`` and ``out_dir/manifest.json`` for a trained ``model``.

    The weights are checked against ``architecture`` first (a fresh ``build_model`` must accept the
    state dict strictly), and the self-test probabilities are computed by that fresh copy on the CPU
    in fp32: exactly the path :func:`load_version` takes. Both files are written atomically (temporary
    file + rename); ``thresholds`` defaults to 0.5 for every label. Raises ``ValueError`` for a
    model that does not match its manifest or gives non-finite outputs, ``FileExistsError`` when
    ``out_dir`` already holds a version and ``overwrite`` is false.
    """
    out = Path(out_dir)
    contract = input_contract.as_dict() if isinstance(input_contract, InputContract) else dict(input_contract)
    labels = [str(x) for x in labels]
    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}

    fields: dict[str, Any] = {
        "task": task,
        "version": version,
        "labels": labels,
        "kind": kind,
        "architecture": architecture,
        "input_contract": contract,
        "preprocessing": dict(preprocessing or {}),
        "thresholds": {label: 0.5 for label in labels} if thresholds is None else dict(thresholds),
        "training_data_fingerprint": training_data_fingerprint,
        "metrics": dict(metrics or {}),
        "sha256": "0" * 64,  # placeholder for the validation below
        "code_version": __version__,
        "created": (created or datetime.now(UTC)).astimezone(UTC).isoformat(timespec="seconds"),
        "self_test": {
            "seed": self_test_seed,
            "batch": self_test_batch,
            "atol": self_test_atol,
            "expected_probabilities": [[0.0] * len(labels)] * self_test_batch,
        },
        "backend": backend,
        "heatmaps": heatmaps,
        "provenance": dict(provenance or {}),
    }
    try:
        draft = Manifest.from_dict(fields)  # every field checked before anything is written
    except ManifestError as exc:
        raise ValueError(f"cannot save {task}/{version}: manifest {exc}") from None

    fresh = build_model(architecture, contract["channels"], draft.num_outputs)
    problem = _state_mismatch(fresh, state)
    if problem:
        raise ValueError(f"cannot save {task}/{version}: the model's weights do not fit {architecture}: {problem}")
    fresh.load_state_dict(state, strict=True)
    probs = _run_self_test(fresh, draft.to_dict(), torch.device("cpu"))
    if not torch.isfinite(probs).all():
        raise NonFiniteOutputs(
            f"cannot save {task}/{version}: the model gives NaN or infinite outputs on the self-test"
        )

    data = safetensors_bytes(state, {"format": "pt", "task": task, "version": version, "architecture": architecture})
    fields["sha256"] = sha256_bytes(data)
    fields["self_test"]["expected_probabilities"] = probs.tolist()
    manifest = Manifest.from_dict(fields)

    make_folders(out, durable=True)
    if not overwrite and ((out / WEIGHTS_FILE).exists() or (out / MANIFEST_FILE).exists()):
        raise FileExistsError(f"{out} already holds a model version; pass overwrite=True to replace it")
    # weights first: a manifest on disk always describes the weights beside it (or fails their hash)
    write_atomically(out / WEIGHTS_FILE, data, durable=True)
    write_atomically(out / MANIFEST_FILE, manifest.to_json().encode("utf-8"), durable=True)
    return manifest


def read_manifest(folder: Path | str) -> Manifest:
    """The validated manifest of a version folder (no weights are read); raises :class:`ModelRefused`."""
    path = Path(folder) / MANIFEST_FILE
    try:
        text = _regular_file_bytes(path, MAX_MANIFEST_BYTES)
        if len(text) > MAX_MANIFEST_BYTES:
            raise ModelRefused("bad_manifest", f"{path} is over {MAX_MANIFEST_BYTES} bytes, a manifest's most")
    except FileNotFoundError:
        raise ModelRefused("missing_file", f"{path} does not exist; a model version needs {MANIFEST_FILE}") from None
    except IsADirectoryError:
        raise ModelRefused("missing_file", f"{path} is a folder, not a manifest file") from None
    except OSError as exc:
        _unless_passing(exc)
        raise ModelRefused("missing_file", f"{path} cannot be read: {exc.strerror or exc}") from None
    try:
        return Manifest.from_json(text)
    except ManifestError as exc:
        raise ModelRefused("bad_manifest", f"{path}: {exc}") from None


def _regular_file_bytes(path: Path, most: int | None = None) -> bytes:
    """The bytes of the regular file at ``path`` (a symbolic link followed), at most ``most`` + 1
    (to tell a file over ``most``). A device, a FIFO or a socket in its place is refused unread: a
    link to /dev/zero was read until memory ran out, a FIFO waited for a writer for ever."""
    with _open_regular_file(path) as file:
        return file.read() if most is None else file.read(most + 1)


def _open_regular_file(path: Path) -> BinaryIO:
    """The regular file at ``path`` open for reading (a symbolic link followed); a device, a FIFO or a
    socket in its place refused (``missing_file``) before anything is read."""
    descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)  # a FIFO's open waits without it
    try:
        mode = os.fstat(descriptor).st_mode
        if not stat.S_ISREG(mode):
            raise ModelRefused("missing_file", f"{path} is not a regular file ({_file_kind(mode)})")
        return os.fdopen(descriptor, "rb")
    except BaseException:
        os.close(descriptor)
        raise


def _file_kind(mode: int) -> str:
    kinds = ((stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"), (stat.S_ISFIFO, "a FIFO"))
    kinds += ((stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a folder"))
    return next((kind for test, kind in kinds if test(mode)), "not a file")


def load_version(folder: Path | str, device: str | torch.device = "cpu") -> LoadedModel:
    """Load and verify a model version; :class:`ModelRefused` says why it cannot be served.

    In order: the folder and its two files exist; the manifest is valid; the SHA-256 of the weights
    file's bytes equals the manifest's (before they are parsed); the bytes parse as safetensors
    (never as a pickle); the tensors are exactly the keys, shapes and dtypes of the manifest's
    architecture; the network reproduces the self-test probabilities (eval mode, fp32, on ``device``)
    within ``atol`` and they are finite.
    """
    folder = Path(folder)
    device = torch.device(device)
    if folder.is_file():
        raise ModelRefused(
            "unsupported_format",
            f"{folder} is a file; a model version is a folder with {WEIGHTS_FILE} and {MANIFEST_FILE} "
            "(a trained model file, .pt/.pth/.h5/.onnx, is converted by `medcli models import FILE --task T`)",
        )
    if not folder.is_dir():
        raise ModelRefused("missing_file", f"{folder} does not exist or is not a folder")
    weights_path = folder / WEIGHTS_FILE
    if not weights_path.exists() and not (folder / ONNX_FILE).exists():
        pickles = sorted(p.name for p in folder.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
        if pickles:
            raise ModelRefused(
                "unsupported_format",
                f"{weights_path} does not exist; {', '.join(pickles)} in {folder} is not a version: convert a "
                "state dict with `medcli models import FILE --task T` (read with torch.load(weights_only=True))",
            )
        raise ModelRefused("missing_file", f"{weights_path} does not exist; a model version needs {WEIGHTS_FILE}")
    manifest = read_manifest(folder)
    if manifest.architecture == ONNX_ARCHITECTURE or not weights_path.exists():  # the manifest says which file
        return _load_onnx_version(folder, manifest, device)
    state = read_verified_weights(folder, manifest)

    try:
        model = build_model(manifest.architecture, manifest.input_contract["channels"], manifest.num_outputs)
    except (ValueError, TypeError) as exc:
        raise ModelRefused("bad_manifest", f"{folder / MANIFEST_FILE}: cannot build the architecture: {exc}") from None
    problem = _state_mismatch(model, state)
    if problem:
        raise ModelRefused(
            "wrong_architecture",
            f"{weights_path} does not hold {manifest.architecture} weights for {manifest.input_contract['channels']} "
            f"channel(s) and {manifest.num_outputs} output(s) as {MANIFEST_FILE} says: {problem}",
        )
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ModelRefused("wrong_architecture", f"{weights_path}: {exc}") from None
    del state
    model.to(device).eval()
    check_self_test(model, manifest, weights_path, device)
    return LoadedModel(manifest=manifest, model=model, folder=folder)


def read_verified_weights(folder: Path, manifest: Manifest) -> dict[str, Tensor]:
    """The tensors of ``folder``'s weights file, once its SHA-256 is ``manifest``'s (never unpickled)."""
    weights_path = folder / WEIGHTS_FILE
    return _parse_safetensors(_verified_bytes(weights_path, manifest, folder), weights_path)


def _unless_passing(exc: OSError) -> None:
    """Raise ``exc`` itself when it is the host's passing trouble (out of file descriptors or memory):
    a load error, tried again later, not a refusal of the version until the daemon restarts."""
    if exc.errno in PASSING_ERRNOS:
        raise exc


def _verified_bytes(path: Path, manifest: Manifest, folder: Path) -> bytes:
    """The file's bytes, once their SHA-256 is the manifest's (before anything parses them). The file
    is hashed as it is read, a chunk at a time, before it is held whole: a weights file swapped for a
    3 GB one was read into memory first (4 GB of a daemon's, a MemoryError it retried for ever)."""
    data = b""
    try:
        with _open_regular_file(path) as file:
            digest = hashlib.file_digest(file, "sha256")  # a chunk at a time
            size = file.tell()
            if digest.hexdigest() == manifest.sha256:
                file.seek(0)
                data = file.read()
    except OSError as exc:
        _unless_passing(exc)
        raise ModelRefused("missing_file", f"{path} cannot be read: {exc.strerror or exc}") from None
    actual = digest.hexdigest()
    if actual == manifest.sha256:
        actual, size = sha256_bytes(data), len(data)  # what is returned: changed since it was hashed?
    if actual != manifest.sha256:
        raise ModelRefused(
            "hash_mismatch",
            f"{path} has SHA-256 {actual} ({size} bytes) but {folder / MANIFEST_FILE} says "
            f"{manifest.sha256}: the file is damaged, truncated or not the one the manifest describes",
        )
    return data


def _load_onnx_version(folder: Path, manifest: Manifest, device: torch.device) -> LoadedModel:
    """An imported ONNX graph: hash, ``onnx.checker``, ONNX Runtime session, self-test."""
    from meddaemon.engine.importers import onnx_model

    path = folder / ONNX_FILE
    if manifest.architecture != ONNX_ARCHITECTURE:
        raise ModelRefused(
            "wrong_architecture", f"{path} is an ONNX graph but {MANIFEST_FILE} says {manifest.architecture}"
        )
    if not path.exists():
        raise ModelRefused("missing_file", f"{path} does not exist; an ONNX version needs it")
    data = _verified_bytes(path, manifest, folder)
    model = onnx_model.load(data, manifest)
    check_self_test(model, manifest, path, device)
    return LoadedModel(manifest=manifest, model=model, folder=folder)


def check_self_test(model: nn.Module, manifest: Manifest, weights_path: Path, device: torch.device) -> None:
    """Refuse ``model`` (:class:`ModelRefused`) unless it reproduces the manifest's self-test probabilities."""
    got = _run_self_test(model, manifest.to_dict(), device)
    if not torch.isfinite(got).all():
        raise ModelRefused(
            "non_finite_output",
            f"{weights_path}: the network gives NaN or infinite outputs on the self-test input of {MANIFEST_FILE}",
        )
    st = manifest.self_test
    expected = torch.tensor(st["expected_probabilities"], dtype=torch.float32)
    if got.shape != expected.shape:
        raise ModelRefused(
            "self_test_failed",
            f"{weights_path}: self-test output has shape {tuple(got.shape)}, expected {tuple(expected.shape)}",
        )
    diff = float((got - expected).abs().max())
    if not diff <= st["atol"]:
        raise ModelRefused(
            "self_test_failed",
            f"{weights_path}: self-test probabilities differ from {MANIFEST_FILE} by up to {diff:.3g} "
            f"(tolerance {st['atol']:g}) on {device.type}: the weights, the architecture code or the numerics "
            "are not those the version was saved with",
        )


def _parse_safetensors(data: bytes, path: Path) -> dict[str, Tensor]:
    """Tensors from safetensors bytes; anything else (a pickle, a zip, garbage) is refused unparsed."""
    if len(data) < 8:
        raise ModelRefused("unreadable_weights", f"{path} is {len(data)} bytes: too short to be safetensors")
    (header_len,) = struct.unpack("<Q", data[:8])
    if header_len > len(data) - 8 or header_len > 100_000_000 or data[8:9] != b"{":
        raise ModelRefused(
            "unreadable_weights",
            f"{path} is not a safetensors file (no valid header; pickled .pt/.pth checkpoints are never loaded)",
        )
    from safetensors.torch import load

    try:
        state = load(data)
    except Exception as exc:  # safetensors raises its own SafetensorError and others
        raise ModelRefused("unreadable_weights", f"{path} is not a valid safetensors file: {exc}") from None
    return state


def _state_mismatch(model: nn.Module, state: Mapping[str, Tensor]) -> str:
    """'' when ``state`` has exactly the model's keys, shapes and dtypes; else what differs."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    problems: list[str] = []
    if missing:
        problems.append(f"{len(missing)} missing key(s) {_some(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s) {_some(unexpected)}")
    shapes = [
        f"{k} {tuple(state[k].shape)} != {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    if shapes:
        problems.append(f"{len(shapes)} shape mismatch(es): {_some(shapes)}")
    dtypes = [
        f"{k} {state[k].dtype} != {v.dtype}"
        for k, v in expected.items()
        if k in state and state[k].shape == v.shape and state[k].dtype != v.dtype
    ]
    if dtypes:
        problems.append(f"{len(dtypes)} dtype mismatch(es): {_some(dtypes)}")
    return "; ".join(problems)


def _some(items: Sequence[str], n: int = 3) -> str:
    return ", ".join(items[:n]) + (", ..." if len(items) > n else "")


# --------------------------------------------------------------------------------------------
# the database side


def version_dir(registry_root: Path | str, task: str, version: str) -> Path:
    return Path(registry_root) / task / version


def get_version(session: Session, task: str, version: str, *, for_update: bool = False) -> ModelVersion:
    query = select(ModelVersion).where(ModelVersion.task_name == task, ModelVersion.version == version)
    if for_update:  # lock the row and read it afresh (another transaction may have changed it)
        query = query.with_for_update().execution_options(populate_existing=True)
    row = session.scalars(query).one_or_none()
    if row is None:
        raise RegistryError("unknown_version", f"no model version {task}/{version} is registered")
    return row


def import_version(
    session: Session,
    source_folder: Path | str,
    registry_root: Path | str,
    tasks: Mapping[str, TaskSpec] | None = None,
    *,
    state_dir: Path | None = None,
) -> ModelVersion:
    """Verify a version folder and register a copy of it as ``registry_root/<task>/<version>/``.

    With ``state_dir`` (the daemon's, which holds the registry) the row names the copy relative to it,
    as the database names every file under it (``meddaemon.stored_paths``), so a state directory
    mounted elsewhere still finds it (``model_folder``); without, absolutely.

    The source is verified by :func:`load_version` first: a refused model raises :class:`ModelRefused`
    and nothing is copied or registered. With ``tasks`` (e.g. ``Settings.task_specs``) the manifest's
    task must be one of them (``unknown_task``); a known task's labels and kind must be the manifest's
    (``task_mismatch``; without ``tasks`` this is checked for the built-in tasks only). A version
    already registered for the task raises :class:`RegistryError` ``duplicate_version``. Only
    the weights, ``manifest.json`` and, when there, the model card with the figures it links
    (``engine/card.py``) are copied (to a staging folder, hash-checked, then renamed into place);
    nothing else of the folder. The Task row is created if needed; the new row is ``registered`` and
    flushed, and the caller commits. A folder left by an import of the same version whose transaction did
    not commit is replaced; any other (another database's version) is refused.
    """
    source = Path(source_folder)
    loaded = load_version(source)
    manifest = loaded.manifest
    del loaded
    specs = BUILTIN_TASKS if tasks is None else tasks
    spec = specs.get(manifest.task)
    if spec is None and tasks is not None:
        raise ModelRefused(
            "unknown_task",
            f"{source / MANIFEST_FILE} is for task {manifest.task!r}, which is not configured; "
            f"known tasks: {sorted(tasks)} (custom tasks go in [tasks.NAME] of the config)",
        )
    if spec is not None:
        check_task_matches(spec, manifest.labels, manifest.kind, str(source / MANIFEST_FILE))

    insert_missing(session, Task, [{"name": manifest.task, "description": spec.description if spec else ""}])
    session.get(Task, manifest.task, with_for_update=True)  # one import of a task at a time
    existing = session.scalars(
        select(ModelVersion).where(ModelVersion.task_name == manifest.task, ModelVersion.version == manifest.version)
    ).one_or_none()
    if existing is not None:
        raise RegistryError(
            "duplicate_version",
            f"{manifest.task}/{manifest.version} is already registered ({existing.status}, sha256 "
            f"{existing.sha256[:12]})",
        )

    unresolved = version_dir(registry_root, manifest.task, manifest.version)  # under state_dir as given
    target = unresolved.resolve()
    _refuse_another_model_there(target, manifest)
    try:
        _copy_into_registry(source, target, manifest)
    except OSError as exc:  # a full disk, a registry folder this user cannot write
        raise RegistryError(
            "io_error", f"cannot copy {source} into the registry at {target}: {exc.strerror or exc}"
        ) from exc
    row = ModelVersion(
        task_name=manifest.task,
        version=manifest.version,
        architecture=manifest.architecture,
        sha256=manifest.sha256,
        path=str(target) if state_dir is None else stored_name(unresolved, state_dir),
        status="registered",
        manifest=manifest.to_dict(),
        created_at=utcnow(),
    )
    session.add(row)
    session.flush()
    log.info(
        "registered model %s/%s (%s, sha256 %s)",
        manifest.task, manifest.version, manifest.architecture, manifest.sha256[:12],
    )  # fmt: skip
    return row


def _refuse_another_model_there(target: Path, manifest: Manifest) -> None:
    """A version folder no row of this database has is replaced only where it holds this very version
    (its manifest equal: an import of it whose transaction did not commit). Any other is another
    database's version in the same state directory (a staging database, a SQLite file beside
    PostgreSQL; a manifest a newer meddaemon wrote), served by its daemons: it was deleted, and their
    model refused."""
    if not target.exists():
        return
    try:
        same = read_manifest(target) == manifest
    except ModelRefused:
        same = False
    if not same:
        raise RegistryError(
            "duplicate_version",
            f"{target} holds another version this database has not registered: another database with the same "
            "state directory may serve it; nothing was replaced (remove the folder if none does)",
        )


def _copy_into_registry(source: Path, target: Path, manifest: Manifest) -> None:
    make_folders(target.parent, durable=True)
    remove_stale_temporaries(target.parent, recursive=False)  # copies of imports killed before their rename
    staging = temporary_path(target)
    staging.mkdir()
    try:
        for name in (manifest.weights_file, MANIFEST_FILE, *card_files(source)):
            shutil.copyfile(source / name, staging / name)
            with open(staging / name, "rb") as f:
                os.fsync(f.fileno())
        copied = file_sha256(staging / manifest.weights_file)  # a file swapped for a huge one: never held whole
        if copied != manifest.sha256:
            raise ModelRefused(
                "hash_mismatch",
                f"{source / manifest.weights_file} changed while it was imported (sha256 now {copied})",
            )
        copied_manifest = read_manifest(staging)
        if copied_manifest != manifest:
            raise ModelRefused("bad_manifest", f"{source / MANIFEST_FILE} changed while it was imported")
        if target.exists():  # left by an import of it that never committed (``_refuse_another_model_there``)
            log.warning("replacing %s, left by an import that did not commit", target)
            shutil.rmtree(target)
        os.rename(staging, target)
        fsync_dir(target.parent)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


@dataclass(frozen=True)
class Registered:
    """What the database registered for a version: its folder must still hold exactly that."""

    sha256: str
    #: the manifest as imported (``ModelVersion.manifest``); empty in rows older than it
    manifest: Mapping[str, Any]
    #: the ONNX graphs exported from it and kept in its folder: name -> SHA-256 (``model_graphs``)
    graphs: Mapping[str, str] = field(default_factory=dict, compare=False)

    @classmethod
    def of(cls, row: ModelVersion) -> Registered:
        return cls(row.sha256, dict(row.manifest or {}))


def kept_graphs(session: Session, version_id: int) -> dict[str, str]:
    """The SHA-256 of each ONNX graph kept with a version, by name, as recorded when it was exported."""
    rows = session.execute(select(ModelGraph.name, ModelGraph.sha256).where(ModelGraph.model_version_id == version_id))
    return {name: sha256 for name, sha256 in rows}


def graph_recorder(sessions: sessionmaker[Session], version_id: int) -> Callable[[str, str], None]:
    """What records a graph just exported from a version (``GraphCache.put``): its name and SHA-256,
    replacing a record a graph of that name had (one exported again because it no longer matched)."""

    def record(name: str, sha256: str) -> None:
        def write() -> None:
            with transaction(sessions) as session:
                session.merge(ModelGraph(model_version_id=version_id, name=name, sha256=sha256, created_at=utcnow()))

        # two daemons recording the same graph at once: the second sees the first's row; one frozen
        # while recording it is not waited for past the lock timeout (the graph is exported again next time)
        with_unique_retry(lambda: with_lock_retry(write, retry_lock_timeouts=False))

    return record


def check_registered(manifest: Manifest, folder: Path, registered: Registered) -> None:
    """Refuse a version folder that no longer holds what was registered: other weights
    (``hash_mismatch``), or a manifest edited since (``bad_manifest``). The daemon calls with the
    folder's thresholds, and results store the registered ones: a threshold edited by hand gave
    rows and reports calling 0.51 negative at a threshold of 0.50."""
    name = f"{registered.manifest.get('task', manifest.task)}/{registered.manifest.get('version', manifest.version)}"
    if manifest.sha256 != registered.sha256:
        raise ModelRefused(
            "hash_mismatch",
            f"{folder / MANIFEST_FILE} now describes sha256 {manifest.sha256}, but {name} was registered with "
            f"{registered.sha256}",
        )
    try:
        then = Manifest.from_dict(registered.manifest)
    except ManifestError:
        return  # no manifest kept in the row: its hash is all there is to check
    if then != manifest:
        now, before = manifest.to_dict(), then.to_dict()
        changed = sorted(key for key in now if now[key] != before.get(key))
        raise ModelRefused(
            "bad_manifest",
            f"{folder / MANIFEST_FILE} was edited since {name} was registered ({', '.join(changed)} differ): "
            "restore it, or import the changed model as a new version",
        )


def model_folder(row: ModelVersion, state_dir: Path | None) -> Path:
    """The registered copy's folder: a path stored relative to the state directory is under
    ``state_dir`` (a row registered without one is absolute)."""
    if state_dir is None and not Path(row.path).is_absolute():
        raise ValueError(f"{row.task_name}/{row.version} is stored under the state directory: give state_dir")
    return stored_file(row.path, state_dir) if state_dir is not None else Path(row.path)


def lock_task(session: Session, task: str) -> None:
    """Hold ``task``'s row until the transaction ends: promotions of its versions wait for it."""
    session.get(Task, task, with_for_update=True)


def check_task_matches(spec: TaskSpec, labels: Sequence[str], kind: str, where: str) -> None:
    """Refuse (``task_mismatch``) a version whose labels or kind are not its task's as configured
    now: at import, and again at promotion and load, since a task's labels can change in the config
    after its versions were imported (results stored under labels the task no longer has)."""
    if list(spec.labels) != list(labels) or spec.kind != kind:
        raise ModelRefused(
            "task_mismatch",
            f"{where} has {kind} labels {list(labels)} but task {spec.name!r} "
            f"is {spec.kind} with labels {list(spec.labels)} (same labels in the same order are needed)",
        )


def verify_registered_copy(
    sessions: sessionmaker[Session],
    task: str,
    version: str,
    state_dir: Path | None = None,
    tasks: Mapping[str, TaskSpec] | None = None,
) -> Registered:
    """Load and self-test the registered copy of ``task/version`` (:class:`ModelRefused` if it was
    damaged since the import, or no longer fits its task in ``tasks``, the configured ones),
    outside any transaction: verified inside the promotion's, it held SQLite's write lock (the
    task's row on PostgreSQL) for the seconds a DenseNet's self-test takes, and every other writer
    waited, past its busy timeout. What it returns goes to :func:`promote`."""
    with sessions() as session:
        row = get_version(session, task, version)
        if row.status == "retired":
            raise RegistryError(
                "retired", f"{task}/{version} is retired and cannot be promoted; import it as a new version"
            )
        registered, folder = Registered.of(row), model_folder(row, state_dir)
    loaded = load_version(folder)
    check_registered(loaded.manifest, folder, registered)
    if tasks is not None and (spec := tasks.get(task)) is not None:
        check_task_matches(spec, loaded.manifest.labels, loaded.manifest.kind, f"{task}/{version}")
    return registered


def promote(session: Session, task: str, version: str, *, verified: Registered | None = None) -> ModelVersion:
    """Make ``task/version`` the one active version of its task and record ``promoted_at``.

    The previously active version of the task goes back to ``registered`` (not ``retired``): it can
    be promoted again to roll back. ``verified``: what :func:`verify_registered_copy` found, before
    this transaction; None promotes unverified (an import in this same transaction verified it).
    Promoting the active version again renews ``promoted_at`` and clears a daemon's refusal of it
    (``refusal``), nothing else: the daemons that refused it, even while its load was in flight,
    try it again (``daemon.inference``). A retired version cannot be promoted (:class:`RegistryError` ``retired``). The
    task's row is locked for the update, so concurrent promotions cannot leave two active.
    """
    lock_task(session, task)
    row = get_version(session, task, version, for_update=True)
    if row.status == "retired":
        raise RegistryError(
            "retired", f"{task}/{version} is retired and cannot be promoted; import it as a new version"
        )
    if verified is not None and Registered.of(row) != verified:
        raise RegistryError("changed", f"{task}/{version} was registered again while it was verified; try again")
    if row.status == "active":
        refused = row.refusal is not None
        row.promoted_at, row.refusal, row.refused_at = utcnow(), None, None
        if refused:
            log.info("model %s/%s promoted again: its refusal cleared, daemons try it again", task, version)
        return row
    now = utcnow()
    previous = session.scalars(
        select(ModelVersion)
        .where(ModelVersion.task_name == task, ModelVersion.status == "active", ModelVersion.id != row.id)
        .with_for_update()
        .execution_options(populate_existing=True)
    ).all()
    for other in previous:
        other.status = "registered"
        log.info("model %s/%s is no longer active (back to registered)", task, other.version)
    session.flush()  # the old active row is demoted before the new one is marked
    row.status, row.promoted_at, row.refusal, row.refused_at = "active", now, None, None
    session.flush()
    log.info("model %s/%s promoted (active)", task, version)
    return row


def record_refusal(session: Session, version_id: int, promoted_at: datetime | None, refusal: str) -> bool:
    """Record that a daemon refused to serve this version (``reason: message``), unless it was
    promoted since the daemon read it (``promoted_at``: a promotion clears refusals); whether it
    was recorded."""
    row = session.get(ModelVersion, version_id, with_for_update=True)
    if row is None or row.promoted_at != promoted_at:
        return False
    row.refusal, row.refused_at = refusal, utcnow()
    return True


def clear_refusal(session: Session, version_id: int) -> None:
    """A daemon serves the version a refusal was recorded on (its files mended, another daemon's
    copy fine): the refusal no longer holds."""
    row = session.get(ModelVersion, version_id, with_for_update=True)
    if row is not None:
        row.refusal, row.refused_at = None, None


def retire(session: Session, task: str, version: str) -> ModelVersion:
    """Take ``task/version`` out of service for good (``retired``, ``retired_at`` recorded).

    Retiring the active version leaves the task without one (its scans wait for a model). Retiring
    a retired version changes nothing. The files stay in the registry (results refer to them).
    """
    session.get(Task, task, with_for_update=True)
    row = get_version(session, task, version, for_update=True)
    if row.status == "retired":
        return row
    if row.status == "active":
        log.warning("retiring %s/%s, the active version: task %s has no active model now", task, version, task)
    row.status, row.retired_at = "retired", utcnow()
    session.flush()
    return row


def active_versions(session: Session) -> dict[str, ModelVersion]:
    """The active version of each task that has one."""
    rows = session.scalars(select(ModelVersion).where(ModelVersion.status == "active").order_by(ModelVersion.id))
    return {row.task_name: row for row in rows}


def list_versions(session: Session, task: str | None = None) -> list[ModelVersion]:
    """Every registered version (of ``task``), by task then registration order."""
    query = select(ModelVersion).order_by(ModelVersion.task_name, ModelVersion.id)
    if task is not None:
        query = query.where(ModelVersion.task_name == task)
    return list(session.scalars(query))


def version_summary(row: ModelVersion, state_dir: Path | None = None) -> dict[str, Any]:
    """A row as plain data (for ``--json``), its folder absolute."""
    return {
        "id": row.id,
        "task": row.task_name,
        "version": row.version,
        "status": row.status,
        "architecture": row.architecture,
        "sha256": row.sha256,
        "path": str(model_folder(row, state_dir)),
        "created_at": row.created_at,
        "promoted_at": row.promoted_at,
        "retired_at": row.retired_at,
        "refusal": row.refusal,
        "refused_at": row.refused_at,
    }
