"""Each sender against a real peer: Orthanc stores what C-STORE and STOW-RS send; scripted peers
refuse (0xA700 out of resources, 0xC000 cannot understand, 0xA900 wrong SOP class), drop the
association, or answer STOW-RS with 409/500/400, and each answer is classified as the outbox needs:
acknowledged, worth retrying, or refused for good. A C-STORE association is kept open between
sends until it has been idle for ``keep_open_seconds``."""

from __future__ import annotations

import errno
import json
import logging
import os
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from dicom_factory import write_dicom
from pydicom.encaps import encapsulate
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEG2000Lossless, JPEGBaseline8Bit

from daemon_harness import wait_until
from dicom_peers import DROP, HttpAnswer, ScriptedScp, ScriptedStow
from fake_clock import FakeClock
from meddaemon.config import DestinationConfig
from meddaemon.dicom import encoding, sc
from meddaemon.dicom.senders import NO_ANSWER, Delivery, DimseSender, FolderSender, StowSender
from orthanc import Orthanc


@pytest.fixture
def objects(tmp_path: Path) -> list[Path]:
    rng = np.random.default_rng(5)
    return [
        write_dicom(tmp_path / f"synthetic_{i}.dcm", pixels=rng.integers(0, 255, (16, 16), dtype=np.uint8))
        for i in range(3)
    ]


def uids(paths: list[Path]) -> list[str]:
    return [str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in paths]


def test_c_store_and_stow_rs_to_orthanc_are_acknowledged_and_stored(orthanc: Orthanc, objects: list[Path]):
    dimse = DimseSender(DestinationConfig(**orthanc.destination("pacs", "dicom")))  # type: ignore[arg-type]
    stow = StowSender(DestinationConfig(**orthanc.destination("web", "dicomweb")))  # type: ignore[arg-type]
    assert [d.acknowledged for d in dimse.send(objects[:2])] == [True, True]
    assert [d.acknowledged for d in stow.send(objects[2:])] == [True]
    dimse.close()
    stow.close()
    assert sorted(orthanc.sop_instance_uids()) == sorted(uids(objects))


def test_a_stopped_pacs_is_a_failure_worth_retrying(orthanc: Orthanc, objects: list[Path]):
    orthanc.stop()
    dimse = DimseSender(DestinationConfig(**orthanc.destination("pacs", "dicom")))  # type: ignore[arg-type]
    stow = StowSender(DestinationConfig(**orthanc.destination("web", "dicomweb")))  # type: ignore[arg-type]
    for answer in [*dimse.send(objects[:1]), *stow.send(objects[:1])]:
        assert not answer.acknowledged and not answer.permanent, answer


def test_a_c_store_peer_that_is_down_is_one_answer_and_no_error_line_of_pynetdicom(
    objects: list[Path], caplog: pytest.LogCaptureFixture
):
    """pynetdicom logged two ERROR lines ("Association request failed", "TCP Initialisation
    Error") at every retry against a peer that is down, which log alerting took for faults: the
    outbox logs the answer, a warning, once per attempt, and it says why there is no connection."""
    from ports import free_port

    nowhere = DestinationConfig(name="down", kind="dicom", ae_title="NOWHERE", host="127.0.0.1", port=free_port())
    caplog.set_level(logging.DEBUG)
    [answer] = DimseSender(nowhere).send(objects[:1])
    assert not answer.acknowledged and not answer.permanent, answer
    assert answer.detail == f"no connection: [Errno 111] Connection refused (127.0.0.1:{nowhere.port} NOWHERE)"
    assert [r.getMessage() for r in caplog.records if r.name.startswith("pynetdicom")] == []


@pytest.mark.parametrize(
    ("status", "expected"),
    [
        (0xA700, Delivery(False, "C-STORE status 0xA700")),
        (0xC000, Delivery(False, "C-STORE status 0xC000")),
        (0xA900, Delivery(False, "C-STORE status 0xA900", permanent=True)),
        (0xB007, Delivery(True, "C-STORE status 0xB007")),  # stored, with a warning
        (0xB001, Delivery(True, "C-STORE status 0xB001")),  # any Bxxx is a warning (PS3.7 C.1)
        (0x0001, Delivery(True, "C-STORE status 0x0001")),  # and 0001: both were sent again, then dead
    ],
)
def test_c_store_statuses_are_classified(objects: list[Path], status: int, expected: Delivery):
    scp = ScriptedScp([status])
    try:
        sender = DimseSender(DestinationConfig(**scp.destination()))  # type: ignore[arg-type]
        first, second = sender.send(objects[:2])
    finally:
        scp.stop()
    assert first == expected
    assert second == Delivery(True)  # the same association goes on
    assert scp.received == uids(objects[:2])


