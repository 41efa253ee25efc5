"""ONNX graphs exported from torchvision models and from the small CNN (SYNTHETIC weights): served by
ONNX Runtime with the eager model's probabilities (1e-4), CAM through ``--cam-tensor`` equal to
pytorch-grad-cam on the eager model (1e-4), and graphs the contract cannot take refused by name."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import torch
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from sqlalchemy import Engine
from torch import nn
from torchvision import models

from meddaemon.db.engine import session_factory, transaction
from meddaemon.engine.heatmap_grid import expand_one
from meddaemon.engine.heatmaps import compute_heatmaps, positive_class, predicted_class
from meddaemon.engine.importers import ImportOptions, convert_file, import_file
from meddaemon.engine.importers.onnx_model import check_graph, choose_providers
from meddaemon.engine.inference import ServedModel
from meddaemon.engine.registry import ModelRefused, load_version, probabilities

TOLERANCE = 1e-4
SIZE = 64


def settled(model: nn.Module, channels: int, size: int = SIZE) -> nn.Module:
    generator = torch.Generator().manual_seed(0)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.rand(4, channels, size, size, generator=generator))
    return model.eval()


def resnet18_grey() -> nn.Module:
    torch.manual_seed(11)
    m = models.resnet18(weights=None)
    m.conv1 = nn.Conv2d(1, 64, 7, 2, 3, bias=False)
    m.fc = nn.Linear(512, 3)
    return settled(m, 1)


class SmallCnn(nn.Module):
    """Seed 000's small CNN with a sigmoid at the end, as it was trained (BCELoss)."""

    def __init__(self, hidden: bool = False) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = 1
        for i, out in enumerate((8, 16, 32)):
            layers += [nn.Conv2d(channels, out, 3, padding=1), nn.BatchNorm2d(out), nn.ReLU()]
            if i < 2:
                layers.append(nn.MaxPool2d(2))
            channels = out
        self.features = nn.Sequential(*layers)
        head: list[nn.Module] = [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        head += [nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 1)] if hidden else [nn.Linear(32, 1)]
        self.classifier = nn.Sequential(*head, nn.Sigmoid())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def export(
    model: nn.Module, path: Path, channels: int, size: int = SIZE, dynamic: dict[int, str] | None = None
) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (torch.zeros(1, channels, size, size),),
            str(path),
            dynamo=False,
            opset_version=17,
            input_names=["image"],
            output_names=["scores"],
            dynamic_axes={"image": dynamic or {0: "batch"}, "scores": {0: "batch"}},
        )
    return path


def pooled_tensor(path: Path) -> str:
    """The feature map the exported graph pools: what a user finds in Netron and passes as --cam-tensor."""
    graph = onnx.load(str(path)).graph
    return next(n.input[0] for n in graph.node if n.op_type in ("GlobalAveragePool", "ReduceMean"))


def inputs(channels: int, batch: int = 3, size: int = SIZE) -> torch.Tensor:
    return torch.randn(batch, channels, size, size, generator=torch.Generator().manual_seed(5))


def gradcam(model: nn.Module, layer: nn.Module, x: torch.Tensor, classes: list[int]) -> np.ndarray:
    with GradCAM(model=model, target_layers=[layer]) as cam:
        return cam(input_tensor=x, targets=[ClassifierOutputTarget(c) for c in classes])


def test_torchvision_resnet18_onnx_equals_eager_and_its_cam_equals_gradcam(tmp_path: Path):
    original = resnet18_grey()
    path = export(original, tmp_path / "resnet18.onnx", 1)
    options = ImportOptions(task="busi", image_size=SIZE, cam_tensor=pooled_tensor(path))

    manifest = convert_file(path, options, tmp_path / "version")
    loaded = load_version(tmp_path / "version")

    assert manifest.architecture == "onnx" and manifest.heatmaps and manifest.onnx["input"] == "image"
    assert sorted(p.name for p in (tmp_path / "version").iterdir()) == ["manifest.json", "model.onnx"]
    x = inputs(1)
    with torch.no_grad():
        expected = torch.softmax(original(x), dim=1)
    got = probabilities(loaded.model(x), "multiclass")
    assert float((got - expected).abs().max()) <= TOLERANCE
    result = compute_heatmaps(loaded.model, x, predicted_class())
    classes = [c for row in result.maps for c, _ in row]
    assert classes == expected.argmax(dim=1).tolist()
    ours = np.stack([m for row in result.expanded() for _, m in row])
    reference = gradcam(original, original.layer4, x, classes)
    assert float(np.abs(ours - reference).max()) <= TOLERANCE


