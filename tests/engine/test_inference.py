"""Serving a verified model: calls at the manifest's thresholds, errors for non-finite outputs,
and out-of-memory that halves the batch instead of dropping scans."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from meddaemon.engine import registry
from meddaemon.engine.architectures import build_model
from meddaemon.engine.heatmaps import compute_heatmaps
from meddaemon.engine.inference import ServedModel, forward_lanes, pick_device
from meddaemon.engine.tasks import BUILTIN_TASKS, InputContract
from meddaemon.failures import FailureReason
from model_factory import MostAtOnce

CONTRACT = InputContract(1, 32, 32, (0.5,), (0.25,))


def served(
    tmp_path: Path,
    task: str = "busi",
    heatmaps: bool = True,
    thresholds=None,
    arch="small_cnn",
    backend="auto",
    lanes: int = 1,
) -> ServedModel:
    spec = BUILTIN_TASKS[task]
    torch.manual_seed(1)
    model = build_model(arch, 1, spec.num_outputs)
    registry.save_version(
        model,
        task=task,
        version="v1",
        labels=spec.labels,
        kind=spec.kind,
        architecture=arch,
        input_contract=CONTRACT,
        out_dir=tmp_path / task,
        thresholds=thresholds,
        backend=backend,
    )
    return ServedModel(1, registry.load_version(tmp_path / task), pick_device("cpu"), heatmaps=heatmaps, lanes=lanes)


def inputs(n: int) -> np.ndarray:
    return np.random.default_rng(n).standard_normal((n, 1, 32, 32)).astype(np.float32)


def test_predictions_match_the_models_own_forward(tmp_path: Path):
    model = served(tmp_path)
    x = inputs(5)
    predictions = model.predict(x)
    with torch.no_grad():
        expected = torch.softmax(model.model(torch.from_numpy(x)), dim=1).numpy()
    np.testing.assert_allclose(np.stack([p.probabilities for p in predictions]), expected, atol=1e-6)
    for p in predictions:
        assert p.positive.sum() == 1 and p.positive[np.argmax(p.probabilities)]
        [(label, heatmap)] = p.heatmaps
        assert label == np.argmax(p.probabilities) and heatmap.shape == (4, 4)  # small_cnn's grid for 32 x 32


def test_multilabel_calls_use_each_labels_threshold(tmp_path: Path):
    labels = BUILTIN_TASKS["chestxray14"].labels
    thresholds = {label: (0.0 if i % 2 else 1.0) for i, label in enumerate(labels)}
    [p] = served(tmp_path, "chestxray14", thresholds=thresholds).predict(inputs(1))
    assert p.positive.tolist() == [bool(i % 2) for i in range(14)]
    assert sorted(label for label, _ in p.heatmaps) == [i for i in range(14) if i % 2]


def test_binary_calls_use_the_threshold_and_the_heatmap_is_always_the_positive_labels(tmp_path: Path):
    for threshold, called in ((0.0, True), (1.0, False)):
        model = served(tmp_path / str(threshold), "covid", thresholds={"normal": 0.5, "covid": threshold})
        [p] = model.predict(inputs(1))
        assert p.positive.tolist() == [not called, called]
        assert [label for label, _ in p.heatmaps] == [1]


def head_inputs(model: ServedModel, x: np.ndarray) -> torch.Tensor:
    """What the head's Linear layer reads for each image of ``x`` (its pooled features)."""
    seen: list[torch.Tensor] = []
    hook = model.model.cam_linear.register_forward_hook(lambda _m, args, _out: seen.append(args[0].detach()))
    with torch.no_grad():
        model.model(torch.from_numpy(x))
    hook.remove()
    return seen[0]


def test_a_multi_frame_scan_is_mapped_for_the_class_called_on_its_frames_not_its_key_frame_s(tmp_path: Path):
    """frame_policy = "all": the call is on the frames' mean. Frames a, b, a where b alone reads class 1
    and the scan class 0: the report's map is the key frame's (b's) for class 0, not for class 1."""
    model = served(tmp_path)
    a, b = head_inputs(model, inputs(2))
    apart = a - b
    scale = 50 / apart.dot(apart)
    with torch.no_grad():  # logit 0 - logit 1 is +50 for a, -50 for b
        linear = model.model.cam_linear
        linear.weight.zero_()
        linear.bias.zero_()
        linear.weight[0], linear.weight[1] = apart * scale, -apart * scale
        linear.bias[0] = -apart.dot(a + b) / 2 * scale
        linear.bias[1] = -linear.bias[0]
    frames = inputs(2)[[0, 1, 0]]
    rows = model.predict(frames)
    probs = np.mean([p.probabilities for p in rows], axis=0)
    assert [int(p.probabilities.argmax()) for p in rows] == [0, 1, 0] and int(probs.argmax()) == 0
    assert [label for label, _ in rows[1].heatmaps] == [1]

    maps = model.maps_of_the_call(rows, frames, probs)

    assert [label for label, _ in maps] == [0]
    expected = compute_heatmaps(model.model, torch.from_numpy(frames[1:2]), lambda _: [[0]]).maps[0][0][1]
    np.testing.assert_allclose(maps[0][1], expected, atol=1e-6)


