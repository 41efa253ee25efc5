"""DICOM decoding with pydicom 3 and its plugins (pylibjpeg-libjpeg/-openjpeg/-rle, gdcm, pyjpegls).

Grey images go through Modality LUT -> VOI LUT or window -> MONOCHROME1 inversion and end as
float32 in [0, 1], 1.0 brightest. Colour images (RGB, YBR_*, PALETTE COLOR) end as RGB in [0, 1].

pydicom's configuration is global and is never changed here; each call reads its own dataset.
pydicom reports odd values through :mod:`warnings` and its ``pydicom`` logger, and those messages
can quote element values (names, IDs): keep them out of any log that must be free of PHI.
Failure messages raised here never quote element values.
"""

from __future__ import annotations

import io
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import generate_frames
from pydicom.multival import MultiValue
from pydicom.pixels import (
    apply_color_lut,
    apply_modality_lut,
    apply_voi_lut,
    convert_color_space,
    get_decoder,
)
from pydicom.pixels.utils import get_expected_length
from pydicom.uid import (
    UID,
    AllTransferSyntaxes,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    MediaStorageDirectoryStorage,
)
from pydicom.valuerep import VR

from meddaemon import MANUFACTURER
from meddaemon.engine.decode.limits import check_inflated_size, codestream_size
from meddaemon.engine.decode.scaling import finite_range, look_up, unit_range
from meddaemon.engine.decode.types import DecodedScan, DecodeOptions, ScanMetadata
from meddaemon.failures import STOPPING, FailureReason, ScanFailure

DICM_OFFSET = 128
_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
#: (7FE0,0010), (7FE0,0008), (7FE0,0009) as they appear little- and big-endian in a file.
_PIXEL_TAG_BYTES = tuple(
    struct.pack(order + "HH", 0x7FE0, element) for element in (0x0010, 0x0008, 0x0009) for order in "<>"
)
_VR_BYTES = frozenset(vr.value.encode("ascii") for vr in VR if len(vr.value) == 2)
_GREY = frozenset({"MONOCHROME1", "MONOCHROME2"})
_YBR = frozenset({"YBR_FULL", "YBR_FULL_422"})
#: What can be turned into grey or RGB: YBR_ICT/RCT only occur in JPEG 2000, whose decoders
#: return RGB; YBR_PARTIAL_* only in MPEG, for which no decoder exists.
_SUPPORTED_PHOTOMETRIC = _GREY | _YBR | {"RGB", "PALETTE COLOR", "YBR_ICT", "YBR_RCT"}
_MAX_ERROR_CHARS = 300


@dataclass(frozen=True)
class TransferSyntaxSupport:
    """Whether pixel data in one transfer syntax can be decoded with the plugins installed.

    ``plugins`` names the installed plugins able to decode it; it is empty for the native
    (uncompressed, deflated) syntaxes, which pydicom decodes itself without any plugin.
    """

    uid: str
    name: str
    decodable: bool
    plugins: tuple[str, ...]


def decodable_transfer_syntaxes() -> list[TransferSyntaxSupport]:
    """Every transfer syntax pydicom knows, with whether it can be decoded here and by what."""
    support = []
    for uid in AllTransferSyntaxes:
        try:
            decoder = get_decoder(uid)
        except NotImplementedError:
            support.append(TransferSyntaxSupport(str(uid), uid.name, False, ()))
            continue
        plugins = tuple(decoder.available_plugins)
        support.append(TransferSyntaxSupport(str(uid), uid.name, decoder.is_available, plugins))
    return support


def has_dicom_signature(head: bytes) -> bool:
    """The Part 10 form: a 128-byte preamble then ``DICM``."""
    return head[DICM_OFFSET : DICM_OFFSET + 4] == b"DICM"


def looks_like_bare_dicom(head: bytes) -> bool:
    """Whether ``head`` could start a DICOM stream without the preamble.

    Such streams begin with the file meta group (0002) or, with no meta at all, with group 0008,
    as an explicit-VR element (a known VR follows the tag) or an implicit-VR one (a sane length
    follows). This only gates the costlier parse; :func:`decode_dicom` still demands a plausible
    dataset, since random bytes still pass here about once in 10^7.
    """
    if len(head) < 8:
        return False
    for order in "<>":
        (group,) = struct.unpack(order + "H", head[:2])
        if group not in (0x0002, 0x0008):
            continue
        if head[4:6] in _VR_BYTES:
            return True
        (length,) = struct.unpack(order + "I", head[4:8])
        if order == "<" and length < 0x10000:
            return True
    return False


