"""Grad-CAM heatmaps at the cost of inference (docs/design.md section 6).

The target activation ``A`` (B, K, h, w) is the output of ``model.features``; maps are taken for the
classes a *chooser* picks from the logits (multiclass: the predicted class, binary: the positive
class, multilabel: every label over its threshold).

Two paths, both equal to pytorch-grad-cam's ``GradCAM`` with ``target_layers=[model.features]`` and
``ClassifierOutputTarget(c)`` (tested within 1e-4):

* **CAM** (``model.cam_linear`` is set: the head is global average pooling, optional dropout and one
  Linear). The gradient of logit ``c`` with respect to ``A[k, i, j]`` is ``W[c, k] / (h * w)`` at every
  position, so Grad-CAM's channel weights are ``W[c] / (h * w)`` and the map is
  ``ReLU(sum_k W[c, k] / (h * w) * A_k)``: one forward pass under ``no_grad`` gives every class's map,
  with no backward pass at all. (The ``1 / (h * w)`` factor is removed by the min-max normalisation;
  it is kept so the numbers are Grad-CAM's own, 1e-7 epsilon included.)
* **gradient** (any other head, e.g. VGG16's three Linear layers): ``A`` is computed under
  ``no_grad``, then only the head is recorded and ``torch.autograd.grad`` of the chosen logits is taken
  with respect to ``A`` alone (never the parameters, never the backbone). Images are independent in
  eval mode, so the chosen logits of all images are summed into one backward per *target rank*
  (the first chosen class of every image, then the second, ...).

Post-processing is pytorch-grad-cam's (``BaseCAM.compute_cam_per_layer`` then
``aggregate_multi_layers``, both via ``scale_cam_image``): ReLU and per-map min-max (``m - min``,
``/ (1e-7 + max)``) here, in torch, batched, on ``x``'s device, giving each map's *grid* (the
activation's h x w); the bilinear resize to the input's H x W and the second ReLU and min-max are
``heatmap_grid.expand``, which readers run when they need the map at the input's size (the grid is
what is stored: ``heatmap_grid``'s docstring says why).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from meddaemon.engine.architectures import ClassifierNet
from meddaemon.engine.heatmap_grid import EPS, expand_one

#: ``choose(logits)`` -> per image, the class indices to map (may be empty).
Chooser = Callable[[Tensor], list[list[int]]]


@dataclass
class HeatmapBatch:
    """``logits``: (B, C), detached. ``maps[i]``: image i's ``(class index, grid)`` pairs in the order
    the chooser gave them; each grid is float32 (h, w) of the target activation, in [0, 1].
    ``size``: the input's (H, W), the size ``expanded`` gives the maps."""

    logits: Tensor
    maps: list[list[tuple[int, np.ndarray]]]
    size: tuple[int, int]

    def expanded(self) -> list[list[tuple[int, np.ndarray]]]:
        """``maps`` at the input's size: pytorch-grad-cam's maps (``heatmap_grid.expand``)."""
        return [[(c, expand_one(grid, self.size)) for c, grid in row] for row in self.maps]


# --- choosers -------------------------------------------------------------------------------------


def predicted_class() -> Chooser:
    """Multiclass (softmax): the argmax class of each image. For a binary model use ``positive_class``."""

    def choose(logits: Tensor) -> list[list[int]]:
        return [[int(c)] for c in logits.argmax(dim=1).tolist()]

    return choose


def positive_class(index: int | None = None) -> Chooser:
    """Binary: the positive class of every image, whatever the prediction.

    Binary models here have ONE logit (``TaskSpec.num_outputs`` is 1: sigmoid of the positive class), so
    the positive class is logit 0. A two-logit softmax model (classes ordered negative, positive) has
    it at index 1. ``index=None`` picks by the logits' width: 0 for one logit, 1 for two; pass
    ``index`` to override (e.g. a two-class model whose positive class comes first).
    """

    def choose(logits: Tensor) -> list[list[int]]:
        width = logits.shape[1]
        if index is None:
            if width not in (1, 2):
                raise ValueError(f"positive_class() needs 1 or 2 logits to guess the positive one, got {width}")
            chosen = 0 if width == 1 else 1
        else:
            chosen = index
        if not 0 <= chosen < width:
            raise ValueError(f"positive class index {chosen} out of range for {width} logits")
        return [[chosen] for _ in range(logits.shape[0])]

    return choose


