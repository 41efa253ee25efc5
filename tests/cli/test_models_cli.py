"""``medcli models``: import, list, show, promote, retire; refusals exit 1 with their reason, unknown versions 2."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from dicom_factory import write_png
from sqlalchemy import Engine, create_engine, text

from meddaemon.cli.daemon import cli as meddaemon
from meddaemon.cli.medcli import cli as medcli
from meddaemon.engine.architectures import build_model
from meddaemon.engine.registry import save_version
from meddaemon.engine.tasks import BUILTIN_TASKS

CONTRACT = {"channels": 1, "height": 32, "width": 32, "mean": [0.449], "std": [0.226], "modalities": []}


def save(folder: Path, version: str, seed: int) -> Path:
    torch.manual_seed(seed)
    save_version(
        build_model("small_cnn", 1, 3), task="busi", version=version, labels=BUILTIN_TASKS["busi"].labels,
        kind="multiclass", architecture="small_cnn", input_contract=CONTRACT, out_dir=folder,
    )  # fmt: skip
    return folder


@pytest.fixture
def run(tmp_path: Path, db_url: str, migrated_engine: Engine):  # type: ignore[no-untyped-def]
    runner = CliRunner()
    where = ["--state-dir", str(tmp_path / "state"), "--db", db_url]

    def invoke(*args: str, code: int = 0) -> Any:
        result = runner.invoke(medcli, ["models", *args, *where])
        assert result.exit_code == code, result.output
        return result

    return invoke


def as_json(result: Any) -> Any:
    return json.loads(result.stdout)


def test_import_list_show_promote_retire(run, tmp_path: Path):  # type: ignore[no-untyped-def]
    v1 = save(tmp_path / "src" / "v1", "v1", 1)
    v2 = save(tmp_path / "src" / "v2", "v2", 2)

    data = as_json(run("import", str(v1), "--json"))
    assert (data["task"], data["version"], data["status"]) == ("busi", "v1", "registered")
    assert Path(data["path"]) == (tmp_path / "state" / "models" / "busi" / "v1").resolve()
    assert (Path(data["path"]) / "model.safetensors").is_file()
    out = run("import", str(v2)).stdout
    assert "registered busi/v2" in out

    rows = as_json(run("list", "--json"))
    assert [(r["version"], r["status"]) for r in rows] == [("v1", "registered"), ("v2", "registered")]
    assert as_json(run("list", "--task", "covid", "--json")) == []
    assert "busi" in run("list").stdout

    shown = as_json(run("show", "busi", "v2", "--json"))
    assert shown["manifest"]["version"] == "v2" and shown["manifest"]["labels"] == list(BUILTIN_TASKS["busi"].labels)
    assert shown["manifest"]["sha256"] == shown["sha256"]
    assert "architecture" in run("show", "busi", "v2").stdout
    created = next(line for line in run("show", "busi", "v2").stdout.splitlines() if line.startswith("created_at"))
    assert created.endswith("+00:00"), created  # SQLite's times came without their zone

    promoted = as_json(run("promote", "busi", "v1", "--json"))
    assert promoted["status"] == "active" and promoted["promoted_at"] and promoted["previous_active"] is None
    promoted = as_json(run("promote", "busi", "v2", "--json"))
    assert promoted["status"] == "active" and promoted["previous_active"] == "v1"
    statuses = {r["version"]: r["status"] for r in as_json(run("list", "--json"))}
    assert statuses == {"v1": "registered", "v2": "active"}

    retired = as_json(run("retire", "busi", "v2", "--json"))
    assert retired["status"] == "retired" and retired["retired_at"] and retired["was_active"]
    out = run("retire", "busi", "v2").stdout  # again: nothing changes
    assert "busi/v2 is retired" in out and "no active model" not in out
    result = run("promote", "busi", "v2", code=1)
    assert "retired" in result.stderr


def test_a_refused_import_exits_1_with_its_reason(run, tmp_path: Path):  # type: ignore[no-untyped-def]
    folder = save(tmp_path / "src" / "v1", "v1", 1)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])
    result = run("import", str(folder), code=1)
    assert "refused (hash_mismatch)" in result.stderr and str(weights) in result.stderr
    assert as_json(run("list", "--json")) == []


def test_an_import_the_registry_s_disk_cannot_hold_exits_1_in_one_line_leaving_nothing(  # type: ignore[no-untyped-def]
    run, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """A full disk (ENOSPC, injected: no disk here fills on demand) was a 40-line traceback."""
    import errno
    import shutil

    folder = save(tmp_path / "src" / "v1", "v1", 1)

    def full(source: Path, target: Path) -> None:
        raise OSError(errno.ENOSPC, "No space left on device (injected)", str(target))

    monkeypatch.setattr(shutil, "copyfile", full)
    result = run("import", str(folder), code=1)
    assert result.stderr.startswith("error (io_error): cannot copy ") and "Traceback" not in result.output
    assert "No space left on device (injected)" in result.stderr and len(result.stderr.splitlines()) == 1
    monkeypatch.undo()
    assert as_json(run("list", "--json")) == []
    assert [p.name for p in (tmp_path / "state" / "models" / "busi").iterdir()] == []


def test_a_duplicate_an_unknown_version_and_an_unknown_task_are_usage_errors(run, tmp_path: Path):  # type: ignore[no-untyped-def]
    """A model file's --version taken, an unknown --task and --labels not the task's exited 1, as a
    file refused does; retrain, evaluate and audit exit 2 for them. A version folder's own manifest
    naming a version taken is the folder's refusal: exit 1."""
    folder = save(tmp_path / "src" / "v1", "v1", 1)
    run("import", str(folder))
    taken = run("import", str(folder), code=1).stderr  # the folder's own name: refused
    # it said "give the new model another version", which --version cannot do for a folder
    assert "duplicate_version" in taken and 'copy the folder, set a new "version"' in taken
    assert "--version applies to a model FILE" in run("import", str(folder), "--version", "v2", code=2).stderr
    checkpoint = tmp_path / "model.pth"
    torch.save(build_model("small_cnn", 1, 3).state_dict(), checkpoint)
    as_file = ("import", str(checkpoint), "--task", "busi", "--arch", "small_cnn", "--version", "f1")
    run(*as_file)
    assert "give it another --version" in run(*as_file, code=2).stderr
    assert "refused (unknown_task)" in run("import", str(checkpoint), "--task", "nope", code=2).stderr
    mislabelled = run("import", str(checkpoint), "--task", "busi", "--labels", "benign,malignnt,normal", code=2)
    assert "refused (task_mismatch)" in mislabelled.stderr
    damaged = tmp_path / "damaged.pth"  # the file was read first: "unreadable_weights", exit 1
    damaged.write_bytes(b"SYNTHETIC: no model")
    wrong_labels = run("import", str(damaged), "--task", "busi", "--labels", "a,b,c", code=2)
    assert "refused (task_mismatch)" in wrong_labels.stderr
    assert "unknown_version" in run("show", "busi", "nope", code=2).stderr
    assert "unknown_version" in run("promote", "busi", "nope", code=2).stderr
    assert "unknown_version" in run("retire", "busi", "nope", code=2).stderr
    assert "unknown task 'nope'" in run("list", "--task", "nope", code=2).stderr  # it said "none registered", exit 0


