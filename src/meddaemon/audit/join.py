"""Stored predictions joined to the truth, and the join report that says what did not match.

A label row finds its scan by the table's key: ``file`` (the name the scan arrived under, as a
relative path such as ``busi/benign (1).png``, or its base name when that is unique, unless the
two name different class folders),
``sop_instance_uid`` or ``sha256``. Rows of the same key with the same labels count once; rows
of the same key (or the same scan) with different labels are conflicts and are left out.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any

import numpy as np

from meddaemon.audit.labels import LabelFileError, LabelRow, LabelTable, patient_column
from meddaemon.audit.predictions import AuditInputError, Predictions

EXAMPLES = 20


@dataclass(frozen=True)
class Conflict:
    key: str
    #: the label file's lines that name it
    lines: tuple[int, ...]
    detail: str
    #: the images that label it where the labels are folders, not lines (``LabelRow.source``)
    files: tuple[str, ...] = ()

    @classmethod
    def of(cls, key: str, rows: list[LabelRow], detail: str) -> Conflict:
        lines = tuple(sorted({r.line for r in rows if r.source is None}))
        return cls(key, lines, detail, tuple(sorted({r.source for r in rows if r.source is not None})))


@dataclass(frozen=True)
class JoinReport:
    label_rows: int
    predictions: int
    matched: int
    labels_without_prediction: list[str]
    predictions_without_label: int
    predictions_without_label_examples: list[str]
    conflicts: list[Conflict]
    identical_duplicates: int
    ambiguous: list[str]
    incomplete_predictions: int

    def as_dict(self) -> dict[str, Any]:
        return {
            "label_rows": self.label_rows,
            "predictions": self.predictions,
            "matched": self.matched,
            "labels_without_prediction": len(self.labels_without_prediction),
            "labels_without_prediction_examples": self.labels_without_prediction[:EXAMPLES],
            "predictions_without_label": self.predictions_without_label,
            "predictions_without_label_examples": self.predictions_without_label_examples,
            "conflicts": [
                {"key": c.key, "lines": list(c.lines), "files": list(c.files), "detail": c.detail}
                for c in self.conflicts
            ],
            "identical_duplicates": self.identical_duplicates,
            "ambiguous_keys": self.ambiguous[:EXAMPLES],
            "incomplete_predictions": self.incomplete_predictions,
        }


@dataclass(frozen=True)
class Cohort:
    """Matched scans: the truth and the model's output for the labels the audit reports.

    A binary task reports its positive label only; a multiclass task each class one-vs-rest
    (``truth_class`` and ``called_class`` give the K-class view); a multilabel task each label.
    ``y`` is 1/0, or -1 where this scan's value of that label is not known.
    """

    task: str
    kind: str
    labels: tuple[str, ...]
    y: np.ndarray
    probabilities: np.ndarray
    calls: np.ndarray
    thresholds: np.ndarray
    scan_ids: np.ndarray
    label_lines: np.ndarray
    clusters: np.ndarray
    label_attributes: dict[str, list[str]]
    scan_attributes: dict[str, list[str | None]]
    truth_class: np.ndarray | None = None
    called_class: np.ndarray | None = None
    classes: tuple[str, ...] = field(default=())

    @property
    def n(self) -> int:
        return len(self.scan_ids)

    @property
    def n_clusters(self) -> int:
        return int(self.clusters.max()) + 1 if self.n else 0

    def threshold(self, j: int) -> float | None:
        """The threshold of label ``j``'s calls; None for a multiclass model, whose call is the argmax
        (a stored 0.5 shown beside calls no probability reached 0.5 misled)."""
        return None if self.kind == "multiclass" else float(self.thresholds[j])

    def subset(self, rows: np.ndarray) -> Cohort:
        return Cohort(
            task=self.task,
            kind=self.kind,
            labels=self.labels,
            y=self.y[rows],
            probabilities=self.probabilities[rows],
            calls=self.calls[rows],
            thresholds=self.thresholds,
            scan_ids=self.scan_ids[rows],
            label_lines=self.label_lines[rows],
            clusters=np.unique(self.clusters[rows], return_inverse=True)[1],
            label_attributes={k: [v[i] for i in rows] for k, v in self.label_attributes.items()},
            scan_attributes={k: [v[i] for i in rows] for k, v in self.scan_attributes.items()},
            truth_class=None if self.truth_class is None else self.truth_class[rows],
            called_class=None if self.called_class is None else self.called_class[rows],
            classes=self.classes,
        )


def _same(a: LabelRow, b: LabelRow, multiclass: bool) -> bool:
    """Whether two rows say the same of a scan: a multiclass row's one class says everything (its
    other cells, blank or 0, are the same truth: ``_truth``)."""
    return a.positives == b.positives and (multiclass or a.known == b.known)


class _Index:
    def __init__(self, predictions: Predictions, key_kind: str) -> None:
        self.exact: dict[str, list[int]] = defaultdict(list)
        self.base: dict[str, list[int]] = defaultdict(list)
        self.by_sha: dict[str, list[int]] = defaultdict(list)
        self.parts: list[tuple[str, ...]] = []
        for i, sha in enumerate(predictions.sha256):
            if sha:
                self.by_sha[sha.lower()].append(i)
        values: list[str | None]
        if key_kind == "file":
            values = list(predictions.source_names)
            self.parts = [_path_parts(name) for name in predictions.source_names]
            for i, parts in enumerate(self.parts):
                self.base[parts[-1]].append(i)
        elif key_kind == "sha256":
            values = [v.lower() if v else v for v in predictions.sha256]
        else:
            values = list(predictions.sop_instance_uids)
        for i, v in enumerate(values):
            if v:
                self.exact[v].append(i)
        self.key_kind = key_kind
        #: folders named as a class of the task, in any case (datasets spell ``Benign/``)
        self.class_folders = frozenset(label.casefold() for label in predictions.labels)
        self.folders = [
            _stored_folder(parts, predictions.task, bool(in_place))
            for parts, in_place in zip(self.parts, predictions.read_in_place or [False] * len(self.parts), strict=False)
        ]

    def find(self, key: str) -> list[int]:
        key = key.lower() if self.key_kind == "sha256" else key
        if key in self.exact:  # two scans arrived under one name, or as versions of one instance: ambiguous
            return self.exact[key]
        if self.key_kind == "file":
            parts = _path_parts(key)
            return [i for i in self.base.get(parts[-1], []) if not self._other_class(parts, i)]
        return []

    def _other_class(self, key: tuple[str, ...], i: int) -> bool:
        """Whether a key and stored scan ``i`` of one base name lie in folders of two different
        classes: ``malignant/1.png`` does not name the scan evaluated as ``benign/1.png``
        (folder-per-class datasets reuse file names across classes). ``benign/benign (1).png`` does
        name the one that arrived in the inbox's task folder as ``busi/benign (1).png``."""
        stored = self.folders[i]
        if len(key) < 2 or stored is None:
            return False
        folders = {key[-2].casefold(), stored}
        return len(folders) == 2 and folders <= self.class_folders


