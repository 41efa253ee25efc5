"""Reading one stable file: identity (SHA-256), decoding, metadata, its task and, when a model for
that task is served, the model's input tensor; or the named reason it fails.

Runs in worker processes (pydicom's configuration is process-global and not thread-safe), so it
takes and returns plain picklable data and touches neither the database nor the inbox layout.
The daemon's loop keeps running batches through the model meanwhile.
"""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np

from meddaemon.daemon.router import Route, RoutingPolicy, route_scan
from meddaemon.daemon.stability import Signature
from meddaemon.engine.decode import DecodeOptions, decode_bytes, failed_scan_metadata
from meddaemon.engine.decode.types import DecodedScan, ScanMetadata
from meddaemon.engine.tasks import InputContract
from meddaemon.failures import FailureReason, ReadLater, ScanFailure, kept
from meddaemon.files import read_whole, unreadable
from meddaemon.logs import quiet_libraries
from meddaemon.processes import end_with_the_parent, leave_stopping_to_the_parent


@dataclass(frozen=True)
class IntakeContext:
    decode: DecodeOptions
    routing: RoutingPolicy
    #: input contracts of the models being served, by task
    contracts: Mapping[str, InputContract]


@dataclass
class Intake:
    path: Path
    size: int = 0
    sha256: str | None = None
    metadata: ScanMetadata | None = None
    route: Route | None = None
    #: float32 (N, C, H, W) for the served model of the scan's task; None when no model is served
    model_input: np.ndarray | None = None
    #: the contract ``model_input`` was made for: the version served when the read was handed out
    prepared_for: InputContract | None = None
    failure: ScanFailure | None = None
    #: The file changed while it was read: not complete after all, back to the stability tracker.
    changed: bool = False
    #: Why it could not be read now, for a passing reason of the host (``ReadLater``): back to the
    #: stability tracker too, to be read again.
    read_later: str | None = None
    #: Why it is not read at all and left where it is: its folder became a symbolic link, so the
    #: path names a file outside the inbox, which is neither read nor moved (nor failed: that
    #: would move it into failed/)
    left_alone: str | None = None
    decoded: DecodedScan | None = field(default=None, repr=False)


def read_file(path: Path, name: PurePosixPath, expected: Signature | None, context: IntakeContext) -> Intake:
    linked = _linked_folder(path, name)
    if linked is not None:
        return Intake(path, left_alone=f"its folder {linked}/ is now a symbolic link, which the inbox does not follow")
    try:
        intake = _read(path, expected, context.decode)
    except ReadLater as later:
        return Intake(path, changed=True, read_later=later.message)
    except ScanFailure as failure:
        return Intake(path, failure=kept(failure))
    if intake.failure is None and intake.metadata is not None and intake.decoded is not None:
        _route_and_prepare(intake, name, intake.decoded, context)
    intake.decoded = None  # pixels stay in the worker; only the model input travels
    return intake


def read_files(files: Sequence[tuple[Path, PurePosixPath, Signature | None]], context: IntakeContext) -> list[Intake]:
    """``read_file`` for several files, in one task of a decoding worker: a task's trip to a worker
    and back (the pool's queues, locks and pickling) cost the daemon 320 to 400 us of CPU when each
    file was a task of its own, 180 to 190 us a file in tasks of eight (benchmarks/README.md)."""
    return [read_file(path, name, expected, context) for path, name, expected in files]


