"""Where highdicom spends time for nothing in meddaemon's objects, replaced in place (``apply``, which
the objects' ``writer`` calls as it is imported). Each replacement answers as highdicom's own does
(tests compare the two); a highdicom that no longer has the function replaced is left as it is."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import highdicom._standard_utils
import highdicom.base
import highdicom.base_content
import highdicom.content
import highdicom.image
import highdicom.sr.coding
import highdicom.sr.content
from pydicom.dataset import Dataset
from pydicom.tag import Tag

#: where ``CodedConcept.value`` looks, in its order: CodeValue, LongCodeValue, URNCodeValue
_CODE_VALUE_TAGS = (Tag(0x0008, 0x0100), Tag(0x0008, 0x0119), Tag(0x0008, 0x0120))


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
    in_iod = getattr(highdicom._standard_utils, "is_attribute_in_iod", None)
    if in_iod is not None and not hasattr(in_iod, "uncached"):
        remembering = _remembering(in_iod)
        # where it is called: the standard's own helpers (whether an IOD is multi-frame, asked about
        # six times a Parametric Map), and the modules that imported it by name
        for module in (highdicom._standard_utils, highdicom.base, highdicom.sr.content):
            if getattr(module, "is_attribute_in_iod", None) is in_iod:
                module.is_attribute_in_iod = remembering  # type: ignore[attr-defined]


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


def _remember_module_trees() -> None:
    """A multi-frame image's dimension index builds the tree of its functional groups module from
    the standard's tables for every object (a tenth of a Parametric Map's build); the same tree
    for the same module, which ``highdicom.image`` only reads. Remembered per process."""
    construct = getattr(highdicom.image, "construct_module_tree", None)
    if construct is not None and not hasattr(construct, "cache_info"):
        highdicom.image.construct_module_tree = functools.cache(construct)  # type: ignore[attr-defined]


def _hash_codes_directly() -> None:
    """An SR's content tree keys every content item by its concept name: about 900 hashes of a
    ``CodedConcept`` for a 14-label report, each reading three attributes by keyword, two of which
    are missing (an exception each): a seventh of the SR's build. The same hash, read by tag."""
    concept = highdicom.sr.coding.CodedConcept
    if "__hash__" in vars(concept) and not hasattr(concept.__hash__, "original"):
        _code_hash.original = concept.__hash__  # type: ignore[attr-defined]
        concept.__hash__ = _code_hash  # type: ignore[method-assign,assignment]


def _code_hash(code: Dataset) -> int:
    value = next((code[tag].value for tag in _CODE_VALUE_TAGS if tag in code), None)
    return hash(code.CodingSchemeDesignator + value)


def apply() -> None:
    """Every replacement, once per process (again: nothing)."""
    _memoise_iod_lookups()
    _remember_module_trees()
    _hash_codes_directly()
