"""DICOM network in (docs/design.md section 11): the daemon as a DICOM node.

A C-STORE and C-ECHO SCP (pynetdicom) that accepts every storage SOP class, in the transfer syntaxes
this installation decodes (``medcli decoders``) and the uncompressed ones, and turns each instance
into a file of the inbox: the dataset exactly as received (never decoded and encoded again) behind
its File Meta, written to a hidden temporary name and fdatasynced while its row is committed (who
sent it: ``ReceivedInstance``), renamed into ``<watch>/dicom/`` under a name no other file has, and
the folder fsynced (``FolderSync``: one fsync for the associations that wait at once). Only then is
the sender told 0x0000, and may delete its copy. The inbox's intake takes it
from there with its guarantees: identity by SHA-256 (the same bytes sent again are a duplicate; the
same SOP Instance UID with other bytes, a new version), exactly once across crashes.

Refused at association: a calling AE not on ``dicom_allowed_callers``, a called AE other than
``ae_title``, an association past ``dicom_max_associations`` (``_admit``: a place is taken when the
association is requested, so a connection that says nothing, or a caller being refused, holds none).
Refused per instance: 0xA700 (Out of Resources) when the free disk would fall under
``dicom_min_free_bytes``, the instance is over ``max_file_bytes`` (the intake would refuse it
unread) or the database cannot record it, 0xA900 when its dataset is not the instance the request
names (garbage, say), 0xC000 (Cannot understand) when it does not parse, 0x0110 (Processing
failure) on another write error (the folder's fsync after the rename included); nothing is left in
the inbox then. File Meta elements (group 0002) a sender left at the head of its dataset are cut
away (they would be read as the file's own). A transfer cut off mid-way never reaches the
handler: nothing is written. With TLS, each caller's handshake runs in its connection's thread, so
a connection that says nothing holds up no other.

The daemon runs it in a child process (``ReceiverProcess``): pynetdicom is pure Python, and its
association threads would otherwise take the GIL from the daemon's loop.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import io
import logging
import multiprocessing
import os
import re
import shutil
import socket
import ssl
import threading
import time
import uuid
import weakref
import zlib
from collections.abc import Callable, Iterable
from concurrent import futures
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, NamedTuple

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.filereader import data_element_generator
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEG2000MCLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
)
from pydicom.uid import JPEGLossless as JPEGLosslessP14
from sqlalchemy import delete, insert
from sqlalchemy.engine import Engine
from sqlalchemy.exc import OperationalError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from meddaemon.config import Settings, load_tls_identity
from meddaemon.db.clock import db_clock
from meddaemon.db.engine import ConnectionLimits, transaction, with_lock_retry
from meddaemon.db.models import ReceivedInstance, utcnow
from meddaemon.dicom import associations
from meddaemon.engine.decode.limits import check_inflated_size
from meddaemon.failures import ScanFailure
from meddaemon.files import CANNOT_FSYNC_FOLDERS, final_path, make_folders, remove_stale_temporaries, temporary_path
from meddaemon.processes import child_runs, leave_stopping_to_the_parent, start_child, stop_child

log = logging.getLogger("meddaemon.receiver")
# pynetdicom logs every association at INFO and whole PDUs at DEBUG; the receiver logs what matters
logging.getLogger("pynetdicom").setLevel(logging.WARNING)

#: C-STORE statuses (PS3.4 B.2.3, PS3.7 C.4)
SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
DOES_NOT_MATCH = 0xA900
CANNOT_UNDERSTAND = 0xC000
UNDEFINED_LENGTH = 0xFFFFFFFF
PROCESSING_FAILURE = 0x0110

UNCOMPRESSED = (ExplicitVRLittleEndian, ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian)
LOSSLESS = (
    JPEGLSLossless,
    JPEGLosslessSV1,
    JPEGLosslessP14,
    JPEG2000Lossless,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
    RLELossless,
    JPEG2000MCLossless,
)
#: how long an instance's row may wait for a database lock before the instance is refused (0xA700)
RECORD_SECONDS = 10.0
#: how long a stopping receiver lets the associations in progress finish before it aborts them
STOP_GRACE_SECONDS = 10.0
#: connections let in past ``dicom_max_associations`` to ask for an association or hear a refusal
UNADMITTED_CONNECTIONS = 64
#: how long an association pynetdicom is ending (its ACSE or network timeout passed, an abort) may
#: keep its connection before it is closed under the thread still reading a PDU (``_close_stuck``)
ENDING_SECONDS = 2.0
#: how long a caller has to finish its TLS handshake, in its connection's own thread
TLS_HANDSHAKE_SECONDS = 10.0
#: how long a starting receiver tries to bind a port still held (by a killed daemon's receiver)
BIND_SECONDS = 15.0


def accepted_transfer_syntaxes(decodable: Iterable[str] | None = None) -> list[UID]:
    """The transfer syntaxes offered for every storage SOP class, in the order they are preferred
    when a sender proposes several in one context: lossless compressed (a sender holding such a
    file sends it as it is), then uncompressed, then lossy (accepted only when the sender proposes
    nothing else: a sender is never asked to compress lossily). Compressed ones only when they decode
    here (``decodable``: UIDs, by default ``engine.decode.decodable_transfer_syntaxes``)."""
    if decodable is None:
        from meddaemon.engine.decode import decodable_transfer_syntaxes

        decodable = [s.uid for s in decodable_transfer_syntaxes() if s.decodable]
    able = {UID(uid) for uid in decodable} - set(UNCOMPRESSED)
    lossless = [uid for uid in LOSSLESS if uid in able]
    lossy = sorted(able - set(lossless))
    return [*lossless, *UNCOMPRESSED, *lossy]


def rejected_contexts(assoc: Any) -> list[str]:
    """The presentation contexts refused to an association, each as its SOP class, the transfer
    syntaxes proposed and why: a sender whose images never arrive (JPEG 2000 Part 2, MPEG, a
    private class) was otherwise told "no presentation context" while this side logged nothing."""
    request = assoc.requestor.primitive
    proposed = {cx.context_id: cx for cx in (request.presentation_context_definition_list if request else [])}
    out = []
    for context in assoc.rejected_contexts:
        asked = proposed.get(context.context_id, context)
        syntaxes = ", ".join(_uid_name(uid) for uid in asked.transfer_syntax) or "no syntax"
        why = _CONTEXT_REFUSALS.get(context.result, f"result {context.result}")
        out.append(f"{_uid_name(asked.abstract_syntax)} in {syntaxes} ({why})")
    return out


#: a refused presentation context's result (PS3.8 9.3.3.2)
_CONTEXT_REFUSALS = {
    0x01: "refused",
    0x02: "no reason given",
    0x03: "SOP class not accepted",
    0x04: "transfer syntax not decodable here",
}


def _uid_name(uid: Any) -> str:
    name = UID(str(uid)).name
    return name if name and name != str(uid) else str(uid)


# -- counters shared with the daemon -------------------------------------------------------------

#: what the receiver counts; ``active`` and ``up`` are levels, the others only grow
STAT_NAMES = (
    "up",
    "active",
    "accepted",
    "rejected_calling_ae",
    "rejected_called_ae",
    "rejected_limit",
    "aborted",
    "stored",
    "out_of_resources",
    "does_not_match",
    "cannot_understand",
    "processing_failure",
    "bytes",
    "contexts_rejected",
)
_REFUSAL_STATS = {
    OUT_OF_RESOURCES: "out_of_resources",
    DOES_NOT_MATCH: "does_not_match",
    CANNOT_UNDERSTAND: "cannot_understand",
    PROCESSING_FAILURE: "processing_failure",
}


class ReceiverStats:
    """Counters in shared memory: the receiver's process adds to them, the daemon's metrics read them."""

    def __init__(self, context: Any = None) -> None:
        context = context or multiprocessing.get_context("forkserver")
        self._values = context.Array("q", len(STAT_NAMES))

    def add(self, name: str, n: int = 1) -> None:
        with self._values.get_lock():
            self._values[STAT_NAMES.index(name)] += n

    def set(self, name: str, value: int) -> None:
        with self._values.get_lock():
            self._values[STAT_NAMES.index(name)] = value

    def snapshot(self) -> dict[str, int]:
        with self._values.get_lock():
            return dict(zip(STAT_NAMES, self._values[:], strict=True))


# -- the SCP ---------------------------------------------------------------------------------------


@dataclass
class Caller:
    """One association: who called, from where, since when, and what came of its instances."""

    ae_title: str
    called_ae: str
    address: str
    port: int
    associated_at: datetime
    stored: int = 0
    refused: int = 0
    open: bool = True
    aborted: bool = False


@dataclass(frozen=True)
class InstanceFacts:
    """What the row of a received instance says about it, read from the request and the header."""

    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    study_instance_uid: str | None
    series_instance_uid: str | None


class Refused(Exception):
    """An instance the receiver does not keep, with the status the sender gets and why."""

    def __init__(self, status: int, why: str) -> None:
        super().__init__(why)
        self.status = status
        self.why = why


@dataclass
class Receiver:
    """The SCP in this process; ``ReceiverProcess`` runs one in a child of the daemon."""

    settings: Settings
    sessions: sessionmaker[Session]
    #: the node name the rows carry (the daemon's ``node``)
    node: str
    stats: ReceiverStats = field(default_factory=ReceiverStats)
    disk_usage: Callable[[Path], Any] = shutil.disk_usage
    #: the transfer syntaxes offered (``accepted_transfer_syntaxes``; None: found here, which loads
    #: every decoder plugin)
    syntaxes: list[UID] | None = None

    def __post_init__(self) -> None:
        self.root = self.settings.received_dir
        #: the rows are added on the engine's connections directly (``_RECORD``)
        self.engine: Engine = self.sessions.kw["bind"]
        #: the accepted associations (the entries go with their association objects)
        self.callers: weakref.WeakKeyDictionary[Any, Caller] = weakref.WeakKeyDictionary()
        self._lock = threading.Lock()
        #: the associations given a place under ``dicom_max_associations`` (``_admit``)
        self._admitted: weakref.WeakSet[Any] = weakref.WeakSet()
        self.server: Any = None
        self.ae = self._application_entity()
        self.folder_sync = FolderSync(self.root)
        self._datasyncs = self._datasync_pool()
        #: when each association was first seen ending (``_close_stuck``)
        self._ending_since: weakref.WeakKeyDictionary[Any, float] = weakref.WeakKeyDictionary()
        self._stopping = threading.Event()

    def _datasync_pool(self) -> futures.ThreadPoolExecutor:
        """Threads for the files' fdatasyncs, run beside the handlers' row commits (one an association)."""
        return futures.ThreadPoolExecutor(
            max_workers=max(1, self.settings.dicom_max_associations), thread_name_prefix="receiver-fdatasync"
        )

    def _application_entity(self) -> Any:
        from pynetdicom import AE, AllStoragePresentationContexts
        from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

        s = self.settings
        ae = AE(ae_title=s.ae_title)
        ae.implementation_version_name = implementation_version_name(s)
        # The limit is ours (``_admit``); pynetdicom's counts every acceptor thread alive, the ones
        # being refused and the connections yet to ask included, so it only bounds the threads.
        ae.maximum_associations = s.dicom_max_associations + UNADMITTED_CONNECTIONS
        ae.require_calling_aet = list(s.dicom_allowed_callers)
        ae.require_called_aet = True
        syntaxes = self.syntaxes or accepted_transfer_syntaxes()
        for context in AllStoragePresentationContexts:
            ae.add_supported_context(context.abstract_syntax, syntaxes)
        ae.add_supported_context(Verification, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
        return ae

    @property
    def address(self) -> tuple[str, int]:
        host, port = self.server.server_address[:2]
        return str(host), int(port)

    def start(self, bind_seconds: float = 0.0) -> None:
        """Listen on ``dicom_host:dicom_port``, trying a port still in use for ``bind_seconds``."""
        from pynetdicom import evt

        make_folders(self.root, durable=True)  # its entry durable before any instance in it is acknowledged
        removed = remove_stale_temporaries(self.root, recursive=False)
        if removed:
            log.info("removed %d unfinished received files left by an earlier receiver", len(removed))
            self._forget_unfinished([final_path(tmp) for tmp in removed])
        handlers = [
            (evt.EVT_REQUESTED, self._admit),
            (evt.EVT_C_STORE, self._store),
            (evt.EVT_ESTABLISHED, self._established),
            (evt.EVT_REJECTED, self._rejected),
            (evt.EVT_ABORTED, self._aborted),
            (evt.EVT_CONN_CLOSE, self._closed),
            *associations.handlers(),
        ]
        deadline = time.monotonic() + bind_seconds
        while True:
            try:
                self.server = self.ae.make_server(
                    (self.settings.dicom_host, self.settings.dicom_port),
                    evt_handlers=handlers,
                    ssl_context=server_tls(self.settings),
                    server_class=_acceptor_class(),
                )
                break
            except OSError as exc:
                if exc.errno != errno.EADDRINUSE or time.monotonic() >= deadline:
                    raise
                time.sleep(0.25)
        # as the AE's start_server(block=False) does, with the acceptor above
        threading.Thread(target=self.server.serve_forever, name="DICOM acceptor", daemon=True).start()
        self._stopping.clear()
        threading.Thread(target=self._close_stuck_connections, name="DICOM stuck reads", daemon=True).start()
        self.ae._servers.append(self.server)  # the server's shutdown takes itself out of the AE's list
        self.stats.set("up", 1)
        host, port = self.address
        callers = ", ".join(self.settings.dicom_allowed_callers) or "any calling AE"
        log.info(
            "DICOM receiver %s listening on %s:%d%s (allowed: %s; at most %d associations); writing to %s",
            self.settings.ae_title,
            host,
            port,
            " over TLS" if self.settings.dicom_tls_cert else "",
            callers,
            self.settings.dicom_max_associations,
            self.root,
        )

    def stop(self, grace: float = STOP_GRACE_SECONDS) -> None:
        """Refuse new associations, let those in progress finish for ``grace`` seconds, abort the rest."""
        if self.server is None:
            return
        self.server.shutdown()
        self._stopping.set()
        deadline = time.monotonic() + grace
        while self._acceptors() and time.monotonic() < deadline:
            time.sleep(0.05)
        left = self._acceptors()
        if left:
            log.warning("aborting %d DICOM association(s) still open at the stop", len(left))
        self.ae.shutdown()
        self._datasyncs.shutdown()
        self._datasyncs = self._datasync_pool()
        self.folder_sync.close()
        self.stats.set("up", 0)
        self.server = None

    def _acceptors(self) -> list[Any]:
        return [a for a in self.ae.active_associations if a.is_acceptor]

    def _close_stuck_connections(self) -> None:
        """Close the connection of an association that pynetdicom has been ending for
        ``ENDING_SECONDS`` while its thread still lives. A caller that sends a PDU a byte a second
        never trips pynetdicom's socket timeout: once its ACSE or network timeout passed, pynetdicom
        waits, to end the association, for the reading thread, which waits for the whole PDU (hours
        for 16 KB), and the association kept its place under ``dicom_max_associations``: ten such
        callers locked every other sender out until the daemon restarted."""
        while not self._stopping.wait(0.5):
            now = time.monotonic()
            for assoc in self._acceptors():
                if not getattr(assoc, "_kill", False) or not assoc.is_alive():
                    continue
                since = self._ending_since.setdefault(assoc, now)
                if now - since >= ENDING_SECONDS:
                    raw = associations.raw_socket(assoc)
                    if raw is not None:
                        log.warning(
                            "a DICOM connection from %s:%s still sending after its association ended: closed",
                            assoc.requestor.address,
                            assoc.requestor.port,
                        )
                        with contextlib.suppress(OSError):
                            raw.shutdown(socket.SHUT_RDWR)

    # -- association events ----------------------------------------------------------------------

    def _admit(self, event: Any) -> None:
        """Give the requested association a place, or refuse it (transient, local limit exceeded) when
        ``dicom_max_associations`` are taken. A caller pynetdicom will refuse for its AE titles is
        left to it and takes no place. The place is held while the association's thread lives."""
        assoc = event.assoc
        request = assoc.requestor.primitive
        calling, called = str(request.calling_ae_title).strip(), str(request.called_ae_title).strip()
        if self._refused_by_title(calling, called) is not None:
            return
        with self._lock:
            taken = sum(1 for other in self._admitted if other.is_alive())
            if taken < self.settings.dicom_max_associations:
                self._admitted.add(assoc)
                return
        assoc.acse.send_reject(0x02, 0x03, 0x02)
        self._rejected(event, places_taken=True)
        assoc.kill()

    def _refused_by_title(self, calling: str, called: str) -> tuple[str, str] | None:
        """Why pynetdicom refuses a caller for its AE titles (the stat and the words), or None. Both
        sides compared stripped, as pynetdicom compares them: an ``ae_title`` or allowed caller
        written with a space took callers pynetdicom let in for ones it would refuse, and the limit
        was never applied to them."""
        allowed = {title.strip() for title in self.settings.dicom_allowed_callers}
        own = self.settings.ae_title.strip()
        if allowed and calling not in allowed:
            return "rejected_calling_ae", "its calling AE is not on dicom_allowed_callers"
        if called != own:
            return "rejected_called_ae", f"it called AE {called!r}, not {own!r}"
        return None

    def _established(self, event: Any) -> None:
        associations.prompt(event.assoc)
        requestor = event.assoc.requestor
        caller = Caller(
            ae_title=str(requestor.ae_title).strip(),
            called_ae=str(event.assoc.acceptor.ae_title).strip(),
            address=str(requestor.address),
            port=int(requestor.port or 0),
            associated_at=utcnow(),
        )
        with self._lock:
            self.callers[event.assoc] = caller
        self.stats.add("accepted")
        self.stats.add("active")
        log.info("association from %s at %s:%d", caller.ae_title, caller.address, caller.port)
        if refused := rejected_contexts(event.assoc):
            self.stats.add("contexts_rejected", len(refused))
            log.warning(
                "association from %s: %d of its presentation contexts refused, the instances they would carry "
                "cannot be sent here: %s",
                caller.ae_title,
                len(refused),
                "; ".join(refused),
            )

    def _rejected(self, event: Any, places_taken: bool = False) -> None:
        """Count and log a refused association: for its AE titles, because every place is taken
        (``_admit``), or (pynetdicom's own refusal past ``maximum_associations``) because the
        connections open, most of them yet to ask for anything, are more than it lets in at once."""
        assoc = event.assoc
        request = assoc.requestor.primitive
        calling = str(request.calling_ae_title if request else assoc.requestor.ae_title).strip()
        called = str(request.called_ae_title).strip() if request else ""
        if places_taken:
            limit = f"{self.settings.dicom_max_associations} associations are open already"
        else:
            limit = (
                f"{len(self._acceptors()) - 1} other connections are open, over the "
                f"{self.ae.maximum_associations} let in at once, most of them yet to ask for an "
                f"association (one that asks nothing is closed after {self.ae.acse_timeout:.0f} s)"
            )
        stat, why = self._refused_by_title(calling, called) or ("rejected_limit", limit)
        self.stats.add(stat)
        log.warning(
            "association from %s at %s:%s rejected: %s", calling, assoc.requestor.address, assoc.requestor.port, why
        )

    def _aborted(self, event: Any) -> None:
        with self._lock:
            caller = self.callers.get(event.assoc)
            if caller is None or caller.aborted:
                return
            caller.aborted = True
        self.stats.add("aborted")
        log.warning(
            "association from %s at %s:%d aborted (%d instances stored so far; an instance still arriving is not "
            "kept, one that had arrived whole is stored)",
            caller.ae_title,
            caller.address,
            caller.port,
            caller.stored,
        )

    def _closed(self, event: Any) -> None:
        """The connection closed (released, aborted or dropped; pynetdicom may say so before the abort)."""
        with self._lock:
            caller = self.callers.get(event.assoc)
            if caller is None or not caller.open:
                return
            caller.open = False
        self.stats.add("active", -1)
        log.info(
            "association from %s closed: %d instances stored, %d refused",
            caller.ae_title,
            caller.stored,
            caller.refused,
        )

    # -- one instance ----------------------------------------------------------------------------

    def _store(self, event: Any) -> int | Dataset:
        caller = self.callers.get(event.assoc)
        if caller is None:  # never: pynetdicom reports the association established first
            self._established(event)
            caller = self.callers[event.assoc]
        try:
            data, facts = _checked(self._received_bytes(event), event, self.settings.decode_options.max_inflated_bytes)
            self.keep(data, facts, caller)
        except Refused as refusal:
            caller.refused += 1
            self.stats.add(_REFUSAL_STATS[refusal.status])
            log.warning("an instance from %s refused with 0x%04X: %s", caller.ae_title, refusal.status, refusal.why)
            answer = Dataset()
            answer.Status = refusal.status
            answer.ErrorComment = refusal.why[:64]
            return answer
        caller.stored += 1
        self.stats.add("stored")
        self.stats.add("bytes", len(data))
        return SUCCESS

    def _received_bytes(self, event: Any) -> bytes:
        try:
            data: bytes = event.encoded_dataset()
        except Exception as exc:  # File Meta from the request's UIDs could not be encoded
            raise Refused(CANNOT_UNDERSTAND, f"cannot make its File Meta ({type(exc).__name__})") from exc
        return data

    def keep(self, data: bytes, facts: InstanceFacts, caller: Caller) -> Path:
        """Make ``data`` a file of the inbox, durably, with its row; returns the file. Raises
        ``Refused`` (and leaves no file, nor row) when it cannot."""
        self._folder_there()
        if len(data) > self.settings.max_file_bytes:  # the intake would refuse it unread (too_large)
            raise Refused(OUT_OF_RESOURCES, f"it holds {len(data)} bytes, over max_file_bytes")
        free = self.disk_usage(self.root).free
        if free - len(data) < self.settings.dicom_min_free_bytes:
            raise Refused(OUT_OF_RESOURCES, "free disk space is under dicom_min_free_bytes")
        sha = hashlib.sha256(data).hexdigest()
        target = self._unique_name(caller.ae_title, sha)
        tmp = temporary_path(target)
        try:
            row_id = self._write_and_record(tmp, data, lambda: self._record(sha, len(data), target, facts, caller))
            renamed = False
            try:
                if target.exists():  # the names are unique: never, but never overwrite all the same
                    raise FileExistsError(errno.EEXIST, "the unique name is taken", str(target))
                os.rename(tmp, target)
                renamed = True
                self.folder_sync.sync()
            except OSError:
                self._forget(row_id)
                if renamed:  # the rename may not last: the sender keeps its copy and sends it again
                    with contextlib.suppress(OSError):
                        target.unlink()
                raise
        except BaseException as exc:
            with contextlib.suppress(OSError):
                tmp.unlink()
            if isinstance(exc, OSError):
                status = OUT_OF_RESOURCES if exc.errno in (errno.ENOSPC, errno.EDQUOT) else PROCESSING_FAILURE
                raise Refused(status, f"cannot write it ({exc.strerror or type(exc).__name__})") from exc
            raise
        return target

    def _folder_there(self) -> None:
        """The receiving folder, made again (its entry durable) when something removed it meanwhile
        (a clean-up job deleting the inbox's empty folders): otherwise every instance after is refused."""
        if self.root.is_dir():
            return
        try:
            make_folders(self.root, durable=True)
        except OSError as exc:
            raise Refused(PROCESSING_FAILURE, f"cannot make the receiving folder ({exc.strerror or exc})") from exc
        log.warning("the receiving folder %s was removed while the receiver ran: made again", self.root)

    def _write_and_record(self, tmp: Path, data: bytes, record: Callable[[], int]) -> int:
        """Write ``tmp`` and make its bytes durable (``fdatasync``: the data and its size, not the
        times, which nothing needs back after a crash) while ``record`` commits the instance's row:
        the two waits overlap. Returns the row's id; the row is forgotten if the file is not durable."""
        with open(tmp, "xb") as handle:
            handle.write(data)
            handle.flush()
            durable = self._datasyncs.submit(os.fdatasync, handle.fileno())
            try:
                row_id = record()
            finally:
                futures.wait([durable])  # the descriptor stays open until its fdatasync is done
        failed = durable.exception()
        if failed is not None:
            self._forget(row_id)
            raise failed
        return row_id

    def _unique_name(self, calling_ae: str, sha: str) -> Path:
        """``<calling AE>_<sha256[:16]>_<random>.dcm``: no patient data, the sender readable, and a
        name no file has had, so that a resent instance never replaces one the daemon may be reading."""
        while True:
            target = self.root / f"{_safe(calling_ae)}_{sha[:16]}_{uuid.uuid4().hex[:12]}.dcm"
            if not target.exists():
                return target

    def _record(self, sha: str, size: int, target: Path, facts: InstanceFacts, caller: Caller) -> int:
        row = {
            "sha256": sha,
            "size_bytes": size,
            "file_name": target.relative_to(self.settings.watch).as_posix(),
            "sop_instance_uid": facts.sop_instance_uid,
            "sop_class_uid": facts.sop_class_uid,
            "study_instance_uid": facts.study_instance_uid,
            "series_instance_uid": facts.series_instance_uid,
            "transfer_syntax_uid": facts.transfer_syntax_uid,
            "calling_ae": caller.ae_title,
            "called_ae": caller.called_ae,
            "peer_address": caller.address,
            "peer_port": caller.port,
            "association_at": caller.associated_at,
            "node": self.node,
        }

        def add() -> int:
            with self.engine.begin() as connection:
                return int(connection.execute(_RECORD, row).inserted_primary_key[0])

        deadline = time.monotonic() + RECORD_SECONDS
        try:
            return with_lock_retry(add, should_stop=lambda: time.monotonic() > deadline)
        except OperationalError as exc:
            log.error("an instance could not be recorded: the database is unavailable (%s)", type(exc.orig).__name__)
            raise Refused(OUT_OF_RESOURCES, "the database is unavailable") from exc

    def _forget_unfinished(self, targets: list[Path]) -> None:
        """The rows of instances whose receiver was killed after their row's commit and before their
        file's rename: never acknowledged, never a file (a resend is a first reception, not a second)."""
        names = [t.relative_to(self.settings.watch).as_posix() for t in targets if not t.exists()]
        try:
            with transaction(self.sessions) as session:
                session.execute(delete(ReceivedInstance).where(ReceivedInstance.file_name.in_(names)))
        except SQLAlchemyError as exc:  # bookkeeping only: the receiver starts all the same
            log.warning("the rows of %d unfinished instances stay: %s", len(names), type(exc).__name__)

    def _forget(self, row_id: int) -> None:
        with contextlib.suppress(Exception), transaction(self.sessions) as session:
            session.execute(delete(ReceivedInstance).where(ReceivedInstance.id == row_id))


