"""PyTorch checkpoints of the seeds, built as their READMEs describe (SYNTHETIC weights, tests/seed_models.py),
saved as the seeds would (plain, ``module.``-prefixed, wrapped in a dict), converted, and compared with
the original module: probabilities within 1e-5, heatmaps within 1e-4 of pytorch-grad-cam on the original;
and the checkpoints that are refused, by name, with nothing registered and no payload run.

Seed 000's small CNN, seed 001's MobileNetV2, seed 002's EfficientNetV2-S with its SELU head and seed
004's binary MobileNetV2 are served through the daemon end to end in test_served_imports.py, which
checks their probabilities, maps and manifests; this module converts the other architectures and
wrappers of seed 001 and the label orders and head shapes the seeds do not cover."""

from __future__ import annotations

import hashlib
import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from sqlalchemy import Engine
from torch import Tensor, nn
from torchvision import models

from meddaemon.db.engine import session_factory, transaction
from meddaemon.engine.heatmaps import compute_heatmaps, predicted_class
from meddaemon.engine.importers import ImportOptions, convert_file, import_file
from meddaemon.engine.registry import ModelRefused, list_versions, load_version, probabilities
from seed_models import SIZE, gradcam, save_as, seed001, seed002, seed004, settle_batchnorm

PROBABILITY_TOLERANCE = 1e-5
HEATMAP_TOLERANCE = 1e-4