def labels_over(thresholds: Sequence[float] | float) -> Chooser:
    """Multilabel (sigmoid): every label ``j`` with ``sigmoid(logit_j) >= thresholds[j]``, in label order;
    possibly none. A single float is used for every label."""

    def choose(logits: Tensor) -> list[list[int]]:
        probs = torch.sigmoid(logits.detach().float())
        if np.ndim(thresholds) == 0:  # one number (Python or numpy) for every label
            limit = torch.full((probs.shape[1],), float(thresholds), device=probs.device)  # type: ignore[arg-type]
        else:
            values = [float(t) for t in np.ravel(thresholds)]
            if len(values) != probs.shape[1]:
                raise ValueError(f"{len(values)} thresholds for {probs.shape[1]} labels")
            limit = torch.tensor(values, dtype=torch.float32, device=probs.device)
        over = (probs >= limit).cpu()
        return [torch.nonzero(row).flatten().tolist() for row in over]

    return choose


# --- heatmaps -------------------------------------------------------------------------------------


def compute_heatmaps(model: ClassifierNet, x: Tensor, choose: Chooser) -> HeatmapBatch:
    """Logits and Grad-CAM maps of ``x`` (B, C, H, W) for the classes ``choose(logits)`` picks.

    ``model`` must be in eval mode (batch statistics or dropout would make the maps depend on the
    batch and differ from inference). Works under ``torch.no_grad()`` and ``torch.inference_mode()``
    too. Neither path leaves anything in the parameters' ``.grad``.
    """
    if x.ndim != 4:
        raise ValueError(f"expected a (B, C, H, W) batch, got shape {tuple(x.shape)}")
    if model.training:
        raise ValueError("compute_heatmaps needs the model in eval mode (call model.eval())")
    linear = model.cam_linear
    if linear is not None:
        with torch.no_grad():
            activation, logits = model.forward_features(x)
        return cams_from_features(activation, logits, linear.weight, choose, (x.shape[2], x.shape[3]))
    logits, targets, raw = _gradient_cams(model, x, choose)
    return HeatmapBatch(logits=logits.detach(), maps=_assemble(targets, raw), size=(x.shape[2], x.shape[3]))


def cams_from_features(
    activation: Tensor, logits: Tensor, weight: Tensor, choose: Chooser, size: tuple[int, int]
) -> HeatmapBatch:
    """CAM from a forward pass's own features and the head's Linear weight: no model call, no backward.

    Shared by the eager path and any backend that returns the activation beside the logits (ONNX Runtime).
    """
    with torch.no_grad():
        targets = _validated(choose(logits), logits)
        img, cls = _pairs(targets, activation.device)
        with _float32(activation):
            weights = weight.detach().float()[cls] / (activation.shape[2] * activation.shape[3])
            raw = torch.einsum("nk,nkhw->nhw", weights, _of_images(activation.float(), img)) if len(img) else None
    return HeatmapBatch(logits=logits.detach(), maps=_assemble(targets, raw), size=size)


def _of_images(activation: Tensor, img: Tensor) -> Tensor:
    """``activation[img]``; the activation itself when ``img`` is every image once, in order (one map
    per image: the binary and multiclass tasks), without copying it (4 MB for 16 images)."""
    if len(img) == len(activation) and torch.equal(img, torch.arange(len(img), device=img.device)):
        return activation
    return activation[img]


