"""DICOM network in, through the real daemon (a subprocess started with ``--dicom-port``).

Specified here: instances pushed by dcmtk's storescu and by pynetdicom end as exactly one scan each,
whose file holds the dataset byte for byte as sent; the same bytes sent again are a duplicate, a
corrected instance (same SOP Instance UID, other bytes) a second scan, and ``medcli scans`` says who
sent each and which version it is; ``meddaemon health`` and the metrics report the receiver. A real
PACS (Orthanc, told through its REST API) sends a study the same way. A SIGKILL of the daemon in
the middle of a send loses nothing the sender was told was stored, and what it was not told it
sends again, processed once.

Every instance sent is SYNTHETIC (``dicom_senders``).
"""

from __future__ import annotations

import json
import os
import re
import signal
import sqlite3
import threading
from collections import Counter
from contextlib import closing
from pathlib import Path

import click
import pytest
from click.testing import CliRunner
from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian

from daemon_harness import Daemons, Layout, RunningDaemon, one, scrape, wait_until
from dicom_senders import dataset_bytes, pynetdicom_send, storescu, synthetic_instances
from meddaemon.cli.daemon import cli as meddaemon
from meddaemon.cli.medcli import cli as medcli
from meddaemon.dicom.associations import keep_answers
from meddaemon.processes import process_alive
from orthanc import Orthanc, require_orthanc
from ports import free_port

pytestmark = pytest.mark.slow


def start_receiving(daemons: Daemons, port: int) -> RunningDaemon:
    """A daemon receiving DICOM on ``port``; its scans go to busi (no model: they wait for one)."""
    daemon = daemons.start(extra=("--dicom-port", str(port), "--default-task", "busi"))
    wait_listening(daemon)
    return daemon


def wait_listening(daemon: RunningDaemon) -> None:
    wait_until(lambda: "DICOM receiver MEDDAEMON listening" in daemon.log_text(), 90, "the receiver", daemon)


def query(layout: Layout, sql: str) -> list[tuple]:
    with closing(sqlite3.connect(layout.db, timeout=30)) as conn:
        return conn.execute(sql).fetchall()


def live_scans(layout: Layout) -> list[tuple[str, str]]:
    """(SOP Instance UID, stored path) of every scan not failed."""
    return query(layout, "SELECT sop_instance_uid, stored_path FROM scans WHERE state != 'failed' ORDER BY id")


def moves_pending(layout: Layout) -> int:
    """Scans whose row is committed and whose file is not yet where the row says (moved after the commit)."""
    return int(query(layout, "SELECT count(*) FROM scans WHERE pending_move_from IS NOT NULL")[0][0])


def stored_datasets(layout: Layout) -> Counter[bytes]:
    return Counter(dataset_bytes(layout.stored_file(path).read_bytes()) for _, path in live_scans(layout))


def sent_datasets(files: list[Path]) -> Counter[bytes]:
    return Counter(dataset_bytes(p.read_bytes()) for p in files)


def left_in_the_receivers_folder(layout: Layout) -> list[Path]:
    folder = layout.inbox / "dicom"
    return sorted(folder.iterdir()) if folder.exists() else []


def invoke(layout: Layout, command: click.Command, *args: str, env: dict[str, str] | None = None) -> str:
    """A command of ``medcli`` or ``meddaemon`` on the layout's state, in this process."""
    result = CliRunner().invoke(command, [*args, "--state-dir", str(layout.state)], env=env)
    assert result.exit_code == 0, result.output
    return result.stdout


def test_pushed_instances_become_one_scan_each_with_their_sender_and_versions(
    layout: Layout, daemons: Daemons, tmp_path: Path
):
    """storescu (one association), pynetdicom (the same bytes again, then a corrected instance) and a
    real PACS, Orthanc, told through its REST API to send a study of two series."""
    require_orthanc()
    port, metrics_port = free_port(), free_port()
    daemon = daemons.start(
        extra=("--dicom-port", str(port), "--default-task", "busi"), env={"MEDDAEMON_METRICS_PORT": str(metrics_port)}
    )
    pacs = Orthanc(tmp_path / "orthanc")
    pacs.add_modality("meddaemon", "MEDDAEMON", port)
    pacs.start()  # while the daemon starts
    try:
        wait_listening(daemon)
        sent = synthetic_instances(tmp_path / "sent", 3, seed=11)
        run = storescu(port, sent)
        assert run.returncode == 0, run.stderr
        assert pynetdicom_send(port, sent[:1]) == [0x0000]  # the same bytes again: a duplicate
        corrected = tmp_path / "corrected.dcm"
        ds = dcmread(sent[1])
        ds.PixelData = bytes(len(ds.PixelData))  # SYNTHETIC correction: same SOP Instance UID, other pixels
        ds.save_as(corrected)
        assert pynetdicom_send(port, [corrected]) == [0x0000]

        study = "1.2.826.0.1.3680043.8.498.1818001"
        from_pacs = [
            *synthetic_instances(tmp_path / "pacs", 2, study=study, seed=12),
            *synthetic_instances(tmp_path / "pacs", 2, study=study, seed=13),  # a second series
        ]
        [orthanc_study] = {pacs.upload(path)["ParentStudy"] for path in from_pacs}
        answer = pacs.store("meddaemon", [orthanc_study])
        assert answer["InstancesCount"] == 4 and answer.get("FailedInstancesCount", 0) == 0, answer
    finally:
        pacs.discard()

    wait_until(
        lambda: (
            len(live_scans(layout)) == 8
            and query(layout, "SELECT count(*) FROM duplicate_arrivals") == [(1,)]
            and moves_pending(layout) == 0
        ),
        60,
        "8 scans and 1 duplicate, in place",
        daemon,
    )
    assert stored_datasets(layout) == sent_datasets([*sent, corrected, *from_pacs])
    assert query(layout, "SELECT calling_ae, count(*) FROM received_instances GROUP BY calling_ae") == [
        ("ORTHANC", 4),
        ("PYNETDICOM", 2),
        ("STORESCU", 3),
    ]
    uid = str(ds.SOPInstanceUID)
    listing = invoke(layout, medcli, "scans")
    assert listing.count("from STORESCU@127.0.0.1") == 3 and listing.count("from ORTHANC@127.0.0.1") == 4
    assert f"version 1 of {uid}" in listing and f"version 2 of {uid}" in listing
    rows = [r["received"] for r in json.loads(invoke(layout, medcli, "scans", "--json"))]
    assert sorted((r["version"], r["versions"]) for r in rows if r["sop_instance_uid"] == uid) == [(1, 2), (2, 2)]
    assert sorted(r["receptions"] for r in rows) == [1] * 7 + [2]

    health = json.loads(invoke(layout, meddaemon, "health", "--json", env={"MEDDAEMON_DICOM_PORT": str(port)}))
    dicom = next(c for c in health["checks"] if c["name"] == "dicom")
    assert dicom["status"] == "ok" and dicom["details"]["probe"] == "echoed"
    assert (dicom["details"]["instances_last_hour"], dicom["details"]["studies_arriving"]) == (9, 2)
    samples = scrape(f"http://127.0.0.1:{metrics_port}/metrics")
    assert one(samples, "meddaemon_dicom_instances_total", status="stored") == 9
    assert one(samples, "meddaemon_dicom_receiver_up") == 1

    daemon.signal(signal.SIGTERM)
    assert daemon.wait(60) == 0
    assert pynetdicom_send(port, sent[:1]) == [None]  # stopped with the daemon
    assert left_in_the_receivers_folder(layout) == []


