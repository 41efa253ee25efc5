"""Senders for the DICOM-in tests: synthetic instances, and real peers that push them to the receiver
(dcmtk's storescu, pynetdicom's SCU), plus one that misbehaves on purpose (a C-STORE cut off half-way,
spoken over a raw socket with pynetdicom's own PDU encoders).

Every instance written here is synthetic (``SYNTHETIC^...`` patients, ``ImageComments``).
"""

from __future__ import annotations

import io
import os
import shutil
import socket
import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest
from dicom_factory import write_dicom
from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from meddaemon.dicom.associations import keep_answers

UID_ROOT = "1.2.826.0.1.3680043.8.498."


def synthetic_instances(
    folder: Path, count: int, *, study: str | None = None, series: str | None = None, seed: int = 0, size: int = 32
) -> list[Path]:
    """``count`` CT instances of one series (SYNTHETIC pixels from ``seed``), Explicit VR Little Endian."""
    study = study or generate_uid(UID_ROOT)
    series = series or generate_uid(UID_ROOT)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        path = write_dicom(
            folder / f"synthetic_{seed}_{i:04d}.dcm",
            pixels=rng.integers(0, 4000, (size, size)).astype(np.uint16),
            modality="CT",
            extra={"StudyInstanceUID": study, "SeriesInstanceUID": series, "InstanceNumber": i + 1},
        )
        paths.append(path)
    return paths


def dataset_bytes(data: bytes) -> bytes:
    """The encoded dataset of a Part 10 file: what follows the preamble, ``DICM`` and the File Meta."""
    assert data[128:132] == b"DICM", "not a Part 10 file"
    (group_length,) = struct.unpack("<I", data[140:144])
    return data[144 + group_length :]


def dcmtk(tool: str) -> str:
    """The path of a dcmtk tool. Not just the first on PATH: pynetdicom installs a ``storescu`` and a
    ``storescp`` of its own in the virtualenv's bin/."""
    debian = Path("/usr/bin") / tool
    found = str(debian) if debian.exists() else shutil.which(tool)
    if found is None or "dcmtk" not in subprocess.run([found, "--version"], capture_output=True, text=True).stdout:
        if os.environ.get("CI"):
            pytest.fail(f"dcmtk's {tool} (Debian dcmtk, scripts/system-packages.sh) is required in CI")
        pytest.skip(f"dcmtk's {tool} is not installed")
    return found


def require_dcmtk() -> None:
    dcmtk("storescu")


def storescu(
    port: int, files: list[Path], *, calling: str = "STORESCU", called: str = "MEDDAEMON", options: tuple[str, ...] = ()
) -> subprocess.CompletedProcess[str]:
    """dcmtk's storescu: every file in one association (``options`` adds its flags)."""
    return subprocess.run(
        [dcmtk("storescu"), "-aet", calling, "-aec", called, *options, "127.0.0.1", str(port), *map(str, files)],
        capture_output=True,
        text=True,
        timeout=120,
    )


def pynetdicom_send(port: int, files: list[Path], *, calling: str = "PYNETDICOM", called: str = "MEDDAEMON") -> list:
    """pynetdicom's SCU: every file in one association; the status of each (None: no answer). Its
    answers are kept for the C-STORE waiting for them (``keep_answers``): the receiver answers fast
    enough for pynetdicom's own reactor thread to take one now and then."""
    from pynetdicom import AE

    datasets = [dcmread(path) for path in files]
    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    for sop_class in sorted({str(ds.SOPClassUID) for ds in datasets}):
        ae.add_requested_context(sop_class, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", port, ae_title=called)
    try:
        if not assoc.is_established:
            return [None] * len(files)
        keep_answers(assoc)
        statuses = []
        for ds in datasets:
            answer = assoc.send_c_store(ds) if assoc.is_established else None
            statuses.append(int(answer.Status) if answer is not None and "Status" in answer else None)
        assoc.release()
        return statuses
    finally:
        ae.shutdown()


def cut_off_store(port: int, path: Path, *, fragments_sent: int, calling: str = "CUTOFF") -> None:
    """Associate over a raw socket, send the C-STORE request of ``path`` and only the first
    ``fragments_sent`` P-DATA fragments (4 KiB each) of it, then close the connection: a sender that
    died (or a network that broke) in the middle of an instance."""
    from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID
    from pynetdicom.dimse_messages import C_STORE_RQ
    from pynetdicom.dimse_primitives import C_STORE
    from pynetdicom.pdu import A_ASSOCIATE_RQ, P_DATA_TF
    from pynetdicom.pdu_primitives import A_ASSOCIATE, ImplementationClassUIDNotification, MaximumLengthNotification
    from pynetdicom.presentation import build_context
    from pynetdicom.transport import AddressInformation

    ds = dcmread(path)
    request = A_ASSOCIATE()
    request.application_context_name = "1.2.840.10008.3.1.1.1"
    request.calling_ae_title = calling
    request.called_ae_title = "MEDDAEMON"
    request.calling_presentation_address = AddressInformation("127.0.0.1", 0)
    request.called_presentation_address = AddressInformation("127.0.0.1", port)
    context = build_context(ds.SOPClassUID, [ExplicitVRLittleEndian])
    context.context_id = 1
    request.presentation_context_definition_list = [context]
    length = MaximumLengthNotification()
    length.maximum_length_received = 16382
    implementation = ImplementationClassUIDNotification()
    implementation.implementation_class_uid = PYNETDICOM_IMPLEMENTATION_UID
    request.user_information = [length, implementation]
    pdu = A_ASSOCIATE_RQ()
    pdu.from_primitive(request)

    store = C_STORE()
    store.MessageID = 1
    store.AffectedSOPClassUID = ds.SOPClassUID
    store.AffectedSOPInstanceUID = ds.SOPInstanceUID
    store.Priority = 2
    store.DataSet = io.BytesIO(dataset_bytes(path.read_bytes()))
    message = C_STORE_RQ()
    message.primitive_to_message(store)
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(pdu.encode())
        kind = sock.recv(1)
        assert kind == b"\x02", f"the association was not accepted (PDU type {kind!r})"
        for number, fragment in enumerate(message.encode_msg(1, 4096)):
            if number > fragments_sent:  # the command set is the first fragment
                break
            data = P_DATA_TF()
            data.from_primitive(fragment)
            sock.sendall(data.encode())