def test_an_association_is_kept_open_between_sends_and_released_once_idle(objects: list[Path]):
    scp, clock = ScriptedScp(), FakeClock()
    try:
        sender = DimseSender(DestinationConfig(**{**scp.destination(), "keep_open_seconds": 5.0}), clock)  # type: ignore[arg-type]
        for path in objects:
            assert sender.send([path]) == [Delivery(True)]
            clock.now += 4.0
            sender.release_idle()  # 4 s since its last send: kept
        assert scp.associations == 1 and scp.open_associations() == 1
        clock.now += 1.0
        sender.release_idle()
        wait_until(lambda: scp.open_associations() == 0, 10, "the association to close", every=0.01)
        assert sender.send(objects[:1]) == [Delivery(True)]
        sender.close()
    finally:
        scp.stop()
    assert scp.associations == 2
    assert scp.stored == uids(objects) + uids(objects[:1])


def test_keep_open_zero_releases_the_association_after_each_send(objects: list[Path]):
    scp = ScriptedScp()
    try:
        sender = DimseSender(DestinationConfig(**{**scp.destination(), "keep_open_seconds": 0.0}))  # type: ignore[arg-type]
        assert [sender.send([p]) for p in objects] == [[Delivery(True)]] * 3
    finally:
        scp.stop()
    assert scp.associations == 3


def test_a_new_sop_class_opens_an_association_proposing_it_and_those_sent_before(tmp_path: Path, objects: list[Path]):
    capture = write_dicom(tmp_path / "synthetic_sc.dcm", modality="SC", pixels=np.zeros((8, 8), np.uint8))
    scp = ScriptedScp()
    try:
        sender = DimseSender(DestinationConfig(**scp.destination()))  # type: ignore[arg-type]
        assert sender.send(objects[:1]) + sender.send([capture]) + sender.send(objects[1:]) == [Delivery(True)] * 4
        sender.close()
    finally:
        scp.stop()
    assert scp.associations == 2  # the third send went on the second association
    assert scp.stored == uids(objects[:1]) + uids([capture]) + uids(objects[1:])


def test_a_kept_association_the_peer_closed_is_opened_again_before_anything_fails(objects: list[Path]):
    scp = ScriptedScp()
    try:
        sender = DimseSender(DestinationConfig(**scp.destination()))  # type: ignore[arg-type]
        assert sender.send(objects[:1]) == [Delivery(True)]
        scp.abort_all()  # as a PACS timing out an idle association does
        wait_until(lambda: scp.open_associations() == 0, 10, "the association to close", every=0.01)
        assert sender.send(objects[1:]) == [Delivery(True)] * 2
        sender.close()
    finally:
        scp.stop()
    assert scp.associations == 2 and scp.stored == uids(objects)


def test_a_resting_association_the_peer_asked_to_release_is_replaced_before_anything_fails(objects: list[Path]):
    scp = ScriptedScp()
    try:
        destination = DestinationConfig(**{**scp.destination(), "timeout_seconds": 5.0})  # type: ignore[arg-type]
        sender = DimseSender(destination)
        assert sender.send(objects[:1]) == [Delivery(True)]
        releasing = threading.Thread(target=scp.release_all)
        releasing.start()  # the request waits for an answer that a resting association does not give
        wait_until(scp.awaiting_release, 10, "the release request to go out", every=0.01)
        time.sleep(0.05)  # and to reach the sender's side of the connection
        started = time.monotonic()
        assert sender.send(objects[1:]) == [Delivery(True)] * 2
        assert time.monotonic() - started < destination.timeout_seconds  # no request waited out a timeout
        releasing.join(30)
        assert not releasing.is_alive()
        sender.close()
    finally:
        scp.stop()
    assert scp.associations == 2 and scp.stored == uids(objects)