def decode_dicom(data: bytes, options: DecodeOptions = DecodeOptions()) -> DecodedScan:
    """Decode one DICOM file held in ``data``; raise :class:`ScanFailure` with a named reason."""
    check_inflated_size(data, options.max_inflated_bytes)
    signed = has_dicom_signature(data)
    ds = _read(data, signed=signed)
    header = ds if _has_pixels(ds) else _read_header(data, fallback=ds)
    if not _is_plausible(header):
        if signed:
            raise ScanFailure(FailureReason.CORRUPT_IMAGE, "the file has a DICOM signature but no dataset")
        raise ScanFailure(FailureReason.UNRECOGNISED_FORMAT, "the bytes do not hold a DICOM dataset")
    _refuse_dicomdir(header)
    _refuse_own_output(header)
    pixel_keyword = _pixel_keyword(ds, header, data)
    metadata = read_metadata(ds)
    notes: list[str] = []
    if metadata.rows <= 0 or metadata.columns <= 0:
        raise ScanFailure(FailureReason.CORRUPT_IMAGE, "the pixel data has no valid Rows and Columns")
    _check_pixel_count(metadata, options)

    transfer_syntax = _transfer_syntax(ds, pixel_keyword, notes)
    metadata.transfer_syntax_uid = str(transfer_syntax)
    decoder = _decoder_for(transfer_syntax)
    photometric = _photometric(ds, metadata, notes)
    if transfer_syntax.is_encapsulated:
        _check_codestreams(ds, metadata, transfer_syntax)
    else:
        _check_native_length(ds, pixel_keyword, transfer_syntax)
        _check_high_bit(ds, pixel_keyword)

    index = _frame_index(ds, metadata.frames, options, notes)
    arr, decoded_as = _decode_pixels(decoder, ds, index, transfer_syntax)
    little_endian = transfer_syntax.is_little_endian
    if index is None and metadata.frames > 1 and ds.get("PerFrameFunctionalGroupsSequence"):
        frames = _each_frame_to_unit(arr, ds, decoded_as, photometric, little_endian, notes)
    else:
        shown = with_frame_groups(ds, 0 if index is None else index, notes)
        frames = _to_unit(arr, shown, decoded_as, photometric, little_endian, notes)
    return DecodedScan(frames=frames, metadata=metadata, notes=notes)


def _each_frame_to_unit(
    arr: np.ndarray, ds: Dataset, decoded_as: dict, photometric: str, little_endian: bool, notes: list[str]
) -> np.ndarray:
    """Every frame of an Enhanced grey object through its own rescale (its Per-Frame functional
    groups), then its own window where every frame has one, else one min-max over the whole stack,
    as a classic multi-frame object gets (each frame's own min-max lost how bright it is beside the
    others). Enhanced MR and PET vary the rescale frame by frame, and the key frame's, used for all,
    put the others out of scale (intercepts 0, 1000 and 3000 came out as one image three times)."""
    if str(decoded_as.get("photometric_interpretation", photometric)).upper() not in _GREY:
        return _to_unit(arr, with_frame_groups(ds, 0, notes), decoded_as, photometric, little_endian, notes)
    said: list[str] = []
    frames = [with_frame_groups(ds, i, said) for i in range(len(arr))]
    windowed = all(_has_voi_lut(shown) or _has_window(shown) for shown in frames)
    unit = np.empty(arr.shape, dtype=np.float32)  # one frame in float64 at a time, as the stack took
    padded: np.ndarray | None = None  # the frames' Pixel Padding, left out of their min-max
    for i, (frame, shown) in enumerate(zip(arr, frames, strict=True)):
        if windowed:
            unit[i] = grey_to_unit(frame, shown, little_endian, said)
            continue
        unit[i] = _apply_modality(frame, shown, little_endian)
        if (padding := _padding(frame, shown)) is not None:
            padded = np.zeros(arr.shape, dtype=bool) if padded is None else padded
            padded[i] = padding
    if not windowed:
        padded = _some_padding(padded)  # a frame all padding is left out too
        said.append("not every frame has a window: min-max over all frames used")
        unit = unit_range(unit, *finite_range(unit if padded is None else unit[~padded]), in_place=True)
        if str(ds.PhotometricInterpretation).upper() == "MONOCHROME1":
            np.subtract(1.0, unit, out=unit)
    notes += list(dict.fromkeys(said))
    return unit


#: where an Enhanced multi-frame object keeps what a classic one keeps at the top level (PS3.3 C.7.6.16)
_FRAME_GROUPS = {
    "PixelValueTransformationSequence": ("RescaleSlope", "RescaleIntercept", "RescaleType"),
    "FrameVOILUTSequence": ("WindowCenter", "WindowWidth", "VOILUTFunction"),
}


def with_frame_groups(ds: Dataset, frame: int, notes: list[str]) -> Dataset:
    """``ds`` with frame ``frame``'s rescale and window from its functional groups (its Per-Frame
    item first, then the Shared one) at the top level, where the Modality LUT and VOI steps read
    them; ``ds`` itself when there are none. Enhanced CT, MR, XA and breast tomosynthesis keep them
    only there, and their images were shown by min-max instead. A value at the top level wins; an
    element there without one does not (it hid the frame's rescale, and the image went unrescaled)."""
    groups = []
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if per_frame and 0 <= frame < len(per_frame):
        groups.append(per_frame[frame])
    shared = ds.get("SharedFunctionalGroupsSequence")
    if shared:
        groups.append(shared[0])
    found = []
    for sequence, keywords in _FRAME_GROUPS.items():
        item = next((group[sequence][0] for group in groups if group.get(sequence)), None)
        if item is not None:
            found += [item[keyword] for keyword in keywords if keyword in item and not _has_value(ds, keyword)]
    if not found:
        return ds
    flat = _shallow_copy(ds)
    for element in found:
        flat.add(element)
    notes.append("rescale and window read from the frame's functional groups")
    return flat


