"""A CSV manifest for any task: ``path,label[,patient_id]``; paths relative to the CSV's folder,
labels joined by ``|`` for multilabel tasks, where an empty label or NIH's ``No Finding`` is none.

Paths are made absolute as given, links kept (``as_given``): every file was named by its link's
target. A row naming a file named before (the same path, or another path to the same file: a link,
relative and absolute) with the same labels is read once; the same path with other labels is
refused; another name of the file with other labels is kept, and the split drops the pair."""

from __future__ import annotations

import os
from pathlib import Path

from meddaemon.engine.tasks import TaskSpec
from meddaemon.training.datasets.index import (
    NO_FINDING,
    DatasetError,
    DatasetIndex,
    Sample,
    kind_for,
    require_every_label,
)
from meddaemon.training.datasets.tables import read_table, require_existing

COLUMNS = ("path", "label", "patient_id")


def _row_path(root: Path, written: str) -> Path:
    """The image a row names, relative to the manifest's folder (an absolute path stays itself). A
    manifest made on Windows writes ``imgs\\benign\\a.png``: where no file has that name and the
    path with ``/`` is one, it is that one."""
    path = as_given(root / written, root)
    if "\\" in written and not path.exists():
        forward = as_given(root / written.replace("\\", "/"), root)
        if forward.exists():
            return forward
    return path


def read_manifest(table: Path, task: TaskSpec | None = None) -> DatasetIndex:
    rows = read_table(table, COLUMNS[:2], allowed=COLUMNS)
    if not rows:
        raise DatasetError(table, "has no rows", "one row per image: path,label[,patient_id]")
    # a task says whether a row may hold several labels; a "benign|malignant" row for a binary task
    # made the manifest multilabel, and training failed after its first epoch
    multilabel = task.kind == "multilabel" if task is not None else any("|" in r["label"] for r in rows)
    parsed = [
        tuple(x for x in r["label"].split("|") if x and x != NO_FINDING) if multilabel else (r["label"],) for r in rows
    ]
    labels = task.labels if task is not None else tuple(sorted({x for p in parsed for x in p}))
    samples: list[Sample] = []
    named: list[tuple[int, Path]] = []
    root = as_given(table.parent.absolute())  # where read_table found the table, its links kept
    by_path: dict[Path, tuple[int, str, tuple[frozenset[str], str | None]]] = {}
    by_file: dict[object, tuple[frozenset[str], str | None]] = {}
    repeated: list[int] = []
    for row_number, (row, row_labels) in enumerate(zip(rows, parsed, strict=True), start=2):
        if multilabel and row_labels and NO_FINDING in row["label"].split("|"):
            raise DatasetError(table, f"row {row_number} says '{NO_FINDING}' and {', '.join(row_labels)}",
                               f"'{NO_FINDING}' alone, or the labels alone")  # fmt: skip
        strangers = [x for x in row_labels if x not in labels]
        if strangers or (not multilabel and not row_labels[0]):
            expected = (
                f"labels among {', '.join(labels)} joined by '|', or '{NO_FINDING}' (or nothing) for none"
                if multilabel
                else f"one of {', '.join(labels)}"
            )
            raise DatasetError(table, f"row {row_number} has label {row['label']!r}", expected)
        path = _row_path(root, row["path"])
        patient = row.get("patient_id") or None
        labelling = (frozenset(row_labels), patient)  # a|b and b|a are one
        if path in by_path:
            first, first_text, first_labelling = by_path[path]
            if first_labelling != labelling:
                raise DatasetError(
                    table, f"rows {first} ({first_text}) and {row_number} ({row['path']}) name one image with "
                    "other labels or patients", "one row per image",
                )  # fmt: skip
            repeated.append(row_number)
            continue
        by_path[path] = (row_number, row["path"], labelling)
        file = _identity(path)
        if by_file.get(file) == labelling:  # another name of a file named before
            repeated.append(row_number)
            continue
        by_file.setdefault(file, labelling)  # other labels: kept, the split drops the pair
        named.append((row_number, path))
        samples.append(Sample(path, row_labels, patient, line=row_number))
    require_existing(table, named)
    index = DatasetIndex("manifest", root, labels, kind_for(labels, multilabel), samples)
    if repeated:
        shown = ", ".join(str(n) for n in repeated[:5]) + (", ..." if len(repeated) > 5 else "")
        index.warnings.append(
            f"{table.name}: {len(repeated)} row(s) repeat an image named before (rows {shown}): read once"
        )
    require_every_label(index, table, f"rows for every label: {', '.join(labels)}")
    return index


def as_given(path: Path, root: Path | None = None) -> Path:
    """``path`` (absolute) as a user wrote it, ``.`` and doubled slashes left out, links kept. Up to
    its last ``..`` it is resolved, as the system opens it (``link/..`` is the folder above the
    link's target, not the folder holding the link); the rest is kept as written. A path that then
    lies under ``root``'s target is named under ``root``."""
    parts = path.parts
    if ".." not in parts:
        return Path(os.path.normpath(path))
    last = len(parts) - 1 - parts[::-1].index("..")
    opened = Path(os.path.normpath(Path(*parts[: last + 1]).resolve().joinpath(*parts[last + 1 :])))
    if root is not None:
        try:
            return root / opened.relative_to(root.resolve())
        except ValueError:
            pass
    return opened


def _identity(path: Path) -> object:
    """What tells one file from another: its device and inode (two names of one file are one), or,
    for a path that names nothing (refused below), the path."""
    try:
        found = path.stat()
    except OSError:
        return path
    return (found.st_dev, found.st_ino) if found.st_ino else path  # 0: a filesystem that numbers no file