def inputs(channels: int, batch: int = 3, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, channels, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(
    ("architecture", "how"),
    [
        ("resnet18", "plain"),
        ("resnet18", "module."),
        ("vgg16", "model_state_dict"),
        ("resnet18", "safetensors"),
        ("resnet18", "torchvision reference"),
        ("resnet18", "torch.compile"),
        ("resnet18", "torch.compile of DataParallel"),
    ],
)
def test_seed001_checkpoints_give_the_original_probabilities_and_gradcam_maps(
    tmp_path: Path, architecture: str, how: str
):
    original, layer = seed001(architecture)
    # a safetensors file named like any checkpoint: told by its bytes
    path = save_as(original, tmp_path / f"best_{architecture}.pth", how)

    manifest = convert_file(
        path, ImportOptions(task="busi", architecture=architecture, image_size=SIZE), tmp_path / "version"
    )
    loaded = load_version(tmp_path / "version")

    assert manifest.architecture == architecture and manifest.input_contract["channels"] == 1
    assert manifest.provenance["source_file"] == path.name
    assert manifest.provenance["format"] == ("safetensors" if how == "safetensors" else "torch")
    x = inputs(1)
    with torch.no_grad():
        expected = torch.softmax(original(x), dim=1)
        got = probabilities(loaded.model(x), "multiclass")
    assert float((got - expected).abs().max()) <= PROBABILITY_TOLERANCE
    result = compute_heatmaps(loaded.model, x, predicted_class())
    classes = [c for row in result.maps for c, _ in row]
    assert classes == expected.argmax(dim=1).tolist()
    reference = gradcam(original, layer, x, classes)
    ours = np.stack([m for row in result.expanded() for _, m in row])
    assert float(np.abs(ours - reference).max()) <= HEATMAP_TOLERANCE


def imported_and_original_resnet18(path: Path, folder: Path, labels: tuple[str, ...]) -> tuple[Tensor, Tensor]:
    """seed001's resnet18, saved at ``path`` and imported into ``folder`` under ``labels``: the
    imported version's probabilities and the original's softmax, on the same grey inputs."""
    original, _ = seed001("resnet18")
    save_as(original, path, "plain")
    convert_file(path, ImportOptions(task="busi", architecture="resnet18", image_size=SIZE, labels=labels), folder)
    x = inputs(1)
    with torch.no_grad():
        return probabilities(load_version(folder).model(x), "multiclass"), torch.softmax(original(x), dim=1)


def test_a_multiclass_head_in_another_label_order_is_permuted(tmp_path: Path):
    ours, theirs = imported_and_original_resnet18(
        tmp_path / "r18.pt", tmp_path / "version", ("normal", "benign", "malignant")
    )
    assert float((ours - theirs[:, [1, 2, 0]]).abs().max()) <= PROBABILITY_TOLERANCE


def test_a_torch_checkpoint_named_safetensors_is_read_as_its_first_bytes_say(tmp_path: Path):
    """torch.load sends a path ending in .safetensors to safetensors: a PyTorch checkpoint so named
    was refused as "header too large", though its bytes say torch (as --format torch did too)."""
    ours, theirs = imported_and_original_resnet18(
        tmp_path / "weights.safetensors", tmp_path / "version", ("benign", "malignant", "normal")
    )
    assert float((ours - theirs).abs().max()) <= PROBABILITY_TOLERANCE


def test_two_logit_softmax_binary_head_is_folded_into_one(tmp_path: Path):
    torch.manual_seed(5)
    original = models.mobilenet_v2(weights=None)
    original.features[0][0] = nn.Conv2d(1, 32, 3, 2, 1, bias=False)
    original.classifier[1] = nn.Linear(original.last_channel, 2)
    original = settle_batchnorm(original, 1)
    path = save_as(original, tmp_path / "two.pt", "plain")
    convert_file(path, ImportOptions(task="covid", image_size=SIZE), tmp_path / "version")
    x = inputs(1)
    with torch.no_grad():
        theirs = torch.softmax(original(x), dim=1)
        ours = probabilities(load_version(tmp_path / "version").model(x), "binary")
    assert float((ours - theirs).abs().max()) <= PROBABILITY_TOLERANCE


@pytest.mark.parametrize(
    ("architecture", "head", "outputs"),
    [
        ("resnet18", "Sequential(Dropout, Linear)", "logits"),  # seed 004's ResNet heads: refused, no way in
        ("densenet121", "Sequential(Linear, Sigmoid)", "probabilities"),  # CheXNet's: refused, even so
    ],
)
def test_a_head_sequential_of_one_linear_and_a_weightless_layer_gives_the_original_probabilities(
    tmp_path: Path, architecture: str, head: str, outputs: str
):
    torch.manual_seed(7)
    task = "busi" if outputs == "logits" else "chestxray14"
    original = getattr(models, architecture)(weights=None)
    last = "fc" if architecture == "resnet18" else "classifier"
    linear = nn.Linear(getattr(original, last).in_features, 3 if task == "busi" else 14)
    parts = [nn.Dropout(0.3), linear] if head.startswith("Sequential(Dropout") else [linear, nn.Sigmoid()]
    setattr(original, last, nn.Sequential(*parts))
    original = settle_batchnorm(original, 3)
    path = save_as(original, tmp_path / "headed.pt", "plain")
    options = ImportOptions(task=task, architecture=architecture, channels=3, image_size=SIZE, outputs=outputs)

    manifest = convert_file(path, options, tmp_path / "version")

    x = inputs(3)
    kind = "multiclass" if task == "busi" else "multilabel"
    with torch.no_grad():
        theirs = original.eval()(x)
        theirs = torch.softmax(theirs, dim=1) if outputs == "logits" else theirs
        ours = probabilities(load_version(tmp_path / "version").model(x), kind)
    assert float((ours - theirs).abs().max()) <= PROBABILITY_TOLERANCE
    assert f"taken as {architecture}'s" in manifest.provenance["conversion"]


def test_a_lightning_checkpoint_whose_loss_holds_class_weights_is_read_as_its_network(tmp_path: Path):
    """The loss's ``criterion.weight`` beside the ``model.`` keys kept the prefix on, and the refusal
    named the network's 315 keys unmatched."""
    torch.manual_seed(9)
    original = settle_batchnorm(models.resnet18(weights=None, num_classes=3), 3)
    state = {f"model.{k}": v for k, v in original.state_dict().items()}
    state["criterion.weight"] = torch.tensor([1.0, 2.5, 0.7])
    path = tmp_path / "epoch=9-step=420.ckpt"
    torch.save({"epoch": 9, "state_dict": state}, path)
    options = ImportOptions(task="busi", architecture="resnet18", channels=3, image_size=SIZE, format="torch")

    manifest = convert_file(path, options, tmp_path / "version")

    x = inputs(3)
    with torch.no_grad():
        theirs = torch.softmax(original.eval()(x), dim=1)
        ours = probabilities(load_version(tmp_path / "version").model(x), "multiclass")
    assert float((ours - theirs).abs().max()) <= PROBABILITY_TOLERANCE
    assert "the training loss's criterion.weight left out" in manifest.provenance["conversion"]


# ------------------------------------------------------------------------------------------ refusals


class MarkerPayload:
    """Unpickling this creates ``path``: proof that code ran."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (open, (str(self.path), "w"))


def refused(path: Path, tmp_path: Path, **options: Any) -> ModelRefused:
    with pytest.raises(ModelRefused) as info:
        convert_file(path, ImportOptions(**{"task": "busi", "image_size": SIZE, **options}), tmp_path / "version")
    assert not (tmp_path / "version" / "manifest.json").exists()
    return info.value


def test_the_marker_payload_is_live(tmp_path: Path):
    """Control for the payload test: unpickling it without weights_only does create the marker."""
    probe = tmp_path / "probe"
    pickle.loads(pickle.dumps(MarkerPayload(probe)))
    assert probe.exists()


@pytest.mark.parametrize("wrapped", [False, True])
def test_a_reduce_payload_is_refused_and_never_runs(tmp_path: Path, wrapped: bool):
    marker = tmp_path / "pwned"
    payload = {"state_dict": MarkerPayload(marker)} if wrapped else MarkerPayload(marker)
    path = tmp_path / "evil.pt"
    torch.save(payload, path)
    error = refused(path, tmp_path)
    assert error.reason == "needs_code" and "open" in error.message
    assert not marker.exists()


class SystemPayload:
    """Unpickling this runs a shell command: ``os.system``, a module torch's safe loader blocks outright."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("how", ["torch.save", "pickle protocol 2", "pickle protocol 4"])
def test_a_payload_of_a_blocked_module_or_a_plain_pickle_is_refused_as_needing_code_and_never_runs(
    tmp_path: Path, how: str
):
    """torch words these otherwise ("... whose module posix is blocked", "Unsupported operand 149"):
    they were refused as damaged files, which sent users looking for a disk fault."""
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    payload = {"x": SystemPayload(marker)}
    if how == "torch.save":
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload, protocol=int(how[-1])))
    error = refused(path, tmp_path)
    assert error.reason == "needs_code", error.message
    assert not marker.exists()


