"""Running a verified model over a batch: probabilities, calls at the manifest's thresholds, heatmaps.

CUDA when present (autocast, channels_last, pinned memory, non-blocking copies), the CPU otherwise,
with the faster of eager PyTorch and ONNX Runtime (``engine/onnx_backend.py``), measured once per
version and machine (``engine/backend_cache.py``).
An out-of-memory error halves the batch and retries; no scan is dropped. A row with a NaN or
infinite output is an error for that scan, never a result.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from meddaemon.engine.backend_cache import BackendCache, BackendChoice, BackendKey, GraphCache
from meddaemon.engine.heatmaps import (
    Chooser,
    cams_from_features,
    compute_heatmaps,
    labels_over,
    positive_class,
    predicted_class,
)
from meddaemon.engine.onnx_backend import BackendUnavailable, OnnxRunner, agrees_with_eager, images_per_second
from meddaemon.engine.registry import ONNX_ARCHITECTURE, LoadedModel, probabilities, self_test_input
from meddaemon.engine.tasks import InputContract
from meddaemon.failures import FailureReason, ScanFailure

log = logging.getLogger(__name__)


@dataclass
class Prediction:
    """One scan's output under one model."""

    probabilities: np.ndarray
    positive: np.ndarray
    #: (label index, float32 grid in [0, 1]: the map before its resize to the input, ``engine.heatmap_grid``)
    heatmaps: list[tuple[int, np.ndarray]] = field(default_factory=list)
    failure: ScanFailure | None = None


def limit_threads(threads: int) -> None:
    """CPU threads for the forward pass (PyTorch's, and ONNX Runtime's, which follows it); 0 keeps
    PyTorch's default, one per core. Daemons sharing a machine each need their share: OpenMP threads
    spin while they wait, so two daemons with a thread per core each run several times slower."""
    if threads > 0:
        torch.set_num_threads(threads)


def forward_lanes(setting: int, device: torch.device) -> int:
    """How many batches a model served on ``device`` runs at once (``concurrent_batches``; 0: two).

    On the CPU, ONNX Runtime splits each operator of a batch over its threads and waits for the
    slowest: a core taken a moment by a decoding worker or the daemon's loop stalls the whole batch.
    Two batches at once, each on half the threads, keep the cores busy instead (mobilenet_v2 on 2
    cores beside a busy worker: 162 -> 190-204 images/s; benchmarks/README.md, issue 16's fifth
    pass). Never more lanes than threads; one on a GPU."""
    if device.type != "cpu":
        return 1
    return max(1, min(setting or 2, torch.get_num_threads()))


