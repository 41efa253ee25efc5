"""A built object as the bytes of a DICOM file (Explicit VR Little Endian), the same bytes pydicom's
``dcmwrite`` gives, with less of its per-element work where the objects have most elements: in
their sequences.

pydicom encodes every item of every sequence with its generic ``write_dataset``: for a dataset it
did not read, each item runs the ambiguous-VR correction over its whole subtree again (so an item
``d`` levels deep is corrected ``d`` times), and each element converts its character sets anew
inside an exception context. An SR's content tree is nearly all items: that was most of its
encoding time. Here the correction runs once over the whole object, each item's character sets
are converted once, a single ASCII string (most of an SR's values: codes, UIDs) is written as
pydicom's ``write_string`` and ``write_text`` write it, and every other value by pydicom's own
writer for its VR. Anything unusual (a value too long for its VR's length field, an undefined
length, a buffered value) is left to pydicom's ``write_data_element`` whole. The top-level elements
are written the same way after the file meta, which pydicom's ``write_file_meta_info`` completes,
checks and writes as ``dcmwrite`` has it do (``dcmwrite`` itself deep-copied the file meta and went
through its checks again for every object: about half of a busi scan's encoding). The encapsulated
syntaxes encode the data set as Explicit VR Little Endian does, their pixel data of undefined length
(a Secondary Capture's JPEG Baseline frame): written the same way. An object of another transfer
syntax, or one ``dcmwrite`` would refuse, is written by ``dcmwrite``.

An item ``freeze`` was called on is encoded once and its bytes reused wherever it appears again: the
content items an SR shares with every other SR of its model (``sr.ReportPattern``), the items a
multilabel scan's maps and captures share with its first (``pmap.for_label``, ``sc.for_label``).
"""

from __future__ import annotations

import io
import struct
import warnings
import weakref
from collections.abc import Sequence

from pydicom.charset import convert_encodings, default_encoding, encode_string
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import (
    correct_ambiguous_vr_element,
    dcmwrite,
    write_data_element,
    write_file_meta_info,
    writers,
)
from pydicom.tag import Tag
from pydicom.uid import UID, ExplicitVRLittleEndian
from pydicom.valuerep import AMBIGUOUS_VR, CUSTOMIZABLE_CHARSET_VR, EXPLICIT_VR_LENGTH_32, VR

_ITEM = b"\xfe\xff\x00\xe0"
_HEADER_16 = struct.Struct("<HH2sH")
_HEADER_32 = struct.Struct("<HH2s2xL")
#: the VRs whose single ASCII string pydicom writes as it is, padded to an even length with this byte
_ASCII_PADDING = {vr: b" " for vr in (VR.AE, VR.AS, VR.CS, VR.UR, VR.LO, VR.LT, VR.SH, VR.ST, VR.UC, VR.UT)}
_ASCII_PADDING[VR.UI] = b"\0"
_GROUP_LENGTH = Tag(0x0002, 0x0000)
#: the frozen items, by id: a weak reference to the item, and its bytes by the character sets of its parent
_FROZEN: dict[int, tuple[weakref.ref[Dataset], dict[tuple[str, ...], bytes]]] = {}


def clipped(text: str, limit: int, encodings: Sequence[str] = ()) -> str:
    """``text``'s longest start that fits a value of ``limit`` bytes (an SH's 16, an LO's 64):
    readers count the bytes. Without ``encodings``, in UTF-8, which covers every set the objects'
    own text is written in (``content.declaring_its_text`` keeps a source's set only where it spends
    no more bytes); with them (Python's names of a dataset's character set, ``pydicom.charset``'s
    ``convert_encodings``), in that set: a source's own values are written back in it, where ISO
    2022 spends an escape sequence at each switch between ASCII and kanji, and Latin-1 one byte an
    accented letter."""
    if not encodings:
        encoded = text.encode()
        return text if len(encoded) <= limit else encoded[:limit].decode(errors="ignore")
    if text.isascii():  # a byte each in every set
        return text[:limit]
    if _encoded_length(text, encodings) <= limit:
        return text
    fits, too_long = 0, len(text)
    while too_long - fits > 1:  # a longer start never takes fewer bytes
        middle = (fits + too_long) // 2
        fits, too_long = (middle, too_long) if _encoded_length(text[:middle], encodings) <= limit else (fits, middle)
    return text[:fits]


