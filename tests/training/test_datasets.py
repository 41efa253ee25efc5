"""Dataset adapters: the published quirks are read as published, DICOM reads like PNG, and every
bad input is a DatasetError that names the path and what was expected."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from dicom_factory import write_dicom, write_png, write_structured_report

from meddaemon.engine.tasks import BUILTIN_TASKS
from meddaemon.training.datasets import DatasetError, detect_layout, load_dataset
from meddaemon.training.phantoms import PhantomSet, write_phantoms
from permissions import held_to_file_modes, unlistable

ENTRY_HEADER = "Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position\n"
#: Data_Entry_2017.csv as first published: bracketed names cut by their commas, a trailing comma.
ENTRY_HEADER_2017 = (
    "Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
    "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y],\n"
)


def pixels(seed: int, size: int = 32) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, size=(size, size), dtype=np.uint8)


def test_busi_names_with_spaces_and_parentheses_keep_their_masks_and_second_masks(tmp_path: Path) -> None:
    for cls in ("benign", "malignant"):
        for n in (1, 2):
            write_png(tmp_path / cls / f"{cls} ({n}).png", pixels(n))
            write_png(tmp_path / cls / f"{cls} ({n})_mask.png", pixels(9))
    write_png(tmp_path / "benign" / "benign (2)_mask_1.png", pixels(9))
    index = load_dataset(tmp_path, check_images=False)
    assert index.layout == "busi" and index.labels == ("benign", "malignant")
    second = next(s for s in index.samples if s.path.name == "benign (2).png")
    assert [m.name for m in second.masks] == ["benign (2)_mask.png", "benign (2)_mask_1.png"]
    assert len(index.samples) == 4


@pytest.mark.parametrize("copy", ["benign (1)_mask (1).png", "benign (1)_mask(2).png", "benign (1)_mask_1 (1).png",
                                  "benign (1)_mask - Copy.png", "benign (1)_mask - Copy (2).png",
                                  "benign (1)_mask (1) (1).png", "benign (1)_mask - Copy - Copy.png",
                                  "benign (1)_mask copy.png", "benign (1)_mask copy 2.png"])  # fmt: skip
def test_a_copy_of_a_mask_named_by_a_browser_or_a_file_manager_is_a_mask_never_an_image(
    tmp_path: Path, copy: str
) -> None:
    """A second download or a copy names a mask ``benign (1)_mask (1).png``: it was read as an image
    of its class, a lesion's black and white outline trained on and tested as a benign scan."""
    for cls in ("benign", "malignant"):
        for n in (1, 2):
            write_png(tmp_path / cls / f"{cls} ({n}).png", pixels(n))
            write_png(tmp_path / cls / f"{cls} ({n})_mask.png", pixels(9))
    write_png(tmp_path / "benign" / copy, pixels(9))
    index = load_dataset(tmp_path, check_images=False)
    assert sorted(s.path.name for s in index.samples) == [
        "benign (1).png", "benign (2).png", "malignant (1).png", "malignant (2).png"
    ]  # fmt: skip
    first = next(s for s in index.samples if s.path.name == "benign (1).png")
    assert [m.name for m in first.masks] == sorted(["benign (1)_mask.png", copy])


def test_busi_images_in_a_class_s_subfolder_are_read_with_their_masks_as_a_folder_per_class_s_are(
    tmp_path: Path,
) -> None:
    """They were neither read nor listed as skipped."""
    for cls in ("benign", "malignant"):
        write_png(tmp_path / cls / f"{cls} (1).png", pixels(1))
        write_png(tmp_path / cls / f"{cls} (1)_mask.png", pixels(9))
    write_png(tmp_path / "benign" / "extra" / "benign (1).png", pixels(2))  # SYNTHETIC, the same name one deeper
    write_png(tmp_path / "benign" / "extra" / "benign (1)_mask.png", pixels(8))
    write_png(tmp_path / "benign" / "extra" / "benign (7)_mask.png", pixels(7))
    index = load_dataset(tmp_path, check_images=False)
    masks = {index.relative(s.path): [index.relative(m) for m in s.masks] for s in index.samples}
    assert masks == {
        "benign/benign (1).png": ["benign/benign (1)_mask.png"],
        "benign/extra/benign (1).png": ["benign/extra/benign (1)_mask.png"],
        "malignant/malignant (1).png": ["malignant/malignant (1)_mask.png"],
    }
    assert "benign/: mask(s) benign (7)_mask.png without an image extra/benign (7).png" in index.warnings


def test_nih_labels_are_split_on_bars_and_no_finding_has_none(tmp_path: Path) -> None:
    for name in ("00000001_000.png", "00000001_001.png", "00000002_000.png"):
        write_png(tmp_path / "images_001" / "images" / name, pixels(1))  # Kaggle's folders
    (tmp_path / "Data_Entry_2017.csv").write_text(
        ENTRY_HEADER_2017 + "00000001_000.png,Cardiomegaly|Effusion,0,1,58,M,PA,2682,2749,0.143,0.143,\n"
        "00000001_001.png,No Finding,1,1,58,M,PA,2894,2729,0.143,0.143,\n"
        "00000002_000.png,Hernia,0,2,81,F,AP,2500,2048,0.168,0.168,\n"
    )
    index = load_dataset(tmp_path, BUILTIN_TASKS["chestxray14"])
    assert [s.labels for s in index.samples] == [("Cardiomegaly", "Effusion"), (), ("Hernia",)]
    assert [s.patient_id for s in index.samples] == ["1", "1", "2"]
    assert index.label_matrix().sum(axis=0).tolist()[:3] == [0, 1, 1]
    assert index.samples[0].extra["View Position"] == "PA"
    assert index.official_test is None
    assert "no image is labelled Mass" in index.warnings
    entry = (tmp_path / "Data_Entry_2017.csv").read_text().replace(",No Finding,", ",No Finding|Hernia,")
    (tmp_path / "Data_Entry_2017.csv").write_text(entry)  # was read as Hernia, without a word
    with pytest.raises(DatasetError, match=r"row 3 \(00000001_001.png\) says 'No Finding' and Hernia"):
        load_dataset(tmp_path, BUILTIN_TASKS["chestxray14"])


