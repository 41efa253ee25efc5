"""``medcli report``: rebuild a scan's or a study's report, the summary of a period; exit codes."""

from __future__ import annotations

import hashlib
import json
import stat
from pathlib import Path

import pytest
from click.testing import CliRunner
from sqlalchemy import select

from meddaemon.cli.medcli import cli as medcli
from meddaemon.daemon.service import Daemon
from meddaemon.db.models import Report, Scan
from model_factory import PHI_STRINGS, STUDY_UID, ReportedStates, read_pdf


@pytest.fixture(scope="module")
def state(tmp_path_factory: pytest.TempPathFactory, reported_states: ReportedStates) -> Daemon:
    return reported_states.copy(tmp_path_factory.mktemp("cli"))


def run(state: Daemon, *args: str, code: int = 0) -> str:
    result = CliRunner().invoke(medcli, [*args, "--state-dir", str(state.settings.state_dir)])
    assert result.exit_code == code, result.output
    return result.output


def a_scan(state: Daemon, name: str) -> Scan:
    with state.sessions() as session:
        scan = session.scalar(select(Scan).where(Scan.source_name == name))
    assert scan is not None
    return scan


def test_report_help_names_the_three_reports(state: Daemon):
    out = CliRunner().invoke(medcli, ["report", "--help"]).output
    assert "SCAN_ID|SHA256" in out and "scan" in out and "study" in out and "summary" in out


def test_a_scan_report_is_rebuilt_by_id_or_sha256_in_place_with_its_row_updated(state: Daemon):
    scan = a_scan(state, "synthetic_study_0.dcm")
    assert scan.sha256 is not None
    by_id = json.loads(run(state, "report", str(scan.id), "--json"))
    by_sha = json.loads(run(state, "report", "scan", scan.sha256, "--json"))
    by_prefix = json.loads(run(state, "report", scan.sha256[:10], "--json"))
    assert by_id["path"] == by_sha["path"] == by_prefix["path"]
    assert by_id["scan_id"] == scan.id and by_id["with_phi"] is False
    with state.sessions() as session:
        rows = session.scalars(
            select(Report).where(Report.path == state.settings.stored_name(Path(by_id["path"])))
        ).all()
    assert len(rows) == 1 and rows[0].sha256 == hashlib.sha256(Path(by_id["path"]).read_bytes()).hexdigest()


def test_options_before_the_scan_are_taken_as_after_it(state: Daemon, tmp_path: Path):
    """``medcli report --json 42`` was "No such option: --json" (exit 2): the scan, or the report's
    kind, was looked for only in the first place."""
    scan = a_scan(state, "synthetic_study_0.dcm")
    out = tmp_path / "before.pdf"
    state_dir = str(state.settings.state_dir)
    result = CliRunner().invoke(medcli, ["report", "--state-dir", state_dir, "--json", "--out", str(out), str(scan.id)])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["scan_id"] == scan.id and out.is_file()
    summary = CliRunner().invoke(medcli, ["report", "--state-dir", state_dir, "--since", "7d", "--json", "summary"])
    assert summary.exit_code == 0, summary.output
    assert "scans" in json.loads(summary.stdout)


def test_with_phi_and_out_write_elsewhere_with_the_patient_fields(state: Daemon, tmp_path: Path):
    scan = a_scan(state, "synthetic_study_1.dcm")
    out = tmp_path / "with_phi.pdf"
    line = run(state, "report", str(scan.id), "--with-phi", "--out", str(out))
    assert str(out) in line and "with PHI" in line
    text, *_ = read_pdf(out)
    assert all(phi in text for phi in PHI_STRINGS)


def test_a_study_report_and_errors_for_what_has_no_result(state: Daemon):
    written = json.loads(run(state, "report", "study", STUDY_UID, "--json"))
    assert written["kind"] == "study" and Path(written["path"]).exists()
    assert "no scan '999999'" in run(state, "report", "999999", code=2)
    empty = a_scan(state, "synthetic_empty.png")
    assert "has no result" in run(state, "report", str(empty.id), code=2)
    assert "no scan of this study" in run(state, "report", "study", "1.2.3.999", code=2)