def test_small_cnn_onnx_with_a_sigmoid_output_on_busi_binary(tmp_path: Path):
    torch.manual_seed(3)
    original = settled(SmallCnn(), 1, 100)
    path = export(original, tmp_path / "small.onnx", 1, size=100)
    options = ImportOptions(task="busi_binary", outputs="probabilities", cam_tensor=pooled_tensor(path))

    convert_file(path, options, tmp_path / "version")
    loaded = load_version(tmp_path / "version")

    x = inputs(1, size=100)
    with torch.no_grad():
        expected = original(x)[:, 0]
    got = probabilities(loaded.model(x), "binary")[:, 1]
    assert float((got - expected).abs().max()) <= TOLERANCE
    result = compute_heatmaps(loaded.model, x, positive_class())
    ours = np.stack([m for row in result.expanded() for _, m in row])

    class Logit(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.seed = original

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.seed.classifier[:-1](self.seed.features(x))

    reference = gradcam(Logit(), original.features, x, [0] * len(x))
    assert float(np.abs(ours - reference).max()) <= TOLERANCE


def test_a_graph_ending_in_a_sigmoid_imported_as_logits_is_refused_saying_which_flag(tmp_path: Path):
    """Registered without a word, it served the sigmoid of probabilities: a 0.97 read as 0.73."""
    torch.manual_seed(3)
    path = export(settled(SmallCnn(), 1, 100), tmp_path / "small.onnx", 1, size=100)
    error = refused(path, tmp_path, task="busi_binary", image_size=100)
    assert error.reason == "contract_conflict" and "comes from a Sigmoid" in error.message
    assert "--outputs probabilities" in error.message


def test_without_a_cam_head_the_model_has_no_heatmaps_and_says_why(tmp_path: Path):
    torch.manual_seed(4)
    original = settled(SmallCnn(hidden=True), 1, 100)
    path = export(original, tmp_path / "hidden.onnx", 1, size=100)

    manifest = convert_file(
        path,
        ImportOptions(task="busi_binary", outputs="probabilities", cam_tensor=pooled_tensor(path)),
        tmp_path / "v1",
    )
    assert not manifest.heatmaps and "is not what gives the output 'scores'" in manifest.provenance["heatmaps"]
    manifest = convert_file(path, ImportOptions(task="busi_binary", outputs="probabilities"), tmp_path / "v2")
    assert not manifest.heatmaps and "no --cam-tensor" in manifest.provenance["heatmaps"]

    served = ServedModel(1, load_version(tmp_path / "v2"), torch.device("cpu"))
    assert not served.heatmaps
    x = inputs(1, size=100).numpy()
    predictions = served.predict(x)
    with torch.no_grad():
        expected = original(torch.from_numpy(x))[:, 0].numpy()
    assert [p.heatmaps for p in predictions] == [[], [], []]
    np.testing.assert_allclose([p.probabilities[1] for p in predictions], expected, atol=TOLERANCE)


def test_the_daemon_engine_serves_an_onnx_version_with_cam_maps(tmp_path: Path):
    original = resnet18_grey()
    path = export(original, tmp_path / "resnet18.onnx", 1)
    convert_file(path, ImportOptions(task="busi", image_size=SIZE, cam_tensor=pooled_tensor(path)), tmp_path / "v")
    served = ServedModel(1, load_version(tmp_path / "v"), torch.device("cpu"))
    # the graph itself runs, in ONNX Runtime; nothing is re-exported
    assert served.choose_backend(2) == served.backend == "onnx (ONNX Runtime, CPUExecutionProvider)"
    x = inputs(1)
    predictions = served.predict(x.numpy())
    with torch.no_grad():
        expected = torch.softmax(original(x), dim=1).numpy()
    np.testing.assert_allclose(np.stack([p.probabilities for p in predictions]), expected, atol=TOLERANCE)
    classes = expected.argmax(axis=1).tolist()
    reference = gradcam(original, original.layer4, x, classes)
    for prediction, cls, ref in zip(predictions, classes, reference, strict=True):
        (label, heatmap), *_ = prediction.heatmaps
        assert label == cls and float(np.abs(expand_one(heatmap, ref.shape) - ref).max()) <= TOLERANCE


# ------------------------------------------------------------------------------------------ label order


class TinyNet(nn.Module):
    """A conv layer, global pooling and one Linear: small enough to export in a blink."""

    def __init__(self, outputs: int, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.features = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU())
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, outputs))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def test_an_onnx_graph_in_another_label_order_gives_each_label_its_own_probability_and_map(tmp_path: Path):
    """busi's labels are (benign, malignant, normal); the file's outputs are (malignant, normal, benign)."""
    logits = TinyNet(3, seed=8).eval()
    path = export(nn.Sequential(logits, nn.Softmax(dim=1)).eval(), tmp_path / "reordered.onnx", 1)
    file_order = ["malignant", "normal", "benign"]
    options = ImportOptions(
        task="busi", image_size=SIZE, labels=tuple(file_order), outputs="probabilities",
        cam_tensor=pooled_tensor(path),
    )  # fmt: skip

    manifest = convert_file(path, options, tmp_path / "version")
    loaded = load_version(tmp_path / "version")

    assert "reordered from the file's ['malignant', 'normal', 'benign']" in manifest.provenance["conversion"]
    x = inputs(1)
    with torch.no_grad():
        theirs = torch.softmax(logits(x), dim=1)
    ours = probabilities(loaded.model(x), "multiclass")
    for label in file_order:
        column = theirs[:, file_order.index(label)]
        assert float((ours[:, manifest.labels.index(label)] - column).abs().max()) <= TOLERANCE
    result = compute_heatmaps(loaded.model, x, predicted_class())
    called = [manifest.labels[c] for row in result.maps for c, _ in row]
    reference = gradcam(logits, logits.features, x, [file_order.index(label) for label in called])
    ours_maps = np.stack([m for row in result.expanded() for _, m in row])
    assert float(np.abs(ours_maps - reference).max()) <= TOLERANCE


