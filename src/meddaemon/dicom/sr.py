"""The result as a Comprehensive SR: a TID 1500 Measurement Report with one measurement group per
label, a qualitative evaluation (present or absent at the model's threshold) and the probability
as a numeric measurement, referencing the source image; the algorithm identified (TID 4019) and in
the Contributing Equipment Sequence, as IHE AI Results asks."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.valuerep import DS

from meddaemon import MANUFACTURER
from meddaemon.dicom import encoding, uids
from meddaemon.dicom.content import (
    ScanFacts,
    as_highdicom_reads_it,
    classified_frame,
    own_class_referenced,
    sibling,
)
from meddaemon.dicom.encoding import clipped
from meddaemon.dicom.equipment import SCHEME, code_value, contributing_equipment
from meddaemon.label_results import LabelResult

KIND = "sr"
SERIES_NUMBER = 9901
PRESENT = Code("52101004", "SCT", "Present")
ABSENT = Code("2667000", "SCT", "Absent")
PROBABILITY_UNIT = Code("1", "UCUM", "no units")
AI_PROCEDURE = Code("363679005", "SCT", "Imaging")


def finding_code(label: str) -> Code:
    """The label's own code: the whole label, a Long Code Value past 16 characters (truncated, two
    labels sharing their first 16 characters were one code, and a reader could not tell them apart)."""
    return Code(code_value(label), SCHEME, clipped(label, 64))


def probability_code(label: str) -> Code:
    return Code(f"P-{code_value(label)}", SCHEME, clipped(f"Probability of {label}", 64))


def build(facts: ScanFacts) -> Dataset:
    # highdicom's SR document would deep-copy the content tree to build its Python view of it and
    # search the tree twice (for the evidence, for 3D coordinates): two thirds of the SR's cost. The
    # document is built around the root container alone, and the tree (built and checked by
    # highdicom in ``measurement_report``, filled in from its pattern after a model's first scan)
    # put in after: the evidence is the source image, all that the tree references, and the tree
    # has no 3D coordinates. The same document either way.
    root = content_tree(facts)
    shell = Dataset()
    for element in root:
        if element.keyword != "ContentSequence":
            shell.add(element)
    shell.ContentSequence = Sequence()
    evidence = as_highdicom_reads_it(facts.source)
    sr = hd.sr.ComprehensiveSR(evidence=[evidence], content=shell, **document_attributes(facts))
    own_class_referenced(sr, facts.source)
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
        "series_description": clipped(f"AI result: {facts.task} {facts.model_version}", 64),
        "contributing_equipment": [contributing_equipment(facts)],
    }


def image_reference(facts: ScanFacts) -> hd.sr.SourceImageForMeasurementGroup:
    """The source image, and of a multi-frame one the frame the result was computed from."""
    frame = classified_frame(facts.source, facts.view.options.frame_policy)
    return hd.sr.SourceImageForMeasurementGroup.from_source_image(
        facts.source, referenced_frame_numbers=None if frame is None else [frame]
    )


def measurement_report(facts: ScanFacts) -> hd.sr.MeasurementReport:
    """The TID 1500 content tree: one measurement group per label."""
    algorithm = hd.sr.AlgorithmIdentification(
        name=clipped(facts.algorithm_name, 64), version=clipped(facts.model_version, 64)
    )
    device = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=uids.derived_uid(facts.uid_root, "device", facts.task, facts.model_version),
            name=clipped(facts.algorithm_name, 64),
            manufacturer_name=MANUFACTURER,
            model_name=clipped(facts.model_version, 64),
        ),
    )
    referenced = image_reference(facts)
    groups = [
        hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(
                uid=uids.derived_uid(facts.uid_root, facts.sha256, facts.model_version, "finding", r.label),
                identifier=clipped(r.label, 64),
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


#: the patterns of the models served in this process, by what their content trees depend on (at most 64)
_PATTERNS: dict[tuple[str, str, str, str, tuple[str, ...]], ReportPattern] = {}
_PATTERNS_LOCK = threading.Lock()
_MAX_PATTERNS = 64
_TRACKING_UID = "112040"
_SOURCE_OF_MEASUREMENT = "121112"


def content_tree(facts: ScanFacts) -> Dataset:
    """The root container of ``measurement_report(facts)``: the same tree, element for element,
    filled in from the pattern of the scan's model (built by highdicom for its first scan in this
    process). highdicom builds and checks every content item of a 14-label report in about 30 ms
    of CPU; a scan's own values are four items of each measurement group. The items the tree
    shares with its model's other trees are frozen (``encoding.freeze``): never change them."""
    labels = tuple(r.label for r in facts.results)
    key = (facts.uid_root, facts.task, facts.model_version, facts.algorithm_name, labels)
    pattern = _PATTERNS.get(key)
    if pattern is None:
        pattern = ReportPattern.of(measurement_report(facts)[0], labels)
        with _PATTERNS_LOCK:
            if len(_PATTERNS) >= _MAX_PATTERNS:
                _PATTERNS.clear()
            _PATTERNS[key] = pattern
    return pattern.fill(facts)


