"""What the DICOM objects of one scan are made of: its stored result rows, heatmap files and source
header, read once; the builders (``sr``, ``pmap``, ``sc``, ``pdf``) are pure functions of it."""

from __future__ import annotations

import copy
import functools
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from pydicom import dcmread
from pydicom.charset import convert_encodings, python_encoding
from pydicom.datadict import dictionary_VM
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.multival import MultiValue
from pydicom.valuerep import format_number_as_ds
from sqlalchemy import select
from sqlalchemy.orm import Session

from meddaemon import __version__
from meddaemon.daemon.filing import view_path
from meddaemon.db.models import Heatmap, ModelVersion, Result, Scan
from meddaemon.db.queries import newest_version_of
from meddaemon.dicom import encoding, value_forms
from meddaemon.dicom.uids import uid_like
from meddaemon.engine.decode.types import DecodeOptions
from meddaemon.engine.heatmap_grid import read_map
from meddaemon.engine.tasks import InputContract
from meddaemon.label_results import LabelResult
from meddaemon.overlays import ViewSource
from meddaemon.stored_paths import stored_file

#: type-2 attributes of the Patient and General Study modules: present, empty when the source had none
TYPE2_PATIENT_STUDY = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "StudyID",
    "AccessionNumber",
)
#: the root-level attributes of the source's Patient, General Study and Patient Study modules (PS3.3
#: C.7.1.1, C.7.2.1, C.7.2.2), which every object copies as the source has them: highdicom copies them
#: into the SR and the Parametric Map; the capture and the PDF took the type-2 ones alone, so that
#: a PACS matching on the issuer of the patient's ID saw two objects of the study without one
PATIENT_AND_STUDY = (
    # Patient
    "PatientName", "PatientID", "IssuerOfPatientID", "IssuerOfPatientIDQualifiersSequence", "TypeOfPatientID",
    "PatientBirthDate", "PatientBirthTime", "PatientSex", "QualityControlSubject", "ReferencedPatientSequence",
    "OtherPatientIDsSequence", "OtherPatientNames", "EthnicGroup", "PatientComments", "PatientSpeciesDescription",
    "PatientSpeciesCodeSequence", "PatientBreedDescription", "PatientBreedCodeSequence", "BreedRegistrationSequence",
    "ResponsiblePerson", "ResponsiblePersonRole", "ResponsibleOrganization", "PatientIdentityRemoved",
    "DeidentificationMethod", "DeidentificationMethodCodeSequence",
    # General Study
    "StudyDate", "StudyTime", "ReferringPhysicianName", "ReferringPhysicianIdentificationSequence",
    "ConsultingPhysicianName", "StudyID", "AccessionNumber", "IssuerOfAccessionNumberSequence", "StudyDescription",
    "PhysiciansOfRecord", "NameOfPhysiciansReadingStudy", "RequestingServiceCodeSequence",
    "ReferencedStudySequence", "ProcedureCodeSequence", "ReasonForPerformedProcedureCodeSequence",
    # Patient Study
    "AdmittingDiagnosesDescription", "AdmittingDiagnosesCodeSequence", "PatientAge", "PatientSize", "PatientWeight",
    "PatientBodyMassIndex", "MedicalAlerts", "Allergies", "SmokingStatus", "PregnancyStatus", "LastMenstrualDate",
    "PatientState", "Occupation", "AdditionalPatientHistory", "AdmissionID", "ServiceEpisodeID",
    "ServiceEpisodeDescription", "PatientSexNeutered",
)  # fmt: skip
#: the longest value of each text VR (PS3.5 6.2), in characters
TEXT_LIMITS = {"SH": 16, "LO": 64, "ST": 1024, "LT": 10240, "CS": 16, "PN": 64}


