"""Write real, synthetic DICOM and PNG files for tests.

Every file written here is synthetic: patient names are ``SYNTHETIC^...`` and each dataset carries
``ImageComments = "SYNTHETIC test data"``. Pixel values are stored exactly as given (the caller
passes stored values: YBR samples for ``YBR_FULL``, palette indices for ``PALETTE COLOR``), so a
test can compute what a decoder should return from the same array it wrote.
"""

from __future__ import annotations

import shutil
import struct
import tempfile
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from pydicom import dcmwrite
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.fileset import FileSet
from pydicom.sequence import Sequence
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    BasicTextSRStorage,
    ComputedRadiographyImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGBaseline8Bit,
    MultiFrameGrayscaleByteSecondaryCaptureImageStorage,
    MultiFrameGrayscaleWordSecondaryCaptureImageStorage,
    MultiFrameTrueColorSecondaryCaptureImageStorage,
    SecondaryCaptureImageStorage,
    UltrasoundMultiFrameImageStorage,
    generate_uid,
)

SYNTHETIC_COMMENT = "SYNTHETIC test data"
DEFAULT_PATIENT_NAME = "SYNTHETIC^PATIENT"
DEFAULT_PATIENT_ID = "SYNTH-0001"

_NATIVE = {ImplicitVRLittleEndian, ExplicitVRLittleEndian, ExplicitVRBigEndian}
#: Native pixel data in a dataset that pydicom deflates as a whole when writing.
_WRITTEN_AS_IS = _NATIVE | {DeflatedExplicitVRLittleEndian}
_PIXEL_DATA_TAGS = (b"\xe0\x7f\x10\x00", b"\x7f\xe0\x00\x10")
_PALETTE_DATA_KEYWORDS = tuple(
    f"{prefix}{colour}PaletteColorLookupTableData"
    for prefix in ("", "Segmented")
    for colour in ("Red", "Green", "Blue", "Alpha")
)
#: Sequences whose items hold a LUT Descriptor and LUT Data (US or OW).
_LUT_SEQUENCE_KEYWORDS = ("ModalityLUTSequence", "VOILUTSequence")


def gradient(rows: int = 64, columns: int = 64, *, dtype: Any = np.uint16, top: int = 4095) -> np.ndarray:
    """A deterministic diagonal gradient from 0 to ``top`` (every value distinct enough to compare)."""
    ramp = np.add.outer(np.arange(rows), np.arange(columns)).astype(np.float64)
    ramp *= top / max(1, rows + columns - 2)
    return np.rint(ramp).astype(dtype)


def synthetic_frames(frames: int, rows: int = 32, columns: int = 32) -> np.ndarray:
    """``frames`` distinct uint16 frames: frame ``i`` is a gradient plus ``100 * i``."""
    base = gradient(rows, columns, top=2000)
    return np.stack([base + np.uint16(100 * i) for i in range(frames)])


def _bits_stored(arr: np.ndarray) -> int:
    return 8 * arr.dtype.itemsize


def _sop_class(modality: str, frames: int, arr: np.ndarray, photometric: str) -> UID:
    if frames > 1:
        if modality == "US":
            return UltrasoundMultiFrameImageStorage
        if photometric not in ("MONOCHROME1", "MONOCHROME2"):
            return MultiFrameTrueColorSecondaryCaptureImageStorage
        if arr.dtype.itemsize == 1:
            return MultiFrameGrayscaleByteSecondaryCaptureImageStorage
        return MultiFrameGrayscaleWordSecondaryCaptureImageStorage
    if modality == "CR":
        return ComputedRadiographyImageStorage
    return SecondaryCaptureImageStorage


def _base_dataset(sop_class: UID, *, modality: str, patient_name: str, patient_id: str) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.StudyDate = "20240101"
    ds.StudyTime = "120000"
    ds.StudyID = "1"
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.AccessionNumber = "SYNTHACC01"
    ds.Modality = modality
    ds.Manufacturer = "SYNTHETIC"
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "O"
    ds.PatientAge = "054Y"
    ds.ImageComments = SYNTHETIC_COMMENT
    return ds


def _encode(ds: Dataset, transfer_syntax: UID, arr: np.ndarray) -> None:
    """Encode the pixel data of ``ds`` (already set, little endian) in ``transfer_syntax``."""
    if transfer_syntax == ExplicitVRBigEndian:
        ds.file_meta.TransferSyntaxUID = ExplicitVRBigEndian
        if arr.dtype.itemsize > 1:
            ds.PixelData = arr.astype(arr.dtype.newbyteorder(">")).tobytes()
            ds["PixelData"].VR = "OW"
        _palette_words_to_big_endian(ds)
        _lut_sequence_words_to_big_endian(ds)
        return
    if transfer_syntax in _WRITTEN_AS_IS:
        ds.file_meta.TransferSyntaxUID = transfer_syntax
        return
    ds.compress(transfer_syntax, generate_instance_uid=False)


