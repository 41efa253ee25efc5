"""A forward pass of short operators beside a thread busy in Python, by switch interval.

On a GPU every operator of the forward pass is a kernel launch of microseconds, and PyTorch releases
the GIL in each and takes it back after. Beside a thread that is busy in Python (the daemon's loop,
the evaluator's driver), each take waits up to the interpreter's switch interval (5 ms by default),
and the forward runs at the interval's pace (the convoy effect). This measures it without a GPU: the
model runs on the CPU on a tiny SYNTHETIC input (1x32x32, untrained SYNTHETIC weights) on one thread,
so that its operators take microseconds too. Timed: ``ServedModel.predict`` of one image, heatmaps
on, alone, then beside a thread that computes in Python all the time ("busy") or half of it
("half", 1 ms of work then 1 ms asleep), at each switch interval; and how much that thread got done
meanwhile (its loops a second), the price of a shorter interval.

    PYTHONPATH=$PWD/src .venv/bin/python benchmarks/gil_convoy.py
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from inference import median_seconds, write_model

from meddaemon.engine import registry
from meddaemon.engine.inference import ServedModel
from meddaemon.engine.tasks import GREY_MEAN, GREY_STD, InputContract


class Competitor:
    """A thread busy in Python for ``duty`` of its time (in 1 ms slices), counting its loops."""

    def __init__(self, duty: float) -> None:
        self.duty, self.loops, self.stopped = duty, 0, False
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stopped:
            until = time.perf_counter() + 0.001
            while time.perf_counter() < until:
                sum(range(200))
                self.loops += 1
            if self.duty < 1:
                time.sleep(0.001 * (1 - self.duty) / self.duty)

    def __enter__(self) -> Competitor:
        self.started = time.perf_counter()
        self.thread.start()
        time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopped = True
        self.thread.join()
        self.rate = self.loops / (time.perf_counter() - self.started)


def forward_ms(served: ServedModel, x: np.ndarray, seconds: float) -> float:
    """Median ms of a forward over about ``seconds`` (at least three)."""
    return median_seconds(lambda: served.predict(x), seconds) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--archs", default="densenet121,mobilenet_v2")
    parser.add_argument("--intervals-ms", default="5,1,0.5,0.2,0.1")
    parser.add_argument("--seconds", type=float, default=1.0, help="time per measurement")
    args = parser.parse_args()
    torch.set_num_threads(1)
    x = np.random.default_rng(0).standard_normal((1, 1, 32, 32)).astype(np.float32)
    contract = InputContract(1, 32, 32, GREY_MEAN, GREY_STD)
    intervals = [float(v) for v in args.intervals_ms.split(",")]
    print("ms a forward (heatmaps on, 1x32x32, one thread), and the competing thread's loops/s (thousands)\n")
    print("| model | alone | " + " | ".join(f"{c} thread, {i:g} ms" for c in ("busy", "half") for i in intervals)
          + " |\n|---|---:|" + "---:|" * 2 * len(intervals))  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="gil-convoy-") as tmp:
        for arch in args.archs.split(","):
            served = ServedModel(1, registry.load_version(write_model(Path(tmp) / arch, arch, contract)),
                                 torch.device("cpu"), heatmaps=True)  # fmt: skip
            cells = [f"{forward_ms(served, x, args.seconds):.1f}"]
            for duty in (1.0, 0.5):
                for interval in intervals:
                    sys.setswitchinterval(interval / 1000)
                    with Competitor(duty) as competitor:
                        ms = forward_ms(served, x, args.seconds)
                    cells.append(f"{ms:.1f} ({competitor.rate / 1000:.0f})")
            sys.setswitchinterval(0.005)
            print(f"| {arch} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
