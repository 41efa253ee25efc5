"""The algorithm named the way IHE AI Results asks: Contributing Equipment with the purpose
"Processing Equipment", the algorithm's name and version, for every object written."""

from __future__ import annotations

import hashlib

import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.sr.coding import Code

from meddaemon import MANUFACTURER
from meddaemon.dicom.content import ScanFacts
from meddaemon.dicom.encoding import clipped

PROCESSING_EQUIPMENT = Code("109102", "DCM", "Processing Equipment")
#: the coding scheme of meddaemon's own concepts (a private scheme: "99" prefix, PS3.16 8.2)
SCHEME = "99MEDDAEMON"


def code_value(label: str) -> str:
    """A code value for the label: itself when it is printable ASCII without a backslash, else
    derived from its hash (the meaning keeps the label). A Code Value's 16 characters are counted
    in bytes by readers, and a value outside ASCII is one no query by code can type."""
    if label.isascii() and label.isprintable() and "\\" not in label:
        return label
    return "L-" + hashlib.sha256(label.encode()).hexdigest()[:16]


def contributing_equipment(facts: ScanFacts) -> hd.ContributingEquipment:
    return hd.ContributingEquipment(
        manufacturer=MANUFACTURER,
        purpose_of_reference=PROCESSING_EQUIPMENT,
        manufacturer_model_name=clipped(facts.algorithm_name, 64),
        software_versions=clipped(facts.software_version, 64),
        contribution_description=clipped(f"classification by {facts.algorithm_name}, {facts.software_version}", 64),
    )


def copy_laterality(source: Dataset, target: Dataset) -> None:
    """General Series' Laterality (type 2C: needed for paired body parts such as the breast): the
    source's, or its Image Laterality, or empty (unknown). A series is R or L only: an image's U
    (unpaired) or B (both) leaves it empty."""
    sides = (str(source.get(keyword) or "").strip().upper() for keyword in ("Laterality", "ImageLaterality"))
    target.Laterality = next((side for side in sides if side in ("R", "L")), None)
