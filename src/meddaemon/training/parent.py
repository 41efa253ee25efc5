"""Retraining from a registered version (``medcli retrain TASK --from VERSION``).

The new version starts from the parent's weights, read the way the daemon reads them
(:func:`~meddaemon.engine.registry.load_version`: the SHA-256 checked before the bytes are parsed,
safetensors only, a strict load, the self-test), and keeps the parent's architecture and input
contract (size, channels, mean and std, resize-then-crop, per-image normalisation), so an imported
seed model is fine-tuned on the preprocessing it was trained with. The new manifest's provenance
names the parent (task, version, SHA-256) and keeps the parent's own provenance, so a chain of
versions leads back to the file that was imported.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session
from torch import Tensor

from meddaemon.db.models import ModelVersion
from meddaemon.engine.registry import (
    ONNX_ARCHITECTURE,
    Registered,
    RegistryError,
    check_registered,
    load_version,
    model_folder,
)
from meddaemon.engine.tasks import InputContract, TaskSpec
from meddaemon.training.train import TrainConfig


class ParentRefused(RegistryError):
    """``--from`` names no version retraining can start from: ``unknown_version``, ``other_task``,
    ``wrong_architecture`` or ``contract_conflict`` (a usage error; a parent whose files fail
    verification raises :class:`~meddaemon.engine.registry.ModelRefused` instead)."""


@dataclass(frozen=True)
class ParentVersion:
    """A registered version's verified weights and what training from them keeps."""

    task: str
    version: str
    sha256: str
    architecture: str
    contract: InputContract
    weights: dict[str, Tensor]
    #: the parent's own provenance (for an imported version: the file it came from)
    provenance: dict[str, Any]

    @property
    def name(self) -> str:
        return f"{self.task}/{self.version}"

    @property
    def reference(self) -> str:
        """Names the parent and its weights: a checkpoint made from other weights is not resumed."""
        return f"{self.name}@sha256:{self.sha256}"

    def record(self) -> dict[str, Any]:
        """The new manifest's ``provenance.parent``."""
        record: dict[str, Any] = {
            "task": self.task,
            "version": self.version,
            "sha256": self.sha256,
            "architecture": self.architecture,
        }
        if self.provenance:
            record["provenance"] = self.provenance
        return record

    def apply(self, config: TrainConfig) -> TrainConfig:
        """``config`` training the parent's architecture on the parent's input contract."""
        return replace(
            config,
            architecture=self.architecture,
            image_size=None,
            input_contract=self.contract,
            parent=self.reference,
        )


def resolve_parent(
    session: Session,
    spec: TaskSpec,
    reference: str,
    *,
    architecture: str | None = None,
    image_size: int | None = None,
    state_dir: Path | None = None,
) -> ParentVersion:
    """The version ``reference`` (``VERSION`` or ``TASK/VERSION``) of ``spec``'s task, verified and read.

    Refused (:class:`ParentRefused`) when no such version is registered, when it is a version of
    another task, when it is an ONNX graph (no weights to train) or ``architecture`` is not its
    architecture, and when ``image_size`` is not its input size.
    """
    task, _, version = reference.rpartition("/")
    row = _registered(session, spec, task or spec.name, version)
    if row.architecture == ONNX_ARCHITECTURE:
        raise ParentRefused(
            "wrong_architecture",
            f"{spec.name}/{version} is an imported ONNX graph, which has no PyTorch weights to train; import "
            "the model's state dict (`medcli models import FILE --task T --arch A`) and retrain from that version",
        )
    if architecture is not None and architecture != row.architecture:
        raise ParentRefused(
            "wrong_architecture",
            f"--arch {architecture} does not match {spec.name}/{version}, a {row.architecture}: training from "
            f"it keeps its architecture (leave out --arch)",
        )
    folder = model_folder(row, state_dir)
    loaded = load_version(folder)
    manifest = loaded.manifest
    check_registered(manifest, folder, Registered.of(row))
    contract = manifest.contract
    if image_size is not None and (image_size, image_size) != (contract.height, contract.width):
        raise ParentRefused(
            "contract_conflict",
            f"--image-size {image_size} does not match the input contract of {spec.name}/{version} "
            f"({contract.height}x{contract.width}): training from it keeps its contract (leave out --image-size)",
        )
    weights = {k: v.detach().to("cpu").clone() for k, v in loaded.model.state_dict().items()}
    return ParentVersion(
        task=spec.name,
        version=version,
        sha256=row.sha256,
        architecture=row.architecture,
        contract=contract,
        weights=weights,
        provenance=dict(manifest.provenance),
    )


def _registered(session: Session, spec: TaskSpec, task: str, version: str) -> ModelVersion:
    why = f"retraining {spec.name} starts from a version of {spec.name} (its labels and head are {spec.name}'s)"
    if task != spec.name:
        raise ParentRefused("other_task", f"--from {task}/{version} names task {task}: {why}")
    rows = session.scalars(select(ModelVersion).where(ModelVersion.version == version)).all()
    mine = [r for r in rows if r.task_name == spec.name]
    if mine:
        return mine[0]
    if rows:
        others = ", ".join(sorted(f"{r.task_name}/{version}" for r in rows))
        raise ParentRefused("other_task", f"{version} is a version of another task ({others}): {why}")
    known = session.scalars(
        select(ModelVersion.version).where(ModelVersion.task_name == spec.name).order_by(ModelVersion.id)
    ).all()
    raise ParentRefused(
        "unknown_version",
        f"no version {version!r} of task {spec.name} is registered; its versions: "
        f"{', '.join(known) if known else 'none'} (`medcli models list --task {spec.name}`)",
    )