#: the row of a received instance, built once: a Core statement on a connection, not one made per
#: instance and run through an ORM session, is a fifth of the CPU (0.15 ms against 0.7 ms here)
_RECORD = insert(ReceivedInstance).values(received_at=db_clock())


def _checked(data: bytes, event: Any, max_inflated_bytes: int) -> tuple[bytes, InstanceFacts]:
    """The bytes to keep of the Part 10 file ``data`` pynetdicom made of the instance, and the UIDs
    its row keeps, read from the request and the dataset's elements (one walk of their headers:
    values over 256 bytes, the pixels among them, are not read). A dataset whose SOP Instance UID or
    SOP Class UID is not the request's (garbage, another instance, a CT sent as an MR) is refused
    (0xA900), as dcmtk's storescp does: the File Meta written from the request would contradict the
    dataset; one that does not parse to its end too (0xC000). File Meta elements (group 0002) a
    legacy sender left at the head of its dataset are cut away: behind the File Meta made from the
    request they would be read as the file's own (another transfer syntax, another instance). A
    Deflated dataset that would inflate to more than ``max_inflated_bytes`` is refused (0xA700)
    before it is inflated: 1 MB of deflate holds 1 GiB."""
    request = event.request
    syntax = UID(str(event.context.transfer_syntax))  # the File Meta pynetdicom wrote says the same
    if syntax == DeflatedExplicitVRLittleEndian:
        try:
            check_inflated_size(data, max_inflated_bytes)
        except ScanFailure as failure:
            raise Refused(OUT_OF_RESOURCES, failure.message) from None
    try:
        walk = _read_to_the_end(data, syntax)
    except Exception as exc:
        raise Refused(CANNOT_UNDERSTAND, f"its dataset does not parse ({type(exc).__name__})") from exc
    uids = walk.uids
    if uids.get("SOPInstanceUID", "") != str(request.AffectedSOPInstanceUID):
        raise Refused(DOES_NOT_MATCH, "the dataset's SOP Instance UID is not the request's")
    if uids.get("SOPClassUID", "") != str(request.AffectedSOPClassUID):
        raise Refused(DOES_NOT_MATCH, "the dataset's SOP Class UID is not the request's")
    if not walk.whole:
        raise Refused(CANNOT_UNDERSTAND, "its dataset ends inside a value or has bytes after it")
    if walk.sender_meta is not None:
        first, last = walk.sender_meta
        data = data[:first] + data[last:]
        log.info("File Meta elements (group 0002) at the head of a dataset were cut away (%d bytes)", last - first)
    facts = InstanceFacts(
        sop_instance_uid=uids["SOPInstanceUID"],
        sop_class_uid=str(request.AffectedSOPClassUID),
        transfer_syntax_uid=str(event.context.transfer_syntax),
        study_instance_uid=uids.get("StudyInstanceUID") or None,
        series_instance_uid=uids.get("SeriesInstanceUID") or None,
    )
    return data, facts