def _encoded_length(text: str, encodings: Sequence[str]) -> int:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a character outside the set is written as "?", a byte
        return len(encode_string(text, list(encodings)))


def freeze(item: Dataset) -> None:
    """A promise that ``item`` and everything in it never change again: its bytes are then made
    once and reused wherever it is an item of a sequence. An item with an ambiguous VR anywhere in
    it is left unfrozen (how it is written may depend on the datasets around it)."""
    if _frozen(item) is not None or any(element.VR in AMBIGUOUS_VR for element in item.iterall()):
        return
    key = id(item)
    _FROZEN[key] = (weakref.ref(item, lambda _gone, key=key: _FROZEN.pop(key, None)), {})


def freeze_below(ds: Dataset) -> None:
    """``freeze`` every item of ``ds``'s sequences, at every depth (``ds`` itself may still change)."""
    for element in ds.iterall():
        if element.VR == VR.SQ:
            for item in element.value:
                freeze(item)


def encode(ds: Dataset) -> bytes:
    """``ds`` as a DICOM file: preamble, file meta and data set, as ``ds.save_as(..,
    enforce_file_format=True)`` writes it; the ambiguous VRs of ``ds`` are resolved in place."""
    syntax = _transfer_syntax(ds)
    if "PixelData" in ds and syntax is not None:
        ds["PixelData"].is_undefined_length = syntax.is_compressed  # as ``dcmwrite`` sets it (PS3.5 A.4)
    _correct_ambiguous_vr(ds, [ds])
    meta = _file_meta(ds)
    if meta is None:  # pydicom's own writer, all of it
        buffer = io.BytesIO()
        dcmwrite(buffer, ds, enforce_file_format=True)
        return buffer.getvalue()
    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, False
    write_file_meta_info(buffer, meta, enforce_standard=True)
    preamble = getattr(ds, "preamble", None) or b"\0" * 128
    return preamble + b"DICM" + buffer.getvalue() + _item_bytes(ds, [default_encoding])


def _file_meta(ds: Dataset) -> FileMetaDataset | None:
    """The file meta that ``dcmwrite(.., enforce_file_format=True)`` would write for ``ds`` in Explicit
    VR Little Endian or an encapsulated syntax (pydicom's ``write_file_meta_info`` completes and
    checks it), without its deep copy of the file meta: the elements are ``ds``'s, those that
    ``dcmwrite`` would set new ones. None for anything else (another transfer syntax, no file meta,
    elements of groups 0 or 2 in the data set, a preamble not 128 bytes long): ``dcmwrite`` writes it."""
    file_meta = getattr(ds, "file_meta", None)
    preamble = getattr(ds, "preamble", None)
    syntax = _transfer_syntax(ds)
    if (
        file_meta is None
        or syntax is None
        or not (syntax == ExplicitVRLittleEndian or syntax.is_encapsulated)
        or (preamble and len(preamble) != 128)
        or any(element.tag.group in (0, 2) for element in ds)
    ):
        return None
    meta = FileMetaDataset()
    for element in file_meta:
        if element.tag != _GROUP_LENGTH:  # its value is set as it is written: a new element
            meta.add(element)
    for keyword, value in (
        ("MediaStorageSOPClassUID", ds.get("SOPClassUID")),
        ("MediaStorageSOPInstanceUID", ds.get("SOPInstanceUID")),
    ):
        if keyword not in meta or (value and value != meta[keyword].value):
            meta.add_new(keyword, VR.UI, value)
    return meta


def _transfer_syntax(ds: Dataset) -> UID | None:
    """``ds``'s transfer syntax when it is a standard one."""
    file_meta = getattr(ds, "file_meta", None)
    syntax = UID(file_meta.get("TransferSyntaxUID", "")) if file_meta is not None else None
    return syntax if syntax and not syntax.is_private and syntax.is_transfer_syntax else None