def test_a_file_s_version_or_threshold_no_version_can_have_is_a_usage_error_before_the_file_is_read(
    run, tmp_path: Path
):  # type: ignore[no-untyped-def]
    """They were the manifest's refusal (bad_manifest), exit 1, after the whole conversion (a --std of
    0 or a NaN --mean too, named as the manifest's "input_contract"). An image
    size of 100000 was "unreadable_weights", one of 2240 (for 224) a self-test of two minutes and
    3.4 GB; a --cam-tensor given for a file that is no ONNX graph was ignored without a word."""
    checkpoint = tmp_path / "model.pth"
    torch.save(build_model("small_cnn", 1, 3).state_dict(), checkpoint)
    as_file = ("import", str(checkpoint), "--task", "busi", "--arch", "small_cnn")
    for option, value, said in (
        ("--version", "bad name!", "must be 1-64 letters"),
        ("--version", "-dash", "not starting with '.', '_' or '-'"),
        ("--threshold", "nolabel=0.5", "not a label of task busi"),
        ("--threshold", "benign=1.5", "a probability is in [0, 1]"),
        # stored and shown beside each result, never applied: busi calls its top class
        ("--threshold", "malignant=0.3", "task busi is multiclass and calls its top class; no threshold is applied"),
        ("--image-size", "100000", "--image-size 100000: from 8 to 1024 pixels"),
        ("--image-size", "2240", "--image-size 2240: from 8 to 1024 pixels"),
        ("--cam-tensor", "features", "--cam-tensor names a tensor of an ONNX graph; model.pth is torch"),
        ("--std", "0", "--std 0.0: each value is a finite number above 0"),  # bad_manifest, exit 1, after it all
        ("--mean", "nan", "--mean nan: each value is a finite number"),
        ("--arch", "resnet99", "--arch 'resnet99' is not one of small_cnn, resnet18"),  # the file's fault, exit 1
    ):
        refused = run(*as_file, option, value, code=2)
        assert "refused (bad_option)" in refused.stderr and said in refused.stderr, (option, value)
    assert "no model versions registered" in run("list").stdout
    dense = tmp_path / "densenet.pth"  # its pooling leaves nothing of 16 pixels: called damaged, "unreadable_weights"
    torch.save(build_model("densenet121", 1, 3).state_dict(), dense)
    refused = run("import", str(dense), "--task", "busi", "--arch", "densenet121", "--image-size", "16", code=2)
    assert "refused (bad_option): --image-size 16: densenet121 cannot run at 16 x 16 pixels" in refused.stderr
    binary = tmp_path / "binary.pth"
    torch.save(build_model("small_cnn", 1, 1).state_dict(), binary)
    as_binary = ("import", str(binary), "--task", "busi_binary", "--image-size", "32", "--version", "b1")
    refused = run(*as_binary, "--threshold", "benign=0.3", code=2)
    assert "calls malignant at its threshold and benign below it; give --threshold malignant=P" in refused.stderr
    run(*as_binary, "--threshold", "malignant=0.3")
    assert as_json(run("show", "busi_binary", "b1", "--json"))["manifest"]["thresholds"]["malignant"] == 0.3


