"""What an evaluation reads: the image files of a dataset in any layout the training adapters know,
or of any folder of images, with the labels the layout carries (for ``--audit``).

Listing never opens an image (no decoding: that is the pipeline's work) and never writes anything.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from meddaemon.engine.tasks import TaskSpec
from meddaemon.names import shown_name, utf8_name
from meddaemon.training.datasets import (
    FOLDER_LAYOUTS,
    DatasetError,
    DatasetIndex,
    NestedDataset,
    Skipped,
    UnreadableDataset,
    access_errors_named,
    detect_layout,
    load_dataset,
)
from meddaemon.training.datasets.folders import class_folders, is_segmentation_mask
from meddaemon.training.images import image_files

#: The layout name of a folder of images that carries no labels.
PLAIN_IMAGES = "images"


@dataclass(frozen=True)
class Cohort:
    """The files of one evaluation: absolute paths under ``root`` (relative names are the keys)."""

    root: Path
    layout: str
    files: list[Path]
    #: the dataset's index, with its labels; None for a folder of images without a known layout
    index: DatasetIndex | None
    #: why the folder carries no labels (the adapter's message), when ``index`` is None
    unlabelled_because: str | None = None
    #: what reading a folder of images left out, when ``index`` is None (a layout's are in its index)
    warnings: tuple[str, ...] = ()

    def unlabelled(self) -> str:
        """Why this cohort cannot be audited against its own labels, and what to do instead."""
        return (
            f"{self.root} is a folder of images without labels ({self.unlabelled_because}); "
            "audit it with medcli audit --labels FILE"
        )

    def relative(self, path: Path) -> str:
        try:
            return path.relative_to(self.root).as_posix()
        except ValueError:
            return path.as_posix()


def read_cohort(path: Path, task: TaskSpec) -> Cohort:
    """The cohort at ``path``: a dataset layout (labels with it) or a folder of images (none).

    A CSV manifest lists files that may lie anywhere; their root is the manifest's folder. A folder
    holding nothing but a dataset is refused (the user meant the dataset, masks are no inputs), as is
    one with a folder this user cannot list (its images would be left out unseen)."""
    path = path.absolute()
    layout = None
    try:
        layout = detect_layout(path)
        index = load_dataset(path, task, layout=layout, check_images=False)
    except UnreadableDataset:
        raise
    except NestedDataset as exc:
        # one folder of folders that are not the task's classes (``archive/2024/{jan,feb}/``, a
        # study's series) holds images, not a dataset of this task
        if exc.layout != "folder-per-class" or _are_labels(class_folders(exc.inner), task):
            raise
        return _folder_of_images(path, f"the folders of {exc.inner.name} are not labels of task {task.name!r}")
    except DatasetError as exc:
        # a layout its own files tell (a label table, BUSI's classes, IDC's patients): a fault in
        # them is the dataset's, not a folder of images (an archive filed by date is a folder per class)
        if not path.is_dir() or layout not in (None, "folder-per-class"):
            raise
        return _folder_of_images(path, str(exc))
    root = path.parent if path.is_file() else path
    if layout in FOLDER_LAYOUTS:
        _name_images_outside_the_layout(root, index)
    files = list(dict.fromkeys(sample.path.absolute() for sample in index.samples))
    return _one_stored_name_each(Cohort(root, layout, files, index))


def _name_images_outside_the_layout(root: Path, index: DatasetIndex) -> None:
    """Add the images under ``root`` the layout reads nowhere (at its top, in a folder not of a class,
    in an IDC patient's folder beside 0/ and 1/) to the index's left-out files: they were scored by
    no run and named in no summary, and the cohort's counts shrank without a word. The images of a
    folder holding none the layout reads are named once, by that folder (a copy of the whole dataset
    inside it, as IDC's archive holds, is one entry, not 277,000)."""
    known = {p.absolute() for s in index.samples for p in (s.path, *s.masks)}
    known.update(s.path.absolute() for s in index.skipped)
    read_in = {folder for path in known for folder in path.parents}
    where = FOLDER_LAYOUTS[index.layout]
    with access_errors_named(root):
        outside = [p for p in image_files(root) if p.absolute() not in known and not is_segmentation_mask(p, root)]
    by_folder: dict[Path, list[Path]] = {}
    for path in outside:
        folder = next((f for f in reversed(path.absolute().parents) if f not in read_in), None)
        by_folder.setdefault(folder or path, []).append(path)
    unread = f"not read as part of the {index.layout} dataset"
    for place, images in by_folder.items():
        why = (
            f"not in {where}: {unread}"
            if len(images) == 1
            else f"a folder of {len(images)} images, none in {where}: {unread}"
        )
        index.skipped.append(Skipped(images[0] if len(images) == 1 else place, why, by_rule=True))


def _folder_of_images(path: Path, unlabelled_because: str) -> Cohort:
    """Every image under ``path``, its segmentation masks left out (no inputs), without labels."""
    with access_errors_named(path):
        found = list(image_files(path))
    files = [f for f in found if not is_segmentation_mask(f, path)]
    if not files:
        raise DatasetError(path, "holds no image files", "a dataset layout or a folder of images")
    masks = len(found) - len(files)
    left_out = f"{masks} segmentation mask(s) left out (in masks/ folders, or named *_mask.png): not inputs"
    warnings = (left_out,) if masks else ()
    return _one_stored_name_each(Cohort(path, PLAIN_IMAGES, files, None, unlabelled_because, warnings))


def _are_labels(folders: list[Path], task: TaskSpec) -> bool:
    """Whether every folder is named for a label of ``task`` (any case, as a folder per class reads them)."""
    labels = {label.lower() for label in task.labels}
    return all(folder.name.lower() in labels for folder in folders)


def _one_stored_name_each(cohort: Cohort) -> Cohort:
    """Refuse a cohort two of whose files would be stored under one name: a name that is not UTF-8
    is stored with each such byte written %XX, so ``sc\\xe9n.png`` and a file really named
    ``sc%E9n.png`` are one name to the database (the run stopped on its unique key, every time, or
    the second file's row replaced the first's without a word)."""
    seen: dict[str, Path] = {}
    for file in cohort.files:
        name = utf8_name(cohort.relative(file))
        if name in seen:
            raise DatasetError(
                cohort.root,
                f"{shown_name(seen[name])} and {shown_name(file)} would both be stored as {name!r} "
                "(a name that is not UTF-8 is stored with each such byte written %XX)",
                "file names that stay distinct once stored: rename one of the two",
            )
        seen[name] = file
    return cohort
