"""The model registry: versions saved, verified before use, refused with a reason, promoted one at a time."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import pickle
import shutil
import struct
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file
from sqlalchemy import Engine, select

from descriptors import out_of_descriptors
from meddaemon.db.engine import session_factory, transaction
from meddaemon.db.models import ModelVersion, Task
from meddaemon.engine import registry
from meddaemon.engine.architectures import build_model
from meddaemon.engine.registry import (
    Manifest,
    ModelRefused,
    RegistryError,
    active_versions,
    import_version,
    list_versions,
    load_version,
    probabilities,
    promote,
    retire,
    save_version,
    self_test_input,
    verify_registered_copy,
)
from meddaemon.engine.tasks import BUILTIN_TASKS, InputContract

CONTRACT = {"channels": 1, "height": 32, "width": 32, "mean": [0.449], "std": [0.226], "modalities": ["US"]}
BUSI = list(BUILTIN_TASKS["busi"].labels)
COVID = list(BUILTIN_TASKS["covid"].labels)


def save_small(out: Path, version: str = "v1", seed: int = 0, **overrides: Any) -> Manifest:
    torch.manual_seed(seed)
    fields: dict[str, Any] = {
        "task": "busi",
        "version": version,
        "labels": BUSI,
        "kind": "multiclass",
        "architecture": "small_cnn",
        "input_contract": CONTRACT,
        "thresholds": {"malignant": 0.4} if "labels" not in overrides else None,
        "training_data_fingerprint": "sha256:abc",
        "metrics": {"accuracy": 0.9},
        "preprocessing": {"resize": "letterbox"},
    }
    fields.update(overrides)
    outputs = 1 if fields["kind"] == "binary" else len(fields["labels"])
    model = build_model(fields["architecture"], fields["input_contract"]["channels"], outputs)
    return save_version(model, out_dir=out, **fields)


def edit_manifest(folder: Path, **changes: Any) -> dict[str, Any]:
    data = json.loads((folder / "manifest.json").read_text())
    data.update(changes)
    (folder / "manifest.json").write_text(json.dumps(data))
    return data


def rehash(folder: Path) -> None:
    """Make the manifest's SHA-256 agree with whatever model.safetensors now holds."""
    edit_manifest(folder, sha256=hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest())


def refusal(folder: Path) -> ModelRefused:
    with pytest.raises(ModelRefused) as info:
        load_version(folder)
    return info.value


def tensor_offset(path: Path, name: str) -> int:
    """Byte offset in the file of the first element of tensor ``name`` (safetensors layout)."""
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    return 8 + n + header[name]["data_offsets"][0]


@pytest.fixture
def v1(tmp_path: Path) -> Path:
    folder = tmp_path / "src" / "v1"
    save_small(folder)
    return folder


# ------------------------------------------------------------------------------------------ saving and loading


def test_round_trip_gives_identical_outputs(tmp_path: Path):
    torch.manual_seed(1)
    model = build_model("small_cnn", 1, 3).eval()
    with torch.no_grad():  # move BatchNorm statistics away from their defaults
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 1.5)
    manifest = save_version(
        model, task="busi", version="v1", labels=BUSI, kind="multiclass", architecture="small_cnn",
        input_contract=InputContract.from_dict(CONTRACT), out_dir=tmp_path / "v1",
    )  # fmt: skip
    assert sorted(p.name for p in (tmp_path / "v1").iterdir()) == ["manifest.json", "model.safetensors"]
    assert manifest.sha256 == hashlib.sha256((tmp_path / "v1" / "model.safetensors").read_bytes()).hexdigest()
    assert manifest.thresholds == {label: 0.5 for label in BUSI}
    assert manifest.code_version == registry.__version__ and manifest.created.endswith("+00:00")

    loaded = load_version(tmp_path / "v1")
    assert loaded.manifest == manifest == Manifest.from_json(manifest.to_json())
    assert not loaded.model.training
    x = torch.randn(4, 1, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), loaded.model(x))
    for key, value in model.state_dict().items():
        assert torch.equal(value, loaded.model.state_dict()[key])


