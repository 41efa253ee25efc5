"""A heatmap as a Parametric Map (float pixel values, highdicom), referencing the source image.

The map keeps the resolution it was computed at (the model's input): the object's pixel measures
and position lay it over the part of the source the input showed (the whole image when the contract
stretches it, the centre crop's share with ``resize_then_crop``: ``InputContract.shown_window``).
highdicom places a map of another size than its source only within a frame of reference, which a
projection image (CR, DX, US) seldom has; the map is then given one of its own, derived like its
UIDs, the source's first pixel at its origin and the source's pixel spacing (1 mm where it has none).

A multilabel scan has a map per label called (the chestxray14 preset: about seven with random
weights). Two maps of one scan differ only in their label's parts (``for_label``); highdicom builds the
first, the others are made from it, which cost about a tenth of a build.
"""

from __future__ import annotations

import math
from typing import Any

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.sr.coding import Code
from pydicom.valuerep import format_number_as_ds

from meddaemon import MANUFACTURER
from meddaemon.dicom import uids
from meddaemon.dicom.content import (
    OutputRefused,
    ScanFacts,
    as_highdicom_reads_it,
    load_heatmap,
    own_class_referenced,
    per_label,
    sibling,
)
from meddaemon.dicom.encoding import clipped
from meddaemon.dicom.equipment import SCHEME, code_value, contributing_equipment, copy_laterality
from meddaemon.label_results import LabelResult

KIND = "pmap"
SERIES_NUMBER = 9902
NO_UNITS = Code("1", "UCUM", "no units")
AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)


def object_key(label: str) -> str:
    return f"{KIND}:{label}"


def build_all(facts: ScanFacts, results: list[LabelResult]) -> list[tuple[str, Dataset]]:
    """(object key, map) for each of ``results``, numbered from 1 in their order."""
    numbered = list(enumerate(results, 1))
    maps = per_label(facts, numbered, build, for_label)
    return [(object_key(result.label), ds) for (_, result), ds in zip(numbered, maps, strict=True)]


def build(facts: ScanFacts, result: LabelResult, instance_number: int = 1) -> Dataset:
    source = facts.source
    if int(source.get("NumberOfFrames") or 1) > 1:
        raise OutputRefused(
            "multiframe_source", "no Parametric Map of a multi-frame source: the heatmap is of one frame"
        )
    heatmap = load_heatmap(result)
    rows, columns = int(source.Rows), int(source.Columns)
    spacing = _source_spacing(source)
    placed = _with_frame_of_reference(as_highdicom_reads_it(source, geometry=True), facts, spacing)
    contract = facts.view.contract
    window = contract.shown_window(rows, columns) if contract else (0.0, 0.0, float(rows), float(columns))
    pixel_spacing, origin = _laid_over(placed, spacing, window, heatmap.shape)
    pmap = hd.pm.ParametricMap(
        source_images=[placed],
        pixel_array=heatmap,
        series_instance_uid=uids.series_uid(facts.uid_root, facts.sha256, facts.model_version, KIND),
        series_number=SERIES_NUMBER,
        sop_instance_uid=_instance_uid(facts, result),
        instance_number=instance_number,
        manufacturer=MANUFACTURER,
        manufacturer_model_name=clipped(facts.algorithm_name, 64),
        software_versions=clipped(facts.software_version, 64),
        device_serial_number=clipped(facts.model_version, 64),
        contains_recognizable_visual_features=False,
        real_world_value_mappings=[_value_mapping(result)],
        voi_lut_transformations=[hd.VOILUTTransformation(window_center=0.5, window_width=1.0)],
        plane_positions=[hd.PlanePositionSequence(hd.CoordinateSystemNames.PATIENT, origin)],
        pixel_measures=hd.PixelMeasuresSequence(pixel_spacing=pixel_spacing, slice_thickness=1.0),
        plane_orientation=hd.PlaneOrientationSequence(
            hd.CoordinateSystemNames.PATIENT, tuple(float(v) for v in placed.ImageOrientationPatient)
        ),
        series_description=_series_description(facts, result),
        content_label="HEATMAP",
        contributing_equipment=[contributing_equipment(facts)],
    )
    own_class_referenced(pmap, source)
    copy_laterality(source, pmap)
    return pmap