#: the top-level elements the row keeps, by tag
_KEPT_UIDS = {
    0x00080016: "SOPClassUID",
    0x00080018: "SOPInstanceUID",
    0x0020000D: "StudyInstanceUID",
    0x0020000E: "SeriesInstanceUID",
}


class _Walk(NamedTuple):
    """What one walk of a received dataset's element headers found."""

    #: the kept UIDs, by keyword
    uids: dict[str, str]
    #: the dataset's last element ends where the bytes do
    whole: bool
    #: where the group 0002 elements its sender left at the head of the dataset begin and end
    sender_meta: tuple[int, int] | None = None


def _read_to_the_end(data: bytes, syntax: UID) -> _Walk:
    """The kept UIDs of the Part 10 file ``data`` (the File Meta pynetdicom wrote from the request,
    then the dataset as sent in ``syntax``), and whether the dataset is whole: its last element ends
    where the bytes do. pydicom's ``dcmread`` reads a value cut short, or garbage after the last
    element, without a word, and the sender was told its instance was stored, which could only fail
    as truncated; dcmtk's storescp refuses both. One walk of the elements' headers, as the header
    alone was read before (0.35 ms an instance for CT_small; a ``dcmread`` and a walk took 0.73).
    A Deflated dataset is inflated first: whole when its deflate stream ends and the dataset inside
    it ends where the stream does (a stream that inflates may hold a dataset cut short)."""
    if data[128:136] != b"DICM\x02\x00\x00\x00":  # no File Meta of pynetdicom's: the header as pydicom reads it
        header = dcmread(io.BytesIO(data), stop_before_pixels=True, specific_tags=list(_KEPT_UIDS.values()))
        return _Walk({keyword: str(header.get(keyword, "")) for keyword in _KEPT_UIDS.values()}, True)
    # after the File Meta pynetdicom wrote, by the group length it wrote: a group 0002 element a
    # sender left at the head of its dataset is the dataset's
    start = 128 + 4 + 12 + int.from_bytes(data[140:144], "little")
    if syntax != DeflatedExplicitVRLittleEndian:
        return _walk_elements(data, start, syntax.is_implicit_VR, syntax.is_little_endian)
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)  # raises on a stream that is not deflate's
    dataset = inflater.decompress(data[start:])
    walk = _walk_elements(dataset, 0, False, True)
    # group 0002 inside a Deflated dataset is not cut away (it would have to be deflated again);
    # bytes after the stream are left as pydicom leaves them (a NUL padding it to an even length,
    # a trailer some writers add: pydicom's own image_dfl.dcm has eight)
    return _Walk(walk.uids, walk.whole and inflater.eof)