def copy_patient_and_study(source: Dataset, ds: Dataset) -> None:
    """The source's patient and study attributes (``PATIENT_AND_STUDY``) into ``ds``, as they are."""
    for keyword in PATIENT_AND_STUDY:
        if keyword in source:
            ds[keyword] = copy.deepcopy(source[keyword])


def shown_frame(source: Dataset, frame_policy: str) -> int | None:
    """The 1-based frame of a multi-frame source its heatmaps and capture show: the frame the engine
    keeps the maps of (``engine.decode.dicom.key_frame_index``, or the middle one when every frame
    ran); None for a single frame."""
    from meddaemon.engine.decode.dicom import key_frame_index

    try:
        frames = int(source.get("NumberOfFrames") or 1)
    except (TypeError, ValueError):
        return None
    if frames <= 1 or not _multiframe_iod(source):
        return None
    return (frames // 2 if frame_policy == "all" else key_frame_index(source, frames)[0]) + 1


def _multiframe_iod(source: Dataset) -> bool:
    """Whether the source's SOP class is a multi-frame one, which its references may name a frame of
    (highdicom's own test): frames under a single-frame class (a Secondary Capture holding two) made
    the SR refuse to build and the capture fail dciodvfy ("Referenced Frame Number shall not be
    present")."""
    from highdicom._standard_utils import is_multiframe_image

    try:
        return bool(is_multiframe_image(source))
    except Exception:  # a SOP class highdicom does not know: referenced whole, as dciodvfy expects
        return False


#: the class highdicom is told a source is of where it cannot build from the source's own (its IOD
#: has the patient and study modules every image's has, and its geometry at the top level)
STAND_IN_CLASS = "1.2.840.10008.5.1.4.1.1.7"


def as_highdicom_reads_it(source: Dataset, geometry: bool = False) -> Dataset:
    """``source``, or a sibling of it of ``STAND_IN_CLASS`` where highdicom cannot build from it:
    highdicom copies the patient and study modules by the source's IOD, which a private SOP class
    has none of (the SR and the map failed with a ``KeyError``), and, with ``geometry`` (the map),
    reads a multi-frame IOD's geometry from functional groups, which Ophthalmic Photography has none
    of. ``own_class_referenced`` puts the source's class back in what the object references."""
    from highdicom._standard_utils import get_sop_class_iod_map

    known = str(source.SOPClassUID) in get_sop_class_iod_map()
    without_groups = geometry and _multiframe_iod(source) and "SharedFunctionalGroupsSequence" not in source
    return sibling(source, SOPClassUID=STAND_IN_CLASS) if not known or without_groups else source


def own_class_referenced(ds: Dataset, source: Dataset) -> None:
    """Every reference in ``ds`` to ``source`` naming its class as ``STAND_IN_CLASS`` (built from
    ``as_highdicom_reads_it``) names the source's own class."""
    uid, own_class = str(source.SOPInstanceUID), str(source.SOPClassUID)
    if own_class == STAND_IN_CLASS:
        return
    for element in ds.iterall():
        if element.VR != "SQ":
            continue
        for item in element.value:
            if item.get("ReferencedSOPInstanceUID") == uid and item.get("ReferencedSOPClassUID") == STAND_IN_CLASS:
                item.ReferencedSOPClassUID = own_class


def classified_frame(source: Dataset, frame_policy: str) -> int | None:
    """The 1-based frame of a multi-frame source its results were computed from (the key frame);
    None where every frame was (``frame_policy = "all"``) or there is one."""
    return None if frame_policy == "all" else shown_frame(source, frame_policy)


#: what a source must have for its results to join its study; without one the outputs fail by name
REQUIRED_SOURCE = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID")
NOT_FOR_DIAGNOSIS = "NOT FOR DIAGNOSIS: research software output"


class OutputRefused(Exception):
    """A scan's DICOM outputs cannot be made; ``reason`` is a short code, the message a sentence."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class ScanFacts:
    """One inferred scan: its result under one model version, and its source DICOM header."""

    scan_id: int
    sha256: str
    task: str
    model_version: str
    architecture: str
    results: tuple[LabelResult, ...]
    source: Dataset
    uid_root: str
    #: the scan as the model saw it, for overlays drawn on first use (``meddaemon.overlays``)
    view: ViewSource = field(default_factory=ViewSource)

    @property
    def algorithm_name(self) -> str:
        return f"meddaemon {self.task} ({self.architecture})"

    @property
    def software_version(self) -> str:
        return f"model {self.model_version}; meddaemon {__version__}"

    def heatmaps(self) -> list[LabelResult]:
        return [r for r in self.results if r.overlay_path is not None]


def scan_facts(
    session: Session, scan_id: int, state_dir: Path, uid_root: str, options: DecodeOptions | None = None
) -> ScanFacts:
    """The facts of a DICOM scan with results; ``OutputRefused`` when it has none to give. ``options``:
    the daemon's decoding, which says the frame a multi-frame scan was shown by."""
    scan = session.get(Scan, scan_id)
    if scan is None:
        raise LookupError(f"no scan {scan_id}")
    if scan.format != "dicom" or scan.sha256 is None or scan.stored_path is None:
        raise OutputRefused("not_dicom", "the scan did not arrive as DICOM: there is no study to join")
    version_id = session.scalar(select(newest_version_of(scan_id)))
    if version_id is None:
        raise OutputRefused("no_result", "the scan has no stored result")
    model = session.get(ModelVersion, version_id)
    assert model is not None
    rows = session.execute(
        select(Result, Heatmap)
        .outerjoin(Heatmap, Heatmap.result_id == Result.id)
        .where(Result.scan_id == scan_id, Result.model_version_id == version_id)
        .order_by(Result.id)
    ).all()
    results = tuple(
        LabelResult(
            r.label,
            r.probability,
            r.threshold,
            r.positive,
            stored_file(h.array_path, state_dir) if h is not None and h.array_path is not None else None,
            stored_file(h.overlay_path, state_dir) if h is not None else None,
            (h.height, h.width) if h is not None else None,
            h.grid if h is not None else None,
        )
        for r, h in rows
    )
    stored = stored_file(scan.stored_path, state_dir)
    source = read_source(stored)
    contract = (model.manifest or {}).get("input_contract")
    overlays = [r.overlay_path for r in results if r.overlay_path is not None]
    view = ViewSource(
        view_path(overlays[0].parents[2], scan.sha256, version_id) if overlays else None,
        stored,
        InputContract.from_dict(contract) if contract else None,
        options or DecodeOptions(),
    )
    return ScanFacts(
        scan.id, scan.sha256, model.task_name, model.version, model.architecture, results, source, uid_root, view
    )


def read_source(path: Path) -> Dataset:
    """The source's header (no pixel data), with the empty type-2 patient and study attributes the
    standard allows where it had none; ``OutputRefused`` when it lacks what a study needs."""
    try:
        ds = dcmread(path, stop_before_pixels=True, force=True)
    except Exception as exc:
        raise OutputRefused("source_unreadable", f"the source DICOM cannot be read ({type(exc).__name__})") from None
    missing = [keyword for keyword in REQUIRED_SOURCE if not ds.get(keyword)]
    if missing:
        raise OutputRefused(
            "source_without_study", f"the source lacks {', '.join(missing)}: its results cannot join its study"
        )
    malformed = [keyword for keyword in REQUIRED_SOURCE if not uid_like(ds[keyword].value)]
    if malformed:
        raise OutputRefused(
            "source_malformed_uid",
            f"the source's {', '.join(malformed)} is not a UID (digits and dots): its results cannot join its study",
        )
    for keyword in TYPE2_PATIENT_STUDY:
        if keyword not in ds:
            setattr(ds, keyword, None)
    _normalise_character_set(ds)
    _clip_text(ds)
    sex = str(ds.PatientSex or "").strip().upper()
    ds.PatientSex = sex if sex in PATIENT_SEXES else None  # "U", "m": highdicom refuses them, the object with
    return ds


def _clip_text(ds: Dataset, encodings: list[str] | None = None, top: bool = True) -> bool:
    """Text values longer than their VR allows, cut to its length in ``ds``'s character set (the
    source's, in which they are written back, or UTF-8 where the objects take it): copied as they
    came (a vendor's 70-character Study Description, a 91-character Patient's Name, a 77-character
    Code Meaning in the Procedure Code Sequence), they made every object fail dciodvfy. Inside the
    sequences the objects copy (``PATIENT_AND_STUDY``; an item takes its dataset's set unless it
    names its own) a code is never cut into another code: a Code Value over 16 characters becomes
    the item's Long Code Value, and an item holding another code or term too long for its VR
    (a coding scheme's name, a CS value) is left out. A decimal string written longer than its 16
    characters (``70.12345678901234567``) is written again in 16, and a date, time, age or name in
    the form the standard gives it (``value_forms``). A sequence left with no item is
    removed at the top level; below, its item goes too (False: an item that must not be kept), as
    an empty sequence fails where one item is required."""
    if "SpecificCharacterSet" in ds or encodings is None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a set pydicom does not know: its default, as it reads the values
            encodings = convert_encodings(ds.get("SpecificCharacterSet") or "ISO_IR 6")
    for element in list(ds):
        vr = str(element.VR)
        if vr == "SQ":
            if top and element.keyword not in PATIENT_AND_STUDY:
                continue  # not copied (an enhanced header's thousands of functional groups)
            items = list(element.value or ())
            kept = [item for item in items if _clip_item(item, encodings)]
            if items and not kept:
                if not top:
                    return False
                del ds[element.tag]
            elif len(kept) != len(items):
                element.value = kept
            continue
        _one_value(element)
        if vr == "DS":
            _shorten_decimals(ds, element)
            continue
        if vr in value_forms.BY_VR:
            _in_standard_form(ds, element)
            continue
        _clip_element(element, encodings)
    return True


#: the identifiers a PACS files a study under (Orthanc's study is its Patient ID and Study Instance
#: UID): copied as the source wrote them, even several values where the standard allows one, so the
#: results join the study the source is in rather than a study of their own
FILED_UNDER = ("PatientID", "IssuerOfPatientID", "AccessionNumber", "StudyID")
#: the text VRs whose values ``_one_value`` joins; of the others (names, codes, dates) it keeps the first
_JOINED_VRS = ("SH", "LO", "ST", "LT", "UT", "UC")


def _one_value(element: Any) -> None:
    """An attribute of one value (its dictionary's VM) that the source gave several (a backslash in
    ``SYNTHETIC^ONE\\SYNTHETIC^TWO``, ``US BREAST\\LEFT``) in one: a text's values joined by a space,
    a name's, date's or code's first given (an empty first one is none). highdicom refused a name of
    two values (the SR, the map and the capture were dead as ``build_failed``) and dciodvfy every
    such object."""
    if element.keyword in FILED_UNDER or not isinstance(element.value, MultiValue) or len(element.value) < 2:
        return
    try:
        if dictionary_VM(element.tag) != "1":
            return
    except KeyError:  # a private or unknown tag: not copied
        return
    values = [str(v) for v in element.value if str(v)]
    element.value = (" ".join(values) if str(element.VR) in _JOINED_VRS else values[0]) if values else None


def _in_standard_form(ds: Dataset, element: Any) -> None:
    """A date, time, date-time or age in the form PS3.5 gives it (``value_forms``); one that means
    nothing written empty where the objects need the attribute (type 2), left out elsewhere."""
    if element.value is None or element.value == "":
        return
    values = [str(v) for v in _values(element.value)]
    form = value_forms.BY_VR[str(element.VR)]
    written = [w for w in (form(v) if v else "" for v in values) if w is not None]
    if written == values:
        return
    if not written:
        if element.keyword in TYPE2_PATIENT_STUDY:
            element.value = None
        else:
            del ds[element.tag]
        return
    element.value = written if len(written) > 1 else written[0]


def _values(value: Any) -> list[Any]:
    """An element's value as the list of its values (one, or a multi-value's)."""
    return list(value) if isinstance(value, (list, MultiValue)) else [value]


def _clip_element(element: Any, encodings: list[str]) -> None:
    limit = TEXT_LIMITS.get(str(element.VR))
    if limit is None or element.value is None:
        return
    values = _values(element.value)
    if element.VR == "PN":  # each component group (alphabetic, ideographic, phonetic) holds 64 characters
        clipped = [
            "=".join(encoding.clipped(value_forms.person_name(g), limit, encodings) for g in str(v).split("="))
            for v in values
        ]
    elif all(isinstance(v, str) for v in values):
        clipped = [encoding.clipped(v, limit, encodings) for v in values]
    else:
        return
    if clipped != [str(v) for v in values]:
        element.value = clipped if len(clipped) > 1 else clipped[0]


#: the VRs of codes and terms, which a cut would turn into other ones
_CODE_VRS = ("SH", "CS")


def _clip_item(item: Dataset, encodings: list[str]) -> bool:
    """``_clip_text`` of one item of a copied sequence; False when the item is to be left out."""
    code_value = item.get("CodeValue")
    if isinstance(code_value, str) and len(code_value) > TEXT_LIMITS["SH"] and "LongCodeValue" not in item:
        item.LongCodeValue = code_value  # UC, as PS3.3 8.8 asks for a code value over 16 characters
        del item.CodeValue
    for element in item:
        if str(element.VR) in _CODE_VRS and element.value is not None:
            values = _values(element.value)
            if any(isinstance(v, str) and len(v) > TEXT_LIMITS[str(element.VR)] for v in values):
                return False
    return _clip_text(item, encodings, top=False)


def _shorten_decimals(ds: Dataset, element: Any) -> None:
    """A DS value over 16 characters, as the closest that fits (empty values kept); one that is no
    number, dropped."""
    raw = element.value
    if raw is None or raw == "":
        return
    values = _values(raw)
    if all(len(str(getattr(v, "original_string", None) or v)) <= 16 for v in values):
        return
    try:
        shortened = [format_number_as_ds(float(v)) if v not in (None, "") else "" for v in values]
    except (TypeError, ValueError, OverflowError):
        del ds[element.tag]
        return
    element.value = shortened if len(shortened) > 1 else shortened[0]


@functools.cache
def _highdicom_sets() -> frozenset[str]:
    """The Specific Character Set terms highdicom's objects take (highdicom imported on first use)."""
    from highdicom.enum import SpecificCharacterSetValues

    return frozenset(term.value for term in SpecificCharacterSetValues)


#: the enumerated values of Patient's Sex; anything else is written empty (type 2)
PATIENT_SEXES = ("M", "F", "O")


def _normalise_character_set(ds: Dataset) -> None:
    """Specific Character Set in the defined terms highdicom takes, meaning the same: with code
    extensions the default repertoire's empty first value is "ISO 2022 IR 6" (Japanese and Korean
    sources write ``\\ISO 2022 IR 87``), and a lone "ISO_IR 6" (which vendors write) is no value at all.
    highdicom refused both, and the scan had no SR and no parametric map."""
    value = ds.get("SpecificCharacterSet")
    if value is None:
        return
    terms = [str(v).strip() for v in (value if isinstance(value, (list, tuple, MultiValue)) else [value])]
    if len(terms) > 1 and terms[0] in ("", "ISO_IR 6"):
        terms[0] = "ISO 2022 IR 6"
    if terms in ([], [""], ["ISO_IR 6"]):
        del ds.SpecificCharacterSet
    elif not set(terms) <= _highdicom_sets():
        # a defined term highdicom does not list (Korean's ISO 2022 IR 149) or a spelling pydicom
        # reads and the standard does not (ISO-IR 100, UTF-8): the SR, the map and the capture
        # failed to build, and the PDF carried the bad term. The names go in UTF-8, read as pydicom
        # reads them in the source's set
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds.decode()
        ds.SpecificCharacterSet = "ISO_IR 192"
    else:
        ds.SpecificCharacterSet = terms if len(terms) > 1 else terms[0]


def declaring_its_text(facts: ScanFacts) -> ScanFacts:
    """``facts`` whose source declares a character set that holds the objects' own text too (the
    labels, the task, the architecture, the model version, written beside the source's names): a
    custom label outside it went out undeclared (``é`` as Latin-1 in an object naming no character
    set) or as ``?``. Where the source's set does not hold it, the objects are in UTF-8 (ISO_IR 192),
    the source's names decoded in its own set first."""
    texts = [facts.task, facts.architecture, facts.model_version, *(r.label for r in facts.results)]
    if all(text.isascii() for text in texts):
        return facts
    value = facts.source.get("SpecificCharacterSet")
    if isinstance(value, str) and _holds(python_encoding.get(value), texts):
        return facts
    source = copy.deepcopy(facts.source)
    source.decode()
    source.SpecificCharacterSet = "ISO_IR 192"
    _clip_text(source)  # cut to fit the source's set, a value may not fit in UTF-8
    return replace(facts, source=source)


def _holds(codec: str | None, texts: list[str]) -> bool:
    """Whether every text is in the character set of ``codec`` in no more bytes than UTF-8 spends
    (what ``encoding.clipped`` counts)."""
    if codec is None:
        return False
    try:
        return all(len(text.encode(codec)) <= len(text.encode()) for text in texts)
    except UnicodeEncodeError:
        return False


def load_heatmap(result: LabelResult) -> np.ndarray:
    assert result.stored_map is not None and result.map_size is not None
    return read_map(result.stored_map, result.map_size)


def sibling(first: Dataset, **values: Any) -> Dataset:
    """A dataset holding ``first``'s elements (and file meta, and preamble) but for ``values``
    (keyword: value, each an element ``first`` has), which are new elements of the same VR (a new
    SOP Instance UID in the file meta too): ``first`` never changes (pydicom sets a value on the
    element a dataset holds, which a sibling shares)."""
    ds = Dataset()
    for element in first:
        ds.add(element)
    if hasattr(first, "file_meta"):
        ds.file_meta = FileMetaDataset()
        for element in first.file_meta:
            ds.file_meta.add(element)
    if hasattr(first, "preamble"):
        ds.preamble = first.preamble
    for keyword, value in values.items():
        ds.add_new(keyword, first[keyword].VR, value)  # a new element: the shared one is left alone
    if "SOPInstanceUID" in values and hasattr(ds, "file_meta"):
        ds.file_meta.add_new("MediaStorageSOPInstanceUID", "UI", values["SOPInstanceUID"])
    return ds


def per_label(
    facts: ScanFacts,
    numbered: list[tuple[int, LabelResult]],
    build: Callable[[ScanFacts, LabelResult, int], Dataset],
    for_label: Callable[[Dataset, ScanFacts, LabelResult, int], Dataset],
) -> list[Dataset]:
    """One object for each (instance number, result) of a scan: the first built in full, the others
    made from it (``for_label``), its items frozen once a second follows (``encoding.freeze_below``):
    they are the others' too, encoded once."""
    objects: list[Dataset] = []
    for number, result in numbered:
        if objects:
            if len(objects) == 1:
                encoding.freeze_below(objects[0])
            objects.append(for_label(objects[0], facts, result, number))
        else:
            objects.append(build(facts, result, number))
    return objects