@pytest.mark.parametrize("protocol", [4, 5])
def test_a_state_dict_saved_with_a_newer_pickle_protocol_is_refused_saying_how_to_save_it(
    tmp_path: Path, protocol: int
):
    """torch.save(..., pickle_protocol=4) is a zip of tensors whose pickle torch's safe loader cannot
    read: not a payload needing code, nor a pickle.dump."""
    path = tmp_path / "weights.pt"
    torch.save(small_cnn_state(3), path, pickle_protocol=protocol)
    error = refused(path, tmp_path, architecture="small_cnn")
    assert error.reason == "unreadable_weights" and "pickle protocol 4 or 5" in error.message


def test_a_whole_pickled_model_is_refused_with_how_to_save_a_state_dict(tmp_path: Path):
    model, _ = seed001("mobilenet_v2")
    path = tmp_path / "whole.pt"
    torch.save(model, path)
    error = refused(path, tmp_path, architecture="mobilenet_v2")
    assert error.reason == "needs_code"
    assert "MobileNetV2" in error.message and "torch.save(model.state_dict()" in error.message


@pytest.mark.parametrize("damage", [b"S" * 20, b" "], ids=["bytes", "a space"])
def test_a_global_name_damaged_in_place_is_damage_not_code_needed_and_prints_no_raw_bytes(
    tmp_path: Path, damage: bytes
):
    """Bytes flipped inside ``torch._utils._rebuild_tensor_v2`` read "holds an object of
    torch._utils._reSSSS...X\x07\x00...": control bytes on the terminal, and the wrong reason."""
    path = tmp_path / "flipped.pth"
    torch.save(small_cnn_state(3), path)
    with zipfile.ZipFile(path) as original:
        members = [(info, original.read(info)) for info in original.infolist()]
    with zipfile.ZipFile(path, "w") as damaged:
        for info, data in members:
            if info.filename.endswith("data.pkl"):
                at = data.index(b"_rebuild_tensor_v2") + 3
                data = data[:at] + damage + data[at + len(damage) :]
            damaged.writestr(info, data)
    error = refused(path, tmp_path, architecture="small_cnn", format="torch")
    assert error.reason == "unreadable_weights", error.message
    assert error.message.isprintable() and "a global name that no Python code has" in error.message


