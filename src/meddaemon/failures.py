"""Why a scan failed: the named reasons every stage reports, and the one exception that carries them.

A reason is a stable code (stored in the DB, written to ``failed/<name>.reason.json``, counted by
``meddaemon status``); the message is a sentence for a person. Messages never contain PHI.
"""

from __future__ import annotations

from enum import StrEnum


class FailureReason(StrEnum):
    # the file itself
    EMPTY_FILE = "empty_file"
    UNREADABLE = "unreadable"
    VANISHED = "vanished"
    SYMLINK_NOT_FOLLOWED = "symlink_not_followed"
    TOO_LARGE = "too_large"
    # its format
    UNRECOGNISED_FORMAT = "unrecognised_format"
    CORRUPT_IMAGE = "corrupt_image"
    TRUNCATED_IMAGE = "truncated_image"
    TOO_MANY_PIXELS = "too_many_pixels"
    # DICOM specifics
    DICOMDIR = "dicomdir"
    #: an object meddaemon itself wrote (its SR, Parametric Map, Secondary Capture, PDF), come back
    OWN_OUTPUT = "own_output"
    NO_PIXEL_DATA = "no_pixel_data"
    TRUNCATED_PIXEL_DATA = "truncated_pixel_data"
    UNSUPPORTED_TRANSFER_SYNTAX = "unsupported_transfer_syntax"
    UNSUPPORTED_PHOTOMETRIC = "unsupported_photometric"
    PIXEL_DECODE_ERROR = "pixel_decode_error"
    # after decoding
    UNROUTABLE = "unroutable"
    CONTRACT_MISMATCH = "contract_mismatch"
    NON_FINITE_OUTPUT = "non_finite_output"
    DECODER_CRASHED = "decoder_crashed"
    #: its read had not ended after ``read_timeout_seconds``, alone in a decoding worker (killed then)
    DECODE_TIMEOUT = "decode_timeout"
    CHANGED_AFTER_REGISTRATION = "changed_after_registration"
    INTERNAL_ERROR = "internal_error"


#: Reasons that say a file is no image at all, not a damaged one (a PACS export holds SRs, key-object
#: notes and meddaemon's own results beside the images): a cohort or a training dataset leaves such
#: files out, listed, without counting them toward the unreadable share that stops a run.
NOT_AN_IMAGE = frozenset({FailureReason.DICOMDIR, FailureReason.NO_PIXEL_DATA, FailureReason.OWN_OUTPUT})

#: Reasons that say decoding the file took its decoding worker down with it: no one decodes it again
#: in a process that matters (the console shows no picture of it).
HARMS_ITS_DECODER = frozenset({FailureReason.DECODER_CRASHED, FailureReason.DECODE_TIMEOUT})

#: Reasons that say the daemon could not decode the file into an image, under the limits and with the
#: decoders the console has too: the console shows no picture of it (it showed a broken image).
#: Not ``unreadable`` (permissions may have been mended since) nor ``own_output`` (an image meddaemon wrote).
NEVER_DECODED = frozenset(
    {
        FailureReason.EMPTY_FILE,
        FailureReason.VANISHED,
        FailureReason.SYMLINK_NOT_FOLLOWED,
        FailureReason.TOO_LARGE,
        FailureReason.UNRECOGNISED_FORMAT,
        FailureReason.CORRUPT_IMAGE,
        FailureReason.TRUNCATED_IMAGE,
        FailureReason.TOO_MANY_PIXELS,
        FailureReason.DICOMDIR,
        FailureReason.NO_PIXEL_DATA,
        FailureReason.TRUNCATED_PIXEL_DATA,
        FailureReason.UNSUPPORTED_TRANSFER_SYNTAX,
        FailureReason.UNSUPPORTED_PHOTOMETRIC,
        FailureReason.PIXEL_DECODE_ERROR,
    }
)

#: the BaseExceptions that stop a process on purpose. Any other that is no Exception came from a
#: native decoder (pyo3's PanicException, a Rust codec's panic on corrupt RLE): that file's failure.
STOPPING = (KeyboardInterrupt, SystemExit, GeneratorExit)


class ScanFailure(Exception):
    """A scan cannot go on: ``reason`` says why in a code, ``message`` in words."""

    def __init__(self, reason: FailureReason, message: str) -> None:
        super().__init__(f"{reason.value}: {message}")
        self.reason = reason
        self.message = message

    def __reduce__(self) -> tuple[type[ScanFailure], tuple[FailureReason, str]]:
        return (type(self), (self.reason, self.message))


def kept(failure: ScanFailure) -> ScanFailure:
    """``failure``, to be kept past its ``except``: without its traceback and the exceptions chained
    to it, whose frames hold the file's bytes and its decoded dataset. A failed read held them (2.9 GB
    for a 700 KB deflated file) in its worker until a full garbage collection, as the frames and the
    result keeping the failure form a cycle."""
    failure.__traceback__ = None
    failure.__context__ = None
    failure.__cause__ = None
    return failure


class ReadLater(ScanFailure):
    """A file that could not be read for a passing reason of this host, not of the file: out of file
    descriptors or memory, a stale handle on a share. The daemon reads it again later (failed, it
    stayed failed, ``unreadable``, after the shortage had passed); a one-off read fails it."""
