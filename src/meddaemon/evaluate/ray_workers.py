"""What runs on the Ray workers of ``medcli evaluate --engine ray`` (``ray_engine`` is the driver): the
decoding task, the model actor, and the bytes they hand back.

Ray imports the module of a task's function in every worker that runs it: this one imports what
decoding needs (``reading``: the decoders, the preprocessing), and the actor imports the model's
modules when it starts. A decoding worker imports it in 1.7 s on a 2-core machine, where the driver's
modules (the database layer, the pipeline, torchvision) took 3.4 s.
"""

from __future__ import annotations

import io
import json
import socket
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from meddaemon.engine.decode import DecodeOptions
from meddaemon.engine.tasks import InputContract
from meddaemon.evaluate.reading import read_file
from meddaemon.logs import quiet_libraries

if TYPE_CHECKING:
    from meddaemon.engine.inference import Prediction

#: marks a model refused on a node in the error Ray passes back to the driver
REFUSED = "meddaemon-model-refused"


def decode_batch(
    batch: dict[str, np.ndarray], contract: dict[str, Any], options: dict[str, Any], scored: np.ndarray
) -> dict[str, np.ndarray]:
    """A Ray task: read, hash and decode a batch of files (``reading.read_file``) into plain columns."""
    quiet_libraries()
    terms = InputContract.from_dict(contract)
    decode = DecodeOptions(**options)
    reads = [read_file(str(p), terms, decode, scored) for p in batch["path"]]
    return {
        "path": np.array([r.path for r in reads], dtype=object),
        "sha256": np.array([r.sha256 or "" for r in reads], dtype=object),
        "size": np.array([r.size for r in reads], dtype=np.int64),
        "known": np.array([r.known for r in reads], dtype=bool),
        "reason": np.array([r.failure.reason.value if r.failure else "" for r in reads], dtype=object),
        "message": np.array([r.failure.message if r.failure else "" for r in reads], dtype=object),
        "metadata": np.array([json.dumps(r.metadata.as_dict()) if r.metadata else "" for r in reads], dtype=object),
        "inputs": np.array([_npy(r.inputs) for r in reads], dtype=object),
    }


class ModelActor:
    """A Ray actor: the model version loaded once from its folder and verified on this node.

    On the CPU it runs each batch Ray hands it in ``lanes`` parts at once, each on its share of the
    threads, as the local engine keeps that many batches in the model (``forward_lanes``): one batch
    on every thread waits for the slowest, and a decoding task beside the actor takes a core now
    and then."""

    def __init__(
        self,
        folder: str,
        version_id: int,
        device: str,
        sha256: str | None = None,
        manifest: dict | None = None,
        graphs: dict[str, str] | None = None,
        threads: int = 0,
        batch: int = 64,
        heatmaps: bool = False,
        concurrent_batches: int = 0,
    ) -> None:
        import torch

        from meddaemon.engine.backend_cache import BACKEND_PROBE_BATCH
        from meddaemon.engine.inference import forward_lanes
        from meddaemon.engine.registry import ModelRefused, Registered
        from meddaemon.engine.serving import serve_version

        if threads > 0:
            torch.set_num_threads(threads)
        placed = torch.device(device)
        lanes = forward_lanes(concurrent_batches, placed)
        try:
            self.model = serve_version(
                Path(folder),
                version_id,
                placed,
                heatmaps=heatmaps,
                batch=min(batch, BACKEND_PROBE_BATCH),
                lanes=lanes,
                registered=Registered(sha256, manifest or {}, graphs or {}) if sha256 else None,
            )
        except ModelRefused as refusal:
            raise RuntimeError(
                f"{REFUSED}: model refused on node {socket.gethostname()}: {refusal.reason} ({refusal.message})"
            ) from None
        #: the threads the lanes run in (None: one lane, the actor's own thread)
        self.lanes: ThreadPoolExecutor | None = None
        if self.model.lanes > 1:
            self.lanes = ThreadPoolExecutor(self.model.lanes, thread_name_prefix="forward")

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        labels = len(self.model.labels)
        rows = len(batch["path"])
        probabilities = np.full((rows, labels), np.nan)
        positive = np.zeros((rows, labels), dtype=bool)
        reasons, messages = batch["reason"].copy(), batch["message"].copy()
        maps = np.full(rows, b"", dtype=object)
        inputs = {i: _array(blob) for i, blob in enumerate(batch["inputs"]) if blob}
        if inputs:
            order = list(inputs)
            sizes = [inputs[i].shape[0] for i in order]
            predictions = self._predict(np.concatenate([inputs[i] for i in order]))
            start = 0
            for i, size in zip(order, sizes, strict=True):
                rows_of = predictions[start : start + size]
                start += size
                failure = next((p.failure for p in rows_of if p.failure is not None), None)
                if failure is not None:
                    reasons[i], messages[i] = failure.reason.value, failure.message
                    continue
                probs = np.mean([p.probabilities for p in rows_of], axis=0)
                probabilities[i], positive[i] = probs, self.model.calls(probs)
                key = size // 2  # the key frame's maps, as the local engine keeps them
                key_maps = self.model.maps_of_the_call(rows_of, inputs[i], probs)
                if key_maps:
                    maps[i] = _pack_maps(key_maps, inputs[i][key])
        out = {k: v for k, v in batch.items() if k != "inputs"}
        return out | {
            "reason": reasons, "message": messages, "probabilities": probabilities, "positive": positive, "maps": maps,
        }  # fmt: skip

    def _predict(self, inputs: np.ndarray) -> list[Prediction]:
        """The model's predictions for ``inputs``, in order: in one part per lane, run at once."""
        if self.lanes is None or len(inputs) < 2:
            return self.model.predict(inputs)
        parts = np.array_split(inputs, min(self.model.lanes, len(inputs)))
        return [p for part in self.lanes.map(self.model.predict, parts) for p in part]


def _pack_maps(maps: list[tuple[int, np.ndarray]], model_input: np.ndarray) -> bytes:
    """A scan's key-frame maps (by label index) and that frame's model input (for the overlays)."""
    buffer = io.BytesIO()
    np.savez(
        buffer,
        labels=np.array([label for label, _ in maps], dtype=np.int64),
        maps=np.stack([heatmap.astype(np.float32) for _, heatmap in maps]),
        model_input=np.ascontiguousarray(model_input, dtype=np.float32),
    )
    return buffer.getvalue()


def unpack_maps(blob: bytes) -> tuple[list[tuple[int, np.ndarray]], np.ndarray]:
    with np.load(io.BytesIO(blob), allow_pickle=False) as packed:
        maps = [(int(label), heatmap) for label, heatmap in zip(packed["labels"], packed["maps"], strict=True)]
        return maps, packed["model_input"]


def _npy(array: np.ndarray | None) -> bytes:
    if array is None:
        return b""
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array, dtype=np.float32), allow_pickle=False)
    return buffer.getvalue()


def _array(blob: bytes) -> np.ndarray:
    return np.load(io.BytesIO(blob), allow_pickle=False)