def _has_value(ds: Dataset, keyword: str) -> bool:
    """Whether ``keyword`` is there with a value: 0 is one (a number that is 0 is falsy)."""
    value = ds.get(keyword)
    return value is not None and bool(str(value).strip())


def _shallow_copy(ds: Dataset) -> Dataset:
    """A dataset of ``ds``'s elements (the same element objects) that can take others without
    changing ``ds``."""
    flat = Dataset()
    for element in ds:
        flat.add(element)
    return flat


def _read(data: bytes, *, signed: bool) -> Dataset:
    try:
        return dcmread(io.BytesIO(data), force=True)
    except Exception as exc:
        if signed:
            raise ScanFailure(
                FailureReason.CORRUPT_IMAGE,
                f"the file has a DICOM signature but its dataset cannot be parsed ({type(exc).__name__})",
            ) from exc
        raise ScanFailure(FailureReason.UNRECOGNISED_FORMAT, "the bytes do not hold a DICOM dataset") from exc


def header_metadata(data: bytes, options: DecodeOptions = DecodeOptions()) -> ScanMetadata | None:
    """The per-scan facts of a DICOM file whose pixels could not be decoded, from the elements
    before its pixel data; None when they do not read as a DICOM object (or hold a Deflated dataset
    over ``max_pixels``). A failed scan so still belongs to its study (the study report names it) and
    shows its modality and sender."""
    try:
        check_inflated_size(data, options.max_inflated_bytes)
    except ScanFailure:
        return None
    header = _read_header(data, fallback=Dataset())
    return read_metadata(header) if _is_plausible(header) else None


def _read_header(data: bytes, *, fallback: Dataset) -> Dataset:
    """The elements before the pixel data: pydicom discards a whole dataset whose encapsulated
    pixel data never reaches its closing delimiter, but stopping before the pixels keeps them."""
    try:
        return dcmread(io.BytesIO(data), force=True, stop_before_pixels=True)
    except Exception:
        return fallback


def _has_pixels(ds: Dataset) -> bool:
    return any(keyword in ds for keyword in _PIXEL_KEYWORDS)


def _is_plausible(ds: Dataset) -> bool:
    """Whether a parse produced a real object: it names its SOP class or holds pixel data.
    (pydicom with ``force=True`` returns a dataset, often empty, for almost any bytes.)"""
    try:
        meta = getattr(ds, "file_meta", None) or {}
        return "MediaStorageSOPClassUID" in meta or "SOPClassUID" in ds or _has_pixels(ds)
    except Exception:
        return False


def _refuse_dicomdir(ds: Dataset) -> None:
    meta = getattr(ds, "file_meta", None) or {}
    if meta.get("MediaStorageSOPClassUID") == MediaStorageDirectoryStorage or "DirectoryRecordSequence" in ds:
        raise ScanFailure(FailureReason.DICOMDIR, "the file is a DICOMDIR (an index of a file set), not an image")


def _refuse_own_output(ds: Dataset) -> None:
    """A PACS that forwards whole studies (Orthanc's ``OnStableStudy``, a routing rule on the study)
    sends meddaemon's results back with the scans once they joined the study. Inferred again, a
    Secondary Capture would give captures of itself, sent back in turn, without end; an SR or a PDF
    would fail as ``no_pixel_data``, as if something were wrong with the input."""
    if (_text(ds, "Manufacturer") or "").casefold() == MANUFACTURER:
        raise ScanFailure(
            FailureReason.OWN_OUTPUT,
            f"the object ({_sop_class_name(ds)}) is one meddaemon wrote: its results are not inferred again",
        )


def _pixel_keyword(ds: Dataset, header: Dataset, data: bytes) -> str:
    """The pixel element's keyword. Without one, an object that is an image (it has Rows, or an
    image SOP class) was cut short; anything else (SR, RT plan, waveform) never had pixels."""
    for keyword in _PIXEL_KEYWORDS:
        if keyword in ds:
            return keyword
    if "Rows" in header or "Image Storage" in _sop_class_name(header):
        where = "inside" if any(tag in data for tag in _PIXEL_TAG_BYTES) else "before"
        raise ScanFailure(
            FailureReason.TRUNCATED_PIXEL_DATA,
            f"the header describes an image but the file ends {where} its pixel data",
        )
    raise ScanFailure(FailureReason.NO_PIXEL_DATA, f"the DICOM object ({_sop_class_name(header)}) has no pixel data")


def _sop_class_name(ds: Dataset) -> str:
    try:
        uid = ds.get("SOPClassUID") or ds.file_meta.get("MediaStorageSOPClassUID")
        return UID(uid).name if uid else "no SOP class"
    except Exception:
        return "unknown SOP class"


def _check_pixel_count(metadata: ScanMetadata, options: DecodeOptions) -> None:
    count = metadata.rows * metadata.columns * metadata.frames
    if count > options.max_pixels:
        raise ScanFailure(
            FailureReason.TOO_MANY_PIXELS,
            f"{metadata.rows}x{metadata.columns}x{metadata.frames} = {count} pixels exceeds the "
            f"limit of {options.max_pixels}",
        )