def test_a_kept_association_dropped_at_its_first_object_is_tried_once_more_on_a_new_one(objects: list[Path]):
    scp = ScriptedScp([0x0000, DROP, DROP])
    try:
        destination = DestinationConfig(**{**scp.destination(), "timeout_seconds": 3.0})  # type: ignore[arg-type]
        sender = DimseSender(destination)
        assert sender.send(objects[:1]) == [Delivery(True)]
        second = sender.send(objects[1:2])  # dropped on the kept association, then on a new one
        third = sender.send(objects[2:])  # a new association again
        sender.close()
    finally:
        scp.stop()
    assert not second[0].acknowledged and not second[0].permanent
    assert third == [Delivery(True)]
    assert scp.associations == 3
    assert scp.received == uids(objects[:1]) + uids(objects[1:2]) * 2 + uids(objects[2:])


def test_a_request_a_slow_peer_does_not_answer_in_time_on_a_kept_association_is_not_sent_again_at_once(
    objects: list[Path],
):
    """A DIMSE timeout was taken for a kept association the peer had closed: the object went again
    at once on a new one, a slow archive receiving each object twice and the send held twice its
    timeout. It is one failed attempt, left to the outbox's backoff."""
    scp = ScriptedScp()
    try:
        destination = DestinationConfig(**{**scp.destination(), "timeout_seconds": 1.0})  # type: ignore[arg-type]
        sender = DimseSender(destination)
        assert sender.send(objects[:1]) == [Delivery(True)]
        scp.delay = 2.5  # the archive slows down
        arrivals: list[float] = []
        scp.on_store = lambda: arrivals.append(time.monotonic())
        began = time.monotonic()
        [second] = sender.send(objects[1:2])
        took = time.monotonic() - began
        sender.close()
    finally:
        scp.stop()
    assert second == NO_ANSWER
    assert len(arrivals) == 1 and scp.associations == 1
    assert took < 2.0, took


def test_an_object_goes_as_written_or_in_the_one_syntax_the_peer_accepts(tmp_path: Path, objects: list[Path]):
    written = pydicom.dcmread(objects[0])
    for accepts in (None, [ImplicitVRLittleEndian]):
        scp = ScriptedScp(accepts=accepts)
        try:
            sender = DimseSender(DestinationConfig(**scp.destination()))  # type: ignore[arg-type]
            assert sender.send(objects[:1]) == [Delivery(True)]
            sender.close()
        finally:
            scp.stop()
        assert scp.syntaxes == [str(accepts[0] if accepts else written.file_meta.TransferSyntaxUID)]
        assert scp.stored == uids(objects[:1])


def test_a_peer_that_accepts_no_presentation_context_refuses_for_good(objects: list[Path]):
    """It accepts the association and none of its contexts, and pynetdicom aborts: taken for a
    failure to connect, each object was tried again for an hour before it went dead."""
    scp = ScriptedScp(accepts=[JPEG2000Lossless])
    try:
        sender = DimseSender(DestinationConfig(**scp.destination()))  # type: ignore[arg-type]
        answers = sender.send(objects[:2])
        sender.close()
    finally:
        scp.stop()
    assert [(a.acknowledged, a.permanent) for a in answers] == [(False, True)] * 2
    assert "accepts no presentation context of" in answers[0].detail and scp.received == []


def jpeg_capture(path: Path) -> tuple[Path, np.ndarray]:
    """A SYNTHETIC colour Secondary Capture in JPEG Baseline, as ``dicom.sc`` writes the daemon's
    captures, and its picture."""
    rows, columns = np.mgrid[0:48, 0:64]
    picture = np.stack([rows * 5, columns * 4, np.full_like(rows, 128)], axis=-1).astype(np.uint8)
    capture = hd.sc.SCImage(
        pixel_array=picture,
        photometric_interpretation=sc.PHOTOMETRIC,
        bits_allocated=8,
        coordinate_system=hd.CoordinateSystemNames.PATIENT,
        study_instance_uid=hd.UID(),
        series_instance_uid=hd.UID(),
        series_number=1,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="SYNTHETIC",
        patient_orientation=("L", "F"),
        transfer_syntax_uid=sc.TRANSFER_SYNTAX,
    )
    path.write_bytes(encoding.encode(capture))
    return path, picture