def test_a_folder_of_dicom_files_per_class_is_read(tmp_path: Path) -> None:
    for label, level in (("normal", 500), ("covid", 3000)):
        for n in range(3):
            arr = np.full((40, 40), level + 10 * n, dtype=np.uint16)
            arr[:4] = 0
            write_dicom(tmp_path / label / (f"IM{n:04d}" if n else f"scan{n}.dcm"), pixels=arr)
    (tmp_path / "normal" / "notes.txt").write_text("not an image")
    assert detect_layout(tmp_path) == "folder-per-class"
    index = load_dataset(tmp_path, BUILTIN_TASKS["covid"])
    assert index.counts() == {"normal": 3, "covid": 3}
    assert {p.path.name for p in index.samples} >= {"IM0001", "scan0.dcm"}


def test_a_csv_manifest_reads_paths_labels_and_patients(tmp_path: Path) -> None:
    for n in range(4):
        write_png(tmp_path / "img" / f"{n}.png", pixels(n))
    manifest = tmp_path / "labels.csv"
    manifest.write_text("path,label,patient_id\nimg/0.png,a,p1\nimg/1.png,a,p1\nimg/2.png,b,p2\nimg/3.png,b,\n")
    index = load_dataset(manifest)
    assert index.layout == "manifest" and index.labels == ("a", "b")
    assert [s.patient_id for s in index.samples] == ["p1", "p1", "p2", None]


def test_a_manifest_written_on_windows_reads_its_backslashed_paths_and_says_so_where_they_lead_nowhere(
    tmp_path: Path,
) -> None:
    """``img\\0.png`` rows, as a manifest saved on Windows writes them, each failed as an image that
    does not exist, the advice a partial download's."""
    for n in range(2):
        write_png(tmp_path / "img" / "sub" / f"{n}.png", pixels(n))
    manifest = tmp_path / "labels.csv"
    manifest.write_text("path,label\nimg\\sub\\0.png,a\nimg\\sub\\1.png,b\n")
    index = load_dataset(manifest)
    assert [s.path for s in index.samples] == [tmp_path / "img" / "sub" / "0.png", tmp_path / "img" / "sub" / "1.png"]
    manifest.write_text("path,label\nC:\\data\\img\\0.png,a\nimg\\sub\\1.png,b\n")
    with pytest.raises(DatasetError, match=r"1 row.* do not exist") as caught:
        load_dataset(manifest)
    assert "'/' between folders" in caught.value.expected


def test_a_manifest_reached_through_a_link_names_its_files_as_given_and_one_file_once(tmp_path: Path) -> None:
    """A relative row was resolved through the link (an absolute one was not): every file was named
    by the link's target, and one file named both ways, or twice, became two images."""
    real = tmp_path / "disk1" / "cohort"
    for n in range(4):
        write_png(real / "img" / f"{n}.png", pixels(n))
    (tmp_path / "data").symlink_to(real)
    manifest = tmp_path / "data" / "labels.csv"
    absolute = tmp_path / "data" / "img" / "0.png"
    (real / "latest").symlink_to(real / "img")
    manifest.write_text(
        f"path,label\nimg/0.png,a\nimg/1.png,a\nimg/2.png,b\nimg/3.png,b\n{absolute},a\nimg/3.png,b\n"
        f"latest/1.png,a\n{real / 'img' / '2.png'},b\n"
    )

    index = load_dataset(manifest)

    assert index.root == tmp_path / "data"
    assert [s.path for s in index.samples] == [tmp_path / "data" / "img" / f"{n}.png" for n in range(4)]
    assert any("4 row(s) repeat an image named before (rows 6, 7, 8, 9)" in w for w in index.warnings), index.warnings
    manifest.write_text("path,label\nimg/0.png,a\nimg/1.png,b\nimg/./0.png,b\n")
    with pytest.raises(DatasetError, match=r"rows 2 \(img/0\.png\) and 4 \(img/\./0\.png\) name one image"):
        load_dataset(manifest)


def test_a_manifest_named_through_dot_dots_keeps_its_links_and_rows_going_up_inside_it_keep_their_names(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``--data ../x/labels.csv`` resolved the root's link (names then depended on how the path was
    typed), and a row ``sub/../img/1.png`` was stored by its target's absolute path."""
    real = tmp_path / "disk" / "x"
    for n in range(2):
        write_png(real / "img" / f"{n}.png", pixels(n))
    (real / "sub").mkdir()
    (tmp_path / "proj").mkdir()
    (tmp_path / "proj" / "x").symlink_to(real)
    (tmp_path / "proj" / "a").mkdir()
    (real / "labels.csv").write_text("path,label\nimg/0.png,a\nsub/../img/1.png,b\n")
    monkeypatch.chdir(tmp_path / "proj" / "a")

    index = load_dataset(Path("../x/labels.csv"))

    assert index.root == (tmp_path / "proj").resolve() / "x"
    assert [index.relative(s.path) for s in index.samples] == ["img/0.png", "img/1.png"]


