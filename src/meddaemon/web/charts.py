"""A small inline SVG bar chart: no JavaScript, no library, legible in a screenshot."""

from __future__ import annotations

from collections.abc import Sequence
from html import escape

COLOURS = ("#3b6ea5", "#e0913b", "#067647")


def bar_chart(
    labels: Sequence[str], series: Sequence[tuple[str, Sequence[int]]], title: str, width: int = 360, height: int = 130
) -> str:
    """An SVG with a group of bars per label, one bar per series (its count above it), the label
    below, and a legend naming the series; ``title`` is what a screen reader says. It scales down to
    the width of its card (``svg.chart`` in console.css), the latest hours included."""
    if not labels or not series:
        return ""
    top = max((count for _, counts in series for count in counts), default=0) or 1
    step = width / len(labels)
    plot = height - 44
    bar = step * 0.8 / len(series)
    parts = [
        f'<svg class="chart" role="img" aria-label="{escape(title)}" viewBox="0 0 {width} {height}" '
        f'width="{width}" height="{height}" xmlns="http://www.w3.org/2000/svg">'
    ]
    for k, (name, _) in enumerate(series):
        x = 4 + k * 100
        parts.append(f'<rect x="{x}" y="2" width="10" height="10" fill="{COLOURS[k % len(COLOURS)]}"></rect>')
        parts.append(f'<text x="{x + 14}" y="11" font-size="10">{escape(name)}</text>')
    for i, label in enumerate(labels):
        for k, (name, counts) in enumerate(series):
            count = counts[i]
            h = plot * count / top
            x = i * step + step * 0.1 + k * bar
            y = 28 + plot - h
            parts.append(
                f'<rect x="{x:.1f}" y="{y:.1f}" width="{bar:.1f}" height="{h:.1f}" fill="{COLOURS[k % len(COLOURS)]}">'
                f"<title>{escape(name)}: {count}</title></rect>"
            )
            parts.append(_text(x + bar / 2, y - 2, 8, str(count)))
        parts.append(_text(i * step + step / 2, height - 4, 9, label))
    parts.append("</svg>")
    return "".join(parts)


def _text(x: float, y: float, size: int, text: str) -> str:
    return f'<text x="{x:.1f}" y="{y:.1f}" font-size="{size}" text-anchor="middle">{escape(text)}</text>'