def test_a_jpeg_capture_goes_as_written_where_the_peer_takes_jpeg_and_decompressed_where_it_does_not(tmp_path: Path):
    """Decompressed, it went with a new SOP Instance UID each time (pydicom's default): every resend
    was another image in the study, under a UID the outbox never recorded."""
    capture, picture = jpeg_capture(tmp_path / "synthetic_sc.dcm")
    written = pydicom.dcmread(capture, stop_before_pixels=True).SOPInstanceUID
    for accepts, expected in (([JPEGBaseline8Bit], JPEGBaseline8Bit), (None, ExplicitVRLittleEndian)):
        scp = ScriptedScp(accepts=accepts)  # None: pynetdicom's four uncompressed syntaxes
        try:
            sender = DimseSender(DestinationConfig(**scp.destination()))  # type: ignore[arg-type]
            assert sender.send([capture]) == [Delivery(True)]
            sender.close()
        finally:
            scp.stop()
        assert scp.syntaxes == [expected]
        (received,) = scp.datasets
        assert received.SOPInstanceUID == written, expected
        if expected == ExplicitVRLittleEndian:
            assert received.PhotometricInterpretation == "RGB"  # decoded, as pydicom gives it
        assert np.abs(received.pixel_array.astype(int) - picture).mean() < 2.0


def test_a_capture_that_cannot_be_decompressed_for_a_peer_without_jpeg_is_refused_for_good_and_the_rest_go_on(
    tmp_path: Path, objects: list[Path]
):
    capture, _ = jpeg_capture(tmp_path / "synthetic_sc.dcm")
    broken = pydicom.dcmread(capture)
    broken.PixelData = encapsulate([b"\xff\xd8 SYNTHETIC, not a JPEG stream \xff\xd9"])
    broken.save_as(capture)
    scp = ScriptedScp()  # pynetdicom's four uncompressed syntaxes
    try:
        sender = DimseSender(DestinationConfig(**scp.destination()))  # type: ignore[arg-type]
        refused, stored = sender.send([capture, objects[0]])
        sender.close()
    finally:
        scp.stop()
    assert not refused.acknowledged and refused.permanent and "decompressing it failed" in refused.detail
    assert stored == Delivery(True) and scp.stored == uids(objects[:1])


def test_an_object_file_that_is_not_dicom_is_refused_for_good_and_nothing_is_sent(tmp_path: Path):
    scp = ScriptedScp()
    try:
        not_dicom = tmp_path / "not_dicom.dcm"
        not_dicom.write_bytes(b"synthetic, not DICOM" * 20)
        (answer,) = DimseSender(DestinationConfig(**scp.destination())).send([not_dicom])  # type: ignore[arg-type]
    finally:
        scp.stop()
    assert not answer.acknowledged and answer.permanent and "cannot be read" in answer.detail
    assert scp.associations == 0


@pytest.mark.parametrize("kind", ["dicom", "dicomweb", "folder"])
def test_an_object_file_that_cannot_be_read_is_refused_for_good_and_the_others_of_its_send_are_delivered(
    tmp_path: Path, objects: list[Path], kind: str
):
    """The outbox sends up to 32 objects a call: one object file damaged on disk (here not DICOM,
    or cut short inside its File Meta) is its own refusal, and takes none of the others with it."""
    not_dicom = tmp_path / "not_dicom.dcm"
    not_dicom.write_bytes(b"synthetic, not DICOM" * 20)
    cut_short = tmp_path / "cut_short.dcm"
    cut_short.write_bytes(objects[2].read_bytes()[:150])
    (tmp_path / "share").mkdir()
    scp, stow = ScriptedScp(), ScriptedStow()
    try:
        destination = {
            "dicom": scp.destination(),
            "dicomweb": stow.destination(),
            "folder": {"name": "share", "kind": "folder", "path": str(tmp_path / "share")},
        }[kind]
        sender = {"dicom": DimseSender, "dicomweb": StowSender, "folder": FolderSender}[kind]
        answers = sender(DestinationConfig(**destination)).send(  # type: ignore[arg-type]
            [objects[0], not_dicom, objects[1], cut_short]
        )
    finally:
        scp.stop()
        stow.stop()
    assert [a.acknowledged for a in answers] == [True, False, True, False]
    for refused in (answers[1], answers[3]):
        assert refused.permanent and refused.detail.startswith("the object file cannot be read (")
    if kind == "dicom":
        assert scp.stored == uids(objects[:2])
    elif kind == "dicomweb":
        assert stow.stored == 2
    else:
        assert sorted(f.stem for f in (tmp_path / "share").rglob("*.dcm")) == sorted(uids(objects[:2]))


