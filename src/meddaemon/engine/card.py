"""A model version's card: ``MODEL_CARD.md`` and the figures it links, kept beside the weights.

``medcli retrain`` writes the card and its figures (``training/figures.py``) into the version's
folder; ``registry.import_version`` copies them into the registry with the weights, and the web
console shows them. They are documents, not part of what is verified: the manifest's SHA-256
covers the weights only. Only the card and the PNG/JPEG files it links by a plain file name (no
folder, no URL) are taken, regular files under a size limit, so a version folder cannot bring
anything else into the registry or the console.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

CARD_FILE = "MODEL_CARD.md"
MAX_CARD_BYTES = 1024 * 1024
MAX_FIGURE_BYTES = 16 * 1024 * 1024
FIGURE_TYPES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg"}
#: the first bytes of each figure type: a file that does not start with them is not taken
_MAGIC = {"image/png": b"\x89PNG\r\n\x1a\n", "image/jpeg": b"\xff\xd8\xff"}
_FIGURE_NAME = re.compile(r"\A[A-Za-z0-9][A-Za-z0-9._-]{0,127}\Z")
_IMAGE_LINK = re.compile(r"!\[([^\]]*)\]\(([^)\s]+)\)")


@dataclass(frozen=True)
class ModelCard:
    text: str
    #: figure file name -> its caption, in the card's order (only those present beside the card)
    figures: dict[str, str]


def figure_type(name: str) -> str | None:
    """The media type of a figure named ``name``; None when it is not a plain PNG/JPEG file name."""
    if not _FIGURE_NAME.match(name):
        return None
    return FIGURE_TYPES.get(Path(name).suffix.lower())


def linked_figures(text: str) -> dict[str, str]:
    """{file name: caption} of the figures a card's markdown links by a plain file name."""
    return {name: caption for caption, name in _IMAGE_LINK.findall(text) if figure_type(name)}


def _regular(path: Path, limit: int) -> bool:
    return path.is_file() and not path.is_symlink() and path.stat().st_size <= limit


def _figure_ok(path: Path) -> bool:
    media = figure_type(path.name)
    if media is None or not _regular(path, MAX_FIGURE_BYTES):
        return False
    with open(path, "rb") as f:
        return f.read(len(_MAGIC[media])) == _MAGIC[media]


def read_card(folder: Path) -> ModelCard | None:
    """The card in ``folder`` with the figures it links that are there; None without a readable card."""
    path = folder / CARD_FILE
    try:
        if not _regular(path, MAX_CARD_BYTES):
            return None
        text = path.read_text(encoding="utf-8", errors="replace")
        figures = {name: caption for name, caption in linked_figures(text).items() if _figure_ok(folder / name)}
    except OSError:
        return None
    return ModelCard(text, figures)


def card_files(folder: Path) -> list[str]:
    """The names of the card and of its figures in ``folder``, as the registry copies them ([] without a card)."""
    card = read_card(folder)
    return [] if card is None else [CARD_FILE, *card.figures]
