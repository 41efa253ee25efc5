"""Paths in the database are relative to the state directory (absolute outside it), so a daemon
restarted from another folder, or ``medcli`` run from anywhere, finds the files (issue 12, fault 3).

Every image here is SYNTHETIC (pixels from a seeded generator); the model is untrained.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from dicom_factory import write_png
from sqlalchemy import select

from meddaemon.cli.medcli import cli as medcli
from meddaemon.config import load_settings
from meddaemon.daemon.service import Daemon
from meddaemon.db.models import Heatmap, Scan
from meddaemon.stored_paths import stored_file, stored_name, stored_spellings
from model_factory import promote_into, read_pdf, write_model


def test_a_file_under_the_state_dir_is_stored_relative_and_read_back_under_it(tmp_path: Path):
    state = tmp_path / "state"
    assert stored_name(state / "work" / "ab" / "ab12.png", state) == "work/ab/ab12.png"
    assert stored_file("work/ab/ab12.png", tmp_path / "moved") == tmp_path / "moved" / "work" / "ab" / "ab12.png"


def test_a_file_outside_the_state_dir_and_an_older_absolute_row_stay_absolute(tmp_path: Path):
    state = tmp_path / "state"
    assert stored_name(tmp_path / "inbox" / "a.png", state) == str(tmp_path / "inbox" / "a.png")
    assert stored_file("/srv/old/state/work/ab/ab12.png", state) == Path("/srv/old/state/work/ab/ab12.png")
    assert stored_spellings(state / "archive" / "a.png", state) == ("archive/a.png", str(state / "archive" / "a.png"))


def test_scans_stored_from_one_folder_are_inferred_and_reported_from_others(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    first, second, third = (tmp_path / name for name in ("first", "second", "third"))
    for folder in (first, second, third):
        folder.mkdir()
    rng = np.random.default_rng(12)
    write_png(first / "inbox" / "busi" / "synthetic_a.png", rng.integers(0, 255, (32, 32), np.uint8))

    # a daemon started in one folder with relative paths, no model yet: the scan waits in work/
    monkeypatch.chdir(first)
    flags = {"watch": "inbox", "state_dir": "state", "stable_seconds": 0.0, "workers": 0, "reports": False}
    Daemon(load_settings(env={}, flags=flags)).run(once=True)
    state = first / "state"
    settings = load_settings(env={}, flags={**flags, "watch": first / "inbox", "state_dir": state})
    promote_into(settings.db_url, settings.models_dir, write_model(tmp_path / "model"))

    # restarted from another folder: the waiting scan's file is found and inferred
    monkeypatch.chdir(second)
    Daemon(load_settings(env={}, flags={**flags, "watch": "../first/inbox", "state_dir": "../first/state"})).run(
        once=True
    )
    daemon = Daemon(settings)
    with daemon.sessions() as session:
        [scan] = session.scalars(select(Scan)).all()
        heatmaps = session.scalars(select(Heatmap)).all()
        assert scan.state == "inferred" and scan.stored_path == f"work/{scan.sha256[:2]}/{scan.sha256}.png"
        assert heatmaps and all(not Path(h.overlay_path).is_absolute() for h in heatmaps)
        scan_id = scan.id

    # and medcli, from a third folder, finds the scan, its overlay and writes its report
    monkeypatch.chdir(third)
    runner = CliRunner()
    listed = runner.invoke(medcli, ["scans", "--state-dir", str(state), "--json"])
    assert listed.exit_code == 0, listed.output
    assert Path(json.loads(listed.stdout)[0]["stored_path"]).is_file()
    result = runner.invoke(medcli, ["report", str(scan_id), "--state-dir", str(state), "--json"])
    assert result.exit_code == 0, result.output
    written = json.loads(result.stdout)
    _, pages, images, _ = read_pdf(Path(written["path"]))
    assert pages >= 1 and images >= 3  # the scan as the model saw it, its overlay, the colour scale
    assert not list(third.iterdir())  # nothing written relative to the working directory