#: JPEG and JPEG-LS codestreams end with the end-of-image marker. One cut short inside a whole DICOM
#: fragment was decoded without a word by libjpeg, the plugin pydicom tries last once the others
#: refuse it: the rest of the image came out garbage, and the model scored it.
_ENDS_WITH_EOI = frozenset(
    {JPEGBaseline8Bit, JPEGExtended12Bit, JPEGLossless, JPEGLosslessSV1, JPEGLSLossless, JPEGLSNearLossless}
)


def _check_codestreams(ds: Dataset, metadata: ScanMetadata, transfer_syntax: UID) -> None:
    """Each frame's codestream must declare the header's Rows and Columns (``limits``): a codec
    decodes the size its stream declares, which ``max_pixels`` never saw; and a JPEG one must end
    with its end-of-image marker (``_ENDS_WITH_EOI``). A framing pydicom cannot split is left to the
    decode, which names it."""
    try:
        frames = list(generate_frames(ds.PixelData, number_of_frames=metadata.frames))
    except Exception:
        return
    for number, frame in enumerate(frames, 1):
        # after the marker, encoders pad with 0x00 or 0xFF (pydicom's JPGExtended.dcm: ``ffd9ff``)
        if transfer_syntax in _ENDS_WITH_EOI and not frame.rstrip(b"\x00\xff").endswith(b"\xff\xd9"):
            raise ScanFailure(
                FailureReason.PIXEL_DECODE_ERROR,
                f"frame {number}'s {transfer_syntax.name} codestream ends before its end-of-image marker "
                "(cut short): not decoded",
            )
        size = codestream_size(frame)
        if size is None or size == (metadata.rows, metadata.columns):
            continue
        raise ScanFailure(
            FailureReason.PIXEL_DECODE_ERROR,
            f"frame {number}'s codestream is {size[1]}x{size[0]} pixels, where the header says "
            f"{metadata.columns}x{metadata.rows}: not decoded",
        )


def _transfer_syntax(ds: Dataset, pixel_keyword: str, notes: list[str]) -> UID:
    """The file's transfer syntax; for a file without one, the encoding it was read in."""
    if getattr(ds, "file_meta", None) is None:
        ds.file_meta = FileMetaDataset()
    declared = ds.file_meta.get("TransferSyntaxUID")
    if isinstance(declared, MultiValue):  # a backslash in the value: no UID can be read from it
        raise ScanFailure(
            FailureReason.UNSUPPORTED_TRANSFER_SYNTAX,
            f"the Transfer Syntax UID holds {len(declared)} values, not one UID",
        )
    if declared:
        return UID(declared)
    if ds[pixel_keyword].is_undefined_length:
        raise ScanFailure(
            FailureReason.UNSUPPORTED_TRANSFER_SYNTAX,
            "the pixel data is encapsulated but the file names no transfer syntax",
        )
    implicit, little = ds.original_encoding
    if implicit or implicit is None:
        inferred = ImplicitVRLittleEndian
    else:
        inferred = ExplicitVRLittleEndian if little is not False else ExplicitVRBigEndian
    ds.file_meta.TransferSyntaxUID = inferred
    notes.append(f"no transfer syntax in the file: read as {inferred.name}")
    return inferred


def _decoder_for(transfer_syntax: UID) -> Any:
    try:
        decoder = get_decoder(transfer_syntax)
    except NotImplementedError:
        raise ScanFailure(
            FailureReason.UNSUPPORTED_TRANSFER_SYNTAX,
            f"no decoder exists for transfer syntax {transfer_syntax} ({transfer_syntax.name})",
        ) from None
    if not decoder.is_available:
        missing = "; ".join(decoder.missing_dependencies)
        raise ScanFailure(
            FailureReason.UNSUPPORTED_TRANSFER_SYNTAX,
            f"transfer syntax {transfer_syntax} ({transfer_syntax.name}) needs a plugin that is not "
            f"installed ({missing})",
        )
    return decoder


def _photometric(ds: Dataset, metadata: ScanMetadata, notes: list[str]) -> str:
    photometric = (metadata.photometric_interpretation or "").upper()
    if not photometric and metadata.samples_per_pixel == 1:
        ds.PhotometricInterpretation = photometric = "MONOCHROME2"
        notes.append("no Photometric Interpretation: read as MONOCHROME2")
    if photometric not in _SUPPORTED_PHOTOMETRIC:
        raise ScanFailure(
            FailureReason.UNSUPPORTED_PHOTOMETRIC,
            f"photometric interpretation {photometric or '(none)'} is not supported",
        )
    samples = 1 if photometric in _GREY or photometric == "PALETTE COLOR" else 3
    if metadata.samples_per_pixel != samples:  # read as it says, the image is neither grey nor colour
        raise ScanFailure(
            FailureReason.CORRUPT_IMAGE,
            f"Samples per Pixel {metadata.samples_per_pixel} contradicts {photometric}, which has {samples}",
        )
    return photometric


def _check_native_length(ds: Dataset, pixel_keyword: str, transfer_syntax: UID) -> None:
    try:
        expected = int(get_expected_length(ds, unit="bytes"))
    except Exception as exc:
        raise ScanFailure(
            FailureReason.CORRUPT_IMAGE, f"the image pixel module is incomplete ({type(exc).__name__})"
        ) from exc
    actual = len(ds[pixel_keyword].value or b"")
    if actual < expected:
        raise ScanFailure(
            FailureReason.TRUNCATED_PIXEL_DATA,
            f"{transfer_syntax.name} pixel data holds {actual} bytes, the header needs {expected}",
        )


