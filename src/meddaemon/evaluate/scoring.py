"""From read files to outcomes: batches through a served model, probabilities averaged over the
frames of a scan and called at the manifest's thresholds, exactly as the daemon stores them
(``daemon/inference.py``), heatmap files written beside the daemon's."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import Future
from pathlib import Path

import numpy as np

from meddaemon.daemon.inference import heatmap_files, write_heatmap_files
from meddaemon.engine.inference import Prediction, ServedModel
from meddaemon.evaluate.reading import FileRead
from meddaemon.evaluate.store import FileOutcome

WriteMaps = Callable[..., Future]


def outcomes_of(
    model: ServedModel,
    reads: Sequence[FileRead],
    predictions: Sequence[Prediction],
    heatmaps_dir: Path | None = None,
    submit: WriteMaps | None = None,
) -> list[tuple[FileOutcome, Future | None]]:
    """Each read file's outcome from its rows of ``predictions`` (one row per frame, in order);
    with ``heatmaps_dir`` and ``submit``, the key frame's maps are written (the future says when)."""
    out: list[tuple[FileOutcome, Future | None]] = []
    row = 0
    for read in reads:
        assert read.inputs is not None
        size = int(read.inputs.shape[0])
        rows = predictions[row : row + size]
        row += size
        failure = next((p.failure for p in rows if p.failure is not None), None)
        if failure is not None:
            read.failure, read.inputs = failure, None
            out.append((FileOutcome(read), None))
            continue
        # a multi-frame file's frames averaged; one frame's row as it is (np.mean was 5 % of the driver)
        probs = rows[0].probabilities if size == 1 else np.mean([p.probabilities for p in rows], axis=0)
        outcome = FileOutcome(read, probs.tolist(), model.calls(probs).tolist())
        key = size // 2
        write = None
        if heatmaps_dir is not None and submit is not None:
            maps = model.maps_of_the_call(rows, read.inputs, probs)
            if maps:
                write = with_heatmaps(model, heatmaps_dir, submit, outcome, maps, read.inputs[key])
        read.inputs = None
        out.append((outcome, write))
    return out


def with_heatmaps(
    model: ServedModel,
    heatmaps_dir: Path,
    submit: WriteMaps,
    outcome: FileOutcome,
    maps: Sequence[tuple[int, np.ndarray]],
    model_input: np.ndarray,
) -> Future:
    """``outcome`` with its scan's heatmap files (the key frame's ``maps``, by label index), whose
    writing is submitted: the future says when they are on disk. The overlays are written here, not
    drawn on first use as the daemon's are: an evaluation reads its cohort in place and keeps no copy
    of the scan to draw them from later."""
    outcome.heatmaps = heatmap_files(model, heatmaps_dir, outcome.read.sha256 or "", maps, model_input)
    return submit(write_heatmap_files, outcome.heatmaps, [m for _, m in maps], model_input, model.contract, None, True)


def stack(reads: Sequence[FileRead]) -> np.ndarray:
    return np.concatenate([r.inputs for r in reads if r.inputs is not None])