def test_the_self_test_is_stored_and_checked(v1: Path):
    manifest = load_version(v1).manifest
    st = manifest.self_test
    assert st["seed"] == 0 and st["batch"] == 2 and st["atol"] == 1e-4
    model = load_version(v1).model
    with torch.no_grad():
        expected = probabilities(model(self_test_input(CONTRACT, st["seed"], st["batch"])), "multiclass")
    assert torch.allclose(torch.tensor(st["expected_probabilities"]), expected, atol=1e-6)

    wrong = [[row[0] + 0.01, row[1] - 0.01, *row[2:]] for row in st["expected_probabilities"]]
    edit_manifest(v1, self_test={**st, "expected_probabilities": wrong})
    refused = refusal(v1)
    assert refused.reason == "self_test_failed"
    assert "model.safetensors" in refused.message and "self-test" in refused.message


def test_self_test_input_is_deterministic_and_normalised():
    a = self_test_input(CONTRACT, seed=7, batch=3)
    assert a.shape == (3, 1, 32, 32) and a.dtype == torch.float32
    assert torch.equal(a, self_test_input(InputContract.from_dict(CONTRACT), 7, 3))
    assert not torch.equal(a, self_test_input(CONTRACT, 8, 3))
    pixels = a * 0.226 + 0.449  # back to [0, 1]
    assert pixels.min() >= 0 and pixels.max() <= 1


def test_probabilities_per_kind():
    logits = torch.tensor([[0.0, 1.0, -1.0]])
    assert torch.allclose(probabilities(logits, "multiclass").sum(1), torch.ones(1))
    assert torch.allclose(probabilities(logits, "multilabel"), torch.sigmoid(logits))
    binary = probabilities(torch.tensor([[0.0], [2.0]]), "binary")
    p = torch.sigmoid(torch.tensor(2.0))
    assert binary.shape == (2, 2) and torch.allclose(binary[1], torch.stack([1 - p, p]))
    with pytest.raises(ValueError):
        probabilities(torch.zeros(1, 2), "binary")


def test_binary_and_multilabel_versions_load(tmp_path: Path):
    manifest = save_small(tmp_path / "b", task="covid", labels=COVID, kind="binary", thresholds={"covid": 0.3})
    assert len(manifest.self_test["expected_probabilities"][0]) == 2
    loaded = load_version(tmp_path / "b")
    assert loaded.model(torch.zeros(1, 1, 32, 32)).shape == (1, 1)
    labels = list(BUILTIN_TASKS["chestxray14"].labels)
    save_small(tmp_path / "m", task="chestxray14", labels=labels, kind="multilabel", thresholds={})
    assert load_version(tmp_path / "m").manifest.num_outputs == 14


def test_save_refuses_a_model_that_does_not_fit_its_manifest(tmp_path: Path):
    with pytest.raises(ValueError, match="do not fit resnet18"):
        save_version(
            build_model("small_cnn", 1, 3), task="busi", version="v1", labels=BUSI, kind="multiclass",
            architecture="resnet18", input_contract=CONTRACT, out_dir=tmp_path / "x",
        )  # fmt: skip
    with pytest.raises(ValueError, match="'kind'"):
        save_small(tmp_path / "y", kind="regression")
    model = build_model("small_cnn", 1, 3)
    with torch.no_grad():
        model.head.linear.bias.fill_(float("nan"))
    with pytest.raises(ValueError, match="NaN"):
        save_version(
            model, task="busi", version="v1", labels=BUSI, kind="multiclass", architecture="small_cnn",
            input_contract=CONTRACT, out_dir=tmp_path / "z",
        )  # fmt: skip
    assert not (tmp_path / "x").exists() and not (tmp_path / "z" / "model.safetensors").exists()
    save_small(tmp_path / "w")
    with pytest.raises(FileExistsError):
        save_small(tmp_path / "w")
    save_small(tmp_path / "w", overwrite=True)


# ------------------------------------------------------------------------------------------ refusals


def test_truncated_weights_are_refused(v1: Path):
    weights = v1 / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    refused = refusal(v1)
    assert refused.reason == "hash_mismatch" and str(weights) in refused.message
    rehash(v1)  # even when the manifest is made to agree, the file does not parse
    refused = refusal(v1)
    assert refused.reason == "unreadable_weights" and str(weights) in refused.message


LOAD_AND_MEASURE = """
import resource, sys
from meddaemon.engine.registry import ModelRefused, load_version
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    load_version(sys.argv[1])
except ModelRefused as refused:
    print(refused.reason, (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)
"""