def test_a_dropped_association_fails_what_was_in_flight_and_what_was_left(objects: list[Path]):
    scp = ScriptedScp([0x0000, DROP])
    try:
        destination = DestinationConfig(**{**scp.destination(), "timeout_seconds": 3.0})  # type: ignore[arg-type]
        answers = DimseSender(destination).send(objects)
    finally:
        scp.stop()
    assert [a.acknowledged for a in answers] == [True, False, False]
    assert not any(a.permanent for a in answers)


def sent_over_stow_rs(script: list[int | tuple[int, int]], objects: list[Path]) -> tuple[list[Delivery], ScriptedStow]:
    """``objects`` sent to a STOW-RS endpoint answering ``script`` (``ScriptedStow``), stopped after."""
    stow = ScriptedStow(script)
    try:
        return StowSender(DestinationConfig(**stow.destination())).send(objects), stow  # type: ignore[arg-type]
    finally:
        stow.stop()


def test_a_process_logging_at_debug_never_logs_a_stow_rs_destination_s_query_where_a_token_may_be(
    objects: list[Path],
):
    """urllib3 logged every request's line at DEBUG, ``POST /dicom-web/studies?token=...``: turning
    DEBUG on to troubleshoot put the PACS's token in the journal."""
    stow = ScriptedStow()
    url = f"{stow.destination()['url']}?token=SYNTHETIC-SECRET"
    script = (
        "import sys; from pathlib import Path; from meddaemon.logs import setup_logging; setup_logging('DEBUG'); "
        "from meddaemon.config import DestinationConfig; from meddaemon.dicom.senders import StowSender; "
        "destination = DestinationConfig(name='web', kind='dicomweb', url=sys.argv[1]); "
        "[answer] = StowSender(destination).send([Path(sys.argv[2])]); "
        "print(answer.acknowledged)"
    )
    try:
        run = subprocess.run(
            [sys.executable, "-c", script, url, str(objects[0])], capture_output=True, text=True, timeout=120
        )
    finally:
        stow.stop()
    assert run.stdout.strip() == "True" and stow.stored == 1, run.stderr
    assert "SYNTHETIC-SECRET" in stow.paths[0] and "SYNTHETIC-SECRET" not in run.stderr, run.stderr


def test_a_stow_rs_server_that_hangs_costs_one_timeout_and_the_rest_of_the_send_fails_untried(objects: list[Path]):
    """Each object waited the whole timeout in turn (4 x 5 s), and every destination behind it."""
    stow = ScriptedStow([HttpAnswer(200, delay=10.0)])
    try:
        sender = StowSender(DestinationConfig(**{**stow.destination(), "timeout_seconds": 1.0}))  # type: ignore[arg-type]
        started = time.monotonic()
        answers = sender.send(objects)
        took = time.monotonic() - started
    finally:
        stow.stop()
    assert stow.requests == 1 and took < 3.0
    assert answers[0] == Delivery(False, "STOW-RS ReadTimeout: no answer within 1 s")
    assert answers[1:] == [
        Delivery(False, "STOW-RS ReadTimeout: no answer within 1 s (not tried: the one before it had no answer)")
    ] * (len(objects) - 1)


