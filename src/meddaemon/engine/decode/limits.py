"""Sizes checked before anything is decoded, where a few bytes can ask for gigabytes.

- A Deflated Explicit VR Little Endian dataset is inflated whole by pydicom before any element is
  read: deflate expands up to about 1000:1, so 1 MB of file held a dataset of 1 GiB (2 GB of the
  worker's memory, then a 64 x 64 image). :func:`check_inflated_size` inflates it in chunks,
  counting, and keeps nothing.
- A JPEG, JPEG-LS or JPEG 2000 codec decodes the size its codestream declares, not the header's
  Rows and Columns (which ``max_pixels`` is checked against): a 6.7 MB JPEG of 24000 x 24000 under a
  header of 64 x 64 was decoded (2.2 GB) before pydicom found the two apart. :func:`codestream_size`
  reads the size from the stream's own header.
"""

from __future__ import annotations

import io
import struct
import zlib

from pydicom.filereader import _read_file_meta_info, read_preamble
from pydicom.uid import DeflatedExplicitVRLittleEndian

from meddaemon.failures import FailureReason, ScanFailure

#: inflated per step of the count
_CHUNK = 1 << 20
#: JPEG's start-of-frame markers (SOF0 to SOF15 but DHT, JPG and DAC) and JPEG-LS's SOF55
_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC} | {0xF7}
#: markers without a length: TEM, RST0-7 (SOI and EOI are not met before the frame header)
_NO_LENGTH = frozenset({0x01, *range(0xD0, 0xD8)})


def check_inflated_size(data: bytes, limit: int) -> None:
    """Refuse (``too_many_pixels``) a Part 10 file whose Deflated dataset inflates to more than
    ``limit`` bytes; anything else (another transfer syntax, no File Meta, a stream that is not
    deflate's) is left for pydicom to read and say what is wrong."""
    stream = io.BytesIO(data)
    try:
        read_preamble(stream, force=True)  # as the file is read: without its preamble too
        meta = _read_file_meta_info(stream)
    except Exception:
        return
    if meta.get("TransferSyntaxUID") != DeflatedExplicitVRLittleEndian:
        return
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    total = 0
    try:
        for at in range(stream.tell(), len(data), _CHUNK):
            pending: bytes = data[at : at + _CHUNK]
            while True:  # each piece given whole, its output taken a chunk at a time
                inflated = len(inflater.decompress(pending, _CHUNK))
                total += inflated
                if total > limit:
                    raise ScanFailure(
                        FailureReason.TOO_MANY_PIXELS,
                        f"its Deflated dataset inflates to more than {limit} bytes, more than max_pixels allows",
                    )
                if inflater.eof:  # what follows the stream (a NUL padding it to even length) is not deflate's
                    return
                pending = inflater.unconsumed_tail
                if not pending and inflated < _CHUNK:
                    break
    except zlib.error:  # not deflate's: pydicom's read names it
        return


def codestream_size(frame: bytes) -> tuple[int, int] | None:
    """(rows, columns) a JPEG, JPEG-LS or JPEG 2000 (HTJ2K too) codestream declares in its own
    header; None for any other stream, or one whose header cannot be read (its decoder says why)."""
    try:
        if frame[:2] == b"\xff\xd8":
            return _jpeg_size(frame)
        start = _j2k_start(frame)
        if frame[start : start + 4] == b"\xff\x4f\xff\x51":  # SOC, then SIZ: ISO/IEC 15444-1 A.5.1
            width, height, x0, y0 = struct.unpack(">IIII", frame[start + 8 : start + 24])
            return height - y0, width - x0
    except (struct.error, IndexError):
        return None
    return None


def _jpeg_size(frame: bytes) -> tuple[int, int] | None:
    offset = 2
    while offset + 4 <= len(frame):
        if frame[offset] != 0xFF:
            return None
        marker = frame[offset + 1]
        if marker == 0xFF:  # fill bytes before a marker
            offset += 1
            continue
        if marker in _NO_LENGTH:
            offset += 2
            continue
        if marker in _SOF:
            height, width = struct.unpack(">HH", frame[offset + 5 : offset + 9])
            return (height, width) if height else None  # 0: a DNL segment after the first scan says it
        (length,) = struct.unpack(">H", frame[offset + 2 : offset + 4])
        offset += 2 + length
    return None


def _j2k_start(frame: bytes) -> int:
    """Where the codestream begins: 0, or inside a JP2 file's ``jp2c`` box."""
    if not frame.startswith(b"\x00\x00\x00\x0c\x6a\x50\x20\x20"):
        return 0
    offset = 0
    while offset + 8 <= len(frame):
        (length,) = struct.unpack(">I", frame[offset : offset + 4])
        if frame[offset + 4 : offset + 8] == b"jp2c":
            return offset + 8
        if length < 8:
            break
        offset += length
    return len(frame)
