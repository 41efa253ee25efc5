"""Imported seed models through the daemon end to end.

Every seed's trained model, built as its README describes it (SYNTHETIC weights, tests/seed_models.py)
and saved as the seed saves it, is imported into its own task and promoted; then ONE ``meddaemon start
--once`` (a subprocess) serves all five at once from a SYNTHETIC PNG in each task's folder of the inbox:

=========  ==============  ===========================================  ==========================  ======
seed       task            model                                        saved as                    input
=========  ==============  ===========================================  ==========================  ======
000        busi_binary     small CNN ending in a sigmoid                 a bare state dict           100 px
001        busi            MobileNetV2, 1-channel, 3 classes             ``{"state_dict": ...}``     224 px
002        histopathology  EfficientNetV2-S, SELU head                   ``module.``-prefixed        384 px
003        chestxray14     Keras DenseNet-121 + Dense(14, sigmoid)       ``.h5``                     320 px
004        covid           MobileNetV2 on RGB, logit of *healthy*        ``{"model_state_dict": }``  224 px
=========  ==============  ===========================================  ==========================  ======

Each scan is decoded, preprocessed by the imported contract, inferred and stored: the stored
probabilities are the original module's on the same model input (1e-5; seed 003: Keras 3 on its torch
backend loading the same ``.h5``, 1e-4) and the stored heatmap is pytorch-grad-cam's on the original
module (1e-4). Each model is imported with the task preset's input contract, as the seed's README
sizes it (seed 002: resize, then centre crop, to 384 px with ImageNet's mean and std; seed 003: 320 px,
each image normalised by its own mean and std).

An ONNX graph in another label order is served by ONNX Runtime (probabilities within 1e-4) with CAM maps.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from dicom_factory import write_png
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from sqlalchemy import select
from sqlalchemy.orm import Session
from torch import nn

from daemon_harness import Daemons, Layout
from meddaemon.daemon.service import Daemon
from meddaemon.db.engine import create_db_engine, session_factory
from meddaemon.db.models import Result, Scan
from meddaemon.engine.decode import decode_bytes
from meddaemon.engine.heatmap_grid import read_map
from meddaemon.engine.importers import ImportOptions
from meddaemon.engine.preprocess import to_model_input
from meddaemon.engine.registry import Manifest, load_version, read_manifest
from model_factory import import_and_promote, import_files_into
from seed_models import (
    SIZE,
    Negated,
    Seed000Logit,
    gradcam,
    keras_probabilities,
    save_as,
    seed000,
    seed001,
    seed002,
    seed004,
)

pytestmark = [
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),  # Keras's torch backend and numpy 2
    # one test worker builds the served seeds (25 s), rather than each worker its own copy
    pytest.mark.xdist_group("served_imports"),
]

PROBABILITY_TOLERANCE = 1e-5
KERAS_TOLERANCE = 1e-4
HEATMAP_TOLERANCE = 1e-4


@dataclass(frozen=True)
class Original:
    """A seed's model as trained and saved, and what meddaemon must serve of it."""

    file: Path
    options: ImportOptions
    #: the scan dropped into the task's folder
    pixels: np.ndarray
    #: the original's probabilities for a model input, in the task's label order
    probabilities: Callable[[torch.Tensor], np.ndarray]
    #: pytorch-grad-cam's map on the original for (model input, the label meddaemon mapped); None: no oracle
    gradcam: Callable[[torch.Tensor, str], np.ndarray] | None
    tolerance: float = PROBABILITY_TOLERANCE


def binary(p_positive: torch.Tensor) -> np.ndarray:
    return torch.stack([1 - p_positive, p_positive], dim=1)[0].numpy()


def seed000_small_cnn(folder: Path, rng: np.random.Generator) -> Original:
    original = seed000()
    return Original(
        save_as(original, folder / "modelo.pth", "plain"),
        ImportOptions(task="busi_binary", outputs="probabilities"),
        rng.integers(0, 255, (90, 120), np.uint8),
        lambda x: binary(original(x)[:, 0]),
        lambda x, _: gradcam(Seed000Logit(original), original.features, x, [0])[0],
    )


