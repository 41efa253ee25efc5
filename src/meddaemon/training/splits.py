"""Train/validation/test splits that do not leak: stratified by label, with every patient and every
group of near-duplicate images kept on one side (union-find over both), reproducible from a seed,
saved as JSON next to the model, with a report of what was merged or dropped and why.

ChestX-ray14's official ``test_list.txt`` is honoured: its images are the test set, the rest is
split into train and validation, and a train image that is a near-duplicate of a test image (or
belongs to a test patient) is dropped rather than let leak.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from meddaemon.engine.tasks import InputContract, TaskSpec
from meddaemon.files import file_sha256
from meddaemon.training.datasets import DatasetIndex, Sample, load_dataset
from meddaemon.training.datasets.index import drop_unreadable
from meddaemon.training.nearduplicates import (
    DEFAULT_MAX_DISTANCE,
    HashProgress,
    hash_images,
    near_duplicate_groups,
)
from meddaemon.training.unionfind import DisjointSets

SPLITS = ("train", "val", "test")
SPLIT_FILE = "split.json"
FORMAT = "meddaemon-split/1"


@dataclass(frozen=True)
class SplitConfig:
    fractions: tuple[float, float, float] = (0.7, 0.15, 0.15)
    seed: int = 0
    max_hash_distance: int = DEFAULT_MAX_DISTANCE


#: Above this share of a dataset's images dropped, the split report warns.
DROPPED_WARNING_FRACTION = 0.05


@dataclass(frozen=True)
class Dropped:
    path: str
    reason: str
    #: what kind of reason, one of ``DROP_CAUSES`` (empty in splits saved before it was recorded)
    cause: str = ""


#: Why images leave a split, as the report counts them.
DROP_CAUSES = {
    "skipped": "skipped when the dataset was read",
    "left-out": "left out by the layout's rules, or no image",
    "identical-conflict": "identical files labelled differently",
    "identical-copy": "byte-identical copies",
    "unreadable": "unreadable",
    "near-duplicate-conflict": "near-duplicates labelled differently",
    "official-test": "sharing a patient or near-duplicate with an official test image",
}


@dataclass(frozen=True)
class Merged:
    """Images kept on one side together: one patient's, a near-duplicate group's, or an image kept of
    identical copies with the patients of the copies dropped (``identical-copy``)."""

    why: str
    members: tuple[str, ...]


@dataclass
class SplitReport:
    dropped: list[Dropped] = field(default_factory=list)
    merged: list[Merged] = field(default_factory=list)
    #: per side, how many images carry each label (a multilabel image counts once per label)
    counts: dict[str, dict[str, int]] = field(default_factory=dict)
    #: per side, how many images
    images: dict[str, int] = field(default_factory=dict)
    groups: int = 0
    warnings: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        """The report in sentences, for a person."""
        out = [f"{self.groups} groups split; images " + ", ".join(f"{s}: {n}" for s, n in self.images.items())]
        for split, counts in self.counts.items():
            out.append(f"  {split:<5} " + "  ".join(f"{label} {n}" for label, n in counts.items()))
        patients = sum(1 for m in self.merged if m.why == "patient")
        near = [m for m in self.merged if m.why == "near-duplicate"]
        copies = [m for m in self.merged if m.why == "identical-copy"]
        out.append(
            f"merged: {patients} patients with several images, {len(near)} near-duplicate groups"
            + (f", {len(copies)} images whose identical copies joined their patients" if copies else "")
        )
        out.extend(f"  near-duplicates kept together: {', '.join(m.members)}" for m in near)
        out.extend(f"  identical copies, their patients kept together: {', '.join(m.members)}" for m in copies)
        out.append(
            f"dropped: {len(self.dropped)}" + "".join(f"; {n} {why}" for why, n in self.dropped_by_cause().items())
        )
        out.extend(f"  {d.path}: {d.reason}" for d in self.dropped)
        out.extend(f"warning: {w}" for w in self.warnings)
        return out

    def dropped_by_cause(self) -> dict[str, int]:
        """How many images were dropped for each kind of reason, in words."""
        counts: dict[str, int] = {}
        for dropped in self.dropped:
            why = DROP_CAUSES.get(dropped.cause, "other")
            counts[why] = counts.get(why, 0) + 1
        return counts


@dataclass
class DatasetSplit:
    """Which side each image (named relative to the dataset root) is on, and how it came to be."""

    layout: str
    labels: tuple[str, ...]
    config: SplitConfig
    assignments: dict[str, str]
    report: SplitReport
    #: the SHA-256 of every image read (relative name -> hex digest), as the split read it: the
    #: training's fingerprint, the check that nothing changed while it trained, and ``--resume``'s
    digests: dict[str, str] = field(default_factory=dict)

    def names(self, split: str) -> list[str]:
        return sorted(name for name, side in self.assignments.items() if side == split)

    def samples(self, index: DatasetIndex, split: str) -> list[Sample]:
        """The images on one side, in the index's order, each once (a manifest may list a path
        twice: the copy is dropped, and named alike it would come back with the row kept)."""
        out: dict[str, Sample] = {}
        for sample in index.samples:
            name = index.relative(sample.path)
            if self.assignments.get(name) == split:
                out.setdefault(name, sample)
        return list(out.values())

    def as_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "layout": self.layout,
            "labels": list(self.labels),
            "config": asdict(self.config),
            "assignments": dict(sorted(self.assignments.items())),
            "report": asdict(self.report),
            "sha256": dict(sorted(self.digests.items())),
        }


@dataclass
class HashedDataset:
    """A dataset index whose unreadable images are skipped, with the pHash of every other one."""

    index: DatasetIndex
    hashes: dict[Path, int]


def load_hashed_dataset(
    path: Path,
    task: TaskSpec | None = None,
    *,
    workers: int = 1,
    progress: HashProgress | None = None,
    contract: InputContract | None = None,
) -> HashedDataset:
    """The dataset as :func:`load_dataset` reads it, each image decoded once (in up to ``workers``
    processes) both to find the unreadable ones, and those the model's input ``contract`` (by
    default the task's) refuses, and for its pHash; ``make_split`` takes the hashes."""
    index = load_dataset(path, task, check_images=False)
    if contract is None and task is not None:
        contract = task.contract
    paths = [s.path for s in index.samples]
    hashed = hash_images(paths, contract=contract, workers=workers, progress=progress)
    return HashedDataset(drop_unreadable(index, failures=hashed.unreadable), hashed.hashes)


