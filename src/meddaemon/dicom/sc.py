"""A heatmap burned into the image as a Secondary Capture, for viewers without Parametric Maps:
the overlay the report shows (the scan as the model saw it, the map in the jet scale), enlarged,
with a caption band saying what it is and, in capitals, that it is not for diagnosis.

The picture is stored as JPEG Baseline (lossy, ISO 10918-1), as highdicom encodes it: a SYNTHETIC
busi capture of 852 KiB as RGB is 84 KiB, encoded in 1.3 to 1.7 ms of CPU
(``benchmarks/sc_compression.py``); the lossless syntaxes at hand (JPEG-LS, RLE, deflate) kept 31
to 96% of it for 8 to 18 times the CPU. The picture is drawn from the overlay's JPEG already, and
it says it is not for diagnosis; its Lossy Image Compression attributes say how it was compressed.
A peer that does not accept JPEG Baseline gets it decompressed (``senders.DimseSender``).

As for the Parametric Maps (``pmap``), a multilabel scan's captures after the first are made from
the first (``for_label``): only their label's parts differ."""

from __future__ import annotations

import functools
import importlib.util
import io
from pathlib import Path

import highdicom as hd
import numpy as np
from highdicom.frame import encode_frame
from PIL import Image, ImageDraw, ImageFont
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.uid import JPEGBaseline8Bit

from meddaemon import MANUFACTURER
from meddaemon.dicom import uids
from meddaemon.dicom.content import (
    NOT_FOR_DIAGNOSIS,
    ScanFacts,
    copy_patient_and_study,
    per_label,
    shown_frame,
    sibling,
)
from meddaemon.dicom.encoding import clipped
from meddaemon.dicom.equipment import contributing_equipment, copy_laterality
from meddaemon.label_results import LabelResult
from meddaemon.overlays import overlay_jpeg

KIND = "sc"
SERIES_NUMBER = 9903
#: the shorter side of the picture: a 32 x 32 model view must still be legible beside its caption
MIN_SIDE = 512
CAPTION_LINES = 3
TRANSFER_SYNTAX = JPEGBaseline8Bit
#: the Photometric Interpretation of a colour JPEG Baseline image (PS3.5 8.2.1)
PHOTOMETRIC = hd.PhotometricInterpretationValues.YBR_FULL_422


def object_key(label: str) -> str:
    return f"{KIND}:{label}"


def caption(facts: ScanFacts, result: LabelResult) -> list[str]:
    call = "called" if result.positive else "not called"
    return [
        NOT_FOR_DIAGNOSIS,
        f"{facts.algorithm_name}, model {facts.model_version}",
        f"Grad-CAM of {result.label}: p = {result.probability:.3f}, {call}",
    ]


def picture(facts: ScanFacts, result: LabelResult) -> np.ndarray:
    """uint8 RGB (rows, columns, 3): the overlay enlarged, with the caption band below it."""
    assert result.overlay_path is not None
    drawn = overlay_jpeg(result.stored_map, result.overlay_path, facts.view, result.map_size)
    if drawn is None:  # an OSError: the report stage tries again later (``writer.DicomOutputs``)
        raise FileNotFoundError(f"the overlay of {result.label} cannot be drawn from its stored map")
    with Image.open(io.BytesIO(drawn)) as image:
        overlay = image.convert("RGB")
    scale = max(1.0, MIN_SIDE / min(overlay.size))
    overlay = overlay.resize((round(overlay.width * scale), round(overlay.height * scale)), Image.Resampling.BILINEAR)
    lines = caption(facts, result)
    band = _caption_band(overlay.width, tuple(lines[:-1]))
    canvas = Image.new("RGB", (overlay.width, overlay.height + band.height), (0, 0, 0))
    canvas.paste(overlay, (0, 0))
    canvas.paste(band, (0, overlay.height))
    _draw_line(ImageDraw.Draw(canvas), overlay.width, overlay.height, len(lines) - 1, lines[-1])
    return np.asarray(canvas, dtype=np.uint8)