@pytest.mark.parametrize("head", ["one logit of the negative class", "two-column softmax", "two sigmoids"])
def test_a_binary_graph_of_the_other_label_order_is_served_as_the_tasks_positive_class(tmp_path: Path, head: str):
    """covid's labels are (normal, covid); the file's are (covid, normal), as seed 004's: its single
    sigmoid is P(normal), or its softmax columns are (P(covid), P(normal)), or its two sigmoids are
    P(covid) and P(normal) each (folded as a softmax's, a 0.190 was served as 0.204)."""
    two = head != "one logit of the negative class"
    logits = TinyNet(2 if two else 1, seed=9).eval()
    activation = nn.Softmax(dim=1) if head == "two-column softmax" else nn.Sigmoid()
    path = export(nn.Sequential(logits, activation).eval(), tmp_path / "binary.onnx", 1)
    options = ImportOptions(task="covid", image_size=SIZE, labels=("covid", "normal"), outputs="probabilities")

    manifest = convert_file(path, options, tmp_path / "version")
    got = probabilities(load_version(tmp_path / "version").model(inputs(1)), "binary")

    with torch.no_grad():
        theirs = activation(logits(inputs(1)))
    p_covid = theirs[:, 0] if two else 1 - theirs[:, 0]
    assert manifest.labels == ["normal", "covid"]
    assert float((got[:, 1] - p_covid).abs().max()) <= TOLERANCE
    said = {"two-column softmax": "folded", "two sigmoids": "that of 'covid' kept"}.get(head, "negated")
    assert said in manifest.provenance["conversion"]


# ------------------------------------------------------------------------------------------ providers