def prepare_stored(
    path: Path, contract: InputContract, options: DecodeOptions, sha256: str | None = None
) -> np.ndarray | ScanFailure:
    """The model input of a registered scan, read again from work/ (after a restart or a promotion).

    With ``sha256``, the bytes must still be those registered: a writer that kept the file open past
    its stability window could write through its handle into the work copy, whose other image (or
    10 bytes) was then inferred as the scan registered."""
    try:
        with open(path, "rb") as handle:
            data = handle.read()
        if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256:
            return ScanFailure(
                FailureReason.CHANGED_AFTER_REGISTRATION,
                f"the registered copy's bytes changed since it was registered ({len(data)} bytes now); kept as it is",
            )
        return _to_model_input(decode_bytes(data, options), contract)
    except ScanFailure as failure:
        return kept(failure)
    except FileNotFoundError:
        return ScanFailure(FailureReason.VANISHED, f"the registered copy {path.name} is missing")
    except OSError as exc:
        return unreadable("cannot read the registered copy", exc)
    except Exception as exc:
        return ScanFailure(FailureReason.INTERNAL_ERROR, f"preparing the input raised {type(exc).__name__}")


def _route_and_prepare(intake: Intake, name: PurePosixPath, decoded: DecodedScan, context: IntakeContext) -> None:
    policy = context.routing
    assert intake.metadata is not None
    intake.route = route_scan(name, intake.metadata, policy.rules, policy.known_tasks, policy.default_task)
    if intake.route.task is None:
        intake.failure = ScanFailure(FailureReason.UNROUTABLE, intake.route.why)
        return
    contract = context.contracts.get(intake.route.task)
    if contract is not None:
        try:
            intake.model_input = _to_model_input(decoded, contract)
            intake.prepared_for = contract
        except ScanFailure as failure:
            intake.failure = kept(failure)


def _to_model_input(decoded: DecodedScan, contract: InputContract) -> np.ndarray:
    """``engine.preprocess.to_model_input``, imported on first use: it needs torch, and a daemon with
    no model to serve (``--once`` on an empty inbox) never imports torch."""
    from meddaemon.engine import preprocess

    return preprocess.to_model_input(decoded, contract)


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
        raise ScanFailure(
            FailureReason.UNREADABLE, f"the file has no read permission (mode {stat.S_IMODE(st.st_mode):03o})"
        )

    data, after = read_whole(path, max_bytes=options.max_file_bytes)
    if expected is not None and Signature.of(after) != expected:
        return Intake(path, changed=True)
    intake = Intake(path, size=len(data), sha256=hashlib.sha256(data).hexdigest())
    if not data:
        intake.failure = ScanFailure(FailureReason.EMPTY_FILE, "the file is empty (0 bytes)")
        return intake
    try:
        intake.decoded = decode_bytes(data, options)
        intake.metadata = intake.decoded.metadata
    except ScanFailure as failure:
        intake.failure = kept(failure)
        intake.metadata = failed_scan_metadata(data, options)
    except MemoryError:
        intake.failure = ScanFailure(FailureReason.TOO_MANY_PIXELS, "decoding ran out of memory")
    except Exception as exc:  # a decoder bug must not take the daemon down
        intake.failure = ScanFailure(FailureReason.INTERNAL_ERROR, f"decoder raised {type(exc).__name__}")
    return intake


def _linked_folder(path: Path, name: PurePosixPath) -> str | None:
    """The first folder of ``name`` (the path of ``path`` under the inbox) that is a symbolic link
    now, or None. The rescan never walks into a linked folder, but a folder replaced by a link
    while one of its files waited out its stability window left that path naming a file of the
    link's target, outside the inbox, which was read and moved into work/."""
    root = Path(*path.parts[: len(path.parts) - len(name.parts)])
    folder = root
    for part in name.parent.parts:
        folder = folder / part
        if folder.is_symlink():
            return folder.relative_to(root).as_posix()
    return None


def _points_outside(link: Path) -> bool:
    target = Path(os.path.realpath(link))
    return link.parent.resolve() not in target.parents


def init_worker() -> None:
    """Worker initialiser: Ctrl-C goes to the daemon, which stops its workers in order.

    One torch thread per worker: the workers share the cores with the forward pass, and two OpenMP
    threads in a busy worker wait for each other (preprocessing went from 0.5 to 31 ms a scan).
    """
    leave_stopping_to_the_parent()
    end_with_the_parent()
    quiet_libraries()
    import torch

    torch.set_num_threads(1)