def test_a_sigterm_to_the_whole_process_group_stops_the_receiver_before_the_daemon_exits(
    layout: Layout, daemons: Daemons, tmp_path: Path
):
    """The group's SIGTERM (``timeout``, ``kill -- -PGID``) ended the forkserver the receiver was
    started from: the daemon took the receiver for stopped at once and exited, while the receiver,
    which leaves SIGTERM to the daemon, went on answering an open association for 10 s."""
    from pynetdicom import AE
    from pynetdicom.sop_class import SecondaryCaptureImageStorage

    port = free_port()
    daemon = start_receiving(daemons, port)
    receiver = int(re.search(r"DICOM receiver process started \(pid (\d+)\)", daemon.log_text())[1])  # type: ignore[index]
    ae = AE(ae_title="PYNETDICOM")
    ae.add_requested_context(SecondaryCaptureImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", port, ae_title="MEDDAEMON")
    try:
        assert assoc.is_established
        os.killpg(daemon.pid, signal.SIGTERM)
        assert daemon.wait(60) == 0, daemon.tail()
        assert not process_alive(receiver), "the receiver outlived the daemon"
        assert assoc.is_aborted or not assoc.is_established
    finally:
        ae.shutdown()


def test_a_sigkill_during_a_send_loses_nothing_the_sender_was_told_was_stored(
    layout: Layout, daemons: Daemons, tmp_path: Path
):
    """The daemon is killed (its whole process group, the receiver with it) while pynetdicom sends 200
    instances in one association, once a third of them were answered. Every instance answered 0x0000
    is a scan; the others (failed or never answered) are sent again to the restarted daemon, on the
    same port; then every instance is exactly one scan, and nothing half-written is left in the inbox."""
    from pynetdicom import AE

    count = 200
    sent = synthetic_instances(tmp_path / "sent", count, seed=14, size=8)
    datasets = [dcmread(p) for p in sent]
    port = free_port()
    daemon = start_receiving(daemons, port)
    statuses: dict[int, int | None] = {}
    a_third_stored = threading.Event()

    def send() -> None:
        ae = AE(ae_title="MODALITY")
        ae.add_requested_context(datasets[0].SOPClassUID, str(datasets[0].file_meta.TransferSyntaxUID))
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 20
        assoc = ae.associate("127.0.0.1", port, ae_title="MEDDAEMON")
        keep_answers(assoc)  # as pynetdicom_send: the receiver's answers are kept for the C-STORE waiting
        try:
            for i, ds in enumerate(datasets):
                answer = assoc.send_c_store(ds)
                statuses[i] = int(answer.Status) if "Status" in answer else None
                if statuses[i] is None:  # the association is gone: another C-STORE would wait out its timeout
                    break
                if list(statuses.values()).count(0x0000) == count // 3:
                    a_third_stored.set()  # the kill lands while the other two thirds are being sent
        finally:
            a_third_stored.set()
            ae.shutdown()

    sender = threading.Thread(target=send)
    sender.start()
    assert a_third_stored.wait(120), "the sender never got a third of the instances out"
    daemon.kill_hard()
    sender.join(60)
    told = [i for i in range(count) if statuses.get(i) == 0x0000]
    assert count // 3 <= len(told) < count, f"the kill did not land mid-send: {len(told)} of {count} stored"

    again = start_receiving(daemons, port)
    untold = [sent[i] for i in range(count) if i not in told]
    assert pynetdicom_send(port, untold, calling="MODALITY") == [0x0000] * len(untold)
    wait_until(
        lambda: len(live_scans(layout)) >= count and moves_pending(layout) == 0, 120, f"{count} scans, in place", again
    )
    assert Counter(uid for uid, _ in live_scans(layout)) == Counter(str(ds.SOPInstanceUID) for ds in datasets)
    assert stored_datasets(layout) == sent_datasets(sent)
    wait_until(lambda: left_in_the_receivers_folder(layout) == [], 30, "the receiver's folder to empty", again)