def test_a_model_file_is_converted_and_registered_with_its_provenance(run, tmp_path: Path):  # type: ignore[no-untyped-def]
    torch.manual_seed(3)
    state = build_model("small_cnn", 1, 3).state_dict()
    checkpoint = tmp_path / "best_model.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, checkpoint)

    data = as_json(
        run(
            "import", str(checkpoint), "--task", "busi", "--arch", "small_cnn", "--image-size", "48",
            "--version", "seed000", "--json",
        )
    )  # fmt: skip
    assert (data["task"], data["version"], data["architecture"]) == ("busi", "seed000", "small_cnn")
    assert data["provenance"]["source_file"] == "best_model.pth" and data["provenance"]["format"] == "torch"
    manifest = as_json(run("show", "busi", "seed000", "--json"))["manifest"]
    assert manifest["input_contract"]["height"] == 48
    assert "'module.' prefix stripped" in manifest["provenance"]["conversion"]


def test_a_model_file_needs_a_task_and_a_pickled_model_is_refused(run, tmp_path: Path):  # type: ignore[no-untyped-def]
    checkpoint = tmp_path / "whole.pt"
    torch.save(build_model("small_cnn", 1, 3), checkpoint)
    assert "--task" in run("import", str(checkpoint), code=2).output
    result = run("import", str(checkpoint), "--task", "busi", code=1)
    assert "refused (needs_code)" in result.stderr and "state_dict()" in result.stderr
    assert as_json(run("list", "--json")) == []


def test_an_onnx_model_without_a_cam_tensor_says_it_has_no_heatmaps(run, tmp_path: Path):  # type: ignore[no-untyped-def]
    torch.manual_seed(2)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4, 3)
    ).eval()
    graph = tmp_path / "tiny.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        torch.onnx.export(
            model,
            (torch.zeros(1, 1, 40, 40),),
            str(graph),
            dynamo=False,
            input_names=["x"],
            output_names=["y"],
            dynamic_axes={"x": {0: "n"}, "y": {0: "n"}},
        )

    # --arch onnx, as `models list` names such a version, is taken (a mistyped --arch is refused)
    as_onnx = ("--task", "busi", "--image-size", "40", "--version", "tiny", "--arch", "onnx")
    out = run("import", str(graph), *as_onnx).stdout
    assert "registered busi/tiny (onnx" in out and "heatmaps: none" in out
    shown = run("show", "busi", "tiny").stdout
    assert "heatmaps: none - this ONNX model exposes no feature map" in shown and "--cam-tensor" in shown
    assert "backend                    onnx (ONNX Runtime, CPUExecutionProvider)" in shown
    assert "eager" not in shown
    assert as_json(run("show", "busi", "tiny", "--json"))["backend"] == "onnx (ONNX Runtime, CPUExecutionProvider)"

    # a --cam-tensor given and found wanting: the note said to pass the flag passed, not why it failed
    args = ("--task", "busi", "--image-size", "40", "--version", "misspelt", "--cam-tensor", "conv_outptu")
    out = run("import", str(graph), *args).stdout
    why = "heatmaps: none - --cam-tensor conv_outptu gave no CAM: the graph has no tensor 'conv_outptu'"
    assert why in out and "import it with --cam-tensor" not in out
    assert why in run("show", "busi", "misspelt").stdout