def test_cuda_gets_onnx_runtimes_cuda_provider_when_it_has_one_and_the_cpu_otherwise():
    with_cuda = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    assert choose_providers(with_cuda, "cuda") == (
        [("CUDAExecutionProvider", {"device_id": 0}), "CPUExecutionProvider"],
        None,
    )
    assert choose_providers(with_cuda, torch.device("cuda:1"))[0][0] == ("CUDAExecutionProvider", {"device_id": 1})
    assert choose_providers(with_cuda, "cpu") == (["CPUExecutionProvider"], None)
    providers, why = choose_providers(["AzureExecutionProvider", "CPUExecutionProvider"], "cuda")
    assert providers == ["CPUExecutionProvider"]
    assert why is not None and "no CUDAExecutionProvider" in why and "on the CPU" in why


# ------------------------------------------------------------------------------------------ refusals


def refused(path: Path, tmp_path: Path, **options: Any) -> ModelRefused:
    with pytest.raises(ModelRefused) as info:
        convert_file(path, ImportOptions(**{"task": "busi", "image_size": SIZE, **options}), tmp_path / "version")
    assert not (tmp_path / "version" / "manifest.json").exists()
    return info.value


@pytest.fixture(scope="module")
def small_graph(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_graph(6, tmp_path_factory.mktemp("graphs") / "tiny.onnx")


def tiny_graph(seed: int, path: Path) -> Path:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)).eval()
    return export(model, path, 1)


def with_weights_beside(graph: Path, folder: Path) -> Path:
    """``graph`` saved as ``torch.onnx.export`` saves one by default (its dynamo exporter): the graph in
    ``model.onnx``, every weight in ``model.onnx.data`` beside it."""
    folder.mkdir(parents=True, exist_ok=True)
    onnx.save_model(
        onnx.load(str(graph)),
        str(folder / "model.onnx"),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="model.onnx.data",
        size_threshold=0,
    )
    return folder / "model.onnx"


def test_a_graph_whose_weights_lie_beside_it_is_registered_whole_whatever_the_working_directory(
    migrated_engine: Engine, small_graph: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    path = with_weights_beside(small_graph, tmp_path / "export")
    exported = onnx.load(str(path), load_external_data=False)
    assert {i.data_location for i in exported.graph.initializer} == {onnx.TensorProto.EXTERNAL}
    # the working directory holds another graph's weights under the same name, tensor for tensor
    monkeypatch.chdir(with_weights_beside(tiny_graph(7, tmp_path / "other.onnx"), tmp_path / "elsewhere").parent)
    root = tmp_path / "registry"
    with transaction(session_factory(migrated_engine)) as session:
        import_file(session, path, ImportOptions(task="busi", image_size=SIZE, version="beside"), root)
    folder = root / "busi" / "beside"
    assert sorted(p.name for p in folder.iterdir()) == ["manifest.json", "model.onnx"]
    served = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    assert all(i.data_location == onnx.TensorProto.DEFAULT for i in served.graph.initializer)

    convert_file(small_graph, ImportOptions(task="busi", image_size=SIZE), tmp_path / "embedded")
    x = inputs(1)
    with torch.no_grad():
        expected = load_version(tmp_path / "embedded").model(x)
        assert torch.equal(load_version(folder).model(x), expected)


def test_a_graph_whose_weights_beside_it_are_missing_or_outside_its_folder_is_refused(
    small_graph: Path, tmp_path: Path
):
    path = with_weights_beside(small_graph, tmp_path / "export")
    (tmp_path / "export" / "model.onnx.data").rename(tmp_path / "model.onnx.data")
    missing = refused(path, tmp_path)
    assert missing.reason == "unreadable_weights" and "model.onnx.data" in missing.message

    graph = onnx.load(str(path), load_external_data=False)
    for tensor in graph.graph.initializer:
        next(e for e in tensor.external_data if e.key == "location").value = "../model.onnx.data"
    onnx.save_model(graph, str(path))
    outside = refused(path, tmp_path)
    assert outside.reason == "unreadable_weights" and "beside it cannot be read" in outside.message
    # a version folder is served as it is: a graph in it that points at other files is refused
    with pytest.raises(ModelRefused, match="keeps weights in other files"):
        check_graph(path.read_bytes())


def test_a_fixed_size_other_than_the_contracts_names_both(small_graph: Path, tmp_path: Path):
    error = refused(small_graph, tmp_path, image_size=96)
    assert error.reason == "contract_conflict" and "height 64" in error.message and "has 96" in error.message


def test_a_dynamic_channel_axis_is_refused(tmp_path: Path):
    model = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(1, 3)).eval()
    path = export(model, tmp_path / "dyn.onnx", 1, dynamic={0: "batch", 1: "channels"})
    error = refused(path, tmp_path)
    assert error.reason == "unsupported_onnx" and "dynamic channel axis" in error.message