def _check_high_bit(ds: Dataset, pixel_keyword: str) -> None:
    """Stored bits end at High Bit, which PS3.3 C.7.6.3 holds at Bits Stored - 1: pydicom reads the
    low Bits Stored bits whatever it says, other bits than the image's where it says otherwise."""
    stored = _int(ds, "BitsStored", 0)
    high = _int(ds, "HighBit", stored - 1)
    if pixel_keyword == "PixelData" and stored > 0 and high != stored - 1:
        raise ScanFailure(
            FailureReason.CORRUPT_IMAGE,
            f"High Bit {high} is not Bits Stored {stored} - 1: which bits hold the image is unknown",
        )


def key_frame_index(ds: Dataset, frames: int) -> tuple[int, str]:
    """The frame shown for a multi-frame object: RepresentativeFrameNumber (1-based) if valid,
    otherwise the middle one (``frames // 2``, so the later of the two middles of an even count)."""
    try:
        representative = int(ds.get("RepresentativeFrameNumber") or 0)
    except (TypeError, ValueError):
        representative = 0
    if 1 <= representative <= frames:
        return representative - 1, "RepresentativeFrameNumber"
    return frames // 2, "middle frame"


def _frame_index(ds: Dataset, frames: int, options: DecodeOptions, notes: list[str]) -> int | None:
    if frames <= 1:
        return 0
    if options.frame_policy == "all":
        notes.append(f"all {frames} frames decoded")
        return None
    index, why = key_frame_index(ds, frames)
    notes.append(f"frame {index + 1} of {frames} decoded ({why})")
    return index


#: the plugins tried, in this order, of those pydicom has for a transfer syntax. gdcm, pydicom's
#: first, is left out: on some damaged codestreams (JPEG 2000, and a JPEG baseline whose one header
#: byte is wrong) it throws a C++ exception nothing catches and the process aborts (the daemon itself
#: where it decodes in its own process: ``workers = 0``, ``dataset inspect``, the console), where
#: these raise. Otherwise pydicom's own order: each plugin tried after the one before raised.
_PLUGINS = ("pylibjpeg", "pyjpegls", "pydicom", "pillow")


def _plugins(decoder: Any, transfer_syntax: UID) -> list[str]:
    """The plugins to try one after the other; ``""`` is pydicom's own choice, for a transfer syntax
    none of ``_PLUGINS`` decodes (an uncompressed one, or a codec only gdcm has here)."""
    available = [p for p in _PLUGINS if p in decoder.available_plugins]
    return available or [""]


def _decode_pixels(decoder: Any, ds: Dataset, index: int | None, transfer_syntax: UID) -> tuple[np.ndarray, dict]:
    """Decode with pydicom's own colour handling: YBR_FULL(_422) comes back as RGB whether the
    codec (JPEG baseline) or pydicom converted it; the returned dict says what the array holds."""
    first_error: BaseException | None = None
    # pydicom converts YBR to RGB in uint8 only: wider YBR (12-bit colour JPEG) comes back as it is,
    # converted by ``_to_unit``
    as_rgb = not (str(ds.get("PhotometricInterpretation", "")).upper() in _YBR and _int(ds, "BitsAllocated", 8) > 8)
    for plugin in _plugins(decoder, transfer_syntax):
        try:
            return decoder.as_array(ds, index=index, raw=False, as_rgb=as_rgb, decoding_plugin=plugin)  # type: ignore[no-any-return]
        except (MemoryError, *STOPPING):
            raise
        except BaseException as exc:  # a Rust codec's panic too (pyo3's PanicException): it took the daemon down
            first_error = first_error or exc
            if not isinstance(exc, Exception):
                # a codec that panics met data its header contradicts (RLE segments longer than its
                # rows): a laxer decoder after it would read part of them as the image, as pydicom's
                # own choice, which stops at a panic, never did
                break
    assert first_error is not None
    detail = " ".join(str(first_error).split())[:_MAX_ERROR_CHARS]
    raise ScanFailure(
        FailureReason.PIXEL_DECODE_ERROR,
        f"{transfer_syntax.name} pixel data could not be decoded: {type(first_error).__name__}: {detail}",
    ) from first_error


def _to_unit(
    arr: np.ndarray, ds: Dataset, decoded_as: dict, photometric: str, little_endian: bool, notes: list[str]
) -> np.ndarray:
    """Frames as float32 in [0, 1]: (N, H, W) grey or (N, H, W, 3) RGB."""
    decoded_photometric = str(decoded_as.get("photometric_interpretation", photometric)).upper()
    samples = int(decoded_as.get("samples_per_pixel", 1))
    if arr.ndim == (2 if samples == 1 else 3):
        arr = arr[np.newaxis]
    if decoded_photometric in _GREY:
        return grey_to_unit(arr, ds, little_endian, notes)
    if decoded_photometric == "PALETTE COLOR":
        return _palette_to_unit(arr, ds, little_endian)
    if decoded_photometric in _YBR or decoded_photometric == "RGB":
        bits = int(decoded_as.get("bits_stored") or 8 * arr.dtype.itemsize)
        if decoded_photometric in _YBR:
            arr = (
                convert_color_space(arr, decoded_photometric, "RGB", per_frame=True)
                if arr.dtype == np.uint8
                else ybr_to_rgb(arr, bits)
            )
            notes.append(f"{decoded_photometric} converted to RGB")
        return unit_range(arr, 0.0, float(2**bits - 1))
    raise ScanFailure(
        FailureReason.UNSUPPORTED_PHOTOMETRIC,
        f"decoded pixel data is {decoded_photometric}, which cannot be shown as grey or RGB",
    )


