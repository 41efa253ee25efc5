"""Heatmap benchmark: what a Grad-CAM map costs on top of inference, ours against pytorch-grad-cam.

For each architecture, on one seeded random batch (randomly initialised model, eval mode, same
process, same threads), these are timed, interleaved round by round (the order rotating every
round) so that drifts in the machine's speed hit all alike:

* **inference**: ``model(x)`` under ``torch.no_grad()``;
* **ours**: ``compute_heatmaps(model, x, predicted_class()).expanded()``: logits and the predicted
  class's map for every image, post-processed and resized to the input, as numpy (the daemon keeps
  the grid and resizes it when drawing; ``expanded`` makes the work the same as grad-cam's);
* **grad-cam**: pytorch-grad-cam's ``GradCAM(model, target_layers=[model.features[-1]])`` called on
  the same batch with ``targets=None`` (the predicted class), hooks registered and released inside
  the timed call as a user would (``with GradCAM(...) as cam``);
* **maps only** (CAM path): the part of ours after the forward pass (choosing, weighing the
  activation, post-processing, copying to numpy) on a precomputed activation: the overhead alone,
  which a busy machine's noise cannot hide in.

The times are medians over ``--repeats`` after ``--warmup`` untimed rounds. The ratios are the medians
of the per-round ratios (each method over the inference of the same round), which shrugs off a
neighbour process stealing a core for a few seconds better than a ratio of medians does. The load
average is printed before and after: on a shared machine, compare runs with a quiet load only.
docs/design.md's goal: ours <= 1.3x inference.

    .venv/bin/python benchmarks/heatmaps.py                            # mobilenet_v2, densenet121, vgg16
    .venv/bin/python benchmarks/heatmaps.py --arch densenet121 --batch 8 --repeats 9
    .venv/bin/python benchmarks/heatmaps.py --vgg-batch 0              # skip vgg16
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections.abc import Callable

import torch
from pytorch_grad_cam import GradCAM

from meddaemon.engine import heatmaps
from meddaemon.engine.architectures import build_model
from meddaemon.engine.heatmaps import compute_heatmaps, predicted_class


def _load() -> str:
    try:
        return " ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "n/a"


def _ms(seconds: float) -> str:
    return "n/a" if seconds != seconds else f"{seconds * 1e3:.1f}"  # NaN: not measured


def _timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def bench(
    architecture: str, batch: int, size: int, channels: int, repeats: int, warmup: int
) -> tuple[dict[str, float], dict[str, float]]:
    """Median seconds per method, and median per-round ratio to inference."""
    torch.manual_seed(0)
    model = build_model(architecture, channels, 3).eval()
    x = torch.randn(batch, channels, size, size, generator=torch.Generator().manual_seed(1))

    def inference() -> None:
        with torch.no_grad():
            model(x)

    def ours() -> None:
        compute_heatmaps(model, x, predicted_class()).expanded()  # at the input's size, as grad-cam's

    def gradcam() -> None:
        with GradCAM(model=model, target_layers=[model.features[-1]]) as cam:
            cam(input_tensor=x, targets=None)
        model.zero_grad(set_to_none=True)

    methods = {"inference": inference, "ours": ours, "grad-cam": gradcam}
    linear = model.cam_linear
    if linear is not None:
        with torch.no_grad():
            activation, logits = model.forward_features(x)

        def maps_only() -> None:
            """The CAM path's work after the forward pass: choose, weigh, post-process, to numpy."""
            with torch.no_grad():
                targets = predicted_class()(logits)
                img, cls = heatmaps._pairs(targets, x.device)
                weights = linear.weight[cls] / (activation.shape[2] * activation.shape[3])
                raw = torch.einsum("nk,nkhw->nhw", weights, activation[img])
                heatmaps.HeatmapBatch(logits, heatmaps._assemble(targets, raw), (size, size)).expanded()

        methods["maps only"] = maps_only
    times: dict[str, list[float]] = {name: [] for name in methods}
    names = list(methods)
    for round_ in range(warmup + repeats):
        # rotate the order every round: no method always follows grad-cam's big allocations
        for name in names[round_ % len(names) :] + names[: round_ % len(names)]:
            elapsed = _timed(methods[name])
            if round_ >= warmup:
                times[name].append(elapsed)
    medians = {name: statistics.median(values) for name, values in times.items()}
    ratios = {
        name: statistics.median(t / i for t, i in zip(values, times["inference"], strict=True))
        for name, values in times.items()
    }
    medians.setdefault("maps only", float("nan"))
    return medians, ratios


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--arch", action="append", help="architecture (repeatable; default mobilenet_v2 and densenet121)"
    )
    parser.add_argument("--batch", type=int, default=16, help="batch size (default 16)")
    parser.add_argument("--size", type=int, default=224, help="input side in pixels (default 224)")
    parser.add_argument("--channels", type=int, default=1, help="input channels (default 1)")
    parser.add_argument("--repeats", type=int, default=7, help="timed rounds (default 7)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds first (default 2)")
    parser.add_argument("--vgg-batch", type=int, default=4, help="batch size for vgg16, 0 to skip (default 4)")
    args = parser.parse_args()

    runs = [(arch, args.batch) for arch in (args.arch or ["mobilenet_v2", "densenet121"])]
    if args.vgg_batch and not args.arch:
        runs.append(("vgg16", args.vgg_batch))

    print(f"load average before: {_load()}")
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}, "
        f"input {args.channels}x{args.size}x{args.size}, median of {args.repeats} after {args.warmup} warm-up"
    )
    print()
    print(
        "| model | path | batch | inference (ms) | ours (ms) | grad-cam (ms) | ours / inf. | grad-cam / inf. "
        "| maps only (ms) |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for arch, batch in runs:
        t, r = bench(arch, batch, args.size, args.channels, args.repeats, args.warmup)
        path = "gradient" if arch == "vgg16" else "CAM"
        print(
            f"| {arch} | {path} | {batch} | {t['inference'] * 1e3:.0f} | {t['ours'] * 1e3:.0f} | "
            f"{t['grad-cam'] * 1e3:.0f} | {r['ours']:.2f} | {r['grad-cam']:.2f} | {_ms(t['maps only'])} |",
            flush=True,
        )
    print()
    print(f"load average after: {_load()}")


if __name__ == "__main__":
    main()