class ChannelsLast(nn.Module):
    """A model fed (batch, height, width, channels), as Keras and TensorFlow export them."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(channels, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.permute(0, 3, 1, 2))


@pytest.mark.parametrize("sides", ["fixed", "dynamic"])
@pytest.mark.parametrize("channels", [1, 3])
def test_a_channels_last_input_is_refused_naming_the_layout_not_a_channel_count(
    tmp_path: Path, channels: int, sides: str
):
    """(N, 64, 64, 1) was told to "pass --channels 64", which --channels refuses (1 or 3); tf2onnx's
    (N, H, W, 1) was "a dynamic channel axis 'H'"."""
    path = tmp_path / "nhwc.onnx"
    dynamic = {0: "N", 1: "H", 2: "W"} if sides == "dynamic" else {0: "N"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(ChannelsLast(channels).eval(), (torch.zeros(1, SIZE, SIZE, channels),), str(path),
                          dynamo=False, opset_version=17, input_names=["image"], output_names=["scores"],
                          dynamic_axes={"image": dynamic, "scores": {0: "N"}})  # fmt: skip
    error = refused(path, tmp_path, channels=channels)
    assert error.reason == "contract_conflict" and "channels last (NHWC" in error.message
    assert "--channels" not in error.message


def test_a_fixed_input_that_is_not_square_is_refused_as_such_not_sent_from_one_side_to_the_other(tmp_path: Path):
    """224 x 256: "pass --image-size 256", and then with it, "pass --image-size 224"."""
    path = export(TinyNet(3, seed=1).eval(), tmp_path / "oblong.onnx", 1, dynamic={0: "batch"})
    graph = onnx.load(str(path))
    graph.graph.input[0].type.tensor_type.shape.dim[3].dim_value = SIZE + 8
    onnx.save(graph, str(path))
    for size in (SIZE, SIZE + 8):
        error = refused(path, tmp_path, image_size=size)
        assert error.reason == "contract_conflict", error.message
        assert f"takes images of {SIZE}x{SIZE + 8} (height x width) but a contract here is square" in error.message


def test_an_empty_file_is_refused_as_no_graph_not_for_its_opset(tmp_path: Path):
    empty = tmp_path / "empty.onnx"
    empty.write_bytes(b"")
    error = refused(empty, tmp_path)
    assert error.reason == "unreadable_weights" and "holds no graph" in error.message


def test_an_unsupported_opset_is_refused(small_graph: Path, tmp_path: Path):
    graph = onnx.load(str(small_graph))
    graph.opset_import[0].version = 99
    path = tmp_path / "future.onnx"
    onnx.save(graph, str(path))
    error = refused(path, tmp_path)
    assert error.reason == "unsupported_onnx" and "opset 99" in error.message


def test_a_truncated_graph_and_a_class_count_mismatch_are_refused(small_graph: Path, tmp_path: Path):
    truncated = tmp_path / "cut.onnx"
    truncated.write_bytes(small_graph.read_bytes()[:-40])
    assert refused(truncated, tmp_path).reason in ("unreadable_weights", "unsupported_onnx")
    error = refused(small_graph, tmp_path, task="covid")
    assert error.reason == "class_count_mismatch" and "'scores' has 3 classes" in error.message


def test_an_input_that_is_not_float32_is_refused(tmp_path: Path):
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)).double().eval()
    path = tmp_path / "double.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.zeros(1, 1, SIZE, SIZE, dtype=torch.float64),), str(path), dynamo=False,
                          input_names=["image"], output_names=["scores"])  # fmt: skip
    error = refused(path, tmp_path)
    assert error.reason == "unsupported_onnx" and "'image' has element type 11, not float32" in error.message


def test_nan_weights_in_a_graph_are_refused(small_graph: Path, tmp_path: Path):
    graph = onnx.load(str(small_graph))
    weight = next(i for i in graph.graph.initializer if len(i.dims) == 4)
    array = onnx.numpy_helper.to_array(weight).copy()
    array.flat[0] = np.nan
    weight.CopyFrom(onnx.numpy_helper.from_array(array, weight.name))
    path = tmp_path / "nan.onnx"
    onnx.save(graph, str(path))
    error = refused(path, tmp_path)
    assert error.reason == "non_finite_weights" and weight.name in error.message


def test_an_onnx_version_is_registered_and_verified_like_any_other(migrated_engine: Engine, tmp_path: Path):
    factory = session_factory(migrated_engine)
    original = resnet18_grey()
    path = export(original, tmp_path / "resnet18.onnx", 1)
    root = tmp_path / "registry"
    with transaction(factory) as session:
        row = import_file(session, path, ImportOptions(task="busi", image_size=SIZE, version="onnx1"), root)
        assert (row.architecture, row.status) == ("onnx", "registered")
    folder = root / "busi" / "onnx1"
    assert sorted(p.name for p in folder.iterdir()) == ["manifest.json", "model.onnx"]
    data = bytearray((folder / "model.onnx").read_bytes())
    data[len(data) // 2] ^= 0x01
    (folder / "model.onnx").write_bytes(bytes(data))
    with pytest.raises(ModelRefused) as info:
        load_version(folder)
    assert info.value.reason == "hash_mismatch"


def test_an_onnx_version_with_a_weights_file_beside_it_is_served_from_its_graph(
    migrated_engine: Engine, tmp_path: Path
):
    """Its manifest says what it is: it was refused as 'model.onnx does not exist' beside it."""
    path = export(resnet18_grey(), tmp_path / "resnet18.onnx", 1)
    root = tmp_path / "registry"
    with transaction(session_factory(migrated_engine)) as session:
        import_file(session, path, ImportOptions(task="busi", image_size=SIZE, version="onnx1"), root)
    folder = root / "busi" / "onnx1"
    (folder / "model.safetensors").write_bytes(b"a stray file, SYNTHETIC")
    assert load_version(folder).manifest.architecture == "onnx"


def hand_made(nodes: list[Any], initializers: list[Any], path: Path, output_type: int = 1) -> Path:
    """A SYNTHETIC graph from ``x`` [N, 1, H, W] to ``y`` [N, 1] (of ``output_type``, FLOAT unless
    told), written as onnx.helper makes it."""
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        nodes,
        "synthetic",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, "H", "W"])],
        [helper.make_tensor_value_info("y", output_type, ["N", 1])],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))
    return path


def test_a_graph_that_fails_when_run_is_refused_by_name_not_a_traceback(tmp_path: Path):
    """It passes onnx's full check (a Reshape to a constant [3, 1]) and fails on the self-test's batch:
    ONNX Runtime's error escaped as a traceback."""
    from onnx import helper, numpy_helper

    nodes = [
        helper.make_node("ReduceMean", ["x"], ["m"], axes=[1, 2, 3], keepdims=1),
        helper.make_node("Reshape", ["m", "shape"], ["y"]),
    ]
    path = hand_made(nodes, [numpy_helper.from_array(np.array([3, 1], np.int64), "shape")], tmp_path / "rt.onnx")
    error = refused(path, tmp_path, task="busi_binary")
    assert error.reason == "unsupported_onnx" and "could not be converted" in error.message, error.message