def ybr_to_rgb(arr: np.ndarray, bits: int) -> np.ndarray:
    """YBR_FULL of ``bits`` bits to RGB (float64, in [0, 2**bits - 1]): PS3.3 C.7.6.3.1.2's
    full-range BT.601 conversion, whose chroma is centred on 2**(bits - 1); pydicom's takes uint8 only."""
    ybr = arr.astype(np.float64)
    y, cb, cr = ybr[..., 0], ybr[..., 1] - 2 ** (bits - 1), ybr[..., 2] - 2 ** (bits - 1)
    rgb = np.stack([y + 1.402 * cr, y - 0.344136 * cb - 0.714136 * cr, y + 1.772 * cb], axis=-1)
    return np.clip(rgb, 0.0, float(2**bits - 1))


def grey_to_unit(arr: np.ndarray, ds: Dataset, little_endian: bool, notes: list[str]) -> np.ndarray:
    """Modality LUT -> VOI LUT or first window (else min-max) -> [0, 1] -> MONOCHROME1 inversion."""
    if arr.dtype.kind == "f" and not np.isfinite(arr).any():  # a black image, inferred and reported
        raise ScanFailure(
            FailureReason.CORRUPT_IMAGE, "the float pixel data holds no finite number (every value NaN or infinite)"
        )
    padding = _some_padding(_padding(arr, ds))
    values = _apply_modality(arr, ds, little_endian)
    windowed, low, high = _apply_voi(values, ds, little_endian, notes, padding)
    unit = unit_range(windowed, low, high)
    if str(ds.PhotometricInterpretation).upper() == "MONOCHROME1":
        np.subtract(1.0, unit, out=unit)
    return unit


def _apply_modality(arr: np.ndarray, ds: Dataset, little_endian: bool) -> np.ndarray:
    """The Modality LUT Sequence's table (looked up here: see ``scaling.look_up``), else pydicom's
    rescale (slope and intercept), else the stored values."""
    items = ds.get("ModalityLUTSequence")
    if not items:
        return apply_modality_lut(arr, ds) if _has_rescale(ds) else arr
    try:
        first, table = read_lut(items[0], little_endian, arr)
    except Exception as exc:
        raise ScanFailure(
            FailureReason.PIXEL_DECODE_ERROR, f"the Modality LUT is missing or invalid ({type(exc).__name__})"
        ) from exc
    return look_up(arr, first, table)


def _has_rescale(ds: Dataset) -> bool:
    """Whether there is a rescale to apply: a slope and an intercept, each with a value (pydicom
    applies both or neither; an element present and empty was multiplied by, an internal_error).
    Refused: a slope of 0, or a slope or intercept that is not a finite number, which made every
    pixel one value (or NaN), and the scan was inferred on a black image."""
    keywords = {"RescaleSlope": "Rescale Slope", "RescaleIntercept": "Rescale Intercept"}
    if not all(_has_value(ds, keyword) for keyword in keywords):
        return False
    for name, value in ((name, ds.get(keyword)) for keyword, name in keywords.items()):
        try:
            number = float(value)
        except (TypeError, ValueError) as exc:
            raise ScanFailure(FailureReason.CORRUPT_IMAGE, f"{name} {value} is not one number") from exc
        if not np.isfinite(number) or (name == "Rescale Slope" and number == 0):
            raise ScanFailure(FailureReason.CORRUPT_IMAGE, f"{name} {value} leaves no image")
    return True


def read_lut(item: Dataset, little_endian: bool, looked_up: np.ndarray | None = None) -> tuple[int, np.ndarray]:
    """A Modality or VOI LUT item's first mapped value and its entries, int64. The standard allows
    8 to 16 bits per entry and any number of entries (PS3.3 C.11.1.1.1, C.11.2.1.1).

    A first value of 32768 or more not written SS may be a signed one read as US (Implicit VR leaves
    the VR to guess; -1024 read as 64512: all black). It is taken back as signed where an unsigned
    table would run past 65535, or where the values ``looked_up`` hold negatives and none reaches it
    (a CT's VOI LUT from -1000 HU, 400 entries, read from 64536: every pixel below it, the image
    black). Their extent is only taken where that decides."""
    entries, first = int(item.LUTDescriptor[0]) or 2**16, int(item.LUTDescriptor[1])
    if item["LUTDescriptor"].VR != "SS" and first >= 2**15:
        wraps = first + entries > 2**16
        extent = None if wraps or looked_up is None else _extent(looked_up)
        if wraps or (extent is not None and extent[0] < 0 and extent[1] < first):
            first -= 2**16
    value = item["LUTData"].value
    if isinstance(value, bytes | bytearray):  # OW: one entry per word, or 8-bit entries two to a word
        bits = int(item.LUTDescriptor[2]) if len(item.LUTDescriptor) > 2 else 16
        table = _lut_entries(bytes(value), entries, little_endian, bits)
    else:  # US, read by pydicom in the file's byte order
        table = np.atleast_1d(np.asarray(value, dtype=np.int64))
    if len(table) < entries:
        raise ValueError(f"a LUT of {entries} entries holds {len(table)}")
    return first, table[:entries].astype(np.int64)