def test_stow_rs_transport_failures_say_why_in_words(objects: list[Path], tmp_path: Path):
    """A mistyped host, a server down and an untrusted certificate all read "ConnectionError" or
    "SSLError", and a hospital's own CA could not be given (only through REQUESTS_CA_BUNDLE)."""
    from ports import free_port

    nowhere = DestinationConfig(name="down", kind="dicomweb", url=f"http://127.0.0.1:{free_port()}/dicom-web")
    [refused] = StowSender(nowhere).send(objects[:1])
    assert refused == Delivery(False, "STOW-RS ConnectionError: the connection was refused (nothing listens there)")

    cert, key = tmp_path / "server.pem", tmp_path / "server.key"  # SYNTHETIC, self-signed, for 127.0.0.1
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-keyout", str(key), "-days", "1", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1", "-out", str(cert)],
                   check=True, capture_output=True, timeout=60)  # fmt: skip
    other, _ = tmp_path / "other.pem", tmp_path / "other.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-keyout", str(tmp_path / "other.key"), "-days", "1", "-subj", "/CN=other",
                    "-out", str(other)], check=True, capture_output=True, timeout=60)  # fmt: skip
    stow = ScriptedStow(tls=(cert, key))
    try:
        [untrusted] = StowSender(DestinationConfig(**stow.destination())).send(objects[:1])  # type: ignore[arg-type]
        wrong_ca = StowSender(DestinationConfig(**stow.destination(), ca_file=str(other)))  # type: ignore[arg-type]
        [not_signed] = wrong_ca.send(objects[:1])
        by_name = {**stow.destination(), "url": stow.url.replace("127.0.0.1", "localhost"), "ca_file": str(cert)}
        [other_name] = StowSender(DestinationConfig(**by_name)).send(objects[:1])  # type: ignore[arg-type]
        trusted = StowSender(DestinationConfig(**stow.destination(), ca_file=str(cert)))  # type: ignore[arg-type]
        [delivered] = trusted.send(objects[:1])
    finally:
        stow.stop()
    assert (
        not_signed.detail
        == f"STOW-RS SSLError: its TLS certificate is not signed by the destination's ca_file ({other})"
    )
    assert other_name.detail == "STOW-RS SSLError: its TLS certificate is for another host name than the URL's"
    assert untrusted.detail == "STOW-RS SSLError: its TLS certificate is not trusted " + (
        "(a hospital's own CA: give it as the destination's ca_file)"
    )
    assert delivered.acknowledged and stow.stored == 1


@pytest.mark.parametrize(
    ("status", "permanent"), [(409, False), (500, False), (503, False), (429, False), (400, True), (415, True)]
)
def test_stow_rs_http_statuses_are_classified(objects: list[Path], status: int, permanent: bool):
    (first, second), stow = sent_over_stow_rs([status], objects[:2])
    assert first == Delivery(False, f"STOW-RS HTTP {status}", permanent)
    assert second.acknowledged and stow.requests == 2  # no retry inside dicomweb-client: the outbox retries


@pytest.mark.parametrize(
    ("reason", "permanent"),
    [(0x0122, True), (0xA900, True), (0xC122, True), (0xA700, False), (0x0110, False), (0xC000, False)],
)
def test_a_stow_rs_conflict_is_refused_for_good_when_its_failure_reason_is(
    objects: list[Path], reason: int, permanent: bool
):
    """A 409 says why in its Failed SOP Sequence: an SOP class or transfer syntax the server does not
    take will not change by trying again (it went dead only after every attempt); out of resources may."""
    (first, second), _ = sent_over_stow_rs([(409, reason)], objects[:2])
    assert first == Delivery(False, f"STOW-RS HTTP 409, failure reason 0x{reason:04X}", permanent)
    assert second.acknowledged


def test_a_stow_rs_conflict_answered_in_xml_is_refused_for_good_when_its_failure_reason_is(objects: list[Path]):
    """Its reasons were read from JSON only: a 409 in XML naming 0xC122 was retried for an hour."""
    body = FAILED_SOP_XML.replace(b">42752<", b">49442<")  # 0xC122: the transfer syntax is not taken
    conflict = HttpAnswer(409, content_type="application/dicom+xml", body=body)
    (first, second), _ = sent_over_stow_rs([conflict], objects[:2])
    assert first == Delivery(False, "STOW-RS HTTP 409, failure reason 0xC122", True)
    assert second.acknowledged


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
def test_a_stow_rs_redirect_is_a_failure_retried_not_a_delivery(objects: list[Path], status: int):
    """requests followed a 301, 302 or 303 with a GET, without the instance, and the page found
    there (200) was taken for the POST's success: the object went delivered, never sent again, and
    the server never had it. A redirect is not followed: the object is retried."""
    moved = HttpAnswer(status, headers={"Location": "/moved/"})
    (first, second), stow = sent_over_stow_rs([moved], objects[:2])
    assert first.acknowledged is False and first.permanent is False
    assert first.detail.startswith(f"STOW-RS HTTP {status}, a redirect: not followed")
    assert stow.gets == 0 and stow.requests == 2 and stow.stored == 1
    assert second.acknowledged