@functools.lru_cache(maxsize=16)
def _caption_band(width: int, lines: tuple[str, ...]) -> Image.Image:
    """The caption band of a ``width``-wide picture with its first ``lines`` drawn: the same for every
    label of a model (the warning, the algorithm and version), so drawn once, the label's line drawn
    on each picture (a chest scan's 14 captures: 53 to 47 ms of CPU, ``benchmarks/README.md``)."""
    _, line_height = _caption_font(width)
    band = Image.new("RGB", (width, line_height * CAPTION_LINES + line_height // 2), (0, 0, 0))
    draw = ImageDraw.Draw(band)
    for i, line in enumerate(lines):
        _draw_line(draw, width, 0, i, line)
    return band


def _draw_line(draw: ImageDraw.ImageDraw, width: int, top: int, index: int, line: str) -> None:
    """Caption line ``index`` of a ``width``-wide picture whose band starts at ``top``: the first yellow."""
    font, line_height = _caption_font(width)
    colour = (255, 255, 0) if index == 0 else (255, 255, 255)
    draw.text((line_height // 4, top + line_height // 4 + index * line_height), line, fill=colour, font=font)


def _caption_font(width: int) -> tuple[ImageFont.FreeTypeFont | ImageFont.ImageFont, int]:
    """The caption's font for a ``width``-wide picture, and its line height."""
    font = _font(max(12, width // 40))
    return font, int(font.size * 1.4)


def build_all(facts: ScanFacts, results: list[LabelResult]) -> list[tuple[str, Dataset]]:
    """(object key, capture) for each of ``results`` that has an overlay, numbered by its place in ``results``."""
    numbered = [(number, result) for number, result in enumerate(results, 1) if result.overlay_path]
    captures = per_label(facts, numbered, build, for_label)
    return [(object_key(result.label), ds) for (_, result), ds in zip(numbered, captures, strict=True)]


def build(facts: ScanFacts, result: LabelResult, instance_number: int = 1) -> Dataset:
    source = facts.source
    pixels = picture(facts, result)
    sc = hd.sc.SCImage(
        pixel_array=pixels,
        photometric_interpretation=PHOTOMETRIC,
        bits_allocated=8,
        coordinate_system=hd.CoordinateSystemNames.PATIENT,
        study_instance_uid=source.StudyInstanceUID,
        series_instance_uid=uids.series_uid(facts.uid_root, facts.sha256, facts.model_version, KIND),
        series_number=SERIES_NUMBER,
        sop_instance_uid=_instance_uid(facts, result),
        instance_number=instance_number,
        manufacturer=MANUFACTURER,
        patient_id=source.PatientID,
        patient_name=source.PatientName,
        patient_birth_date=source.PatientBirthDate,
        patient_sex=source.PatientSex,
        accession_number=source.AccessionNumber,
        study_id=source.StudyID,
        study_date=source.StudyDate,
        study_time=source.StudyTime,
        referring_physician_name=source.ReferringPhysicianName,
        patient_orientation=("L", "F"),  # highdicom insists; replaced by the source's (or empty) below
        contributing_equipment=[contributing_equipment(facts)],
        series_description=_series_description(facts, result),
        transfer_syntax_uid=TRANSFER_SYNTAX,
        specific_character_set=source.get("SpecificCharacterSet"),  # the names' own, as the SR's
    )
    sc.LossyImageCompression = "01"
    sc.LossyImageCompressionMethod = "ISO_10918_1"
    sc.LossyImageCompressionRatio = _ratio(pixels, sc.PixelData)
    copy_laterality(source, sc)
    copy_patient_and_study(source, sc)
    sc.PatientOrientation = source.get("PatientOrientation") or None
    sc.BurnedInAnnotation = "YES"
    sc.ImageComments = NOT_FOR_DIAGNOSIS
    sc.DerivationDescription = _derivation(facts, result)
    reference = Dataset()
    reference.ReferencedSOPClassUID = source.SOPClassUID
    reference.ReferencedSOPInstanceUID = source.SOPInstanceUID
    frame = shown_frame(source, facts.view.options.frame_policy)
    if frame is not None:  # PS3.3 10-3: required when the reference is not to every frame
        reference.ReferencedFrameNumber = frame
    sc.SourceImageSequence = [reference]
    return sc


def for_label(first: Dataset, facts: ScanFacts, result: LabelResult, instance_number: int) -> Dataset:
    """The capture of ``result`` made from ``first``, another label's capture of the same scan: a new
    dataset sharing ``first``'s elements except the label's (UID, number, descriptions, pixels); what
    ``build`` gives but for the creation times (a test compares the two). A picture of another size
    is built in full."""
    pixels = picture(facts, result)
    if pixels.shape != (int(first.Rows), int(first.Columns), int(first.SamplesPerPixel)):
        return build(facts, result, instance_number)
    pixel_data = _encoded(pixels)
    return sibling(
        first,
        SOPInstanceUID=_instance_uid(facts, result),
        InstanceNumber=instance_number,
        SeriesDescription=_series_description(facts, result),
        DerivationDescription=_derivation(facts, result),
        LossyImageCompressionRatio=_ratio(pixels, pixel_data),
        PixelData=pixel_data,
    )


def _encoded(pixels: np.ndarray) -> bytes:
    """The picture as ``build`` has highdicom encode it: one JPEG Baseline frame, encapsulated."""
    frame = encode_frame(
        pixels,
        transfer_syntax_uid=TRANSFER_SYNTAX,
        bits_allocated=8,
        bits_stored=8,
        photometric_interpretation=PHOTOMETRIC,
        pixel_representation=0,
        planar_configuration=0,
    )
    return encapsulate([frame])


def _ratio(pixels: np.ndarray, pixel_data: bytes) -> str:
    """Lossy Image Compression Ratio (DS): the picture's bytes over its encoded bytes."""
    return f"{pixels.nbytes / len(pixel_data):.2f}"


def _instance_uid(facts: ScanFacts, result: LabelResult) -> str:
    return uids.instance_uid(facts.uid_root, facts.sha256, facts.model_version, object_key(result.label))


def _series_description(facts: ScanFacts, result: LabelResult) -> str:
    return clipped(f"AI overlay: {facts.task} {result.label}", 64)


def _derivation(facts: ScanFacts, result: LabelResult) -> str:
    return f"Grad-CAM of {result.label} over the scan as {facts.algorithm_name} saw it"[:1024]


@functools.lru_cache(maxsize=8)
def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """DejaVu Sans (matplotlib ships it, as for the reports), else Pillow's own font."""
    spec = importlib.util.find_spec("matplotlib")
    if spec is not None and spec.origin:
        path = Path(spec.origin).parent / "mpl-data" / "fonts" / "ttf" / "DejaVuSans.ttf"
        if path.is_file():
            return ImageFont.truetype(str(path), size)
    return ImageFont.load_default(size)
