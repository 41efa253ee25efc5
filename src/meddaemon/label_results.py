"""One label's stored result as the reports and the DICOM outputs read it: its probability and call,
and where its heatmap's files are kept when it has one."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class LabelResult:
    label: str
    probability: float
    threshold: float
    positive: bool
    #: the stored map (``.npy``, its grid), when the label has a heatmap
    array_path: Path | None = None
    #: the map's overlay (JPEG), kept beside it: drawn on first use from ``array_path``
    #: (``meddaemon.overlays``)
    overlay_path: Path | None = None
    #: (height, width) the map is read at: the model input's (``engine.heatmap_grid.read_map``)
    map_size: tuple[int, int] | None = None
