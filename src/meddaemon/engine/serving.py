"""Serving a model version: verified, placed on its device, its backend chosen.

The full load (``registry.load_version``) builds the network, loads its state and runs the self-test
eagerly; ``ServedModel.choose_backend`` then times eager PyTorch against ONNX Runtime, or reads the
choice an earlier start made (``backend.json``) and checks the graph it kept against the network.

When that earlier choice was ONNX Runtime and its graph is kept, the network is never built: the
weights' SHA-256 is checked against the manifest, the kept graph's against the one the database
recorded when it was exported (``Registered.graphs``), the kept graph must reproduce the manifest's
self-test probabilities within its tolerance (the check the full load makes of the network), and the
CAM head's Linear weight is read from the verified safetensors file. That skips importing
torchvision (its ``ops`` import ``torch._dynamo``), building the network and running it twice: about
2 s of a daemon's start on 2 cores (benchmarks/README.md, issue 16's eighth pass). Anything missing,
or a graph that fails the self-test, falls back to the full load, which says why a version is refused.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import torch

from meddaemon.engine.architectures import CAM_WEIGHT_KEY
from meddaemon.engine.backend_cache import BackendCache, GraphCache, GraphKey
from meddaemon.engine.inference import ServedModel, backend_key, onnx_threads
from meddaemon.engine.onnx_backend import OPSET, BackendUnavailable, ExportedNet, OnnxRunner
from meddaemon.engine.registry import (
    ONNX_ARCHITECTURE,
    WEIGHTS_FILE,
    LoadedModel,
    ModelRefused,
    Registered,
    check_registered,
    check_self_test,
    load_version,
    read_manifest,
    read_verified_weights,
)

log = logging.getLogger(__name__)


def serve_version(
    folder: Path,
    version_id: int,
    device: torch.device,
    *,
    heatmaps: bool,
    batch: int,
    lanes: int = 1,
    choose: bool = True,
    registered: Registered | None = None,
    record_graph: Callable[[str, str], None] | None = None,
) -> ServedModel:
    """Version ``folder`` ready for batches on ``device``, its backend chosen for ``batch`` (cached in
    the folder); ``lanes``: batches it may run at once (``inference.forward_lanes``). With
    ``choose=False`` a version loaded in full is returned before its backend is chosen
    (``ServedModel.chosen`` is False: the caller calls ``choose_backend`` when it has work for it).
    A version that fails its verification raises :class:`ModelRefused`, as does, with ``registered``
    (the database's row), a folder that no longer holds what was registered. Graphs kept in the folder
    are used only with ``registered``, whose graphs' hashes they must have; ``record_graph`` records
    the hash of a graph exported now (``registry.graph_recorder``)."""
    folder = Path(folder)
    if registered is not None:  # before either way of serving it: a quick refusal
        check_registered(read_manifest(folder), folder, registered)
    cache = BackendCache(folder)
    graphs = GraphCache(folder, registered.graphs if registered is not None else None, record_graph)
    model = serve_kept_graph(
        folder, version_id, device, heatmaps=heatmaps, batch=batch, lanes=lanes, cache=cache, graphs=graphs,
        registered=registered,
    )  # fmt: skip
    if model is not None:
        return model
    loaded = load_version(folder, device="cpu")
    if registered is not None:  # the manifest served is the one checked: the file is read again by the load
        check_registered(loaded.manifest, folder, registered)
    model = ServedModel(version_id, loaded, device, heatmaps=heatmaps, lanes=lanes)
    model.graphs = graphs
    if choose:
        model.choose_backend(batch, cache)
    return model


def serve_kept_graph(
    folder: Path,
    version_id: int,
    device: torch.device,
    *,
    heatmaps: bool,
    batch: int,
    lanes: int,
    cache: BackendCache,
    graphs: GraphCache,
    registered: Registered | None = None,
) -> ServedModel | None:
    """The version served from the ONNX graph an earlier start chose and kept, or None when there is
    none to serve (the full load is then needed). With ``registered``, the manifest read here (the one
    served) is the one checked against the database's row."""
    if device.type != "cpu":
        return None
    try:
        manifest = read_manifest(folder)
    except ModelRefused:
        return None  # the full load refuses it, saying why
    if registered is not None:
        check_registered(manifest, folder, registered)
    if manifest.architecture == ONNX_ARCHITECTURE or manifest.backend != "auto":
        return None
    activation = heatmaps and manifest.heatmaps
    lanes = max(1, lanes)
    choice = cache.get(backend_key(manifest.sha256, device, batch, activation, lanes))
    if choice is None or choice.backend != "onnx":
        return None
    graph = graphs.get(GraphKey(manifest.sha256, activation, OPSET))
    if graph is None:
        return None
    state = read_verified_weights(folder, manifest)
    cam_weight = state.get(CAM_WEIGHT_KEY) if activation else None
    if activation and cam_weight is None:
        return None
    try:
        runner = OnnxRunner(graph, activation, threads=onnx_threads(lanes), cached=True)
        net = ExportedNet(runner, cam_weight)
        check_self_test(net, manifest, folder / WEIGHTS_FILE, device)
    except (BackendUnavailable, ModelRefused) as exc:
        log.warning(
            "%s/%s: the kept ONNX graph cannot be served (%s); loading the network",
            manifest.task,
            manifest.version,
            exc,
        )
        return None
    model = ServedModel(version_id, LoadedModel(manifest, net, folder), device, heatmaps=heatmaps, lanes=lanes)
    model.serve_kept_graph(runner, choice, batch, graphs)
    return model
