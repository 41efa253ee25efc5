"""Serving a version from the ONNX graph an earlier start chose and kept (``engine/serving.py``): the
same predictions and heatmaps as the network it was exported from, without building that network or
importing torchvision, and never when the weights, the graph or the choice say otherwise."""

from __future__ import annotations

import hashlib
import json
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from meddaemon.engine import registry
from meddaemon.engine.architectures import ClassifierNet, build_model
from meddaemon.engine.backend_cache import BACKEND_FILE, GRAPH_FOLDER, GraphCache
from meddaemon.engine.inference import ServedModel, pick_device
from meddaemon.engine.onnx_backend import ExportedNet, OnnxRunner
from meddaemon.engine.serving import serve_version
from model_factory import GRAPHS_RECORDED, registered_folder, write_model

CPU = pick_device("cpu")


def serve(folder: Path, heatmaps: bool = True, batch: int = 2) -> ServedModel:
    registered, record = registered_folder(folder)
    return serve_version(folder, 1, CPU, heatmaps=heatmaps, batch=batch, lanes=1, registered=registered,
                         record_graph=record)  # fmt: skip


def chose(folder: Path, backend: str) -> None:
    """Make the choice kept in ``folder``'s ``backend.json`` say ``backend``, as if it had measured so."""
    cache = json.loads((folder / BACKEND_FILE).read_text())
    for entry in cache["entries"]:
        entry["backend"] = backend
    (folder / BACKEND_FILE).write_text(json.dumps(cache))


def kept(tmp_path: Path, architecture: str = "small_cnn", heatmaps: bool = True) -> tuple[Path, ServedModel]:
    """A SYNTHETIC version loaded once in full, ONNX Runtime its kept choice: what a first start leaves."""
    folder = write_model(tmp_path / architecture, architecture=architecture)
    first = serve(folder, heatmaps=heatmaps)
    chose(folder, "onnx")
    return folder, first


def scans(n: int) -> np.ndarray:
    return np.random.default_rng(n).standard_normal((n, 1, 32, 32)).astype(np.float32)


@pytest.mark.parametrize("architecture", ["small_cnn", "resnet18"])
def test_a_kept_graph_is_served_without_the_network_with_its_probabilities_and_heatmaps(tmp_path, architecture):
    folder, _ = kept(tmp_path, architecture)
    full = ServedModel(1, registry.load_version(folder), CPU, heatmaps=True)  # the network, eager

    again = serve(folder)

    assert isinstance(again.model, ExportedNet) and isinstance(full.model, ClassifierNet)
    assert again.backend == "onnx" and not again.measured and again.onnx is not None and again.onnx.cached
    x = scans(5)
    got, expected = again.predict(x), full.predict(x)
    np.testing.assert_allclose([p.probabilities for p in got], [p.probabilities for p in expected], atol=1e-5)
    assert [[label for label, _ in p.heatmaps] for p in got] == [[label for label, _ in p.heatmaps] for p in expected]
    for g, e in zip(got, expected, strict=True):
        for (_, got_map), (_, expected_map) in zip(g.heatmaps, e.heatmaps, strict=True):
            np.testing.assert_allclose(got_map, expected_map, atol=1e-4)


def test_the_log_says_the_network_was_not_built(tmp_path, caplog):
    folder, _ = kept(tmp_path)
    caplog.set_level(logging.INFO, logger="meddaemon")

    serve(folder)

    assert "served from the graph kept with the version, the network not built" in caplog.text


def test_served_from_its_kept_graph_a_version_never_imports_torchvision(tmp_path):
    folder, _ = kept(tmp_path, "resnet18")
    registered, _ = registered_folder(folder)
    registered_maps = [registered.manifest, registered.graphs]
    program = (
        "import json, sys, torch\n"
        f"torch.set_num_threads({torch.get_num_threads()})\n"  # the choice was kept for this process's threads
        "from meddaemon.engine.registry import Registered\n"
        "from meddaemon.engine.serving import serve_version\n"
        f"registered = Registered(*json.loads({json.dumps([registered.sha256, *registered_maps])!r}))\n"
        f"model = serve_version({str(folder)!r}, 1, torch.device('cpu'), heatmaps=True, batch=2,"
        " registered=registered)\n"
        "print(json.dumps([type(model.model).__name__, 'torchvision' in sys.modules]))\n"
    )

    def run() -> list:
        done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout.splitlines()[-1])

    assert run() == ["ExportedNet", False]
    chose(folder, "eager")
    assert run() == ["ClassifierNet", True]  # the full load builds the network with torchvision