def test_a_multi_frame_scan_is_mapped_for_each_label_called_on_its_frames_mean(tmp_path: Path):
    """Multilabel: thresholds set between the key frame's probability and the mean's, so every label
    the mean calls the key frame does not, and the other way round."""
    frames = inputs(3)
    rows = served(tmp_path / "probe", "chestxray14").predict(frames)
    key, mean = rows[1].probabilities, np.mean([p.probabilities for p in rows], axis=0)
    labels = BUILTIN_TASKS["chestxray14"].labels
    thresholds = {label: float(key[i] + mean[i]) / 2 for i, label in enumerate(labels)}
    model = served(tmp_path / "split", "chestxray14", thresholds=thresholds)
    rows = model.predict(frames)
    called = np.flatnonzero(model.calls(mean)).tolist()
    assert called and called != [label for label, _ in rows[1].heatmaps]

    maps = model.maps_of_the_call(rows, frames, mean)

    assert [label for label, _ in maps] == called


def test_a_single_frame_s_maps_are_its_own(tmp_path: Path):
    model = served(tmp_path)
    [row] = model.predict(inputs(1))
    assert model.maps_of_the_call([row], inputs(1), row.probabilities) is row.heatmaps


def test_a_nan_output_is_an_error_for_that_scan_not_a_result(tmp_path: Path):
    model = served(tmp_path, heatmaps=False)
    with torch.no_grad():
        model.model.head.linear.bias.fill_(float("nan"))
    for p in model.predict(inputs(3)):
        assert p.failure is not None and p.failure.reason is FailureReason.NON_FINITE_OUTPUT


def test_out_of_memory_halves_the_batch_and_keeps_every_scan(tmp_path: Path, caplog):
    """No GPU here: the model is wrapped to raise the real torch.OutOfMemoryError above 3 inputs."""
    model = served(tmp_path, heatmaps=False)
    inner = model.model.forward

    def forward_with_limit(x):
        if x.shape[0] > 3:
            raise torch.OutOfMemoryError("SYNTHETIC: CUDA out of memory")
        return inner(x)

    model.model.forward = forward_with_limit
    x = inputs(10)
    predictions = model.predict(x)
    assert len(predictions) == 10 and model.chunk == 2
    model.model.forward = inner
    np.testing.assert_allclose(
        [p.probabilities for p in predictions], [p.probabilities for p in model.predict(x)], atol=1e-6
    )
    assert "out of memory at batch 10; retrying at 5" in caplog.text


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (an accelerator machine)")
def test_cuda_predictions_agree_with_cpu(tmp_path: Path):
    cpu = served(tmp_path / "cpu")
    gpu = ServedModel(1, registry.load_version(tmp_path / "cpu" / "busi"), torch.device("cuda"))
    x = inputs(8)
    np.testing.assert_allclose(
        [p.probabilities for p in cpu.predict(x)], [p.probabilities for p in gpu.predict(x)], atol=2e-2
    )


@pytest.mark.parametrize("arch", ["small_cnn", "mobilenet_v2", "densenet121"])
def test_onnx_runtime_gives_the_same_probabilities_and_heatmaps_as_eager(tmp_path: Path, arch: str):
    eager = served(tmp_path / "eager", arch=arch, backend="eager")
    onnx = served(tmp_path / "onnx", arch=arch, backend="onnx")
    assert eager.choose_backend(4) == "eager" and onnx.choose_backend(4) == "onnx"
    x = inputs(4)
    for a, b in zip(eager.predict(x), onnx.predict(x), strict=True):
        np.testing.assert_allclose(a.probabilities, b.probabilities, atol=1e-4)
        assert [label for label, _ in a.heatmaps] == [label for label, _ in b.heatmaps]
        for (_, map_a), (_, map_b) in zip(a.heatmaps, b.heatmaps, strict=True):
            np.testing.assert_allclose(map_a, map_b, atol=1e-3)