@pytest.mark.parametrize("how", ["legacy", "hdf5"])
def test_bytes_that_are_no_pickle_are_damage_not_code_needed(tmp_path: Path, how: str):
    """A legacy checkpoint cut short, or an HDF5 file given --format torch: refused as needing code
    ('holds objects other than tensors, which needs code'), which sent users looking for a payload."""
    path = tmp_path / "not_a_pickle.pt"
    if how == "legacy":
        torch.save(small_cnn_state(3), path, _use_new_zipfile_serialization=False)
        path.write_bytes(path.read_bytes()[:200])
    else:
        path.write_bytes(b"\x89HDF\r\n\x1a\n" + bytes(200))
    error = refused(path, tmp_path, architecture="small_cnn", format="torch")
    assert error.reason == "unreadable_weights", error.message


def test_the_refusal_of_damaged_bytes_gives_the_unpickler_s_reason_never_torch_s_advice_to_unpickle(tmp_path: Path):
    """torch's message begins by advising ``weights_only=False`` (running the file's code), and was
    cut at 200 characters just before its warning that this can run arbitrary code."""
    path = tmp_path / "junk.pth"
    path.write_bytes(b"SYNTHETIC: not a model")
    error = refused(path, tmp_path, architecture="small_cnn", format="torch")
    assert error.reason == "unreadable_weights"
    assert error.message.endswith("is truncated, damaged or not a PyTorch checkpoint (UnpicklingError: "
                                  "Unsupported operand 83)")  # fmt: skip
    assert "weights_only" not in error.message


@pytest.mark.parametrize("how", ["plain", "safetensors"])
def test_a_truncated_checkpoint_is_refused(tmp_path: Path, how: str):
    model, _ = seed001("resnet18")
    path = save_as(model, tmp_path / ("r18.safetensors" if how == "safetensors" else "r18.pt"), how)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    error = refused(path, tmp_path, architecture="resnet18")
    assert error.reason == "unreadable_weights" and "truncated" in error.message


def test_a_class_count_that_contradicts_the_task_names_both(tmp_path: Path):
    model, _ = seed001("resnet18")  # 3 classes
    path = save_as(model, tmp_path / "r18.pt", "plain")
    error = refused(path, tmp_path, task="covid", architecture="resnet18")
    assert error.reason == "class_count_mismatch"
    assert "fc.weight" in error.message and "3 output(s)" in error.message and "'covid'" in error.message


def test_channels_that_contradict_the_contract_name_both(tmp_path: Path):
    path = save_as(seed004(), tmp_path / "rgb.pt", "plain")  # 3 channels; the covid preset is grey
    error = refused(path, tmp_path, task="covid")
    assert error.reason == "contract_conflict"
    assert "features.0.0.weight" in error.message and "3 input channel(s)" in error.message
    assert "has 1" in error.message and "--channels 3" in error.message