def _extent(values: np.ndarray) -> tuple[float, float] | None:
    """The lowest and highest finite values a LUT looks up (None when there are none)."""
    finite = values[np.isfinite(values)] if values.dtype.kind == "f" else values
    return (float(finite.min()), float(finite.max())) if finite.size else None


def _as_integer_pixels(ds: Dataset) -> Dataset:
    """``ds`` as pydicom's windowing reads it: a float image (Float or Double Float Pixel Data, no
    Bits Stored nor Pixel Representation in its module) given 16 unsigned bits, which only set the
    output's range, taken back out through the window's ends (its window was dropped for min-max)."""
    if "BitsStored" in ds and "PixelRepresentation" in ds:
        return ds
    flat = _shallow_copy(ds)
    flat.BitsStored = flat.get("BitsStored") or 16
    flat.PixelRepresentation = flat.get("PixelRepresentation", 0)
    return flat


def _has_voi_lut(ds: Dataset) -> bool:
    """The test ``apply_voi_lut`` itself uses to prefer the VOI LUT Sequence over a window."""
    items = ds.get("VOILUTSequence")
    return bool(items) and None not in (items[0].get("LUTDescriptor"), items[0].get("LUTData"))


def _has_window(ds: Dataset) -> bool:
    return ds.get("WindowCenter") not in (None, "") and ds.get("WindowWidth") not in (None, "")


def _padding(arr: np.ndarray, ds: Dataset) -> np.ndarray | None:
    """The pixels Pixel Padding Value (to Pixel Padding Range Limit) marks as outside the image
    (PS3.3 C.7.5.1.1.2), by their stored values; None without a Pixel Padding Value."""
    value, limit = ds.get("PixelPaddingValue"), ds.get("PixelPaddingRangeLimit")
    if value in (None, "") or arr.dtype.kind not in "iu":
        return None
    try:
        low, high = sorted((int(value), int(value) if limit in (None, "") else int(limit)))
    except (TypeError, ValueError):
        return None
    return (arr >= low) & (arr <= high)


def _some_padding(padding: np.ndarray | None) -> np.ndarray | None:
    """``padding`` where it marks some pixels but not all of an image (or of a stack of frames)."""
    return padding if padding is not None and padding.any() and not padding.all() else None


def _apply_voi(
    values: np.ndarray, ds: Dataset, little_endian: bool, notes: list[str], padding: np.ndarray | None = None
) -> tuple[np.ndarray, float, float]:
    """Apply the first VOI transform; return it with the output range that maps to [0, 1]: the
    LUT's entries' range, or for a window pydicom's transform of -inf and +inf, so it always agrees
    with how pydicom windowed the pixels. Without either, the finite values' own range, the
    ``padding`` pixels left out of it (-2000 HU around a CT's body squeezed the body into a third
    of the range): padding outside that range is clipped to its nearer end.
    """
    try:
        if _has_voi_lut(ds):
            first, table = read_lut(ds.VOILUTSequence[0], little_endian, values)
            if table.min() != table.max():
                notes.append("VOI LUT applied")
                return look_up(values, first, table), float(table.min()), float(table.max())
            # one value for every pixel: a black image, scored as a scan (as a window of width 0 is)
            notes.append(f"VOI LUT unusable (every entry {table.min():g}): min-max used instead")
            return _min_max(values, notes, padding)
        if _has_window(ds):
            windowing = _as_integer_pixels(ds)
            ends = apply_voi_lut(np.array([-np.inf, np.inf]), windowing, index=0)
            windowed = apply_voi_lut(values, windowing, index=0)
            notes.append("first window applied")
            return windowed, float(ends[0]), float(ends[1])
    except Exception as exc:
        notes.append(f"VOI transform unusable ({type(exc).__name__}): min-max used instead")
    else:
        notes.append("no VOI LUT or window: min-max used")
    return _min_max(values, notes, padding)


def _min_max(values: np.ndarray, notes: list[str], padding: np.ndarray | None) -> tuple[np.ndarray, float, float]:
    if padding is not None:
        notes.append("pixel padding left out of the min-max")
        return values, *finite_range(values[~padding])
    return values, *finite_range(values)


@dataclass(frozen=True)
class PaletteTables:
    """The Palette Color LUTs as PS3.3 C.7.6.3.1.5 describes them, read with the file's byte order.

    ``tables`` is (entries, 3) RGB; index ``i`` holds the colour of stored value ``first + i``;
    ``full_scale`` is the largest value an entry can take (255 or 65535).
    """

    first: int
    tables: np.ndarray
    full_scale: float

    def apply(self, indices: np.ndarray) -> np.ndarray:
        """Values below ``first`` take the first entry, values past the last entry the last one."""
        return look_up(indices, self.first, self.tables)


