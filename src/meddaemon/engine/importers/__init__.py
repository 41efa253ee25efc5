"""Bringing trained models in: a foreign file converted into a meddaemon version (DESIGN.md section 13).

One module per format: :mod:`.torch_checkpoint` (``torch.save`` and safetensors state dicts),
:mod:`.keras_h5` (Keras DenseNet-121 weights, read with h5py), :mod:`.onnx_model` (ONNX graphs, served with
ONNX Runtime). :func:`convert_file` writes a version folder (weights + manifest with the input
contract, thresholds and provenance); :func:`import_file` then verifies and registers it exactly as
:func:`~meddaemon.engine.registry.import_version` does for a folder (hash, strict load, self-test).
Every refusal is a :class:`~meddaemon.engine.registry.ModelRefused` with a named reason, and nothing
is registered.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path

from sqlalchemy.orm import Session

from meddaemon.db.models import ModelVersion
from meddaemon.engine.importers.base import (
    FORMATS,
    ImportOptions,
    Source,
    architecture_for,
    check_options,
    check_unchanged,
    contract_for,
    read_source,
    write_converted,
)
from meddaemon.engine.registry import Manifest, ModelRefused, import_version
from meddaemon.engine.tasks import BUILTIN_TASKS, TaskSpec

__all__ = ["FORMATS", "ImportOptions", "convert_file", "import_file"]


def convert_file(
    path: Path | str, options: ImportOptions, out_dir: Path | str, tasks: Mapping[str, TaskSpec] | None = None
) -> Manifest:
    """Convert the model file at ``path`` into a version folder ``out_dir`` for ``options.task``."""
    specs = BUILTIN_TASKS if tasks is None else tasks
    spec = specs.get(options.task)
    if spec is None:
        raise ModelRefused("unknown_task", f"task {options.task!r} is not configured; known tasks: {sorted(specs)}")
    check_options(options, spec)
    source = read_source(Path(path), options.format)
    if options.cam_tensor and source.format != "onnx":  # it was ignored, without a word
        why = f"--cam-tensor names a tensor of an ONNX graph; {source.path.name} is {source.format}"
        raise ModelRefused("bad_option", why)
    out = Path(out_dir)
    existed = out.exists()
    try:
        manifest = _convert(source, spec, options, out)
        check_unchanged(source)
        return manifest
    except Exception as exc:
        if not existed:  # nothing half-made, nor made from other bytes, is left behind
            shutil.rmtree(out, ignore_errors=True)
        if isinstance(exc, ModelRefused):
            raise
        # what a foreign file holds that no check foresaw: refused by name, not a traceback
        reason = "unsupported_onnx" if source.format == "onnx" else "unreadable_weights"
        why = " ".join(str(exc).split())[:300]
        raise ModelRefused(reason, f"{source.path.name} could not be converted ({type(exc).__name__}: {why})") from None


def _convert(source: Source, spec: TaskSpec, options: ImportOptions, out: Path) -> Manifest:
    if source.format == "onnx":
        from meddaemon.engine.importers import onnx_model

        return onnx_model.convert(source, spec, options, out)
    if source.format == "keras-h5":
        options = keras_defaults(options)
    contract = contract_for(spec, options)
    if source.format == "keras-h5":
        from meddaemon.engine.importers import keras_h5

        converted = keras_h5.convert(source.path, architecture_for(spec, options), spec.kind, contract, spec.name)
    else:
        from meddaemon.engine.importers import torch_checkpoint

        converted = torch_checkpoint.convert(
            source.path, architecture_for(spec, options), contract.channels, spec.num_outputs, source.format
        )
    return write_converted(converted, source, spec, options, out)


def keras_defaults(options: ImportOptions) -> ImportOptions:
    """Keras DenseNet-121 takes RGB, and the course that trained seed 003 normalised each image by its
    own mean and std: the contract's defaults for a Keras file (flags still override them)."""
    return replace(
        options,
        channels=options.channels or 3,
        per_image_normalisation=True if options.per_image_normalisation is None else options.per_image_normalisation,
    )


def import_file(
    session: Session,
    path: Path | str,
    options: ImportOptions,
    registry_root: Path | str,
    tasks: Mapping[str, TaskSpec] | None = None,
    *,
    state_dir: Path | None = None,
) -> ModelVersion:
    """Convert ``path`` in a scratch folder, then verify and register it as a folder import does."""
    scratch = Path(tempfile.mkdtemp(prefix="meddaemon-import-"))
    try:
        folder = scratch / "version"
        convert_file(path, options, folder, tasks)
        return import_version(session, folder, registry_root, tasks=tasks, state_dir=state_dir)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
