"""The model card's figures: one small SYNTHETIC BUSI run writes curves, ROC, confusion and a grid of
test images with their calls and heatmaps as PNGs beside MODEL_CARD.md, and the card links each."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from meddaemon.engine.architectures import build_model
from meddaemon.engine.tasks import BUILTIN_TASKS
from meddaemon.training.figures import FIGURES, write_figures
from meddaemon.training.phantoms import write_phantoms
from meddaemon.training.pipeline import MODEL_CARD, RetrainOutcome, retrain
from meddaemon.training.train import ScanDataset, TrainConfig

BUSI = BUILTIN_TASKS["busi"]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> RetrainOutcome:
    root = write_phantoms("busi", tmp_path_factory.mktemp("busi") / "busi", count=12, size=48, seed=5).root
    config = TrainConfig.from_task(
        BUSI, architecture="small_cnn", epochs=3, batch_size=16, lr=1e-3, image_size=32, seed=0
    )
    return retrain(BUSI, root, config, tmp_path_factory.mktemp("run"), version="card")


@pytest.mark.parametrize("name", sorted(FIGURES))
def test_each_figure_is_a_png_of_sensible_size_beside_the_card(run: RetrainOutcome, name: str) -> None:
    path = run.version_dir / name
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert 2_000 < path.stat().st_size < 2_000_000
    with Image.open(path) as image:
        width, height = image.size
        pixels = np.asarray(image.convert("L"))
    assert 200 <= width <= 2000 and 150 <= height <= 2000
    assert pixels.std() > 5  # something is drawn, not a blank canvas


def test_the_card_links_every_figure_and_the_links_resolve(run: RetrainOutcome) -> None:
    card = (run.version_dir / MODEL_CARD).read_text()
    links = re.findall(r"!\[[^\]]+\]\(([^)]+)\)", card)
    assert sorted(links) == sorted(FIGURES)
    assert all((run.version_dir / link).is_file() for link in links)
    assert run.figures == FIGURES
    assert card.index("## Figures") < card.index("## Flags")


def test_the_grid_shows_up_to_twelve_test_images(run: RetrainOutcome) -> None:
    n_test = run.metrics["test"]["n"]
    with Image.open(run.version_dir / "test_grid.png") as image:
        width, height = image.size
    columns = min(4, n_test, 12)
    rows = -(-min(n_test, 12) // columns)
    assert abs(width / height - (2.3 * columns) / (2.6 * rows)) < 0.1


def test_figures_are_redrawn_from_the_run_and_handle_multilabel(run: RetrainOutcome, tmp_path: Path) -> None:
    """Redrawn from the run; a 14-label multilabel set (one label never positive) draws too. How long
    drawing takes is measured by benchmarks/reports.py (model card figures), not here."""
    test_set_images = _test_images(run)
    probs = run.result.validation.probabilities
    truth = run.result.validation.truth
    written = write_figures(
        tmp_path / "again", kind="multiclass", labels=BUSI.labels, history=run.result.history,
        probabilities=probs, truth=truth, thresholds=None, model=run.result.model,
        images=test_set_images, contract=run.result.contract,
    )  # fmt: skip
    assert written == FIGURES

    rng = np.random.default_rng(0)
    labels = tuple(f"finding{j}" for j in range(14))
    truth14 = (rng.random((20, 14)) < 0.3).astype(np.int64)
    truth14[:, 3] = 0
    probs14 = np.clip(truth14 * 0.5 + rng.random((20, 14)) * 0.5, 0, 1)
    model = build_model("small_cnn", 1, 14).eval()
    written = write_figures(
        tmp_path / "multi", kind="multilabel", labels=labels, history=run.result.history,
        probabilities=probs14, truth=truth14, thresholds=dict.fromkeys(labels, 0.5), model=model,
        images=test_set_images[:5], contract=run.result.contract,
    )  # fmt: skip
    assert written == FIGURES


def test_labels_that_look_like_mathematics_are_drawn_as_written(run: RetrainOutcome, tmp_path: Path) -> None:
    """A custom task's labels are text: ``$A_$`` was parsed as mathematics, and the retrain stopped."""
    written = write_figures(
        tmp_path / "odd", kind="multiclass", labels=("$A_$", "cost $5", "$10"), history=run.result.history,
        probabilities=run.result.validation.probabilities, truth=run.result.validation.truth, thresholds=None,
        model=run.result.model, images=_test_images(run)[:3], contract=run.result.contract,
    )  # fmt: skip
    assert written == FIGURES


def _test_images(run: RetrainOutcome) -> list[torch.Tensor]:
    samples = run.split.samples(run.index, "test")
    dataset = ScanDataset(samples, BUSI.labels, BUSI.kind, run.result.contract)
    return [dataset.image(i) for i in range(min(12, len(dataset)))]