def _palette_to_unit(arr: np.ndarray, ds: Dataset, little_endian: bool) -> np.ndarray:
    try:
        palette = read_palette(ds, little_endian=little_endian)
    except Exception as exc:
        raise ScanFailure(
            FailureReason.PIXEL_DECODE_ERROR,
            f"the PALETTE COLOR lookup tables are missing or invalid ({type(exc).__name__})",
        ) from exc
    return unit_range(palette.apply(arr), 0.0, palette.full_scale)


def read_palette(ds: Dataset, *, little_endian: bool) -> PaletteTables:
    """The dataset's Palette Color LUTs (alpha ignored).

    pydicom 3.0's ``apply_color_lut`` reads plain (non-segmented) LUT data in the machine's byte
    order, so a big-endian file came out near black: plain tables are read here in the file's
    order. Segmented tables, which pydicom reads in the file's order, are expanded by pydicom.
    """
    descriptor = [int(value) for value in ds.RedPaletteColorLookupTableDescriptor]
    entries, first, bits = descriptor[0] or 2**16, descriptor[1], descriptor[2]
    if "RedPaletteColorLookupTableData" in ds:
        channels = [
            _lut_entries(bytes(ds[f"{colour}PaletteColorLookupTableData"].value), entries, little_endian, bits)
            for colour in ("Red", "Green", "Blue")
        ]
        tables = np.stack(channels, axis=-1)
    elif "SegmentedRedPaletteColorLookupTableData" in ds:
        tables = np.asarray(apply_color_lut(np.arange(first, first + entries), ds))[..., :3]
    else:
        raise ValueError("no Palette Color Lookup Table Data")
    tables = tables.astype(np.uint16)
    full_scale = 2**bits - 1 if bits in (8, 16) else 65535
    if int(tables.max(initial=0)) > full_scale:
        full_scale = 65535  # 16-bit entries under a descriptor that says 8, as some writers do
    return PaletteTables(first=first, tables=tables, full_scale=float(full_scale))


def _lut_entries(data: bytes, entries: int, little_endian: bool, bits: int = 16) -> np.ndarray:
    """One LUT's entries from its OW value: one entry per 16-bit word, or, where the descriptor says
    8 bits, 8-bit entries packed two to a word (the first entry in the low byte, as dcmtk reads
    them). A 16-bit table too short for its descriptor was read as packed bytes: noise applied."""
    words = np.frombuffer(data[: len(data) - len(data) % 2], dtype="<u2" if little_endian else ">u2")
    if len(words) >= entries:
        return words[:entries]
    if bits <= 8:
        packed = np.stack([words & 0xFF, words >> 8], axis=-1).reshape(-1)
        if len(packed) >= entries:
            return packed[:entries]
    raise ValueError(f"a LUT of {entries} entries of {bits} bits holds {len(data)} bytes")


def read_metadata(ds: Dataset) -> ScanMetadata:
    """The per-scan facts of docs/design.md section 4; a field that is absent or unreadable is None."""
    meta = getattr(ds, "file_meta", None) or {}
    return ScanMetadata(
        format="dicom",
        rows=_int(ds, "Rows", 0),
        columns=_int(ds, "Columns", 0),
        frames=max(1, _int(ds, "NumberOfFrames", 1)),
        samples_per_pixel=_int(ds, "SamplesPerPixel", 1),
        photometric_interpretation=_text(ds, "PhotometricInterpretation"),
        bits_stored=_int(ds, "BitsStored", 0) or None,
        transfer_syntax_uid=_text(meta, "TransferSyntaxUID"),
        sop_class_uid=_text(ds, "SOPClassUID") or _text(meta, "MediaStorageSOPClassUID"),
        study_instance_uid=_text(ds, "StudyInstanceUID"),
        series_instance_uid=_text(ds, "SeriesInstanceUID"),
        sop_instance_uid=_text(ds, "SOPInstanceUID") or _text(meta, "MediaStorageSOPInstanceUID"),
        patient_id=_text(ds, "PatientID"),
        patient_name=_text(ds, "PatientName"),
        patient_birth_date=_text(ds, "PatientBirthDate"),
        accession_number=_text(ds, "AccessionNumber"),
        patient_sex=_text(ds, "PatientSex"),
        patient_age=_text(ds, "PatientAge"),
        modality=_text(ds, "Modality"),
        body_part=_text(ds, "BodyPartExamined"),
        manufacturer=_text(ds, "Manufacturer"),
        view_position=_text(ds, "ViewPosition"),
    )


def _text(ds: Any, keyword: str) -> str | None:
    """The value as text, without the NUL characters some writers pad or separate values with
    (PostgreSQL refuses them in text: the scan, and its whole batch, could not be registered); the
    values of a multi-valued element joined by a backslash, as DICOM writes them (Python's text of
    the list, "['BREAST', 'CHEST']", was stored)."""
    try:
        value = ds.get(keyword)
    except Exception:
        return None
    if value is None:
        return None
    parts = value if isinstance(value, MultiValue | list | tuple) else [value]
    text = "\\".join(str(part) for part in parts).replace("\x00", "").strip()
    return text or None


def _int(ds: Dataset, keyword: str, default: int) -> int:
    try:
        value = ds.get(keyword)
        return default if value in (None, "") else int(value)
    except Exception:
        return default