def test_weights_swapped_for_a_huge_file_are_refused_without_reading_it_into_memory(v1: Path):
    """The file was read whole, then hashed: a 3 GB file in its place took 4 GB of the daemon's memory
    (a MemoryError, which the daemon took for passing trouble and tried again, for ever)."""
    import subprocess
    import sys

    weights = v1 / "model.safetensors"
    with weights.open("r+b") as file:
        file.truncate(1 << 30)  # sparse: a gigabyte of zeros that takes no disk
    measured = subprocess.run(
        [sys.executable, "-c", LOAD_AND_MEASURE, str(v1)], capture_output=True, text=True, timeout=300
    )
    assert measured.returncode == 0, measured.stderr[-2000:]
    reason, grown_mb = measured.stdout.split()
    assert reason == "hash_mismatch"
    assert int(grown_mb) < 256, f"{grown_mb} MB more to refuse a 1 GB file"


def test_a_flipped_bit_is_refused_even_when_the_hash_is_updated(v1: Path):
    weights = v1 / "model.safetensors"
    data = bytearray(weights.read_bytes())
    # the exponent of head.linear.bias[0] (little-endian float32: byte 3 holds sign and exponent)
    data[tensor_offset(weights, "head.linear.bias") + 3] ^= 0x40
    weights.write_bytes(bytes(data))
    assert refusal(v1).reason == "hash_mismatch"
    rehash(v1)
    refused = refusal(v1)
    assert refused.reason == "self_test_failed" and str(weights) in refused.message


def test_a_flipped_bit_in_the_header_fails_parsing(v1: Path):
    weights = v1 / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[8 + 2] ^= 0x01  # inside the JSON header
    weights.write_bytes(bytes(data))
    rehash(v1)
    assert refusal(v1).reason in ("unreadable_weights", "wrong_architecture")


def test_weights_of_another_architecture_are_refused(tmp_path: Path):
    folder = tmp_path / "r18"
    save_small(folder, task="covid", labels=COVID, kind="binary", architecture="resnet18")
    assert load_version(folder).manifest.architecture == "resnet18"
    edit_manifest(folder, architecture="mobilenet_v2")  # same weights file, so the hash still agrees
    refused = refusal(folder)
    assert refused.reason == "wrong_architecture"
    assert "mobilenet_v2" in refused.message and "missing key" in refused.message
    assert "model.safetensors" in refused.message


def test_weights_of_another_shape_are_refused(v1: Path):
    edit_manifest(v1, input_contract={**CONTRACT, "channels": 3, "mean": [0.5] * 3, "std": [0.2] * 3})
    refused = refusal(v1)
    assert refused.reason == "wrong_architecture" and "shape mismatch" in refused.message


@pytest.mark.parametrize("field", ["sha256", "labels", "architecture", "input_contract", "self_test", "task"])
def test_a_manifest_missing_a_field_is_refused_naming_it(v1: Path, field: str):
    data = json.loads((v1 / "manifest.json").read_text())
    del data[field]
    (v1 / "manifest.json").write_text(json.dumps(data))
    refused = refusal(v1)
    assert refused.reason == "bad_manifest"
    assert field in refused.message and "manifest.json" in refused.message


@pytest.mark.parametrize(
    ("changes", "named"),
    [
        ({"kind": "regression"}, "kind"),
        ({"thresholds": {"malignant": 1.5}}, "thresholds"),
        ({"thresholds": {"cancer": 0.5}}, "thresholds"),
        ({"architecture": "alexnet"}, "architecture"),
        ({"version": "../../etc"}, "version"),
        ({"version": "v1\n"}, "version"),  # "$" let a final newline in: a folder no command could name
        ({"task": "busi\n"}, "task"),
        ({"backend": "tensorrt"}, "backend"),
        ({"created": "2024-01-01T00:00:00"}, "created"),
        ({"self_test": {"seed": 0, "batch": 2, "atol": 1.0, "expected_probabilities": []}}, "self_test"),
        ({"input_contract": {**CONTRACT, "mean": [0.4, 0.5]}}, "input_contract"),
        ({"surprise": 1}, "surprise"),
    ],
)
def test_an_invalid_manifest_field_is_refused_naming_it(v1: Path, changes: dict[str, Any], named: str):
    edit_manifest(v1, **changes)
    refused = refusal(v1)
    assert refused.reason == "bad_manifest" and named in refused.message


def test_a_manifest_that_is_not_json_is_refused(v1: Path):
    (v1 / "manifest.json").write_text("{not json")
    assert refusal(v1).reason == "bad_manifest"