def _frozen(item: Dataset) -> tuple[weakref.ref[Dataset], dict[tuple[str, ...], bytes]] | None:
    frozen = _FROZEN.get(id(item))
    return frozen if frozen is not None and frozen[0]() is item else None


def _correct_ambiguous_vr(ds: Dataset, ancestors: list[Dataset]) -> None:
    """pydicom's ``correct_ambiguous_vr`` (little endian), which need not walk a frozen item: it has
    no ambiguous VR."""
    for element in ds.elements():
        if element.VR == VR.SQ:
            for item in ds[element.tag].value:
                if _frozen(item) is None:
                    _correct_ambiguous_vr(item, [item, *ancestors])
        elif element.VR in AMBIGUOUS_VR:
            correct_ambiguous_vr_element(element, ds, True, ancestors)


def _encodings(ds: Dataset, parent: str | list[str]) -> list[str]:
    return convert_encodings(ds.get("SpecificCharacterSet", parent) or [default_encoding])


def _sequence_value(element: DataElement, encodings: list[str]) -> bytes:
    out = bytearray()
    for item in element.value:
        body = _dataset_bytes(item, encodings)
        if getattr(item, "is_undefined_length_sequence_item", False):
            out += _ITEM + b"\xff\xff\xff\xff" + body + b"\xfe\xff\x0d\xe0\x00\x00\x00\x00"
        else:
            out += _ITEM + struct.pack("<L", len(body)) + body
    return bytes(out)


def _dataset_bytes(ds: Dataset, parent: list[str]) -> bytes:
    """An item's elements in tag order, as pydicom's ``write_dataset`` encodes them."""
    frozen = _frozen(ds)
    if frozen is None:
        return _item_bytes(ds, parent)
    key = tuple(parent)
    encoded = frozen[1].get(key)
    if encoded is None:
        encoded = frozen[1][key] = _item_bytes(ds, parent)
    return encoded


def _item_bytes(ds: Dataset, parent: list[str]) -> bytes:
    encodings = _encodings(ds, parent)
    out = bytearray()
    for tag in sorted(ds.keys()):
        if tag.element == 0 and tag.group > 6:  # retired group lengths are not written (PS3.5 7.2)
            continue
        element = ds[tag]
        out += _element_bytes(element, encodings)
    return bytes(out)


def _element_bytes(element: DataElement, encodings: list[str]) -> bytes:
    value = _element_value(element, encodings)
    if value is None:
        return _pydicom_element_bytes(element, encodings)
    tag, vr = element.tag, element.VR
    if vr in EXPLICIT_VR_LENGTH_32:
        return _HEADER_32.pack(tag.group, tag.element, vr.encode(), len(value)) + value
    return _HEADER_16.pack(tag.group, tag.element, vr.encode(), len(value)) + value


def _element_value(element: DataElement, encodings: list[str]) -> bytes | None:
    """The element's value as pydicom writes it; None for what is left to pydicom whole."""
    vr = element.VR
    padding = _ASCII_PADDING.get(vr)
    text = element.value if padding is not None else None
    if isinstance(text, str) and text.isascii():  # what pydicom's write_string and write_text write
        value = text.encode() + (padding if len(text) % 2 else b"")  # type: ignore[operator]
    elif vr == VR.SQ and not element.is_undefined_length:
        value = _sequence_value(element, encodings)
    elif element.is_undefined_length or element.is_buffered or vr not in writers or len(vr) != 2:
        return None
    elif element.is_empty:
        value = b""
    else:
        fn, param = writers[vr]
        buffer = DicomBytesIO()
        buffer.is_little_endian, buffer.is_implicit_VR = True, False
        if vr in CUSTOMIZABLE_CHARSET_VR:
            fn(buffer, element, encodings=encodings)
        elif param is not None:
            fn(buffer, element, param)
        else:
            fn(buffer, element)
        value = buffer.getvalue()
    if vr not in EXPLICIT_VR_LENGTH_32 and len(value) > 0xFFFF:  # pydicom writes it as UN, with a warning
        return None
    return value


def _pydicom_element_bytes(element: DataElement, encodings: list[str]) -> bytes:
    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, False
    write_data_element(buffer, element, encodings)
    return buffer.getvalue()