def seed001_mobilenet(folder: Path, rng: np.random.Generator) -> Original:
    original, layer = seed001("mobilenet_v2")
    labels = ["benign", "malignant", "normal"]
    return Original(
        save_as(original, folder / "best_mobilenetv2.pth", "state_dict"),
        ImportOptions(task="busi", architecture="mobilenet_v2"),
        rng.integers(0, 255, (180, 260), np.uint8),
        lambda x: torch.softmax(original(x), dim=1)[0].numpy(),
        lambda x, label: gradcam(original, layer, x, [labels.index(label)])[0],
    )


def seed002_efficientnet(folder: Path, rng: np.random.Generator) -> Original:
    original = seed002()
    return Original(
        save_as(original, folder / "efficientnet_v2_s.pt", "module."),
        ImportOptions(task="histopathology", architecture="efficientnet_v2_s_selu", resize_then_crop=True),
        rng.integers(0, 255, (70, 90, 3), np.uint8),
        lambda x: binary(torch.sigmoid(original(x))[:, 0]),
        lambda x, _: gradcam(original, original.features, x, [0])[0],
    )


def seed003_keras(h5: Path, rng: np.random.Generator) -> Original:
    return Original(
        h5,
        ImportOptions(task="chestxray14"),
        rng.integers(0, 255, (300, 360), np.uint8),
        lambda x: keras_probabilities(h5, x.numpy())[0],
        None,
        KERAS_TOLERANCE,
    )


def seed004_mobilenet(folder: Path, rng: np.random.Generator) -> Original:
    """Seed 004's one logit is P(healthy); the covid task's positive class is covid: the logit is negated."""
    original = seed004()
    return Original(
        save_as(original, folder / "mobilenetv2.pt", "model_state_dict"),
        ImportOptions(task="covid", channels=3, labels=("covid", "normal"), outputs="probabilities"),
        rng.integers(0, 255, (200, 240), np.uint8),
        lambda x: binary(1 - torch.sigmoid(original(x))[:, 0]),
        lambda x, _: gradcam(Negated(original), original.features, x, [0])[0],
    )


#: No PDF reports (their own tests cover them). Batches of one scan, as each task has one: the daemon
#: times eager PyTorch against ONNX Runtime on a batch of ``max_batch`` as it loads a model, which at
#: the default 16 costs DenseNet-121 at 320 px minutes on two cores. One inference thread, as this
#: process has (conftest.py's ``one_thread``): a setting for daemons on a shared machine.
DAEMON_ENV = {"MEDDAEMON_REPORTS": "false", "MEDDAEMON_MAX_BATCH": "1", "MEDDAEMON_INFERENCE_THREADS": "1"}


@dataclass(frozen=True)
class Served:
    """What the daemon stored for one seed's scan, and the model input it was given."""

    original: Original
    manifest: Manifest
    state: str
    model_input: torch.Tensor
    probabilities: dict[str, float]
    positive: dict[str, bool]
    #: label -> (method, map)
    heatmaps: dict[str, tuple[str, np.ndarray]]


