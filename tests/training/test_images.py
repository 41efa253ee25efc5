"""Which files of a dataset folder are images, and in what order they are listed: what training,
the dataset adapters and ``medcli evaluate`` over a plain folder all read."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from dicom_factory import write_dicomdir, write_png
from pydicom.data import get_testdata_file

from meddaemon.training.images import image_files


def awkward_tree(root: Path) -> Path:
    """SYNTHETIC PNGs in a tree with what real dataset folders hold: names that sort differently as
    paths than as strings ("a" / "a.png" / "a-b"), a DICOM without a suffix, hidden files and folders,
    notes beside the images, links to a file and to a folder."""
    pixels = np.zeros((8, 8), np.uint8)
    for name in ["a.png", "a/x.png", "a-b/y.PNG", "a/z/deep.png", "b.png", "B/upper.png", "notes/c.png"]:
        write_png(root / name, pixels)
    (root / "IM0001").write_bytes(Path(get_testdata_file("CT_small.dcm")).read_bytes())
    (root / "notes" / "README.txt").write_text("not an image")
    (root / "notes" / "plain").write_text("neither an image nor a DICOM")
    write_png(root / ".hidden.png", pixels)
    write_png(root / ".cache" / "thumb.png", pixels)
    write_png(root / "a" / ".trash" / "old.png", pixels)
    (root / "linked.png").symlink_to(root / "b.png")
    (root / "linked_folder").symlink_to(root / "a", target_is_directory=True)
    return root


def test_images_are_listed_in_path_order_without_hidden_files_or_folders(tmp_path: Path) -> None:
    root = awkward_tree(tmp_path / "dataset")

    listed = [p.relative_to(root).as_posix() for p in image_files(root)]

    # the order of sorted(root.rglob("*")), the listing's definition before os.scandir: by path parts
    assert listed == [
        "B/upper.png", "IM0001", "a/x.png", "a/z/deep.png", "a-b/y.PNG", "a.png", "b.png", "linked.png",
        "notes/c.png",
    ]  # fmt: skip


def test_a_hidden_dataset_folder_is_still_listed_and_a_missing_one_is_empty(tmp_path: Path) -> None:
    root = tmp_path / ".datasets" / "busi"
    write_png(root / "benign" / "one.png", np.zeros((8, 8), np.uint8))

    assert list(image_files(root)) == [root / "benign" / "one.png"]
    assert list(image_files(tmp_path / "missing")) == []


def test_a_dicomdir_is_not_an_image_whatever_its_case(tmp_path: Path) -> None:
    """The index at the root of an exported CD, one beside each export's one or two images: as
    images that cannot be read, they stopped an evaluation of CD exports at its 5 %."""
    root = tmp_path / "cd_exports"
    for export in ("patient_1", "patient_2"):
        write_dicomdir(root / export / "DICOMDIR")
        (root / export / "IM0001").write_bytes(Path(get_testdata_file("CT_small.dcm")).read_bytes())
    write_dicomdir(root / "patient_3" / "dicomdir")
    listed = {p.relative_to(root).as_posix() for p in image_files(root)}
    files = {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}
    assert listed == files - {"patient_1/DICOMDIR", "patient_2/DICOMDIR", "patient_3/dicomdir"}
    assert {"patient_1/IM0001", "patient_2/IM0001", "patient_1/PT000000/ST000000/SE000000/IM000000"} <= listed


def test_a_link_named_as_an_image_is_listed_only_where_it_leads_nowhere_never_to_a_device(tmp_path: Path) -> None:
    """A link to nothing is an image its reading will name unreadable; one to a device (``/dev/zero``,
    read without end) or a folder is no image."""
    root = tmp_path / "dataset"
    write_png(root / "a.png", np.zeros((8, 8), np.uint8))
    (root / "gone.png").symlink_to(tmp_path / "elsewhere" / "gone.png")
    (root / "zero.png").symlink_to("/dev/zero")
    (root / "folder.png").symlink_to(tmp_path)
    assert [p.name for p in image_files(root)] == ["a.png", "gone.png"]