def _add_palette(ds: Dataset, extra: Mapping[str, Any] | None) -> None:
    """A default 256-entry palette of 16-bit entries (red ramp, green inverse ramp, blue constant)
    unless ``extra`` gives one, plain or segmented."""
    if extra and any(keyword in extra for keyword in _PALETTE_DATA_KEYWORDS):
        return
    entries = 256
    ramp = np.linspace(0, 65535, entries).astype("<u2")
    luts = {"Red": ramp, "Green": ramp[::-1].copy(), "Blue": np.full(entries, 32768, "<u2")}
    for colour, lut in luts.items():
        setattr(ds, f"{colour}PaletteColorLookupTableDescriptor", [entries, 0, 16])
        setattr(ds, f"{colour}PaletteColorLookupTableData", lut.tobytes())


def _palette_words_to_big_endian(ds: Dataset) -> None:
    """Swap every (segmented) palette LUT's 16-bit words, given little endian, to big endian.

    pydicom writes OW values as the bytes it holds, so a big-endian file needs them swapped first;
    8-bit entries packed two to a word are swapped with their word, as any big-endian writer does.
    """
    for keyword in _PALETTE_DATA_KEYWORDS:
        if keyword in ds:
            words = bytes(ds[keyword].value)
            words += b"\x00" * (len(words) % 2)
            ds[keyword].value = np.frombuffer(words, "<u2").astype(">u2").tobytes()


def _lut_sequence_words_to_big_endian(ds: Dataset) -> None:
    """Swap the 16-bit words of every Modality and VOI LUT Sequence item's LUT Data given as
    little-endian bytes (written as OW) to big endian; LUT Data given as numbers (US) is left to
    pydicom, which writes numbers in the file's byte order."""
    for keyword in _LUT_SEQUENCE_KEYWORDS:
        for item in ds.get(keyword) or ():
            if "LUTData" in item and isinstance(item.LUTData, bytes):
                item.LUTData = np.frombuffer(item.LUTData, "<u2").astype(">u2").tobytes()


def _save(path: Path, ds: Dataset, *, preamble: bool, with_file_meta: bool) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    transfer_syntax = ds.file_meta.TransferSyntaxUID
    if preamble:
        ds.save_as(path, enforce_file_format=True)
        return path
    if not with_file_meta:
        if transfer_syntax not in _NATIVE:
            raise ValueError("a dataset without file meta can only be written in a native syntax")
        del ds.file_meta
        dcmwrite(
            path,
            ds,
            implicit_vr=transfer_syntax == ImplicitVRLittleEndian,
            little_endian=transfer_syntax != ExplicitVRBigEndian,
        )
        return path
    # The file meta group stays, only the 128-byte preamble and the "DICM" prefix go.
    ds.save_as(path, enforce_file_format=True)
    raw = path.read_bytes()
    assert raw[128:132] == b"DICM"
    path.write_bytes(raw[132:])
    return path


