"""The phantoms carry signal a model can learn: a logistic regression on downsampled BUSI phantoms,
split leak-free, beats chance (1/3) clearly on its test images. No CNN is trained here."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.linear_model import LogisticRegression

from meddaemon.engine.tasks import BUILTIN_TASKS
from meddaemon.training.datasets import load_dataset
from meddaemon.training.images import read_image
from meddaemon.training.phantoms import write_phantoms
from meddaemon.training.splits import SplitConfig, make_split


def features(path: Path) -> np.ndarray:
    small = Image.fromarray(np.rint(read_image(path) * 255).astype(np.uint8)).resize((16, 16), Image.Resampling.BOX)
    pixels = np.asarray(small, dtype=np.float32).ravel() / 255
    return np.concatenate([pixels, np.sort(pixels)])


def test_a_logistic_regression_beats_chance_on_busi_phantoms(tmp_path: Path) -> None:
    written = write_phantoms("busi", tmp_path / "busi", count=40, size=64, seed=21)
    index = load_dataset(written.root, BUILTIN_TASKS["busi"], check_images=False)
    split = make_split(index, SplitConfig(fractions=(0.7, 0.0, 0.3), seed=0))
    train, test = split.samples(index, "train"), split.samples(index, "test")
    model = LogisticRegression(max_iter=2000, C=1.0)
    model.fit(np.stack([features(s.path) for s in train]), [s.label for s in train])
    accuracy = model.score(np.stack([features(s.path) for s in test]), [s.label for s in test])
    assert len(test) >= 30
    assert accuracy >= 0.6, accuracy
