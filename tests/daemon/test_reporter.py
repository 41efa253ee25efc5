"""The report stage end to end: scans in, ``reported`` scans out with their PDFs and hashes; a full
disk, a crash and a stop leave no partial PDF and no doubled row."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
from dicom_factory import truncate_pixel_data, write_dicom, write_structured_report
from PIL import Image
from pydicom import dcmread
from sqlalchemy import create_engine, event, func, select, text

from daemon_rows import add_scan
from meddaemon.config import load_settings
from meddaemon.daemon import bookkeeper
from meddaemon.daemon.reporter import Reporter
from meddaemon.daemon.service import Daemon
from meddaemon.db.engine import transaction
from meddaemon.db.models import Report, Result, Scan, ScanEvent
from meddaemon.files import HOST_TAG, temporary_path
from meddaemon.report.output import scan_report_path
from model_factory import (
    STUDY_UID,
    ReportedStates,
    drop_scans,
    drop_study,
    promote,
    read_pdf,
    reported_settings,
    run_then_resend_corrected,
    write_model,
)
from sql_statements import recorded_statements


def scan_states(daemon: Daemon) -> dict[str, str]:
    with daemon.sessions() as session:
        return {s.source_name: s.state for s in session.scalars(select(Scan))}


def leftovers(reports_dir: Path) -> list[Path]:
    return [p for p in reports_dir.rglob("*") if p.is_file() and not p.name.endswith(".pdf")]


def check_reports(daemon: Daemon) -> list[Report]:
    """One scan report per reported scan, each file whole and matching its stored hash."""
    with daemon.sessions() as session:
        reported = set(session.scalars(select(Scan.id).where(Scan.state.in_(["reported", "archived"]))))
        rows = session.scalars(select(Report).where(Report.kind == "scan")).all()
    assert sorted(r.scan_id for r in rows) == sorted(reported)
    for row in rows:
        data = daemon.settings.stored_file(row.path).read_bytes()
        assert hashlib.sha256(data).hexdigest() == row.sha256 and len(data) == row.size_bytes
        assert read_pdf(data)[1] == row.pages >= 1
    assert leftovers(daemon.settings.reports_dir) == []
    return list(rows)


def inferred_daemon(make_settings, tmp_path: Path) -> Daemon:  # type: ignore[no-untyped-def]
    """A daemon whose SYNTHETIC scans ran ``--once`` with reports off: every scan ``inferred``."""
    daemon = Daemon(make_settings(max_wait_ms=10, reports=False))
    daemon.prepare()
    promote(daemon, write_model(tmp_path / "model"))
    drop_scans(daemon.settings.watch)
    daemon.run(once=True)
    return daemon


def test_a_study_report_that_could_not_be_written_is_tried_again_while_the_daemon_runs(
    make_settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """Its failure was only logged ('retried later'): nothing brought the study back until a restart
    or another scan of it, so a complete study had no report, nor its Encapsulated PDF."""
    from meddaemon.daemon import reporter as reporting
    from meddaemon.report.content import study_key
    from meddaemon.report.output import study_report_path

    daemon = Daemon(make_settings(max_wait_ms=10, reports=False))
    daemon.prepare()
    promote(daemon, write_model(tmp_path / "model"))
    drop_study(daemon.settings.watch)
    daemon.run(once=True)
    target = study_report_path(daemon.settings.reports_dir, study_key(STUDY_UID), with_phi=False)
    monkeypatch.setattr(reporting, "RETRY_SECONDS", 0.3)
    reporter = Reporter(daemon.settings, daemon.sessions)
    reporter.start()
    target.parent.mkdir(parents=True)
    temporary_path(target).symlink_to("/dev/full")  # the study's report meets ENOSPC, a real one

    assert reporter.round() == 3  # the study's two scans, then the study
    assert reporter.stats.errors == 1 and not target.exists()
    temporary_path(target).unlink(missing_ok=True)  # room again
    time.sleep(0.4)
    reporter.round()

    assert target.is_file() and reporter.stats.studies == 1


def test_an_archive_whose_moves_fail_is_not_logged_as_done(
    make_settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog
):
    """'archived 8 reported scans' was logged when none of the eight files had moved (a full disk):
    the log now counts the files moved and says how many are held back."""
    import errno

    from meddaemon.daemon import filing

    daemon = inferred_daemon(make_settings, tmp_path)
    real_move = filing.finish_move

    def archive_full(source, target, *args, **kwargs):  # type: ignore[no-untyped-def]
        if Path(target).is_relative_to(daemon.settings.archive_dir):
            raise OSError(errno.ENOSPC, "SYNTHETIC: no room", str(target))
        return real_move(source, target, *args, **kwargs)

    monkeypatch.setattr(filing, "finish_move", archive_full)
    caplog.set_level(logging.INFO, logger="meddaemon")
    Daemon(make_settings(max_wait_ms=10, reports=True)).run(once=True)  # reports, then archives

    reported = [s for s in scan_states(daemon).values() if s in ("reported", "archived")]
    assert reported and "archived 0 reported scans" in caplog.text
    assert f"{len(reported)} held back" in caplog.text


def test_once_reports_every_inferred_scan_and_the_study_of_two_then_archives_them(
    tmp_path: Path, reported_states: ReportedStates
):
    daemon = reported_states.copy(tmp_path)  # reported_state's, run once per session
    states = scan_states(daemon)
    assert states.pop("synthetic_empty.png") == "failed"
    assert set(states.values()) == {"archived"} and len(states) == 7  # DICOM and PNG, reported first
    rows = check_reports(daemon)
    with daemon.sessions() as session:
        study = session.scalars(select(Report).where(Report.kind == "study")).all()
        history = session.scalars(select(ScanEvent).where(ScanEvent.state == "reported")).all()
    assert [s.study_instance_uid for s in study] == [STUDY_UID]
    text, pages, images, _ = read_pdf(daemon.settings.stored_file(study[0].path))
    assert pages >= 2 and "2 scans of this study" in text and images >= 4
    assert len(history) == 7 and all(e.detail and e.detail.endswith(".pdf") for e in history)
    assert all(r.path.startswith("reports/") for r in rows)  # relative to the state dir


def study_dropped(tmp_path: Path) -> Daemon:
    """A daemon reporting, a busi model promoted, and two scans of one study in its inbox."""
    daemon = Daemon(reported_settings(tmp_path))
    daemon.prepare()
    promote(daemon, write_model(tmp_path / "busi_model"))
    drop_study(daemon.settings.watch)
    return daemon


def test_the_study_report_names_a_scan_of_the_study_that_has_no_result_but_not_a_report_object(tmp_path: Path):
    """A third image of the study whose pixel data is cut: it failed, and the study's summary said
    "2 scans of this study have a result" without a word of it (its header was not even kept, so it
    belonged to no study). An SR of the same study is no image: it is not listed."""
    daemon = study_dropped(tmp_path)
    settings = daemon.settings
    same_study = {"StudyInstanceUID": STUDY_UID}
    whole = write_dicom(tmp_path / "whole.dcm", pixels=np.zeros((64, 64), np.uint16), modality="US",
                        body_part="BREAST", extra=same_study)  # fmt: skip
    truncate_pixel_data(whole, settings.watch / "synthetic_study_cut.dcm")
    report_object = write_structured_report(tmp_path / "sr.dcm")
    with_study = dcmread(report_object)
    with_study.StudyInstanceUID = STUDY_UID
    with_study.save_as(settings.watch / "synthetic_study_sr.dcm")

    daemon.run(once=True)

    with daemon.sessions() as session:
        cut = session.scalars(select(Scan).where(Scan.source_name == "synthetic_study_cut.dcm")).one()
        study = session.scalars(select(Report).where(Report.kind == "study")).one()
    assert (cut.failure_reason, cut.study_instance_uid, cut.modality) == ("truncated_pixel_data", STUDY_UID, "US")
    text = " ".join(read_pdf(settings.stored_file(study.path))[0].split())
    assert "2 scans of this study have a result" in text
    assert f"Not in this report: 1 scans of this study without a result: {cut.id} (truncated_pixel_data)." in text


def assert_the_study_report_names_the_late_image(daemon: Daemon) -> None:
    """The study's report names ``synthetic_study_late.dcm`` among its images without a result."""
    with daemon.sessions() as session:
        failed = session.scalars(select(Scan).where(Scan.source_name == "synthetic_study_late.dcm")).one()
        study = session.scalars(select(Report).where(Report.kind == "study")).one()
    text = " ".join(read_pdf(daemon.settings.stored_file(study.path))[0].split())
    assert f"Not in this report: 1 scans of this study without a result: {failed.id} (truncated_pixel_data)." in text