def _stored_folder(parts: tuple[str, ...], task: str, read_in_place: bool) -> str | None:
    """The folder a stored name's file lies in, in lower case; None for a file at the top, or in
    the inbox's task folder (``busi/x.png``: a task, not a class, though ``covid`` is both)."""
    if len(parts) < 2 or (not read_in_place and len(parts) == 2 and parts[0] == task):
        return None
    return parts[-2].casefold()


def _path_parts(name: str) -> tuple[str, ...]:
    return PurePosixPath(name.replace("\\", "/")).parts or ("",)


def join(predictions: Predictions, table: LabelTable) -> tuple[Cohort, JoinReport]:
    """Match label rows to predicted scans; the cohort holds the matches, the report everything else."""
    by_key: dict[str, list[LabelRow]] = defaultdict(list)
    for row in table.rows:
        by_key[row.key].append(row)
    index = _Index(predictions, table.key_kind)
    multiclass = predictions.kind == "multiclass"
    #: each conflict's key, detail and rows (lines and files are drawn from the rows at the end)
    conflicting: list[tuple[str, str, list[LabelRow]]] = []
    without: list[str] = []
    ambiguous: list[str] = []
    chosen: dict[int, LabelRow] = {}
    #: every row naming a chosen scan: a scan left out later takes them into its conflict
    rows_of: dict[int, list[LabelRow]] = defaultdict(list)
    #: scans left out for labels that contradict each other -> the index of their conflict
    excluded: dict[int, int] = {}
    unmatched_duplicates = 0
    for key, rows in by_key.items():
        first = rows[0]
        found = index.find(key) or (index.by_sha.get(first.sha256, []) if first.sha256 else [])
        scan = found[0] if len(found) == 1 else None
        # the scan it names is left out, whatever other keys say
        if any(not _same(first, r, multiclass) for r in rows[1:]):
            named = list(rows)
            if scan is not None and scan in chosen:
                del chosen[scan]
                named += rows_of.pop(scan)
            conflicting.append((key, "the same key with different labels", named))
            if scan is not None:
                excluded.setdefault(scan, len(conflicting) - 1)
            continue
        if scan is not None and scan in excluded:  # its rows are counted in the scan's conflict
            conflicting[excluded[scan]][2].extend(rows)
            continue
        if scan is None:
            (ambiguous if found else without).append(key)
            unmatched_duplicates += len(rows) - 1
            continue
        if scan in chosen and not _same(chosen[scan], first, multiclass):
            other = chosen.pop(scan)
            conflicting.append((key, f"{other.key!r} and {key!r} are the same scan", [*rows_of.pop(scan), *rows]))
            excluded[scan] = len(conflicting) - 1
            continue
        chosen.setdefault(scan, first)
        rows_of[scan] += rows
    conflicts = [Conflict.of(key, rows, detail) for key, detail, rows in conflicting]
    duplicates = unmatched_duplicates + sum(len(rows) - 1 for rows in rows_of.values())
    if not chosen:
        raise AuditInputError(
            f"no label row of {table.path} matched a stored prediction of {predictions.task}/"
            f"{predictions.model_version} (key: {table.key_kind}; {len(table.rows)} label rows, "
            f"{len(predictions.scan_ids)} predictions)"
        )
    rows_idx = np.array(sorted(chosen), dtype=np.int64)
    matched = [chosen[i] for i in rows_idx]
    cohort = _cohort(predictions, table, rows_idx, matched)
    # a scan left out for conflicting labels has labels: it is counted among the conflicts alone
    labelled = np.union1d(rows_idx, np.array(sorted(excluded), dtype=np.int64))
    unlabelled = np.setdiff1d(np.arange(len(predictions.scan_ids)), labelled)
    report = JoinReport(
        label_rows=len(table.rows),
        predictions=len(predictions.scan_ids),
        matched=len(rows_idx),
        labels_without_prediction=without,
        predictions_without_label=len(unlabelled),
        predictions_without_label_examples=[predictions.source_names[i] for i in unlabelled[:EXAMPLES]],
        conflicts=conflicts,
        identical_duplicates=duplicates,
        ambiguous=ambiguous,
        incomplete_predictions=predictions.incomplete,
    )
    return cohort, report