def test_an_infinite_weight_in_a_constant_node_is_refused_as_in_an_initializer(tmp_path: Path):
    """Only initializers were checked: an infinite weight held by a Constant node was registered (its
    self-test saw a saturated sigmoid, finite)."""
    from onnx import helper, numpy_helper

    nodes = [
        helper.make_node("ReduceMean", ["x"], ["m"], axes=[2, 3], keepdims=0),
        helper.make_node(
            "Constant", [], ["w"], name="weights", value=numpy_helper.from_array(np.array([[np.inf]], np.float32))
        ),
        helper.make_node("MatMul", ["m", "w"], ["y"]),
    ]
    error = refused(hand_made(nodes, [], tmp_path / "inf.onnx"), tmp_path, task="busi_binary")
    assert error.reason == "non_finite_weights" and "weights.value" in error.message, error.message


def test_a_sigmoid_behind_an_identity_imported_as_logits_is_refused_as_one_ending_the_graph(tmp_path: Path):
    """Only the node giving the output was looked at: behind an exporter's Identity, the sigmoid of
    probabilities was served (a 0.95 as 0.72)."""
    from onnx import helper, numpy_helper

    nodes = [
        helper.make_node("ReduceMean", ["x"], ["m"], axes=[2, 3], keepdims=0),
        helper.make_node("MatMul", ["m", "w"], ["logits"]),
        helper.make_node("Sigmoid", ["logits"], ["p"]),
        helper.make_node("Identity", ["p"], ["y"]),
    ]
    weight = numpy_helper.from_array(np.array([[3.0]], np.float32), "w")
    error = refused(hand_made(nodes, [weight], tmp_path / "identity.onnx"), tmp_path, task="busi_binary")
    assert error.reason == "contract_conflict" and "comes from a Sigmoid" in error.message, error.message