def _walk_elements(data: bytes, start: int, implicit_vr: bool, little_endian: bool) -> _Walk:
    """``_read_to_the_end`` over the dataset encoded from ``start`` to the end of ``data``."""
    stream = io.BytesIO(data)
    stream.seek(start)
    uids: dict[str, str] = {}
    end = start
    sender_meta: tuple[int, int] | None = None
    try:
        # each element's end as its header says (a value read short says nothing), or past its
        # sequence delimiter; the header of an element cut short ends the walk unseen
        for element in data_element_generator(stream, implicit_vr, little_endian, defer_size=256):
            length, at = getattr(element, "length", UNDEFINED_LENGTH), getattr(element, "value_tell", None)
            ends = at + length if at is not None and length != UNDEFINED_LENGTH else stream.tell()
            if element.tag >> 16 == 0x0002 and end == (start if sender_meta is None else sender_meta[1]):
                sender_meta = (start, ends)  # at the head, or right after the ones there
            end = ends
            if element.tag in _KEPT_UIDS and isinstance(element.value, bytes):
                uids[_KEPT_UIDS[element.tag]] = element.value.decode("ascii", "replace").rstrip("\0 ")
    except Exception:  # bytes no element can be read from: not whole (the UIDs found so far say whose)
        return _Walk(uids, False)
    return _Walk(uids, end == len(data), sender_meta)


