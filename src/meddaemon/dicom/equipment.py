"""The algorithm named the way IHE AI Results asks: Contributing Equipment with the purpose
"Processing Equipment", the algorithm's name and version, for every object written."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import highdicom as hd
import highdicom.base
import highdicom.base_content
import highdicom.content
import highdicom.image
from pydicom.dataset import Dataset
from pydicom.sr.coding import Code

from meddaemon.dicom.content import MANUFACTURER, ScanFacts

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


def _memoise_iod_lookups() -> None:
    """highdicom asks, for every object it builds, whether the source's IOD has pixel data and whether
    the new object's IOD has a Content Date: each a walk through the standard's whole module table
    (about 4 ms), for answers that depend on the SOP class alone. Remembered per process; a
    highdicom that no longer has these functions is left as it is."""
    original = getattr(highdicom.base_content, "does_iod_have_pixel_data", None)
    if original is not None and not hasattr(original, "cache_info"):
        cached = functools.cache(original)
        for module in (highdicom.base_content, highdicom.image, highdicom.content):
            if getattr(module, "does_iod_have_pixel_data", None) is original:
                module.does_iod_have_pixel_data = cached  # type: ignore[attr-defined]
    in_iod = getattr(highdicom.base, "is_attribute_in_iod", None)
    if in_iod is not None and not hasattr(in_iod, "uncached"):
        highdicom.base.is_attribute_in_iod = _remembering(in_iod)  # type: ignore[attr-defined]


def _remembering(in_iod: Callable[..., bool]) -> Callable[..., bool]:
    @functools.cache
    def plain(attribute: str, sop_class_uid: str) -> bool:
        return in_iod(attribute, sop_class_uid)

    def lookup(attribute: str, sop_class_uid: str, exclude_path_elements: Sequence[str] | None = None) -> bool:
        if exclude_path_elements is not None:
            return in_iod(attribute, sop_class_uid, exclude_path_elements)
        return plain(str(attribute), str(sop_class_uid))

    lookup.uncached = in_iod  # type: ignore[attr-defined]
    return lookup


_memoise_iod_lookups()
