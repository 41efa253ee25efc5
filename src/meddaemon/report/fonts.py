"""The report font: a TTF registered with reportlab so non-Latin names render.

reportlab's built-in fonts (and its Vera TTFs) cover Latin only; DejaVu Sans, shipped with
matplotlib (a dependency), covers Latin, Greek, Cyrillic, Hebrew and Arabic. A site that needs
other scripts sets ``reports_font`` to a TTF that has them.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
from dataclasses import dataclass
from pathlib import Path

from reportlab.pdfbase import pdfmetrics
from reportlab.pdfbase.ttfonts import TTFont

log = logging.getLogger("meddaemon.report")


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
        TTFont("ReportFontProbe", path)
    except Exception as exc:  # reportlab raises TTFError, and struct or index errors on a damaged file
        return f"{path} cannot be used by reportlab: {exc} (a TrueType .ttf font is needed)"
    return None


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