def make_split(
    index: DatasetIndex, config: SplitConfig = SplitConfig(), hashes: Mapping[Path, int] | None = None
) -> DatasetSplit:
    """Split ``index``; ``hashes`` (pHash per path) are computed when not given."""
    _check_fractions(config.fractions)
    report = SplitReport(
        dropped=[
            Dropped(index.relative(s.path), s.reason, "left-out" if s.by_rule else "skipped") for s in index.skipped
        ]
    )
    samples, digests, copies = _without_identical_files(index, report)
    if hashes is None:
        hashes, samples = _hash_readable(index, samples, report)
    samples, near_duplicates = _merge_near_duplicates(index, samples, hashes, config.max_hash_distance, report)
    groups = _groups(index, samples, near_duplicates, report, copies)
    assignments = _assign(index, groups, config, report)
    report.groups = len(groups)
    report.counts = _counts(index, samples, assignments)
    report.images = {side: sum(1 for s in assignments.values() if s == side) for side in SPLITS}
    _warn_about(report, index, max((len(g) for g in groups), default=0))
    _warn_about_dropped(report, len(index.samples) + len(index.skipped))
    return DatasetSplit(index.layout, index.labels, config, assignments, report, digests)


def _check_fractions(fractions: tuple[float, float, float]) -> None:
    if len(fractions) != 3 or any(f < 0 for f in fractions) or abs(sum(fractions) - 1) > 1e-6:
        raise ValueError(f"split fractions must be three non-negative numbers summing to 1, not {fractions}")


