"""``medcli dataset inspect``: the layout, counts, patients and split of a dataset; a clear error for a
folder that is no dataset."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from click.testing import CliRunner
from dicom_factory import write_png
from PIL import Image

from meddaemon.cli.medcli import cli as medcli
from meddaemon.training.phantoms import write_phantoms


def test_inspect_reports_layout_counts_patients_and_split(tmp_path: Path) -> None:
    root = write_phantoms("histopathology", tmp_path / "idc", count=6, size=50, seed=2).root
    result = CliRunner().invoke(medcli, ["dataset", "inspect", str(root), "--task", "histopathology", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["layout"] == "idc" and report["patients"] == 6
    assert report["counts"] == {"idc_negative": 6, "idc_positive": 6}
    assert sum(sum(c.values()) for c in report["split"]["counts"].values()) == 12
    assert sum(1 for m in report["split"]["merged"] if m["why"] == "patient") == 6


def test_inspect_prints_the_split_report(tmp_path: Path) -> None:
    root = write_phantoms("busi", tmp_path / "busi", count=6, size=48, seed=2).root
    result = CliRunner().invoke(medcli, ["dataset", "inspect", str(root)])
    assert result.exit_code == 0, result.output
    assert "busi dataset at" in result.output and "benign 6  malignant 6  normal 6" in result.output
    assert "near-duplicates labelled differently" in result.output


def test_inspect_names_a_folder_that_is_no_dataset_and_exits_2(tmp_path: Path) -> None:
    (tmp_path / "readme.md").write_text("nothing here")
    result = CliRunner().invoke(medcli, ["dataset", "inspect", str(tmp_path)])
    assert result.exit_code == 2  # bad input, like retrain's bad data
    assert f"error: {tmp_path}: matches no dataset layout" in result.output


def test_inspect_refuses_a_seed_no_split_can_take_before_reading_the_dataset(tmp_path: Path) -> None:
    """A negative seed was numpy's ValueError as a traceback, exit 1."""
    root = write_phantoms("busi", tmp_path / "busi", count=6, size=48, seed=2).root
    result = CliRunner().invoke(medcli, ["dataset", "inspect", str(root), "--seed", "-1"])
    assert result.exit_code == 2 and "Invalid value for '--seed'" in result.output
    assert "Traceback" not in result.output


def test_inspect_shows_progress_on_stderr_and_hashes_in_workers_like_one_by_one(tmp_path: Path) -> None:
    root = write_phantoms("busi", tmp_path / "busi", count=12, size=48, seed=2).root
    runner = CliRunner()

    parallel = runner.invoke(medcli, ["dataset", "inspect", str(root), "--workers", "2"], env={"TTY_COMPATIBLE": "1"})
    serial = runner.invoke(medcli, ["dataset", "inspect", str(root), "--workers", "1"])

    assert parallel.exit_code == 0 and serial.exit_code == 0, parallel.output + serial.output
    assert "decoding and hashing" in parallel.stderr and "36/36" in parallel.stderr
    assert parallel.stdout == serial.stdout


def test_inspect_warns_on_stderr_when_more_than_five_percent_is_dropped(tmp_path: Path) -> None:
    rng = np.random.default_rng(21)
    for label in ("a", "b"):
        for k in range(10):
            write_png(tmp_path / "ds" / label / f"{label}_{k}.png", rng.integers(0, 255, (64, 64), dtype=np.uint8))
    pixels = np.asarray(Image.open(tmp_path / "ds" / "a" / "a_0.png")).copy()
    pixels[0, 0] ^= 1  # other bytes, the same picture, under the other class
    write_png(tmp_path / "ds" / "b" / "copy_of_a_0.png", pixels)

    result = CliRunner().invoke(medcli, ["dataset", "inspect", str(tmp_path / "ds")])

    assert result.exit_code == 0, result.output
    assert "WARNING: 2 of 21 images (9.5%) are dropped, more than 5%" in result.stderr
    assert "b/copy_of_a_0.png: near-duplicates labelled differently" in result.stdout


def test_inspect_reads_a_custom_task_of_the_config_as_retrain_does(tmp_path: Path) -> None:
    """--task took the five presets only: `medcli tasks` listed knee and `retrain knee` trained it,
    while `dataset inspect --task knee` was "'knee' is not one of 'busi', ..."."""
    config = tmp_path / "meddaemon.toml"
    config.write_text(
        '[tasks.knee]\ndescription = "knee (SYNTHETIC)"\nlabels = ["ok", "torn"]\nkind = "binary"\n'
        'architecture = "small_cnn"\n[tasks.knee.contract]\nchannels = 1\nheight = 64\nwidth = 64\n'
    )
    rng = np.random.default_rng(4)
    for label in ("ok", "torn"):
        for n in range(6):
            write_png(tmp_path / "knee" / label / f"synthetic_{n}.png", rng.integers(0, 255, (40, 40), dtype=np.uint8))
    args = ["dataset", "inspect", str(tmp_path / "knee"), "--config", str(config), "--no-split", "--json"]

    result = CliRunner().invoke(medcli, [*args, "--task", "knee"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["counts"] == {"ok": 6, "torn": 6}
    unknown = CliRunner().invoke(medcli, [*args, "--task", "knees"])
    assert unknown.exit_code == 2 and "unknown task 'knees'; known: busi, busi_binary" in unknown.output
