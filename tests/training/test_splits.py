"""Splits: no patient and no near-duplicate group on two sides (these tests fail if the grouping
breaks), stratified within tolerance, the same for the same seed, NIH's official test list kept,
saved and loaded as JSON, and a report of what was merged or dropped and why."""

from __future__ import annotations

import shutil
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from dicom_factory import write_png
from PIL import Image

from meddaemon.engine.tasks import BUILTIN_TASKS
from meddaemon.training.datasets import DatasetIndex, load_dataset
from meddaemon.training.phantoms import PhantomSet, write_phantoms
from meddaemon.training.splits import SPLITS, DatasetSplit, SplitConfig, load_split, make_split, save_split


def load(phantoms: dict[str, PhantomSet], task: str) -> DatasetIndex:
    return load_dataset(phantoms[task].root, BUILTIN_TASKS[task], check_images=False)


def sides_by_patient(index: DatasetIndex, split: DatasetSplit) -> dict[str, set[str]]:
    sides: dict[str, set[str]] = defaultdict(set)
    for sample in index.samples:
        side = split.assignments.get(index.relative(sample.path))
        if side is not None and sample.patient_id is not None:
            sides[sample.patient_id].add(side)
    return sides


@pytest.mark.parametrize("task", ["chestxray14", "covid", "histopathology"])
def test_no_patient_lands_on_two_sides(phantoms: dict[str, PhantomSet], task: str) -> None:
    index = load(phantoms, task)
    split = make_split(index, SplitConfig(seed=1))
    sides = sides_by_patient(index, split)
    assert len(sides) == index.patients()
    assert {p: s for p, s in sides.items() if len(s) > 1} == {}
    assert len({side for s in sides.values() for side in s}) == 3


def test_no_near_duplicate_lands_on_two_sides(phantoms: dict[str, PhantomSet]) -> None:
    written = phantoms["busi"]
    index = load(phantoms, "busi")
    for seed in range(5):
        split = make_split(index, SplitConfig(seed=seed))
        kept = [(a, b) for a, b in written.near_duplicates if a in split.assignments and b in split.assignments]
        assert kept, "some planted pairs share a class and must stay in the split"
        assert [(a, b) for a, b in kept if split.assignments[a] != split.assignments[b]] == []


def test_near_duplicates_labelled_differently_are_dropped_and_reported(phantoms: dict[str, PhantomSet]) -> None:
    split = make_split(load(phantoms, "busi"))
    crossed = [(a, b) for a, b in phantoms["busi"].near_duplicates if a.split("/")[0] != b.split("/")[0]]
    assert crossed
    dropped = {d.path: d.reason for d in split.report.dropped}
    for a, b in crossed:
        assert a not in split.assignments and b not in split.assignments
        assert "labelled differently" in dropped[a] and b in dropped[a]
    assert any(m.why == "near-duplicate" for m in split.report.merged)
    assert any("near-duplicates kept together" in line for line in split.report.lines())


def test_identical_files_are_kept_once_or_dropped_when_labelled_differently(
    phantoms: dict[str, PhantomSet], tmp_path: Path
) -> None:
    root = shutil.copytree(phantoms["covid"].root, tmp_path / "covid")
    index = load_dataset(root, BUILTIN_TASKS["covid"], check_images=False)
    covid = next(s.path for s in index.samples if s.labels == ("covid",))
    normal = next(s.path for s in index.samples if s.labels == ("normal",))
    (root / "normal").mkdir()
    shutil.copy(covid, root / "normal" / "copy_of_covid.png")
    shutil.copy(normal, root / "normal" / "copy_of_normal.png")
    split = make_split(load_dataset(root, BUILTIN_TASKS["covid"], check_images=False))
    covid_name, normal_name = index.relative(covid), index.relative(normal)
    left_out = {index.relative(s.path) for s in index.skipped}
    assert {d.path: d.reason for d in split.report.dropped if d.path not in left_out} == {
        covid_name: f"identical files labelled differently: {covid_name}, normal/copy_of_covid.png",
        "normal/copy_of_covid.png": f"identical files labelled differently: {covid_name}, normal/copy_of_covid.png",
        "normal/copy_of_normal.png": f"the same bytes as {normal_name}",
    }
    assert normal_name in split.assignments


