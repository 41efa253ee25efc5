"""Reading one file in place, in a worker process: its SHA-256, and, unless the model version has
scored those bytes already, its decoded metadata and model input; or the daemon's reason code.

The file is read as the daemon reads its inbox (``files.read_whole``: read-only, never locked, never
written), but without updating its access time where the system allows it, and following symbolic
links (a dataset is the user's own tree, not an inbox).
Takes and returns plain picklable data: it runs in the local engine's processes and in Ray tasks.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from meddaemon.engine.decode import DecodeOptions, decode_bytes
from meddaemon.engine.decode.types import ScanMetadata
from meddaemon.engine.preprocess import to_model_input
from meddaemon.engine.tasks import InputContract
from meddaemon.failures import FailureReason, ScanFailure, kept
from meddaemon.files import read_whole


@dataclass
class FileRead:
    """One file as a worker read it. ``known``: the SHA-256 is among those the model version scored
    before, so nothing was decoded (the driver checks the full hash against the database)."""

    path: str
    sha256: str | None = None
    size: int = 0
    metadata: ScanMetadata | None = None
    #: float32 (N, C, H, W) for the model; None when known or failed
    inputs: np.ndarray | None = None
    failure: ScanFailure | None = None
    known: bool = False


def sha_prefix(sha256: str) -> int:
    """The first 64 bits of a SHA-256 as an unsigned integer: what workers are told of the scored
    set (8 bytes a file, whatever the cohort)."""
    return int(sha256[:16], 16)


def prefixes(shas: Sequence[str]) -> np.ndarray:
    return np.unique(np.fromiter((sha_prefix(s) for s in shas), dtype=np.uint64, count=len(shas)))


def _is_known(sha256: str, scored: np.ndarray) -> bool:
    if not len(scored):
        return False
    key = np.uint64(sha_prefix(sha256))
    at = int(np.searchsorted(scored, key))
    return at < len(scored) and scored[at] == key


def read_file(
    path: str, contract: InputContract, options: DecodeOptions, scored: np.ndarray, decode: bool = True
) -> FileRead:
    """``path`` read, hashed and (when not known, and ``decode``) turned into the model's input."""
    try:
        data, _ = read_whole(path, follow_symlinks=True, keep_atime=True, max_bytes=options.max_file_bytes)
    except ScanFailure as failure:
        return FileRead(path, failure=kept(failure))
    if not data:
        return FileRead(path, failure=ScanFailure(FailureReason.EMPTY_FILE, "the file is empty (0 bytes)"))
    read = FileRead(path, sha256=hashlib.sha256(data).hexdigest(), size=len(data))
    if decode and _is_known(read.sha256, scored):  # type: ignore[arg-type]
        read.known = True
        return read
    if not decode:
        return read
    try:
        decoded = decode_bytes(data, options)
        read.metadata = decoded.metadata
        read.inputs = to_model_input(decoded, contract)
    except ScanFailure as failure:
        read.failure = kept(failure)
    except MemoryError:
        read.failure = ScanFailure(FailureReason.TOO_MANY_PIXELS, "decoding ran out of memory")
    except Exception as exc:  # a decoder bug must not stop the run
        read.failure = ScanFailure(FailureReason.INTERNAL_ERROR, f"decoding raised {type(exc).__name__}")
    return read


def read_chunk(
    paths: Sequence[str], contract: InputContract, options: DecodeOptions, scored: np.ndarray | None = None
) -> list[FileRead]:
    table = _SCORED if scored is None else scored
    return [read_file(p, contract, options, table) for p in paths]


#: the scored set of the worker process, set once by :func:`init_reader`
_SCORED: np.ndarray = np.zeros(0, dtype=np.uint64)


def init_reader(scored: np.ndarray) -> None:
    """Worker initialiser: Ctrl-C goes to the driver; one torch thread; the scored set."""
    from meddaemon.daemon.intake import init_worker

    global _SCORED
    init_worker()
    _SCORED = scored