def write_dicom(
    path: str | Path,
    *,
    pixels: np.ndarray | None = None,
    modality: str = "CR",
    body_part: str = "CHEST",
    photometric: str = "MONOCHROME2",
    transfer_syntax: str = ExplicitVRLittleEndian,
    preamble: bool = True,
    with_file_meta: bool = True,
    patient_name: str = DEFAULT_PATIENT_NAME,
    patient_id: str = DEFAULT_PATIENT_ID,
    window: tuple[float, float] | None = None,
    rescale: tuple[float, float] | None = None,
    frames: int | None = None,
    bits_stored: int | None = None,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write a synthetic image dataset and return its path.

    ``pixels`` holds stored values: (rows, cols) grey, (rows, cols, 3) colour, with a leading frame
    axis for multi-frame. Without ``pixels`` a 64x64 uint16 gradient is written, or ``frames``
    distinct 32x32 frames when ``frames`` is given. ``window`` is (center, width), ``rescale`` is
    (slope, intercept). ``preamble=False`` drops the 128-byte preamble and "DICM";
    ``with_file_meta=False`` also drops the file meta group (an ACR-NEMA style bare dataset).
    ``extra`` sets any further keyword (after everything else, so it can override).
    """
    path = Path(path)
    transfer_syntax = UID(transfer_syntax)
    if pixels is None:
        pixels = synthetic_frames(frames) if frames and frames > 1 else gradient()
    arr = np.ascontiguousarray(pixels)
    colour = photometric in ("RGB", "YBR_FULL", "YBR_FULL_422")
    n_frames = arr.shape[0] if arr.ndim == (4 if colour else 3) else 1
    if frames is not None and frames != n_frames:
        raise ValueError(f"frames={frames} but pixels hold {n_frames} frame(s)")

    ds = _base_dataset(
        _sop_class(modality, n_frames, arr, photometric),
        modality=modality,
        patient_name=patient_name,
        patient_id=patient_id,
    )
    ds.BodyPartExamined = body_part
    if modality == "SC" or ds.SOPClassUID == SecondaryCaptureImageStorage:
        ds.ConversionType = "WSD"
    ds.set_pixel_data(arr, photometric, bits_stored or _bits_stored(arr), generate_instance_uid=False)
    if n_frames > 1:
        ds.FrameIncrementPointer = 0x00181063
        ds.FrameTime = 33.3
    if photometric == "PALETTE COLOR":
        _add_palette(ds, extra)
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    if rescale is not None:
        ds.RescaleSlope, ds.RescaleIntercept = rescale
        ds.RescaleType = "US"
    for keyword, value in (extra or {}).items():
        setattr(ds, keyword, value)
    _encode(ds, transfer_syntax, arr)
    return _save(path, ds, preamble=preamble, with_file_meta=with_file_meta)


def write_structured_report(path: str | Path) -> Path:
    """A Basic Text SR: a valid DICOM object with no pixel data at all."""
    path = Path(path)
    ds = _base_dataset(
        BasicTextSRStorage, modality="SR", patient_name=DEFAULT_PATIENT_NAME, patient_id=DEFAULT_PATIENT_ID
    )
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.ValueType = "CONTAINER"
    ds.ContinuityOfContent = "SEPARATE"
    ds.CompletionFlag = "COMPLETE"
    ds.VerificationFlag = "UNVERIFIED"
    title = Dataset()
    title.CodeValue, title.CodingSchemeDesignator, title.CodeMeaning = "121070", "DCM", "Findings"
    ds.ConceptNameCodeSequence = Sequence([title])
    finding = Dataset()
    finding.RelationshipType = "CONTAINS"
    finding.ValueType = "TEXT"
    finding.ConceptNameCodeSequence = Sequence([title])
    finding.TextValue = "SYNTHETIC finding, no pixels here."
    ds.ContentSequence = Sequence([finding])
    return _save(path, ds, preamble=True, with_file_meta=True)


def write_dicomdir(path: str | Path) -> Path:
    """A real DICOMDIR (written by pydicom's FileSet) indexing one synthetic instance.

    The DICOMDIR is written at ``path``; when ``path`` is not named ``DICOMDIR`` the file set is
    built in a temporary folder and only its DICOMDIR is copied (the referenced file is not).
    """
    path = Path(path)
    with tempfile.TemporaryDirectory() as tmp:
        instance = write_dicom(Path(tmp) / "instance.dcm")
        fs = FileSet()
        fs.add(str(instance))
        target = path.parent if path.name == "DICOMDIR" else Path(tmp) / "fileset"
        fs.write(target)
        if path.name != "DICOMDIR":
            path.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(target / "DICOMDIR", path)
    return path


def truncate_pixel_data(src: str | Path, dst: str | Path, keep_fraction: float = 0.5) -> Path:
    """Copy ``src`` to ``dst`` cut inside its Pixel Data value, keeping ``keep_fraction`` of it.

    The element's declared length is left as it was, so the file claims more pixel bytes than
    it has: what a transfer interrupted mid-file leaves behind.
    """
    raw = Path(src).read_bytes()
    start = max(raw.rfind(tag) for tag in _PIXEL_DATA_TAGS)
    if start < 0:
        raise ValueError(f"{src} has no Pixel Data element")
    vr = raw[start + 4 : start + 6]
    if vr in (b"OB", b"OW"):
        value_start = start + 12
        (length,) = struct.unpack("<I" if raw[start] == 0xE0 else ">I", raw[start + 8 : start + 12])
    else:
        value_start = start + 8
        (length,) = struct.unpack("<I", raw[start + 4 : start + 8])
    if length == 0xFFFFFFFF:
        length = len(raw) - value_start
    cut = value_start + int(length * keep_fraction)
    dst = Path(dst)
    dst.write_bytes(raw[:cut])
    return dst


def write_deflate_bomb(path: str | Path, declared_bytes: int) -> Path:
    """A SYNTHETIC 64 x 64 DICOM file in Deflated Explicit VR Little Endian whose Pixel Data holds
    ``declared_bytes`` of zeros: about a thousandth of that on disk (deflate's ratio on zeros)."""
    from pydicom import dcmread
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset, write_file_meta_info

    ds = dcmread(write_dicom(path, pixels=np.zeros((64, 64), np.uint16)))
    del ds.PixelData
    header = DicomBytesIO()
    header.is_little_endian, header.is_implicit_VR = True, False
    write_dataset(header, ds)
    deflater = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    chunk = bytes(1 << 24)
    body = [deflater.compress(header.getvalue() + struct.pack("<HH2sHI", 0x7FE0, 0x10, b"OW", 0, declared_bytes))]
    for start in range(0, declared_bytes, len(chunk)):
        body.append(deflater.compress(chunk[: min(len(chunk), declared_bytes - start)]))
    body.append(deflater.flush())
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    meta = DicomBytesIO()
    write_file_meta_info(meta, ds.file_meta)
    stream = b"".join(body)
    Path(path).write_bytes(b"\0" * 128 + b"DICM" + meta.getvalue() + stream + (b"\0" if len(stream) % 2 else b""))
    return Path(path)


def write_codestream_bomb(path: str | Path, side: int, transfer_syntax: UID = JPEGBaseline8Bit) -> Path:
    """A SYNTHETIC DICOM file whose header says 64 x 64 and whose one frame is a JPEG (or JPEG 2000)
    codestream of ``side`` x ``side`` black pixels: a few kilobytes that a codec decodes at its own size."""
    import io

    from pydicom import dcmread
    from pydicom.encaps import encapsulate

    picture = io.BytesIO()
    Image.new("L", (side, side)).save(picture, "JPEG" if transfer_syntax == JPEGBaseline8Bit else "JPEG2000")
    ds = dcmread(write_dicom(path, pixels=np.zeros((64, 64), np.uint8), modality="SC"))
    ds.file_meta.TransferSyntaxUID = transfer_syntax
    ds.PixelData = encapsulate([picture.getvalue()])
    ds["PixelData"].VR = "OB"
    ds.save_as(path, enforce_file_format=True)
    return Path(path)


def write_png(path: str | Path, array: np.ndarray) -> Path:
    """Write ``array`` as a PNG: uint8 (H,W) L, (H,W,3) RGB, (H,W,4) RGBA; uint16 (H,W) 16-bit grey."""
    path = Path(path)
    arr = np.ascontiguousarray(array)
    if arr.dtype == np.uint16 and arr.ndim == 2:
        image = Image.frombytes("I;16", (arr.shape[1], arr.shape[0]), arr.astype("<u2").tobytes())
    elif arr.dtype == np.uint8:
        image = Image.fromarray(arr)
    else:
        raise ValueError(f"write_png takes uint8 or 2-D uint16, not {arr.dtype} {arr.shape}")
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="PNG")
    return path


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload) & 0xFFFFFFFF)


