"""The model card's figures, PNG files written beside ``MODEL_CARD.md`` (matplotlib, Agg backend):

- ``curves.png``: training and validation loss, and validation ROC-AUC, per epoch (``TrainResult.history``);
- ``roc.png``: the test set's ROC curve of every label with both outcomes present (binary: the positive class);
- ``confusion.png``: the test confusion matrix (multilabel: TN/FP/FN/TP per label);
- ``test_grid.png``: up to 12 test images with their truth, the model's call and the Grad-CAM overlay of
  the called class (multilabel: the most probable called label, or the most probable one when none is).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import torch
from sklearn.metrics import roc_curve

from meddaemon.engine.architectures import ClassifierNet
from meddaemon.engine.heatmaps import compute_heatmaps
from meddaemon.engine.overlay import model_view, overlay
from meddaemon.engine.tasks import InputContract
from meddaemon.training.evaluate import predictions

#: figure file -> its caption in the model card, in the card's order
FIGURES = {
    "curves.png": "training curves",
    "roc.png": "ROC curves (test)",
    "confusion.png": "confusion matrix (test)",
    "test_grid.png": "test images with their calls and heatmaps",
}
GRID_IMAGES = 12
DPI = 80


def write_figures(
    out: Path,
    *,
    kind: str,
    labels: Sequence[str],
    history: Sequence[Mapping[str, float]],
    probabilities: np.ndarray,
    truth: np.ndarray,
    thresholds: dict[str, float] | None,
    model: torch.nn.Module,
    images: Sequence[torch.Tensor],
    contract: InputContract,
) -> dict[str, str]:
    """Write the four figures into ``out``; returns {file name: caption} of those written.

    ``probabilities``/``truth`` are the test set's (N, L) arrays, ``images`` its preprocessed (C, H, W)
    inputs in the same order, ``model`` the trained model (put in eval mode here)."""
    out.mkdir(parents=True, exist_ok=True)
    calls = predictions(kind, probabilities, thresholds, labels)
    with matplotlib.rc_context({"text.parse_math": False}):  # a custom task's label "$x$" is no mathematics
        _curves(out / "curves.png", history)
        _roc(out / "roc.png", kind, labels, probabilities, truth)
        _confusion(out / "confusion.png", kind, labels, truth, calls)
        _grid(out / "test_grid.png", kind, labels, probabilities, truth, calls, model, images, contract)
    return {name: caption for name, caption in FIGURES.items() if (out / name).is_file()}


def _save(fig: Any, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)


def _curves(path: Path, history: Sequence[Mapping[str, float]]) -> None:
    fig, (losses, auc) = plt.subplots(1, 2, figsize=(8, 3))
    epochs = [h["epoch"] for h in history]
    losses.plot(epochs, [h["train_loss"] for h in history], "o-", label="train")
    losses.plot(epochs, [h["val_loss"] for h in history], "o-", label="validation")
    losses.set(xlabel="epoch", ylabel="loss", title="loss")
    losses.legend()
    auc.plot(epochs, [h["val_auc"] for h in history], "o-", color="tab:green")
    auc.set(xlabel="epoch", ylabel="macro ROC-AUC", title="validation ROC-AUC", ylim=(0.0, 1.02))
    _save(fig, path)


def _roc(path: Path, kind: str, labels: Sequence[str], probs: np.ndarray, truth: np.ndarray) -> None:
    fig, ax = plt.subplots(figsize=(5, 4.2))
    columns = [1] if kind == "binary" else range(len(labels))
    for j in columns:
        if not 0 < truth[:, j].sum() < len(truth):
            continue  # one outcome only: no curve
        fpr, tpr, _ = roc_curve(truth[:, j], probs[:, j])
        ax.plot(fpr, tpr, label=labels[j], linewidth=1.2)
    ax.plot([0, 1], [0, 1], ":", color="grey")
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title="ROC (test)", xlim=(0, 1), ylim=(0, 1.01))
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=6, loc="lower right", ncol=2 if len(labels) > 7 else 1)
    _save(fig, path)


def _confusion(path: Path, kind: str, labels: Sequence[str], truth: np.ndarray, calls: np.ndarray) -> None:
    if kind == "multilabel":
        t, c = truth.astype(bool), calls.astype(bool)
        matrix = np.stack([(~t & ~c).sum(0), (~t & c).sum(0), (t & ~c).sum(0), (t & c).sum(0)], axis=1)
        rows, columns, xlabel, ylabel = list(labels), ["TN", "FP", "FN", "TP"], "", ""
    else:
        n = len(labels)
        matrix = np.zeros((n, n), dtype=np.int64)
        for i, j in zip(truth.argmax(1), calls.argmax(1), strict=True):
            matrix[i, j] += 1
        rows, columns, xlabel, ylabel = list(labels), list(labels), "call", "truth"
    fig, ax = plt.subplots(figsize=(1.2 + 0.7 * len(columns), 0.8 + 0.35 * len(rows) + 0.6))
    ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(len(columns)), columns, fontsize=7, rotation=30)
    ax.set_yticks(range(len(rows)), rows, fontsize=7)
    ax.set(xlabel=xlabel, ylabel=ylabel, title="confusion (test)")
    top = matrix.max() if matrix.size else 0
    for (i, j), v in np.ndenumerate(matrix):
        ax.text(j, i, str(v), ha="center", va="center", fontsize=7, color="white" if v > top / 2 else "black")
    _save(fig, path)


def _mapped_class(kind: str, probs: np.ndarray, calls: np.ndarray) -> int:
    """The logit whose map is drawn: the call (binary: the single positive logit; multilabel: the most
    probable called label, else the most probable label)."""
    if kind == "binary":
        return 0
    if kind == "multilabel" and calls.any():
        return int(np.argmax(np.where(calls > 0, probs, -1.0)))
    return int(np.argmax(probs))


def _call_text(kind: str, labels: Sequence[str], row: np.ndarray) -> str:
    if kind == "multilabel":
        called = [labels[int(j)] for j in np.flatnonzero(row)]
        shown = ", ".join(called[:3]) + (f" +{len(called) - 3}" if len(called) > 3 else "")
        return shown or "none"
    return labels[int(np.argmax(row))]


def _grid(
    path: Path,
    kind: str,
    labels: Sequence[str],
    probs: np.ndarray,
    truth: np.ndarray,
    calls: np.ndarray,
    model: torch.nn.Module,
    images: Sequence[torch.Tensor],
    contract: InputContract,
) -> None:
    n = min(GRID_IMAGES, len(images), len(probs))
    if n == 0 or not isinstance(model, ClassifierNet):
        return  # no test image, or no Grad-CAM for this model: no grid
    model.eval()
    targets = [_mapped_class(kind, probs[i], calls[i]) for i in range(n)]
    x = torch.stack([images[i] for i in range(n)]).to(next(model.parameters()).device)
    maps = compute_heatmaps(model, x, lambda _logits: [[t] for t in targets]).expanded()
    columns = min(4, n)
    rows = (n + columns - 1) // columns
    fig, axes = plt.subplots(rows, columns, figsize=(2.3 * columns, 2.6 * rows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for i in range(n):
        view = model_view(images[i].cpu().numpy(), contract)
        [(_, heatmap)] = maps[i]
        ax = axes.ravel()[i]
        ax.imshow(overlay(view, heatmap))
        right = bool((calls[i] == truth[i]).all())
        ax.set_title(
            f"truth: {_call_text(kind, labels, truth[i])}\ncall: {_call_text(kind, labels, calls[i])}",
            fontsize=6,
            color="black" if right else "tab:red",
        )
    _save(fig, path)
