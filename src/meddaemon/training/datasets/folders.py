"""A folder per class (any task), and BUSI, which is one with masks beside its images."""

from __future__ import annotations

import re
from pathlib import Path

from meddaemon.engine.tasks import TaskSpec
from meddaemon.files import folder_paths
from meddaemon.training.datasets.index import DatasetError, DatasetIndex, Sample, kind_for, require_every_label
from meddaemon.training.images import image_files, left_out_name

BUSI_CLASSES = ("benign", "malignant", "normal")
#: ``benign (1)_mask.png``, ``benign (1)_mask_1.png``: BUSI's masks, named after their image; and
#: their copies as a browser (``_mask (1).png``, ``_mask (1) (1).png``) or a file manager
#: (``_mask - Copy.png``, macOS's ``_mask copy 2.png``) names them.
BUSI_MASK = re.compile(r"^(?P<image>.+)_mask(?:_\d+)?(?: ?\(\d+\)| - Copy| copy(?: \d+)?)*\.png$", re.IGNORECASE)


def class_folders(root: Path) -> list[Path]:
    return sorted(p for p in folder_paths(root) if p.is_dir() and not left_out_name(p.name))


def read_folder_per_class(root: Path, task: TaskSpec | None = None, layout: str = "folder-per-class") -> DatasetIndex:
    """``root/<class>/**/<image>``: the folder names are the classes (the task's labels, any case)."""
    folders = class_folders(root)
    labels = _labels(root, folders, task, default=tuple(f.name for f in folders))
    by_name = {label.lower(): label for label in labels}
    samples: list[Sample] = []
    warnings: list[str] = []
    for folder in folders:
        label = by_name[folder.name.lower()]
        images = _class_images(folder, warnings)
        if not images:
            raise DatasetError(
                folder, f"the class folder {folder.name!r} holds no images", "PNG, JPEG, TIFF or DICOM files"
            )
        samples.extend(Sample(path, (label,)) for path in images)
    index = DatasetIndex(layout, root, labels, kind_for(labels), samples)
    index.warnings.extend(warnings)
    require_every_label(index, root, f"a folder per class: {', '.join(labels)}")
    return index


#: folders of segmentation masks beside a class's images (the COVID-19 Radiography Database's
#: ``COVID/images/`` and ``COVID/masks/``): their files are ground truth, never inputs
MASK_FOLDERS = frozenset({"mask", "masks"})


def _class_images(folder: Path, warnings: list[str]) -> list[Path]:
    """The images of a class folder and its subfolders, less those in masks/ folders (said in ``warnings``)."""
    found = list(image_files(folder))
    images = [path for path in found if not _under_masks(path, folder)]
    if len(images) < len(found):
        warnings.append(
            f"{folder.name}/: {len(found) - len(images)} image(s) in masks/ folders left out: segmentation "
            "masks, not inputs"
        )
    return images


def _under_masks(path: Path, folder: Path) -> bool:
    return any(part.lower() in MASK_FOLDERS for part in path.relative_to(folder).parts[:-1])


def is_segmentation_mask(path: Path, root: Path) -> bool:
    """Whether an image under ``root`` is a segmentation mask, by where it lies or its name: in a
    masks/ folder (the COVID-19 Radiography Database's), or named as BUSI names its masks."""
    return _under_masks(path, root) or BUSI_MASK.match(path.name) is not None


def read_busi(root: Path, task: TaskSpec | None = None) -> DatasetIndex:
    """Dataset_BUSI_with_GT: ``<class>/<class> (N).png`` with ``<class> (N)_mask.png`` and sometimes
    ``_mask_1.png``. Masks are ground truth for localisation, never inputs. A BUSI class the task
    does not have (``normal`` for ``busi_binary``) is left out, with a warning."""
    folders = class_folders(root)
    left_out: list[Path] = []
    if task is not None:
        known = {label.lower() for label in task.labels}
        left_out = [f for f in folders if f.name.lower() in BUSI_CLASSES and f.name.lower() not in known]
        if left_out and len(left_out) == len(folders):  # it said "has no class folders", of BUSI's own
            names = ", ".join(f"{f.name}/" for f in left_out)
            raise DatasetError(
                root,
                f"its class folders {names} are not classes of task {task.name!r} ({', '.join(task.labels)})",
                "the task these folders are for (--task busi or busi_binary)",
            )
        folders = [f for f in folders if f not in left_out]
    present = tuple(c for c in BUSI_CLASSES if any(f.name.lower() == c for f in folders))
    labels = _labels(root, folders, task, default=present)
    by_name = {label.lower(): label for label in labels}
    samples: list[Sample] = []
    index = DatasetIndex("busi", root, labels, kind_for(labels), samples)
    index.warnings.extend(f"{f.name}/: not a class of task {task.name!r}, left out" for f in left_out if task)
    for folder in folders:
        label = by_name[folder.name.lower()]
        found = _class_images(folder, index.warnings)  # subfolders too (they were left out unsaid)
        masks: dict[Path, list[Path]] = {}  # by the image they belong to, less its suffix
        for path in found:
            match = BUSI_MASK.match(path.name)
            if match:
                masks.setdefault(path.with_name(match["image"]), []).append(path)
        images = [p for p in found if not BUSI_MASK.match(p.name)]
        if not images:
            raise DatasetError(
                folder, f"the class folder {folder.name!r} holds no images", "BUSI's '<class> (N).png' files"
            )
        for path in images:
            samples.append(Sample(path, (label,), masks=tuple(sorted(masks.pop(path.with_suffix(""), [])))))
        for image, orphans in sorted(masks.items()):
            index.warnings.append(
                f"{folder.name}/: mask(s) {', '.join(p.name for p in orphans)} without an image "
                f"{image.relative_to(folder)}.png"
            )
    require_every_label(index, root, f"BUSI's class folders {', '.join(labels)}")
    return index


def _labels(root: Path, folders: list[Path], task: TaskSpec | None, default: tuple[str, ...]) -> tuple[str, ...]:
    if not folders:
        raise DatasetError(root, "has no class folders", "a folder per class holding its images")
    if task is None:
        if len(default) < 2:
            raise DatasetError(root, f"has {len(default)} class folder(s)", "at least two classes")
        return default
    known = {label.lower() for label in task.labels}
    strangers = [f.name for f in folders if f.name.lower() not in known]
    if strangers:
        raise DatasetError(
            root, f"folder(s) {', '.join(strangers)} are not labels of task {task.name!r}",
            f"one folder per label: {', '.join(task.labels)}",
        )  # fmt: skip
    return task.labels