def stored(session: Session, layout: Layout, original: Original, scan: Path, data: bytes, folder: str) -> Served:
    """The rows of the scan the daemon read from ``scan`` (whose bytes were ``data``)."""
    row = session.scalars(select(Scan).where(Scan.source_name == scan.relative_to(layout.inbox).as_posix())).one()
    results = session.scalars(select(Result).where(Result.scan_id == row.id)).all()
    manifest = read_manifest(folder)
    return Served(
        original,
        manifest,
        row.state,
        torch.from_numpy(to_model_input(decode_bytes(data), manifest.contract)),
        {r.label: r.probability for r in results},
        {r.label: r.positive for r in results},
        {
            r.label: (
                r.heatmap.method,
                read_map(r.heatmap.grid, (r.heatmap.height, r.heatmap.width)),
            )
            for r in results
            if r.heatmap is not None
        },
    )


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, seed003_h5: Path) -> dict[str, Served]:
    """Every seed's model imported into its task, one scan each, one ``meddaemon start --once``."""
    root = tmp_path_factory.mktemp("served")
    files = root / "seed_files"
    files.mkdir()
    rng = np.random.default_rng(13)
    originals = {
        "seed000": seed000_small_cnn(files, rng),
        "seed001": seed001_mobilenet(files, rng),
        "seed002": seed002_efficientnet(files, rng),
        "seed003": seed003_keras(seed003_h5, rng),
        "seed004": seed004_mobilenet(files, rng),
    }
    layout = Layout(root)
    db_url = f"sqlite:///{layout.db}"
    folders = import_files_into(db_url, layout.state / "models", [(o.file, o.options) for o in originals.values()])
    scans = {
        name: write_png(layout.inbox / o.options.task / f"synthetic_{name}.png", o.pixels)
        for name, o in originals.items()
    }
    dropped = {name: scan.read_bytes() for name, scan in scans.items()}  # the daemon moves them away

    farm = Daemons(layout)
    try:
        farm.run_once(timeout=240, env=DAEMON_ENV)
    finally:
        farm.cleanup()

    engine = create_db_engine(db_url)
    try:
        with session_factory(engine)() as session:
            return {
                name: stored(session, layout, o, scans[name], dropped[name], folders[o.options.task])
                for name, o in originals.items()
            }
    finally:
        engine.dispose()


SEEDS = ["seed000", "seed001", "seed002", "seed003", "seed004"]


@pytest.mark.parametrize("seed", SEEDS)
def test_the_daemon_stores_the_original_models_probabilities_for_every_seed(served: dict[str, Served], seed: str):
    s = served[seed]
    assert s.state == "inferred"  # reports off: a scan ends inferred
    stored = np.array([s.probabilities[label] for label in s.manifest.labels])
    with torch.no_grad():
        expected = s.original.probabilities(s.model_input)
    assert stored.shape == expected.shape == (len(s.manifest.labels),)
    assert float(np.abs(stored - expected).max()) <= s.original.tolerance


@pytest.mark.parametrize("seed", ["seed000", "seed001", "seed002", "seed004"])
def test_the_daemon_stores_pytorch_grad_cams_map_on_the_original(served: dict[str, Served], seed: str):
    """One map: the predicted class's (multiclass) or the positive class's (binary), whatever the call."""
    s = served[seed]
    [(label, (method, heatmap))] = s.heatmaps.items()
    if s.manifest.kind == "binary":
        assert label == s.manifest.labels[1]
    else:
        assert label == max(s.probabilities, key=s.probabilities.__getitem__)
    assert s.original.gradcam is not None
    reference = s.original.gradcam(s.model_input, label)
    assert heatmap.shape == reference.shape == (s.manifest.contract.height, s.manifest.contract.width)
    assert float(np.abs(heatmap - reference).max()) <= HEATMAP_TOLERANCE
    # seed 002's SELU after pooling: CAM is not Grad-CAM there, the gradient path is taken
    assert method == ("gradcam" if seed == "seed002" else "cam")


def test_the_keras_densenet_maps_each_finding_over_its_threshold(served: dict[str, Served]):
    """Seed 003 has no PyTorch original for pytorch-grad-cam: its maps are checked for what they are."""
    s = served["seed003"]
    positives = {label for label, positive in s.positive.items() if positive}
    assert positives and set(s.heatmaps) == positives
    assert {method for method, _ in s.heatmaps.values()} == {"cam"}
    assert all(m.shape == (320, 320) for _, m in s.heatmaps.values())


