"""Format detection by content, never by name, and the input that is no image at all."""

from __future__ import annotations

import io

import numpy as np
import pytest
from dicom_factory import gradient, write_dicom, write_png
from PIL import Image

from meddaemon.engine.decode import SNIFF_BYTES, decode_bytes, sniff_format
from meddaemon.failures import FailureReason, ScanFailure


def saved(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def reason(data: bytes) -> FailureReason:
    with pytest.raises(ScanFailure) as caught:
        decode_bytes(data)
    return caught.value.reason


@pytest.mark.parametrize(("fmt", "expected"), [("PNG", "png"), ("JPEG", "jpeg"), ("TIFF", "tiff")])
def test_raster_formats_are_told_by_their_signature(fmt, expected):
    data = saved(Image.fromarray(gradient(16, 16, dtype=np.uint8, top=255)), fmt)

    assert sniff_format(data[:SNIFF_BYTES]) == expected


def test_big_endian_tiff_signature_is_tiff():
    assert sniff_format(b"MM\x00*" + b"\x00" * 60) == "tiff"


def test_dicom_is_told_by_dicm_after_the_preamble(tmp_path):
    data = write_dicom(tmp_path / "a.dcm").read_bytes()

    assert sniff_format(data[:SNIFF_BYTES]) == "dicom"


def test_dicm_wins_over_a_tiff_signature_in_the_preamble(tmp_path):
    data = bytearray(write_dicom(tmp_path / "a.dcm").read_bytes())
    data[:4] = b"II*\x00"  # a dual-personality DICOM/TIFF file

    assert sniff_format(bytes(data[:SNIFF_BYTES])) == "dicom"
    assert decode_bytes(bytes(data)).metadata.format == "dicom"


def test_dicom_without_preamble_is_told_by_its_first_element(tmp_path):
    with_meta = write_dicom(tmp_path / "m.dcm", preamble=False).read_bytes()
    bare = write_dicom(tmp_path / "b.dcm", preamble=False, with_file_meta=False).read_bytes()

    assert sniff_format(with_meta[:SNIFF_BYTES]) == "dicom"
    assert sniff_format(bare[:SNIFF_BYTES]) == "dicom"


def test_format_comes_from_content_not_from_the_file_name(tmp_path):
    png_named_dcm = write_png(tmp_path / "scan.dcm", gradient(16, 16, dtype=np.uint8, top=255))
    dicom_named_png = write_dicom(tmp_path / "scan.png")

    assert decode_bytes(png_named_dcm.read_bytes()).metadata.format == "png"
    assert decode_bytes(dicom_named_png.read_bytes()).metadata.format == "dicom"


def test_empty_input_is_named_empty_file():
    assert reason(b"") is FailureReason.EMPTY_FILE


@pytest.mark.parametrize("seed", range(8))
def test_random_bytes_are_named_unrecognised_format(seed):
    data = np.random.default_rng(seed).bytes(4096)

    assert sniff_format(data[:SNIFF_BYTES]) is None
    assert reason(data) is FailureReason.UNRECOGNISED_FORMAT


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("seed", range(8))
def test_random_bytes_after_a_dicom_like_first_tag_are_not_taken_for_dicom(seed):
    """Passing the cheap first-element check is not enough: the parse must yield a real object."""
    data = b"\x08\x00\x05\x00CS" + np.random.default_rng(seed).bytes(4096)

    assert sniff_format(data[:SNIFF_BYTES]) == "dicom"
    assert reason(data) is FailureReason.UNRECOGNISED_FORMAT


@pytest.mark.parametrize(
    "data",
    [b"hello, this is a text file\n" * 20, b"%PDF-1.7\n" + b"0" * 300, b"\x00" * 10, b"DICM"],
    ids=["text", "pdf", "zeros", "bare-DICM"],
)
def test_other_files_are_named_unrecognised_format(data):
    assert reason(data) is FailureReason.UNRECOGNISED_FORMAT