def png16_bytes(array: np.ndarray) -> bytes:
    """A 16-bit PNG of uint16 ``array``, written by hand (Pillow writes none with colour or alpha):
    (H,W,2) grey with alpha, (H,W,3) RGB, (H,W,4) RGBA; filter type 0 on every row."""
    height, width, channels = array.shape
    colour_type = {2: 4, 3: 2, 4: 6}[channels]
    rows = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in array)
    header = struct.pack(">IIBBBBB", width, height, 16, colour_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", zlib.compress(rows))
        + _png_chunk(b"IEND", b"")
    )


def write_blank_png(path: str | Path, width: int, height: int, *, bit_depth: int = 8) -> Path:
    """A valid all-black grey PNG of any size, written row by row without holding the image.

    A 30000x30000 8-bit image compresses to about 1 MB: the shape of a decompression bomb.
    """
    path = Path(path)
    row = b"\x00" * (1 + (width * bit_depth + 7) // 8)
    compressor = zlib.compressobj(9)
    with path.open("wb") as out:
        out.write(b"\x89PNG\r\n\x1a\n")
        out.write(_png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, bit_depth, 0, 0, 0, 0)))
        idat = bytearray()
        for _ in range(height):
            idat += compressor.compress(row)
        idat += compressor.flush()
        out.write(_png_chunk(b"IDAT", bytes(idat)))
        out.write(_png_chunk(b"IEND", b""))
    return path