def test_a_manifest_named_through_a_link_and_dot_dots_reads_its_images_beside_the_table_it_read(
    tmp_path: Path,
) -> None:
    """``link/../x/labels.csv``: the table was read beside the link's target, its rows looked up in
    ``./x`` (other images of the same names, read with the table's labels)."""
    real = tmp_path / "disk" / "inner"
    for n in range(2):
        write_png(tmp_path / "disk" / "x" / "img" / f"{n}.png", pixels(n))
        write_png(tmp_path / "x" / "img" / f"{n}.png", pixels(n + 5))  # SYNTHETIC: a decoy of the same names
    real.mkdir()
    (tmp_path / "link").symlink_to(real)
    (tmp_path / "disk" / "x" / "labels.csv").write_text("path,label\nimg/0.png,a\nimg/1.png,b\n")

    index = load_dataset(tmp_path / "link" / ".." / "x" / "labels.csv")

    assert [s.path.resolve() for s in index.samples] == [
        (tmp_path / "disk" / "x" / "img" / f"{n}.png").resolve() for n in range(2)
    ]


def test_two_names_of_one_file_labelled_alike_are_read_once_and_labelled_apart_are_kept_as_copies_are(
    tmp_path: Path,
) -> None:
    """Hard links (a tree deduplicated with ``cp -al``) labelled differently refused the whole
    dataset, where copies of the same bytes were kept and their pair dropped by the split."""
    for n in range(4):
        write_png(tmp_path / "img" / f"{n}.png", pixels(n))
    os.link(tmp_path / "img" / "0.png", tmp_path / "img" / "0_alike.png")
    os.link(tmp_path / "img" / "1.png", tmp_path / "img" / "1_apart.png")
    manifest = tmp_path / "labels.csv"
    manifest.write_text(
        "path,label\nimg/0.png,a\nimg/1.png,a\nimg/2.png,b\nimg/3.png,b\nimg/0_alike.png,a\nimg/1_apart.png,b\n"
    )

    index = load_dataset(manifest)

    assert [index.relative(s.path) for s in index.samples] == [
        "img/0.png", "img/1.png", "img/2.png", "img/3.png", "img/1_apart.png"
    ]  # fmt: skip
    assert any("1 row(s) repeat an image named before (rows 6)" in w for w in index.warnings), index.warnings


def test_two_names_of_one_file_with_the_same_labels_in_another_order_are_read_once(tmp_path: Path) -> None:
    """``a|b`` and ``b|a`` were compared as ordered: both names kept, then both dropped by the split
    as "identical files labelled differently"."""
    for n in range(4):
        write_png(tmp_path / "img" / f"{n}.png", pixels(n))
    os.link(tmp_path / "img" / "0.png", tmp_path / "img" / "0_link.png")
    manifest = tmp_path / "labels.csv"
    manifest.write_text("path,label\nimg/0.png,a|b\nimg/1.png,a\nimg/2.png,b\nimg/3.png,b\nimg/0_link.png,b|a\n")

    index = load_dataset(manifest, check_images=False)

    assert len(index.samples) == 4 and any("(rows 6)" in w for w in index.warnings), index.warnings


