"""ONNX Runtime on the CPU: often 1.5-3x faster than eager PyTorch for these models (docs/design.md
section 6), so the engine measures both per model and keeps the faster, unless the manifest pins one.

The exported graph returns the heatmap activation beside the logits, so CAM maps come from the same
pass (``heatmaps.cams_from_features``). Models whose heatmaps need the gradient (VGG16) stay eager.
"""

from __future__ import annotations

import io
import logging
import threading
import time
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from torch import Tensor, nn

from meddaemon.engine.architectures import ClassifierNet
from meddaemon.engine.backend_cache import GraphCache, GraphKey

log = logging.getLogger(__name__)

#: ONNX opset of the exported graphs
OPSET = 17
#: Largest difference in logits tolerated between the exported graph and the eager model.
AGREEMENT_ATOL = 1e-3
#: one export at a time in a process: torch.onnx.export keeps its state in module globals, and a
#: second export while one ran failed ("GLOBALS.in_onnx_export must be False"), its model served
#: eager (a loader thread left exporting by a stop, beside its successor's)
_EXPORTING = threading.Lock()


class BackendUnavailable(RuntimeError):
    pass


class _FeaturesAndLogits(nn.Module):
    def __init__(self, model: ClassifierNet) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.model.forward_features(x)


class OnnxRunner:
    """An ONNX Runtime session for one model: ``run(x) -> (activation | None, logits)``."""

    def __init__(self, graph: bytes, with_activation: bool, threads: int = 0, cached: bool = False) -> None:
        """``graph``: ONNX bytes whose outputs are ``logits`` (``activation`` first when
        ``with_activation``). ``threads``: the session's pool (0: PyTorch's thread count); a session
        serving several batches at once gets a share each (``ServedModel.lanes``)."""
        try:
            import onnxruntime as ort
        except ImportError as exc:  # an optional speed-up, never a requirement
            raise BackendUnavailable("onnxruntime is not installed") from exc
        self.with_activation = with_activation
        #: whether the graph came from the cache (not exported by this process)
        self.cached = cached
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        options.log_severity_level = 3
        # the pool's threads sleep while they wait instead of spinning: in the daemon they share the
        # cores with the decoding workers and the loop, and a spinning thread takes the core a worker
        # needs; alone, the forward is as fast either way (benchmarks/README.md, issue 16's fourth pass)
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(graph, options, providers=["CPUExecutionProvider"])

    @classmethod
    def for_model(
        cls,
        model: ClassifierNet,
        sample: Tensor,
        with_activation: bool,
        graphs: GraphCache | None = None,
        weights_sha256: str = "",
        threads: int = 0,
    ) -> OnnxRunner:
        """A session for ``model``'s graph, exported from it; with ``graphs`` (and the weights'
        ``weights_sha256``) the graph exported by an earlier start is used, and a new export kept there."""
        key = GraphKey(weights_sha256, with_activation, OPSET) if graphs is not None and weights_sha256 else None
        graph = graphs.get(key) if graphs is not None and key is not None else None
        cached = graph is not None
        if graph is None:
            graph = _export(model, sample, with_activation)
            if graphs is not None and key is not None:
                graphs.put(key, graph)
        return cls(graph, with_activation, threads, cached)

    def run(self, x: np.ndarray) -> tuple[Tensor | None, Tensor]:
        outputs = self.session.run(None, {"x": np.ascontiguousarray(x, dtype=np.float32)})
        if self.with_activation:
            return torch.from_numpy(outputs[0]), torch.from_numpy(outputs[1])
        return None, torch.from_numpy(outputs[0])


class ExportedNet(nn.Module):
    """A network's exported graph standing in for the network: ``forward``, ``forward_features`` and
    ``cam_linear`` as a :class:`ClassifierNet` has them, for a version served from its kept graph
    (``engine/serving.py``) without the network being built."""

    def __init__(self, runner: OnnxRunner, cam_weight: Tensor | None = None) -> None:
        """``cam_weight``: the CAM head's (outputs, channels) Linear weight, from the version's weights."""
        super().__init__()
        self.runner = runner
        self.linear: nn.Linear | None = None
        if cam_weight is not None:
            self.linear = nn.Linear(cam_weight.shape[1], cam_weight.shape[0], bias=False)
            with torch.no_grad():
                self.linear.weight.copy_(cam_weight)

    @property
    def cam_linear(self) -> nn.Linear | None:
        return self.linear

    def forward(self, x: Tensor) -> Tensor:
        return self.runner.run(x.detach().cpu().numpy())[1]

    def forward_features(self, x: Tensor) -> tuple[Tensor, Tensor]:
        activation, logits = self.runner.run(x.detach().cpu().numpy())
        if activation is None:
            raise BackendUnavailable("the graph was exported without the heatmap activation")
        return activation, logits


def _export(model: ClassifierNet, sample: Tensor, with_activation: bool) -> bytes:
    """The graph of ``model`` (logits, and the heatmap activation first when asked), as ONNX bytes."""
    module = (_FeaturesAndLogits(model) if with_activation else model).eval()
    outputs = ["activation", "logits"] if with_activation else ["logits"]
    buffer = io.BytesIO()
    try:
        with _EXPORTING, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                module,
                (sample[:1],),
                buffer,
                dynamo=False,
                opset_version=OPSET,
                input_names=["x"],
                output_names=outputs,
                dynamic_axes={name: {0: "batch"} for name in ["x", *outputs]},
            )
    except Exception as exc:
        raise BackendUnavailable(f"ONNX export failed: {type(exc).__name__}: {exc}") from exc
    return buffer.getvalue()


def agrees_with_eager(runner: OnnxRunner, model: ClassifierNet, sample: Tensor) -> bool:
    with torch.inference_mode():
        expected = model(sample)
    _, logits = runner.run(sample.numpy())
    return bool(torch.allclose(logits, expected, atol=AGREEMENT_ATOL, rtol=0))


def images_per_second(run: Callable[[], object], batch: int, repeats: int = 3, at_once: int = 1) -> float:
    """Images per second of ``run`` (one batch of ``batch``), called ``at_once`` times concurrently
    (as the batches of a model with several lanes run), median of ``repeats``."""
    timed = run if at_once == 1 else lambda: run_at_once(run, at_once)
    timed()  # warm-up: allocations, kernel selection
    timings = []
    for _ in range(repeats):
        start = time.perf_counter()
        timed()
        timings.append(time.perf_counter() - start)
    return batch * at_once / float(np.median(timings))


def run_at_once(run: Callable[[], object], times: int) -> None:
    """``run`` called ``times`` times concurrently, each in a thread of its own; returns when all are done."""
    with ThreadPoolExecutor(times) as pool:
        for future in [pool.submit(run) for _ in range(times)]:
            future.result()