def test_file_options_on_a_version_folder_are_a_usage_error(run, tmp_path: Path):  # type: ignore[no-untyped-def]
    folder = save(tmp_path / "src" / "v1", "v1", 1)
    result = run("import", str(folder), "--task", "covid", "--image-size", "64", code=2)
    assert "--task, --image-size apply to a model FILE" in result.output
    assert as_json(run("list", "--json")) == []


def test_a_state_directory_moved_elsewhere_still_serves_its_models(run, tmp_path: Path, db_url: str):  # type: ignore[no-untyped-def]
    from sqlalchemy import select

    from meddaemon.config import load_settings
    from meddaemon.daemon.service import Daemon
    from meddaemon.db.models import ModelVersion, Scan
    from model_factory import drop_scans

    run("import", str(save(tmp_path / "src" / "v1", "v1", 1)))
    run("promote", "busi", "v1")
    moved = tmp_path / "mounted" / "elsewhere"
    moved.parent.mkdir()
    (tmp_path / "state").rename(moved)  # the old path is gone: nothing can be found there any more

    listed = CliRunner().invoke(medcli, ["models", "list", "--json", "--state-dir", str(moved), "--db", db_url])
    assert [Path(r["path"]) for r in json.loads(listed.stdout)] == [moved.resolve() / "models" / "busi" / "v1"]
    settings = load_settings(
        env={}, flags={"db": db_url, "state_dir": moved, "watch": tmp_path / "inbox", "create_watch": True}
    )
    drop_scans(settings.watch)
    daemon = Daemon(settings)
    daemon.run(once=True)
    with daemon.sessions() as session:
        assert session.scalars(select(ModelVersion.path)).all() == ["models/busi/v1"]
        assert set(session.scalars(select(Scan.state))) == {"archived"}
    daemon.engine.dispose()


def test_import_offers_every_format_the_importers_read_and_no_other() -> None:
    """The command names its formats itself (importing the importers means importing torch, which
    ``medcli --help`` does not); they must stay the importers' own list."""
    from meddaemon.engine.importers import FORMATS

    command = medcli.commands["models"].commands["import"]  # type: ignore[attr-defined]
    [option] = [p for p in command.params if p.name == "fmt"]
    assert tuple(option.type.choices) == FORMATS


@pytest.mark.postgres
@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)  # SQLite runs one writer at a time
def test_two_promotions_at_once_each_name_the_version_they_demoted(tmp_path: Path, db_url: str, run):  # type: ignore[no-untyped-def]
    """v1 active, v2 and v3 promoted at once: the one that goes second demotes the first's version,
    and says so (both said "was v1", the rollback target an operator reads)."""
    for version, seed in (("v1", 1), ("v2", 2), ("v3", 3)):
        run("import", str(save(tmp_path / "src" / version, version, seed)))
    run("promote", "busi", "v1")
    where = ["--state-dir", str(tmp_path / "state"), "--db", db_url, "--json"]
    medcli_path = str(Path(sys.executable).parent / "medcli")
    holder = create_engine(db_url)
    waiting = text(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'"
    )
    with holder.connect() as held:
        held.execute(text("SELECT name FROM tasks WHERE name = 'busi' FOR UPDATE"))  # both promotions queue
        promotions = [
            subprocess.Popen(
                [medcli_path, "models", "promote", "busi", version, *where], stdout=subprocess.PIPE, text=True
            )
            for version in ("v2", "v3")
        ]
        deadline = time.monotonic() + 120
        while True:
            with holder.connect() as probe:  # pg_stat_activity is a snapshot per transaction
                if probe.execute(waiting).scalar() >= 2:
                    break
            ended = [p.communicate()[0] for p in promotions if p.poll() is not None]
            assert not ended, f"a promotion ended while the task was held: {ended}"
            assert time.monotonic() < deadline, "the two promotions never both waited for the task"
            time.sleep(0.1)
        held.rollback()
    outputs = [json.loads(p.communicate(timeout=120)[0]) for p in promotions]
    holder.dispose()

    assert [p.returncode for p in promotions] == [0, 0]
    by_version = {o["version"]: o["previous_active"] for o in outputs}
    statuses = {r["version"]: r["status"] for r in as_json(run("list", "--json"))}
    last = next(v for v, status in statuses.items() if status == "active")
    first = "v2" if last == "v3" else "v3"
    assert by_version == {first: "v1", last: first}