def _without_identical_files(
    index: DatasetIndex, report: SplitReport
) -> tuple[list[Sample], dict[str, str], dict[Path, list[Sample]]]:
    """Byte-identical files: one is kept (the official test image, if one of them is; else the first)
    and the copies are dropped (all, if labelled differently). Returns the samples kept, every
    image's SHA-256 by its relative name, and the copies dropped for each image kept: their patients
    go with it (``_groups``). A copy of an official test image in another patient's training images
    was kept in training and the test image dropped: a patient's own image trained on and its
    other images tested."""
    official = index.official_test or frozenset()
    by_digest: dict[str, list[Sample]] = {}
    digests: dict[str, str] = {}
    for sample in index.samples:
        digest = digests[index.relative(sample.path)] = file_sha256(sample.path)
        by_digest.setdefault(digest, []).append(sample)
    kept: set[int] = set()  # the samples, not their paths: a manifest may list one path twice
    dropped_copies: dict[Path, list[Sample]] = {}
    for copies in by_digest.values():
        first = next((c for c in copies if c.path in official), copies[0])
        if len({frozenset(c.labels) for c in copies}) > 1:  # a|b and b|a are one labelling
            names = ", ".join(index.relative(c.path) for c in copies)
            report.dropped.extend(
                Dropped(index.relative(c.path), f"identical files labelled differently: {names}", "identical-conflict")
                for c in copies
            )
            continue
        kept.add(id(first))
        others = [c for c in copies if c is not first]
        if others:
            dropped_copies[first.path] = others
        report.dropped.extend(
            Dropped(index.relative(c.path), f"the same bytes as {index.relative(first.path)}", "identical-copy")
            for c in others
        )
    return [s for s in index.samples if id(s) in kept], digests, dropped_copies


def _hash_readable(
    index: DatasetIndex, samples: list[Sample], report: SplitReport
) -> tuple[dict[Path, int], list[Sample]]:
    """pHash of every image; one that cannot be decoded (an index read without ``check_images``) is dropped."""
    hashed = hash_images([s.path for s in samples])
    for path, failure in hashed.unreadable.items():
        report.dropped.append(Dropped(index.relative(path), f"unreadable image ({failure.message})", "unreadable"))
    return hashed.hashes, [s for s in samples if s.path in hashed.hashes]


def _merge_near_duplicates(
    index: DatasetIndex, samples: list[Sample], hashes: Mapping[Path, int], max_distance: int, report: SplitReport
) -> tuple[list[Sample], list[tuple[Path, ...]]]:
    """Near-duplicate groups are recorded (and kept together by :func:`_groups`); a group whose
    images carry different classes is dropped whole: the same picture cannot teach two answers."""
    by_path = {s.path: s for s in samples}
    dropped: set[Path] = set()
    kept_together: list[tuple[Path, ...]] = []
    for group in near_duplicate_groups({p: hashes[p] for p in by_path}, max_distance):
        members = [by_path[p] for p in group.members]
        names = tuple(index.relative(p) for p in group.members)
        if index.kind != "multilabel" and len({m.labels for m in members}) > 1:
            classes = ", ".join(f"{index.relative(m.path)} ({m.label})" for m in members)
            why = f"near-duplicates labelled differently: {classes}"
            report.dropped.extend(Dropped(n, why, "near-duplicate-conflict") for n in names)
            dropped.update(group.members)
            continue
        report.merged.append(Merged("near-duplicate", names))
        kept_together.append(group.members)
    return [s for s in samples if s.path not in dropped], kept_together