def test_classes_are_stratified_within_tolerance(phantoms: dict[str, PhantomSet]) -> None:
    index = load(phantoms, "busi")
    config = SplitConfig(fractions=(0.6, 0.2, 0.2), seed=3)
    split = make_split(index, config)
    for label in index.labels:
        total = sum(split.report.counts[s][label] for s in SPLITS)
        for side, fraction in zip(SPLITS, config.fractions, strict=True):
            assert abs(split.report.counts[side][label] / total - fraction) <= 0.12, (label, side)


def test_the_histopathology_preset_tests_on_a_fifth_and_validates_on_a_tenth_as_seed_002(tmp_path: Path) -> None:
    """Seed 002: "train, test and validation sets containing 70%, 20% and 10%". The recipe read its
    (0.7, 0.2, 0.1) as (train, validation, test): its test metrics came from half the seed's share."""
    spec = BUILTIN_TASKS["histopathology"]
    written = write_phantoms("histopathology", tmp_path / "idc", count=150, size=32)  # SYNTHETIC patches
    index = load_dataset(written.root, spec, check_images=False)
    split = make_split(index, SplitConfig(spec.recipe.split, seed=0))
    images = {side: sum(split.report.counts[side].values()) for side in SPLITS}
    total = sum(images.values())
    assert abs(images["test"] / total - 0.2) <= 0.06 and abs(images["val"] / total - 0.1) <= 0.06, images
    assert images["test"] > images["val"]


def test_the_same_seed_gives_the_same_split_and_another_seed_another(phantoms: dict[str, PhantomSet]) -> None:
    index = load(phantoms, "covid")
    first = make_split(index, SplitConfig(seed=11))
    assert make_split(index, SplitConfig(seed=11)).assignments == first.assignments
    assert make_split(index, SplitConfig(seed=12)).assignments != first.assignments


def test_the_official_nih_test_list_is_the_test_set(phantoms: dict[str, PhantomSet]) -> None:
    index = load(phantoms, "chestxray14")
    split = make_split(index)
    official = {index.relative(p) for p in index.official_test or ()}
    assert set(split.names("test")) == official
    assert split.names("train") and split.names("val")


def test_a_training_image_identical_to_an_official_test_image_never_keeps_its_patient_in_training(
    phantoms: dict[str, PhantomSet], tmp_path: Path
) -> None:
    """The first of identical files was kept: a copy of an official test image listed earlier, under
    a training patient, stayed in training and the test image was dropped (the test set one short,
    the patient's own picture trained on)."""
    root = shutil.copytree(phantoms["chestxray14"].root, tmp_path / "nih")
    index = load_dataset(root, BUILTIN_TASKS["chestxray14"], check_images=False)
    official = {index.relative(p) for p in index.official_test or ()}
    by_name = {index.relative(s.path): s for s in index.samples}
    tested = next(by_name[n] for n in sorted(official))
    copy = next(s for n, s in sorted(by_name.items()) if n not in official and s.patient_id != tested.patient_id)
    shutil.copy(tested.path, copy.path)
    entries = root / "Data_Entry_2017.csv"
    lines = entries.read_text().splitlines()
    labels = "|".join(tested.labels) or "No Finding"
    lines = [
        ",".join([parts[0], labels, *parts[2:]]) if (parts := line.split(","))[0] == copy.path.name else line
        for line in lines
    ]
    entries.write_text("\n".join(lines) + "\n")

    reloaded = load_dataset(root, BUILTIN_TASKS["chestxray14"], check_images=False)
    split = make_split(reloaded)

    assert set(split.names("test")) == official
    dropped = {d.path: d.reason for d in split.report.dropped}
    assert dropped[index.relative(copy.path)] == f"the same bytes as {index.relative(tested.path)}"
    copied_patient = {index.relative(s.path) for s in reloaded.samples if s.patient_id == copy.patient_id}
    assert copied_patient.isdisjoint(split.names("train")) and copied_patient.isdisjoint(split.names("val"))


def test_a_blank_patch_repeated_in_every_patient_joins_them_and_the_report_says_so(tmp_path: Path) -> None:
    """Byte-identical copies join their patients (above); one content-free patch in every patient's
    folder chained them all into one group, the validation side came out empty, and the report
    said nothing of it (no merge listed, no warning of a group too large)."""
    written = write_phantoms("histopathology", tmp_path / "idc", count=16, size=50)  # SYNTHETIC patches
    blank = np.full((50, 50, 3), 243, np.uint8)
    patients = sorted(p.name for p in written.root.iterdir() if p.is_dir())
    for patient in patients:
        write_png(written.root / patient / "0" / f"{patient}_idx5_x950_y950_class0.png", blank)
    split = make_split(load_dataset(written.root, BUILTIN_TASKS["histopathology"], check_images=False))
    lines = split.report.lines()
    assert split.report.groups == 1
    assert any(line.startswith("  identical copies, their patients kept together: ") for line in lines)
    assert any(w.startswith("one group holds ") for w in split.report.warnings)