def test_the_summary_as_json_and_as_a_pdf(state: Daemon, tmp_path: Path):
    figures = json.loads(run(state, "report", "summary", "--since", "24h", "--json"))
    assert figures["scans"] == 8 and figures["failures_by_reason"] == {"empty_file": 1}
    assert figures["report"] is None and set(figures["tasks"]) == {"busi", "chestxray14", "(unrouted)"}
    out = tmp_path / "day.pdf"
    lines = run(state, "report", "summary", "--since", "2020-01-01", "--out", str(out))
    assert "8 scans" in lines and str(out) in lines
    assert read_pdf(out)[1] == 1
    assert "neither a duration" in run(state, "report", "summary", "--since", "soon", code=2)
    # a period that ends before it starts was an empty summary, its PDF written and recorded, exit 0
    backwards = run(state, "report", "summary", "--since", "2026-12-06", "--until", "2026-12-01", "--json", code=2)
    assert "--until 2026-12-01 is not after --since 2026-12-06" in backwards
    assert "2099-01-01 is in the future" in run(state, "report", "summary", "--since", "2099-01-01", "--json", code=2)


def test_a_de_identified_study_report_still_says_its_scans_name_different_patients(
    reported_states: ReportedStates, tmp_path: Path
):
    """Only the report with PHI said so (it was told by the patient sections a de-identified report
    leaves out): the default report let 2 people's scans be read as one patient's study."""
    state = reported_states.copy(tmp_path / "copy")
    with state.sessions() as session, session.begin():
        first = session.scalars(select(Scan).where(Scan.study_instance_uid == STUDY_UID).order_by(Scan.id)).first()
        first.patient_name, first.patient_id = "SYNTHETIC^OTHER", "SYNTH-OTHER-ID"
    out = tmp_path / "study.pdf"
    run(state, "report", "study", STUDY_UID, "--out", str(out))
    text = " ".join(read_pdf(out)[0].split())
    assert "The scans of this study name 2 different patients (left out of this de-identified report)" in text
    assert "SYNTHETIC^OTHER" not in text and "SYNTH-OTHER-ID" not in text
    assert not any(phi in text for phi in PHI_STRINGS)


def test_reports_written_out_through_a_link_reach_its_target_and_the_link_stays(state: Daemon, tmp_path: Path):
    """Each was written under a temporary name renamed over the link: the link became a file of its
    own and the file it pointed at kept its old contents."""
    scan = a_scan(state, "synthetic_study_0.dcm")
    (tmp_path / "kept").mkdir()
    commands = {
        "scan": ["report", str(scan.id)],
        "study": ["report", "study", STUDY_UID],
        "summary": ["report", "summary", "--since", "7d"],
    }
    for kind, command in commands.items():
        target = tmp_path / "kept" / f"{kind}.pdf"
        target.write_bytes(b"old")
        link = tmp_path / f"latest-{kind}.pdf"
        link.symlink_to(target)
        run(state, *command, "--out", str(link))
        assert link.is_symlink() and link.resolve() == target, kind
        assert read_pdf(target)[1] >= 1, kind


def test_a_report_out_to_a_pipe_a_device_or_a_stream_is_refused_as_usage(state: Daemon, tmp_path: Path):
    """A report is recorded with its file: renamed over, the pipe became a regular file, its reader got
    nothing, and the command said it had written it (exit 0)."""
    import os

    pipe = tmp_path / "report.fifo"
    os.mkfifo(pipe)
    scan = a_scan(state, "synthetic_study_0.dcm")
    commands = (["report", str(scan.id)], ["report", "study", STUDY_UID], ["report", "summary", "--since", "7d"])
    (tmp_path / "to-stdout.pdf").symlink_to("/dev/stdout")
    for command in commands:
        for out in (pipe, Path("/dev/null"), Path("/dev/stdout"), Path("//dev/stdout"), tmp_path / "to-stdout.pdf"):
            refused = run(state, *command, "--out", str(out), code=2)
            assert f"{out} is not a regular file" in refused, refused
    assert stat.S_ISFIFO(pipe.stat().st_mode) and stat.S_ISCHR(os.stat("/dev/null").st_mode)
    (tmp_path / "a.pdf").symlink_to(tmp_path / "b.pdf")
    (tmp_path / "b.pdf").symlink_to(tmp_path / "a.pdf")
    looped = run(state, "report", str(scan.id), "--out", str(tmp_path / "a.pdf"), code=2)
    assert "cannot be written: Too many levels of symbolic links" in looped, looped