FAILED_SOP_JSON = {"00081198": {"vr": "SQ", "Value": [{"00081197": {"vr": "US", "Value": [0xA700]}}]}}
#: the same, beside an element pydicom's reader refuses ("Value": null): dicomweb-client fails to read it
FAILED_SOP_ODD_JSON = {
    "00081198": {
        "vr": "SQ",
        "Value": [{"00081197": {"vr": "US", "Value": [0xA700]}, "00081196": {"vr": "US", "Value": None}}],
    }
}
FAILED_SOP_XML = (
    b'<?xml version="1.0" encoding="UTF-8"?><NativeDicomModel>'
    b'<DicomAttribute tag="00081198" vr="SQ" keyword="FailedSOPSequence"><Item number="1">'
    b'<DicomAttribute tag="00081197" vr="US" keyword="FailureReason"><Value number="1">42752</Value>'
    b"</DicomAttribute></Item></DicomAttribute></NativeDicomModel>"
)


@pytest.mark.parametrize(
    ("content_type", "body"),
    [
        ("application/dicom+json", json.dumps(FAILED_SOP_JSON).encode()),
        ("application/dicom+json; charset=utf-8", json.dumps(FAILED_SOP_JSON).encode()),
        ("application/dicom+json", json.dumps(FAILED_SOP_ODD_JSON).encode()),
        ("application/dicom+json; charset=utf-8", json.dumps(FAILED_SOP_ODD_JSON).encode()),
        ("application/dicom+xml", FAILED_SOP_XML),
        ("application/dicom+xml; charset=utf-8", FAILED_SOP_XML),
        ("application/xml; charset=UTF-8", FAILED_SOP_XML),
        (
            "application/dicom+xml",
            FAILED_SOP_XML.replace(
                b"<NativeDicomModel>", b'<NativeDicomModel xmlns="http://dicom.nema.org/PS3.19/models/NativeDICOM">'
            ),
        ),
    ],
    ids=[
        "json",
        "json with charset",
        "odd json",
        "odd json with charset",
        "xml",
        "xml with charset",
        "plain xml",
        "xml with its namespace",
    ],
)
def test_a_stow_rs_success_status_naming_a_failed_sop_is_not_a_delivery_whatever_its_media_type_s_parameters(
    objects: list[Path], content_type: str, body: bytes
):
    """dicomweb-client reads a body whose Content-Type is exactly application/dicom+json (or XML):
    with '; charset=utf-8' its Failed SOP Sequence went unread, and the object was recorded
    delivered, never sent again, though the server had refused it (out of resources); a body it
    could not read was a delivery too, though its failure had been read."""
    refused = HttpAnswer(202, content_type=content_type, body=body)
    (first, second), _ = sent_over_stow_rs([refused], objects[:2])
    assert first == Delivery(False, "STOW-RS failed SOP, failure reason 0xA700", False)
    assert second.acknowledged


def test_a_web_page_answering_a_stow_rs_request_is_not_a_delivery(objects: list[Path]):
    """A 200 with an HTML page (a proxy's login page) says nothing was stored: it was delivered."""
    page = HttpAnswer(200, body=b"<html><body>SYNTHETIC sign in</body></html>")
    (first, second), _ = sent_over_stow_rs([page], objects[:2])
    assert first == Delivery(False, "STOW-RS HTTP 200 with a web page, not a STOW-RS answer")
    assert second.acknowledged


def test_a_stow_rs_url_with_a_query_posts_to_its_studies_resource_with_the_query_kept(objects: list[Path]):
    """A token in the query (``config show`` hides it) goes with every request; the resource is
    the URL's path and ``/studies``, not ``/studies`` appended after the query."""
    stow = ScriptedStow()
    try:
        destination = DestinationConfig("stow", "dicomweb", url=f"{stow.url}?token=s3cret&site=a%20b&site=c&e=#frag")
        answers = StowSender(destination).send(objects[:1])
    finally:
        stow.stop()
    assert answers == [Delivery(True)]
    assert stow.paths == ["/dicom-web/studies?token=s3cret&site=a+b&site=c&e="]


def test_a_folder_destination_whose_folder_fsync_fails_is_not_acknowledged(
    tmp_path: Path, objects: list[Path], monkeypatch: pytest.MonkeyPatch
):
    """The file is fsynced, the rename made, and the folder's fsync fails (EIO, injected: no real
    disk here fails on demand): not acknowledged, so the outbox sends it again; a filesystem that
    cannot fsync a folder at all (EINVAL) delivers."""
    real = os.fsync
    answer = errno.EIO

    def folders_failing(fd: int) -> None:
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            raise OSError(answer, os.strerror(answer) + " (injected)")
        real(fd)

    monkeypatch.setattr(os, "fsync", folders_failing)
    (tmp_path / "share").mkdir()
    sender = FolderSender(DestinationConfig("share", "folder", path=str(tmp_path / "share")))
    assert sender.send(objects[:1]) == [Delivery(False, "OSError: Input/output error (injected)")]
    answer = errno.EINVAL
    assert sender.send(objects[:1]) == [Delivery(True)]


