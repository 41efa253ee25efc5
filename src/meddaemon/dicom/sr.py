"""The result as a Comprehensive SR: a TID 1500 Measurement Report with one measurement group per
label, a qualitative evaluation (present or absent at the model's threshold) and the probability
as a numeric measurement, referencing the source image; the algorithm identified (TID 4019) and in
the Contributing Equipment Sequence, as IHE AI Results asks."""

from __future__ import annotations

from typing import Any

import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from meddaemon.dicom import uids
from meddaemon.dicom.content import MANUFACTURER, ScanFacts
from meddaemon.dicom.equipment import SCHEME, contributing_equipment

KIND = "sr"
SERIES_NUMBER = 9901
PRESENT = Code("52101004", "SCT", "Present")
ABSENT = Code("2667000", "SCT", "Absent")
PROBABILITY_UNIT = Code("1", "UCUM", "no units")
AI_PROCEDURE = Code("363679005", "SCT", "Imaging")


def finding_code(label: str) -> Code:
    return Code(label[:16], SCHEME, label[:64])


def probability_code(label: str) -> Code:
    return Code(f"P-{label}"[:16], SCHEME, f"Probability of {label}"[:64])


def build(facts: ScanFacts) -> Dataset:
    report = measurement_report(facts)
    # highdicom's SR document would deep-copy the content tree to build its Python view of it and
    # search the tree twice (for the evidence, for 3D coordinates): two thirds of the SR's cost. The
    # document is built around the root container alone, and the tree (built and checked by
    # highdicom in ``measurement_report``) put in after: the evidence is the source image, all that
    # the tree references, and the tree has no 3D coordinates. The same document either way.
    root = report[0]
    shell = Dataset()
    for element in root:
        if element.keyword != "ContentSequence":
            shell.add(element)
    shell.ContentSequence = Sequence()
    sr = hd.sr.ComprehensiveSR(evidence=[facts.source], content=shell, **document_attributes(facts))
    sr.ContentSequence = root.ContentSequence
    return sr


def document_attributes(facts: ScanFacts) -> dict[str, Any]:
    """The SR document's own attributes (``hd.sr.ComprehensiveSR`` keywords, beside evidence and content)."""
    return {
        "series_instance_uid": uids.series_uid(facts.uid_root, facts.sha256, facts.model_version, KIND),
        "series_number": SERIES_NUMBER,
        "sop_instance_uid": uids.instance_uid(facts.uid_root, facts.sha256, facts.model_version, KIND),
        "instance_number": 1,
        "manufacturer": MANUFACTURER,
        "is_complete": True,
        "series_description": f"AI result: {facts.task} {facts.model_version}"[:64],
        "contributing_equipment": [contributing_equipment(facts)],
    }


def measurement_report(facts: ScanFacts) -> hd.sr.MeasurementReport:
    """The TID 1500 content tree: one measurement group per label."""
    source = facts.source
    algorithm = hd.sr.AlgorithmIdentification(name=facts.algorithm_name[:64], version=facts.model_version[:64])
    device = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=uids.derived_uid(facts.uid_root, "device", facts.task, facts.model_version),
            name=facts.algorithm_name[:64],
            manufacturer_name=MANUFACTURER,
            model_name=facts.model_version[:64],
        ),
    )
    referenced = hd.sr.SourceImageForMeasurementGroup.from_source_image(source)
    groups = [
        hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(
                uid=uids.derived_uid(facts.uid_root, facts.sha256, facts.model_version, "finding", r.label),
                identifier=r.label[:64],
            ),
            finding_type=finding_code(r.label),
            algorithm_id=algorithm,
            source_images=[referenced],
            qualitative_evaluations=[
                hd.sr.QualitativeEvaluation(name=finding_code(r.label), value=PRESENT if r.positive else ABSENT)
            ],
            measurements=[
                hd.sr.Measurement(
                    name=probability_code(r.label),
                    value=float(r.probability),
                    unit=PROBABILITY_UNIT,
                    algorithm_id=algorithm,
                )
            ],
        )
        for r in facts.results
    ]
    return hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=device),
        procedure_reported=AI_PROCEDURE,
        imaging_measurements=groups,
    )
