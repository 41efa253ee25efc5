"""meddaemon's pynetdicom associations (``meddaemon.dicom.associations``). Against peers built on
dcmtk as dcmtk runs unless told (Nagle's algorithm on, a PDU written in two sends: Orthanc, most
modalities), neither a C-STORE the outbox sends nor one the receiver takes is held for this side's
delayed acknowledgement. Where meddaemon sends requests, an answer pynetdicom's own reactor thread
takes off the queue still reaches the request waiting for it.

The peers: dcmtk's own ``storescp``, started without ``TCP_NODELAY`` in its environment, answering
the sender; Orthanc, a real PACS, pushing a series to the receiver. Linux delays an acknowledgement
by at least 40 ms; held for it, every C-STORE would take that long. Every instance is SYNTHETIC."""

from __future__ import annotations

import os
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian

from dicom_peers import ScriptedScp
from dicom_senders import dcmtk, synthetic_instances
from meddaemon.config import DestinationConfig
from meddaemon.dicom import associations
from meddaemon.dicom.receiver import Receiver
from meddaemon.dicom.senders import DimseSender
from orthanc import Orthanc, require_orthanc
from ports import free_port

#: Linux's shortest delayed acknowledgement (TCP_DELACK_MIN)
DELAYED_ACK_SECONDS = 0.040
OBJECTS = 25

linux_only = pytest.mark.skipif(associations.TCP_QUICKACK is None, reason="TCP_QUICKACK is Linux's")