def test_missing_files_are_refused(tmp_path: Path, v1: Path):
    assert refusal(tmp_path / "nowhere").reason == "missing_file"
    (v1 / "manifest.json").unlink()
    refused = refusal(v1)
    assert refused.reason == "missing_file" and "manifest.json" in refused.message
    (v1 / "model.safetensors").unlink()
    assert refusal(v1).reason == "missing_file"


@pytest.mark.parametrize("name", ["manifest.json", "model.safetensors"])
@pytest.mark.parametrize("stand_in", ["/dev/zero", "a fifo"])
def test_a_device_or_fifo_in_place_of_a_version_s_file_is_refused_unread(v1: Path, name: str, stand_in: str):
    """A link to /dev/zero was read until memory ran out, a FIFO for ever: the daemon's one loading
    thread hung with it, and no other task's model loaded."""
    (v1 / name).unlink()
    if stand_in == "/dev/zero":
        (v1 / name).symlink_to("/dev/zero")
    else:
        os.mkfifo(v1 / name)
    done: list[registry.ModelRefused] = []
    reader = threading.Thread(target=lambda: done.append(refusal(v1)), daemon=True)
    reader.start()
    reader.join(10)
    assert done, "the load did not end"
    assert done[0].reason == "missing_file" and "not a regular file" in done[0].message


@pytest.mark.parametrize("name", ["manifest.json", "model.safetensors"])
def test_a_folder_in_place_of_a_version_s_file_is_refused_and_holds_no_descriptor(v1: Path, name: str):
    """Opened before it was found a folder, its descriptor was never closed: one lost at every load."""
    (v1 / name).unlink()
    (v1 / name).mkdir()
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(20):
        refused = refusal(v1)
    assert refused.reason == "missing_file" and "not a regular file (a folder)" in refused.message
    assert len(os.listdir("/proc/self/fd")) == before


@pytest.mark.parametrize("reading", ["the manifest", "the weights"])
def test_a_version_unread_while_the_process_is_out_of_descriptors_is_not_refused_for_good(v1: Path, reading: str):
    """Out of file descriptors, the daemon refused a good version as ``missing_file`` and never tried
    it again until restarted; the host's trouble is an error its loader tries again later."""
    manifest = registry.read_manifest(v1)
    with pytest.raises(OSError) as raised, out_of_descriptors(os.getpid()):
        if reading == "the manifest":
            registry.read_manifest(v1)
        else:
            registry.read_verified_weights(v1, manifest)
    assert raised.value.errno == errno.EMFILE