def test_a_filesystem_that_numbers_no_file_has_its_files_told_apart_by_their_paths(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Some network shares and FUSE filesystems give every file inode 0: all were one file."""
    for n in range(4):
        write_png(tmp_path / "img" / f"{n}.png", pixels(n))
    manifest = tmp_path / "labels.csv"
    manifest.write_text("path,label\nimg/0.png,a\nimg/1.png,a\nimg/2.png,b\nimg/3.png,b\n")
    stat = Path.stat

    def no_inode(self: Path, *args: object, **kwargs: object) -> os.stat_result:
        found = stat(self, *args, **kwargs)  # type: ignore[arg-type]
        return os.stat_result((found.st_mode, 0, *tuple(found)[2:]))

    monkeypatch.setattr(Path, "stat", no_inode)

    assert len(load_dataset(manifest).samples) == 4


def test_a_manifest_row_going_up_from_a_linked_folder_reads_the_file_the_system_opens(tmp_path: Path) -> None:
    """``cohort/`` a link to ``disk1/project/cohort``, rows ``../images/N.png``: taken as text, ``..``
    left the link's folder, and the rows named files that do not exist, or other files of that name."""
    project = tmp_path / "disk1" / "project"
    for n in range(2):
        write_png(project / "images" / f"{n}.png", pixels(n))
        write_png(tmp_path / "images" / f"{n}.png", pixels(n + 5))  # SYNTHETIC: other files of the same names
    (project / "cohort").mkdir()
    (tmp_path / "cohort").symlink_to(project / "cohort")
    manifest = tmp_path / "cohort" / "labels.csv"
    manifest.write_text("path,label\n../images/0.png,a\n../images/1.png,b\n")

    index = load_dataset(manifest)

    assert [s.path for s in index.samples] == [project / "images" / "0.png", project / "images" / "1.png"]


def test_a_multilabel_manifest_reads_no_finding_as_nih_writes_it_and_says_so_when_a_label_is_wrong(
    tmp_path: Path,
) -> None:
    """A manifest copying NIH's Finding Labels was refused at its first 'No Finding' row."""
    for i in range(3):
        write_png(tmp_path / "img" / f"{i}.png", pixels(i))  # SYNTHETIC
    manifest = tmp_path / "labels.csv"
    manifest.write_text("path,label\nimg/0.png,Effusion|Mass\nimg/1.png,No Finding\nimg/2.png,\n")
    index = load_dataset(manifest, BUILTIN_TASKS["chestxray14"], check_images=False)
    assert [s.labels for s in index.samples] == [("Effusion", "Mass"), (), ()]
    assert index.counts()["No Finding"] == 2
    manifest.write_text("path,label\nimg/0.png,Effusion|Nodules\n")
    with pytest.raises(
        DatasetError, match=r"row 2 has label 'Effusion\|Nodules'.*or 'No Finding' \(or nothing\) for none"
    ):
        load_dataset(manifest, BUILTIN_TASKS["chestxray14"], check_images=False)
    manifest.write_text("path,label\nimg/0.png,No Finding|Effusion\n")  # was read as Effusion, without a word
    with pytest.raises(DatasetError, match="row 2 says 'No Finding' and Effusion"):
        load_dataset(manifest, BUILTIN_TASKS["chestxray14"], check_images=False)


@pytest.mark.parametrize("separator", [";", "\t"], ids=["semicolons", "tabs"])
def test_a_csv_manifest_from_a_spreadsheet_separated_by_semicolons_or_tabs_reads_the_same(
    tmp_path: Path, separator: str
) -> None:
    for n in range(4):
        write_png(tmp_path / "img" / f"{n}.png", pixels(n))
    manifest = tmp_path / "labels.csv"
    lines = ["path,label,patient_id", "img/0.png,a,p1", "img/1.png,a,p1", "img/2.png,b,p2", "img/3.png,b,"]
    manifest.write_text("".join(line.replace(",", separator) + "\r\n" for line in lines))
    index = load_dataset(manifest)
    assert index.layout == "manifest" and index.labels == ("a", "b")
    assert [s.patient_id for s in index.samples] == ["p1", "p1", "p2", None]


def test_a_folder_that_matches_no_layout_says_what_was_expected(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(DatasetError, match="matches no dataset layout") as caught:
        load_dataset(tmp_path)
    assert caught.value.path == tmp_path
    assert "Data_Entry_2017.csv" in str(caught.value) and "folder per class" in str(caught.value)


def test_a_folder_wrapping_a_dataset_names_the_dataset_root(phantoms: dict[str, PhantomSet], tmp_path: Path) -> None:
    shutil.copytree(phantoms["busi"].root, tmp_path / "Dataset_BUSI_with_GT")
    with pytest.raises(DatasetError, match="holds one folder, Dataset_BUSI_with_GT, which is a busi dataset"):
        detect_layout(tmp_path)


def test_a_folder_of_images_beside_one_folder_or_of_one_folder_of_one_folder_is_no_wrapper(tmp_path: Path) -> None:
    """Refused as 'holding nothing but a dataset' (so medcli evaluate scored nothing): images beside
    a single subfolder (scans/), and a folder whose one folder holds one folder of images (2024/jan/:
    no classes). Both are folders of images, which evaluate scores."""
    from meddaemon.evaluate.cohort import read_cohort

    beside = tmp_path / "beside"
    for i in range(3):
        write_png(beside / f"top{i}.png", pixels(i))
        write_png(beside / "scans" / f"b{i}.png", pixels(10 + i))
    nested = tmp_path / "nested"
    for i in range(3):
        write_png(nested / "2024" / "jan" / f"c{i}.png", pixels(20 + i))
    for folder, images in ((beside, 6), (nested, 3)):
        cohort = read_cohort(folder, BUILTIN_TASKS["busi"])
        assert (cohort.layout, len(cohort.files)) == ("images", images), folder.name


def test_a_class_s_masks_folder_is_left_out_with_a_warning(tmp_path: Path) -> None:
    """The COVID-19 Radiography Database: COVID/images/ and COVID/masks/ (lung masks). Recursing
    into the class folder, every mask was an image of its class: half the dataset."""
    root = tmp_path / "COVID-19_Radiography_Dataset"
    for label in ("COVID", "Normal"):
        for i in range(3):
            write_png(root / label / "images" / f"{label}-{i}.png", pixels(i))
            write_png(root / label / "masks" / f"{label}-{i}.png", np.where(pixels(i) > 128, 255, 0).astype(np.uint8))
    index = load_dataset(root, BUILTIN_TASKS["covid"], check_images=False)
    assert sorted(index.relative(s.path) for s in index.samples) == sorted(
        f"{label}/images/{label}-{i}.png" for label in ("COVID", "Normal") for i in range(3)
    )
    assert index.warnings == [
        f"{label}/: 3 image(s) in masks/ folders left out: segmentation masks, not inputs"
        for label in ("COVID", "Normal")
    ]


def test_busi_as_published_is_read_for_the_binary_task_without_its_normal_folder(
    phantoms: dict[str, PhantomSet], tmp_path: Path
) -> None:
    """busi_binary is BUSI with normal left out: its normal/ folder was 'not a label of the task',
    and the dataset as published could not be trained on."""
    index = load_dataset(phantoms["busi"].root, BUILTIN_TASKS["busi_binary"], check_images=False)
    assert {s.labels for s in index.samples} == {("benign",), ("malignant",)}
    assert "normal/: not a class of task 'busi_binary', left out" in index.warnings


def test_busi_read_for_a_task_of_other_classes_names_its_folders_and_the_task(phantoms: dict[str, PhantomSet]) -> None:
    """`medcli evaluate Dataset_BUSI_with_GT --task chestxray14` said the dataset "has no class
    folders": BUSI's three were left out as not the task's, then none was left."""
    with pytest.raises(DatasetError) as refused:
        load_dataset(phantoms["busi"].root, BUILTIN_TASKS["chestxray14"], check_images=False)
    message = str(refused.value)
    assert "its class folders benign/, malignant/, normal/ are not classes of task 'chestxray14'" in message
    assert "--task busi or busi_binary" in message and "has no class folders" not in message


def test_a_link_in_a_loop_is_an_image_its_reading_names_and_the_rest_is_read(tmp_path: Path) -> None:
    """``is_file`` raised ELOOP on it, and the whole folder was refused as unreadable; then it was
    passed over without a word. Each link is listed, for its reading to fail by name and be counted
    (``test_a_link_named_as_an_image_that_leads_nowhere_is_an_unreadable_image_counted_not_left_out``)."""
    from meddaemon.training.images import image_files

    for i in range(3):
        write_png(tmp_path / f"ok_{i}.png", pixels(i))
    (tmp_path / "loop_a.png").symlink_to(tmp_path / "loop_b.png")
    (tmp_path / "loop_b.png").symlink_to(tmp_path / "loop_a.png")
    assert [p.name for p in image_files(tmp_path)] == ["loop_a.png", "loop_b.png", "ok_0.png", "ok_1.png", "ok_2.png"]


def test_reading_a_dataset_leaves_the_access_times_of_its_files_as_they_were(tmp_path: Path) -> None:
    """Files without an image suffix are opened to tell DICOM (``IM0001``), and the labels CSV is
    read: both took a new access time, where evaluate promises none is touched."""
    import os

    root = tmp_path / "cohort"
    for i in range(3):
        write_dicom(root / "img" / f"IM000{i}", pixels=pixels(i))
    manifest = root / "labels.csv"
    labels = ("benign", "malignant", "normal")
    manifest.write_text("path,label\n" + "".join(f"img/IM000{i},{labels[i]}\n" for i in range(3)))
    (root / "img" / "README").write_text("SYNTHETIC")
    files = [manifest, root / "img" / "README", *(root / "img" / f"IM000{i}" for i in range(3))]
    for path in files:
        os.utime(path, (946684800, 946684800))  # 2000-01-01: older than the last change, so relatime updates it
    load_dataset(manifest, BUILTIN_TASKS["busi"], check_images=False)
    from meddaemon.training.images import image_files

    assert len(list(image_files(root / "img"))) == 3
    assert {path.name: path.stat().st_atime for path in files} == {path.name: 946684800 for path in files}


@pytest.mark.parametrize("task", ["busi", "chestxray14", "covid", "histopathology"])
def test_reading_a_dataset_leaves_the_access_times_of_its_folders_as_they_were(tmp_path: Path, task: str) -> None:
    """Listing a folder reads it: every folder of the dataset took a new access time, where evaluate
    promises to touch nothing under its PATH (``O_NOATIME``, as for its files; this user owns them)."""
    import os

    from meddaemon.training.images import image_files
    from meddaemon.training.phantoms import write_phantoms

    root = tmp_path / "cohort"
    write_phantoms(task, root, count=4, size=64)  # SYNTHETIC phantoms in the task's published layout
    folders = [root, *(path for path in root.rglob("*") if path.is_dir())]
    for folder in folders:
        os.utime(folder, (946684800, 946684800))  # 2000-01-01: older than the last change, so relatime updates it
    assert detect_layout(root) == load_dataset(root, BUILTIN_TASKS[task], check_images=False).layout
    assert next(image_files(root), None) is not None
    touched = [str(f.relative_to(tmp_path)) for f in folders if f.stat().st_atime != 946684800]
    assert touched == []


@pytest.mark.parametrize(
    ("layout", "locked"),
    [
        ("busi", "malignant"),  # a class folder: the layout itself cannot be told
        ("folder-per-class", "covid/second_batch"),  # a folder inside a class: its images would be left out
    ],
)
def test_a_folder_this_user_cannot_list_stops_the_read_and_is_named(
    phantoms: dict[str, PhantomSet], tmp_path: Path, layout: str, locked: str
) -> None:
    """Read past, an unlistable folder's images would be left out of the training or evaluation
    unseen; ``medcli dataset inspect`` (what ``retrain`` reads) stops with one line naming it."""
    root = tmp_path / "data"
    if layout == "busi":
        shutil.copytree(phantoms["busi"].root, root)
    else:
        for name, seed in (("covid/a.png", 1), ("covid/second_batch/b.png", 2), ("normal/c.png", 3)):
            write_png(root / name, pixels(seed))
    command = [str(Path(sys.executable).parent / "medcli"), "dataset", "inspect", str(root), "--no-split"]
    with unlistable(root / locked):
        done = subprocess.run(held_to_file_modes(command), capture_output=True, text=True)
    assert done.returncode == 2, done.stdout + done.stderr
    assert done.stderr.splitlines() == [
        f"error: {root / locked}: cannot be read (Permission denied); "
        "expected a dataset whose every folder and file this user can read"
    ]


def test_an_empty_class_folder_is_named(tmp_path: Path) -> None:
    write_png(tmp_path / "covid" / "a.png", pixels(1))
    (tmp_path / "normal").mkdir()
    with pytest.raises(DatasetError, match="'normal' holds no images") as caught:
        load_dataset(tmp_path, BUILTIN_TASKS["covid"])
    assert caught.value.path == tmp_path / "normal"


def test_a_task_label_without_a_folder_is_an_empty_class(tmp_path: Path) -> None:
    write_png(tmp_path / "covid" / "a.png", pixels(1))
    write_png(tmp_path / "covid" / "b.png", pixels(2))
    with pytest.raises(DatasetError, match="class 'normal' has no images"):
        load_dataset(tmp_path, BUILTIN_TASKS["covid"])


def test_a_folder_that_is_not_a_label_of_the_task_is_named(tmp_path: Path) -> None:
    for label in ("covid", "normal", "pneumonia"):
        write_png(tmp_path / label / "a.png", pixels(1))
    with pytest.raises(DatasetError, match="pneumonia are not labels of task 'covid'"):
        load_dataset(tmp_path, BUILTIN_TASKS["covid"])


def test_a_manifest_with_unknown_columns_lists_them(tmp_path: Path) -> None:
    manifest = tmp_path / "m.csv"
    manifest.write_text("path,label,site\na.png,x,1\n")
    with pytest.raises(DatasetError, match="unknown column") as caught:
        load_dataset(manifest)
    assert caught.value.path == manifest and "site" in str(caught.value)
    assert "path, label, patient_id" in caught.value.expected


def test_a_label_file_missing_a_required_column_names_it(tmp_path: Path) -> None:
    (tmp_path / "metadata.csv").write_text("patientid,filename\n1,a.png\n")
    with pytest.raises(DatasetError, match=r"missing column.*finding") as caught:
        load_dataset(tmp_path)
    assert caught.value.path == tmp_path / "metadata.csv"


def test_label_rows_naming_images_that_do_not_exist_are_listed(tmp_path: Path) -> None:
    write_png(tmp_path / "images" / "00000001_000.png", pixels(1))
    (tmp_path / "Data_Entry_2017.csv").write_text(
        ENTRY_HEADER + "00000001_000.png,No Finding,0,1,58,M,PA\n00000009_000.png,Mass,0,9,40,F,PA\n"
    )
    with pytest.raises(DatasetError, match="do not exist") as caught:
        load_dataset(tmp_path)
    assert caught.value.path == tmp_path / "Data_Entry_2017.csv"
    assert "row 3" in str(caught.value) and "00000009_000.png" in str(caught.value)


def test_an_image_missing_from_kaggles_copy_is_named_where_it_was_looked_for(tmp_path: Path) -> None:
    """Kaggle's copy has no ``images/``: the missing image is named in its ``images_*/images/`` folders."""
    write_png(tmp_path / "images_001" / "images" / "00000001_000.png", pixels(1))
    (tmp_path / "Data_Entry_2017.csv").write_text(
        ENTRY_HEADER + "00000001_000.png,No Finding,0,1,58,M,PA\n00000009_000.png,Mass,0,9,40,F,PA\n"
    )
    with pytest.raises(DatasetError, match="do not exist") as caught:
        load_dataset(tmp_path)
    assert f"row 3: {tmp_path / 'images_*' / 'images' / '00000009_000.png'}" in str(caught.value)


def _copy_with_corrupt_images(phantom: PhantomSet, where: Path, corrupt: int) -> Path:
    root = shutil.copytree(phantom.root, where)
    images = [p for p in sorted(root.glob("normal/normal (*).png")) if "_mask" not in p.name]
    for path in images[:corrupt]:
        path.write_bytes(path.read_bytes()[:60])
    return root


def test_corrupt_images_are_skipped_and_listed_under_the_threshold(
    phantoms: dict[str, PhantomSet], tmp_path: Path
) -> None:
    root = _copy_with_corrupt_images(phantoms["busi"], tmp_path / "busi", corrupt=1)
    index = load_dataset(root, BUILTIN_TASKS["busi"])
    assert len(index.samples) == phantoms["busi"].images - 1
    assert len(index.skipped) == 1 and "unreadable image" in index.skipped[0].reason


def test_corrupt_images_over_the_threshold_refuse_the_dataset(phantoms: dict[str, PhantomSet], tmp_path: Path) -> None:
    root = _copy_with_corrupt_images(phantoms["busi"], tmp_path / "busi", corrupt=6)
    with pytest.raises(DatasetError, match="cannot be read") as caught:
        load_dataset(root, BUILTIN_TASKS["busi"], max_bad_fraction=0.05)
    assert "at most 5% unreadable" in str(caught.value)


def test_a_link_named_as_an_image_that_leads_nowhere_is_an_unreadable_image_counted_not_left_out(
    tmp_path: Path,
) -> None:
    """A cohort linked into shared storage, one share unmounted: its links were passed over without a
    word, the counts and the 5% stop blind to them. Each is an image that cannot be read, named."""
    from meddaemon.training.datasets.index import drop_unreadable

    for label in ("covid", "normal"):
        for n in range(30):
            write_png(tmp_path / label / f"{n}.png", pixels(n))
    (tmp_path / "covid" / "gone.png").symlink_to("/nonexistent/share/gone.png")
    (tmp_path / "normal" / "loop_a.png").symlink_to("loop_b.png")
    (tmp_path / "normal" / "loop_b.png").symlink_to("loop_a.png")
    index = load_dataset(tmp_path, BUILTIN_TASKS["covid"], check_images=False)
    assert len(index.samples) == 63
    kept = drop_unreadable(index, max_bad_fraction=0.05)
    said = {s.path.name: s.reason for s in kept.skipped}
    assert said["gone.png"] == "unreadable image (unreadable: a symbolic link to a file that does not exist)"
    assert said["loop_a.png"].startswith("unreadable image (unreadable: cannot open the file")
    assert len(kept.samples) == 60


def test_a_class_whose_every_image_is_unreadable_is_an_empty_class_naming_them(tmp_path: Path) -> None:
    for n in range(30):
        write_png(tmp_path / "covid" / f"{n}.png", pixels(n))
    (tmp_path / "normal").mkdir()
    (tmp_path / "normal" / "only.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    with pytest.raises(DatasetError, match="class 'normal' has no usable images: all 1 were skipped") as caught:
        load_dataset(tmp_path, BUILTIN_TASKS["covid"])
    assert "normal/only.png: unreadable image" in str(caught.value)
    assert caught.value.expected == "usable images of every class"


def test_a_multilabel_finding_whose_every_image_is_unreadable_is_warned_about(tmp_path: Path) -> None:
    rows = [f"{n:08d}_000.png,No Finding,0,{n},50,F,PA" for n in range(30)] + ["00000099_000.png,Hernia,0,99,50,F,PA"]
    for n in [*range(30)]:
        write_png(tmp_path / "images" / f"{n:08d}_000.png", pixels(n))
    (tmp_path / "images" / "00000099_000.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    (tmp_path / "Data_Entry_2017.csv").write_text(ENTRY_HEADER + "\n".join(rows) + "\n")
    index = load_dataset(tmp_path, BUILTIN_TASKS["chestxray14"])
    assert "no usable image is labelled Hernia: all 1 were skipped" in index.warnings


def test_objects_that_are_no_images_are_listed_apart_and_never_refuse_the_dataset(tmp_path: Path) -> None:
    """A folder per class exported from a PACS: an SR beside each pair of images, and a capture
    meddaemon wrote. A third of the files, counted as unreadable, refused the dataset."""
    for cls in ("benign", "malignant"):
        for n in range(4):
            write_png(tmp_path / cls / f"{cls}_{n}.png", pixels(n))
            if n % 2:
                write_structured_report(tmp_path / cls / f"{cls}_{n}_report.dcm")
    write_dicom(tmp_path / "benign" / "capture.dcm", modality="US", extra={"Manufacturer": "meddaemon"})
    index = load_dataset(tmp_path, max_bad_fraction=0.05)
    assert sorted(s.path.name for s in index.samples) == [
        f"{c}_{n}.png" for c in ("benign", "malignant") for n in range(4)
    ]
    assert sorted(
        (s.path.name, s.reason.split(" (")[0], s.reason.split("(")[1].split(":")[0]) for s in index.skipped
    ) == [
        ("benign_1_report.dcm", "not an image", "no_pixel_data"),
        ("benign_3_report.dcm", "not an image", "no_pixel_data"),
        ("capture.dcm", "not an image", "own_output"),
        ("malignant_1_report.dcm", "not an image", "no_pixel_data"),
        ("malignant_3_report.dcm", "not an image", "no_pixel_data"),
    ]


def test_a_file_over_max_file_bytes_is_skipped_as_too_large_and_never_read(tmp_path: Path) -> None:
    """A slide or a video saved among the images: read whole, it took its size in memory, then failed
    to decode; the daemon and the evaluator refuse it by its size."""
    for cls in ("benign", "malignant"):
        for n in range(20):
            write_png(tmp_path / cls / f"{cls}_{n}.png", pixels(n))
    with open(tmp_path / "benign" / "huge.png", "wb") as sparse:  # 6 GiB that take no disk: a hole
        sparse.truncate(6 * 1024**3)
    index = load_dataset(tmp_path, max_bad_fraction=0.05)
    assert len(index.samples) == 40
    assert [(s.path.name, s.reason) for s in index.skipped] == [
        (
            "huge.png",
            f"unreadable image (too_large: the file holds {6 * 1024**3} bytes, over max_file_bytes "
            f"({4 * 1024**3}); it was not read)",
        )
    ]


def test_a_manifest_row_with_several_labels_for_a_single_label_task_is_refused_naming_its_row(tmp_path: Path) -> None:
    """A "benign|malignant" row made the manifest multilabel for busi_binary: inspect said so, and
    retraining failed after its first epoch (exit 1)."""
    for n in range(4):
        write_png(tmp_path / "img" / f"{n}.png", pixels(n))
    manifest = tmp_path / "labels.csv"
    manifest.write_text("path,label\nimg/0.png,benign\nimg/1.png,benign|malignant\nimg/2.png,malignant\n")
    with pytest.raises(DatasetError, match=r"row 3 has label 'benign\|malignant'.*one of benign, malignant"):
        load_dataset(manifest, BUILTIN_TASKS["busi_binary"])


def test_an_idc_patch_named_for_the_other_class_is_skipped_whatever_the_case_of_its_extension(tmp_path: Path) -> None:
    """``10253/0/..._class1.PNG`` counted as a negative; ``.png`` was skipped, naming why."""
    for folder, name in (("0", "10253_idx5_x1_y1_class0.png"), ("1", "10253_idx5_x2_y2_class1.png"),
                         ("0", "10253_idx5_x3_y3_class1.PNG"), ("1", "10253_idx5_x4_y4_class1.PNG")):  # fmt: skip
        write_png(tmp_path / "10253" / folder / name, pixels(len(name) + int(folder)))
    index = load_dataset(tmp_path, BUILTIN_TASKS["histopathology"])
    assert sorted(s.path.name for s in index.samples) == [
        "10253_idx5_x1_y1_class0.png",
        "10253_idx5_x2_y2_class1.png",
        "10253_idx5_x4_y4_class1.PNG",
    ]
    assert [(s.path.name, s.reason) for s in index.skipped] == [
        ("10253_idx5_x3_y3_class1.PNG", "named class1 but filed under 0/")
    ]


def test_an_nih_row_repeated_is_one_image_and_a_repeat_with_other_findings_is_refused(tmp_path: Path) -> None:
    """A repeated row was two samples of one file, then dropped as "the same bytes as" itself (and
    counted in the 5 %)."""
    for name in ("00000001_000.png", "00000002_000.png"):
        write_png(tmp_path / "images" / name, pixels(len(name)))
    rows = "00000001_000.png,Mass,0,1,58,M,PA\n00000002_000.png,No Finding,0,2,40,F,PA\n"
    (tmp_path / "Data_Entry_2017.csv").write_text(ENTRY_HEADER + rows + "00000001_000.png,Mass,0,1,58,M,PA\n")
    index = load_dataset(tmp_path, BUILTIN_TASKS["chestxray14"])
    assert [s.path.name for s in index.samples] == ["00000001_000.png", "00000002_000.png"]
    assert "Data_Entry_2017.csv: 1 row(s) repeat an image listed before (rows 4): read once" in index.warnings
    (tmp_path / "Data_Entry_2017.csv").write_text(ENTRY_HEADER + rows + "00000001_000.png,Effusion,0,1,58,M,PA\n")
    with pytest.raises(DatasetError, match=r"rows 2 and 4 list 00000001_000\.png with different findings"):
        load_dataset(tmp_path, BUILTIN_TASKS["chestxray14"])


def _covid_collection(root: Path, findings: list[str]) -> Path:
    """A SYNTHETIC covid-chestxray-dataset: one frontal X-ray per finding, a patient each."""
    rows = ["patientid,finding,view,modality,folder,filename"]
    for n, finding in enumerate(findings):
        write_png(root / "images" / f"synthetic_{n}.png", pixels(n))
        rows.append(f'{n},"{finding}",PA,X-ray,images,synthetic_{n}.png')
    (root / "metadata.csv").write_text("\n".join(rows) + "\n")
    return root


def test_a_covid_finding_listed_with_another_is_covid_as_the_2020_releases_write_it(tmp_path: Path) -> None:
    """The 2020 releases of the collection (seed 004's) write flat findings such as ``COVID-19, ARDS``:
    those rows were left out as "neither COVID-19 nor No Finding", COVID cases lost."""
    root = _covid_collection(
        tmp_path / "covid", ["COVID-19, ARDS", "Pneumonia/Viral/COVID-19", "COVID-19", "No Finding", "SARS"]
    )
    index = load_dataset(root, BUILTIN_TASKS["covid"], check_images=False)
    assert [(s.path.name, s.labels) for s in index.samples] == [
        ("synthetic_0.png", ("covid",)),
        ("synthetic_1.png", ("covid",)),
        ("synthetic_2.png", ("covid",)),
        ("synthetic_3.png", ("normal",)),
    ]
    assert [s.path.name for s in index.skipped] == ["synthetic_4.png"]


@pytest.mark.parametrize("folder", ["normal", "NORMAL", "Normal"])
def test_a_folder_of_normal_images_beside_the_collection_is_read_whatever_its_case(tmp_path: Path, folder: str) -> None:
    """Kaggle's chest-xray-pneumonia, where seed 004's normals come from, names it ``NORMAL/``: its
    images were neither read nor said to be left out."""
    root = _covid_collection(tmp_path / "covid", ["COVID-19", "No Finding"])
    for n in range(3):
        write_png(root / folder / f"synthetic_normal_{n}.png", pixels(10 + n))
    index = load_dataset(root, BUILTIN_TASKS["covid"], check_images=False)
    assert sorted(s.path.name for s in index.samples if s.labels == ("normal",)) == [
        "synthetic_1.png",
        "synthetic_normal_0.png",
        "synthetic_normal_1.png",
        "synthetic_normal_2.png",
    ]


def test_a_table_row_of_more_values_than_its_header_is_refused_naming_its_line(tmp_path: Path) -> None:
    """An unquoted comma in a value (``COVID-19, ARDS`` typed into a spreadsheet's CSV) shifted the
    row's cells: its image was looked for in a "modality" PA, and left out by the layout's rules
    without a word. The same row's values quoted is read; trailing empty cells are no values."""
    root = write_phantoms("covid", tmp_path / "covid", count=2, size=32).root
    table = root / "metadata.csv"
    lines = table.read_text().splitlines(keepends=True)
    header = lines[0].rstrip("\r\n").split(",")
    finding = header.index("finding")
    cells = lines[2].rstrip("\r\n").split(",")
    read_before = len(load_dataset(root, BUILTIN_TASKS["covid"]).samples)
    quoted = ",".join([*cells[:finding], f'"{cells[finding]}, ARDS"', *cells[finding + 1 :]]) + ",,\n"
    table.write_text("".join([*lines[:2], quoted, *lines[3:]]))
    assert len(load_dataset(root, BUILTIN_TASKS["covid"]).samples) == read_before
    unquoted = ",".join([*cells[:finding], f"{cells[finding]}, ARDS", *cells[finding + 1 :]]) + "\n"
    table.write_text("".join([*lines[:2], unquoted, *lines[3:]]))
    with pytest.raises(DatasetError, match=f"line 3: {len(header) + 1} values but the header has {len(header)}"):
        load_dataset(root, BUILTIN_TASKS["covid"])
    manifest = tmp_path / "m.csv"
    manifest.write_text("path,label\na.png,benign,extra,cells\n")
    with pytest.raises(DatasetError, match="line 2: 4 values but the header has 2"):
        load_dataset(manifest)


def test_a_label_table_whose_stray_quote_swallows_rows_is_refused_naming_its_line(tmp_path: Path) -> None:
    """``"5 mm`` opening a free-text note made the rows after it part of that note, up to the next
    quote: their images were left out of the dataset (and of an evaluation's cohort) without a word.
    A note over several lines, as pandas writes one, is read."""
    root = write_phantoms("covid", tmp_path / "covid", count=2, size=32).root
    table = root / "metadata.csv"
    lines = table.read_text().splitlines(keepends=True)
    read_before = len(load_dataset(root, BUILTIN_TASKS["covid"]).samples)
    noted = lines[2].replace("CC0,SYNTHETIC phantom,", 'CC0,"Fever.\nBilateral, patchy, opacities",', 1)
    table.write_text("".join([*lines[:2], noted, *lines[3:]]))
    assert len(load_dataset(root, BUILTIN_TASKS["covid"]).samples) == read_before
    stray = [*lines[:2], lines[2].replace("CC0,SYNTHETIC phantom,", 'CC0,"SYNTHETIC phantom 5 mm,', 1), *lines[3:]]
    stray[4] = stray[4].replace("CC0,SYNTHETIC phantom,", 'CC0,see "prior" scan,', 1)
    table.write_text("".join(stray))
    with pytest.raises(DatasetError, match="line 3: not a readable CSV: ',' expected after"):
        load_dataset(root, BUILTIN_TASKS["covid"])
    table.write_text("".join(stray[:4]))  # the quote never closed
    with pytest.raises(DatasetError, match="line 3: a quote opened on this line is never closed"):
        load_dataset(root, BUILTIN_TASKS["covid"])
