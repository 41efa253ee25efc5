"""The real daemon (a subprocess) delivering to a real PACS: Orthanc as a DICOM node (C-STORE) and as
a DICOMweb server (STOW-RS). Its REST API shows the new series in the source study, the study report
among them once the study is complete; Orthanc stopped for 30 s while 100 scans are processed, or the
daemon killed with -9 while sending, and every object still arrives exactly once (Orthanc's instance
counts), and no scan is archived before its objects are delivered."""

from __future__ import annotations

import itertools
import os
import re
import signal
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from dicom_factory import write_dicom
from sqlalchemy import Engine, create_engine, func, select, update

from daemon_harness import Daemons, Layout, RunningDaemon, wait_until
from dicom_peers import HttpAnswer, ScriptedScp, ScriptedStow
from meddaemon.db.clock import db_clock
from meddaemon.db.models import DaemonInstance, OutboxItem, Report, Scan
from meddaemon.dicom import pdf
from meddaemon.dicom.outbox import WATCH_SECONDS
from model_factory import promote_into, write_model
from orthanc import Orthanc, require_orthanc

pytestmark = pytest.mark.slow

STUDY = "1.2.826.0.1.3680043.8.498.1414001"
#: per busi scan: the SR, one Parametric Map and one Secondary Capture (the called class), the PDF
OBJECTS_PER_SCAN = 4
ENCAPSULATED_PDF = "1.2.840.10008.5.1.4.1.1.104.1"
SOP_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.88.33",  # Comprehensive SR
    "1.2.840.10008.5.1.4.1.1.30",  # Parametric Map
    "1.2.840.10008.5.1.4.1.1.7",  # Secondary Capture
    ENCAPSULATED_PDF,
}
ENV = {"MEDDAEMON_MAX_WAIT_MS": "10", "MEDDAEMON_MODEL_POLL_SECONDS": "0.3"}
#: the outbox rows of study reports (one per version of a study's report and destination)
STUDY_REPORT_ROWS = OutboxItem.object_key.like(f"{pdf.STUDY_KIND}:%")


@pytest.fixture
def pacs(tmp_path: Path):  # type: ignore[no-untyped-def]
    """Two Orthancs: ``dimse`` receives by C-STORE, ``web`` by STOW-RS (one each, so that an
    object sent twice to either would show in its count)."""
    require_orthanc()
    servers = {"dimse": Orthanc(tmp_path / "orthanc-dimse"), "web": Orthanc(tmp_path / "orthanc-web")}
    try:
        for server in servers.values():
            server.start()
        yield servers
    finally:
        for server in servers.values():
            server.discard()


def configure(layout: Layout, pacs: dict[str, Orthanc]) -> Path:
    """A model promoted, and a config naming the two destinations with quick retries and a 10 s
    timeout (a PACS being stopped can leave a send waiting for its answer: the default 30 s, under
    load, outlasted the outage test's wait for a failed attempt), and a study quiet time that does
    not hold its report back for a minute."""
    promote_into(f"sqlite:///{layout.db}", layout.state / "models", write_model(layout.root / "model"))
    dimse, web = pacs["dimse"], pacs["web"]
    config = layout.root / "meddaemon.toml"
    config.write_text(
        "outbox_retry_seconds = 0.5\noutbox_max_retry_seconds = 2.0\noutbox_max_attempts = 1000\n"
        "series_quiet_seconds = 1.0\n"
        f'[[destination]]\nname = "pacs"\nkind = "dicom"\nae_title = "{dimse.ae_title}"\n'
        f'host = "127.0.0.1"\nport = {dimse.dicom_port}\ntimeout_seconds = 10.0\n'
        f'[[destination]]\nname = "web"\nkind = "dicomweb"\nurl = "{web.dicomweb_url}"\ntimeout_seconds = 10.0\n'
    )
    return config


def drop_scans(layout: Layout, count: int, one_study: bool = True, first: int = 0) -> None:
    """``count`` SYNTHETIC breast ultrasound DICOMs numbered from ``first``, renamed into the inbox
    whole: one study (``STUDY``), or a study each (no study report: each study has a single scan)."""
    staging = layout.root / "staging"
    for i in range(first, first + count):
        rng = np.random.default_rng([14, i])
        path = write_dicom(
            staging / f"synthetic_{i:03d}.dcm",
            pixels=rng.integers(0, 255, (32, 32), dtype=np.uint8),
            modality="US",
            body_part="BREAST",
            extra={"StudyInstanceUID": STUDY if one_study else f"{STUDY}.{i + 1}"},
        )
        os.rename(path, layout.inbox / "busi" / path.name)