def test_nan_weights_are_refused_naming_the_tensor(tmp_path: Path):
    model, _ = seed001("resnet18")
    state = model.state_dict()
    state["layer2.0.conv1.weight"][0, 0, 0, 0] = float("nan")
    path = tmp_path / "nan.pt"
    torch.save(state, path)
    error = refused(path, tmp_path, architecture="resnet18")
    assert error.reason == "non_finite_weights" and "layer2.0.conv1.weight" in error.message


def test_finite_weights_that_give_nan_outputs_are_refused_as_such(tmp_path: Path):
    """A negative BatchNorm variance passes the finiteness check and gives NaN: refused as the
    manifest's fault (bad_manifest), where the ONNX importer says non_finite_output."""
    model, _ = seed001("resnet18")
    state = model.state_dict()
    state["bn1.running_var"][0] = -5.0
    path = tmp_path / "negative_variance.pt"
    torch.save(state, path)
    error = refused(path, tmp_path, architecture="resnet18")
    assert error.reason == "non_finite_output" and "NaN or infinite outputs" in error.message, error.message


def test_a_tensor_declaring_more_values_than_the_file_stores_is_refused_before_its_values_are_read(
    tmp_path: Path,
):
    """One stored float declared 30000x30000 through zero strides: the finiteness check allocated
    the declared size (12 GB for a 9 MB file at 40000x40000) before the key was refused."""
    state = {**small_cnn_state(3), "extra.big": torch.zeros(1).as_strided((30000, 30000), (0, 0))}
    path = tmp_path / "declared.pt"
    torch.save(state, path)
    assert path.stat().st_size < 30000 * 30000 * 4 / 1000, "a file a thousandth of the declared size"
    error = refused(path, tmp_path, architecture="small_cnn")
    assert error.reason == "unreadable_weights" and "extra.big" in error.message, error.message
    assert "declare more values than the file stores" in error.message


def small_cnn_state(outputs: int) -> dict[str, torch.Tensor]:
    from meddaemon.engine.architectures import build_model

    torch.manual_seed(0)
    return dict(build_model("small_cnn", 1, outputs).state_dict())


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (lambda s: {**s, "features.0.weight": s["features.0.weight"].to(torch.float8_e4m3fn)}, "float8"),
        (lambda s: {**s, "features.0.weight": s["features.0.weight"].to("meta")}, "meta"),
        (lambda s: {**s, "features.0.weight": s["features.0.weight"].to_sparse()}, "sparse"),
        (lambda s: {**s, "features.0.weight": s["features.0.weight"].to(torch.complex64)}, "complex"),
    ],
    ids=["float8", "meta", "sparse", "complex"],
)
def test_tensors_no_network_holds_are_refused_by_name(tmp_path: Path, make: Any, expected: str):
    """float8, meta and sparse tensors crashed the finiteness check with a traceback; a complex one
    lost its imaginary part to a warning and was registered."""
    path = tmp_path / "odd.pt"
    torch.save(make(small_cnn_state(3)), path)
    error = refused(path, tmp_path, architecture="small_cnn")
    assert error.reason == "unreadable_weights" and "features.0.weight" in error.message, error.message


@pytest.mark.parametrize(
    ("task", "rows", "labels"), [("busi_binary", 2, None), ("busi", 3, ("normal", "benign", "malignant"))]
)
def test_a_head_whose_bias_is_shorter_than_its_rows_is_refused_by_name(
    tmp_path: Path, task: str, rows: int, labels: tuple[str, ...] | None
):
    """Folding or reordering the head indexed the bias by label first: an IndexError traceback."""
    state = small_cnn_state(rows)
    state["head.linear.bias"] = state["head.linear.bias"][:-1].clone()
    path = tmp_path / "short_bias.pt"
    torch.save(state, path)
    options: dict[str, Any] = {"task": task, "architecture": "small_cnn"} | ({"labels": labels} if labels else {})
    error = refused(path, tmp_path, **options)
    assert error.reason == "wrong_architecture" and "head.linear.bias" in error.message, error.message


