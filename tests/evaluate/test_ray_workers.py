"""The Ray workers' side of ``medcli evaluate --engine ray`` (``evaluate/ray_workers.py``), run in
this process: the decoding task and the model actor as Ray would call them (the Ray plumbing and real
clusters: test_ray_engine.py)."""

from __future__ import annotations

import io
import socket
from pathlib import Path

import numpy as np
import pytest
import torch

from meddaemon.engine.tasks import InputContract
from model_factory import write_model


def test_an_actor_computes_the_local_engines_grad_cam_heatmaps(busi_phantoms: Path, tmp_path: Path) -> None:
    """A head with a nonlinearity after the pooling (seed 002's): Grad-CAM needs the gradient, so the
    actor serves it in eager PyTorch, as the local engine does, and returns each scan's key-frame maps
    with that frame's input for the driver to write (the Ray plumbing: test_ray_engine.py)."""
    from meddaemon.engine.decode import DecodeOptions
    from meddaemon.engine.inference import ServedModel
    from meddaemon.engine.registry import load_version
    from meddaemon.evaluate.ray_engine import _outcomes
    from meddaemon.evaluate.ray_workers import ModelActor, decode_batch, unpack_maps

    contract = InputContract(1, 64, 64, (0.449,), (0.226,))
    folder = write_model(tmp_path / "gradcam", architecture="efficientnet_v2_s_selu", contract=contract)
    paths = sorted(str(p) for p in busi_phantoms.glob("*/*).png"))[::4]
    options = {"frame_policy": DecodeOptions().frame_policy, "max_pixels": DecodeOptions().max_pixels}
    decoded = decode_batch({"path": np.array(paths, dtype=object)}, contract.as_dict(), options, np.zeros(0, np.uint64))
    actor = ModelActor(str(folder), 1, "cpu", heatmaps=True)
    assert actor.model.backend == "eager"
    returned = list(_outcomes(actor(decoded)))

    local = ServedModel(1, load_version(folder, device="cpu"), torch.device("cpu"), heatmaps=True)
    expected = local.predict(np.concatenate([np.load(io.BytesIO(blob)) for blob in decoded["inputs"]]))
    assert len(returned) == len(expected) == 6
    for (outcome, packed), prediction in zip(returned, expected, strict=True):
        assert np.abs(np.array(outcome.probabilities) - prediction.probabilities).max() <= 1e-6
        maps, model_input = unpack_maps(packed)
        assert [label for label, _ in maps] == [label for label, _ in prediction.heatmaps] and len(maps) == 1
        assert maps[0][1].shape == prediction.heatmaps[0][1].shape == (2, 2)  # the grid, as the local engine keeps
        assert np.abs(maps[0][1] - prediction.heatmaps[0][1]).max() <= 1e-5
        assert model_input.shape == (1, 64, 64)


def test_actors_time_the_backends_once_per_version_and_machine(tmp_path: Path) -> None:
    """The first actor on a machine measures eager PyTorch against ONNX Runtime and keeps the choice
    beside the weights, as the daemon and the local engine do; the actors after it read it."""
    from meddaemon.engine.backend_cache import BACKEND_FILE
    from meddaemon.evaluate.ray_workers import ModelActor

    folder = write_model(tmp_path / "model", version="v1")
    first = ModelActor(str(folder), 1, "cpu", threads=1, batch=8)
    assert first.model.measured and (folder / BACKEND_FILE).is_file()
    second = ModelActor(str(folder), 1, "cpu", threads=1, batch=8)
    assert not second.model.measured and second.model.backend == first.model.backend


def test_a_model_that_fails_verification_on_a_node_names_the_node_and_the_reason(tmp_path: Path) -> None:
    from meddaemon.evaluate.ray_workers import REFUSED, ModelActor

    folder = write_model(tmp_path / "model", version="v1")
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8] + b"\0" * 8)  # this node's copy differs
    with pytest.raises(RuntimeError) as refused:
        ModelActor(str(folder), 1, "cpu")
    message = str(refused.value)
    assert message.startswith(REFUSED) and socket.gethostname() in message and "hash_mismatch" in message


def test_an_actor_on_two_threads_runs_each_batch_in_two_lanes_at_once_with_the_same_results(
    busi_phantoms: Path, tmp_path: Path
) -> None:
    """Each batch Ray hands an ONNX Runtime actor is split over its lanes (one thread each), as the
    local engine keeps two batches in the model; the outcomes are those of one lane, in order."""
    import threading

    from meddaemon.engine.decode import DecodeOptions
    from meddaemon.evaluate.ray_engine import _outcomes
    from meddaemon.evaluate.ray_workers import ModelActor, decode_batch

    contract = InputContract(1, 64, 64, (0.449,), (0.226,))
    folder = write_model(tmp_path / "model", contract=contract, backend="onnx")
    paths = sorted(str(p) for p in busi_phantoms.glob("*/*).png"))[:12]
    options = {"frame_policy": DecodeOptions().frame_policy, "max_pixels": DecodeOptions().max_pixels}
    decoded = decode_batch({"path": np.array(paths, dtype=object)}, contract.as_dict(), options, np.zeros(0, np.uint64))
    one_lane = ModelActor(str(folder), 1, "cpu", threads=2, concurrent_batches=1)
    two_lanes = ModelActor(str(folder), 1, "cpu", threads=2)
    assert one_lane.model.lanes == 1 and two_lanes.model.lanes == 2 and two_lanes.model.backend == "onnx"
    calls: list[tuple[str, int]] = []
    predict = two_lanes.model.predict

    def seen(inputs: np.ndarray) -> list:
        calls.append((threading.current_thread().name, len(inputs)))
        return predict(inputs)

    two_lanes.model.predict = seen  # type: ignore[method-assign]
    expected = list(_outcomes(one_lane(decoded)))
    returned = list(_outcomes(two_lanes(decoded)))

    assert sorted(size for _, size in calls) == [6, 6]  # two halves, handed to the lanes' threads
    assert all(name.startswith("forward") for name, _ in calls)
    assert [o.read.path for o, _ in returned] == [o.read.path for o, _ in expected] == paths
    for (outcome, _), (reference, _) in zip(returned, expected, strict=True):
        assert np.abs(np.array(outcome.probabilities) - np.array(reference.probabilities)).max() <= 1e-6


def test_actors_serve_the_graph_the_driver_kept_and_recorded_and_export_none_themselves(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Actors have no database to record an export in: each actor of each run exported the graph
    again (tens of seconds for a DenseNet-121). The driver exports it once and records its hash;
    the actors are handed the hashes and serve the graph kept."""
    from meddaemon.engine import onnx_backend
    from meddaemon.engine.inference import pick_device
    from meddaemon.engine.serving import serve_version
    from meddaemon.evaluate.ray_workers import ModelActor
    from model_factory import registered_folder

    folder = write_model(tmp_path / "model", version="v1")
    registered, record = registered_folder(folder)
    driver = serve_version(folder, 1, pick_device("cpu"), heatmaps=False, batch=8, choose=False,
                           registered=registered, record_graph=record)  # fmt: skip
    driver.keep_graph()
    assert driver.graphs is not None and len(driver.graphs.recorded) == 1

    def exported(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise AssertionError("an actor exported the graph again")

    monkeypatch.setattr(onnx_backend, "_export", exported)
    actor = ModelActor(str(folder), 1, "cpu", sha256=registered.sha256, manifest=dict(registered.manifest),
                       graphs=dict(driver.graphs.recorded), threads=1, batch=8)  # fmt: skip
    assert actor.model.backend in ("onnx", "eager") and actor.model.measured