class FolderSync:
    """Group commit of the renames into one folder. ``sync`` returns once every rename made in the
    folder before it was called is durable; the callers that arrive while an fsync of the folder
    runs (other associations) share the next one, instead of each waiting for its own. The folder
    is opened once (``O_DIRECTORY``), and again when it is no longer the folder at that path (removed
    and made again). As ``files.fsync_dir`` with ``strict``: a filesystem that cannot fsync a folder
    is not an error; any other failure of the fsync (EIO: the disk failing) is raised to every
    caller that fsync was to cover, so that none of their senders is told its instance is safe."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._fd: int | None = None
        self._changed = threading.Condition()
        self._asked = 0
        self._done = 0
        self._running = False
        #: the callers (by ticket) whose fsync failed, until each has been told
        self._failed: dict[int, OSError] = {}
        #: folder fsyncs run, for the benchmark and the tests: fewer than ``sync`` calls when shared
        self.fsyncs = 0

    def sync(self) -> None:
        with self._changed:
            self._asked += 1
            ticket = self._asked
            while self._done < ticket:
                if self._running:  # it may have started before this caller's rename: wait for the next
                    self._changed.wait()
                    continue
                self._running = True
                first, covered = self._done + 1, self._asked
                self._changed.release()
                failure: OSError | None = None
                try:
                    self._fsync()
                except OSError as exc:
                    failure = exc
                finally:
                    self._changed.acquire()
                    self._running = False
                    self._done = covered
                    if failure is not None:
                        self._failed.update(dict.fromkeys(range(first, covered + 1), failure))
                    self._changed.notify_all()
            failed = self._failed.pop(ticket, None)
        if failed is not None:
            raise failed

    def _fsync(self) -> None:
        try:
            if self._fd is not None and not os.path.samestat(os.fstat(self._fd), os.stat(self.folder)):
                os.close(self._fd)  # the folder was removed and made again: the renames are in the new one
                self._fd = None
            if self._fd is None:
                self._fd = os.open(self.folder, os.O_RDONLY | os.O_DIRECTORY)
            os.fsync(self._fd)
        except OSError as exc:
            if exc.errno in CANNOT_FSYNC_FOLDERS:
                return
            if self._fd is not None:  # a descriptor reports a writeback error once: the next fsync opens anew
                os.close(self._fd)
                self._fd = None
            raise
        finally:
            self.fsyncs += 1

    def close(self) -> None:
        with self._changed:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None


_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")


def _safe(ae_title: str) -> str:
    """An AE title as a file-name part (AE titles may hold spaces, dots, slashes)."""
    return _UNSAFE.sub("-", ae_title).strip("-") or "AE"


@functools.cache
def _acceptor_class() -> type:
    """pynetdicom's threaded server, with each caller's TLS handshake in its connection's own thread,
    under ``TLS_HANDSHAKE_SECONDS``. pynetdicom's does it in the accept loop, without a timeout: one
    connection that said nothing stopped every other caller from being accepted, and the receiver's
    stop (which waits for that loop) until the daemon killed it."""
    from pynetdicom.transport import ThreadedAssociationServer

    class HandshakeInItsThread(ThreadedAssociationServer):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            self.handshaking: set[ssl.SSLSocket] = set()
            self.handshaking_lock = threading.Lock()
            super().__init__(*args, **kwargs)

        def get_request(self) -> tuple[socket.socket, Any]:
            connection, address = self.socket.accept()
            if self.ssl_context:
                connection = self.ssl_context.wrap_socket(connection, server_side=True, do_handshake_on_connect=False)
            return connection, address

        def process_request_thread(self, request: Any, client_address: Any) -> None:
            if isinstance(request, ssl.SSLSocket) and not self._shake_hands(request, client_address):
                self.shutdown_request(request)
                return
            super().process_request_thread(request, client_address)

        def _shake_hands(self, connection: ssl.SSLSocket, client_address: Any) -> bool:
            with self.handshaking_lock:
                self.handshaking.add(connection)
            before = connection.gettimeout()
            try:
                connection.settimeout(TLS_HANDSHAKE_SECONDS)
                connection.do_handshake()
                connection.settimeout(before)
                return True
            except OSError as exc:  # ssl.SSLError and the timeout among them
                log.warning("a TLS connection from %s closed: %s", client_address[0], exc)
                return False
            finally:
                with self.handshaking_lock:
                    self.handshaking.discard(connection)

        def server_close(self) -> None:
            """The handshakes under way end now: closing waits for every connection's thread."""
            with self.handshaking_lock:
                waiting = list(self.handshaking)
            for connection in waiting:
                with contextlib.suppress(OSError):
                    connection.shutdown(socket.SHUT_RDWR)
            super().server_close()

    return HandshakeInItsThread