def _float32(x: Tensor) -> torch.autocast:
    """The map arithmetic stays float32 even inside the caller's autocast (bf16/fp16 forward on CUDA)."""
    return torch.autocast(device_type=x.device.type, enabled=False)


def _gradient_cams(model: ClassifierNet, x: Tensor, choose: Chooser) -> tuple[Tensor, list[list[int]], Tensor | None]:
    """Grad-CAM through the head only: ``d logit / d A`` by ``autograd.grad``, one backward per target rank."""
    # inference_mode(False): A must be a normal tensor the head can be recorded on, even when the caller
    # runs inside inference_mode; the features still run without a graph.
    with torch.inference_mode(False):
        with torch.no_grad():
            activation = model.features(x)
        activation = activation.detach().requires_grad_()
        with torch.enable_grad():
            logits = model.head(activation)
        targets = _validated(choose(logits.detach()), logits)
        ranks = max((len(t) for t in targets), default=0)
        offsets = np.cumsum([0] + [len(t) for t in targets[:-1]]).tolist()
        raw: Tensor | None = None
        for rank in range(ranks):
            images = [i for i, t in enumerate(targets) if len(t) > rank]
            img = torch.tensor(images, dtype=torch.long, device=x.device)
            cls = torch.tensor([targets[i][rank] for i in images], dtype=torch.long, device=x.device)
            (grad,) = torch.autograd.grad(logits[img, cls].sum(), activation, retain_graph=rank < ranks - 1)
            with torch.no_grad(), _float32(x):
                weights = grad[img].float().mean(dim=(2, 3))
                cams = torch.einsum("nk,nkhw->nhw", weights, activation.detach()[img].float())
                if raw is None:
                    raw = cams.new_empty((sum(len(t) for t in targets), *cams.shape[1:]))
                raw[torch.tensor([offsets[i] + rank for i in images], device=x.device)] = cams
        logits = logits.detach()
    return logits, targets, raw


def _validated(targets: list[list[int]], logits: Tensor) -> list[list[int]]:
    batch, width = logits.shape
    if len(targets) != batch:
        raise ValueError(f"the chooser returned {len(targets)} target lists for {batch} images")
    out = []
    for row in targets:
        row = [int(c) for c in row]
        for c in row:
            if not 0 <= c < width:
                raise ValueError(f"class index {c} out of range for {width} logits")
        out.append(row)
    return out


def _pairs(targets: list[list[int]], device: torch.device) -> tuple[Tensor, Tensor]:
    """Flattened (image, class) pairs in image-major order: the order maps are returned in."""
    img = [i for i, row in enumerate(targets) for _ in row]
    cls = [c for row in targets for c in row]
    return (
        torch.tensor(img, dtype=torch.long, device=device),
        torch.tensor(cls, dtype=torch.long, device=device),
    )


def _assemble(targets: list[list[int]], raw: Tensor | None) -> list[list[tuple[int, np.ndarray]]]:
    """Each image's maps, by class. A map that is not finite everywhere (a NaN in the features or
    the gradients) is left out: its result is stored without a heatmap, as the report then says."""
    if raw is None:
        return [[] for _ in targets]
    grids = _grids(raw).cpu().numpy()
    finite = np.isfinite(grids).all(axis=(1, 2))
    out, n = [], 0
    for row in targets:
        out.append([(c, grids[n + j]) for j, c in enumerate(row) if finite[n + j]])
        n += len(row)
    return out


def _grids(raw: Tensor) -> Tensor:
    """pytorch-grad-cam's first step: ReLU, then per-map min-max (``m - min``, ``/ (eps + max)``),
    in place on a new tensor (``raw`` stays the caller's)."""
    with torch.no_grad(), torch.autocast(device_type=raw.device.type, enabled=False):
        m = raw.float().clamp_min(0)
        m.sub_(m.amin(dim=(1, 2), keepdim=True))
        return m.div_(m.amax(dim=(1, 2), keepdim=True).add_(EPS)).contiguous()