def _groups(
    index: DatasetIndex,
    samples: list[Sample],
    near_duplicates: list[tuple[Path, ...]],
    report: SplitReport,
    copies: Mapping[Path, list[Sample]] | None = None,
) -> list[list[Sample]]:
    """Union-find over "same patient" and "near-duplicates": the units a split may not cut. An image
    kept of identical copies joins the patients of the copies dropped (``copies``): they are its patients too."""
    position = {s.path: i for i, s in enumerate(samples)}
    sets = DisjointSets(len(samples))
    by_patient: dict[str, list[int]] = {}
    for i, sample in enumerate(samples):
        if sample.patient_id is not None:
            by_patient.setdefault(sample.patient_id, []).append(i)
    for patient_members in by_patient.values():
        sets.union(patient_members)
        if len(patient_members) > 1:
            report.merged.append(Merged("patient", tuple(index.relative(samples[i].path) for i in patient_members)))
    for members in near_duplicates:
        sets.union(position[path] for path in members)
    for path, dropped in (copies or {}).items():
        if path not in position:
            continue
        patients = {c.patient_id for c in dropped if c.patient_id is not None} - {samples[position[path]].patient_id}
        joined = [i for patient in sorted(patients) for i in by_patient.get(patient, [])]
        if joined:
            sets.union([position[path], *joined])
            names = (index.relative(path), *(index.relative(c.path) for c in dropped))
            report.merged.append(Merged("identical-copy", names))
    return [[samples[i] for i in members] for members in sets.groups()]


def _label_columns(index: DatasetIndex, group: list[Sample]) -> np.ndarray:
    """Per-label counts of a group; multilabel tasks get a last column for "No Finding"."""
    column = {label: i for i, label in enumerate(index.labels)}
    counts = np.zeros(len(index.labels) + 1, dtype=np.float64)
    for sample in group:
        for label in sample.labels:
            counts[column[label]] += 1
        if not sample.labels:
            counts[-1] += 1
    return counts


def _assign(
    index: DatasetIndex, groups: list[list[Sample]], config: SplitConfig, report: SplitReport
) -> dict[str, str]:
    fractions = np.array(config.fractions, dtype=np.float64)
    assignments: dict[str, str] = {}
    open_splits = [0, 1, 2]
    if index.official_test is not None:
        groups = _honour_official_test(index, groups, assignments, report)
        fractions = np.array([fractions[0], fractions[1], 0.0]) / max(fractions[0] + fractions[1], 1e-9)
        open_splits = [0, 1]
    rng = np.random.default_rng(config.seed)
    order = sorted(rng.permutation(len(groups)).tolist(), key=lambda g: -len(groups[g]))
    vectors = [_label_columns(index, g) for g in groups]
    totals = np.maximum(np.sum(vectors, axis=0), 1.0) if vectors else np.ones(len(index.labels) + 1)
    size_total = max(sum(len(g) for g in groups), 1)
    current = np.zeros((3, len(totals)))
    sizes = np.zeros(3)
    for g in order:
        vector, size = vectors[g], len(groups[g])
        deficits = [
            float(np.sum(vector * (fractions[s] * totals - current[s]) / totals))
            + size * (fractions[s] * size_total - sizes[s]) / size_total
            for s in open_splits
        ]
        side = open_splits[int(np.argmax(deficits))]
        current[side] += vector
        sizes[side] += size
        for sample in groups[g]:
            assignments[index.relative(sample.path)] = SPLITS[side]
    return assignments


def _honour_official_test(
    index: DatasetIndex, groups: list[list[Sample]], assignments: dict[str, str], report: SplitReport
) -> list[list[Sample]]:
    """Groups touching the official test list go to test; their other images are dropped."""
    official = index.official_test or frozenset()
    rest: list[list[Sample]] = []
    for group in groups:
        tested = [s for s in group if s.path in official]
        if not tested:
            rest.append(group)
            continue
        for sample in group:
            name = index.relative(sample.path)
            if sample.path in official:
                assignments[name] = "test"
            else:
                why = f"shares a patient or near-duplicate with official test image {index.relative(tested[0].path)}"
                report.dropped.append(Dropped(name, why, "official-test"))
    return rest