class MarkerPayload:
    """Unpickling this creates ``path``: proof that code ran."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (open, (str(self.path), "w"))


@pytest.fixture
def no_unpickling(monkeypatch: pytest.MonkeyPatch) -> None:
    def forbidden(*_a: Any, **_k: Any) -> None:
        raise AssertionError("something tried to unpickle")

    monkeypatch.setattr(torch, "load", forbidden)
    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)
    monkeypatch.setattr(pickle, "Unpickler", forbidden)


def test_the_marker_payload_is_live(tmp_path: Path):
    """The control for the two tests below: unpickling the payload does create its marker."""
    probe = tmp_path / "probe-marker"
    pickle.loads(pickle.dumps(MarkerPayload(probe)))
    assert probe.exists()


def test_a_pickle_named_model_safetensors_is_refused_and_never_unpickled(tmp_path: Path, v1: Path, no_unpickling: None):
    marker = tmp_path / "pwned"
    (v1 / "model.safetensors").write_bytes(pickle.dumps({"state_dict": MarkerPayload(marker)}))
    assert refusal(v1).reason == "hash_mismatch"
    rehash(v1)
    refused = refusal(v1)
    assert refused.reason == "unreadable_weights" and "model.safetensors" in refused.message
    assert not marker.exists()


def test_pickled_checkpoints_and_single_files_are_unsupported(tmp_path: Path, no_unpickling: None):
    marker = tmp_path / "pwned"
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "model.pt").write_bytes(pickle.dumps(MarkerPayload(marker)))
    refused = refusal(folder)
    assert refused.reason == "unsupported_format" and "model.pt" in refused.message
    refused = refusal(folder / "model.pt")
    assert refused.reason == "unsupported_format"
    assert not marker.exists()


def test_non_finite_outputs_are_refused(v1: Path):
    weights = v1 / "model.safetensors"
    model = load_version(v1).model
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    state["head.linear.bias"] = torch.full_like(state["head.linear.bias"], float("nan"))
    save_file(state, str(weights))
    rehash(v1)
    refused = refusal(v1)
    assert refused.reason == "non_finite_output" and str(weights) in refused.message


# ------------------------------------------------------------------------------------------ the database


@pytest.fixture
def factory(migrated_engine: Engine):  # type: ignore[no-untyped-def]
    return session_factory(migrated_engine)


def broken_versions(root: Path) -> dict[str, Path]:
    """One folder per refusal reason, each a damaged copy of a good version."""
    good = root / "good"
    save_small(good, version="bad")
    out: dict[str, Path] = {}

    def copy(name: str) -> Path:
        folder = root / name
        shutil.copytree(good, folder)
        out[name] = folder
        return folder

    f = copy("hash_mismatch")
    (f / "model.safetensors").write_bytes((f / "model.safetensors").read_bytes()[:-100])
    f = copy("unreadable_weights")
    (f / "model.safetensors").write_bytes(pickle.dumps({"w": [1, 2, 3]}))
    rehash(f)
    f = copy("bad_manifest")
    data = json.loads((f / "manifest.json").read_text())
    del data["labels"]
    (f / "manifest.json").write_text(json.dumps(data))
    f = copy("wrong_architecture")
    edit_manifest(f, architecture="resnet18")
    f = copy("self_test_failed")
    weights = f / "model.safetensors"
    data_ = bytearray(weights.read_bytes())
    data_[tensor_offset(weights, "head.linear.bias") + 3] ^= 0x40
    weights.write_bytes(bytes(data_))
    rehash(f)
    f = copy("missing_file")
    (f / "model.safetensors").unlink()
    return out


def test_a_refused_model_is_never_registered(factory, tmp_path: Path):  # type: ignore[no-untyped-def]
    root = tmp_path / "registry"
    for reason, folder in broken_versions(tmp_path / "broken").items():
        with pytest.raises(ModelRefused) as info, transaction(factory) as session:
            import_version(session, folder, root)
        assert info.value.reason == reason, info.value
    with factory() as session:
        assert list_versions(session) == []
    assert not (root / "busi" / "bad").exists()


KILLED_MID_COPY = """
import os, shutil, signal, sys
from pathlib import Path
from meddaemon.db.engine import create_db_engine, session_factory, transaction
from meddaemon.engine import registry

copy = shutil.copyfile

def copy_then_die(source, target, *args, **kwargs):
    copy(source, target, *args, **kwargs)
    os.kill(os.getpid(), signal.SIGKILL)  # the kernel's OOM killer, a kill -9, a power cut

shutil.copyfile = copy_then_die
with transaction(session_factory(create_db_engine(sys.argv[1]))) as session:
    registry.import_version(session, Path(sys.argv[2]), Path(sys.argv[3]))