def for_label(first: Dataset, facts: ScanFacts, result: LabelResult, instance_number: int) -> Dataset:
    """The map of ``result`` made from ``first``, the map of another label of the same scan: a new
    dataset sharing ``first``'s elements except the label's (its UID and number, the series
    description, the value mapping, the pixels); what highdicom would build for it but for the
    creation times and the dimension organisation UID it draws anew each build (a test compares the
    two). A heatmap of another grid than ``first``'s is built in full."""
    heatmap = load_heatmap(result)
    if heatmap.shape != (int(first.Rows), int(first.Columns)):
        return build(facts, result, instance_number)
    return sibling(
        first,
        SOPInstanceUID=_instance_uid(facts, result),
        InstanceNumber=instance_number,
        SeriesDescription=_series_description(facts, result),
        SharedFunctionalGroupsSequence=[
            sibling(first.SharedFunctionalGroupsSequence[0], RealWorldValueMappingSequence=[_value_mapping(result)])
        ],
        FloatPixelData=np.ascontiguousarray(heatmap).tobytes(),
    )


def _instance_uid(facts: ScanFacts, result: LabelResult) -> str:
    return uids.instance_uid(facts.uid_root, facts.sha256, facts.model_version, object_key(result.label))


def _series_description(facts: ScanFacts, result: LabelResult) -> str:
    return clipped(f"AI heatmap: {facts.task} {result.label}", 64)


def _value_mapping(result: LabelResult) -> hd.pm.RealWorldValueMapping:
    return hd.pm.RealWorldValueMapping(
        lut_label=clipped(result.label, 16),
        lut_explanation=clipped(f"Grad-CAM of {result.label}, 0 to 1", 64),
        unit=NO_UNITS,
        value_range=(0.0, 1.0),
        slope=1.0,
        intercept=0.0,
        quantity_definition=Code(f"H-{code_value(result.label)}", SCHEME, clipped(f"Heatmap of {result.label}", 64)),
    )


def _laid_over(
    placed: Dataset, spacing: tuple[float, float], window: tuple[float, float, float, float], shape: tuple[int, ...]
) -> tuple[tuple[float, float], tuple[float, float, float]]:
    """Pixel spacing and first pixel's centre (patient coordinates) of a map of ``shape`` covering
    ``window`` (first row, first column, rows, columns, in source pixels) of ``placed``, the source
    with its frame of reference. A source pixel's centre is at its index; its edges half a pixel off."""
    first_row, first_column, shown_rows, shown_columns = window
    pixel_spacing = (spacing[0] * shown_rows / shape[0], spacing[1] * shown_columns / shape[1])
    down = first_row - 0.5 + 0.5 * shown_rows / shape[0]  # the map's first centre, in source rows
    across = first_column - 0.5 + 0.5 * shown_columns / shape[1]
    position = np.array([float(v) for v in placed.ImagePositionPatient])
    orientation = [float(v) for v in placed.ImageOrientationPatient]
    along_row, along_column = np.array(orientation[:3]), np.array(orientation[3:])
    origin = position + along_row * across * spacing[1] + along_column * down * spacing[0]
    return pixel_spacing, (float(origin[0]), float(origin[1]), float(origin[2]))


def _source_spacing(source: Dataset) -> tuple[float, float]:
    """The source's pixel spacing (row, column): its own, or its functional groups' (an enhanced
    object keeps it there), else its imager's; without one, 1 mm, in the proportion of a Pixel
    Aspect Ratio (vertical, horizontal) where it has one: its pixels are not square."""
    for value in (source.get("PixelSpacing"), _in_frame_groups(source, "PixelMeasuresSequence", "PixelSpacing"),
                  source.get("ImagerPixelSpacing")):  # fmt: skip
        if pair := _two_positive(value):
            return pair
    if ratio := _two_positive(source.get("PixelAspectRatio")):
        return ratio[0] / ratio[1], 1.0
    return 1.0, 1.0