@pytest.fixture
def storescp(tmp_path: Path) -> Iterator[int]:
    """dcmtk's storescp on loopback, with Nagle's algorithm left on; its port."""
    port = free_port()
    received = tmp_path / "received"
    received.mkdir()
    env = {name: value for name, value in os.environ.items() if name != "TCP_NODELAY"}
    proc = subprocess.Popen(
        [dcmtk("storescp"), "-aet", "STORESCP", "-od", str(received), str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.05)
        yield port
    finally:
        proc.terminate()
        proc.wait(10)


def plain_pynetdicom_seconds(port: int, objects: list[Path]) -> float:
    """The same C-STOREs by pynetdicom as it comes (no ``associations.handlers``): the delay this module removes."""
    from pynetdicom import AE

    datasets = [dcmread(path) for path in objects]
    ae = AE()
    ae.add_requested_context(datasets[0].SOPClassUID, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", port, ae_title="STORESCP")
    assert assoc.is_established
    associations.keep_answers(assoc)  # only the acknowledgements differ from the sender's association
    started = time.perf_counter()
    for ds in datasets:
        assert assoc.send_c_store(ds).Status == 0
    elapsed = time.perf_counter() - started
    assoc.release()
    ae.shutdown()
    return elapsed


@linux_only
def test_c_stores_to_a_dcmtk_peer_are_not_held_for_delayed_acknowledgements(storescp: int, tmp_path: Path):
    objects = synthetic_instances(tmp_path / "objects", OBJECTS, size=64)
    destination = DestinationConfig(name="scp", kind="dicom", ae_title="STORESCP", host="127.0.0.1", port=storescp)
    sender = DimseSender(destination)
    sender.send(objects[:1])  # pynetdicom and the objects' reading warmed up

    # the fastest of three sends: a send held for delayed acknowledgements cannot get under their
    # floor in any of them, while a moment of load on the shared cores slows only one
    prompts = []
    for _ in range(3):
        started = time.perf_counter()
        answers = sender.send(objects)
        prompts.append(time.perf_counter() - started)
        assert [a.acknowledged for a in answers] == [True] * OBJECTS
    sender.close()  # storescp serves one association at a time
    prompt = min(prompts)
    assert prompt < OBJECTS * DELAYED_ACK_SECONDS, prompts
    plain = plain_pynetdicom_seconds(storescp, objects)
    assert plain > OBJECTS * DELAYED_ACK_SECONDS * 0.9, (
        "the peer no longer makes pynetdicom wait: the test shows nothing"
    )
    assert prompt * 3 < plain


@linux_only
@pytest.mark.alone  # a bound of 40 ms an instance: a loaded machine's stalls alone exceeded it (1.38 s for 1.0)
def test_a_series_pushed_by_a_pacs_is_not_held_for_the_receivers_delayed_acknowledgements(
    receive: Callable[..., Receiver], tmp_path: Path
):
    require_orthanc()
    dicom_port = free_port()
    receiver = receive(dicom_port=dicom_port)
    pacs = Orthanc(tmp_path / "orthanc")
    pacs.add_modality("meddaemon", "MEDDAEMON", dicom_port)
    pacs.start()
    try:
        instances = [pacs.upload(path)["ID"] for path in synthetic_instances(tmp_path / "series", OBJECTS, size=64)]
        pacs.store("meddaemon", instances[:1])  # Orthanc's first association warmed up

        started = time.perf_counter()
        answer = pacs.store("meddaemon", instances)
        elapsed = time.perf_counter() - started

        assert answer["InstancesCount"] == OBJECTS and answer["FailedInstancesCount"] == 0, answer
        assert len(list(receiver.settings.watch.rglob("*.dcm"))) == OBJECTS + 1
        assert elapsed < OBJECTS * DELAYED_ACK_SECONDS
    finally:
        pacs.discard()


def association_whose_reactor_takes_answers(port: int, sop_class: str) -> Any:
    """A pynetdicom association scheduled so that its reactor thread takes each C-STORE answer off
    the queue before the waiting send does: once the thread passes its checkpoint it lingers 50 ms
    (with its "paused" flag still set, so the next send goes ahead), and a send looks for its answer
    100 ms after the request went out. The schedule a loaded machine makes now and then, made certain."""
    from pynetdicom import AE

    ae = AE()
    ae.add_requested_context(sop_class, ExplicitVRLittleEndian)
    ae.dimse_timeout = 2
    assoc = ae.associate("127.0.0.1", port, ae_title="SCRIPTED", evt_handlers=associations.handlers())
    assert assoc.is_established
    associations.prompt(assoc)
    checkpoint_wait, get_msg = assoc._reactor_checkpoint.wait, assoc.dimse.get_msg

    def lingering_wait(timeout: float | None = None) -> bool:
        passed = checkpoint_wait(timeout)
        if threading.current_thread() is assoc:
            time.sleep(0.05)
        return passed

    def late_get_msg(block: bool = False) -> Any:
        if block:
            time.sleep(0.1)
        return get_msg(block)

    assoc._reactor_checkpoint.wait = lingering_wait
    assoc.dimse.get_msg = late_get_msg
    return assoc


@pytest.mark.parametrize("kept", [True, False])
def test_an_answer_the_reactor_thread_takes_still_reaches_the_waiting_c_store(tmp_path: Path, kept: bool):
    objects = synthetic_instances(tmp_path / "objects", 3, size=16)
    scp = ScriptedScp()
    datasets = [dcmread(p) for p in objects]
    try:
        assoc = association_whose_reactor_takes_answers(scp.port, datasets[0].SOPClassUID)
        if kept:
            associations.keep_answers(assoc)
        statuses = []
        for ds in datasets:
            answer = assoc.send_c_store(ds) if assoc.is_established else None
            statuses.append(int(answer.Status) if answer is not None and "Status" in answer else None)
        if assoc.is_established:
            assoc.release()
    finally:
        scp.stop()
    if kept:
        assert statuses == [0x0000] * len(objects)
        assert scp.stored == [str(ds.SOPInstanceUID) for ds in datasets]
    else:  # pynetdicom alone: an answer the peer gave is lost, the association aborted after the DIMSE timeout
        lost = statuses.index(None)
        assert str(datasets[lost].SOPInstanceUID) in scp.stored


def test_an_association_whose_socket_the_peer_closed_meanwhile_is_set_up_without_an_error():
    """The peer may close the connection just after accepting: the socket's timeout, set outside the
    guard of the other options, raised EBADF out of a sender that never raises."""
    from types import SimpleNamespace

    closed = socket.socket()
    closed.close()
    association = SimpleNamespace(dul=SimpleNamespace(socket=SimpleNamespace(socket=closed)))
    associations.prompt(association, timeout=2.0)  # the send that follows finds it dropped