def _truth(task_labels: tuple[str, ...], kind: str, row: LabelRow, path: str) -> np.ndarray:
    """The row's truth over the labels the audit reports (see :class:`Cohort`)."""
    stray = sorted(row.positives - set(task_labels))
    if stray:
        raise LabelFileError(path, f"{stray[0]!r} is not a label of this task ({', '.join(task_labels)})", row.line)

    def known(label: str) -> bool:
        return row.known is None or label in row.known

    if kind == "binary":
        negative, positive = task_labels
        if len(row.positives) > 1:
            raise LabelFileError(path, f"a binary task's scan is {negative} or {positive}, not both", row.line)
        if not row.positives and known(positive) and known(negative) and row.known is not None:
            raise LabelFileError(
                path, f"a binary task's scan is {negative} or {positive}; this row is neither", row.line
            )
        if known(positive):
            return np.array([positive in row.positives], dtype=np.int8)
        if known(negative):
            return np.array([negative not in row.positives], dtype=np.int8)
        return np.array([-1], dtype=np.int8)
    if kind == "multiclass":
        if len(row.positives) != 1:
            raise LabelFileError(
                path,
                f"a multiclass scan has exactly one class ({', '.join(task_labels)}); this row has "
                f"{sorted(row.positives) or 'none'}",
                row.line,
            )
        # its one class known, the others are known too: not it (blank cells of 0/1 columns included)
        return np.array([lab in row.positives for lab in task_labels], dtype=np.int8)
    return np.array([(lab in row.positives) if known(lab) else -1 for lab in task_labels], dtype=np.int8)


def _cohort(predictions: Predictions, table: LabelTable, rows: np.ndarray, matched: list[LabelRow]) -> Cohort:
    kind = predictions.kind
    labels = predictions.labels
    y = np.stack([_truth(labels, kind, r, table.path) for r in matched]) if matched else np.zeros((0, 0))
    probs = predictions.probabilities[rows]
    calls = predictions.calls[rows]
    thresholds = predictions.thresholds
    reported = labels
    truth_class = called_class = None
    if kind == "binary":
        probs, calls, thresholds, reported = probs[:, 1:], calls[:, 1:], thresholds[1:], labels[1:]
    elif kind == "multiclass":
        truth_class = np.argmax(y, axis=1)
        called_class = np.argmax(probs, axis=1)
    patient = patient_column(table.attribute_columns)
    patients = [r.attributes.get(patient, "") if patient else "" for r in matched]
    stored = predictions.scan_attributes["patient_id"]
    cluster_keys = [
        f"label:{p}" if p else (f"scan:{stored[i]}" if stored[i] else f"id:{predictions.scan_ids[i]}")
        for p, i in zip(patients, rows, strict=True)
    ]
    clusters = np.unique(np.array(cluster_keys, dtype=object), return_inverse=True)[1].astype(np.int64)
    return Cohort(
        task=predictions.task,
        kind=kind,
        labels=tuple(reported),
        y=y,
        probabilities=probs,
        calls=calls,
        thresholds=np.asarray(thresholds),
        scan_ids=predictions.scan_ids[rows],
        label_lines=np.array([r.line for r in matched], dtype=np.int64),
        clusters=clusters,
        label_attributes={a: [r.attributes.get(a, "") for r in matched] for a in table.attribute_columns},
        scan_attributes={k: [v[i] for i in rows] for k, v in predictions.scan_attributes.items()},
        truth_class=truth_class,
        called_class=called_class,
        classes=labels if kind == "multiclass" else (),
    )