"""


def test_an_import_killed_mid_copy_leaves_nothing_the_next_import_does_not_remove(factory, db_url, tmp_path: Path):  # type: ignore[no-untyped-def]
    """Its staging folder (a whole copy of the weights) was named like no temporary a sweep knows:
    each import killed while copying left one in the registry for good."""
    root = tmp_path / "registry"
    for version, seed in (("v1", 1), ("v2", 2)):
        save_small(tmp_path / "src" / version, version=version, seed=seed)
    killed = subprocess.run(
        [sys.executable, "-c", KILLED_MID_COPY, db_url, str(tmp_path / "src" / "v1"), str(root)],
        capture_output=True,
        timeout=120,
    )
    assert killed.returncode == -9, killed.stderr
    assert [p.name for p in (root / "busi").iterdir()] != []  # the killed copy is there

    with transaction(factory) as session:
        import_version(session, tmp_path / "src" / "v2", root)

    assert sorted(p.name for p in (root / "busi").iterdir()) == ["v2"]
    with factory() as session:
        assert [r.version for r in list_versions(session, "busi")] == ["v2"]


def test_an_import_replaces_a_folder_of_its_own_uncommitted_import_never_another_database_s_model(
    factory, tmp_path: Path
):  # type: ignore[no-untyped-def]
    """The registry folder is the state directory's, not the database's: an import into another
    database (a staging one, SQLite beside PostgreSQL) took a version folder no row of it had for one
    left by an import that never committed, deleted it, and the database that served it refused it."""
    root = tmp_path / "registry"
    save_small(tmp_path / "served", version="v1", seed=1)
    save_small(tmp_path / "other", version="v1", seed=2)
    shutil.copytree(tmp_path / "served", root / "busi" / "v1")  # registered by another database
    served = (root / "busi" / "v1" / "model.safetensors").read_bytes()

    shutil.copytree(tmp_path / "served", tmp_path / "retuned")  # the same weights, other thresholds
    manifest = json.loads((tmp_path / "retuned" / "manifest.json").read_text())
    manifest["thresholds"] = dict.fromkeys(manifest["thresholds"], 0.9)
    (tmp_path / "retuned" / "manifest.json").write_text(json.dumps(manifest))
    for other in ("other", "retuned"):
        with pytest.raises(RegistryError) as refused, transaction(factory) as session:
            import_version(session, tmp_path / other, root)
        assert refused.value.reason == "duplicate_version"
        assert "holds another version" in refused.value.message and "nothing was replaced" in refused.value.message
    newer = json.loads((root / "busi" / "v1" / "manifest.json").read_text())
    (root / "busi" / "v1" / "manifest.json").write_text(json.dumps({**newer, "written_by": "a newer meddaemon"}))
    with pytest.raises(RegistryError, match="holds another version"), transaction(factory) as session:
        import_version(session, tmp_path / "other", root)
    (root / "busi" / "v1" / "manifest.json").write_text(json.dumps(newer))
    assert (root / "busi" / "v1" / "model.safetensors").read_bytes() == served

    with transaction(factory) as session:  # the same model, left by an import of it that did not commit
        import_version(session, tmp_path / "served", root)
    with factory() as session:
        assert [(r.version, r.sha256) for r in list_versions(session, "busi")] == [
            ("v1", hashlib.sha256(served).hexdigest())
        ]


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)  # SQLite's BEGIN IMMEDIATE serialises them
def test_two_first_imports_of_a_task_at_once_both_register(factory, tmp_path: Path):  # type: ignore[no-untyped-def]
    """Neither saw the task's row and each inserted it: the second failed on the primary key (a
    traceback, its version lost), where a task already known serialised the two."""
    root = tmp_path / "registry"
    for version, seed in (("v1", 1), ("v2", 2)):
        save_small(tmp_path / "src" / version, version=version, seed=seed)
    second: list[BaseException | str] = []

    def import_v2() -> None:
        try:
            with transaction(factory) as session:
                second.append(import_version(session, tmp_path / "src" / "v2", root).version)
        except BaseException as exc:  # reported by the assertion below
            second.append(exc)

    with transaction(factory) as session:
        import_version(session, tmp_path / "src" / "v1", root)
        thread = threading.Thread(target=import_v2)
        thread.start()
        thread.join(3)  # it waits for this transaction's task row (or, before, failed on it at commit)
    thread.join(60)
    assert second == ["v2"]
    with factory() as session:
        assert [r.version for r in list_versions(session, "busi")] == ["v1", "v2"]


def test_import_promote_retire(factory, tmp_path: Path):  # type: ignore[no-untyped-def]
    root = tmp_path / "registry"
    for version, seed in (("v1", 1), ("v2", 2)):
        save_small(tmp_path / "src" / version, version=version, seed=seed)
        (tmp_path / "src" / version / "notes.txt").write_text("not copied")
        with transaction(factory) as session:
            row = import_version(session, tmp_path / "src" / version, root)
            assert row.status == "registered" and row.promoted_at is None
    target = root / "busi" / "v1"
    assert sorted(p.name for p in target.iterdir()) == ["manifest.json", "model.safetensors"]
    assert load_version(target).manifest.version == "v1"

    with factory() as session:
        rows = list_versions(session, "busi")
        assert [(r.version, r.status) for r in rows] == [("v1", "registered"), ("v2", "registered")]
        assert rows[0].path == str(target.resolve()) and rows[0].architecture == "small_cnn"
        assert rows[0].manifest["labels"] == BUSI and rows[0].sha256 == rows[0].manifest["sha256"]
        assert session.get(Task, "busi").description == BUILTIN_TASKS["busi"].description
        assert active_versions(session) == {} and list_versions(session, "covid") == []

    with pytest.raises(RegistryError) as info, transaction(factory) as session:
        import_version(session, tmp_path / "src" / "v1", root)
    assert info.value.reason == "duplicate_version"

    def statuses() -> dict[str, str]:
        with factory() as session:
            return {r.version: r.status for r in list_versions(session)}

    with transaction(factory) as session:
        assert promote(session, "busi", "v1").promoted_at is not None
    assert statuses() == {"v1": "active", "v2": "registered"}
    with transaction(factory) as session:
        row = promote(session, "busi", "v2")
        assert row.status == "active" and row.promoted_at is not None
    assert statuses() == {"v1": "registered", "v2": "active"}  # the previous active one goes back
    with factory() as session:
        active = active_versions(session)
        assert list(active) == ["busi"] and active["busi"].version == "v2"
        count = len(session.scalars(select(ModelVersion).where(ModelVersion.status == "active")).all())
        assert count == 1

    with transaction(factory) as session:  # roll back: promote v1 again
        promote(session, "busi", "v1")
        promote(session, "busi", "v1")  # promoting the active version again changes no status
    assert statuses() == {"v1": "active", "v2": "registered"}

    with transaction(factory) as session:
        row = retire(session, "busi", "v2")
        assert row.status == "retired" and row.retired_at is not None
    with pytest.raises(RegistryError) as info, transaction(factory) as session:
        promote(session, "busi", "v2")
    assert info.value.reason == "retired"
    with transaction(factory) as session:
        retire(session, "busi", "v1")  # the active one: the task has none now
    with factory() as session:
        assert active_versions(session) == {}
    assert statuses() == {"v1": "retired", "v2": "retired"}
    assert (root / "busi" / "v1" / "model.safetensors").exists()  # files stay for the results

    with pytest.raises(RegistryError) as info, transaction(factory) as session:
        promote(session, "busi", "v9")
    assert info.value.reason == "unknown_version"


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)  # file copying: one database is enough
def test_the_model_card_and_the_figures_it_links_are_registered_with_the_version(factory, tmp_path: Path):  # type: ignore[no-untyped-def]
    """Only the card and the PNG/JPEG files it links by a plain name, present, regular and really
    pictures, come along: not a file beside them it does not link, a path outside, a URL, a symlink."""
    import io

    from PIL import Image

    picture = io.BytesIO()
    Image.new("L", (8, 8), 128).save(picture, format="PNG")  # SYNTHETIC figure
    source = tmp_path / "src" / "v1"
    save_small(source)
    (source / "MODEL_CARD.md").write_text(
        "# busi v1 (SYNTHETIC)\n\n![training curves](curves.png)\n\n![outside](../outside.png)\n"
        "![remote](http://example.org/roc.png)\n![missing](roc.png)\n![not a picture](confusion.png)\n"
        "![a link](grid.png)\n"
    )
    (source / "curves.png").write_bytes(picture.getvalue())
    (source / "confusion.png").write_bytes(b"SYNTHETIC: not a picture")
    (source / "unlinked.png").write_bytes(picture.getvalue())
    (tmp_path / "src" / "outside.png").write_bytes(picture.getvalue())
    (source / "grid.png").symlink_to(tmp_path / "src" / "outside.png")

    with transaction(factory) as session:
        import_version(session, source, tmp_path / "registry")

    target = tmp_path / "registry" / "busi" / "v1"
    copied = sorted(p.name for p in target.iterdir())
    assert copied == ["MODEL_CARD.md", "curves.png", "manifest.json", "model.safetensors"]
    assert (target / "MODEL_CARD.md").read_bytes() == (source / "MODEL_CARD.md").read_bytes()
    assert (target / "curves.png").read_bytes() == picture.getvalue()


def test_promote_reverifies_the_registered_copy(factory, tmp_path: Path):  # type: ignore[no-untyped-def]
    root = tmp_path / "registry"
    save_small(tmp_path / "src")
    with transaction(factory) as session:
        import_version(session, tmp_path / "src", root)
    weights = root / "busi" / "v1" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1])
    with pytest.raises(ModelRefused) as info:
        verify_registered_copy(factory, "busi", "v1")
    assert info.value.reason == "hash_mismatch"
    with factory() as session:
        assert active_versions(session) == {}


def test_promote_refuses_a_registered_manifest_edited_since(factory, tmp_path: Path):  # type: ignore[no-untyped-def]
    """Its weights untouched, a threshold edited: `medcli models promote` said it was active, and the
    daemon called at the folder's threshold what the database stores at the registered one."""
    root = tmp_path / "registry"
    save_small(tmp_path / "src")
    with transaction(factory) as session:
        import_version(session, tmp_path / "src", root)
    manifest = root / "busi" / "v1" / "manifest.json"
    edited = json.loads(manifest.read_text())
    edited["thresholds"]["malignant"] = 0.9
    manifest.write_text(json.dumps(edited))
    with pytest.raises(ModelRefused) as info:
        verify_registered_copy(factory, "busi", "v1")
    assert info.value.reason == "bad_manifest" and "(thresholds differ)" in info.value.message
    with factory() as session:
        assert active_versions(session) == {}