def test_a_state_dict_of_another_architecture_names_the_keys(tmp_path: Path):
    model, _ = seed001("resnet18")
    path = save_as(model, tmp_path / "r18.pt", "plain")
    error = refused(path, tmp_path, architecture="mobilenet_v2")
    assert error.reason == "wrong_architecture"
    assert "122 unmatched key(s) in the file: bn1.bias" in error.message
    assert "missing from the file" in error.message and "features." in error.message


def test_mis_shaped_keys_are_named(tmp_path: Path):
    model, _ = seed001("resnet18")
    state = model.state_dict()
    state["layer3.0.conv2.weight"] = torch.zeros(256, 256, 1, 1)
    path = tmp_path / "shape.pt"
    torch.save(state, path)
    error = refused(path, tmp_path, architecture="resnet18")
    assert error.reason == "wrong_architecture"
    assert "mis-shaped" in error.message and "layer3.0.conv2.weight (256, 256, 1, 1)" in error.message


def test_something_that_is_not_a_state_dict_is_refused(tmp_path: Path):
    path = tmp_path / "list.pt"
    torch.save({"epoch": 3, "weights": [torch.zeros(2)]}, path)
    error = refused(path, tmp_path, architecture="resnet18")
    assert error.reason == "unreadable_weights" and "epoch" in error.message


# ------------------------------------------------------------------------------------------ registering


def test_a_converted_file_is_registered_with_its_provenance_and_a_refused_one_is_not(
    migrated_engine: Engine, tmp_path: Path
):
    factory = session_factory(migrated_engine)
    original, _ = seed001("mobilenet_v2")
    path = save_as(original, tmp_path / "best.pth", "module.")
    root = tmp_path / "registry"
    options = ImportOptions(task="busi", architecture="mobilenet_v2", image_size=SIZE, version="seed001")
    with transaction(factory) as session:
        row = import_file(session, path, options, root)
        assert (row.task_name, row.version, row.status) == ("busi", "seed001", "registered")
    registered = load_version(root / "busi" / "seed001")
    provenance = registered.manifest.provenance
    assert provenance["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert "'module.' prefix stripped" in provenance["conversion"]
    assert sorted(p.name for p in (root / "busi" / "seed001").iterdir()) == ["manifest.json", "model.safetensors"]

    bad = tmp_path / "whole.pt"
    torch.save(original, bad)
    with pytest.raises(ModelRefused), transaction(factory) as session:
        import_file(session, bad, ImportOptions(task="busi", version="bad"), root)
    with factory() as session:
        assert [r.version for r in list_versions(session)] == ["seed001"]
    assert not (root / "busi" / "bad").exists()


# ------------------------------------------------------------------------------------------ seed 002


def test_seed002_as_plain_efficientnet_is_refused_rather_than_dropping_the_selu(tmp_path: Path):
    path = save_as(seed002(settled=False), tmp_path / "efficientnet.pt", "plain")
    error = refused(path, tmp_path, task="histopathology")
    assert error.reason == "wrong_architecture"
    assert "classifier.2" in error.message and "efficientnet_v2_s_selu" in error.message


def test_a_file_replaced_while_it_is_imported_is_refused_and_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """Hashed, then read again by path: a file swapped in between (a new export landing) was
    registered under the hash of the other (4 of 6 tries in a review's race)."""
    from meddaemon.engine.importers import torch_checkpoint

    path = tmp_path / "exported.pt"
    torch.save(small_cnn_state(3), path)
    convert = torch_checkpoint.convert

    def swapped_meanwhile(*args: Any, **kwargs: Any) -> Any:
        converted = convert(*args, **kwargs)
        torch.save({k: v + 1 for k, v in small_cnn_state(3).items()}, path)  # SYNTHETIC other weights
        return converted

    monkeypatch.setattr(torch_checkpoint, "convert", swapped_meanwhile)
    error = refused(path, tmp_path, architecture="small_cnn")
    assert error.reason == "unreadable_weights" and "changed while it was imported" in error.message
    assert not (tmp_path / "version").exists()