def _concept(item: Dataset) -> str:
    name = item.ConceptNameCodeSequence[0]
    return str(name.get("CodeValue") or name.LongCodeValue)


@dataclass(frozen=True)
class GroupPattern:
    """One label's measurement group as highdicom built it, and where in its content items the
    scan's own values are: the tracking UID, the probability, the call, the source image."""

    group: Dataset
    tracking_uid: int
    measurement: int
    evaluation: int
    source_image: int

    @classmethod
    def of(cls, group: Dataset, label: str) -> GroupPattern:
        items = list(group.ContentSequence)

        def where(value_type: str, concept: str) -> int:
            found = [i for i, item in enumerate(items) if item.ValueType == value_type and _concept(item) == concept]
            if len(found) != 1:
                raise ValueError(f"the measurement group of {label!r} has {len(found)} {value_type} {concept} items")
            return found[0]

        return cls(
            group,
            where("UIDREF", _TRACKING_UID),
            where("NUM", probability_code(label).value),
            where("CODE", finding_code(label).value),
            where("IMAGE", _SOURCE_OF_MEASUREMENT),
        )

    def fill(
        self, result: LabelResult, tracking_uid: str, source_image: Dataset, calls: dict[bool, Dataset]
    ) -> Dataset:
        items = list(self.group.ContentSequence)
        items[self.tracking_uid] = sibling(items[self.tracking_uid], UID=tracking_uid)
        items[self.measurement] = _measured(items[self.measurement], float(result.probability))
        items[self.evaluation] = sibling(items[self.evaluation], ConceptCodeSequence=[calls[bool(result.positive)]])
        items[self.source_image] = source_image
        return sibling(self.group, ContentSequence=items)


def _measured(item: Dataset, value: float) -> Dataset:
    """A NUM item of the pattern with another value, as highdicom's ``NumContentItem`` writes one."""
    measured = sibling(
        item.MeasuredValueSequence[0], NumericValue=DS(value, auto_format=True), FloatingPointValue=value
    )
    return sibling(item, MeasuredValueSequence=[measured])


@dataclass(frozen=True)
class ReportPattern:
    """A model's TID 1500 content tree as highdicom built it for one scan. Filling it in for another
    scan shares every content item that does not depend on the scan (the observation context, the
    algorithm, the codes) and makes new ones for what does; nothing of the pattern is changed."""

    root: Dataset
    measurements: int
    groups: tuple[GroupPattern, ...]
    calls: dict[bool, Dataset]

    @classmethod
    def of(cls, root: Dataset, labels: tuple[str, ...]) -> ReportPattern:
        """The pattern of ``root``, the tree highdicom built for a scan with results for ``labels``."""
        items = list(root.ContentSequence)
        at = next(i for i, item in enumerate(items) if _concept(item) == codes.DCM.ImagingMeasurements.value)
        groups = tuple(
            GroupPattern.of(group, label) for group, label in zip(items[at].ContentSequence, labels, strict=True)
        )
        calls = {True: hd.sr.CodedConcept.from_code(PRESENT), False: hd.sr.CodedConcept.from_code(ABSENT)}
        encoding.freeze_below(root)
        for code in calls.values():
            encoding.freeze(code)
        return cls(root, at, groups, calls)

    def fill(self, facts: ScanFacts) -> Dataset:
        image = image_reference(facts)
        encoding.freeze(image)  # in every group
        groups = [
            pattern.fill(
                result,
                uids.derived_uid(facts.uid_root, facts.sha256, facts.model_version, "finding", result.label),
                image,
                self.calls,
            )
            for pattern, result in zip(self.groups, facts.results, strict=True)
        ]
        items = list(self.root.ContentSequence)
        items[self.measurements] = sibling(items[self.measurements], ContentSequence=groups)
        return sibling(self.root, ContentSequence=items)