def onnx_threads(lanes: int) -> int:
    """ONNX Runtime threads of each of a model's ``lanes``: PyTorch's threads shared among them."""
    return max(1, torch.get_num_threads() // max(1, lanes))


def backend_key(sha256: str, device: torch.device, batch: int, activation: bool, lanes: int) -> BackendKey:
    """What the backend chosen for weights ``sha256`` on ``device`` depends on (``backend_cache``)."""
    return BackendKey(sha256, device.type, torch.get_num_threads(), batch, activation, lanes)


def pick_device(setting: str = "auto") -> torch.device:
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(setting)


class ServedModel:
    """A model version loaded, verified and placed on its device, ready for batches."""

    def __init__(
        self, version_id: int, loaded: LoadedModel, device: torch.device, heatmaps: bool = True, lanes: int = 1
    ) -> None:
        """``lanes``: batches run at once once ONNX Runtime serves the model on the CPU, its threads
        shared among them (``forward_lanes``); eager PyTorch and CUDA run one at a time."""
        self.version_id = version_id
        self.manifest = loaded.manifest
        self.device = device
        self.labels = list(self.manifest.labels)
        self.kind = self.manifest.kind
        self.contract = InputContract.from_dict(self.manifest.input_contract)
        self.thresholds = np.array([self.manifest.thresholds.get(label, 0.5) for label in self.labels], np.float32)
        self.heatmaps = heatmaps and self.manifest.heatmaps
        self.model = loaded.model.eval().to(device)
        #: an imported ONNX graph is served by ONNX Runtime as it is: CUDA when onnxruntime has it
        self.imported_onnx = self.manifest.architecture == ONNX_ARCHITECTURE
        if self.imported_onnx:
            self.model.place(device)
        if device.type == "cuda":
            self.model = self.model.to(memory_format=torch.channels_last)
        self.chunk = 1 << 30  # the largest batch known to fit; lowered by out-of-memory errors
        self.onnx: OnnxRunner | None = None
        self.backend = self.model.backend if self.imported_onnx else "cuda" if device.type == "cuda" else "eager"
        self.speeds: dict[str, float] = {}
        #: whether the backend was chosen (``choose_backend``, ``serve_kept_graph``)
        self.chosen = False
        #: whether ``choose_backend`` timed the backends (False when it used a cached choice)
        self.measured = False
        #: where exported ONNX graphs are kept (the version's folder, from ``choose_backend``'s cache)
        self.graphs: GraphCache | None = None
        self._onnx_lanes = max(1, lanes) if device.type == "cpu" else 1
        #: batches this model runs at once (``predict`` from more threads waits for a lane)
        self.lanes = 1
        self._lane = threading.BoundedSemaphore(1)

    def choose_backend(self, batch: int, cache: BackendCache | None = None) -> str:
        """On the CPU, measure eager PyTorch and ONNX Runtime on one batch and keep the faster
        (the manifest's ``backend`` can pin either); returns the backend in use. An imported ONNX
        graph is not timed: ONNX Runtime runs it, on the providers its device gets.

        With ``cache``, a choice measured before for the same weights, versions, threads, batch
        and CPU is used without timing, and a new measurement is remembered there."""
        self.chosen = True
        wanted = self.manifest.backend
        if self.imported_onnx:
            log.info("%s: %s (an imported ONNX graph is served as it is)", self.name, self.backend)
            return self.backend
        if self.device.type != "cpu" or wanted == "eager":
            return self.backend
        if self.heatmaps and self.model.cam_linear is None:
            log.info("%s: eager PyTorch (its heatmaps need the gradient)", self.name)
            return self.backend
        key = self.backend_key(batch) if cache is not None and wanted == "auto" else None
        cached = cache.get(key) if cache is not None and key is not None else None
        if self.graphs is None and cache is not None:  # none given by ``serve_version``: nothing kept is trusted
            self.graphs = GraphCache(cache.folder)
        if cached is not None:
            return self._use_cached(cached, batch)
        choice = self._measure(batch, wanted)
        if cache is not None and key is not None:
            cache.put(key, choice)
        return self.backend

    def keep_graph(self) -> None:
        """Export this version's ONNX graph now and keep it with the version, its hash recorded
        (``graphs``), as a first ``choose_backend`` on the CPU would: for processes that serve the
        version with no database to record their own export (Ray's actors), which then serve the
        graph kept rather than each exporting it again at every run. Nothing for a graph already kept
        or served, an imported ONNX graph, or another device."""
        if self.imported_onnx or self.onnx is not None or self.graphs is None or self.device.type != "cpu":
            return
        if self.heatmaps and self.model.cam_linear is None:  # served eager: its heatmaps need the gradient
            return
        self._onnx_runner(self_test_input(self.contract, seed=0, batch=2))

    def backend_key(self, batch: int) -> BackendKey:
        return backend_key(self.manifest.sha256, self.device, batch, self.heatmaps, self._onnx_lanes)

    def serve_kept_graph(self, runner: OnnxRunner, choice: BackendChoice, batch: int, graphs: GraphCache) -> None:
        """Serve ``runner``, the graph kept with this version and verified by the caller, as the
        cached ``choice`` for ``batch`` says (``engine/serving.py``); nothing is measured."""
        self.chosen = True
        self.graphs = graphs
        self._serve_onnx(runner)
        self.speeds = dict(choice.speeds)
        self._log_cached(choice, batch, kept_graph=True)

    def _measure(self, batch: int, wanted: str) -> BackendChoice:
        sample = self_test_input(self.contract, seed=0, batch=batch)
        runner, note = self._onnx_runner(sample)
        if runner is None:
            return BackendChoice("eager", {}, note)
        if wanted == "onnx":
            self._serve_onnx(runner)
            return BackendChoice("onnx", {}, "pinned by the manifest")
        x = sample.numpy()
        self.speeds = {
            "eager": images_per_second(lambda: self._predict_chunk(x), batch),
            "onnx": images_per_second(
                lambda: self._run_onnx(runner, x, self._chooser()), batch, at_once=self._onnx_lanes
            ),
        }
        self.measured = True
        if self.speeds["onnx"] > self.speeds["eager"]:
            self._serve_onnx(runner)
        log.info(
            "%s: %s chosen (measured: eager %.0f, ONNX Runtime %.0f images/s at batch %d, %d at once)",
            self.name,
            self.backend,
            self.speeds["eager"],
            self.speeds["onnx"],
            batch,
            self._onnx_lanes,
        )
        return BackendChoice(self.backend, dict(self.speeds))

    def _use_cached(self, cached: BackendChoice, batch: int) -> str:
        self.speeds = dict(cached.speeds)
        if cached.backend == "onnx":
            runner, _ = self._onnx_runner(self_test_input(self.contract, seed=0, batch=batch))
            if runner is not None:
                self._serve_onnx(runner)
        self._log_cached(cached, batch)
        return self.backend

    def _log_cached(self, cached: BackendChoice, batch: int, kept_graph: bool = False) -> None:
        if self.speeds:
            why = (
                ", ".join(f"{name} {speed:.0f}" for name, speed in self.speeds.items()) + f" images/s at batch {batch}"
            )
        else:
            why = cached.note
        log.info(
            "%s: %s (cached choice for these weights on this machine: %s; not measured again%s)",
            self.name,
            self.backend,
            why,
            "; served from the graph kept with the version, the network not built" if kept_graph else "",
        )

    def _onnx_runner(self, sample: torch.Tensor) -> tuple[OnnxRunner | None, str]:
        """The ONNX Runtime session for this model, checked against eager; (None, why) when unusable."""
        try:
            runner = OnnxRunner.for_model(
                self.model,
                sample,
                self.heatmaps,
                graphs=self.graphs,
                weights_sha256=self.manifest.sha256,
                threads=onnx_threads(self._onnx_lanes),
            )
        except BackendUnavailable as exc:
            log.warning("%s: ONNX Runtime unavailable (%s); eager PyTorch", self.name, exc)
            return None, f"ONNX Runtime unavailable: {exc}"
        # a graph kept from an earlier start is checked on a small batch: it was checked in full when exported
        if not agrees_with_eager(runner, self.model, sample[:2] if runner.cached else sample):
            log.warning("%s: the ONNX graph disagrees with the model; eager PyTorch", self.name)
            return None, "the ONNX graph disagrees with the model"
        return runner, ""

    def _serve_onnx(self, runner: OnnxRunner) -> None:
        self.onnx, self.backend = runner, "onnx"
        self.lanes = self._onnx_lanes
        self._lane = threading.BoundedSemaphore(self.lanes)

    @property
    def name(self) -> str:
        return f"{self.manifest.task}/{self.manifest.version}"

    def predict(self, inputs: np.ndarray) -> list[Prediction]:
        """Predictions for (B, C, H, W) normalised inputs, in order."""
        out: list[Prediction] = []
        start = 0
        while start < len(inputs):
            size = min(self.chunk, len(inputs) - start)
            try:
                with self._lane:
                    out += self._predict_chunk(inputs[start : start + size])
            except torch.OutOfMemoryError:
                if size == 1:
                    raise
                self.chunk = max(1, size // 2)
                log.warning("%s: out of memory at batch %d; retrying at %d", self.name, size, self.chunk)
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
                continue
            start += size
        return out

    def maps_of_the_call(
        self, frames: Sequence[Prediction], inputs: np.ndarray, probs: np.ndarray
    ) -> list[tuple[int, np.ndarray]]:
        """The key frame's maps for the classes called on ``probs``, the scan's probabilities (its
        ``frames``' mean, ``inputs`` their model inputs). Each frame was mapped for its own call; where
        the key frame's differs from the scan's (a middle frame reading malignant between two reading
        benign), the report would show where the model looked for a class it did not call, so the key
        frame is mapped again for the classes called."""
        key = len(frames) // 2
        maps = frames[key].heatmaps
        if len(frames) == 1 or not self.heatmaps or self.kind == "binary":  # binary: always the positive class
            return maps
        called = np.flatnonzero(self.calls(probs)).tolist()
        if [label for label, _ in maps] == called:
            return maps
        with self._lane:
            return self._predict_chunk(inputs[key : key + 1], lambda logits: [called])[0].heatmaps

    def _predict_chunk(self, inputs: np.ndarray, choose: Chooser | None = None) -> list[Prediction]:
        """Predictions for one chunk, maps for the classes ``choose`` picks (by default the task's
        chooser: the call of each image)."""
        choose = choose or self._chooser()
        if self.onnx is not None:
            return self._run_onnx(self.onnx, inputs, choose)
        x = self._to_device(inputs)
        with self._autocast():
            if self.heatmaps:
                batch = compute_heatmaps(self.model, x, choose)
                logits, maps = batch.logits, batch.maps
            else:
                with torch.inference_mode():
                    logits = self.model(x)
                maps = [[] for _ in range(len(inputs))]
        probs = probabilities(logits.float(), self.kind).cpu().numpy()
        return [self._prediction(row, row_maps) for row, row_maps in zip(probs, maps, strict=True)]

    def _run_onnx(self, runner: OnnxRunner, inputs: np.ndarray, choose: Chooser) -> list[Prediction]:
        activation, logits = runner.run(inputs)
        if activation is not None and self.model.cam_linear is not None:
            size = (inputs.shape[2], inputs.shape[3])
            batch = cams_from_features(activation, logits, self.model.cam_linear.weight, choose, size)
            maps = batch.maps
        else:
            maps = [[] for _ in range(len(inputs))]
        probs = probabilities(logits.float(), self.kind).numpy()
        return [self._prediction(row, row_maps) for row, row_maps in zip(probs, maps, strict=True)]

    def _prediction(self, probs: np.ndarray, maps: list[tuple[int, np.ndarray]]) -> Prediction:
        if not np.all(np.isfinite(probs)):
            return Prediction(
                probs,
                np.zeros(len(probs), bool),
                failure=ScanFailure(FailureReason.NON_FINITE_OUTPUT, "the model gave a NaN or infinite output"),
            )
        label_of = (lambda _: 1) if self.kind == "binary" else (lambda index: index)
        return Prediction(probs, self.calls(probs), [(label_of(i), m) for i, m in maps])

    def calls(self, probs: np.ndarray) -> np.ndarray:
        """Per label, positive or not: the top class (multiclass), else the manifest's thresholds."""
        if self.kind == "multiclass":
            return np.arange(len(probs)) == int(np.argmax(probs))
        if self.kind == "binary":
            call = bool(probs[1] >= self.thresholds[1])
            return np.array([not call, call])
        return probs >= self.thresholds

    def _chooser(self) -> Callable[[torch.Tensor], list[list[int]]]:
        if self.kind == "multiclass":
            return predicted_class()
        if self.kind == "binary":
            return positive_class()
        return labels_over(self.thresholds.tolist())

    def _to_device(self, inputs: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(np.ascontiguousarray(inputs, dtype=np.float32))
        if self.device.type != "cuda":
            return x
        return x.pin_memory().to(self.device, non_blocking=True).contiguous(memory_format=torch.channels_last)

    def _autocast(self) -> torch.autocast:
        if self.device.type == "cuda":
            dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
            return torch.autocast("cuda", dtype=dtype)
        return torch.autocast("cpu", enabled=False)
