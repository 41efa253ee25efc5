"""One label's stored result as the reports and the DICOM outputs read it: its probability and call,
and where its heatmap's files are kept when it has one."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol


@dataclass(frozen=True)
class LabelResult:
    label: str
    probability: float
    threshold: float
    positive: bool
    #: the map's ``.npy`` file, for a heatmap stored by an earlier version (now: ``grid``)
    array_path: Path | None = None
    #: the map's overlay (JPEG), when the label has a heatmap: drawn on first use from the map
    #: (``meddaemon.overlays``)
    overlay_path: Path | None = None
    #: (height, width) the map is read at: the model input's (``engine.heatmap_grid.read_map``)
    map_size: tuple[int, int] | None = None
    #: the map's grid as its row keeps it (``.npy`` bytes)
    grid: bytes | None = None

    def shown(self, places: int, percent: bool = False) -> tuple[str, str]:
        """The probability and the threshold as text (``shown_against``)."""
        return shown_against(self.probability, self.threshold, self.positive, places, percent)

    @property
    def stored_map(self) -> bytes | Path | None:
        """What ``engine.heatmap_grid.read_map`` reads the map from: the grid, or an older row's file."""
        return self.grid if self.grid is not None else self.array_path


def names_a_class(kind: str, labels: Sequence[str], label: str) -> bool:
    """Whether a positive call of ``label`` names a class rather than raises a finding: every class
    of a multiclass model, and a binary model's negative class (its first label: "No IDC",
    "Normal"), called exactly when its finding is not. Such a call reads "called", in black, never a
    red "positive" beside a negative finding."""
    return kind == "multiclass" or (kind == "binary" and len(labels) == 2 and label == labels[0])


#: the most decimals ``shown_against`` adds to tell a probability from its threshold
MORE_PLACES = 4


def shown_against(
    probability: float, threshold: float, positive: bool, places: int, percent: bool = False
) -> tuple[str, str]:
    """A probability and its threshold as text with the same decimals: ``places``, or as many more
    (up to ``MORE_PLACES``) as it takes for the two to compare as the numbers do. 0.4996 against
    0.5, negative, read "0.500" beside "0.50"; 0.348 against a tuned 0.3468, positive, "35%" beside
    "0.35". A call that is not the threshold's (a multiclass top class) gets ``places``."""

    def text(value: float, digits: int) -> str:
        return f"{100 * value:.{digits}f}%" if percent else f"{value:.{digits}f}"

    def order(a: float, b: float) -> int:
        return (a > b) - (a < b)

    if positive == (probability >= threshold):
        for digits in range(places, places + MORE_PLACES + 1):
            shown = text(probability, digits), text(threshold, digits)
            if order(*(float(s.rstrip("%")) for s in shown)) == order(probability, threshold):
                return shown
    return text(probability, places), text(threshold, places)


class Call(Protocol):
    probability: float
    positive: bool


def places_ranking_the_call(results: Sequence[Call], places: int, percent: bool = False) -> int:
    """The decimals, from ``places`` up to ``MORE_PLACES`` more, at which a multiclass call (the top
    class) reads above every other class: at 3, 0.45049 called and 0.45041 not both read "0.450"
    (``percent``: the decimals of percentages, 45.0% and 45.0% at 1)."""
    called = [r.probability for r in results if r.positive]
    others = [r.probability for r in results if not r.positive]
    if len(called) != 1 or not others:
        return places
    top, runner_up = called[0], max(others)
    shift = 2 if percent else 0
    for digits in range(places, places + MORE_PLACES + 1):
        if float(f"{top:.{digits + shift}f}") > float(f"{runner_up:.{digits + shift}f}"):
            return digits
    return places + MORE_PLACES
