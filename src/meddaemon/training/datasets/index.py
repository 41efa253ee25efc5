"""What an adapter returns: a typed index of a dataset's samples, and the errors it raises."""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from meddaemon.failures import NOT_AN_IMAGE, FailureReason, ScanFailure, kept
from meddaemon.training.images import read_image

#: Above this fraction of unreadable images the dataset is refused rather than trained on.
DEFAULT_MAX_BAD_FRACTION = 0.05
#: a multilabel image with no positive label, as NIH's ``Finding Labels`` says it
NO_FINDING = "No Finding"


class DatasetError(ValueError):
    """A dataset that cannot be read: where (``path``), what is wrong, and what was expected."""

    def __init__(self, path: Path, problem: str, expected: str = "") -> None:
        self.path = path
        self.problem = problem
        self.expected = expected
        super().__init__(f"{path}: {problem}" + (f"; expected {expected}" if expected else ""))


class UnreadableDataset(DatasetError):
    """A folder or file of the dataset exists but cannot be listed or read."""


@contextmanager
def access_errors_named(path: Path) -> Iterator[None]:
    """A folder or file of the dataset that exists but cannot be listed or read (its permissions, a
    failing share) becomes an UnreadableDataset naming it: read past, its images would be left out
    unseen, and a model trained or evaluated on the rest would not say so."""
    try:
        yield
    except (FileNotFoundError, NotADirectoryError):
        raise
    except OSError as exc:
        where = _first_unlistable(path, Path(exc.filename)) if exc.filename else path
        raise UnreadableDataset(
            where, f"cannot be read ({exc.strerror or exc})", "a dataset whose every folder and file this user can read"
        ) from None


def _first_unlistable(root: Path, named: Path) -> Path:
    """The folder that keeps this user out of ``named``: a ``stat`` of ``benign/0`` fails when it is
    ``benign`` that may not be listed, and the error names the path asked about."""
    for folder in (*reversed(named.parents), named):
        if folder != root and root not in folder.parents:
            continue
        try:
            os.scandir(folder).close()
        except (FileNotFoundError, NotADirectoryError):
            break
        except OSError:
            return folder
    return named


@dataclass(frozen=True)
class FindingBox:
    """A finding's bounding box in pixels of the image as published (NIH's ``BBox_List_2017.csv``)."""

    label: str
    x: float
    y: float
    w: float
    h: float


@dataclass(frozen=True)
class Sample:
    """One image: its positive labels (exactly one for multiclass and binary tasks, any number, none
    meaning "No Finding", for multilabel ones), its patient when the dataset says, and its ground
    truth for localisation (BUSI masks, NIH boxes)."""

    path: Path
    labels: tuple[str, ...]
    patient_id: str | None = None
    masks: tuple[Path, ...] = ()
    boxes: tuple[FindingBox, ...] = ()
    extra: Mapping[str, str] = field(default_factory=dict, compare=False, hash=False)
    #: the line of the label table naming it (a manifest, NIH's ``Data_Entry_2017.csv``); None in a
    #: layout of folders
    line: int | None = field(default=None, compare=False, hash=False)

    @property
    def label(self) -> str:
        """The class of a single-label sample."""
        if len(self.labels) != 1:
            raise ValueError(f"{self.path} has labels {self.labels}, not exactly one")
        return self.labels[0]


@dataclass(frozen=True)
class Skipped:
    """An image or row left out of the index, and why."""

    path: Path
    reason: str
    #: left out by the layout's own rules (another finding, a CT slice, a lateral view), or no image at
    #: all: not the dataset at fault, so not counted among its dropped images
    by_rule: bool = False


@dataclass
class DatasetIndex:
    layout: str
    root: Path
    labels: tuple[str, ...]
    kind: str
    samples: list[Sample]
    skipped: list[Skipped] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    #: The images of the dataset's official test list (NIH ``test_list.txt``), when it has one.
    official_test: frozenset[Path] | None = None

    def label_matrix(self) -> np.ndarray:
        """(samples, labels) of 0/1: one-hot for single-label tasks, multi-hot for multilabel."""
        column = {label: i for i, label in enumerate(self.labels)}
        matrix = np.zeros((len(self.samples), len(self.labels)), dtype=np.int8)
        for row, sample in enumerate(self.samples):
            for label in sample.labels:
                matrix[row, column[label]] = 1
        return matrix

    def counts(self) -> dict[str, int]:
        """Images per label; for multilabel tasks also "No Finding" (no positive label)."""
        counter = Counter(label for s in self.samples for label in s.labels)
        counts = {label: counter.get(label, 0) for label in self.labels}
        if self.kind == "multilabel":
            counts[NO_FINDING] = sum(1 for s in self.samples if not s.labels)
        return counts

    def patients(self) -> int | None:
        ids = {s.patient_id for s in self.samples if s.patient_id is not None}
        return len(ids) if ids else None

    def relative(self, path: Path) -> str:
        """``path`` as it is named in a saved split: relative to the dataset root, with ``/``."""
        try:
            return path.relative_to(self.root).as_posix()
        except ValueError:
            return path.as_posix()