def _counts(index: DatasetIndex, samples: list[Sample], assignments: dict[str, str]) -> dict[str, dict[str, int]]:
    names = [*index.labels, "No Finding"] if index.kind == "multilabel" else index.labels
    counts = {split: dict.fromkeys(names, 0) for split in SPLITS}
    for sample in samples:
        side = assignments.get(index.relative(sample.path))
        if side is None:
            continue
        for label in sample.labels:
            counts[side][label] += 1
        if index.kind == "multilabel" and not sample.labels:
            counts[side]["No Finding"] += 1
    return counts


def _warn_about(report: SplitReport, index: DatasetIndex, largest: int) -> None:
    """Labels missing from a side, and a group too large to balance (``largest``: its images, after
    every join: patients, near-duplicates and identical copies chained; one merge alone undercounted)."""
    total = sum(sum(c.values()) for c in report.counts.values()) or 1
    for label in index.labels:
        everywhere = sum(c.get(label, 0) for c in report.counts.values())
        missing = [s for s in SPLITS if everywhere >= 3 and report.counts[s].get(label, 0) == 0]
        if missing:
            report.warnings.append(f"no {label} image in {', '.join(missing)} ({everywhere} in all)")
    if largest > 0.2 * total:
        report.warnings.append(f"one group holds {largest} of {total} images; the split cannot be balanced well")


def _warn_about_dropped(report: SplitReport, listed: int) -> None:
    """Warn when more than ``DROPPED_WARNING_FRACTION`` of the ``listed`` images are dropped; what the
    layout leaves out by its rules counts in neither (the COVID collection is mostly such rows)."""
    by_rule = sum(1 for d in report.dropped if d.cause == "left-out")
    dropped, images = len(report.dropped) - by_rule, listed - by_rule
    if images and dropped > DROPPED_WARNING_FRACTION * images:
        counted = {why: n for why, n in report.dropped_by_cause().items() if why != DROP_CAUSES["left-out"]}
        causes = ", ".join(f"{n} {why}" for why, n in counted.items())
        report.warnings.append(
            f"{dropped} of {images} images ({dropped / images:.1%}) are dropped, more than "
            f"{DROPPED_WARNING_FRACTION:.0%}: {causes}; the dropped files are listed in the split report"
        )


def save_split(split: DatasetSplit, where: Path) -> Path:
    """Write ``split.json`` into the folder ``where`` (or to ``where`` if it names a .json file)."""
    path = where if where.suffix == ".json" else where / SPLIT_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(json.dumps(split.as_dict(), indent=1, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(temporary, path)
    return path


def load_split(where: Path) -> DatasetSplit:
    path = where if where.suffix == ".json" else where / SPLIT_FILE
    data = json.loads(path.read_text(encoding="utf-8"))
    if data.get("format") != FORMAT:
        raise ValueError(f"{path}: not a meddaemon split (format {data.get('format')!r}, expected {FORMAT})")
    config = data["config"]
    report = data["report"]
    return DatasetSplit(
        layout=data["layout"],
        labels=tuple(data["labels"]),
        config=SplitConfig(tuple(config["fractions"]), config["seed"], config["max_hash_distance"]),  # type: ignore[arg-type]
        assignments=dict(data["assignments"]),
        report=SplitReport(
            dropped=[Dropped(**d) for d in report["dropped"]],
            merged=[Merged(m["why"], tuple(m["members"])) for m in report["merged"]],
            counts=report["counts"],
            images=report.get("images", {}),
            groups=report["groups"],
            warnings=list(report["warnings"]),
        ),
        digests=dict(data.get("sha256", {})),  # none in a split written before they were kept
    )
