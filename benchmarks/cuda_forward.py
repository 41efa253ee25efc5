"""The ways to run a classifier's forward pass on a GPU, timed side by side (issues 15 and 16).

``ServedModel`` on CUDA (what the daemon and the evaluator serve: bf16 autocast, channels_last, the
batch copied in through freshly pinned memory, probabilities back to the host), heatmaps off and on,
against the same weights run the plain ways: fp32 or bf16 autocast, NCHW or channels_last, the batch
copied from pageable memory; with cuDNN's autotuner off (PyTorch's default) and on. Every variant
ends with its probabilities on the host, as a served batch does. SYNTHETIC inputs (seeded noise) and
untrained SYNTHETIC weights (busi, 1x224x224): the figures are about speed only. Needs a GPU.

    PYTHONPATH=$PWD/src python benchmarks/cuda_forward.py
    PYTHONPATH=$PWD/src python benchmarks/cuda_forward.py --archs mobilenet_v2 --batches 16,64,256
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from inference import median_seconds, write_model

from meddaemon.engine import registry
from meddaemon.engine.inference import ServedModel
from meddaemon.engine.tasks import GREY_MEAN, GREY_STD, InputContract

CONTRACT = InputContract(1, 224, 224, GREY_MEAN, GREY_STD)


def images_per_second(run: Callable[[], object], batch: int, seconds: float = 0.5) -> float:
    """The median rate over about ``seconds``, after three runs to warm up (cuDNN's autotuner, when
    on, does its search in those)."""
    return batch / median_seconds(run, seconds, warmups=3, at_least=5)


def plain(model: torch.nn.Module, x: np.ndarray, bf16: bool, channels_last: bool) -> Callable[[], object]:
    device = torch.device("cuda")
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    net = model.to(device).to(memory_format=fmt).eval()
    cast = torch.autocast("cuda", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()

    def run() -> object:
        with torch.inference_mode(), cast:
            batch = torch.from_numpy(x).to(device).contiguous(memory_format=fmt)
            return torch.softmax(net(batch).float(), dim=1).cpu().numpy()

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--archs", default="mobilenet_v2,densenet121")
    parser.add_argument("--batches", default="16,64")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("cuda_forward.py needs a GPU (torch.cuda.is_available() is False)")
    device = torch.cuda.get_device_name()
    print(f"{device}, torch {torch.__version__}; images/s, the median of about 0.5 s of batches\n")
    with tempfile.TemporaryDirectory(prefix="cuda-forward-") as tmp:
        for arch in args.archs.split(","):
            folder = write_model(Path(tmp) / arch, arch, CONTRACT)
            for batch in (int(b) for b in args.batches.split(",")):
                x = np.random.default_rng(0).standard_normal((batch, 1, 224, 224)).astype(np.float32)
                rows: list[tuple[str, float]] = []
                for autotune in (False, True):
                    torch.backends.cudnn.benchmark = autotune
                    tuned = ", cuDNN autotuner" if autotune else ""
                    for heatmaps in (False, True):
                        served = ServedModel(1, registry.load_version(folder), torch.device("cuda"), heatmaps=heatmaps)
                        name = f"ServedModel, heatmaps {'on' if heatmaps else 'off'}{tuned}"
                        rows.append((name, images_per_second(lambda s=served, x=x: s.predict(x), batch)))
                    for bf16 in (False, True):
                        for channels_last in (False, True):
                            model = registry.load_version(folder).model
                            layout = "channels_last" if channels_last else "NCHW"
                            name = f"{'bf16' if bf16 else 'fp32'}, {layout}{tuned}"
                            rows.append((name, images_per_second(plain(model, x, bf16, channels_last), batch)))
                torch.backends.cudnn.benchmark = False
                print(f"{arch}, batch {batch}\n\n| variant | images/s |\n|---|---:|")
                for name, rate in rows:
                    print(f"| {name} | {rate:.0f} |")
                print(flush=True)


if __name__ == "__main__":
    main()