def engine_of(layout: Layout) -> Engine:
    return create_engine(f"sqlite:///{layout.db}")


def outbox_counts(engine: Engine) -> Counter[str]:
    with engine.connect() as conn:
        return Counter(dict(conn.execute(select(OutboxItem.status, func.count()).group_by(OutboxItem.status)).all()))


def scan_states(engine: Engine) -> Counter[str]:
    with engine.connect() as conn:
        return Counter(dict(conn.execute(select(Scan.state, func.count()).group_by(Scan.state)).all()))


def sent_uids(engine: Engine, destination: str) -> list[str]:
    with engine.connect() as conn:
        return sorted(conn.scalars(select(OutboxItem.sop_instance_uid).where(OutboxItem.destination == destination)))


def study_report_rows(engine: Engine, destination: str) -> int:
    with engine.connect() as conn:
        return conn.scalar(select(func.count()).where(STUDY_REPORT_ROWS, OutboxItem.destination == destination)) or 0


def latest_study_report_queued(engine: Engine) -> bool:
    """The study report covers every reported scan and its Encapsulated PDF is queued for both."""
    with engine.connect() as conn:
        newest_scan = conn.scalar(select(func.max(Report.created_at)).where(Report.kind == "scan"))
        study = conn.execute(select(Report.path, Report.created_at).where(Report.kind == "study")).first()
        if study is None or newest_scan is None or study.created_at < newest_scan:
            return False
        document = Path(str(engine.url.database)).parent / study.path  # the state directory's database
        key = pdf.study_object_key(pdf.content_digest(document.read_bytes()))  # as the daemon names it
        queued = conn.scalar(select(func.count()).where(OutboxItem.object_key == key))
    return queued == 2


def wait_delivered_and_archived(
    engine: Engine, daemon: RunningDaemon, scans: int, study_report: bool = False, timeout: float = 120.0
) -> None:
    """Every scan's objects delivered to both destinations and the scan archived (and, for a study of
    several scans, its latest report delivered too); nothing pending, nothing dead."""
    total = scans * OBJECTS_PER_SCAN * 2

    def done() -> bool:
        if study_report and not latest_study_report_queued(engine):
            return False
        counts = outbox_counts(engine)
        with engine.connect() as conn:
            scan_rows = conn.scalar(select(func.count()).where(~STUDY_REPORT_ROWS))
        return scan_rows == total and set(counts) == {"delivered"} and scan_states(engine)["archived"] == scans

    wait_until(done, timeout, f"{total} objects delivered and {scans} scans archived", daemon, every=0.2)


def check_pacs(pacs: dict[str, Orthanc], engine: Engine, scans: int) -> None:
    """Each Orthanc holds every object it was sent once: as many instances as objects sent to it, the
    same SOP Instance UIDs, each scan's objects in a new series of one instance."""
    for destination, server in (("pacs", pacs["dimse"]), ("web", pacs["web"])):
        uids = server.sop_instance_uids()
        assert sorted(uids) == sent_uids(engine, destination)
        reports = study_report_rows(engine, destination)
        assert len(uids) == scans * OBJECTS_PER_SCAN + reports
        per_series = Counter(len(series["Instances"]) for series in server.get("/series?expand"))
        expected = Counter({1: scans * OBJECTS_PER_SCAN})
        if reports:
            expected[reports] += 1  # the study report's series: one instance per version
        assert per_series == expected


def test_the_daemon_sends_every_object_into_the_source_study_by_c_store_and_stow_rs(
    daemons: Daemons, layout: Layout, pacs: dict[str, Orthanc]
):
    config = configure(layout, pacs)
    daemon = daemons.start(extra=("--config", str(config)), env=ENV)
    daemon.wait_ready()
    drop_scans(layout, 10)
    engine = engine_of(layout)
    wait_delivered_and_archived(engine, daemon, 10, study_report=True)
    daemon.signal(signal.SIGTERM)
    assert daemon.wait(60) == 0
    check_pacs(pacs, engine, 10)
    reports = study_report_rows(engine, "pacs")
    assert reports >= 1 and study_report_rows(engine, "web") == reports  # one instance per version
    for server in pacs.values():
        series = server.study_series(STUDY)
        # the scans' series (one per object kind and scan), and the study report's (its versions)
        assert len(series) == 10 * OBJECTS_PER_SCAN + 1
        classes = Counter(c for s in series for c in s["sop_classes"])
        assert classes == {**dict.fromkeys(SOP_CLASSES, 10), ENCAPSULATED_PDF: 10 + reports}
        study_series = [s for s in series if s.get("SeriesNumber") == str(pdf.STUDY_SERIES_NUMBER)]
        assert len(study_series) == 1 and study_series[0]["instances"] == reports