def test_a_kept_graph_the_database_has_no_record_of_is_not_served_and_its_export_again_is_recorded(tmp_path):
    """Without the database (no ``registered``) nothing kept is trusted; with it, the graph's hash must
    be the one recorded (a daemon's end to end: tests/daemon/test_model_loading.py)."""
    folder, _ = kept(tmp_path)
    unregistered = serve_version(folder, 1, CPU, heatmaps=True, batch=2, lanes=1)
    assert isinstance(unregistered.model, ClassifierNet)
    GRAPHS_RECORDED[folder].clear()  # a database that never recorded it (its row lost, another database)

    model = serve(folder)

    assert isinstance(model.model, ClassifierNet) and model.onnx is not None and not model.onnx.cached
    [graph] = (folder / GRAPH_FOLDER).glob("*.onnx")
    assert GRAPHS_RECORDED[folder] == {graph.stem: hashlib.sha256(graph.read_bytes()).hexdigest()}
    assert isinstance(serve(folder).model, ExportedNet)


def test_weights_changed_on_disk_are_refused_as_the_full_load_refuses_them(tmp_path):
    folder, _ = kept(tmp_path)
    weights = folder / registry.WEIGHTS_FILE
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01
    weights.write_bytes(bytes(data))

    with pytest.raises(registry.ModelRefused) as refused:
        serve(folder)

    assert refused.value.reason == "hash_mismatch"


def test_a_kept_graph_that_fails_the_self_test_is_not_served_the_network_is_loaded(tmp_path, caplog):
    folder, first = kept(tmp_path)
    for path in (folder / GRAPH_FOLDER).iterdir():
        path.unlink()
    torch.manual_seed(7)
    other = build_model("small_cnn", 1, 3)  # other (SYNTHETIC) weights: their graph kept under this version's key
    sample = registry.self_test_input(first.contract, 0, 2)
    recorded = GraphCache(folder, record=GRAPHS_RECORDED[folder].__setitem__)
    OnnxRunner.for_model(other, sample, True, graphs=recorded, weights_sha256=first.manifest.sha256)
    caplog.set_level(logging.WARNING, logger="meddaemon")

    model = serve(folder)

    assert "the kept ONNX graph cannot be served" in caplog.text and "self_test_failed" in caplog.text
    assert isinstance(model.model, ClassifierNet)
    x = scans(3)
    with torch.inference_mode():
        expected = torch.softmax(model.model(torch.from_numpy(x)), dim=1).numpy()
    np.testing.assert_allclose([p.probabilities for p in model.predict(x)], expected, atol=1e-5)


@pytest.mark.parametrize(
    "why",
    ["eager chosen", "no graph kept", "another batch", "heatmaps off, the graph kept with them", "backend pinned"],
)
def test_without_a_kept_onnx_choice_and_graph_for_this_start_the_network_is_loaded(tmp_path, why):
    folder, _ = kept(tmp_path)
    heatmaps, batch = True, 2
    if why == "eager chosen":
        chose(folder, "eager")
    elif why == "no graph kept":
        for path in (folder / GRAPH_FOLDER).iterdir():
            path.unlink()
    elif why == "another batch":
        batch = 4
    elif why == "heatmaps off, the graph kept with them":
        heatmaps = False
    else:
        manifest = json.loads((folder / registry.MANIFEST_FILE).read_text())
        manifest["backend"] = "onnx"
        (folder / registry.MANIFEST_FILE).write_text(json.dumps(manifest))

    model = serve(folder, heatmaps=heatmaps, batch=batch)

    assert isinstance(model.model, ClassifierNet)


@pytest.mark.parametrize("backend", ["eager", "auto"])
def test_a_manifest_edited_between_its_check_and_its_load_is_refused_not_served(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, backend: str
):
    """The manifest was checked against the database's row, then read again by the load, and that
    second copy served: a threshold edited in between (a hand edit, a sync tool) called with 0.01
    where the results store 0.5."""
    from meddaemon.engine import serving

    folder = write_model(tmp_path / "v1", version="v1", backend=backend)
    registered_manifest = json.loads((folder / "manifest.json").read_text())
    registered = registry.Registered(registered_manifest["sha256"], registered_manifest)
    if backend == "auto":  # an earlier start chose and kept the ONNX graph
        serve_version(folder, 1, torch.device("cpu"), heatmaps=False, batch=1, registered=registered)
    real = serving.read_manifest

    def read_then_someone_edits(path: Path) -> registry.Manifest:
        read = real(path)
        edited = {**registered_manifest, "thresholds": {**registered_manifest["thresholds"], "malignant": 0.01}}
        (Path(path) / "manifest.json").write_text(json.dumps(edited))
        return read

    monkeypatch.setattr(serving, "read_manifest", read_then_someone_edits)
    with pytest.raises(registry.ModelRefused) as refused:
        serve_version(folder, 1, torch.device("cpu"), heatmaps=False, batch=1, choose=False, registered=registered)
    assert refused.value.reason == "bad_manifest"
