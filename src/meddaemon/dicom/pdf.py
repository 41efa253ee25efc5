"""The scan's PDF report, and the study report once the study is complete, as Encapsulated PDF
(SOP Class 1.2.840.10008.5.1.4.1.1.104.1).

The PDF is the report the report stage wrote: with patient data only when ``reports_with_phi``
is on. The DICOM header carries the source's patient and study modules, as every object sent
back to the study does (a PACS files it by them).

The study report is one series per study (``study_series_uid``); each version of it (a study report
written again because a scan was added) is an instance of its own, its UID derived from the PDF's
SHA-256: a resend of one version is the same instance, a newer version a new one.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from datetime import datetime

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, UID, ExplicitVRLittleEndian
from pydicom.valuerep import PersonName

from meddaemon import MANUFACTURER
from meddaemon.dicom import uids
from meddaemon.dicom.content import ScanFacts, copy_patient_and_study
from meddaemon.dicom.encoding import clipped
from meddaemon.dicom.equipment import contributing_equipment

KIND = "pdf"
SERIES_NUMBER = 9904
ENCAPSULATED_PDF_STORAGE = UID("1.2.840.10008.5.1.4.1.1.104.1")


STUDY_KIND = "study-pdf"
STUDY_SERIES_NUMBER = 9905


#: what reportlab writes anew each time it renders the same report: its dates and its /ID
_RENDER_STAMPS = re.compile(rb"/(?:CreationDate|ModDate) \(D:[^)]*\)|/ID\s*\[<[0-9a-fA-F]*><[0-9a-fA-F]*>\]")


def content_digest(pdf: bytes) -> str:
    """The SHA-256 of a report PDF without what changes from one rendering of it to the next: a
    study report rebuilt with nothing new in it is the same instance. Of its bytes, each rebuild
    (a scan's report rebuilt by ``medcli report``) sent the PACS another copy under a new UID."""
    return hashlib.sha256(_RENDER_STAMPS.sub(b"", pdf)).hexdigest()


def study_object_key(pdf_digest: str) -> str:
    """The outbox key of one version of a study report (``content_digest``): a new version is a new row."""
    return f"{STUDY_KIND}:{pdf_digest[:16]}"


def build(facts: ScanFacts, pdf: bytes, with_phi: bool) -> Dataset:
    return _encapsulate(
        facts.source,
        pdf,
        with_phi,
        instance_uid=uids.instance_uid(facts.uid_root, facts.sha256, facts.model_version, KIND),
        series_uid=uids.series_uid(facts.uid_root, facts.sha256, facts.model_version, KIND),
        series_number=SERIES_NUMBER,
        description=f"AI report: {facts.task} {facts.model_version}",
        title=f"meddaemon {facts.task} report",
        sources=[facts.source],
        equipment=[contributing_equipment(facts)],
    )


def build_study(scans: Sequence[ScanFacts], pdf: bytes, with_phi: bool) -> Dataset:
    """The study report of the study of ``scans`` (its DICOM scans, oldest first; one at least)."""
    first = scans[0]
    study = str(first.source.StudyInstanceUID)
    digest = content_digest(pdf)
    tasks = ", ".join(dict.fromkeys(s.task for s in scans))
    algorithms = {(s.algorithm_name, s.software_version): s for s in scans}
    return _encapsulate(
        first.source,
        pdf,
        with_phi,
        instance_uid=uids.study_object_uid(first.uid_root, study, digest, STUDY_KIND),
        series_uid=uids.study_series_uid(first.uid_root, study, STUDY_KIND),
        series_number=STUDY_SERIES_NUMBER,
        description=f"AI study report: {tasks}",
        title=f"meddaemon study report ({tasks})",
        sources=[s.source for s in scans],
        equipment=[contributing_equipment(s) for s in algorithms.values()],
    )


def _encapsulate(
    source: Dataset,
    pdf: bytes,
    with_phi: bool,
    *,
    instance_uid: UID,
    series_uid: UID,
    series_number: int,
    description: str,
    title: str,
    sources: Sequence[Dataset],
    equipment: Sequence[Dataset],
) -> Dataset:
    """The Encapsulated PDF IOD, its patient and study modules those of ``source``. Its dates are
    local time, as highdicom writes the other objects' (no offset is written: DICOM reads a time
    without one as local)."""
    now = datetime.now().astimezone()
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ENCAPSULATED_PDF_STORAGE
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.SOPClassUID = ENCAPSULATED_PDF_STORAGE
    ds.SOPInstanceUID = instance_uid
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    copy_patient_and_study(source, ds)  # with every type-2 one, empty where the source had none (read_source)
    ds.StudyInstanceUID = source.StudyInstanceUID
    # Encapsulated Document Series
    ds.Modality = "DOC"
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = series_number
    ds.SeriesDescription = clipped(description, 64)
    # General Equipment, SC Equipment
    ds.Manufacturer = MANUFACTURER
    ds.ConversionType = "WSD"
    # Encapsulated Document
    ds.InstanceNumber = 1
    ds.ContentDate = now.strftime("%Y%m%d")
    ds.ContentTime = now.strftime("%H%M%S")
    ds.AcquisitionDateTime = now.strftime("%Y%m%d%H%M%S")
    # the report shows the sources' pixels, and what is burned into them (a name, an ID) with them
    burned_in = any(str(each.get("BurnedInAnnotation", "")).strip().upper() == "YES" for each in sources)
    ds.BurnedInAnnotation = "YES" if with_phi or burned_in else "NO"
    ds.DocumentTitle = clipped(title, 64)
    concept = Dataset()
    concept.CodeValue, concept.CodingSchemeDesignator, concept.CodeMeaning = "18748-4", "LN", "Diagnostic imaging study"
    ds.ConceptNameCodeSequence = DicomSequence([concept])
    ds.MIMETypeOfEncapsulatedDocument = "application/pdf"
    ds.EncapsulatedDocument = pdf + (b"\x00" if len(pdf) % 2 else b"")
    ds.EncapsulatedDocumentLength = len(pdf)
    references = []
    for each in {str(instance.SOPInstanceUID): instance for instance in sources}.values():  # two versions: one
        reference = Dataset()
        reference.ReferencedSOPClassUID = each.SOPClassUID
        reference.ReferencedSOPInstanceUID = each.SOPInstanceUID
        references.append(reference)
    ds.SourceInstanceSequence = DicomSequence(references)
    ds.ContributingEquipmentSequence = DicomSequence(list(equipment))
    ds.InstanceCreationDate, ds.InstanceCreationTime = ds.ContentDate, ds.ContentTime
    if "SpecificCharacterSet" in source:
        ds.SpecificCharacterSet = source.SpecificCharacterSet
    elif not _in_default_repertoire(ds):  # a custom task's name, a source's undeclared accented name
        ds.SpecificCharacterSet = "ISO_IR 192"
    return ds


def _in_default_repertoire(ds: Dataset) -> bool:
    """Whether every text value of ``ds`` (names and each of several values too) is ASCII."""
    for element in ds.iterall():
        values = element.value if isinstance(element.value, (list, MultiValue)) else [element.value]
        if any(isinstance(value, (str, PersonName)) and not str(value).isascii() for value in values):
            return False
    return True
