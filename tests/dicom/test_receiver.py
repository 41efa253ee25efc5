"""The DICOM receiver (docs/design.md section 11), in this process, against real senders.

Specified here: an instance pushed by pynetdicom's SCU or dcmtk's storescu (one association per
file, several files per association, compressed proposals) becomes a file of the inbox whose
dataset is byte for byte the one sent, behind its File Meta, with a row saying who sent it; the same
instance sent again is a new file of the same bytes, never an overwrite. Refused, with nothing
written: a calling AE off the allow-list and a wrong called AE (at association), low disk (0xA700),
a dataset that is not the instance its request names (0xA900), an association cut off in the middle
of an instance, an instance over max_file_bytes (0xA700). File Meta elements a sender left at the
head of its dataset are cut away. The association limit holds under many simultaneous callers, and
every instance an accepted association sent is kept. TLS when configured, where a connection that
says nothing holds up no other caller, nor the stop. A file the disk fails to make durable is
refused, its row forgotten. The folder fsync after the renames is shared by the associations that
wait at once, and never ends a wait before a rename it must cover.

Every instance sent is SYNTHETIC (``dicom_senders``).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import logging
import shlex
import ssl
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Callable
from pathlib import Path

import pytest
from pydicom import Dataset, dcmread
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGBaseline8Bit,
    JPEGLosslessSV1,
    JPEGLSLossless,
)
from sqlalchemy import select

from dicom_senders import (
    cut_off_store,
    dataset_bytes,
    dcmtk,
    pynetdicom_send,
    require_dcmtk,
    storescu,
    synthetic_instances,
)
from meddaemon.db.engine import create_db_engine
from meddaemon.db.models import ReceivedInstance
from meddaemon.dicom.associations import keep_answers
from meddaemon.dicom.receiver import FolderSync, Receiver, accepted_transfer_syntaxes
from meddaemon.files import HOST_TAG

StartReceiver = Callable[..., Receiver]


def port(receiver: Receiver) -> int:
    return receiver.address[1]


def written(receiver: Receiver) -> list[Path]:
    """Every file under the receiver's folder, the hidden temporaries included."""
    return sorted(p for p in receiver.root.rglob("*") if p.is_file())


def rows(receiver: Receiver) -> list[ReceivedInstance]:
    with receiver.sessions() as session:
        return list(session.scalars(select(ReceivedInstance).order_by(ReceivedInstance.id)))


def store_one(
    receiver_port: int,
    instance: Dataset | Path,
    sop_class: str,
    *,
    syntax: str = ExplicitVRLittleEndian,
    calling: str = "SENDER",
    tls: ssl.SSLContext | None = None,
) -> int | None:
    """The status of one C-STORE of ``instance`` (a file is sent as its bytes are, with
    ``STORE_SEND_CHUNKED_DATASET``), in an association of its own (None: no association)."""
    from pynetdicom import AE

    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.network_timeout = 30
    ae.add_requested_context(sop_class, syntax)
    tls_args = (tls, None) if tls is not None else None
    assoc = ae.associate("127.0.0.1", receiver_port, ae_title="MEDDAEMON", tls_args=tls_args)
    try:
        if not assoc.is_established:
            return None
        keep_answers(assoc)
        status = int(assoc.send_c_store(instance).Status)
        assoc.release()
        return status
    finally:
        ae.shutdown()


