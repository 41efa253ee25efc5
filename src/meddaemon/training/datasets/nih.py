"""NIH ChestX-ray14 as published: ``images/*.png`` (or Kaggle's ``images_001/images/``),
``Data_Entry_2017.csv`` (``Finding Labels`` joined by ``|``, ``No Finding``), ``BBox_List_2017.csv``
and the official patient-wise ``train_val_list.txt``/``test_list.txt``."""

from __future__ import annotations

import csv
import io
from pathlib import Path

from meddaemon.engine.tasks import NIH_FINDINGS, TaskSpec
from meddaemon.files import folder_entries, read_text_in_place
from meddaemon.training.datasets.index import (
    NO_FINDING,
    DatasetError,
    DatasetIndex,
    FindingBox,
    Sample,
    require_every_label,
)
from meddaemon.training.datasets.tables import read_table, require_existing

ENTRY_FILES = ("Data_Entry_2017.csv", "Data_Entry_2017_v2020.csv")
REQUIRED = ("Image Index", "Finding Labels", "Patient ID")


def entry_file(root: Path) -> Path | None:
    return next((root / name for name in ENTRY_FILES if (root / name).is_file()), None)


def read_nih(root: Path, task: TaskSpec | None = None) -> DatasetIndex:
    table = entry_file(root)
    if table is None:
        raise DatasetError(root, "has no Data_Entry_2017.csv", "NIH ChestX-ray14's label file at the dataset root")
    labels = task.labels if task is not None else NIH_FINDINGS
    images, missing_folder = _image_paths(root)
    boxes = _boxes(root / "BBox_List_2017.csv")
    samples: list[Sample] = []
    named: list[tuple[int, Path]] = []
    first_rows: dict[str, tuple[int, str]] = {}
    repeated: list[int] = []
    for row_number, row in enumerate(read_table(table, REQUIRED), start=2):
        name = row["Image Index"]
        if name in first_rows:  # a row repeated: one image, read once (it was its own "near-duplicate")
            first, findings_text = first_rows[name]
            if row["Finding Labels"].strip() != findings_text:
                raise DatasetError(table, f"rows {first} and {row_number} list {name} with different findings",
                                   "one row per image")  # fmt: skip
            repeated.append(row_number)
            continue
        first_rows[name] = (row_number, row["Finding Labels"].strip())
        path = images.get(name)
        if path is None:  # not listed in an image folder: a missing image, named below
            path = missing_folder / name
            named.append((row_number, path))
        said = [f for f in row["Finding Labels"].split("|") if f]
        findings = tuple(f for f in said if f != NO_FINDING)
        if NO_FINDING in said and findings:  # read as the findings alone, the image's truth changed silently
            raise DatasetError(table, f"row {row_number} ({name}) says '{NO_FINDING}' and {', '.join(findings)}",
                               f"'{NO_FINDING}' alone, or the findings alone")  # fmt: skip
        strangers = [f for f in findings if f not in labels]
        if strangers:
            raise DatasetError(table, f"row {row_number} ({name}) has finding(s) {', '.join(strangers)}",
                               f"'{NO_FINDING}' or findings among {', '.join(labels)}")  # fmt: skip
        extra = {k: v for k, v in row.items() if k not in REQUIRED}
        samples.append(
            Sample(path, findings, row["Patient ID"], boxes=tuple(boxes.get(name, ())), extra=extra, line=row_number)
        )
    require_existing(table, named)
    index = DatasetIndex("nih-chestxray14", root, labels, "multilabel", samples)
    if repeated:
        shown = ", ".join(str(n) for n in repeated[:5]) + (", ..." if len(repeated) > 5 else "")
        index.warnings.append(
            f"{table.name}: {len(repeated)} row(s) repeat an image listed before (rows {shown}): read once"
        )
    index.official_test = _official_test(root, index)
    require_every_label(index, root, "")
    return index


def _image_paths(root: Path) -> tuple[dict[str, Path], Path]:
    """Image name -> path, in ``images/`` or in the ``images_NNN/images/`` folders of Kaggle's copy
    (``os.scandir``: the entries say which are files, without a ``stat`` for each of 112,120), and
    where a missing image is said to be looked for: ``images/``, or ``images_*/images/`` in Kaggle's."""
    paths: dict[str, Path] = {}
    with folder_entries(root) as entries:
        parts = sorted(entry.name for entry in entries if entry.name.startswith("images_"))
    for folder in [root / "images", *(root / part / "images" for part in parts)]:
        if folder.is_dir():
            with folder_entries(folder) as entries:
                paths.update((entry.name, folder / entry.name) for entry in entries if entry.is_file())
    kaggle = parts and not (root / "images").is_dir()
    return paths, root / "images_*" / "images" if kaggle else root / "images"


def _boxes(path: Path) -> dict[str, list[FindingBox]]:
    """``Image Index,Finding Label,Bbox [x,y,w,h]``: the header's last column name holds commas, so the
    four numbers follow the label as plain fields."""
    boxes: dict[str, list[FindingBox]] = {}
    if not path.is_file():
        return boxes
    rows = list(csv.reader(io.StringIO(read_text_in_place(path), newline="")))
    for number, row in enumerate(rows[1:], start=2):
        try:
            x, y, w, h = (float(v) for v in row[2:6])
        except ValueError:
            raise DatasetError(path, f"row {number} has no four numbers after the label", "Bbox x, y, w, h") from None
        boxes.setdefault(row[0], []).append(FindingBox(row[1], x, y, w, h))
    return boxes


def _official_test(root: Path, index: DatasetIndex) -> frozenset[Path] | None:
    lists = {name: root / name for name in ("train_val_list.txt", "test_list.txt")}
    if not lists["test_list.txt"].is_file():
        if lists["train_val_list.txt"].is_file():
            index.warnings.append("train_val_list.txt without test_list.txt: the official split is not used")
        return None
    by_name = {s.path.name: s.path for s in index.samples}
    named = [line.strip() for line in read_text_in_place(lists["test_list.txt"]).splitlines() if line.strip()]
    unknown = [n for n in named if n not in by_name]
    if unknown:
        index.warnings.append(f"test_list.txt names {len(unknown)} image(s) not in the label file, e.g. {unknown[0]}")
    return frozenset(by_name[n] for n in named if n in by_name)