def test_a_pacs_stopped_for_30_s_while_100_scans_are_processed_gets_every_object_once_after_its_restart(
    daemons: Daemons, layout: Layout, pacs: dict[str, Orthanc]
):
    """Half the scans arrive before the PACS stops, half while it is down, so that scans are being
    processed during the outage whatever the machine's speed (on a quiet one the daemon reported
    all 100 before the first eight deliveries)."""
    config = configure(layout, pacs)
    daemon = daemons.start(extra=("--config", str(config)), env=ENV)
    daemon.wait_ready()
    drop_scans(layout, 50, one_study=False)
    engine = engine_of(layout)
    wait_until(lambda: outbox_counts(engine)["delivered"] >= 8, 120, "the first deliveries", daemon, every=0.1)
    for server in pacs.values():
        server.stop()
    stopped = time.monotonic()
    at_stop = scan_states(engine)
    drop_scans(layout, 50, one_study=False, first=50)

    def failing() -> bool:
        with engine.connect() as conn:
            retried = select(func.count()).where(OutboxItem.status == "pending", OutboxItem.attempts > 0)
            return bool(conn.scalar(retried))

    wait_until(failing, 30, "deliveries failing while the PACS is down", daemon, every=0.2)
    time.sleep(max(0.0, 30.0 - (time.monotonic() - stopped)))
    during = scan_states(engine)
    assert during["reported"] + during["archived"] > at_stop["reported"] + at_stop["archived"], (
        f"no scan was reported while the PACS was down: {at_stop} at the stop, {during} 30 s later"
    )
    with engine.connect() as conn:  # a scan whose objects wait is not archived
        waiting = select(OutboxItem.scan_id).where(OutboxItem.status == "pending")
        assert conn.scalar(select(func.count()).where(Scan.state == "archived", Scan.id.in_(waiting))) == 0
        assert conn.scalar(select(func.count()).where(OutboxItem.status == "pending")) > 0
    for server in pacs.values():
        server.start()
    wait_delivered_and_archived(engine, daemon, 100, timeout=300)
    daemon.signal(signal.SIGTERM)
    assert daemon.wait(60) == 0
    check_pacs(pacs, engine, 100)


def test_a_daemon_killed_while_sending_sends_the_rest_once_after_its_restart(
    daemons: Daemons, layout: Layout, pacs: dict[str, Orthanc]
):
    config = configure(layout, pacs)
    for server in pacs.values():
        server.stop()
    daemon = daemons.start(extra=("--config", str(config)), env=ENV)
    daemon.wait_ready()
    drop_scans(layout, 12, one_study=False)
    engine = engine_of(layout)
    queued = 12 * OBJECTS_PER_SCAN * 2
    wait_until(lambda: outbox_counts(engine)["pending"] == queued, 120, f"{queued} objects queued", daemon, every=0.2)
    for server in pacs.values():
        server.start()
    wait_until(lambda: outbox_counts(engine)["delivered"] >= 1, 60, "the first delivery", daemon, every=0.005)
    daemon.kill_hard()
    at_kill = outbox_counts(engine)
    assert at_kill["pending"] > 0, f"everything was sent before the kill: {at_kill}"

    again = daemons.start(extra=("--config", str(config)), env=ENV)
    wait_delivered_and_archived(engine, again, 12)
    again.signal(signal.SIGTERM)
    assert again.wait(60) == 0
    check_pacs(pacs, engine, 12)