def in_threads(call: Callable[[int], None], count: int) -> None:
    """``call(0)`` ... ``call(count - 1)``, each in a thread of its own, all started, then all joined."""
    threads = [threading.Thread(target=call, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(90)


def by_dataset(files: list[Path]) -> dict[bytes, Path]:
    return {dataset_bytes(p.read_bytes()): p for p in files}


def test_instances_from_pynetdicom_are_written_as_received_behind_their_file_meta_with_their_sender(
    receive: StartReceiver, tmp_path: Path
):
    receiver = receive()
    sent = synthetic_instances(tmp_path / "sent", 2)
    assert pynetdicom_send(port(receiver), sent) == [0x0000, 0x0000]
    assert pynetdicom_send(port(receiver), sent[:1]) == [0x0000]  # the same instance again

    files = written(receiver)
    assert len(files) == 3 and not any(p.name.startswith(".") for p in files)
    assert sorted(dataset_bytes(p.read_bytes()) for p in files) == sorted(
        dataset_bytes(p.read_bytes()) for p in [*sent, sent[0]]
    )
    again = [p for p in files if dataset_bytes(p.read_bytes()) == dataset_bytes(sent[0].read_bytes())]
    assert len({p.name for p in again}) == 2 and again[0].read_bytes() == again[1].read_bytes()
    for path in files:
        meta = dcmread(path, stop_before_pixels=True).file_meta
        assert meta.TransferSyntaxUID == ExplicitVRLittleEndian
        assert meta.MediaStorageSOPInstanceUID == dcmread(path, stop_before_pixels=True).SOPInstanceUID

    recorded = rows(receiver)
    assert sorted(r.file_name for r in recorded) == sorted(f"dicom/{p.name}" for p in files)
    source = dcmread(sent[1])
    row = next(r for r in recorded if r.sop_instance_uid == source.SOPInstanceUID)
    assert (row.calling_ae, row.called_ae, row.peer_address, row.node) == (
        "PYNETDICOM",
        "MEDDAEMON",
        "127.0.0.1",
        "test-node",
    )
    assert (row.study_instance_uid, row.series_instance_uid) == (source.StudyInstanceUID, source.SeriesInstanceUID)
    stored = receiver.settings.watch / row.file_name
    assert row.sha256 == hashlib.sha256(stored.read_bytes()).hexdigest() and row.size_bytes == stored.stat().st_size


def test_presentation_contexts_refused_to_a_sender_are_logged_and_counted(
    receive: StartReceiver, caplog: pytest.LogCaptureFixture
):
    """A sender proposing a class or a syntax this side refuses (MPEG-2, a private SOP class) was
    told "no presentation context" and kept its images, while this side logged an association of
    0 instances: nothing said why its images never arrived."""
    from pydicom.uid import MPEG2MPML
    from pynetdicom import AE

    receiver = receive()
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context("1.2.840.10008.5.1.4.1.1.2", MPEG2MPML)  # CT Image Storage
    ae.add_requested_context("1.2.826.0.1.3680043.10.543.1", ExplicitVRLittleEndian)  # SYNTHETIC private class
    ae.add_requested_context("1.2.840.10008.5.1.4.1.1.4", ExplicitVRLittleEndian)  # MR Image Storage: taken
    with caplog.at_level(logging.INFO, logger="meddaemon"):
        assoc = ae.associate("127.0.0.1", port(receiver), ae_title="MEDDAEMON")
        try:
            assert assoc.is_established and len(assoc.rejected_contexts) == 2
            assoc.release()
        finally:
            ae.shutdown()
        _wait(lambda: "presentation contexts refused" in caplog.text, "the refusal logged")
    assert (
        "association from MODALITY: 2 of its presentation contexts refused, the instances they would carry cannot "
        "be sent here: CT Image Storage in MPEG2 Main Profile / Main Level (transfer syntax not decodable here); "
        "1.2.826.0.1.3680043.10.543.1 in Explicit VR Little Endian (SOP class not accepted)"
    ) in caplog.text
    assert receiver.stats.snapshot()["contexts_rejected"] == 2


def test_storescu_one_association_per_file_and_many_files_per_association(receive: StartReceiver, tmp_path: Path):
    receiver = receive()
    sent = synthetic_instances(tmp_path / "sent", 5, seed=1)
    for one in sent[:2]:
        assert storescu(port(receiver), [one]).returncode == 0
    run = storescu(port(receiver), sent[2:])
    assert run.returncode == 0, run.stderr

    assert by_dataset(written(receiver)).keys() == by_dataset(sent).keys()
    associations = [(r.peer_port, r.association_at) for r in rows(receiver)]
    assert len(set(associations[:2])) == 2 and len(set(associations[2:])) == 1
    assert {r.calling_ae for r in rows(receiver)} == {"STORESCU"}


@pytest.mark.parametrize(
    ("proposal", "compress", "syntax"),
    [
        ("-xs", ["dcmcjpeg", "+e1"], JPEGLosslessSV1),  # JPEG lossless, first-order prediction
        ("-xt", ["dcmcjpls"], JPEGLSLossless),
    ],
)
def test_a_compressed_proposal_is_accepted_and_the_compressed_bytes_are_kept(
    receive: StartReceiver, tmp_path: Path, proposal: str, compress: list[str], syntax: str
):
    require_dcmtk()
    assert syntax in accepted_transfer_syntaxes()
    receiver = receive()
    [plain] = synthetic_instances(tmp_path / "sent", 1, seed=2)
    compressed = tmp_path / "compressed.dcm"
    tool, *flags = compress
    subprocess.run([dcmtk(tool), *flags, str(plain), str(compressed)], check=True, capture_output=True, timeout=60)
    assert dcmread(compressed).file_meta.TransferSyntaxUID == syntax

    run = storescu(port(receiver), [compressed], options=(proposal,))
    assert run.returncode == 0, run.stderr
    [stored] = written(receiver)
    assert dcmread(stored, stop_before_pixels=True).file_meta.TransferSyntaxUID == syntax
    assert dataset_bytes(stored.read_bytes()) == dataset_bytes(compressed.read_bytes())
    assert [r.transfer_syntax_uid for r in rows(receiver)] == [syntax]


def test_a_calling_ae_off_the_allow_list_or_a_wrong_called_ae_is_rejected_and_nothing_is_written(
    receive: StartReceiver, tmp_path: Path
):
    receiver = receive(dicom_allowed_callers="MODALITY,PACS")
    sent = synthetic_instances(tmp_path / "sent", 1, seed=3)
    assert pynetdicom_send(port(receiver), sent, calling="INTRUDER") == [None]
    assert storescu(port(receiver), sent, calling="MODALITY", called="SOMEONE").returncode != 0
    assert written(receiver) == [] and rows(receiver) == []
    stats = receiver.stats.snapshot()
    assert (stats["rejected_calling_ae"], stats["rejected_called_ae"], stats["accepted"]) == (1, 1, 0)

    assert pynetdicom_send(port(receiver), sent, calling="MODALITY") == [0x0000]
    assert len(written(receiver)) == 1


def test_an_association_cut_off_in_the_middle_of_an_instance_leaves_nothing_and_the_receiver_goes_on(
    receive: StartReceiver, tmp_path: Path
):
    receiver = receive()
    [big] = synthetic_instances(tmp_path / "sent", 1, seed=4, size=128)  # 32 KiB of pixels: 9 fragments
    cut_off_store(port(receiver), big, fragments_sent=3)
    _wait(lambda: receiver.stats.snapshot()["aborted"] == 1, "the abort to be handled")
    assert written(receiver) == [] and rows(receiver) == []

    assert pynetdicom_send(port(receiver), [big]) == [0x0000]
    assert len(written(receiver)) == 1


def test_low_free_disk_is_answered_out_of_resources_and_nothing_is_written(receive: StartReceiver, tmp_path: Path):
    receiver = receive(dicom_min_free_bytes=2**62)
    assert pynetdicom_send(port(receiver), synthetic_instances(tmp_path / "sent", 2, seed=5)) == [0xA700, 0xA700]
    assert written(receiver) == [] and rows(receiver) == []
    assert receiver.stats.snapshot()["out_of_resources"] == 2


def folder_fsyncs(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The inode of each folder ``os.fsync`` is called on from now on (the calls go through)."""
    import os
    import stat

    synced: list[int] = []
    real = os.fsync

    def recording(fd: int) -> None:
        status = os.fstat(fd)
        if stat.S_ISDIR(status.st_mode):
            synced.append(status.st_ino)
        real(fd)

    monkeypatch.setattr(os, "fsync", recording)
    return synced


def test_the_receiving_folder_made_at_start_is_in_the_inbox_for_good_before_anything_is_acknowledged(
    receive: StartReceiver, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """An instance is acknowledged once it and its rename are durable; in a folder just made, that
    holds only once the folder's own entry in the inbox is: the inbox is fsynced after the mkdir."""
    synced = folder_fsyncs(monkeypatch)
    receiver = receive()
    assert receiver.root.parent.stat().st_ino in synced


def test_a_receiving_folder_removed_while_the_receiver_runs_is_made_again_and_fsynced_as_the_new_one(
    receive: StartReceiver, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """A clean-up job removing empty inbox folders (``find -type d -empty -delete``) took the
    receiver's folder once the daemon had taken its files: every instance after was refused until
    a restart. The folder is made again (its entry made durable), and the folder fsync that
    acknowledges a rename is of the new folder, not of the one removed."""

    receiver = receive()
    first, second = synthetic_instances(tmp_path / "sent", 2, seed=11)
    assert pynetdicom_send(port(receiver), [first]) == [0x0000]
    for taken in written(receiver):  # what the daemon's intake does with each file received
        taken.unlink()
    receiver.root.rmdir()
    synced = folder_fsyncs(monkeypatch)
    assert pynetdicom_send(port(receiver), [second]) == [0x0000]
    [kept] = written(receiver)
    assert dataset_bytes(kept.read_bytes()) == dataset_bytes(second.read_bytes())
    assert receiver.root.stat().st_ino in synced  # the new folder's own fsync covered the rename
    assert receiver.root.parent.stat().st_ino in synced  # and the new folder's entry in the inbox


def test_a_file_that_cannot_be_made_durable_is_refused_and_its_row_forgotten(
    receive: StartReceiver, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """The file's fdatasync runs while its row commits: when the disk fails it (EIO, injected: no
    real disk here fails on demand) the committed row goes too, the temporary is removed, and the
    sender is told 0x0110; the next instance, on a disk that works again, is kept."""
    import errno
    import os

    receiver = receive()
    first, second = synthetic_instances(tmp_path / "sent", 2, seed=8)
    real = os.fdatasync

    def failing(fd: int) -> None:
        raise OSError(errno.EIO, "Input/output error (injected)")

    monkeypatch.setattr(os, "fdatasync", failing)
    assert pynetdicom_send(port(receiver), [first]) == [0x0110]
    assert written(receiver) == [] and rows(receiver) == []
    monkeypatch.setattr(os, "fdatasync", real)
    assert pynetdicom_send(port(receiver), [second]) == [0x0000]
    assert [r.sop_instance_uid for r in rows(receiver)] == [str(dcmread(second).SOPInstanceUID)]
    assert len(written(receiver)) == 1


def test_a_rename_whose_folder_fsync_fails_is_refused_and_nothing_is_left(
    receive: StartReceiver, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """The fsync of the folder after the rename fails (EIO, injected as above): the sender is told
    0x0110, not that its instance is safe, and neither the file nor its row is left; a filesystem that
    cannot fsync a folder at all (EINVAL) is no failure."""
    import errno
    import os

    receiver = receive()
    first, second, third = synthetic_instances(tmp_path / "sent", 3, seed=9)
    real = os.fsync
    answer = errno.EIO

    def failing(fd: int) -> None:
        raise OSError(answer, os.strerror(answer) + " (injected)")

    monkeypatch.setattr(os, "fsync", failing)
    assert pynetdicom_send(port(receiver), [first]) == [0x0110]
    assert written(receiver) == [] and rows(receiver) == []
    answer = errno.EINVAL
    assert pynetdicom_send(port(receiver), [second]) == [0x0000]
    monkeypatch.setattr(os, "fsync", real)
    assert pynetdicom_send(port(receiver), [third]) == [0x0000]
    assert sorted(r.sop_instance_uid for r in rows(receiver)) == sorted(
        str(dcmread(p).SOPInstanceUID) for p in (second, third)
    )
    assert len(written(receiver)) == 2


def test_a_dataset_that_is_not_the_instance_its_request_names_is_refused_and_nothing_is_written(
    receive: StartReceiver, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """pynetdicom sends the dataset of a file as it is, under the UIDs of its File Meta: here
    garbage behind a valid File Meta."""
    from pynetdicom import _config

    receiver = receive()
    [good] = synthetic_instances(tmp_path / "sent", 1, seed=6)
    data = good.read_bytes()
    garbage = tmp_path / "garbage.dcm"
    garbage.write_bytes(data[: len(data) - len(dataset_bytes(data))] + b"SYNTHETIC garbage, not a dataset" * 8)
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)
    assert store_one(port(receiver), garbage, dcmread(good).SOPClassUID) == 0xA900
    assert written(receiver) == [] and rows(receiver) == []


def test_a_dataset_that_ends_inside_a_value_or_has_bytes_after_its_last_element_is_refused(
    receive: StartReceiver, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
):
    """pydicom reads both without a word (a short Pixel Data, a garbage element): they were answered
    Success, the sender could delete its copy, and the scan failed as truncated_pixel_data. dcmtk's
    storescp refuses both. The good instance sent beside them is stored."""
    from pynetdicom import AE, _config

    receiver = receive()
    cut, tailed, short_tail, good = synthetic_instances(tmp_path / "sent", 4, seed=11)
    cut.write_bytes(cut.read_bytes()[:-100])
    tailed.write_bytes(tailed.read_bytes() + b"\x01" * 12)
    short_tail.write_bytes(short_tail.read_bytes() + b"\x01" * 4)  # less than an element's header
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)  # the file's bytes as they are
    ae = AE(ae_title="SENDER")
    ae.add_requested_context(dcmread(good).SOPClassUID, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", port(receiver), ae_title="MEDDAEMON")
    keep_answers(assoc)
    try:
        sent = [int(assoc.send_c_store(path).Status) for path in (cut, tailed, short_tail, good)]
        assert sent == [0xC000, 0xC000, 0xC000, 0x0000]
        assoc.release()
    finally:
        ae.shutdown()
    [stored] = written(receiver)
    assert dataset_bytes(stored.read_bytes()) == dataset_bytes(good.read_bytes())
    assert len(rows(receiver)) == 1
    refusals = [r.getMessage() for r in caplog.records if "refused with 0xC000" in r.getMessage()]
    assert len(refusals) == 3 and all("its dataset ends inside a value or has bytes after it" in r for r in refusals)


def _deflated(path: Path, dataset: bytes) -> Path:
    """``path``, a Part 10 file in Deflated Explicit VR Little Endian holding ``dataset`` deflated
    (a valid stream, whatever the dataset inside it)."""
    ds = dcmread(path)
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    head = io.BytesIO()
    ds.save_as(head, enforce_file_format=True)  # its File Meta, then the dataset deflated: replaced below
    meta = head.getvalue()[: len(head.getvalue()) - len(dataset_bytes(head.getvalue()))]
    deflater = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    stream = deflater.compress(dataset) + deflater.flush()
    path.write_bytes(meta + stream + (b"\0" if len(stream) % 2 else b""))
    return path


def test_a_deflated_dataset_cut_short_inside_its_stream_or_a_stream_cut_short_is_refused(
    receive: StartReceiver, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """A Deflated instance's dataset was only read as far as its UIDs: a dataset cut inside its
    Pixel Data, deflated into a stream that inflates without error, was answered Success (and the
    sender could delete its copy). It is refused as the other syntaxes' are, and so is a stream that
    ends early; the same instance whole is stored, and so is pydicom's ``image_dfl.dcm``, whose
    stream eight bytes of a writer's trailer follow."""
    from pydicom.data import get_testdata_file
    from pynetdicom import _config

    receiver = receive()
    cut, short_stream, good = synthetic_instances(tmp_path / "sent", 3, seed=13, size=64)
    plain = {path: dataset_bytes(path.read_bytes()) for path in (cut, short_stream, good)}
    _deflated(cut, plain[cut][:-4000])
    _deflated(short_stream, plain[short_stream])
    short_stream.write_bytes(short_stream.read_bytes()[:-200])
    _deflated(good, plain[good])
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)  # the file's bytes as they are
    sop_class = dcmread(good).SOPClassUID
    sent = [
        store_one(port(receiver), p, sop_class, syntax=DeflatedExplicitVRLittleEndian)
        for p in (cut, short_stream, good)
    ]
    assert sent == [0xC000, 0xC000, 0x0000]
    [stored] = written(receiver)
    assert dcmread(stored).SOPInstanceUID == dcmread(good).SOPInstanceUID
    assert dcmread(stored).pixel_array.tobytes() == dcmread(good).pixel_array.tobytes()
    pydicoms = Path(get_testdata_file("image_dfl.dcm"))
    assert (
        store_one(port(receiver), pydicoms, dcmread(pydicoms).SOPClassUID, syntax=DeflatedExplicitVRLittleEndian) == 0
    )
    assert len(rows(receiver)) == 2


def test_a_deflated_dataset_that_would_inflate_past_what_max_pixels_allows_is_refused_out_of_resources(
    receive: StartReceiver, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """The receiver inflated a Deflated dataset whole to walk it: under 1 MB sent asked the
    receiver's process for 256 MiB (and a 10 MB one for 10 GB). Counted first, it is refused."""
    from dicom_factory import write_deflate_bomb
    from pydicom.filereader import read_file_meta_info
    from pynetdicom import _config

    receiver = receive(max_pixels=1_000_000)  # at most 72 MiB inflated
    bomb = write_deflate_bomb(tmp_path / "bomb.dcm", declared_bytes=256 << 20)
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)  # the file's bytes as they are
    sop_class = read_file_meta_info(bomb).MediaStorageSOPClassUID  # its dataset never inflated here

    assert store_one(port(receiver), bomb, sop_class, syntax=DeflatedExplicitVRLittleEndian) == 0xA700
    assert written(receiver) == [] and rows(receiver) == []


def test_a_dataset_that_begins_with_its_sender_s_own_file_meta_elements_is_whole(tmp_path: Path):
    """A legacy sender leaving its group 0002 (its group length too) at the head of the dataset:
    read for the File Meta's own, that length sent the walk to the wrong place, and the whole
    instance was refused as cut short. The walk starts where pynetdicom's File Meta ends."""
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_file_meta_info
    from pynetdicom.dsutils import create_file_meta, encode_file_meta

    from meddaemon.dicom.receiver import _read_to_the_end

    [path] = synthetic_instances(tmp_path, 1, seed=12)
    ds = dcmread(path)
    senders = DicomBytesIO()
    senders.is_little_endian, senders.is_implicit_VR = True, False
    write_file_meta_info(senders, ds.file_meta, enforce_standard=True)  # with its (0002,0000)
    meta = create_file_meta(
        sop_class_uid=ds.SOPClassUID, sop_instance_uid=ds.SOPInstanceUID, transfer_syntax=ExplicitVRLittleEndian
    )
    received = b"\0" * 128 + b"DICM" + encode_file_meta(meta) + senders.getvalue() + dataset_bytes(path.read_bytes())
    walk = _read_to_the_end(received, ExplicitVRLittleEndian)
    assert walk.whole is True
    head = 128 + 4 + len(encode_file_meta(meta))
    assert walk.sender_meta == (head, head + len(senders.getvalue()))
    assert _read_to_the_end(received[:-1], ExplicitVRLittleEndian).whole is False


@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian], ids=["explicit", "implicit"])
def test_file_meta_elements_at_the_head_of_a_sent_dataset_are_cut_away_so_the_file_reads_as_the_request_says(
    receive: StartReceiver, tmp_path: Path, syntax: UID
):
    """A sender whose dataset began with group 0002 elements naming JPEG Baseline and another
    instance: written behind the File Meta made from the request, pydicom read them as the file's
    own, and the uncompressed instance, answered Success, failed in the intake as undecodable."""

    receiver = receive()
    [path] = synthetic_instances(tmp_path / "sent", 1, seed=13)
    ds = dcmread(path)
    ds.add_new(0x00020010, "UI", JPEGBaseline8Bit)  # SYNTHETIC: a sender's stray File Meta
    ds.add_new(0x00020003, "UI", "1.2.826.0.1.3680043.8.498.9")
    assert store_one(port(receiver), ds, ds.SOPClassUID, syntax=syntax, calling="LEGACY") == 0x0000

    [stored] = written(receiver)
    kept = dcmread(stored)
    assert kept.file_meta.TransferSyntaxUID == syntax
    assert kept.file_meta.MediaStorageSOPInstanceUID == kept.SOPInstanceUID == ds.SOPInstanceUID
    assert not [element.tag for element in kept if element.tag.group == 0x0002]
    assert (kept.pixel_array == dcmread(path).pixel_array).all()
    [row] = rows(receiver)
    assert row.sha256 == hashlib.sha256(stored.read_bytes()).hexdigest() and row.size_bytes == stored.stat().st_size


def test_an_instance_over_max_file_bytes_is_answered_out_of_resources_and_nothing_is_written(
    receive: StartReceiver, tmp_path: Path
):
    """Answered Success before, the sender free to delete its copy, then refused unread by the
    intake as too_large."""
    small, large = synthetic_instances(tmp_path / "sent", 2, seed=14)
    large_ds = dcmread(large)
    large_ds.PixelData = large_ds.PixelData * 4
    large_ds.NumberOfFrames = 4
    large_ds.save_as(large)
    limit = (small.stat().st_size + large.stat().st_size) // 2
    receiver = receive(max_file_bytes=limit)
    assert pynetdicom_send(port(receiver), [large, small]) == [0xA700, 0x0000]
    [stored] = written(receiver)
    assert dataset_bytes(stored.read_bytes()) == dataset_bytes(small.read_bytes())
    assert len(rows(receiver)) == 1 and receiver.stats.snapshot()["out_of_resources"] == 1


def test_with_tls_a_connection_that_says_nothing_holds_up_no_other_caller_nor_the_stop(
    receive: StartReceiver, tmp_path: Path
):
    """pynetdicom shook hands in its accept loop, without a timeout: while one connection said
    nothing, no other caller was accepted, and the receiver's stop waited until it was killed."""
    import socket

    cert, key, client = self_signed(tmp_path)
    receiver = receive(dicom_tls_cert=str(cert), dicom_tls_key=str(key))
    [sent] = synthetic_instances(tmp_path / "sent", 1, seed=15)
    silent = socket.create_connection(("127.0.0.1", port(receiver)))
    try:
        time.sleep(0.2)  # accepted: its handshake waits
        assert store_one(port(receiver), dcmread(sent), dcmread(sent).SOPClassUID, tls=client) == 0x0000
        started = time.monotonic()
        receiver.stop(grace=1.0)
        assert time.monotonic() - started < 5.0
    finally:
        silent.close()
    assert len(written(receiver)) == 1


def test_the_row_of_an_instance_killed_before_its_rename_is_forgotten_when_the_receiver_starts_again(
    receive: StartReceiver, tmp_path: Path
):
    """The row commits while the file is fsynced, before the rename: a receiver killed between the
    two left a row with no file for good (a resend counted as a second reception, a 'version 2' of an
    instance whose version 1 never was). Here one instance is as a kill there leaves it, its file
    still under its temporary name, and one was taken by the intake: only the first row goes."""
    first = receive()
    sent = synthetic_instances(tmp_path / "sent", 2, seed=9)
    assert pynetdicom_send(port(first), sent) == [0x0000, 0x0000]
    first.stop(grace=1.0)
    unfinished, taken = written(first)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    unfinished.rename(unfinished.with_name(f".{unfinished.name}.{HOST_TAG}-{dead.pid}.tmp"))
    taken.unlink()
    again = receive()
    assert written(again) == []
    assert [r.file_name for r in rows(again)] == [taken.relative_to(again.settings.watch).as_posix()]


def test_a_dataset_of_another_sop_class_than_its_request_names_is_refused_as_storescp_refuses_it(
    receive: StartReceiver, tmp_path: Path
):
    """The request names CT Image Storage, the dataset says MR: stored with 0x0000 before, under a
    File Meta (written from the request) that contradicted its dataset. dcmtk's storescp answers 0xA900."""
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset
    from pydicom.uid import CTImageStorage, MRImageStorage
    from pynetdicom import AE
    from pynetdicom.dimse_primitives import C_STORE

    receiver = receive()
    [good] = synthetic_instances(tmp_path / "sent", 1, seed=6)
    ds = dcmread(good)
    ds.SOPClassUID = MRImageStorage
    encoded = DicomBytesIO()
    encoded.is_little_endian, encoded.is_implicit_VR = True, False
    write_dataset(encoded, ds)
    ae = AE(ae_title="SENDER")
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", port(receiver), ae_title="MEDDAEMON")
    keep_answers(assoc)
    try:
        [context] = assoc.accepted_contexts
        request = C_STORE()
        request.MessageID, request.Priority = 1, 2
        request.AffectedSOPClassUID, request.AffectedSOPInstanceUID = CTImageStorage, ds.SOPInstanceUID
        request.DataSet = io.BytesIO(encoded.getvalue())
        # what Association.send_c_store does, with the request's class chosen apart from the dataset's
        assoc._reactor_checkpoint.clear()
        assoc.dimse.send_msg(request, context.context_id)
        _, answer = assoc.dimse.get_msg(block=True)
        assoc._reactor_checkpoint.set()
        assert answer.Status == 0xA900
        assoc.release()
    finally:
        ae.shutdown()
    assert written(receiver) == [] and rows(receiver) == []


def test_the_association_limit_holds_under_many_simultaneous_callers_and_no_accepted_instance_is_lost(
    receive: StartReceiver, tmp_path: Path
):
    """12 callers associate at once against a limit of 3; each holds its association until all
    have tried, then sends two instances. No more than 3 are let in, the others are refused (told
    so, not left hanging), and every instance sent on an accepted association is kept."""
    from pynetdicom import AE

    receiver = receive(dicom_max_associations=3)
    sent = synthetic_instances(tmp_path / "sent", 2, seed=7)
    datasets = [dcmread(p) for p in sent]
    callers = 12
    everyone_tried = threading.Barrier(callers, timeout=60)
    outcomes: dict[int, object] = {}

    def call(i: int) -> None:
        ae = AE(ae_title=f"CALLER{i}")
        ae.add_requested_context(datasets[0].SOPClassUID, ExplicitVRLittleEndian)
        assoc = ae.associate("127.0.0.1", port(receiver), ae_title="MEDDAEMON")
        keep_answers(assoc)
        everyone_tried.wait()
        if assoc.is_established:
            outcomes[i] = [int(assoc.send_c_store(ds).Status) for ds in datasets]
            assoc.release()
        else:
            outcomes[i] = "rejected" if assoc.is_rejected else "no answer"
        ae.shutdown()

    in_threads(call, callers)

    accepted = [o for o in outcomes.values() if isinstance(o, list)]
    assert len(outcomes) == callers and 1 <= len(accepted) <= 3
    assert all(o == [0, 0] for o in accepted) and list(outcomes.values()).count("rejected") == callers - len(accepted)
    assert len(written(receiver)) == len(rows(receiver)) == 2 * len(accepted)
    assert receiver.stats.snapshot()["rejected_limit"] == callers - len(accepted)


def test_a_burst_of_callers_refused_for_the_limit_does_not_hold_a_free_place_from_the_next_one(
    receive: StartReceiver, tmp_path: Path
):
    """One of two places is taken; 24 callers arrive at once. The refused ones are refused for the
    limit, not counted against it while they are being turned away: exactly one of the burst gets the
    free place (pynetdicom's own limit counts every acceptor thread alive, those it is refusing too,
    and a burst could be refused whole with a place free)."""
    from pynetdicom import AE

    receiver = receive(dicom_max_associations=2)
    [sent] = synthetic_instances(tmp_path / "sent", 1, seed=9)
    dataset = dcmread(sent)
    holder = AE(ae_title="HOLDER")
    holder.add_requested_context(dataset.SOPClassUID, ExplicitVRLittleEndian)
    held = holder.associate("127.0.0.1", port(receiver), ae_title="MEDDAEMON")
    assert held.is_established
    callers = 24
    start = threading.Barrier(callers, timeout=60)
    everyone_answered = threading.Barrier(callers, timeout=60)
    outcomes: dict[int, str] = {}

    def call(i: int) -> None:
        ae = AE(ae_title=f"BURST{i}")
        ae.add_requested_context(dataset.SOPClassUID, ExplicitVRLittleEndian)
        start.wait()
        assoc = ae.associate("127.0.0.1", port(receiver), ae_title="MEDDAEMON")
        everyone_answered.wait()
        outcomes[i] = "accepted" if assoc.is_established else "rejected" if assoc.is_rejected else "no answer"
        if assoc.is_established:
            assoc.release()
        ae.shutdown()

    in_threads(call, callers)
    held.release()
    holder.shutdown()

    assert sorted(outcomes.values()) == ["accepted"] + ["rejected"] * (callers - 1)
    assert receiver.stats.snapshot()["rejected_limit"] == callers - 1


def test_connections_that_have_not_asked_for_an_association_hold_no_place(receive: StartReceiver, tmp_path: Path):
    """Three TCP connections open and silent (a port probe, a caller stuck before its request)
    against a limit of one: the next caller to ask gets the place."""
    import socket

    receiver = receive(dicom_max_associations=1)
    [sent] = synthetic_instances(tmp_path / "sent", 1, seed=10)
    silent = [socket.create_connection(("127.0.0.1", port(receiver)), timeout=10) for _ in range(3)]
    try:
        _wait(lambda: len(receiver._acceptors()) == 3, "the silent connections' threads")
        assert pynetdicom_send(port(receiver), [sent]) == [0x0000]
    finally:
        for connection in silent:
            connection.close()
    assert receiver.stats.snapshot()["rejected_limit"] == 0


def test_past_the_connections_let_in_at_once_a_caller_is_refused_saying_so_not_that_places_are_taken(
    receive: StartReceiver, tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
):
    """Silent connections hold no place, but pynetdicom lets in at most ``dicom_max_associations``
    + ``UNADMITTED_CONNECTIONS`` (64; 3 here) connections at once: past that, with no association
    open, the refusal said "1 associations are open already"."""
    import socket

    from meddaemon.dicom import receiver as receiver_module

    monkeypatch.setattr(receiver_module, "UNADMITTED_CONNECTIONS", 3)
    receiver = receive(dicom_max_associations=1)
    [sent] = synthetic_instances(tmp_path / "sent", 1, seed=11)
    silent = [socket.create_connection(("127.0.0.1", port(receiver)), timeout=10) for _ in range(1 + 3)]
    try:
        _wait(lambda: len(receiver._acceptors()) == len(silent), "the silent connections' threads")
        assert pynetdicom_send(port(receiver), [sent]) == [None]
    finally:
        for connection in silent:
            connection.close()
    [refusal] = [r.getMessage() for r in caplog.records if "rejected" in r.getMessage()]
    assert "associations are open already" not in refusal
    assert f"rejected: {len(silent)} other connections are open, over the {len(silent)} let in at once" in refusal
    assert "one that asks nothing is closed after 30 s" in refusal
    assert receiver.stats.snapshot()["accepted"] == 0


def test_the_limit_holds_for_ae_titles_configured_with_spaces_as_pynetdicom_compares_them(
    receive: StartReceiver, tmp_path: Path
):
    """pynetdicom compares AE titles stripped; the limit compared the configured ones as written, took
    "MEDDAEMON " and "CALLER " callers for ones pynetdicom would refuse, and let three in against one."""
    from pynetdicom import AE

    receiver = receive(dicom_max_associations=1, ae_title="MEDDAEMON ", dicom_allowed_callers=["CALLER "])
    [sent] = synthetic_instances(tmp_path / "sent", 1, seed=11)
    entities, held = [], []
    for _ in range(3):
        ae = AE(ae_title="CALLER")
        ae.add_requested_context(dcmread(sent).SOPClassUID, ExplicitVRLittleEndian)
        entities.append(ae)
        held.append(ae.associate("127.0.0.1", port(receiver), ae_title="MEDDAEMON"))
    try:
        assert [a.is_established for a in held] == [True, False, False]
        assert [a.is_rejected for a in held] == [False, True, True]
        assert receiver.stats.snapshot()["rejected_limit"] == 2
    finally:
        for assoc in held:
            if assoc.is_established:
                assoc.release()
        for ae in entities:
            ae.shutdown()


def self_signed(folder: Path) -> tuple[Path, Path, ssl.SSLContext]:
    """A SYNTHETIC self-signed certificate and its key (openssl), and a client context trusting it."""
    cert, key = signed_pair(folder, "localhost", None, "serverAuth")
    client = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(cert))
    client.check_hostname = False
    return cert, key, client


def test_with_tls_only_callers_speaking_tls_get_through(receive: StartReceiver, tmp_path: Path):
    cert, key, client = self_signed(tmp_path)
    receiver = receive(dicom_tls_cert=str(cert), dicom_tls_key=str(key))
    [sent] = synthetic_instances(tmp_path / "sent", 1, seed=8)
    assert store_one(port(receiver), dcmread(sent), dcmread(sent).SOPClassUID, tls=client) == 0x0000
    assert pynetdicom_send(port(receiver), [sent]) == [None]  # in the clear: no association
    assert len(written(receiver)) == 1


def _wait(predicate: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    import time

    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_health_reports_the_receiver_down_when_nothing_answers_its_c_echo(receive: StartReceiver):
    import dataclasses
    import socket

    from meddaemon.daemon.health import DOWN, OK, HealthLimits, check_health

    def dicom_check(receiver: Receiver, port: int):  # type: ignore[no-untyped-def]
        settings = dataclasses.replace(receiver.settings, dicom_port=port)
        engine = create_db_engine(settings.db_url)
        try:
            return check_health(engine, settings, HealthLimits(min_free_bytes=0)).check("dicom")
        finally:
            engine.dispose()

    answering = receive()
    check = dicom_check(answering, port(answering))
    assert (check.status, check.details["probe"]) == (OK, "echoed")
    refusing = receive(dicom_allowed_callers="MODALITY")  # the probe calls as MEDDAEMON: refused, yet it answers
    check = dicom_check(refusing, port(refusing))
    assert (check.status, check.details["probe"]) == (OK, "refused")
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        check = dicom_check(answering, unused.getsockname()[1])
    assert (check.status, check.details["probe"]) == (DOWN, "none")
    assert "does not answer" in check.message or "no DICOM answer" in check.message


def test_health_reports_the_receiver_down_when_another_program_answers_on_its_port(
    receive: StartReceiver, tmp_path: Path
):
    """A leftover dcmtk storescp on the port: the daemon's receiver could not listen and was restarted
    again and again, senders stored into storescp with success, and health said "dicom ok"."""
    import dataclasses

    from meddaemon.daemon.health import DOWN, HealthLimits, check_health
    from ports import free_port

    require_dcmtk()
    receiver = receive()
    taken = free_port()
    (tmp_path / "storescp").mkdir()
    foreign = subprocess.Popen(
        [dcmtk("storescp"), "-aet", "STORESCP", "-od", str(tmp_path / "storescp"), str(taken)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    settings = dataclasses.replace(receiver.settings, dicom_port=taken)
    engine = create_db_engine(settings.db_url)
    try:
        echo = [dcmtk("echoscu"), "127.0.0.1", str(taken)]
        _wait(lambda: subprocess.run(echo, capture_output=True).returncode == 0, "storescp")
        check = check_health(engine, settings, HealthLimits(min_free_bytes=0)).check("dicom")
    finally:
        foreign.terminate()
        foreign.wait(10)
        engine.dispose()
    assert (check.status, check.details["probe"]) == (DOWN, "foreign"), check
    assert "is answered by another program (implementation OFFIS_DCMTK" in check.message
    assert "not this daemon's receiver" in check.message


def test_health_takes_a_receiver_that_does_not_name_itself_for_a_daemon_started_before_the_upgrade(
    receive: StartReceiver,
):
    """A daemon started before its receiver named itself answers as pynetdicom does by default: health
    called it another program, down, until the daemon was restarted."""
    import dataclasses

    from pynetdicom import AE
    from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

    from meddaemon.daemon.health import OK, HealthLimits, check_health

    receiver = receive()
    older = AE(ae_title=receiver.settings.ae_title)
    older.add_supported_context(Verification)
    server = older.start_server(("127.0.0.1", 0), block=False)
    settings = dataclasses.replace(receiver.settings, dicom_port=server.server_address[1])
    engine = create_db_engine(settings.db_url)
    try:
        check = check_health(engine, settings, HealthLimits(min_free_bytes=0)).check("dicom")
    finally:
        server.shutdown()
        engine.dispose()
    assert (check.status, check.details["probe"]) == (OK, "echoed"), check
    assert "without naming itself as this daemon's receiver" in check.message


def test_health_reports_a_receiver_that_answers_but_refuses_every_instance_for_want_of_disk(
    receive: StartReceiver, tmp_path: Path
):
    """It said `dicom ok` (and `disk ok`, by its own lower minimum) while every instance got 0xA700."""
    import dataclasses

    from meddaemon.daemon.health import DEGRADED, HealthLimits, check_health

    receiver = receive(dicom_min_free_bytes=2**62)
    assert pynetdicom_send(port(receiver), synthetic_instances(tmp_path / "sent", 1, seed=16)) == [0xA700]
    settings = dataclasses.replace(receiver.settings, dicom_port=port(receiver))
    engine = create_db_engine(settings.db_url)
    try:
        report = check_health(engine, settings, HealthLimits(min_free_bytes=0))
    finally:
        engine.dispose()
    check = report.check("dicom")
    assert (check.status, check.details["probe"]) == (DEGRADED, "echoed")
    assert "every instance is refused (0xA700)" in check.message and "dicom_min_free_bytes" in check.message


def signed_pair(folder: Path, name: str, ca: tuple[Path, Path] | None, usage: str) -> tuple[Path, Path]:
    """A SYNTHETIC certificate and key made by openssl: self-signed (a CA) when ``ca`` is None, else
    signed by it for ``usage`` (``serverAuth``, ``clientAuth``)."""
    cert, key = folder / f"{name}.pem", folder / f"{name}.key"
    new_key = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", str(key)]
    if ca is None:
        command = ["openssl", "req", "-x509", *new_key, "-days", "1", "-subj", f"/CN={name}", "-out", str(cert)]
        subprocess.run(command, check=True, capture_output=True, timeout=60)
        return cert, key
    request, extensions = folder / f"{name}.csr", folder / f"{name}.ext"
    subprocess.run(["openssl", "req", *new_key, "-subj", f"/CN={name}", "-out", str(request)],
                   check=True, capture_output=True, timeout=60)  # fmt: skip
    extensions.write_text(f"extendedKeyUsage={usage}\n", "ascii")
    sign = ["openssl", "x509", "-req", "-in", str(request), "-CA", str(ca[0]), "-CAkey", str(ca[1]),
            "-CAcreateserial", "-days", "1", "-extfile", str(extensions), "-out", str(cert)]  # fmt: skip
    subprocess.run(sign, check=True, capture_output=True, timeout=60)
    return cert, key


def unusable_tls_files(folder: Path, fault: str) -> dict[str, str]:
    """The TLS settings of a node whose files are wrong in the way ``fault`` says (SYNTHETIC)."""
    cert, key = signed_pair(folder, "node", None, "serverAuth")
    files = {"dicom_tls_cert": str(cert), "dicom_tls_key": str(key)}
    if fault == "an encrypted key":
        encrypted = folder / "node-encrypted.key"
        subprocess.run(["openssl", "pkey", "-in", str(key), "-aes256", "-passout", "pass:synthetic", "-out",
                        str(encrypted)], check=True, capture_output=True, timeout=60)  # fmt: skip
        files["dicom_tls_key"] = str(encrypted)
    elif fault == "another certificate's key":
        files["dicom_tls_key"] = str(signed_pair(folder, "other", None, "serverAuth")[1])
    else:
        ca = folder / "callers-ca.pem"
        ca.write_text("SYNTHETIC: no certificate in here\n")
        files["dicom_tls_ca"] = str(ca)
    return files


@pytest.mark.parametrize(
    ("fault", "named"),
    [
        ("an encrypted key", "the key is encrypted, and a daemon is asked no pass phrase"),
        ("another certificate's key", "the certificate and key cannot be used together"),
        ("a CA file without a certificate", "setting 'dicom_tls_ca' from env"),
    ],
)
def test_tls_files_the_receiver_cannot_use_stop_the_daemon_at_its_start_naming_them(
    tmp_path: Path, fault: str, named: str
):
    """They were only found out by the receiver's process as it started: the daemon ran on, its
    receiver restarted every few seconds for ever (and an encrypted key had it wait at a pass-phrase
    prompt on the terminal, never listening)."""
    from daemon_harness import MEDDAEMON, daemon_env
    from ports import free_port

    env = {f"MEDDAEMON_{k.upper()}": v for k, v in unusable_tls_files(tmp_path, fault).items()}
    (tmp_path / "inbox").mkdir()
    command = [str(MEDDAEMON), "start", "--watch", str(tmp_path / "inbox"), "--state-dir", str(tmp_path / "state"),
               "--dicom-port", str(free_port()), "--once"]  # fmt: skip
    run = subprocess.run(command, env={**daemon_env(), **env}, stdin=subprocess.DEVNULL, capture_output=True,
                         text=True, timeout=120)  # fmt: skip
    assert run.returncode == 2, run.stderr[-3000:]
    assert named in run.stderr and "Traceback" not in run.stderr
    assert "DICOM receiver" not in run.stderr


def test_an_encrypted_key_is_refused_by_the_receiver_not_asked_for_on_the_terminal(tmp_path: Path):
    """OpenSSL asked for the key's pass phrase on the controlling terminal, and the receiver waited
    there for ever (a daemon started by hand), never listening."""
    files = unusable_tls_files(tmp_path, "an encrypted key")
    code = (
        "import sys\nfrom meddaemon.config import load_settings\nfrom meddaemon.dicom.receiver import server_tls\n"
        f"settings = load_settings(env={{}}, flags={files!r})\n"
        "try:\n    server_tls(settings)\nexcept Exception as exc:\n    sys.exit(f'refused: {type(exc).__name__}')\n"
    )
    # script(1) gives the process a terminal whose input stays open, as a person's does
    terminal = subprocess.Popen(["script", "-qec", f"{sys.executable} -c {shlex.quote(code)}", "/dev/null"],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)  # fmt: skip
    try:
        output, _ = terminal.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        terminal.kill()
        output, _ = terminal.communicate()
        pytest.fail(f"the receiver waits at a prompt: {output.decode(errors='replace')[-500:]}")
    assert b"refused: SSLError" in output and b"pass phrase" not in output


def test_health_finds_a_tls_receiver_that_checks_its_callers_answering(receive: StartReceiver, tmp_path: Path):
    """With dicom_tls_ca, the probe verified the receiver against the callers' CA and presented the
    receiver's certificate as a caller's: a server CA of its own, or a certificate for servers only,
    and health said the receiver was down while every caller got through."""
    import dataclasses
    import ssl

    from pynetdicom import AE

    from meddaemon.daemon.health import OK, HealthLimits, check_health

    server_ca, callers_ca = signed_pair(tmp_path, "server-ca", None, ""), signed_pair(tmp_path, "callers-ca", None, "")
    server = signed_pair(tmp_path, "receiver", server_ca, "serverAuth")
    caller = signed_pair(tmp_path, "modality", callers_ca, "clientAuth")
    receiver = receive(dicom_tls_cert=str(server[0]), dicom_tls_key=str(server[1]), dicom_tls_ca=str(callers_ca[0]))
    client = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(server_ca[0]))
    client.check_hostname = False
    client.load_cert_chain(*caller)
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context("1.2.840.10008.1.1")
    assoc = ae.associate("127.0.0.1", port(receiver), ae_title="MEDDAEMON", tls_args=(client, None))
    try:
        assert assoc.is_established and int(assoc.send_c_echo().Status) == 0x0000  # a caller gets through
        assoc.release()
    finally:
        ae.shutdown()
    settings = dataclasses.replace(receiver.settings, dicom_port=port(receiver))
    engine = create_db_engine(settings.db_url)
    try:
        check = check_health(engine, settings, HealthLimits(min_free_bytes=0)).check("dicom")
    finally:
        engine.dispose()
    assert (check.status, check.details["probe"]) == (OK, "refused")
    assert "answers TLS" in check.message and "ALERT" in check.message


class HeldFolderSync(FolderSync):
    """A real folder fsync, the first of which is held until ``release`` is set (a slow disk, the
    moment the other associations arrive); when each ran is kept."""

    def __init__(self, folder: Path) -> None:
        super().__init__(folder)
        self.holding = threading.Event()
        self.release = threading.Event()
        self.runs: list[tuple[float, float]] = []

    def _fsync(self) -> None:
        began = time.monotonic()
        if not self.runs:
            self.holding.set()
            assert self.release.wait(30)
        super()._fsync()
        self.runs.append((began, time.monotonic()))


def one_then_eleven_while_it_is_held(
    sync: HeldFolderSync, rename_made: Callable[[], None], before_release: Callable[[], bool] = lambda: True
) -> None:
    """``rename_made`` in a thread whose fsync is held, then in eleven more that ask meanwhile;
    ``before_release`` is checked once all twelve have asked, then the fsync is let go and every
    thread joined."""
    first = threading.Thread(target=rename_made)
    first.start()
    assert sync.holding.wait(30)
    others = [threading.Thread(target=rename_made) for _ in range(11)]
    for thread in others:
        thread.start()
    deadline = time.monotonic() + 30
    while sync._asked < 12 and time.monotonic() < deadline:
        time.sleep(0.001)
    assert before_release()
    sync.release.set()
    for thread in [first, *others]:
        thread.join(30)


def test_renames_waiting_together_share_one_folder_fsync_begun_after_each_of_them(tmp_path: Path):
    """One association's fsync runs (held) while eleven others ask: they do not return with it
    (it may have begun before their renames), and one more fsync covers all eleven."""
    sync = HeldFolderSync(tmp_path)
    calls: list[tuple[float, float]] = []

    def rename_made() -> None:
        asked = time.monotonic()
        sync.sync()
        calls.append((asked, time.monotonic()))

    # nobody returns while the fsync that began before them runs
    one_then_eleven_while_it_is_held(sync, rename_made, before_release=lambda: calls == [])
    assert len(calls) == 12
    assert len(sync.runs) == 2  # one for the first, one shared by the eleven
    for asked, returned in calls:
        assert any(asked <= began and ended <= returned for began, ended in sync.runs)


class FailingFolderSync(HeldFolderSync):
    """The held fsyncs of the test above, the second of which fails as a failing disk makes it
    (EIO, injected)."""

    def _fsync(self) -> None:
        failing = len(self.runs) == 1
        super()._fsync()
        if failing:
            raise OSError(errno.EIO, "Input/output error (injected)")


def test_a_failed_folder_fsync_fails_every_caller_it_was_to_cover_and_no_other(tmp_path: Path):
    """The first fsync, held, covers the first caller and works. The eleven that asked meanwhile
    share the second, which fails: each of the eleven is told, not only the one that ran it. The
    next caller gets a fsync of its own, which works."""
    sync = FailingFolderSync(tmp_path)
    outcomes: list[str] = []

    def rename_made() -> None:
        try:
            sync.sync()
        except OSError as exc:
            outcomes.append(f"failed: {exc.strerror}")
        else:
            outcomes.append("durable")

    one_then_eleven_while_it_is_held(sync, rename_made)
    assert outcomes == ["durable"] + ["failed: Input/output error (injected)"] * 11
    rename_made()
    assert outcomes[-1] == "durable" and len(sync.runs) == 3


def test_a_caller_that_sends_a_byte_at_a_time_is_let_go_and_frees_its_place(receive: StartReceiver, tmp_path: Path):
    """pynetdicom's socket timeout never trips for a caller that sends a byte a second: past its ACSE
    or network timeout pynetdicom waited, to end the association, for the whole PDU (hours), and the
    association kept its place: two such callers locked every other sender out of a receiver of two.
    Here one trickles its association request, one a C-STORE's data once associated (timeouts of 2 s)."""
    import socket

    from pynetdicom import AE
    from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

    receiver = receive(dicom_max_associations=2)
    receiver.ae.acse_timeout = receiver.ae.network_timeout = 2
    [sent] = synthetic_instances(tmp_path / "sent", 1, seed=12)
    request = socket.create_connection(("127.0.0.1", port(receiver)), timeout=30)
    request.sendall(b"\x01\x00\x00\x00\x10\x00")  # an A-ASSOCIATE-RQ of 4,096 bytes, begun
    caller = AE(ae_title="TRICKLE")
    caller.add_requested_context(Verification)
    assoc = caller.associate("127.0.0.1", port(receiver), ae_title="MEDDAEMON")
    assert assoc.is_established
    data = assoc.dul.socket.socket
    data.sendall(b"\x04\x00\x00\x00\x10\x00")  # a P-DATA-TF of 4,096 bytes, begun
    try:
        deadline = time.monotonic() + 20
        while receiver._acceptors() and time.monotonic() < deadline:
            for connection in (request, data):
                with contextlib.suppress(OSError):
                    connection.send(b"\x00")  # a byte at a time, as long as the connection is open
            time.sleep(0.5)
        assert receiver._acceptors() == []
        assert pynetdicom_send(port(receiver), [sent]) == [0x0000]  # a place for the next sender
    finally:
        request.close()
        caller.shutdown()