def kind_for(labels: tuple[str, ...], multilabel: bool = False) -> str:
    if multilabel:
        return "multilabel"
    return "binary" if len(labels) == 2 else "multiclass"


def drop_unreadable(
    index: DatasetIndex,
    max_bad_fraction: float = DEFAULT_MAX_BAD_FRACTION,
    *,
    failures: Mapping[Path, ScanFailure] | None = None,
) -> DatasetIndex:
    """Decode every image; the unreadable ones are skipped and listed with their reason, and more
    than ``max_bad_fraction`` of them refuses the dataset. Files that are no image at all
    (``NOT_AN_IMAGE``) are skipped and listed too, and left out of that fraction. ``failures``, when
    given, are the images already found unreadable (every other one decoded), and nothing is decoded
    again."""
    readable: list[Sample] = []
    bad: list[Skipped] = []
    not_images: list[Skipped] = []
    for sample in index.samples:
        failure = _decode_failure(sample.path) if failures is None else failures.get(sample.path)
        if failure is not None and failure.reason in NOT_AN_IMAGE:
            not_images.append(
                Skipped(sample.path, f"not an image ({failure.reason.value}: {failure.message})", by_rule=True)
            )
        elif failure is not None:
            refused = failure.reason == FailureReason.CONTRACT_MISMATCH
            why = "not what the model takes" if refused else "unreadable image"
            bad.append(Skipped(sample.path, f"{why} ({failure.reason.value}: {failure.message})"))
        else:
            readable.append(sample)
    total = len(index.samples) - len(not_images)
    if total and len(bad) / total > max_bad_fraction:
        shown = "; ".join(f"{index.relative(b.path)}: {b.reason}" for b in bad[:5])
        raise DatasetError(
            index.root,
            f"{len(bad)} of {total} images cannot be read ({shown}{'; ...' if len(bad) > 5 else ''})",
            f"at most {max_bad_fraction:.0%} unreadable images",
        )
    before, samples = index.counts(), index.samples
    index.samples = readable
    index.skipped.extend(not_images + bad)
    _require_labels_still_held(index, before, samples, {s.path: s.reason for s in not_images + bad})
    return index


def _require_labels_still_held(
    index: DatasetIndex, before: Mapping[str, int], samples: list[Sample], reasons: Mapping[Path, str]
) -> None:
    """A class whose every image was skipped is as empty as one with no files: an error for a
    single-label task (a model trained without it calls it for nothing, or for everything), a
    warning for a multilabel one. The layout readers check the classes before anything is decoded."""
    after = index.counts()
    for label, count in before.items():
        if not count or after.get(label) or label == NO_FINDING:
            continue
        if index.kind == "multilabel":
            index.warnings.append(f"no usable image is labelled {label}: all {count} were skipped")
            continue
        why = [f"{index.relative(s.path)}: {reasons[s.path]}" for s in samples if label in s.labels]
        shown = "; ".join(why[:3]) + ("; ..." if len(why) > 3 else "")
        raise DatasetError(
            index.root,
            f"class {label!r} has no usable images: all {count} were skipped ({shown})",
            "usable images of every class",
        )


def _decode_failure(path: Path) -> ScanFailure | None:
    try:
        read_image(path)
    except ScanFailure as failure:
        return kept(failure)
    return None


def require_every_label(index: DatasetIndex, where: Path, what: str) -> None:
    """An empty class is an error for single-label tasks and a warning for multilabel ones (a subset
    of ChestX-ray14 often has no Hernia)."""
    for label, count in index.counts().items():
        if count or label == NO_FINDING:
            continue
        if index.kind == "multilabel":
            index.warnings.append(f"no image is labelled {label}")
        else:
            raise DatasetError(where, f"class {label!r} has no images", what)