def test_a_daemon_killed_alone_mid_send_has_none_of_its_objects_sent_twice_by_its_successor(
    daemons: Daemons, layout: Layout
):
    """kill -9 of the daemon's own process only (its children live on: a supervisor or an operator
    that kills the main pid) once the archive has stored one object and holds the next one unanswered.
    The old outbox process went on sending its whole round, and every object it held was stored twice;
    then it stopped after the object in hand, but the restarted daemon took over the dead one's
    claims at once, and sent again both the object already acknowledged (its answer was recorded
    with the round's) and the one in hand. The acknowledgement is recorded as it comes, and a gone
    daemon's claims are taken once the object in hand can no longer be answered."""
    second_in_hand, let_it_be_answered = threading.Event(), threading.Event()
    calls = itertools.count(1)

    def hold_the_second() -> None:
        if next(calls) == 2:
            second_in_hand.set()
            let_it_be_answered.wait(60)

    scp = ScriptedScp(on_store=hold_the_second)
    try:
        promote_into(f"sqlite:///{layout.db}", layout.state / "models", write_model(layout.root / "model"))
        config = layout.root / "meddaemon.toml"
        config.write_text(
            'dicom_outputs = ["sr", "pdf"]\noutbox_retry_seconds = 0.5\noutbox_max_retry_seconds = 2.0\n'
            f'[[destination]]\nname = "pacs"\nkind = "dicom"\nae_title = "{scp.ae_title}"\n'
            f'host = "127.0.0.1"\nport = {scp.port}\ntimeout_seconds = 60\n'
        )
        daemon = daemons.start(extra=("--config", str(config)), env=ENV)
        daemon.wait_ready()
        drop_scans(layout, 3, one_study=False)
        engine = engine_of(layout)
        wait_until(second_in_hand.is_set, 120, "the second object in the archive's hands", daemon, every=0.05)
        daemon.proc.kill()
        daemon.proc.wait(10)

        again = daemons.start(extra=("--config", str(config)), env=ENV)
        again.wait_ready()
        time.sleep(2.0)  # a successor taking the claims at once has sent the first two again by now
        let_it_be_answered.set()
        wait_until(lambda: outbox_counts(engine) == Counter(delivered=6), 120, "6 objects delivered", again)
        time.sleep(3.0)  # what a sender left behind would still be sending
    finally:
        let_it_be_answered.set()
        scp.stop()
    assert Counter(scp.received) == Counter(dict.fromkeys(sent_uids(engine, "pacs"), 1))


@pytest.mark.parametrize("gone", ["killed", "declared lost"])
def test_the_sender_of_a_daemon_gone_leaves_the_object_in_hand_before_another_daemon_may_take_it(
    daemons: Daemons, layout: Layout, gone: str
):
    """Each stage of a send has its own bound (the connection, each read of the answer), so a server
    answering a byte at a time kept the object in hand of a gone daemon's sender (killed alone, or
    frozen and declared lost) for as long as it liked: past the moment another daemon takes it over
    (``timeout_seconds`` and 5 s after the old one was found gone), and both could record it
    delivered. The sender gives the object up after ``timeout_seconds`` and leaves."""
    timeout = 2.0
    stow = ScriptedStow([HttpAnswer(200, "application/dicom+json", b"{}", trickle=0.5)])
    try:
        promote_into(f"sqlite:///{layout.db}", layout.state / "models", write_model(layout.root / "model"))
        config = layout.root / "meddaemon.toml"
        config.write_text(
            'dicom_outputs = ["sr"]\noutbox_retry_seconds = 0.5\n'
            f'[[destination]]\nname = "web"\nkind = "dicomweb"\nurl = "{stow.url}"\ntimeout_seconds = {timeout}\n'
        )
        daemon = daemons.start(extra=("--config", str(config)), env=ENV)
        daemon.wait_ready()
        drop_scans(layout, 1, one_study=False)
        wait_until(lambda: stow.requests == 1, 120, "the object sent", daemon, every=0.02)
        sender_pid = int(re.search(r"outbox sender process started \(pid (\d+)\)", daemon.log_text())[1])
        if gone == "killed":
            daemon.proc.kill()
            daemon.proc.wait(10)
        else:
            daemon.signal(signal.SIGSTOP)
            with engine_of(layout).begin() as conn:  # what another daemon's look for lost ones does
                conn.execute(update(DaemonInstance).values(state="lost", stopped_at=db_clock()))
        since = time.monotonic()
        wait_until(lambda: not _alive(sender_pid) or time.monotonic() - since > 15, 20, "the sender to leave")
        left_after = time.monotonic() - since
    finally:
        stow.stop()
    bound = timeout + (0 if gone == "killed" else WATCH_SECONDS) + 1.5
    assert left_after < bound, f"the sender was still there {left_after:.1f} s after its daemon was {gone}"
    assert "the object in hand was not answered within 2 s" in daemon.log_text()


def _alive(pid: int) -> bool:
    """``pid`` names a process that has not ended (a zombie, whose parent was killed, has)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