def test_the_report_counts_images_per_side_not_labels(phantoms: dict[str, PhantomSet]) -> None:
    split = make_split(load(phantoms, "chestxray14"))  # multilabel: an image may carry several labels
    images = {side: len(split.names(side)) for side in SPLITS}
    assert split.report.images == images
    assert sum(images.values()) < sum(sum(c.values()) for c in split.report.counts.values())
    assert split.report.lines()[0].endswith(", ".join(f"{side}: {n}" for side, n in images.items()))


def test_every_side_of_a_multilabel_split_counts_no_finding_even_where_it_is_zero(
    phantoms: dict[str, PhantomSet],
) -> None:
    """A side without an image of no finding had no "No Finding" count at all, where the others had
    one: the manifest's ``split_counts`` and ``dataset inspect`` read a missing key for a zero."""
    index = load(phantoms, "chestxray14")
    index.samples = [s for s in index.samples if s.labels]
    index.official_test = None
    split = make_split(index)
    assert [list(split.report.counts[side]) for side in SPLITS] == [[*index.labels, "No Finding"]] * len(SPLITS)
    assert all(split.report.counts[side]["No Finding"] == 0 for side in SPLITS)


def test_a_split_is_saved_next_to_a_model_and_loaded_back(phantoms: dict[str, PhantomSet], tmp_path: Path) -> None:
    index = load(phantoms, "histopathology")
    split = make_split(index, SplitConfig(seed=5))
    path = save_split(split, tmp_path / "model")
    assert path == tmp_path / "model" / "split.json"
    loaded = load_split(tmp_path / "model")
    assert loaded.as_dict() == split.as_dict()
    assert [s.path for s in loaded.samples(index, "test")] == [s.path for s in split.samples(index, "test")]


def test_an_image_that_cannot_be_decoded_is_dropped_from_the_split(
    phantoms: dict[str, PhantomSet], tmp_path: Path
) -> None:
    root = shutil.copytree(phantoms["histopathology"].root, tmp_path / "idc")
    broken = next(root.glob("*/1/*.png"))
    broken.write_bytes(b"not a png")
    index = load_dataset(root, BUILTIN_TASKS["histopathology"], check_images=False)
    split = make_split(index)
    name = index.relative(broken)
    assert name not in split.assignments
    assert [d.reason for d in split.report.dropped if d.path == name] == [
        "unreadable image (the bytes are not DICOM, PNG, JPEG or TIFF)"
    ]


def folder_per_class(root: Path, conflicts: int) -> DatasetIndex:
    """SYNTHETIC noise images, 20 per class, and ``conflicts`` images of class a copied into class b
    with one pixel changed (other bytes, the same picture)."""
    rng = np.random.default_rng(21)
    for label in ("a", "b"):
        for k in range(20):
            write_png(root / label / f"{label}_{k:02d}.png", rng.integers(0, 255, (64, 64), dtype=np.uint8))
    for k in range(conflicts):
        pixels = np.asarray(Image.open(root / "a" / f"a_{k:02d}.png")).copy()
        pixels[0, 0] ^= 1
        write_png(root / "b" / f"copy_of_a_{k:02d}.png", pixels)
    return load_dataset(root, None, check_images=False)


def test_dropping_more_than_five_percent_of_the_images_is_warned_about(tmp_path: Path) -> None:
    split = make_split(folder_per_class(tmp_path / "ds", conflicts=2))

    assert len(split.report.dropped) == 4
    assert split.report.dropped_by_cause() == {"near-duplicates labelled differently": 4}
    [warning] = [w for w in split.report.warnings if "dropped" in w]
    assert warning.startswith("4 of 42 images (9.5%) are dropped, more than 5%")
    assert "4 near-duplicates labelled differently" in warning
    lines = split.report.lines()
    assert "dropped: 4; 4 near-duplicates labelled differently" in lines
    assert any(line.startswith("  b/copy_of_a_01.png: near-duplicates labelled differently") for line in lines)


