"""Reading one stable file: identity (SHA-256), decoding and metadata, or the named reason it fails.

Runs in worker processes (pydicom's configuration is process-global and not thread-safe), so it
takes and returns plain picklable data and touches neither the database nor the inbox layout.
"""

from __future__ import annotations

import hashlib
import logging
import os
import signal
import stat
import warnings
from dataclasses import dataclass
from pathlib import Path

from meddaemon.daemon.stability import Signature
from meddaemon.engine.decode import DecodeOptions, decode_bytes
from meddaemon.engine.decode.types import ScanMetadata
from meddaemon.failures import FailureReason, ScanFailure


@dataclass
class Intake:
    path: Path
    size: int = 0
    sha256: str | None = None
    metadata: ScanMetadata | None = None
    failure: ScanFailure | None = None
    #: The file changed while it was read: not complete after all, back to the stability tracker.
    changed: bool = False


def read_file(path: Path, expected: Signature | None, options: DecodeOptions) -> Intake:
    try:
        return _read(path, expected, options)
    except ScanFailure as failure:
        return Intake(path, failure=failure)


def _read(path: Path, expected: Signature | None, options: DecodeOptions) -> Intake:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        raise ScanFailure(FailureReason.VANISHED, "the file was deleted before it could be read") from None
    if stat.S_ISLNK(st.st_mode):
        where = "outside" if _points_outside(path) else "inside"
        raise ScanFailure(
            FailureReason.SYMLINK_NOT_FOLLOWED,
            f"symbolic links are not followed (this one points {where} the inbox folder)",
        )
    if not stat.S_ISREG(st.st_mode):
        raise ScanFailure(FailureReason.UNREADABLE, "not a regular file")
    if st.st_mode & 0o444 == 0:
        raise ScanFailure(FailureReason.UNREADABLE, "the file has no read permission (mode 000)")

    data, after = _read_bytes(path)
    if expected is not None and Signature.of(after) != expected:
        return Intake(path, changed=True)
    intake = Intake(path, size=len(data), sha256=hashlib.sha256(data).hexdigest())
    if not data:
        intake.failure = ScanFailure(FailureReason.EMPTY_FILE, "the file is empty (0 bytes)")
        return intake
    try:
        intake.metadata = decode_bytes(data, options).metadata
    except ScanFailure as failure:
        intake.failure = failure
    except MemoryError:
        intake.failure = ScanFailure(FailureReason.TOO_MANY_PIXELS, "decoding ran out of memory")
    except Exception as exc:  # a decoder bug must not take the daemon down
        intake.failure = ScanFailure(FailureReason.INTERNAL_ERROR, f"decoder raised {type(exc).__name__}")
    return intake


def _read_bytes(path: Path) -> tuple[bytes, os.stat_result]:
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise ScanFailure(FailureReason.VANISHED, "the file was deleted before it could be read") from None
    except PermissionError:
        raise ScanFailure(FailureReason.UNREADABLE, "permission denied") from None
    except OSError as exc:
        raise ScanFailure(FailureReason.UNREADABLE, f"cannot open the file: {exc.strerror}") from None
    try:
        with os.fdopen(fd, "rb") as handle:
            data = handle.read()
            return data, os.fstat(handle.fileno())
    except OSError as exc:
        raise ScanFailure(FailureReason.UNREADABLE, f"cannot read the file: {exc.strerror}") from None


def _points_outside(link: Path) -> bool:
    target = Path(os.path.realpath(link))
    return link.parent.resolve() not in target.parents


def quiet_pydicom() -> None:
    """pydicom's warnings and log lines quote element values, patient names among them: PHI stays out."""
    warnings.filterwarnings("ignore", module=r"pydicom(\..*)?")
    warnings.filterwarnings("ignore", category=UserWarning, message=r".*(VR|value|Invalid|Expected).*")
    logging.getLogger("pydicom").setLevel(logging.CRITICAL)


def init_worker() -> None:
    """Worker initialiser: Ctrl-C goes to the daemon, which stops its workers in order."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    quiet_pydicom()