def server_tls(settings: Settings) -> ssl.SSLContext | None:
    """TLS for the receiver, when ``dicom_tls_cert`` is set; callers must present a certificate the
    CA of ``dicom_tls_ca`` signed, when it is set."""
    if not settings.dicom_tls_cert:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    load_tls_identity(context, settings)
    if settings.dicom_tls_ca:
        context.load_verify_locations(settings.dicom_tls_ca)
        context.verify_mode = ssl.CERT_REQUIRED
    return context


# -- the probe -------------------------------------------------------------------------------------


#: how pynetdicom names an association's end by default (``PYNETDICOM_304``): a receiver of a
#: meddaemon from before ``implementation_version_name``, which ``echo`` does not call foreign
PYNETDICOM_NAME = "PYNETDICOM"


def implementation_version_name(settings: Settings) -> str:
    """The name this daemon's receiver gives in each association it accepts (PS3.7 D.3.3.2.3):
    ``MEDDAEMON_`` and six hex digits of its state directory, so that the probe of ``meddaemon
    health`` tells it from another program answering on its port (a leftover storescp, an Orthanc,
    another meddaemon), which took the senders' instances while the daemon's receiver, unable to
    listen, was restarted again and again, and health said "dicom ok"."""
    digest = hashlib.sha256(str(Path(settings.state_dir).resolve()).encode()).hexdigest()
    return f"MEDDAEMON_{digest[:6].upper()}"