#: (architecture, channels, (height, width), normalisation, what the conversion says it did)
MANIFESTS = {
    "seed000": ("small_cnn", 1, (100, 100), "fixed", "sigmoid/softmax"),
    "seed001": ("mobilenet_v2", 1, (224, 224), "fixed", "state dict taken from 'state_dict'"),
    "seed002": ("efficientnet_v2_s_selu", 3, (384, 384), "fixed", "'module.' prefix stripped"),
    "seed003": ("densenet121", 3, (320, 320), "per_image", "HWIO->OIHW"),
    "seed004": ("mobilenet_v2", 3, (224, 224), "fixed", "negated"),
}


@pytest.mark.parametrize("seed", SEEDS)
def test_each_imported_seed_records_its_architecture_contract_and_provenance(served: dict[str, Served], seed: str):
    s = served[seed]
    architecture, channels, size, normalisation, conversion = MANIFESTS[seed]
    contract = s.manifest.contract
    assert (s.manifest.architecture, contract.channels, (contract.height, contract.width)) == (
        architecture, channels, size
    )  # fmt: skip
    assert contract.normalisation == normalisation
    assert conversion in s.manifest.provenance["conversion"]
    assert s.manifest.provenance["source_file"] == s.original.file.name
    assert s.manifest.provenance["format"] == ("keras-h5" if seed == "seed003" else "torch")
    if seed == "seed002":  # ImageNet's mean and std on RGB
        assert (contract.mean, contract.std) == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def test_an_imported_onnx_graph_in_another_label_order_is_served_by_onnx_runtime_with_cam_maps(
    make_settings, tmp_path: Path, caplog: pytest.LogCaptureFixture
):  # type: ignore[no-untyped-def]
    """A small graph whose outputs are (normal, malignant, benign), busi's labels in another order."""
    torch.manual_seed(12)
    features = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU())
    original = nn.Sequential(features, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)).eval()
    graph = tmp_path / "model.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(original, (torch.zeros(1, 1, SIZE, SIZE),), str(graph), dynamo=False,
                          input_names=["image"], output_names=["logits"], dynamic_axes={"image": {0: "n"}})  # fmt: skip
    pooled = next(n.input[0] for n in onnx.load(str(graph)).graph.node if n.op_type == "GlobalAveragePool")
    file_order = ["normal", "malignant", "benign"]
    options = ImportOptions(task="busi", image_size=SIZE, labels=tuple(file_order), cam_tensor=pooled)
    daemon = Daemon(make_settings(max_wait_ms=10, reports=False))
    daemon.prepare()
    folder = import_and_promote(daemon, graph, options)
    scan = write_png(
        daemon.settings.watch / "busi" / "synthetic_scan.png",
        np.random.default_rng(3).integers(0, 255, (50, 70), np.uint8),
    )
    model_input = torch.from_numpy(
        to_model_input(decode_bytes(scan.read_bytes()), load_version(folder).manifest.contract)
    )

    with caplog.at_level(logging.INFO, logger="meddaemon"):
        daemon.run(once=True)

    with daemon.sessions() as session:
        results = session.scalars(select(Result).order_by(Result.id)).all()
        stored = {r.label: r.probability for r in results}
        [(label, heatmap)] = [
            (r.label, read_map(r.heatmap.grid, (r.heatmap.height, r.heatmap.width))) for r in results if r.heatmap
        ]
    with torch.no_grad():
        expected = torch.softmax(original(model_input), dim=1)[0]
    for i, name in enumerate(file_order):
        assert abs(stored[name] - float(expected[i])) <= 1e-4
    assert label == file_order[int(expected.argmax())]
    with GradCAM(model=original, target_layers=[features]) as cam:
        [reference] = cam(input_tensor=model_input, targets=[ClassifierOutputTarget(file_order.index(label))])
    assert float(np.abs(heatmap - reference).max()) <= 1e-4
    assert "with onnx (ONNX Runtime, CPUExecutionProvider)" in caplog.text
