"""``medcli dataset inspect``: the layout, counts, patients and split of a dataset; a clear error for a
folder that is no dataset."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner

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


def test_inspect_names_a_folder_that_is_no_dataset(tmp_path: Path) -> None:
    (tmp_path / "readme.md").write_text("nothing here")
    result = CliRunner().invoke(medcli, ["dataset", "inspect", str(tmp_path)])
    assert result.exit_code == 1
    assert f"error: {tmp_path}: matches no dataset layout" in result.output