@dataclass(frozen=True)
class EchoAnswer:
    """What a C-ECHO to the receiver found: ``echoed``, ``refused`` (it answered with a rejection,
    so it listens), ``foreign`` (another program answers on its port) or ``none`` (no DICOM answer)."""

    outcome: str
    message: str


def echo(settings: Settings, timeout: float = 5.0) -> EchoAnswer:
    """C-ECHO the receiver these settings describe, as ``ae_title`` calling itself (``meddaemon health``)."""
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

    host = "127.0.0.1" if settings.dicom_host in ("", "0.0.0.0") else settings.dicom_host
    host = "::1" if host == "::" else host
    where = f"{settings.ae_title} at {host}:{settings.dicom_port}"
    ae = AE(ae_title=settings.ae_title)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = ae.connection_timeout = timeout
    ae.add_requested_context(Verification)
    tls = _probe_tls(settings) if settings.dicom_tls_cert else None
    try:
        assoc = ae.associate(
            host, settings.dicom_port, ae_title=settings.ae_title, tls_args=(tls, None) if tls else None
        )
        if assoc.is_rejected:
            return EchoAnswer(
                "refused",
                f"{where} answers; it refused the probe's association (calling AE "
                f"{settings.ae_title} not allowed, or its association limit reached)",
            )
        if not assoc.is_established:
            alert = _tls_refusal(host, settings.dicom_port, tls, timeout) if tls is not None else None
            if alert is not None:
                return EchoAnswer(
                    "refused",
                    f"{where} answers TLS; it refused the probe's certificate ({alert}): the probe presents "
                    "the receiver's own, which is no caller's unless the CA of dicom_tls_ca signed it for clients",
                )
            return EchoAnswer("none", f"no DICOM answer from {where}")
        theirs = str(assoc.acceptor.implementation_version_name or "").strip()
        unnamed = theirs.startswith(PYNETDICOM_NAME)  # a meddaemon started before its receiver named itself
        if theirs != implementation_version_name(settings) and not unnamed:
            assoc.release()
            program = f"implementation {theirs or 'unnamed'}, class {assoc.acceptor.implementation_class_uid}"
            return EchoAnswer(
                "foreign",
                f"{where} is answered by another program ({program}), not this daemon's receiver, which "
                "cannot listen there: senders' instances go to it",
            )
        associations.keep_answers(assoc)
        status = assoc.send_c_echo()
        assoc.release()
    finally:
        ae.shutdown()
    if "Status" in status and int(status.Status) == SUCCESS:
        if unnamed:
            return EchoAnswer(
                "echoed",
                f"{where} answers C-ECHO, without naming itself as this daemon's receiver (a daemon started "
                "before an upgrade: restart it to have it named)",
            )
        return EchoAnswer("echoed", f"{where} answers C-ECHO")
    return EchoAnswer("none", f"{where} accepted the association but did not answer the C-ECHO")


