"""Making untrusted strings (patient names, DICOM attributes) safe to put in a PDF.

DICOM text can hold anything: control characters, 500-character names, right-to-left scripts.
None of it may crash a report or silently vanish: control characters are dropped, long values are
cut with a visible ellipsis, and right-to-left runs are put in visual order, since reportlab lays
glyphs out left to right (without a shaping engine Arabic letters show in their isolated forms:
readable, not joined).
"""

from __future__ import annotations

import unicodedata
from xml.sax.saxutils import escape

ELLIPSIS = "\u2026"
#: Formatting characters kept: zero-width (non-)joiners matter to Arabic and Indic scripts.
_KEEP_FORMAT = {"\u200c", "\u200d"}
_RTL = {"R", "AL"}
_LTR = {"L"}


def clean(value: object, limit: int = 80) -> str:
    """``value`` as one printable line of at most ``limit`` characters (cut ones end in an ellipsis)."""
    if value is None:
        return ""
    text = str(value)
    # printable ASCII (most of what a report holds) has nothing to drop and is its own NFC form:
    # the character-by-character pass below costs about 10 us a short string, some 40 a report
    if not (text.isascii() and text.isprintable()):
        text = _printable_only(unicodedata.normalize("NFC", text))
    text = " ".join(text.split())
    if len(text) > limit:
        text = text[: max(0, limit - 1)].rstrip() + ELLIPSIS
    return text


def _printable_only(text: str) -> str:
    """Line breaks and tabs as spaces; controls, bidi overrides, lone surrogates and unassigned
    code points dropped (never printed)."""
    out = []
    for char in text:
        category = unicodedata.category(char)
        if char in "\t\r\n\x0b\x0c":
            out.append(" ")
        elif category in ("Cc", "Cs", "Co", "Cn") or (category == "Cf" and char not in _KEEP_FORMAT):
            continue
        else:
            out.append(char)
    return "".join(out)


def person_name(value: object, limit: int = 64) -> str:
    """A DICOM PN (``FAMILY^GIVEN^MIDDLE^PREFIX^SUFFIX``, ``=`` between representations) for display."""
    text = clean(value, limit=10_000)
    groups = [" ".join(p for p in g.split("^") if p) for g in text.split("=")]
    return clean(" = ".join(g for g in groups if g), limit)


def visual_order(text: str) -> str:
    """Right-to-left runs in the order they are seen, for a renderer that only goes left to right.

    A simplified Unicode bidi algorithm: the base direction is that of the first strong character;
    a neutral (space, punctuation) between two runs of the same direction joins them, otherwise it
    takes the base direction; right-to-left runs are reversed, and in a right-to-left line the runs
    themselves are laid out from the right. Digits and Latin words keep their own order.
    """
    if text.isascii():  # no ASCII character is right to left
        return text
    kinds = [_strength(c) for c in text]
    if "R" not in kinds:
        return text
    base = next(k for k in kinds if k != "N")
    resolved = list(kinds)
    i = 0
    while i < len(kinds):
        if kinds[i] != "N":
            i += 1
            continue
        j = i
        while j < len(kinds) and kinds[j] == "N":
            j += 1
        before = kinds[i - 1] if i > 0 else base
        after = kinds[j] if j < len(kinds) else base
        resolved[i:j] = [before if before == after else base] * (j - i)
        i = j
    runs: list[tuple[str, str]] = []
    for char, kind in zip(text, resolved, strict=True):
        if runs and runs[-1][0] == kind:
            runs[-1] = (kind, runs[-1][1] + char)
        else:
            runs.append((kind, char))
    shown = [chars[::-1].translate(_MIRROR) if kind == "R" else chars for kind, chars in runs]
    if base == "R":
        shown.reverse()
    return "".join(shown)


#: the paired characters the bidi algorithm mirrors where they are laid out right to left (rule L4):
#: reversed without it, "(רחל)" was drawn ")רחל("
_OPENING, _CLOSING = "([{<«‹⁅⁽₍⟨⟦（［｛＜", ")]}>»›⁆⁾₎⟩⟧）］｝＞"
_MIRROR = str.maketrans(_OPENING + _CLOSING, _CLOSING + _OPENING)


def _strength(char: str) -> str:
    """R (right to left), L (left to right: letters and digits) or N (neutral)."""
    kind = unicodedata.bidirectional(char)
    if kind in _RTL:
        return "R"
    return "L" if kind in _LTR or kind in ("EN", "AN") else "N"


def markup(value: object, limit: int = 80) -> str:
    """``clean`` + ``visual_order`` + XML escaping: ready for a reportlab Paragraph."""
    return escape(visual_order(clean(value, limit)))