def test_promote_verifies_the_copy_before_its_transaction_not_inside_it(factory, tmp_path: Path, monkeypatch):  # type: ignore[no-untyped-def]
    """The self-test ran inside the promotion's transaction: on SQLite its write lock was held for the
    seconds a DenseNet's self-test takes, and another writer failed past its busy timeout."""
    from meddaemon.engine import registry

    root = tmp_path / "registry"
    save_small(tmp_path / "src")
    with transaction(factory) as session:
        import_version(session, tmp_path / "src", root)
    open_transactions: list[bool] = []
    real_load = registry.load_version

    def watched(folder):  # type: ignore[no-untyped-def]
        engine = factory.kw["bind"]
        open_transactions.append(engine.pool.checkedout() > 0)
        return real_load(folder)

    monkeypatch.setattr(registry, "load_version", watched)
    verified = verify_registered_copy(factory, "busi", "v1")
    with transaction(factory) as session:
        assert promote(session, "busi", "v1", verified=verified).status == "active"
    assert open_transactions == [False]


def test_import_checks_the_task(factory, tmp_path: Path):  # type: ignore[no-untyped-def]
    save_small(tmp_path / "wrong", labels=["normal", "benign", "malignant"])
    with pytest.raises(ModelRefused) as info, transaction(factory) as session:
        import_version(session, tmp_path / "wrong", tmp_path / "registry")
    assert info.value.reason == "task_mismatch"
    save_small(tmp_path / "custom", task="thyroid", labels=["benign", "malignant"], kind="binary")
    with pytest.raises(ModelRefused) as info, transaction(factory) as session:
        import_version(session, tmp_path / "custom", tmp_path / "registry", tasks=BUILTIN_TASKS)
    assert info.value.reason == "unknown_task"
    with transaction(factory) as session:  # a task nobody configured is still accepted without a task list
        assert import_version(session, tmp_path / "custom", tmp_path / "registry").task_name == "thyroid"
    with factory() as session:
        assert session.get(Task, "thyroid") is not None
        assert [r.version for r in list_versions(session)] == ["v1"]