def test_two_threads_choosing_onnx_at_once_both_get_it(tmp_path: Path):
    """torch.onnx.export keeps its state in module globals: a second export while one runs failed
    ("GLOBALS.in_onnx_export must be False") and its model fell back to eager."""
    models = [served(tmp_path / str(i), arch="mobilenet_v2", backend="onnx") for i in range(2)]
    chosen: list[str] = []
    threads = [threading.Thread(target=lambda m=m: chosen.append(m.choose_backend(2))) for m in models]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert chosen == ["onnx", "onnx"]


def test_onnx_runtime_threads_sleep_while_they_wait_leaving_the_cores_to_the_daemons_other_work(tmp_path: Path):
    model = served(tmp_path, arch="small_cnn", backend="onnx")
    assert model.choose_backend(4) == "onnx" and model.onnx is not None
    options = model.onnx.session.get_session_options()
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"


def test_auto_measures_both_backends_and_keeps_the_faster(tmp_path: Path):
    model = served(tmp_path, arch="mobilenet_v2")
    backend = model.choose_backend(4)
    assert set(model.speeds) == {"eager", "onnx"}
    assert backend == max(model.speeds, key=model.speeds.get)


def test_models_whose_heatmaps_need_the_gradient_stay_eager(tmp_path: Path):
    """Seed 002's head (a SELU after the pooling): no CAM from the features, so no ONNX graph. VGG16's
    three Linear layers take the same way (``cam_linear`` is None for both: test_architectures), and
    its 528 MB of weights took 15 s of this test in the suite."""
    model = served(tmp_path, arch="efficientnet_v2_s_selu", backend="onnx")
    assert model.choose_backend(2) == "eager"


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def test_on_the_cpu_two_batches_run_at_once_by_default_never_more_than_the_threads(two_threads):
    cpu = torch.device("cpu")
    assert forward_lanes(0, cpu) == 2
    assert forward_lanes(1, cpu) == 1
    assert forward_lanes(8, cpu) == 2
    torch.set_num_threads(1)
    assert forward_lanes(0, cpu) == 1
    assert forward_lanes(0, torch.device("cuda")) == 1


def most_at_once(model: ServedModel, batches: int) -> tuple[int, list[np.ndarray]]:
    """``predict`` called from ``batches`` threads at once, each forward held 0.2 s: the most forwards
    seen running together, and each thread's probabilities."""
    forward = MostAtOnce(model._predict_chunk, 0.2)
    model._predict_chunk = forward
    results: list[np.ndarray] = [np.empty(0)] * batches

    def call(i: int) -> None:
        results[i] = np.stack([p.probabilities for p in model.predict(inputs(4 + i))])

    threads = [threading.Thread(target=call, args=(i,)) for i in range(batches)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return forward.most, results


def test_onnx_runtime_runs_as_many_batches_at_once_as_the_model_has_lanes_each_on_its_share_of_threads(
    tmp_path: Path, two_threads
):
    model = served(tmp_path / "onnx", arch="small_cnn", backend="onnx", lanes=2)
    assert model.choose_backend(4) == "onnx" and model.lanes == 2
    assert model.onnx is not None and model.onnx.session.get_session_options().intra_op_num_threads == 1
    most, results = most_at_once(model, 3)
    assert most == 2
    alone = served(tmp_path / "alone", arch="small_cnn", backend="onnx")
    assert alone.choose_backend(4) == "onnx" and alone.lanes == 1
    for i, probabilities in enumerate(results):
        np.testing.assert_allclose(probabilities, [p.probabilities for p in alone.predict(inputs(4 + i))], atol=1e-6)


def test_eager_pytorch_runs_one_batch_at_a_time_whatever_the_lanes(tmp_path: Path, two_threads):
    model = served(tmp_path, arch="small_cnn", backend="eager", lanes=2)
    assert model.choose_backend(4) == "eager" and model.lanes == 1
    most, _ = most_at_once(model, 3)
    assert most == 1


def test_the_onnx_timing_runs_the_lanes_at_once_and_is_kept_apart_from_a_timing_of_one_lane(
    tmp_path: Path, two_threads, caplog
):
    from meddaemon.engine.backend_cache import BackendCache

    cache = BackendCache(tmp_path / "busi")
    one = served(tmp_path, arch="small_cnn")
    one.choose_backend(4, cache)
    two = ServedModel(1, registry.load_version(tmp_path / "busi"), pick_device("cpu"), lanes=2)
    with caplog.at_level("INFO"):
        two.choose_backend(4, cache)
    assert one.measured and two.measured, "a choice timed for one lane is not reused for two"
    assert "2 at once" in caplog.text
    again = ServedModel(1, registry.load_version(tmp_path / "busi"), pick_device("cpu"), lanes=2)
    again.choose_backend(4, cache)
    assert not again.measured and again.backend == two.backend
