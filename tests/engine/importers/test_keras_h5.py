"""Seed 003's format beyond the served file (tests/engine/importers/test_served_imports.py serves seed
003's ``.h5`` through the daemon and compares it with Keras): the same weights in Keras 2.1.6's layout,
and as Keras 3 saves them itself (``.weights.h5``, ``.keras``, the DenseNet nested in another model),
import the same, compared with Keras 3 on its torch backend loading the file (probabilities within 1e-4),
and damaged or foreign files are refused by name. SYNTHETIC weights; the image is small (64 px) so two
cores cope; the architecture is the real one."""

from __future__ import annotations

import shutil
import zipfile
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
import torch

from meddaemon.engine.importers import ImportOptions, convert_file
from meddaemon.engine.preprocess import normalise
from meddaemon.engine.registry import ModelRefused, load_version, probabilities
from meddaemon.engine.tasks import BUILTIN_TASKS
from seed_models import FINDINGS, course_model, keras_module, keras_probabilities

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # Keras's torch backend and numpy 2

TOLERANCE = 1e-4
SIZE = 64


@pytest.fixture(scope="module")
def keras_file(seed003_h5: Path) -> tuple[Path, np.ndarray, np.ndarray]:
    """(the .h5, NCHW normalised inputs, Keras's probabilities for them after loading the file afresh)."""
    pixels = torch.rand(3, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    contract = BUILTIN_TASKS["chestxray14"].contract
    x = normalise(pixels.numpy(), type(contract)(3, SIZE, SIZE, (0, 0, 0), (1, 1, 1), normalisation="per_image"))
    return seed003_h5, x, keras_probabilities(seed003_h5, x)


def text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def keras2_layout(source: Path, target: Path) -> Path:
    """The same weights as Keras 2.1.6 wrote them: ``conv1/conv`` layer names, ``kernel:0`` weight names."""
    with h5py.File(source, "r") as src, h5py.File(target, "w") as dst:
        names = []
        for raw in src.attrs["layer_names"]:
            name = text(raw)
            old = name.replace("conv1_", "conv1/") if name.startswith("conv1_") else name
            names.append(old.encode())
            group = dst.create_group(old)
            weight_names = []
            for w in src[name].attrs["weight_names"]:
                role = text(w).rsplit("/", 1)[-1]
                new = f"{old}/{role}:0"
                group.create_dataset(new, data=np.asarray(src[name][text(w)]))
                weight_names.append(new.encode())
            group.attrs["weight_names"] = weight_names
        dst.attrs["layer_names"] = names
        dst.attrs["keras_version"] = b"2.1.6"
        dst.attrs["backend"] = b"tensorflow"
    return target


def test_the_keras2_layout_of_the_same_weights_imports_the_same(
    keras_file: tuple[Path, np.ndarray, np.ndarray], tmp_path: Path
):
    path, x, expected = keras_file
    old = keras2_layout(path, tmp_path / "densenet_keras2.h5")
    convert_file(old, ImportOptions(task="chestxray14", image_size=SIZE), tmp_path / "version")
    with torch.no_grad():
        got = probabilities(load_version(tmp_path / "version").model(torch.from_numpy(x)), "multilabel").numpy()
    assert float(np.abs(got - expected).max()) <= TOLERANCE


def edited(source: Path, target: Path, edit: Any) -> Path:
    shutil.copyfile(source, target)
    with h5py.File(target, "r+") as f:
        edit(f)
    return target


def refused(path: Path, tmp_path: Path, **options: Any) -> ModelRefused:
    with pytest.raises(ModelRefused) as info:
        convert_file(path, ImportOptions(**{"task": "chestxray14", "image_size": SIZE, **options}), tmp_path / "v")
    assert not (tmp_path / "v" / "manifest.json").exists()
    return info.value


def test_a_file_only_named_h5_is_refused_as_unreadable_whatever_the_architecture(tmp_path: Path):
    """Imported for busi (mobilenet_v2), it was refused as "Keras .h5 weights are imported for
    DenseNet-121": the file was never opened."""
    renamed = tmp_path / "weights.h5"
    renamed.write_bytes(b"\x08\x07\x12\x07pytorch" + bytes(200))  # SYNTHETIC: an ONNX-like head, no HDF5
    for options in ({"task": "busi"}, {}):
        error = refused(renamed, tmp_path, **options)
        assert error.reason == "unreadable_weights", (options, error.message)


def test_damaged_or_foreign_keras_files_are_refused_by_name(
    keras_file: tuple[Path, np.ndarray, np.ndarray], tmp_path: Path
):
    path = keras_file[0]
    truncated = tmp_path / "cut.h5"
    truncated.write_bytes(path.read_bytes()[: path.stat().st_size // 3])
    assert refused(truncated, tmp_path).reason == "unreadable_weights"

    assert refused(path, tmp_path, architecture="resnet18").reason == "wrong_architecture"

    def drop_layer(f: h5py.File) -> None:
        del f["conv3_block2_1_conv"]
        f.attrs["layer_names"] = [n for n in f.attrs["layer_names"] if text(n) != "conv3_block2_1_conv"]

    error = refused(edited(path, tmp_path / "missing.h5", drop_layer), tmp_path)
    assert error.reason == "wrong_architecture" and "conv3_block2_1_conv" in error.message

    def three_findings(f: h5py.File) -> None:
        del f["dense/dense/kernel"], f["dense/dense/bias"]
        f["dense"].create_dataset("dense/kernel", data=np.zeros((1024, 3), np.float32))
        f["dense"].create_dataset("dense/bias", data=np.zeros(3, np.float32))

    error = refused(edited(path, tmp_path / "three.h5", three_findings), tmp_path)
    assert error.reason == "class_count_mismatch" and "dense/kernel" in error.message

    def nan_gamma(f: h5py.File) -> None:
        f["bn/bn/gamma"][0] = np.nan

    error = refused(edited(path, tmp_path / "nan.h5", nan_gamma), tmp_path)
    assert error.reason == "non_finite_weights" and "bn/gamma" in error.message


@pytest.fixture(scope="module")
def keras3_files(keras_file: tuple[Path, np.ndarray, np.ndarray], tmp_path_factory: pytest.TempPathFactory):
    """The same weights as Keras 3 saves them itself: ``save_weights`` to ``.weights.h5`` and ``save``
    to ``.keras``, of the course's model and of a Sequential holding the DenseNet as one layer."""
    keras, folder = keras_module(), tmp_path_factory.mktemp("keras3")
    model = course_model(keras, SIZE)
    model.load_weights(str(keras_file[0]))
    model.save_weights(str(folder / "densenet.weights.h5"))
    model.save(str(folder / "densenet.keras"))
    base = keras.applications.DenseNet121(weights=None, include_top=False, input_shape=(SIZE, SIZE, 3))
    head = keras.layers.Dense(FINDINGS, activation="sigmoid")
    nested = keras.Sequential([keras.Input((SIZE, SIZE, 3)), base, keras.layers.GlobalAveragePooling2D(), head])
    weights = model.get_weights()
    base.set_weights(weights[:-2])
    head.set_weights(weights[-2:])
    nested.save_weights(str(folder / "nested.weights.h5"))
    nested.save(str(folder / "nested.keras"))
    nested.save(str(folder / "nested.h5"))  # the HDF5 layout: the DenseNet one layer holding 604 weights
    return folder


@pytest.mark.parametrize(
    "name", ["densenet.weights.h5", "densenet.keras", "nested.weights.h5", "nested.keras", "nested.h5"]
)
def test_keras3s_own_formats_of_the_same_weights_import_the_same(
    keras_file: tuple[Path, np.ndarray, np.ndarray], keras3_files: Path, tmp_path: Path, name: str
):
    """Keras 3 names a layer in them by its class and rank (``batch_normalization_17``), not its own name.
    ``model.save`` to ``.h5`` keeps the HDF5 layout, where the nested DenseNet is one layer whose
    weights name its inner layers: they were read as one layer's six and refused as no DenseNet."""
    _, x, expected = keras_file
    with h5py.File(keras3_files / "densenet.weights.h5") as f:
        assert "conv1_bn" not in f["layers"] and "batch_normalization_120" in f["layers"]
    convert_file(keras3_files / name, ImportOptions(task="chestxray14", image_size=SIZE), tmp_path / "version")
    with torch.no_grad():
        got = probabilities(load_version(tmp_path / "version").model(torch.from_numpy(x)), "multilabel").numpy()
    assert float(np.abs(got - expected).max()) <= TOLERANCE


@pytest.mark.parametrize("name", ["densenet.keras", "nested.keras", "nested.h5"])
def test_a_keras_model_saved_for_another_input_size_is_refused_naming_both(
    keras3_files: Path, tmp_path: Path, name: str
):
    """The saved model's input size was never read: a DenseNet saved for 64 px imported for
    chestxray14 (320 px) and was served at 320 without a word, as an ONNX graph's fixed size is not."""
    with pytest.raises(ModelRefused) as refused:
        convert_file(keras3_files / name, ImportOptions(task="chestxray14"), tmp_path / "version")

    assert refused.value.reason == "contract_conflict", refused.value.message
    assert f"{SIZE}x{SIZE} (height x width) but the input contract (task 'chestxray14') has 320x320" in (
        refused.value.message
    )
    assert f"pass --image-size {SIZE}" in refused.value.message
    assert not (tmp_path / "version").exists()


def keras2_config(shape: list[int | None], data_format: str) -> dict[str, Any]:
    """A saved model's configuration as Keras 2 writes it (the parts the size check reads)."""
    return {
        "class_name": "Functional",
        "config": {
            "layers": [
                {"class_name": "InputLayer", "config": {"name": "input_1", "batch_input_shape": shape}},
                {"class_name": "Conv2D", "config": {"name": "conv1/conv", "data_format": data_format}},
            ]
        },
    }


@pytest.mark.parametrize(
    ("shape", "data_format", "refusal"),
    [
        ([None, 3, 64, 64], "channels_first", None),
        ([None, 64, 64, 3], "channels_last", None),
        ([None, None, None, 3], "channels_last", None),
        ([None, 64, None, 3], "channels_last", None),
        ([None, 3, 32, 32], "channels_first", "32x32 (height x width) but the input contract (task 'chestxray14') "
                                              "has 64x64; pass --image-size 32"),
        ([None, 64, 96, 3], "channels_last", "64x96 (height x width) but the input contract (task 'chestxray14') "
                                             "has 64x64; a contract here is square"),
    ],
)  # fmt: skip
def test_the_saved_input_size_is_read_where_the_data_format_puts_it(
    shape: list[int | None], data_format: str, refusal: str | None
):
    """Keras 2's DenseNet saved channels first ([None, 3, 64, 64]) was refused as 'height 3'; a
    model of 64x96 was told to pass --image-size 64, then 96, then 64: no square contract serves it."""
    from meddaemon.engine.importers.keras_h5 import check_input_size

    contract = type(BUILTIN_TASKS["chestxray14"].contract)(3, SIZE, SIZE, (0, 0, 0), (1, 1, 1))
    if refusal is None:
        check_input_size(keras2_config(shape, data_format), contract, "chestxray14")
        return
    with pytest.raises(ModelRefused) as refused:
        check_input_size(keras2_config(shape, data_format), contract, "chestxray14")
    assert refused.value.reason == "contract_conflict" and refusal in refused.value.message, refused.value.message


def test_damaged_or_foreign_keras3_files_are_refused_by_name(keras3_files: Path, tmp_path: Path):
    archive = (keras3_files / "densenet.keras").read_bytes()
    cut = tmp_path / "cut.keras"
    cut.write_bytes(archive[: len(archive) // 2])
    assert refused(cut, tmp_path, format="keras-h5").reason == "unreadable_weights"

    foreign = tmp_path / "foreign.zip"
    with zipfile.ZipFile(foreign, "w") as z:
        z.writestr("config.json", "{}")
    error = refused(foreign, tmp_path, format="keras-h5")
    assert error.reason == "unreadable_weights" and "without model.weights.h5" in error.message

    def extra_batchnorm(f: h5py.File) -> None:
        f["layers"].copy(f["layers/batch_normalization"], "batch_normalization_121")

    error = refused(
        edited(keras3_files / "densenet.weights.h5", tmp_path / "extra.weights.h5", extra_batchnorm), tmp_path
    )
    assert error.reason == "wrong_architecture" and "unmatched layer(s): batch_normalization_121" in error.message


def test_weights_kept_in_another_file_are_refused_and_never_read(
    keras_file: tuple[Path, np.ndarray, np.ndarray], tmp_path: Path
):
    """h5py reads a dataset's external storage, a virtual dataset's sources and an external link
    without a word: any file of the machine's bytes imported as weights, under the SHA-256 of an
    ``.h5`` that never held them (a full DenseNet-121 was registered with its Dense bias so)."""
    outside = tmp_path / "outside.bin"
    outside.write_bytes(b"SYNTHETIC" * 100)

    def external_bias(f: h5py.File) -> None:
        del f["dense/dense/bias"]
        f["dense"].create_dataset("dense/bias", shape=(14,), dtype="f4", external=[(str(outside), 0, 56)])

    def linked_bias(f: h5py.File) -> None:
        with h5py.File(tmp_path / "other.h5", "w") as other:
            other.create_dataset("bias", data=np.ones(14, np.float32))
        del f["dense/dense/bias"]
        f["dense/dense/bias"] = h5py.ExternalLink(str(tmp_path / "other.h5"), "/bias")

    for name, edit in (("external.h5", external_bias), ("linked.h5", linked_bias)):
        error = refused(edited(keras_file[0], tmp_path / name, edit), tmp_path)
        assert error.reason == "unreadable_weights" and "keeps its values in another file" in error.message, name


def test_a_keras3_file_whose_groups_link_back_up_is_refused_not_read_for_ever(keras3_files: Path, tmp_path: Path):
    """A hard link from a layer back to the root: the walk over nested models never ended (100 % CPU)."""

    def loop(f: h5py.File) -> None:
        f["layers/functional"] = f["/"]

    error = refused(edited(keras3_files / "densenet.weights.h5", tmp_path / "loop.weights.h5", loop), tmp_path)
    assert error.reason == "unreadable_weights" and "links back to a group above it" in error.message


def test_a_kernel_of_another_rank_is_refused_by_name_not_a_traceback(
    keras_file: tuple[Path, np.ndarray, np.ndarray], tmp_path: Path
):
    """A 2-D kernel where a convolution's 4-D one belongs: a ValueError traceback from the transpose."""

    def two_d_kernel(f: h5py.File) -> None:
        group = next(g for g in (f.get("conv1/conv"), f.get("conv1_conv")) if g is not None)
        key = next(k for k in _datasets(group) if k.endswith("kernel"))
        del group[key]
        group.create_dataset(key, data=np.zeros((3, 3), np.float32))

    error = refused(edited(keras_file[0], tmp_path / "flat.h5", two_d_kernel), tmp_path)
    assert error.reason == "unreadable_weights" and "could not be converted (ValueError" in error.message


def _datasets(group: h5py.Group) -> list[str]:
    found: list[str] = []
    group.visit(lambda name: found.append(name) if isinstance(group[name], h5py.Dataset) else None)
    return found


def test_a_small_file_declaring_more_values_than_any_model_here_is_refused_unread(tmp_path: Path):
    """A few kilobytes of HDF5 declared half a gigabyte of float32 (chunks never written read as
    zeros): every array was read before any was checked; declaring more took the host's memory."""
    path = tmp_path / "declares.h5"
    with h5py.File(path, "w") as f:  # SYNTHETIC: Keras 2's save_weights layout, nothing written
        f.attrs["layer_names"] = [b"dense"]
        group = f.create_group("dense")
        group.create_dataset("dense/kernel:0", shape=(1 << 14, 1 << 13), dtype="f4", chunks=(1024, 1024))
        group.attrs["weight_names"] = [b"dense/kernel:0"]
    assert path.stat().st_size < 100_000
    error = refused(path, tmp_path)
    assert error.reason == "unreadable_weights" and "declare more than 67,108,864 values" in error.message


def test_a_keras_file_of_another_architecture_is_refused_as_such_before_it_is_read(tmp_path: Path):
    """A VGG16 .h5 (138M values, here declared, not written) imported for VGG16 was told its
    weights "declare more than 67,108,864 values": a readable file called damaged, and read first."""
    path = tmp_path / "vgg16.h5"
    with h5py.File(path, "w") as f:  # SYNTHETIC: VGG16's fc1 in Keras 2's save_weights layout
        f.attrs["layer_names"] = [b"fc1"]
        group = f.create_group("fc1")
        group.create_dataset("fc1/kernel:0", shape=(25088, 4096), dtype="f4", chunks=(1024, 1024))
        group.attrs["weight_names"] = [b"fc1/kernel:0"]
    error = refused(path, tmp_path, architecture="vgg16")
    assert error.reason == "wrong_architecture" and "imported for DenseNet-121" in error.message, error.message


def test_two_layers_whose_names_are_one_key_are_refused_not_one_dropped(tmp_path: Path):
    """``conv1_conv`` and ``conv1/conv`` are one name once '/' is '_': the later took the earlier's place."""
    path = tmp_path / "twice.h5"
    with h5py.File(path, "w") as f:  # SYNTHETIC
        f.attrs["layer_names"] = [b"conv1_conv", b"conv1/conv"]
        for name in ("conv1_conv", "conv1/conv"):
            group = f.create_group(name)
            group.create_dataset(f"{name}/kernel:0", data=np.zeros((7, 7, 3, 64), np.float32))
            group.attrs["weight_names"] = [f"{name}/kernel:0".encode()]
    error = refused(path, tmp_path)
    assert error.reason == "wrong_architecture" and "two layers with weights are named 'conv1_conv'" in error.message


@pytest.mark.parametrize(
    ("variant", "reason", "named"),
    [
        ("a Lambda after the pooling", "needs_code", "layer 'flip' is a Lambda"),
        ("max pooling", "wrong_architecture", "is a GlobalMaxPooling2D"),
        ("a softmax head", "wrong_architecture", "ends with 'softmax'; a multilabel task's ends with linear or"),
        # "unhashable type: 'dict'" called it unreadable weights
        ("a function as the head's activation", "needs_code", "activation is code in the file"),
    ],
)
@pytest.mark.parametrize("suffix", [".h5", ".keras"])
def test_a_model_that_computes_other_than_densenet_121_and_its_head_is_refused_by_its_configuration(
    tmp_path: Path, variant: str, reason: str, named: str, suffix: str
):
    """Only the weights were read: a Lambda (never run: it is code), another pooling, or a head of
    another activation was imported as a plain DenseNet-121 + Dense and served with outputs the model
    never gave (a Lambda flipping the features: 0.42 apart, the findings reversed)."""
    keras = keras_module()
    base = keras.applications.DenseNet121(weights=None, include_top=False, input_shape=(SIZE, SIZE, 3))
    pooling = keras.layers.GlobalMaxPooling2D if variant == "max pooling" else keras.layers.GlobalAveragePooling2D
    pooled = pooling()(base.output)
    if variant.startswith("a Lambda"):
        pooled = keras.layers.Lambda(lambda t: -10.0 * t, name="flip")(pooled)
    activation = {"a softmax head": "softmax", "a function as the head's activation": lambda t: 1 / (1 + t * t)}
    head = keras.layers.Dense(FINDINGS, activation=activation.get(variant, "sigmoid"))
    path = tmp_path / f"synthetic_model{suffix}"
    keras.Model(base.input, head(pooled)).save(str(path))

    with pytest.raises(ModelRefused) as refused:
        convert_file(path, ImportOptions(task="chestxray14", image_size=SIZE), tmp_path / "version")

    assert refused.value.reason == reason and named in refused.value.message, refused.value.message
    assert not (tmp_path / "version").exists()


@pytest.fixture(scope="module")
def heads(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Any, Any, Path]:
    """(keras, the DenseNet-121 base, its pooled output, a folder) for models of other heads (SYNTHETIC
    weights: the base's as Keras initialises them, each head's drawn)."""
    keras = keras_module()
    keras.utils.set_random_seed(11)
    base = keras.applications.DenseNet121(weights=None, include_top=False, input_shape=(SIZE, SIZE, 3))
    return keras, base, keras.layers.GlobalAveragePooling2D()(base.output), tmp_path_factory.mktemp("heads")


def _saved(keras: Any, base: Any, output: Any, path: Path) -> tuple[Path, Any]:
    model = keras.Model(base.input, output)
    for layer in model.layers:
        if isinstance(layer, keras.layers.Dense):
            rows = np.random.default_rng(5).normal(0, 0.5, layer.kernel.shape).astype(np.float32)
            layer.set_weights([rows, np.linspace(-1, 1, layer.kernel.shape[1]).astype(np.float32)])
    model.save(str(path))
    return path, model


@pytest.mark.parametrize(
    ("head", "task", "column"),
    [
        ("Dense(2, sigmoid)", "covid", 1),  # folded as a softmax's: a 0.188 was served as 0.086
        ("Dense(2, softmax)", "covid", 1),  # refused: a binary head was sigmoid or linear
        ("Dense(14) then Activation(sigmoid)", "chestxray14", None),  # refused: an Activation was ReLU only
    ],
)
def test_a_head_keras_writes_for_the_task_is_served_with_the_probabilities_keras_gives(
    keras_file: tuple[Path, np.ndarray, np.ndarray],
    heads: tuple[Any, Any, Any, Path],
    tmp_path: Path,
    head: str,
    task: str,
    column: int | None,
):
    """Two sigmoids of a binary task, the two-column softmax Keras users train a binary task with,
    and a linear Dense followed by its activation as a layer of its own (Keras's mixed-precision
    guide writes the head so, in float32)."""
    keras, base, pooled, folder = heads
    _, x, _ = keras_file
    if head.startswith("Dense(14)"):
        output = keras.layers.Activation("sigmoid", dtype="float32")(keras.layers.Dense(FINDINGS)(pooled))
    else:
        output = keras.layers.Dense(2, activation=head[9:-1])(pooled)
    path, model = _saved(keras, base, output, folder / f"{head[:8].replace('(', '')}_{task}.keras")
    expected = np.asarray(model.predict(np.ascontiguousarray(x.transpose(0, 2, 3, 1)), verbose=0))

    convert_file(path, ImportOptions(task=task, image_size=SIZE, architecture="densenet121"), tmp_path / "version")
    kind = BUILTIN_TASKS[task].kind
    with torch.no_grad():
        got = probabilities(load_version(tmp_path / "version").model(torch.from_numpy(x)), kind).numpy()

    want = expected if column is None else expected[:, column]
    assert float(np.abs((got if column is None else got[:, 1]) - want).max()) <= TOLERANCE


@pytest.mark.parametrize(
    ("head", "named"),
    [
        ("Dense(1, softmax)", "the head 'dense_1' is a softmax of 1 outputs; a binary task's has 2"),
        ("Dense(2, sigmoid) then Activation(sigmoid)", "the head applies 'sigmoid' then 'sigmoid'"),
        ("Activation(sigmoid) before Dense(2)", "(Activation) applies 'sigmoid', which DenseNet-121 does not"),
    ],
)
def test_a_head_that_is_not_one_activation_after_its_dense_layer_is_refused_by_name(
    heads: tuple[Any, Any, Any, Path], tmp_path: Path, head: str, named: str
):
    """A softmax of one output is 1 whatever the image; an activation twice, or one inside the
    network, is not what the task's head computes."""
    keras, base, pooled, folder = heads
    if head == "Dense(1, softmax)":
        output = keras.layers.Dense(1, activation="softmax", name="dense_1")(pooled)
    elif head.startswith("Dense(2, sigmoid) then"):
        output = keras.layers.Activation("sigmoid")(keras.layers.Dense(2, activation="sigmoid")(pooled))
    else:
        output = keras.layers.Dense(2)(keras.layers.Activation("sigmoid")(pooled))
    path, _ = _saved(keras, base, output, folder / f"refused_{len(head)}.keras")

    error = refused(path, tmp_path, task="covid", architecture="densenet121")

    assert error.reason == "wrong_architecture" and named in error.message, error.message