def test_a_manifest_written_before_resize_and_normalisation_existed_loads_unchanged(v1: Path):
    data = json.loads((v1 / "manifest.json").read_text())
    for key in ("resize", "normalisation"):
        data["input_contract"].pop(key, None)
    data.pop("provenance")
    (v1 / "manifest.json").write_text(json.dumps(data))
    loaded = load_version(v1)
    assert loaded.manifest.contract.resize == "stretch" and loaded.manifest.contract.normalisation == "fixed"
    assert loaded.manifest.provenance == {}


def test_the_same_weights_saved_in_different_processes_have_the_same_sha256(tmp_path: Path):
    """safetensors writes its metadata in the order of a Rust HashMap seeded per process: a seeded,
    deterministic training run registered the same weights under a new SHA-256 each time."""
    program = (
        "import sys, torch\n"
        "from meddaemon.engine.architectures import build_model\n"
        "from meddaemon.engine.registry import save_version\n"
        "torch.manual_seed(0)\n"
        "manifest = save_version(build_model('small_cnn', 1, 3), task='busi', version='v1',\n"
        "    labels=['benign', 'malignant', 'normal'], kind='multiclass', architecture='small_cnn',\n"
        "    input_contract={'channels': 1, 'height': 32, 'width': 32, 'mean': [0.5], 'std': [0.25],\n"
        "                    'modalities': []},\n"
        "    out_dir=sys.argv[1], training_data_fingerprint='synthetic')\n"
        "print(manifest.sha256)\n"
    )
    hashes = {
        subprocess.run(
            [sys.executable, "-c", program, str(tmp_path / f"run{i}")], capture_output=True, text=True, check=True
        ).stdout.strip()
        for i in range(4)
    }
    assert len(hashes) == 1, hashes