def knee_config(folder: Path, labels: str, kind: str) -> Path:
    config = folder / f"knee-{kind}.toml"
    config.write_text(
        f'[tasks.knee]\ndescription = "knee (SYNTHETIC)"\nlabels = {labels}\nkind = "{kind}"\n'
        'architecture = "small_cnn"\n[tasks.knee.contract]\nchannels = 1\nheight = 32\nwidth = 32\n'
    )
    return config


def test_a_version_whose_task_changed_its_labels_since_the_import_is_refused_at_promotion(
    tmp_path: Path, db_url: str, migrated_engine: Engine
):
    """A custom task's labels changed in the config after its version was imported: promote made it
    active, and the daemon stored results under labels the task no longer has."""
    torch.manual_seed(0)
    save_version(
        build_model("small_cnn", 1, 1), task="knee", version="k1", labels=["normal", "osteoarthritis"],
        kind="binary", architecture="small_cnn", input_contract=CONTRACT, out_dir=tmp_path / "k1",
    )  # fmt: skip
    where = ["--state-dir", str(tmp_path / "state"), "--db", db_url]
    imported_under = knee_config(tmp_path, '["normal", "osteoarthritis"]', "binary")
    runner = CliRunner()
    imported = runner.invoke(
        medcli, ["models", "import", str(tmp_path / "k1"), "--config", str(imported_under), *where]
    )
    assert imported.exit_code == 0, imported.output

    changed = knee_config(tmp_path, '["normal", "oa", "other"]', "multiclass")
    promoted = runner.invoke(medcli, ["models", "promote", "knee", "k1", "--config", str(changed), *where])
    assert promoted.exit_code == 1, promoted.output
    assert "task_mismatch" in promoted.output and "['normal', 'oa', 'other']" in promoted.output

    listed = runner.invoke(medcli, ["models", "list", "--task", "knee", "--json", *where])  # a task the config left
    assert listed.exit_code == 0, listed.output
    assert [(v["version"], v["status"]) for v in as_json(listed)] == [("k1", "registered")]
    unknown = runner.invoke(medcli, ["models", "list", "--task", "nothing", *where])
    assert unknown.exit_code == 2 and "unknown task 'nothing'" in unknown.output

    # promoted while the labels were the task's, then changed: the daemon refuses it, and says so
    again = runner.invoke(medcli, ["models", "promote", "knee", "k1", "--config", str(imported_under), *where])
    assert again.exit_code == 0, again.output
    write_png(tmp_path / "inbox" / "knee" / "synthetic_0.png", np.full((32, 32), 7, np.uint8))
    once = ["start", "--once", "--json", "--stable-seconds", "0", "--workers", "0", "--watch", str(tmp_path / "inbox")]
    started = runner.invoke(meddaemon, [*once, "--config", str(changed), *where])
    assert started.exit_code == 1, started.output
    assert json.loads(started.stdout)["refused_models"] == ["knee/k1"]
    assert "refusing model knee/k1: task_mismatch" in started.stderr
    assert "error: the active models knee/k1 were refused" in started.stderr
    [row] = as_json(runner.invoke(medcli, ["models", "list", "--json", "--config", str(changed), *where]))
    assert row["status"] == "active" and row["refusal"].startswith("task_mismatch: knee/k1 has binary labels")

    # the config set back (a restart, or the next --once): the version is served, its refusal cleared
    served = runner.invoke(meddaemon, [*once, "--config", str(imported_under), *where])
    assert served.exit_code == 0, served.output
    assert json.loads(served.stdout)["inferred"] == 1 and "the refusal cleared" in served.stderr
    [row] = as_json(runner.invoke(medcli, ["models", "list", "--json", "--config", str(imported_under), *where]))
    assert row["refusal"] is None
