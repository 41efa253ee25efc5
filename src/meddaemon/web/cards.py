"""A model card (``engine/card.py``) as HTML for the models page: its markdown rendered with raw HTML
turned off (what the card says is shown as text, never run), headings moved under the page's own,
and each figure it links pointed at the console's route for it; any other picture becomes its caption.
"""

from __future__ import annotations

from collections.abc import Callable

from markdown_it import MarkdownIt
from markupsafe import Markup

from meddaemon.engine.card import ModelCard

#: the card's "# title" becomes an h3 under the page's h1 (the console) and h2 (the task)
HEADING_SHIFT = 2


def card_html(card: ModelCard, figure_url: Callable[[str], str]) -> Markup:
    md = MarkdownIt("commonmark", {"html": False}).enable("table")
    tokens = md.parse(card.text)
    for token in tokens:
        if token.type in ("heading_open", "heading_close"):
            token.tag = f"h{min(6, int(token.tag[1:]) + HEADING_SHIFT)}"
        for child in token.children or []:
            if child.type != "image":
                continue
            name = str(child.attrGet("src") or "")
            if name in card.figures:
                child.attrSet("src", figure_url(name))
                child.attrSet("loading", "lazy")
            else:
                child.type, child.tag, child.children = "text", "", None
    return Markup(md.renderer.render(tokens, md.options, {}))  # markdown-it has escaped the text: html is off