def test_a_folder_destination_refuses_an_object_whose_uids_would_name_a_folder_outside_it(
    tmp_path: Path, objects: list[Path]
):
    escaping = pydicom.dcmread(objects[0])
    escaping.StudyInstanceUID = "../../synthetic_escape"
    escaping.save_as(objects[0])
    (tmp_path / "share" / "inner").mkdir(parents=True)
    sender = FolderSender(DestinationConfig("share", "folder", path=str(tmp_path / "share" / "inner")))
    refused, delivered = sender.send(objects[:2])
    why = "InvalidDicomError: its StudyInstanceUID is not a UID"
    assert refused == Delivery(False, f"the object file cannot be read ({why})", True)
    assert delivered.acknowledged
    written = [f for f in tmp_path.rglob("*.dcm") if f.parent != tmp_path]  # the objects sent lie in tmp_path
    assert [f.stem for f in written] == uids(objects[1:2]) and (tmp_path / "share" / "inner") in written[0].parents


def test_a_folder_destination_files_by_study_series_and_instance(tmp_path: Path, objects: list[Path]):
    (tmp_path / "share").mkdir()
    sender = FolderSender(DestinationConfig("share", "folder", path=str(tmp_path / "share")))
    assert all(d.acknowledged for d in sender.send(objects + objects))  # a resend replaces the same file
    files = sorted((tmp_path / "share").rglob("*.dcm"))
    assert sorted(f.stem for f in files) == sorted(uids(objects))
    ds = pydicom.dcmread(files[0])
    assert files[0].parent.name == ds.SeriesInstanceUID and files[0].parent.parent.name == ds.StudyInstanceUID


def test_a_folder_destination_that_does_not_exist_is_not_made_and_nothing_is_acknowledged(
    tmp_path: Path, objects: list[Path]
):
    """The mount point of a share that is not mounted: writing there (on the local disk) was
    acknowledged, and the objects never reached the share. A failure worth retrying, until it is."""
    share = tmp_path / "mnt" / "pacs-share"
    sender = FolderSender(DestinationConfig("share", "folder", path=str(share)))
    why = f"the destination folder {share} does not exist (is its share mounted?)"
    assert sender.send(objects[:2]) == [Delivery(False, why)] * 2
    assert not share.exists()
    share.mkdir(parents=True)  # mounted
    assert all(d.acknowledged for d in sender.send(objects[:2]))


def test_a_peer_that_stops_reading_mid_object_fails_the_send_within_its_timeout_not_for_ever(tmp_path: Path):
    """pynetdicom's socket blocks once connected: a peer that stopped reading (a frozen switch: no
    reset, no FIN) held the write of an object larger than the TCP buffers, and the sender with it,
    for good; its DIMSE timeout's abort waited on that write too."""
    from tcp_proxy import TcpProxy

    small = write_dicom(tmp_path / "small.dcm", pixels=np.zeros((16, 16), np.uint8))
    large = write_dicom(tmp_path / "large.dcm", pixels=np.zeros((4000, 4000), np.uint16))  # SYNTHETIC, 32 MB
    scp = ScriptedScp()
    proxy = TcpProxy(("127.0.0.1", scp.destination()["port"]))
    answers: list[list[Delivery]] = []
    try:
        destination = DestinationConfig(**{**scp.destination(), "port": proxy.port, "timeout_seconds": 2.0})  # type: ignore[arg-type]
        sender = DimseSender(destination)
        assert sender.send([small]) == [Delivery(True)]
        proxy.freeze()
        sending = threading.Thread(target=lambda: answers.append(sender.send([large])), daemon=True)
        sending.start()
        sending.join(30)
        assert not sending.is_alive(), "the send was still blocked 30 s after the peer stopped reading"
    finally:
        proxy.thaw()
        proxy.close()
        scp.stop()
    [[answer]] = answers
    assert not answer.acknowledged and not answer.permanent  # tried again at the next round
