"""A heatmap as a Parametric Map (float pixel values, highdicom), referencing the source image.

The map keeps the resolution it was computed at (the model's input, stretched over the whole
image): the object's pixel measures scale it over the source. highdicom places a map of another
size than its source only within a frame of reference, which a projection image (CR, DX, US)
seldom has; the map is then given one of its own, derived like its UIDs, its first pixel at the
source's first pixel and the source's pixel spacing (1 mm where it has none) scaled by the ratio
of the sizes.
"""

from __future__ import annotations

import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.sr.coding import Code

from meddaemon.dicom import uids
from meddaemon.dicom.content import MANUFACTURER, LabelResult, OutputRefused, ScanFacts, load_heatmap
from meddaemon.dicom.equipment import SCHEME, contributing_equipment, copy_laterality

KIND = "pmap"
SERIES_NUMBER = 9902
NO_UNITS = Code("1", "UCUM", "no units")
AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)


def object_key(label: str) -> str:
    return f"{KIND}:{label}"


def build(facts: ScanFacts, result: LabelResult, instance_number: int = 1) -> Dataset:
    source = facts.source
    if int(source.get("NumberOfFrames") or 1) > 1:
        raise OutputRefused(
            "multiframe_source", "no Parametric Map of a multi-frame source: the heatmap is of one frame"
        )
    heatmap = load_heatmap(result)
    rows, columns = int(source.Rows), int(source.Columns)
    spacing = _source_spacing(source)
    placed = _with_frame_of_reference(source, facts, spacing)
    pixel_spacing = (spacing[0] * rows / heatmap.shape[0], spacing[1] * columns / heatmap.shape[1])
    origin = tuple(float(v) for v in placed.ImagePositionPatient)
    mapping = hd.pm.RealWorldValueMapping(
        lut_label=result.label[:16],
        lut_explanation=f"Grad-CAM of {result.label}, 0 to 1"[:64],
        unit=NO_UNITS,
        value_range=(0.0, 1.0),
        slope=1.0,
        intercept=0.0,
        quantity_definition=Code(f"H-{result.label}"[:16], SCHEME, f"Heatmap of {result.label}"[:64]),
    )
    pmap = hd.pm.ParametricMap(
        source_images=[placed],
        pixel_array=heatmap,
        series_instance_uid=uids.series_uid(facts.uid_root, facts.sha256, facts.model_version, KIND),
        series_number=SERIES_NUMBER,
        sop_instance_uid=uids.instance_uid(facts.uid_root, facts.sha256, facts.model_version, object_key(result.label)),
        instance_number=instance_number,
        manufacturer=MANUFACTURER,
        manufacturer_model_name=facts.algorithm_name[:64],
        software_versions=facts.software_version[:64],
        device_serial_number=facts.model_version[:64],
        contains_recognizable_visual_features=False,
        real_world_value_mappings=[mapping],
        voi_lut_transformations=[hd.VOILUTTransformation(window_center=0.5, window_width=1.0)],
        plane_positions=[hd.PlanePositionSequence(hd.CoordinateSystemNames.PATIENT, origin)],
        pixel_measures=hd.PixelMeasuresSequence(pixel_spacing=pixel_spacing, slice_thickness=1.0),
        plane_orientation=hd.PlaneOrientationSequence(
            hd.CoordinateSystemNames.PATIENT, tuple(float(v) for v in placed.ImageOrientationPatient)
        ),
        series_description=f"AI heatmap: {facts.task} {result.label}"[:64],
        content_label="HEATMAP",
        contributing_equipment=[contributing_equipment(facts)],
    )
    copy_laterality(source, pmap)
    return pmap


def _source_spacing(source: Dataset) -> tuple[float, float]:
    for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
        value = source.get(keyword)
        if value is not None and len(value) == 2 and all(float(v) > 0 for v in value):
            return float(value[0]), float(value[1])
    return 1.0, 1.0


def _with_frame_of_reference(source: Dataset, facts: ScanFacts, spacing: tuple[float, float]) -> Dataset:
    """The source header as highdicom reads it; given a frame of reference of its own when it has none.

    A new dataset holding the source's elements, the ones set here new elements (the source is never
    changed): a deep copy of the header cost about a sixth of the map's build."""
    placed = Dataset()
    for element in source:
        placed.add(element)
    placed_already = "ImagePositionPatient" in source and "ImageOrientationPatient" in source
    if not (source.get("FrameOfReferenceUID") and placed_already):
        frame = uids.derived_uid(facts.uid_root, facts.sha256, "frame-of-reference")
        placed.add_new("FrameOfReferenceUID", "UI", frame)
        placed.add_new("ImagePositionPatient", "DS", [0.0, 0.0, 0.0])
        placed.add_new("ImageOrientationPatient", "DS", list(AXIAL))
    placed.add_new("PixelSpacing", "DS", list(spacing))
    if placed.get("SliceThickness") is None:
        placed.add_new("SliceThickness", "DS", 1.0)
    return placed
