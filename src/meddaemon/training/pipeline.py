"""``medcli retrain`` end to end: read the dataset as published, split it without leaks, train,
choose thresholds on validation, score the test set, write a model version (weights, manifest,
the split it was trained on, a model card) and register it.

A run works in ``workdir`` (checkpoints, so ``--resume`` finds them); the version is written to
``workdir/versions/<version>/`` and then copied into the registry by ``import_version``.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from sqlalchemy import select
from sqlalchemy.orm import Session

from meddaemon.db.models import ModelVersion
from meddaemon.engine.card import CARD_FILE
from meddaemon.engine.registry import Manifest, save_version
from meddaemon.engine.tasks import InputContract, TaskSpec
from meddaemon.files import file_sha256
from meddaemon.names import shown_name
from meddaemon.training.datasets import DatasetError, DatasetIndex, detect_layout
from meddaemon.training.evaluate import choose_thresholds, flags_for, score_test_set
from meddaemon.training.figures import GRID_IMAGES, write_figures
from meddaemon.training.images import left_out_name
from meddaemon.training.nearduplicates import HashProgress
from meddaemon.training.parent import ParentVersion
from meddaemon.training.splits import (
    SPLIT_FILE,
    DatasetSplit,
    SplitConfig,
    load_hashed_dataset,
    load_split,
    make_split,
    save_split,
)
from meddaemon.training.train import (
    UNTOUCHED_UNTIL_THE_END,
    ScanDataset,
    TrainConfig,
    TrainResult,
    evaluate,
    make_loader,
    make_loss,
    resumable_checkpoint,
    train,
)

MODEL_CARD = CARD_FILE


@dataclass
class RetrainOutcome:
    version_dir: Path
    manifest: Manifest
    metrics: dict[str, Any]
    flags: list[str]
    result: TrainResult
    split: DatasetSplit
    index: DatasetIndex
    #: figure file (beside the card) -> caption
    figures: dict[str, str] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        return {
            "task": self.manifest.task,
            "version": self.manifest.version,
            "folder": str(self.version_dir),
            "architecture": self.manifest.architecture,
            "input_contract": self.manifest.input_contract,
            "thresholds": self.manifest.thresholds,
            "metrics": self.metrics,
            "flags": self.flags,
            "training_data_fingerprint": self.manifest.training_data_fingerprint,
            "parent": self.manifest.provenance.get("parent"),
        }


def default_version() -> str:
    return datetime.now(UTC).strftime("r%Y%m%d-%H%M%S")


#: the file a run locks in its work folder for as long as it runs
WORKDIR_LOCK = ".retrain.lock"


class WorkdirRefused(Exception):
    """A folder a run cannot work in."""


class WorkdirBusy(WorkdirRefused):
    """Another run works in the same folder."""


@contextmanager
def one_run_in(workdir: Path, dataset: Path | None = None) -> Iterator[None]:
    """Hold ``workdir`` for this run alone (an exclusive ``flock``, released with the process however it
    ends); ``WorkdirBusy`` when another run holds it. Two runs of a task in its default folder wrote
    one ``split.json`` and one checkpoint: each read the other's back, and a version was registered
    with the other run's seed, split and training-data fingerprint. A ``workdir`` where the dataset's
    layout would read it is refused (``WorkdirRefused``) before it is made: made there, it was read as
    a folder of the dataset."""
    if dataset is not None and _read_as_part_of(dataset, workdir):
        raise WorkdirRefused(
            f"--out {shown_name(workdir)} is inside the dataset {shown_name(dataset)}: its files would be read "
            "as the dataset's; give a folder outside it"
        )
    workdir.mkdir(parents=True, exist_ok=True)
    with open(workdir / WORKDIR_LOCK, "a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            holder = lock.read().strip()
            raise WorkdirBusy(
                f"another medcli retrain{f' (process {holder})' if holder.isdigit() else ''} is working in "
                f"{shown_name(workdir)}; wait for it to end, or give this one its own --out"
            ) from None
        lock.truncate(0)
        lock.write(f"{os.getpid()}\n")
        lock.flush()
        yield


#: layouts whose images a table names, none read for lying in a folder (COVID's is read from its
#: optional ``normal/`` folder too: a run's figures made there were read as normal X-rays)
TABLE_ONLY_LAYOUTS = frozenset({"nih-chestxray14", "manifest"})


def _read_as_part_of(dataset: Path, workdir: Path) -> bool:
    """Whether ``workdir`` lies where ``dataset``'s layout may read images: inside it, not in a hidden
    folder (``.state/``), which no layout reads, nor in a dataset only a table lists (NIH's)."""
    try:
        inside = workdir.resolve().relative_to(dataset.resolve())
        hidden = bool(inside.parts) and left_out_name(inside.parts[0])
        return not hidden and detect_layout(dataset) not in TABLE_ONLY_LAYOUTS
    except (ValueError, DatasetError):  # not inside; a dataset its reading refuses, later, for what it is
        return False


def check_resumable(workdir: Path, config: TrainConfig, parent: ParentVersion | None = None) -> None:
    """``--resume`` refused before the dataset is read, where its checkpoint cannot be resumed by
    ``config`` (``--from`` ``parent``'s architecture and contract applied, as :func:`retrain` does):
    none there, a torn one, one of other settings (``FileNotFoundError``, ``ValueError``)."""
    resumable_checkpoint(workdir, config if parent is None else parent.apply(config))


def version_folder(workdir: Path, version: str) -> Path:
    """Where :func:`retrain` writes version ``version`` before it is registered."""
    return workdir / "versions" / version


def partial_folder(version_dir: Path) -> Path:
    """Where a version is written until it is whole (weights, manifest, split, figures, card), then
    renamed to ``version_dir``: a run interrupted while writing it left a half version under the
    final name, which the ``--resume`` it printed then refused as a version already there."""
    return version_dir.with_name(f".{version_dir.name}.partial")


def version_name_taken(session: Session, task: str, version: str, workdir: Path) -> str | None:
    """Why ``version`` cannot be the name of a new version of ``task`` trained in ``workdir``, or None.

    Asked before training starts: either clash would otherwise end a whole training run in an error."""
    if session.scalar(select(ModelVersion.id).where(ModelVersion.task_name == task, ModelVersion.version == version)):
        return f"version {version!r} of {task} is already registered"
    folder = version_folder(workdir, version)
    if folder.exists():
        return f"{folder} already holds a version named {version!r}"
    return None


@dataclass(frozen=True)
class SplitData:
    """A dataset as read for training and the split it is trained on."""

    index: DatasetIndex
    split: DatasetSplit


def split_dataset(
    spec: TaskSpec,
    data: Path,
    seed: int,
    *,
    workers: int = 1,
    progress: HashProgress | None = None,
    contract: InputContract | None = None,
) -> SplitData:
    """The dataset at ``data`` and its split, as ``medcli dataset inspect`` shows them: each image
    decoded once, in up to ``workers`` processes, to skip the unreadable ones and those the input
    ``contract`` trained on (by default the task's) refuses, and to pHash the rest for near-duplicates."""
    loaded = load_hashed_dataset(data, spec, workers=workers, progress=progress, contract=contract)
    return SplitData(loaded.index, make_split(loaded.index, SplitConfig(spec.recipe.split, seed), loaded.hashes))


def retrain(
    spec: TaskSpec,
    data: Path,
    config: TrainConfig,
    workdir: Path,
    *,
    version: str | None = None,
    resume: bool = False,
    show_progress: bool = False,
    split_data: SplitData | None = None,
    log: Callable[[str], None] = lambda _line: None,
    warn: Callable[[str], None] = lambda _warning: None,
    parent: ParentVersion | None = None,
) -> RetrainOutcome:
    """Train a model for ``spec`` on the dataset at ``data`` and write it as a version folder.

    With ``parent`` (``--from``) training starts from its weights, on its architecture and input
    contract, and the new manifest's provenance names it.

    ``split_data`` is the dataset already read and split (by :func:`split_dataset` with
    ``config.seed``); without it the images are decoded here, one process. Every warning of the
    dataset (a mask without its image, masks/ folders left out) and of the split report (a label
    missing from a side, a group too large, too many images dropped) goes to ``warn`` before
    training starts. Raises :class:`DatasetError` for a dataset that cannot be
    trained on (no split side may be empty).
    """
    if parent is not None:
        config = parent.apply(config)
    split_data = split_data or split_dataset(spec, data, config.seed, contract=config.contract(spec))
    index, split = split_data.index, split_data.split
    if split.config.seed != config.seed:
        raise ValueError(f"the split was made with seed {split.config.seed}, the training uses {config.seed}")
    report_lines = split.report.lines()
    log(f"{index.layout} dataset: {len(index.samples)} images; {report_lines[0]}")
    log(next(line for line in report_lines if line.startswith("dropped: ")))
    for warning in [*index.warnings, *split.report.warnings]:  # the dataset's own (masks left out...) first
        warn(warning)
    train_samples, val_samples, test_samples = (split.samples(index, side) for side in ("train", "val", "test"))
    for side, samples in (("train", train_samples), ("validation", val_samples), ("test", test_samples)):
        if not samples:
            raise DatasetError(data, f"the {side} split is empty ({len(index.samples)} images)", "more images")
    workdir.mkdir(parents=True, exist_ok=True)
    if resume and (workdir / SPLIT_FILE).is_file():
        saved = load_split(workdir)  # (another --seed is refused with the checkpoint: ``resumable_checkpoint``)
        if _changed_since(saved, split):
            raise ValueError(f"the dataset or its split changed since the checkpoint in {workdir}; cannot resume")
    split_path = save_split(split, workdir / SPLIT_FILE)
    log(f"split report (what was merged and dropped, and why): {split_path}")

    result = train(
        spec, train_samples, val_samples, config, workdir, resume=resume, show_progress=show_progress, log=log,
        initial_weights=None if parent is None else parent.weights,
    )  # fmt: skip

    check_unchanged(data, index, split)
    val = result.validation
    thresholds = choose_thresholds(spec.kind, spec.labels, val.probabilities, val.truth)
    test_set = ScanDataset(test_samples, spec.labels, spec.kind, result.contract)
    loss_fn = make_loss(spec.kind, test_set.targets, len(spec.labels), False)
    device = torch.device(config.device)
    test = evaluate(result.model, loss_fn, make_loader(test_set, config, shuffle=False), device, spec.kind)
    test_metrics = score_test_set(spec.kind, spec.labels, test.probabilities, test.truth, thresholds)
    flags = flags_for(spec.kind, spec.labels, val.probabilities, val.truth, thresholds, test_metrics)
    metrics = {
        "test": test_metrics,
        "validation": {"roc_auc": _none_if_nan(val.auc), "loss": val.loss, "n": len(val_samples)},
        "best_epoch": result.best_epoch,
        "epochs_run": result.epochs_run,
        "stopped_early": result.stopped_early,
        "split_counts": split.report.counts,
        "flags": flags,
        "synthetic": _is_synthetic(index.root),
    }

    version = version or default_version()
    out = version_folder(workdir, version)
    staging = partial_folder(out)
    if staging.exists():  # a run interrupted before its version was whole
        shutil.rmtree(staging)
    manifest = save_version(
        result.model.to("cpu"),
        task=spec.name,
        version=version,
        labels=spec.labels,
        kind=spec.kind,
        architecture=config.architecture,
        input_contract=result.contract,
        out_dir=staging,
        preprocessing={"function": "meddaemon.engine.preprocess.to_model_input", "training": config.as_dict()},
        thresholds=thresholds,
        training_data_fingerprint=fingerprint(split_path, index, split.digests),
        metrics=metrics,
        provenance=None if parent is None else {"parent": parent.record()},
    )
    (staging / SPLIT_FILE).write_bytes(split_path.read_bytes())
    figures = write_figures(
        staging,
        kind=spec.kind,
        labels=spec.labels,
        history=result.history,
        probabilities=test.probabilities,
        truth=test.truth,
        thresholds=thresholds,
        model=result.model,
        images=[test_set.image(i) for i in range(min(GRID_IMAGES, len(test_set)))],
        contract=result.contract,
    )
    outcome = RetrainOutcome(out, manifest, metrics, flags, result, split, index, figures)
    (staging / MODEL_CARD).write_text(model_card(outcome, spec, data), encoding="utf-8")
    staging.rename(out)
    return outcome


def fingerprint(split_path: Path, index: DatasetIndex, digests: Mapping[str, str]) -> str:
    """SHA-256 over the split JSON and every image's relative name and SHA-256, as the split read
    them (``digests``): read again after training, a file changed meanwhile named data the model
    never saw."""
    digest = hashlib.sha256(split_path.read_bytes())
    for name in sorted(index.relative(sample.path) for sample in index.samples):
        digest.update(os.fsencode(name) + b"\0")  # the name's bytes, UTF-8 or not
        digest.update(bytes.fromhex(digests[name]))
    return "sha256:" + digest.hexdigest()


def check_unchanged(data: Path, index: DatasetIndex, split: DatasetSplit) -> None:
    """Every image still holds the bytes the split read. One changed or removed while the model
    trained made the fingerprint name data it never saw, or the run end in a bare OSError (a
    traceback for a test image) after the whole training."""
    changed = []
    for sample in index.samples:
        name = index.relative(sample.path)
        try:
            now = file_sha256(sample.path)
        except OSError:
            now = None
        if now != split.digests.get(name, now):
            changed.append(name)
    if changed:
        raise DatasetError(
            data,
            f"{len(changed)} image(s) changed or vanished while the model trained: {', '.join(changed[:5])}"
            + (", ..." if len(changed) > 5 else ""),
            UNTOUCHED_UNTIL_THE_END,
        )


def _changed_since(saved: DatasetSplit, split: DatasetSplit) -> bool:
    """The checkpoint's split against this run's: other sides, or other bytes under a name (a split
    saved before the digests were kept compares by sides only)."""
    return saved.assignments != split.assignments or (bool(saved.digests) and saved.digests != split.digests)


def _is_synthetic(root: Path) -> bool:
    readme = root / "README.txt"
    return readme.is_file() and "SYNTHETIC" in readme.read_text(encoding="utf-8", errors="replace")


def _none_if_nan(x: float) -> float | None:
    return None if x != x else x


def _batch(config: TrainConfig) -> str:
    if config.processes == 1:
        return str(config.batch_size)
    return f"{config.batch_size} x {config.processes} processes (global {config.batch_size * config.processes})"


def model_card(outcome: RetrainOutcome, spec: TaskSpec, data: Path) -> str:
    """A short markdown card: data, split, recipe, metrics, figures, flags, limits."""
    m, metrics, config = outcome.manifest, outcome.metrics, outcome.result.config
    test = metrics["test"]
    c = m.input_contract
    lines = [
        f"# {m.task} {m.version}",
        "",
        f"{spec.description}. {m.kind}, labels: {', '.join(m.labels)}.",
        f"Architecture {m.architecture} ({outcome.result.init}), input {c['channels']}x{c['height']}x{c['width']}; "
        f"weights sha256 `{m.sha256[:16]}`; created {m.created} by meddaemon {m.code_version}.",
        *_parent_lines(m.provenance.get("parent")),
        "",
        "## Data",
        "",
        f"- `{shown_name(data)}` ({outcome.index.layout} layout, {len(outcome.index.samples)} images"
        + (", **SYNTHETIC phantoms, not patient data**)" if metrics["synthetic"] else ")"),
        f"- fingerprint `{m.training_data_fingerprint}` (split in `{SPLIT_FILE}` beside this card)",
        "",
        "| split | " + " | ".join(m.labels) + " |",
        "|---|" + "---|" * len(m.labels),
    ]
    for side, counts in metrics["split_counts"].items():
        lines.append(f"| {side} | " + " | ".join(str(counts.get(label, 0)) for label in m.labels) + " |")
    lines += [
        "",
        "## Recipe",
        "",
        f"{config.optimizer} lr {config.lr:g}, batch {_batch(config)}, {config.epochs} epochs max "
        f"(ran {metrics['epochs_run']}, best {metrics['best_epoch']}), scheduler {dict(config.scheduler) or 'none'}, "
        f"class weighting {'on' if config.class_weighting else 'off'}, augmentation "
        f"{', '.join(config.augmentations) if config.augmentation and config.augmentations else 'off'}, "
        f"patience {config.patience}, seed {config.seed}.",
        "",
        "## Metrics (test set)",
        "",
        f"- n {test['n']}, accuracy {_fmt(test['accuracy'])}, macro ROC-AUC {_fmt(test['roc_auc'])}; "
        f"validation ROC-AUC {_fmt(metrics['validation']['roc_auc'])}",
        f"- thresholds (chosen on validation): {_thresholds(m.kind, m.thresholds)}",
        "",
        "| label | precision | recall | F1 | ROC-AUC | support |",
        "|---|---|---|---|---|---|",
    ]
    for label, row in test["per_label"].items():
        lines.append(
            f"| {label} | {_fmt(row['precision'])} | {_fmt(row['recall'])} | {_fmt(row['f1'])} | "
            f"{_fmt(row['roc_auc'])} | {row['support']} |"
        )
    lines += ["", f"Confusion matrix (rows truth, columns prediction): `{json.dumps(test['confusion_matrix'])}`", ""]
    if outcome.figures:
        lines += ["## Figures", ""]
        for name, caption in outcome.figures.items():
            lines += [f"![{caption}]({name})", ""]
    lines += ["## Flags", ""] + ([f"- **{f}**" for f in outcome.flags] or ["- none"])
    lines += [
        "",
        "## Limits",
        "",
        "- Metrics come from one small held-out split; they carry wide uncertainty (see `medcli audit`).",
        "- Decision support only, not a diagnosis; validate on local data before promoting.",
        "",
    ]
    return "\n".join(lines)


def _parent_lines(parent: Mapping[str, Any] | None) -> list[str]:
    """The card's sentence on the version training started from, and where that one came from."""
    if not parent:
        return []
    line = (
        f"Trained from {parent['task']}/{parent['version']} (sha256 `{parent['sha256'][:16]}`): its weights, "
        "architecture and input contract"
    )
    source = parent.get("provenance", {}).get("source_file")
    if source:
        line += f"; it was imported from `{source}` ({parent['provenance'].get('format', '?')})"
    return [line + "."]


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def _thresholds(kind: str, thresholds: Mapping[str, float]) -> str:
    if kind == "multiclass":
        return "none (the top class is called)"
    return ", ".join(f"{k} {v:.3f}" for k, v in thresholds.items())
