"""ChestX-ray14 on SYNTHETIC phantoms: a small seeded CNN at 64x64 reaches issue 4's bar (test macro
ROC-AUC >= 0.85 over the 14 findings) in a few seconds of CPU. Each finding is drawn with a sign of
its own (a dense dot for Nodule, a meniscus for Effusion, a pleural line for Pneumothorax, ...), the
local appearance a CNN that pools away position can learn, inside the box ``BBox_List_2017.csv`` gives."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from meddaemon.engine.tasks import BUILTIN_TASKS, NIH_FINDINGS
from meddaemon.training.datasets import load_dataset
from meddaemon.training.phantoms import NIH_SITES, write_phantoms
from meddaemon.training.pipeline import retrain
from meddaemon.training.train import TrainConfig

NIH = BUILTIN_TASKS["chestxray14"]


@pytest.fixture
def one_thread() -> Iterator[None]:
    """One intra-op thread: a 64x64 small_cnn is too small to gain from more, and on a shared
    machine several threads contend (four times slower here)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.mark.usefixtures("one_thread")
def test_a_small_cnn_reaches_the_bar_on_chestxray14_phantoms(tmp_path: Path) -> None:
    root = write_phantoms("chestxray14", tmp_path / "nih", count=300, size=64, seed=7).root
    # No flips or shifts (findings keep their side), a constant learning rate and no early stop: the
    # recipe's plateau scheduler (factor 0.1, patience 1) and patience 4 end a run this short too soon.
    # 12 epochs: the seeded run's numbers differ between CPUs (an AMD EPYC gave 0.846 after 10 epochs
    # where others passed); after 12, seeds 0 to 3 gave 0.884 to 0.895 there.
    config = TrainConfig.from_task(
        NIH, architecture="small_cnn", epochs=12, batch_size=16, lr=3e-3, image_size=64, seed=0,
        augmentation=False, scheduler={"name": "none"}, patience=10,
    )  # fmt: skip
    outcome = retrain(NIH, root, config, tmp_path / "run", version="nih")
    test = outcome.metrics["test"]
    scored = [label for label, row in test["per_label"].items() if row["roc_auc"] is not None]
    assert test["n"] >= 50 and len(scored) >= 12, test
    assert test["roc_auc"] >= 0.85, test
    assert outcome.metrics["synthetic"] is True
    assert not [f for f in outcome.flags if f.startswith("COLLAPSE")]


def test_every_finding_is_drawn_inside_its_box_and_changes_the_image_there(tmp_path: Path) -> None:
    """The learnable signal sits in the finding's box: the image differs from its finding-free
    chest mostly inside the box written to BBox_List_2017.csv."""
    import numpy as np

    from meddaemon.training import phantoms

    rng = np.random.default_rng(0)
    size = 64
    for finding in NIH_FINDINGS:
        if finding == "Cardiomegaly":
            continue
        chest = phantoms._chest(np.random.default_rng(1), size)
        before = chest.pixels.copy()
        x, y, w, h = phantoms._draw_finding(rng, chest.pixels, NIH_SITES[finding])
        change = np.abs(chest.pixels - before)
        inside = np.zeros((size, size), bool)
        inside[max(0, int(y) - 2) : int(y + h) + 3, max(0, int(x) - 2) : int(x + w) + 3] = True
        assert change[inside].max() > 0.2, finding
        assert change[inside].sum() >= 0.8 * change.sum(), finding

    index = load_dataset(write_phantoms("chestxray14", tmp_path / "n", count=56, size=64, seed=3).root, NIH)
    assert all(index.counts()[f] > 0 for f in NIH_FINDINGS)