def _probe_tls(settings: Settings) -> ssl.SSLContext:
    """The probe's TLS: the receiver's certificate is not verified (the probe asks whether this host's
    own receiver answers; ``dicom_tls_ca`` is the callers' CA, not the one that signed it), and where
    callers must present one, the probe presents the receiver's own, the only one it has."""
    tls = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    tls.check_hostname = False
    tls.verify_mode = ssl.CERT_NONE
    if settings.dicom_tls_ca:
        load_tls_identity(tls, settings)
    return tls


def _tls_refusal(host: str, port: int, tls: ssl.SSLContext, timeout: float) -> str | None:
    """The TLS alert with which the receiver refused the probe's certificate, if it did: proof that it
    listens and speaks TLS, as a rejected association is. (TLS 1.3 sends the verdict on a client's
    certificate after the handshake, hence the read.)"""
    try:
        with socket.create_connection((host, port), timeout) as raw, tls.wrap_socket(raw) as connection:
            connection.recv(1)
    except ssl.SSLError as exc:
        reason = exc.reason or ""
        return reason if "ALERT" in reason else None
    except OSError:
        return None
    return None


# -- the process -----------------------------------------------------------------------------------


class ReceiverProcess:
    """The receiver in a child process of the daemon: started with it, restarted (with backoff) if it
    dies, stopped with it; a child whose daemon was killed with -9 notices and exits."""

    def __init__(self, settings: Settings, node: str, limits: ConnectionLimits | None = None) -> None:
        self.settings = settings
        self.node = node
        self.limits = limits
        self.context = multiprocessing.get_context("forkserver")
        self.stats = ReceiverStats(self.context)
        #: found once, here: the daemon has loaded the decoder plugins already, the child need not
        self.syntaxes = accepted_transfer_syntaxes()
        self.process: Any = None
        self.stop_event: Any = None
        self.backoff = 1.0
        self.next_start = 0.0

    def start(self) -> None:
        self.stop_event = self.context.Event()
        self.process = self.context.Process(
            target=_process_main,
            args=(self.settings, self.node, self.limits, self.stats, self.stop_event, self.syntaxes),
            name="meddaemon-receiver",
            daemon=False,
        )
        start_child(self.process)
        log.info("DICOM receiver process started (pid %s)", self.process.pid)

    def alive(self) -> bool:
        return self.process is not None and child_runs(self.process)

    def keep(self) -> None:
        """Restart the process if it died: at once the first time, then after a doubling wait."""
        if self.alive() or time.monotonic() < self.next_start:
            return
        log.error("the DICOM receiver exited (code %s); restarting it", self.process.exitcode if self.process else None)
        self.stats.set("up", 0)
        self.stats.set("active", 0)
        self.next_start = time.monotonic() + self.backoff
        self.backoff = min(60.0, self.backoff * 2)
        self.start()

    def stop(self, timeout: float = 30.0) -> None:
        if self.process is None:
            return
        stop_child(self.process, self.stop_event, timeout, "the DICOM receiver", log)
        self.stats.set("up", 0)


def _process_main(
    settings: Settings,
    node: str,
    limits: ConnectionLimits | None,
    stats: ReceiverStats,
    stop: Any,
    syntaxes: list[UID],
) -> None:
    leave_stopping_to_the_parent(sigterm=True)  # the daemon stops it through ``stop``
    from meddaemon.db.engine import create_db_engine, session_factory
    from meddaemon.logs import setup_logging

    setup_logging(settings.log_level)
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    engine = create_db_engine(settings.db_url, settings.busy_timeout, limits)
    receiver = Receiver(settings, session_factory(engine), node, stats, syntaxes=syntaxes)
    parent = multiprocessing.parent_process()
    try:
        receiver.start(bind_seconds=BIND_SECONDS)
    except OSError as exc:
        log.error(
            "the DICOM receiver cannot listen on %s:%d: %s",
            settings.dicom_host,
            settings.dicom_port,
            exc.strerror or exc,
        )
        engine.dispose()
        raise SystemExit(1) from None
    try:
        while not stop.wait(0.5):
            if parent is not None and not parent.is_alive():
                log.warning("the daemon is gone; the DICOM receiver stops")
                break
    finally:
        receiver.stop()
        engine.dispose()
