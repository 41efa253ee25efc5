"""File names as the system gives them, and as a database, a log line, JSON or a file system can
hold them.

Python decodes each byte of a file name that is not valid UTF-8 (a Latin-1 share, an old archive)
to a lone surrogate (PEP 383): such a ``str`` still opens the file, but SQLite, PostgreSQL and a
UTF-8 log file refuse to encode it. The daemon renames such a file in its inbox (``utf8_name``);
an evaluation, which never touches its cohort, stores the same ``utf8_name`` of it.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import PurePath


def is_utf8(name: str | PurePath) -> bool:
    """Whether a name as the system gave it was valid UTF-8."""
    try:
        str(name).encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def utf8_name(name: str | PurePath) -> str:
    """``name`` with each byte that was not part of valid UTF-8 written ``%XX`` (``sc\\xe9n.png``
    becomes ``sc%E9n.png``); a valid name is returned as it is."""
    return "".join(f"%{ord(c) - 0xDC00:02X}" if 0xDC80 <= ord(c) <= 0xDCFF else c for c in str(name))


def label_file_part(label: str) -> str:
    """A label as a part of a file name: as it is when it is letters, digits, '_' and '-'; else with
    each other character '_' and 8 hex digits of its SHA-256 after, so that no two labels share a
    name (a custom task's ``mass:calcified`` and ``mass_calcified`` shared their overlay and DICOM
    object files: one label's map was sent twice, the other's never)."""
    safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in label)
    if safe == label:
        return label
    return f"{safe}-{hashlib.sha256(label.encode('utf-8', 'surrogatepass')).hexdigest()[:8]}"


def shown_name(name: str | PurePath) -> str:
    """A name fit for a log line or a terminal: its bytes that were not UTF-8 shown ``\\xe9``, its
    control characters escaped (``escape_controls``)."""
    return escape_controls(os.fsencode(str(name)).decode("utf-8", "backslashreplace"))


#: control characters, and the bidirectional embeddings, overrides and isolates: drawn by a browser
#: (or a log viewer), "rtl\u202egnp.exe.png" read "rtlgnp.exe.png" backwards, and the hash after it
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def escape_controls(text: str) -> str:
    """``text`` with its control characters written as escapes (``\\n``, ``\\x1b``, ``\\u202e``): on
    one line, and with nothing a terminal or a browser obeys (a name may hold any byte but ``/`` and
    NUL)."""
    return _CONTROL.sub(lambda match: match.group().encode("unicode_escape").decode("ascii"), text)


#: bytes in one name (ext4, XFS, btrfs, NFS): a name made longer than the one received (numbered,
#: escaped, a reason beside it, a temporary) has its stem cut to fit (``fitted``), or it could
#: never be made
NAME_MAX = 255


def fitted(stem: str, tail: str, room: int = NAME_MAX) -> str:
    """``stem + tail``, the stem cut at a character so that the name takes at most ``room`` bytes."""
    cut = room - len(os.fsencode(tail))
    encoded = os.fsencode(stem)
    if len(encoded) > cut:
        stem = encoded[: max(cut, 0)].decode("utf-8", "ignore")
    return stem + tail


def split_extension(name: str) -> tuple[str, str]:
    """``name`` as (stem, extension), the extension only where it looks like one (DICOM files are
    often named by UID, ``1.2.840.113...``): what a name numbered or cut keeps at its end."""
    suffix = PurePath(name).suffix
    if 1 < len(suffix) <= 6 and not suffix[1:].isdigit():
        return name[: -len(suffix)], suffix
    return name, ""