def test_dropping_five_percent_or_fewer_is_not_warned_about(tmp_path: Path) -> None:
    split = make_split(folder_per_class(tmp_path / "ds", conflicts=1))

    assert len(split.report.dropped) == 2
    assert not [w for w in split.report.warnings if "dropped" in w]


def test_a_manifest_row_listed_twice_is_read_once_and_counted_once(tmp_path: Path) -> None:
    """Reported dropped as 'the same bytes', the second row was kept all the same: its image was
    counted, trained or tested twice. Then it was dropped as a copy of itself, counted in the dropped
    share; now the manifest is read with the row once, and says so."""
    rng = np.random.default_rng(12)
    rows = []
    for i in range(30):
        label = ("benign", "malignant", "normal")[i % 3]
        write_png(tmp_path / "img" / f"synthetic_{i:02}.png", rng.integers(0, 255, (64, 64), dtype=np.uint8))
        rows.append(f"img/synthetic_{i:02}.png,{label}")
    rows.append(rows[0])
    (tmp_path / "labels.csv").write_text("path,label\n" + "\n".join(rows) + "\n")
    read = load_dataset(tmp_path / "labels.csv", BUILTIN_TASKS["busi"], check_images=False)
    assert read.warnings == ["labels.csv: 1 row(s) repeat an image named before (rows 32): read once"]
    split = make_split(read)
    assert split.report.dropped == []
    assert sum(split.report.images.values()) == len(split.assignments) == 30
    assert sum(sum(counts.values()) for counts in split.report.counts.values()) == 30
    index = load_dataset(tmp_path / "labels.csv", BUILTIN_TASKS["busi"], check_images=False)
    for side in ("train", "val", "test"):  # what training and its test read: the row kept, not its copy too
        assert sorted(index.relative(s.path) for s in split.samples(index, side)) == split.names(side)


def test_copies_of_a_multilabel_image_with_its_labels_in_another_order_are_one_labelling(tmp_path: Path) -> None:
    """``Effusion|Mass`` and ``Mass|Effusion`` on two copies of one image were "labelled differently":
    both dropped."""
    rng = np.random.default_rng(21)
    rows = []
    for i in range(30):
        write_png(tmp_path / "img" / f"synthetic_{i:02}.png", rng.integers(0, 255, (64, 64), dtype=np.uint8))
        rows.append(f"img/synthetic_{i:02}.png,{('Effusion|Mass', 'Mass', 'Effusion')[i % 3]}")
    shutil.copyfile(tmp_path / "img" / "synthetic_00.png", tmp_path / "img" / "copy.png")
    rows.append("img/copy.png,Mass|Effusion")
    (tmp_path / "labels.csv").write_text("path,label\n" + "\n".join(rows) + "\n")

    split = make_split(load_dataset(tmp_path / "labels.csv", BUILTIN_TASKS["chestxray14"], check_images=False))

    assert [(d.path, d.cause) for d in split.report.dropped] == [("img/copy.png", "identical-copy")]


def test_rows_the_covid_layout_leaves_out_by_its_rules_are_not_counted_as_dropped_images(tmp_path: Path) -> None:
    """The collection is mostly other findings, CT slices and lateral views, which the layout leaves
    out as documented: counted as dropped images, every split of it warned "more than 5% dropped",
    burying a warning that means something. They are listed, not counted."""
    rng = np.random.default_rng(7)
    rows = ["patientid,finding,view,modality,folder,filename"]
    kept = [("COVID-19", "PA", "X-ray")] * 6 + [("No Finding", "PA", "X-ray")] * 6
    left_out = [("COVID-19", "L", "X-ray"), ("COVID-19", "Axial", "CT"), ("Pneumonia/Bacterial", "PA", "X-ray")] * 2
    for n, (finding, view, modality) in enumerate(kept + left_out):
        write_png(tmp_path / "images" / f"synthetic_{n:02}.png", rng.integers(0, 255, (32, 32), dtype=np.uint8))
        rows.append(f"{n},{finding},{view},{modality},images,synthetic_{n:02}.png")
    (tmp_path / "metadata.csv").write_text("\n".join(rows) + "\n")
    index = load_dataset(tmp_path, BUILTIN_TASKS["covid"], check_images=False)

    split = make_split(index, SplitConfig(seed=1))

    assert len(split.report.dropped) == 6  # listed, with the layout's reasons
    assert split.report.dropped_by_cause() == {"left out by the layout's rules, or no image": 6}
    assert not [w for w in split.report.warnings if "dropped" in w]
