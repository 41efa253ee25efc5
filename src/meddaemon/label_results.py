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
    #: the map's ``.npy`` file, for a heatmap stored by an earlier version (now: ``grid``)
    array_path: Path | None = None
    #: the map's overlay (JPEG), when the label has a heatmap: drawn on first use from the map
    #: (``meddaemon.overlays``)
    overlay_path: Path | None = None
    #: (height, width) the map is read at: the model input's (``engine.heatmap_grid.read_map``)
    map_size: tuple[int, int] | None = None
    #: the map's grid as its row keeps it (``.npy`` bytes)
    grid: bytes | None = None

    @property
    def stored_map(self) -> bytes | Path | None:
        """What ``engine.heatmap_grid.read_map`` reads the map from: the grid, or an older row's file."""
        return self.grid if self.grid is not None else self.array_path