def test_an_output_of_integer_labels_is_refused_as_no_scores(tmp_path: Path):
    """An int64 class label was read as a logit: every image 0.5 or more, all positive at 0.5."""
    from onnx import TensorProto, helper, numpy_helper

    nodes = [
        helper.make_node("ReduceMean", ["x"], ["m"], axes=[2, 3], keepdims=0),
        helper.make_node("Greater", ["m", "zero"], ["called"]),
        helper.make_node("Cast", ["called"], ["y"], to=TensorProto.INT64),
    ]
    zero = numpy_helper.from_array(np.array(0.0, np.float32), "zero")
    path = hand_made(nodes, [zero], tmp_path / "labels.onnx", output_type=TensorProto.INT64)
    error = refused(path, tmp_path, task="busi_binary")
    assert error.reason == "unsupported_onnx" and "holds INT64, not scores" in error.message, error.message


def test_an_infinite_bfloat16_weight_is_refused_as_a_float32_one_is(tmp_path: Path):
    """numpy knows bfloat16 (ml_dtypes) as no floating type: its infinity went unchecked."""
    from onnx import TensorProto, helper

    nodes = [
        helper.make_node("ReduceMean", ["x"], ["m"], axes=[2, 3], keepdims=0),
        helper.make_node("Cast", ["w16"], ["w"], to=TensorProto.FLOAT),
        helper.make_node("MatMul", ["m", "w"], ["y"]),
    ]
    weight = helper.make_tensor("w16", TensorProto.BFLOAT16, [1, 1], [np.inf])
    error = refused(hand_made(nodes, [weight], tmp_path / "bf16.onnx"), tmp_path, task="busi_binary")
    assert error.reason == "non_finite_weights" and "w16" in error.message, error.message


def test_a_finite_double_weight_past_float32_s_range_is_not_called_infinite(tmp_path: Path):
    """Every weight was narrowed to float32 before the check: a clip bound of 1e300 was refused as
    infinite."""
    from onnx import TensorProto, helper, numpy_helper

    nodes = [
        helper.make_node("ReduceMean", ["x"], ["m"], axes=[2, 3], keepdims=0),
        helper.make_node("MatMul", ["m", "w"], ["z"]),
        helper.make_node("Cast", ["z"], ["zd"], to=TensorProto.DOUBLE),
        helper.make_node("Min", ["zd", "cap"], ["capped"]),
        helper.make_node("Cast", ["capped"], ["y"], to=TensorProto.FLOAT),
    ]
    weights = [
        numpy_helper.from_array(np.array([[3.0]], np.float32), "w"),
        numpy_helper.from_array(np.array(1e300, np.float64), "cap"),
    ]
    path = hand_made(nodes, weights, tmp_path / "capped.onnx")
    manifest = convert_file(path, ImportOptions(task="busi_binary", image_size=SIZE), tmp_path / "v1")
    assert manifest.architecture == "onnx"