def _two_positive(value: Any) -> tuple[float, float] | None:
    """A pair of positive finite numbers, or None for anything else: a value missing, a single number
    (pydicom reads a value of multiplicity 1 as a number, not a list), three, zero, text."""
    if not isinstance(value, (list, tuple, MultiValue)) or len(value) != 2:
        return None
    try:
        first, second = float(value[0]), float(value[1])
    except (TypeError, ValueError):
        return None
    return (first, second) if all(math.isfinite(v) and v > 0 for v in (first, second)) else None


def _orientation(value: Any) -> list[str] | None:
    """The source's Image Orientation (Patient) as the map writes it: two orthogonal unit vectors,
    made exactly so (Gram-Schmidt, 16-character decimals) when they nearly are (a vendor writing
    three decimals: ``0.999\\0.035\\0``), which dciodvfy refuses beyond 5e-5 of a unit and 1e-4 of
    orthogonal; None when they are far from it (``0\\0\\0\\0\\0\\0``, copied, failed dciodvfy):
    the map then takes a frame of reference of its own, as a projection image's does."""
    try:
        row, column = np.asarray([float(v) for v in value], dtype=float).reshape(2, 3)
    except (TypeError, ValueError):
        return None
    near = abs(np.linalg.norm(row) - 1) < 1e-2 and abs(np.linalg.norm(column) - 1) < 1e-2
    if not (near and abs(float(row @ column)) < 1e-2):
        return None
    row = row / np.linalg.norm(row)
    column = column - (row @ column) * row
    column = column / np.linalg.norm(column)
    return [format_number_as_ds(float(v)) for v in (*row, *column)]


def _in_frame_groups(source: Dataset, sequence: str, keyword: str) -> Any:
    """``keyword`` of the ``sequence`` item in the source's functional groups, shared or of its first
    frame (an enhanced object's geometry lives there, not at the top level); None when absent."""
    for groups in ("SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence"):
        for group in (source.get(groups) or [])[:1]:
            for item in (group.get(sequence) or [])[:1]:
                if keyword in item:
                    return item[keyword].value
    return None


def _with_frame_of_reference(source: Dataset, facts: ScanFacts, spacing: tuple[float, float]) -> Dataset:
    """The source header as highdicom reads it; given a frame of reference of its own when it has none.

    A new dataset holding the source's elements, the ones set here new elements (the source is never
    changed): a deep copy of the header cost about a sixth of the map's build."""
    placed = Dataset()
    for element in source:
        placed.add(element)
    for sequence, keyword in (("PlanePositionSequence", "ImagePositionPatient"),
                              ("PlaneOrientationSequence", "ImageOrientationPatient")):  # fmt: skip
        value = None if keyword in source else _in_frame_groups(source, sequence, keyword)
        if value is not None:  # an enhanced object's, at the top level where the map's geometry reads it
            placed.add_new(keyword, "DS", list(value))
    orientation = _orientation(placed.get("ImageOrientationPatient"))
    if orientation is not None:
        placed.add_new("ImageOrientationPatient", "DS", orientation)
    placed_already = "ImagePositionPatient" in placed and orientation is not None
    if not (source.get("FrameOfReferenceUID") and placed_already):
        frame = uids.derived_uid(facts.uid_root, facts.sha256, "frame-of-reference")
        placed.add_new("FrameOfReferenceUID", "UI", frame)
        placed.add_new("ImagePositionPatient", "DS", [0.0, 0.0, 0.0])
        placed.add_new("ImageOrientationPatient", "DS", list(AXIAL))
    placed.add_new("PixelSpacing", "DS", list(spacing))
    if placed.get("SliceThickness") is None:
        placed.add_new("SliceThickness", "DS", 1.0)
    return placed
