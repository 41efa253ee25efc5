"""The report font: a TTF registered with reportlab so non-Latin names render.

reportlab's built-in fonts (and its Vera TTFs) cover Latin only; DejaVu Sans, shipped with
matplotlib (a dependency), covers Latin, Greek, Cyrillic, Hebrew and Arabic. A site that needs
other scripts sets ``reports_font`` to a TTF that has them.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import string
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from reportlab.pdfbase import pdfmetrics
from reportlab.pdfbase.ttfonts import TTFont

log = logging.getLogger("meddaemon.report")

#: what stands in a report for characters its font has no glyph for
NOT_IN_FONT = "[?]"


@dataclass(frozen=True)
class Fonts:
    regular: str
    bold: str


def _matplotlib_ttf_dir() -> Path | None:
    # the fonts are data files: find them without importing matplotlib (slow, and not needed)
    spec = importlib.util.find_spec("matplotlib")
    if spec is None or spec.origin is None:
        return None
    folder = Path(spec.origin).parent / "mpl-data" / "fonts" / "ttf"
    return folder if folder.is_dir() else None


def unusable_font(path: str) -> str | None:
    """Why reportlab cannot draw with the font file at ``path``, or None when it can. Checked with the
    settings: an OpenType font with PostScript (CFF) outlines, as Noto Sans CJK ships, passed a check
    that the file exists, and then every report failed (the daemon's scans never left ``inferred``)."""
    try:
        font = TTFont("ReportFontProbe", path)
    except Exception as exc:  # reportlab raises TTFError, and struct or index errors on a damaged file
        return f"{path} cannot be used by reportlab: {exc} (a TrueType .ttf font is needed)"
    missing = [char for char in REPORT_WORDS if ord(char) not in font.face.charToGlyph]
    if missing:  # a CJK-only font: every report would be blank but for the patient's name
        shown = ", ".join(repr(char) for char in missing[:5])
        return (
            f"{path} has no glyph for {len(missing)} of the Latin letters, digits and signs the report's own "
            f"words are written in ({shown}...): every report's text would be blank; a TrueType font "
            "with Latin as well as the script needed is required"
        )
    return None


#: the characters of the report's own words and numbers, which a font must draw (``unusable_font``)
REPORT_WORDS = string.ascii_letters + string.digits + " .,:;%()-/"


@functools.lru_cache(maxsize=4)
def report_fonts(custom: str = "") -> Fonts:
    """Register (once per process) and return the font names to use; Helvetica if no TTF is found."""
    if custom:
        pdfmetrics.registerFont(TTFont("ReportCustom", custom))
        return Fonts("ReportCustom", "ReportCustom")
    folder = _matplotlib_ttf_dir()
    if folder is None or not (folder / "DejaVuSans.ttf").is_file():
        log.warning("DejaVu Sans not found (matplotlib missing?): reports use Helvetica, Latin text only")
        return Fonts("Helvetica", "Helvetica-Bold")
    pdfmetrics.registerFont(TTFont("DejaVuSans", str(folder / "DejaVuSans.ttf")))
    bold = folder / "DejaVuSans-Bold.ttf"
    if bold.is_file():
        pdfmetrics.registerFont(TTFont("DejaVuSans-Bold", str(bold)))
        return Fonts("DejaVuSans", "DejaVuSans-Bold")
    return Fonts("DejaVuSans", "DejaVuSans")


def drawable(text: str, font_name: str) -> str:
    """``text`` with each run of characters that ``font_name`` has no glyph for written ``[?]``.

    reportlab draws such a character as an empty box, without a word: a Japanese patient name on a
    report with PHI came out as boxes around "=" (DejaVu Sans has no CJK). The first time a font
    meets such characters, the log says so and names ``reports_font`` (never the characters: they
    may be a patient's name)."""
    if text.isascii():
        return text
    has = _glyph_test(font_name)
    out: list[str] = []
    for char in text:
        if has(char) or unicodedata.category(char) == "Cf":
            out.append(char)
        elif not out or out[-1] != NOT_IN_FONT:
            out.append(NOT_IN_FONT)
    shown = "".join(out)
    if shown != text:
        _say_characters_are_missing(font_name)
    return shown


@functools.lru_cache(maxsize=8)
def _glyph_test(font_name: str) -> Callable[[str], bool]:
    covered = getattr(getattr(pdfmetrics.getFont(font_name), "face", None), "charToGlyph", None)
    if covered is None:  # one of the PDF standard fonts: Latin-1 only
        return lambda char: ord(char) < 256
    return lambda char: ord(char) in covered


@functools.lru_cache(maxsize=8)
def _say_characters_are_missing(font_name: str) -> None:
    log.warning(
        "report text holds characters the report font %s has no glyph for: they are shown as %s; "
        "set reports_font to a TrueType font that has them",
        font_name,
        NOT_IN_FONT,
    )
