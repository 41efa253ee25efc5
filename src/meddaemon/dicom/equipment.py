"""The algorithm named the way IHE AI Results asks: Contributing Equipment with the purpose
"Processing Equipment", the algorithm's name and version, for every object written."""

from __future__ import annotations

import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.sr.coding import Code

from meddaemon import MANUFACTURER
from meddaemon.dicom.content import ScanFacts

PROCESSING_EQUIPMENT = Code("109102", "DCM", "Processing Equipment")
#: the coding scheme of meddaemon's own concepts (a private scheme: "99" prefix, PS3.16 8.2)
SCHEME = "99MEDDAEMON"


def contributing_equipment(facts: ScanFacts) -> hd.ContributingEquipment:
    return hd.ContributingEquipment(
        manufacturer=MANUFACTURER,
        purpose_of_reference=PROCESSING_EQUIPMENT,
        manufacturer_model_name=facts.algorithm_name[:64],
        software_versions=facts.software_version[:64],
        contribution_description=f"classification by {facts.algorithm_name}, {facts.software_version}"[:64],
    )


def copy_laterality(source: Dataset, target: Dataset) -> None:
    """General Series' Laterality (type 2C: needed for paired body parts such as the breast): the
    source's, or its Image Laterality, or empty (unknown)."""
    target.Laterality = source.get("Laterality") or source.get("ImageLaterality") or None