def test_an_image_of_the_study_that_fails_after_its_report_is_named_in_the_report_written_again(tmp_path: Path):
    """The study report names the study's images without a result, so that none vanishes: one that
    failed after the report was written (arriving late, an image the model cannot take) was never
    added, nor its Encapsulated PDF written again, while the daemon ran."""
    daemon = study_dropped(tmp_path)
    settings = daemon.settings
    daemon.run(once=True)
    reporter = Reporter(settings, daemon.sessions)
    reporter.start()
    reporter.round()  # the running daemon's reporter: every study looked at once, nothing to do
    whole = write_dicom(tmp_path / "whole.dcm", pixels=np.zeros((64, 64), np.uint16), modality="US",
                        body_part="BREAST", extra={"StudyInstanceUID": STUDY_UID})  # fmt: skip
    truncate_pixel_data(whole, settings.watch / "synthetic_study_late.dcm")
    late = Daemon(dataclasses.replace(settings, reports=False))  # its intake alone: the reporter above reports
    late.prepare()
    late.run(once=True)

    reporter.round()

    assert_the_study_report_names_the_late_image(daemon)


def test_an_image_of_the_study_that_fails_while_its_report_is_rendered_is_named_in_the_next(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """The report's row was dated when it was recorded, after its render: an image of the study that
    failed during the render was older than the report, and never named in it, even after a restart."""
    from meddaemon.daemon import reporter as reporting
    from meddaemon.report import builder

    daemon = study_dropped(tmp_path)
    settings = daemon.settings
    unreported = Daemon(dataclasses.replace(settings, reports=False))
    unreported.prepare()
    unreported.run(once=True)  # the study's two scans inferred: the reporter below reports them
    whole = write_dicom(tmp_path / "whole.dcm", pixels=np.zeros((64, 64), np.uint16), modality="US",
                        body_part="BREAST", extra={"StudyInstanceUID": STUDY_UID})  # fmt: skip
    render = builder.render_study

    def failing_meanwhile(*args, **kwargs):  # type: ignore[no-untyped-def]
        if not (settings.failed_dir / "synthetic_study_late.dcm").exists():
            truncate_pixel_data(whole, settings.watch / "synthetic_study_late.dcm")
            unreported.run(once=True)
        return render(*args, **kwargs)

    monkeypatch.setattr(builder, "render_study", failing_meanwhile)
    monkeypatch.setattr(reporting, "LATE_FAILURE_SECONDS", 0.0)
    reporter = Reporter(settings, daemon.sessions)
    reporter.start()

    reporter.round()  # the two scans and their study, while the late image fails
    reporter.round()

    assert_the_study_report_names_the_late_image(daemon)


def test_a_study_report_written_elsewhere_by_hand_never_makes_the_daemon_s_stale(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """``medcli report study UID --out FILE`` records a study report of its own: older than a scan of
    the study that failed later, it made the daemon write the study's report again at every look
    (every 30 s), for ever. The daemon's staleness is that of its own study report."""
    from meddaemon.daemon import reporter as reporting
    from meddaemon.report.builder import ReportBuilder

    daemon = study_dropped(tmp_path)
    settings = daemon.settings
    daemon.run(once=True)
    ReportBuilder(settings, daemon.sessions).study_report(STUDY_UID, None, tmp_path / "by_hand.pdf")
    whole = write_dicom(tmp_path / "whole.dcm", pixels=np.zeros((64, 64), np.uint16), modality="US",
                        body_part="BREAST", extra={"StudyInstanceUID": STUDY_UID})  # fmt: skip
    truncate_pixel_data(whole, settings.watch / "synthetic_study_late.dcm")
    late = Daemon(dataclasses.replace(settings, reports=False))
    late.prepare()
    late.run(once=True)
    monkeypatch.setattr(reporting, "LATE_FAILURE_SECONDS", 0.0)  # every round a look, as every 30 s
    reporter = Reporter(settings, daemon.sessions)
    reporter.start()

    for _ in range(5):
        reporter.round()

    assert reporter.stats.studies == 1  # the late failure named once, then nothing new


def test_a_corrected_instance_sent_again_replaces_its_first_version_in_the_study_report(tmp_path: Path):
    """A PACS sends a study again, its patient's name corrected: the study report listed both
    versions of each instance, counted four images where the study has two, and warned that its
    scans name two patients. The latest version is the study's image; the one it replaced is named,
    not shown."""
    daemon = study_dropped(tmp_path)
    settings = daemon.settings

    _, instances = run_then_resend_corrected(daemon)

    with daemon.sessions() as session:
        versions = [
            session.scalars(select(Scan).where(Scan.sop_instance_uid == each.SOPInstanceUID).order_by(Scan.id)).all()
            for each in instances
        ]
        study = session.scalars(select(Report).where(Report.kind == "study")).one()
    assert [[scan.state for scan in scans] for scans in versions] == [["archived", "archived"]] * 2
    text = " ".join(read_pdf(settings.stored_file(study.path))[0].split())
    assert "2 scans of this study have a result" in text
    replaced = ", ".join(f"{first.id} (replaced by {latest.id})" for first, latest in versions)
    assert f"2 earlier versions of instances sent again with other contents: {replaced}." in text
    for first, latest in versions:
        assert f"Scan {latest.id}:" in text and f"Scan {first.id}:" not in text
    assert "different patients" not in text


def test_the_study_report_counts_an_image_once_whatever_its_attempts(tmp_path: Path):
    """An image failed, retried and then reported was also listed "without a result" (its failed
    attempt), as was an instance that arrived truncated before it arrived whole; an image that failed
    twice was listed twice. The study's images are counted by their instance (else their bytes),
    each by its latest attempt."""
    from meddaemon.report.content import study_report_data

    daemon = study_dropped(tmp_path)
    settings = daemon.settings
    daemon.run(once=True)
    with transaction(daemon.sessions) as session:
        reported = session.scalars(select(Scan).where(Scan.study_instance_uid == STUDY_UID).order_by(Scan.id)).all()
        failed = {"state": "failed", "study_instance_uid": STUDY_UID, "stored_path": None}
        add_scan(session, 901, sha256=reported[0].sha256, failure_reason="contract_mismatch", **failed)
        uid = reported[1].sop_instance_uid  # a truncated copy of an instance, before it was reported whole
        earlier = reported[1].registered_at - timedelta(minutes=1)
        add_scan(session, 904, sop_instance_uid=uid, failure_reason="truncated_pixel_data", registered_at=earlier,
                 **failed)  # fmt: skip
        add_scan(session, 902, sha256="ab" * 32, failure_reason="contract_mismatch", **failed)
        again = add_scan(session, 903, sha256="ab" * 32, failure_reason="pixel_decode_error", **failed)
        data = study_report_data(session, STUDY_UID, settings.task_specs, state_dir=settings.state_dir)

    assert len(data.scans) == len(reported) == 2
    assert data.without_result == ((again.id, "pixel_decode_error"),)


def test_a_correction_that_failed_after_the_version_shown_is_named_without_a_result(tmp_path: Path):
    """An instance sent again corrected, whose new version failed: the report showed the version it
    had, uncorrected, without a word of the newer one. The correction registered in the same batch
    (the same time) comes after it all the same."""
    from meddaemon.report.content import study_report_data

    daemon = study_dropped(tmp_path)
    settings = daemon.settings
    daemon.run(once=True)
    with transaction(daemon.sessions) as session:
        shown = session.scalars(select(Scan).where(Scan.study_instance_uid == STUDY_UID).order_by(Scan.id)).all()
        correction = add_scan(session, 905, state="failed", study_instance_uid=STUDY_UID, stored_path=None,
                              sop_instance_uid=shown[0].sop_instance_uid, registered_at=shown[0].registered_at,
                              failure_reason="truncated_pixel_data")  # fmt: skip
        data = study_report_data(session, STUDY_UID, settings.task_specs, state_dir=settings.state_dir)

    assert [scan.scan_id for scan in data.scans] == [scan.id for scan in shown]
    assert data.without_result == ((correction.id, "truncated_pixel_data"),)


@pytest.mark.parametrize(
    ("frame_policy", "representative", "preamble", "said"),
    [
        ("key", 2, True, "Frames frame 2 of 4 classified and shown (the frame the scan names representative)"),
        ("key", 2, False, "Frames frame 2 of 4 classified and shown (the frame the scan names representative)"),
        ("key", None, True, "Frames frame 3 of 4 classified and shown (the middle one)"),
        ("all", 2, True, "Frames all 4 classified, the probabilities their mean; frame 3 shown"),
    ],
)
def test_a_multi_frame_scan_s_report_says_which_frames_were_classified_and_which_is_shown(
    tmp_path: Path, frame_policy: str, representative: int | None, preamble: bool, said: str
):
    """A cine loop's report pictures one frame: a reader must not take a call that is the mean over
    every frame (``frame_policy = "all"``) for that frame's alone, nor guess which frame was read.
    The picture is the frame the engine mapped: the key frame, or the middle one where all ran."""
    daemon = Daemon(reported_settings(tmp_path, frame_policy=frame_policy))
    daemon.prepare()
    promote(daemon, write_model(tmp_path / "busi_model"))
    named = {"RepresentativeFrameNumber": representative} if representative else {}
    write_dicom(daemon.settings.watch / "synthetic_cine.dcm", modality="US", body_part="BREAST", frames=4, extra=named,
                preamble=preamble)  # fmt: skip
    single = np.zeros((64, 64), np.uint16)
    write_dicom(daemon.settings.watch / "synthetic_one.dcm", pixels=single, modality="US", body_part="BREAST")

    daemon.run(once=True)

    texts = {}
    with daemon.sessions() as session:
        for scan, report in session.execute(select(Scan, Report).join(Report, Report.scan_id == Scan.id)):
            texts[scan.source_name] = " ".join(read_pdf(daemon.settings.stored_file(report.path))[0].split())
    assert said in texts["synthetic_cine.dcm"] and "Size 32 x 32 px, 4 frames" in texts["synthetic_cine.dcm"]
    assert "Frames" not in texts["synthetic_one.dcm"]


def test_reported_scans_move_from_work_to_the_archive_under_their_received_names(
    tmp_path: Path, reported_states: ReportedStates
):
    daemon = reported_states.copy(tmp_path)  # reported_state's, run once per session
    with daemon.sessions() as session:
        archived = session.scalars(select(Scan).where(Scan.state == "archived")).all()
        steps = {s.id: [e.state for e in s.events] for s in archived}
    assert len(archived) == 7
    for scan in archived:
        stored = daemon.settings.stored_file(scan.stored_path or "")
        assert stored.is_relative_to(daemon.settings.archive_dir) and stored.name.startswith(
            Path(scan.source_name).stem
        )
        assert hashlib.sha256(stored.read_bytes()).hexdigest() == scan.sha256 and scan.pending_move_from is None
        assert steps[scan.id][-2:] == ["reported", "archived"]
    assert list(daemon.settings.work_dir.iterdir()) == []  # no emptied work/<xx>/ shard is left behind
    assert [p for p in daemon.settings.work_dir.rglob("*") if p.is_file()] == []


def test_a_full_disk_leaves_no_partial_pdf_and_the_scan_inferred_until_a_retry(
    make_settings, tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    daemon = inferred_daemon(make_settings, tmp_path)
    with daemon.sessions() as session:
        victim = session.scalars(select(Scan).order_by(Scan.id)).first()
    assert victim is not None and victim.sha256 is not None
    target = scan_report_path(daemon.settings.reports_dir, victim.sha256, with_phi=False)
    reporter = Reporter(daemon.settings, daemon.sessions)
    reporter.start()  # (which removes what looks like a killed writer's temporary)
    target.parent.mkdir(parents=True)
    temporary_path(target).symlink_to("/dev/full")  # this scan's report meets ENOSPC, a real one

    with caplog.at_level(logging.ERROR, logger="meddaemon"):
        reporter.drain()

    # it named no file: the folder to fix was anyone's guess
    assert f"scan {victim.id}: could not write its report (No space left on device: {target});" in caplog.text
    states = scan_states(daemon)
    assert states.pop(victim.source_name) == "inferred"
    assert set(states.values()) == {"reported"}
    # neither its PDF nor its temporary (the shard folder may hold another scan's report: its
    # SHA-256 can start with the same two digits)
    assert sorted(target.parent.glob(f"*{target.name}*")) == []
    with daemon.sessions() as session:
        assert session.scalar(select(func.count()).where(Report.scan_id == victim.id)) == 0
    reporter.retry_after[victim.id] = 0  # its retry due, the disk still full: said once, not every 30 s
    temporary_path(target).symlink_to("/dev/full")
    with caplog.at_level(logging.ERROR, logger="meddaemon"):
        reporter.drain()
    assert caplog.text.count(f"scan {victim.id}: could not write its report") == 1
    assert scan_states(daemon)[victim.source_name] == "inferred"
    reporter.retry_after[victim.id] = 0
    with caplog.at_level(logging.INFO, logger="meddaemon"):
        reporter.drain()
    assert f"scan {victim.id}: report written (after failing to be written)" in caplog.text

    Reporter(daemon.settings, daemon.sessions).drain()  # the disk has room again: retried
    assert set(scan_states(daemon).values()) == {"reported"}
    check_reports(daemon)


def test_a_round_of_reports_reads_and_records_its_rows_in_one_statement_each(make_settings, tmp_path: Path):
    daemon = inferred_daemon(make_settings, tmp_path)
    inferred = [i for i, state in scan_ids_and_states(daemon) if state == "inferred"]
    assert len(inferred) >= 3
    with recorded_statements(daemon.engine) as statements:
        Reporter(daemon.settings, daemon.sessions).round()

    assert set(scan_states(daemon).values()) == {"reported"}
    rows = check_reports(daemon)
    assert sorted(r.scan_id for r in rows) == sorted(inferred)
    report_inserts = [s for s in statements if s.startswith("INSERT INTO reports")]
    step_updates = [s for s in statements if s.startswith("UPDATE scans SET state")]
    assert len(report_inserts) == 1 and len(step_updates) == 1, "the round's rows in one statement each"
    result_reads = [s for s in statements if s.startswith("SELECT") and "FROM results" in s]
    assert len(result_reads) == 1, "the round's results read in one statement"


def scan_ids_and_states(daemon: Daemon) -> list[tuple[int, str]]:
    with daemon.sessions() as session:
        return [(i, state) for i, state in session.execute(select(Scan.id, Scan.state).order_by(Scan.id))]


def test_the_running_daemon_reports_in_its_own_process_and_stops_it(make_settings, tmp_path: Path):
    daemon = Daemon(make_settings(max_wait_ms=10, model_poll_seconds=0.2))
    daemon.prepare()
    promote(daemon, write_model(tmp_path / "model"))
    drop_scans(daemon.settings.watch)
    runner = threading.Thread(target=daemon.run)
    runner.start()
    try:
        deadline = time.monotonic() + 60
        while set(scan_states(daemon).values()) != {"archived"} and time.monotonic() < deadline:
            time.sleep(0.1)
        assert set(scan_states(daemon).values()) == {"archived"}
    finally:
        daemon.request_stop()
        runner.join(60)
    assert daemon.reporter is not None and daemon.reporter.process.exitcode == 0
    assert daemon.reporter.process.pid != os.getpid()
    check_reports(daemon)


@pytest.mark.slow
def test_kill_9_while_reporting_leaves_no_partial_pdf_and_no_doubled_row(tmp_path: Path):
    """SIGKILL to the whole daemon (report process included) at two moments, then a restart."""
    import numpy as np
    from dicom_factory import write_png

    bindir = Path(sys.executable).parent
    inbox, state = tmp_path / "inbox", tmp_path / "state"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEDDAEMON_")}
    env["MEDDAEMON_REPORTS_NICE"] = "0"
    settings = load_settings(env={}, flags={"watch": inbox, "state_dir": state, "create_watch": True})
    setup = Daemon(settings)
    setup.prepare()
    promote(setup, write_model(tmp_path / "model"))
    rng = np.random.default_rng(5)
    for i in range(24):
        write_png(inbox / "busi" / f"synthetic_{i:02d}.png", rng.integers(0, 255, (48, 48), dtype=np.uint8))
    args = ["start", "--watch", inbox, "--state-dir", state, "--stable-seconds", "0", "--workers", "0"]

    def reported() -> int:
        with setup.sessions() as session:
            return session.scalar(select(func.count()).where(Scan.state.in_(["reported", "archived"]))) or 0

    log = (tmp_path / "daemon.log").open("w")
    for kill_at in (2, 10):  # reports done when the daemon is killed
        proc = subprocess.Popen(
            [bindir / "meddaemon", *args], stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        deadline = time.monotonic() + 90
        while reported() < kill_at and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.01)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert 0 < reported() < 24, (tmp_path / "daemon.log").read_text()[-2000:]

    done = subprocess.run(
        [bindir / "meddaemon", *args, "--once"], stdout=log, stderr=subprocess.STDOUT, env=env, timeout=180
    )
    assert done.returncode == 0, (tmp_path / "daemon.log").read_text()[-2000:]
    assert set(scan_states(setup).values()) == {"archived"}
    assert len(check_reports(setup)) == 24
    assert len([p for p in settings.archive_dir.rglob("*.png") if p.is_file()]) == 24


def test_a_report_that_fails_to_build_leaves_the_scan_inferred_and_no_phi_in_the_log(
    make_settings, tmp_path: Path, caplog, monkeypatch
):
    daemon = inferred_daemon(make_settings, tmp_path)
    reporter = Reporter(daemon.settings, daemon.sessions)

    def broken(data: object) -> object:
        raise ValueError("cell text SYNTHETIC^PHIFAMILY")  # as a reportlab error may quote a name

    monkeypatch.setattr(reporter.builder, "render_scan", broken)
    reporter.drain()

    assert set(scan_states(daemon).values()) == {"inferred"}
    assert "building its report failed (ValueError at test_reporter.py" in caplog.text
    assert "PHIFAMILY" not in caplog.text
    assert leftovers(daemon.settings.reports_dir) == [] and reporter.stats.errors == 4


def test_an_archive_move_cut_off_after_its_commit_is_finished_by_recovery(make_settings, tmp_path: Path):
    """The crash window of archiving: the rows say archived, the file is still in work/."""
    daemon = Daemon(make_settings(max_wait_ms=10))
    daemon.prepare()
    promote(daemon, write_model(tmp_path / "model"))
    drop_scans(daemon.settings.watch)
    daemon.run(once=True)
    with transaction(daemon.sessions) as session:  # put one scan back in work/, reported
        scan = session.scalars(select(Scan).where(Scan.state == "archived")).first()
        assert scan is not None and scan.stored_path is not None
        work = daemon.settings.work_dir / Path(scan.stored_path).name
        daemon.settings.stored_file(scan.stored_path).rename(work)
        scan.state, scan.stored_path, scan_id = "reported", daemon.settings.stored_name(work), scan.id
    with transaction(daemon.sessions) as session:
        [move] = bookkeeper.claim_for_archive(session, daemon.destinations, limit=10)  # committed, not carried out
    assert move.source == work and work.exists()

    restarted = Daemon(daemon.settings)
    restarted.recover()

    with daemon.sessions() as session:
        scan = session.get(Scan, scan_id)
        assert scan is not None and scan.state == "archived" and scan.pending_move_from is None
        assert daemon.settings.stored_file(scan.stored_path or "").exists() and not work.exists()


def test_the_report_embeds_the_model_view_written_beside_the_heatmaps_without_decoding_the_scan_again(
    make_settings, tmp_path: Path
):
    """Issue 16: the inference stage, which holds the model's input, writes the scan as the model saw
    it beside the heatmaps (a grey JPEG for a grey model); the report embeds that JPEG instead of
    decoding the stored scan again."""
    from meddaemon.daemon import filing
    from meddaemon.report.builder import ReportBuilder

    daemon = Daemon(make_settings(max_wait_ms=10))  # the view is kept only with reports on
    daemon.prepare()
    promote(daemon, write_model(tmp_path / "model"))
    drop_scans(daemon.settings.watch)
    daemon.run(once=True)
    with daemon.sessions() as session:
        scan = session.scalars(select(Scan).where(Scan.source_name == "busi/synthetic_0.png")).one()
        version_id = session.scalar(select(func.max(Result.model_version_id)))
    assert scan.sha256 is not None and version_id is not None
    view = filing.view_path(daemon.settings.heatmaps_dir, scan.sha256, version_id)
    with Image.open(view) as picture:
        assert (picture.format, picture.mode) == ("JPEG", "L")  # a grey model's view: one channel
    daemon.settings.stored_file(scan.stored_path or "").unlink()  # archived by --once; nothing to decode again

    written = ReportBuilder(daemon.settings, daemon.sessions).scan_report(scan.id)

    _, _, images, _ = read_pdf(written.path)
    assert images == 3  # the model's view, the overlay, the colour scale


def test_once_writes_its_reports_in_report_workers_processes_each_scan_once(make_settings, tmp_path: Path, caplog):
    """Issue 16: after ``--once`` drains the inbox the cores are idle; the reports left are shared out
    by scan id among ``report_workers`` processes, none written twice."""
    import logging

    import numpy as np
    from dicom_factory import write_png

    caplog.set_level(logging.INFO, logger="meddaemon")
    daemon = Daemon(make_settings(max_wait_ms=10, report_workers=2))
    daemon.prepare()
    promote(daemon, write_model(tmp_path / "model"))
    rng = np.random.default_rng(16)
    for i in range(34):
        write_png(daemon.settings.watch / "busi" / f"synthetic_{i:02d}.png", rng.integers(0, 255, (40, 48), np.uint8))

    daemon.run(once=True)

    assert "writing 34 reports in 2 processes" in caplog.text
    assert set(scan_states(daemon).values()) == {"archived"}
    assert len(check_reports(daemon)) == 34
    with daemon.sessions() as session:
        steps = session.scalar(select(func.count()).where(ScanEvent.state == "reported"))
    assert steps == 34


WRITER = """
import sys, time
from pathlib import Path
from meddaemon.files import HOST_TAG, temporary_path
for target in map(Path, sys.argv[1:]):
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary_path(target).write_bytes(b"half of it")
print("writing", flush=True)
time.sleep(60)
"""


def writing(targets: list[Path]) -> subprocess.Popen[str]:
    """A process in the middle of writing ``targets`` whole (their temporaries half written)."""
    writer = subprocess.Popen([sys.executable, "-c", WRITER, *map(str, targets)], stdout=subprocess.PIPE, text=True)
    assert writer.stdout is not None and writer.stdout.readline() == "writing\n"
    return writer


def test_the_reporter_removes_what_writers_killed_while_writing_left_and_keeps_live_writers_files(make_settings):
    daemon = Daemon(make_settings())
    daemon.prepare()
    settings, sha = daemon.settings, "ab" * 32
    killed_targets = [
        settings.heatmaps_dir / sha[:2] / sha / "v1.benign.npy",
        settings.heatmaps_dir / sha[:2] / sha / "v1.view.jpg",
        settings.dicom_dir / sha[:2] / sha / "pmap_benign.dcm",
        settings.models_dir / "busi" / "v7" / "model.safetensors",
        scan_report_path(settings.reports_dir, sha, with_phi=False),
    ]
    killed = writing(killed_targets)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    live = writing([settings.heatmaps_dir / "cd" / ("cd" * 32) / "v1.benign.npy"])
    whole = settings.heatmaps_dir / sha[:2] / sha / "v1.normal.npy"
    whole.write_bytes(b"a whole map")
    try:
        Reporter(settings, daemon.sessions).start()
        left = sorted(p.name for p in settings.state_dir.rglob(".*.tmp"))
        assert left == [f".v1.benign.npy.{HOST_TAG}-{live.pid}.tmp"]  # the live writer's alone
        assert whole.read_bytes() == b"a whole map"
    finally:
        live.kill()
        live.wait()


def test_the_report_stage_without_dicom_destinations_does_not_import_highdicom():
    """highdicom costs each report process 0.6 s of its start; only DICOM outputs need it."""
    program = (
        "import sys, meddaemon.daemon.reporter, meddaemon.report.builder\n"
        "print('highdicom' in sys.modules)\n"
        "import meddaemon.dicom.writer\n"
        "print('highdicom' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=120, check=True)
    assert done.stdout.split() == ["False", "True"]


@pytest.mark.postgres
def test_a_connection_the_database_drops_mid_round_is_waited_out_not_a_report_failure(
    make_settings, tmp_path: Path, postgres_url: str
):
    """The server ends the report round's connection as it records the reports (a restart, a
    failover, an administrator's pg_terminate_backend): every scan of the round was logged as a
    failed report and held for 300 s, while the database answered again at once."""
    daemon = inferred_daemon(lambda **flags: make_settings(db=postgres_url, **flags), tmp_path)
    admin = create_engine(postgres_url, isolation_level="AUTOCOMMIT")
    dropped: list[int] = []

    def drop_the_connection(conn, cursor, statement, parameters, context, executemany) -> None:  # type: ignore[no-untyped-def]
        if statement.startswith("INSERT INTO reports") and not dropped:
            dropped.append(conn.connection.dbapi_connection.info.backend_pid)
            with admin.connect() as other:
                other.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": dropped[0]})

    event.listen(daemon.engine, "before_cursor_execute", drop_the_connection)
    try:
        started = time.monotonic()
        Reporter(daemon.settings, daemon.sessions).drain()
        took = time.monotonic() - started
    finally:
        event.remove(daemon.engine, "before_cursor_execute", drop_the_connection)
        admin.dispose()
    assert dropped, "the connection was never dropped"
    assert set(scan_states(daemon).values()) == {"reported"} and took < 60
    check_reports(daemon)
    daemon.engine.dispose()
