"""Decoding: bytes in, display-ready pixels and metadata out (docs/design.md section 4).

The format is told from the content, never from the file name. Every failure is a
:class:`~meddaemon.failures.ScanFailure` with a named reason; nothing else escapes.
"""

from __future__ import annotations

from meddaemon.engine.decode.dicom import (
    TransferSyntaxSupport,
    decodable_transfer_syntaxes,
    decode_dicom,
    has_dicom_signature,
    header_metadata,
    looks_like_bare_dicom,
)
from meddaemon.engine.decode.raster import decode_raster, sniff_raster
from meddaemon.engine.decode.types import (
    PHI_FIELDS,
    DecodedScan,
    DecodeOptions,
    FramePolicy,
    ImageFormat,
    ScanMetadata,
)
from meddaemon.failures import STOPPING, FailureReason, ScanFailure

__all__ = [
    "PHI_FIELDS",
    "SNIFF_BYTES",
    "DecodeOptions",
    "DecodedScan",
    "FramePolicy",
    "ImageFormat",
    "ScanMetadata",
    "TransferSyntaxSupport",
    "decodable_transfer_syntaxes",
    "decode_bytes",
    "failed_scan_metadata",
    "sniff_format",
]

#: How many leading bytes :func:`sniff_format` needs (the DICOM preamble, "DICM", one element).
SNIFF_BYTES = 144


def sniff_format(head: bytes) -> ImageFormat | None:
    """The format the leading bytes announce, or None. DICOM's "DICM" at offset 128 wins over a
    TIFF signature in its preamble (dual-personality files); DICOM without a preamble is
    recognised by its first element, and confirmed by :func:`decode_bytes` parsing it."""
    if has_dicom_signature(head):
        return "dicom"
    raster = sniff_raster(head)
    if raster is not None:
        return raster
    if looks_like_bare_dicom(head):
        return "dicom"
    return None


def failed_scan_metadata(data: bytes, options: DecodeOptions = DecodeOptions()) -> ScanMetadata | None:
    """What a DICOM file that failed to decode still says of itself (``dicom.header_metadata``);
    None for other formats."""
    return header_metadata(data, options) if sniff_format(data[:SNIFF_BYTES]) == "dicom" else None


def decode_bytes(data: bytes, options: DecodeOptions = DecodeOptions()) -> DecodedScan:
    """Decode one scan held in ``data``.

    Raises :class:`ScanFailure` only: named reasons for what is wrong with the input,
    ``too_many_pixels`` also when memory runs out, ``internal_error`` for a bug.
    """
    if not data:
        raise ScanFailure(FailureReason.EMPTY_FILE, "the file is empty (0 bytes)")
    fmt = sniff_format(data[:SNIFF_BYTES])
    if fmt is None:
        raise ScanFailure(FailureReason.UNRECOGNISED_FORMAT, "the bytes are not DICOM, PNG, JPEG or TIFF")
    try:
        if fmt == "dicom":
            return decode_dicom(data, options)
        return decode_raster(data, fmt, options)
    except ScanFailure:
        raise
    except MemoryError as exc:
        raise ScanFailure(FailureReason.TOO_MANY_PIXELS, f"memory ran out while decoding the {fmt} image") from exc
    except STOPPING:
        raise
    except BaseException as exc:  # a native decoder's panic too (``STOPPING``)
        raise ScanFailure(
            FailureReason.INTERNAL_ERROR,
            f"decoding the {fmt} file failed unexpectedly ({type(exc).__name__})",
        ) from exc
