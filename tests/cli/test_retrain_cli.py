"""``medcli retrain``: trains on SYNTHETIC BUSI phantoms and registers a version that
``medcli models list`` shows; bad data exits 2 with a clear message; without --data it says where
the dataset is published; a flagged model is not promoted unless --force; the commands it prints
can be run as printed; Ctrl-C says how to resume; a --version name already taken exits 2 before
training."""

from __future__ import annotations

import json
import os
import pty
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner

from meddaemon.cli.common import EXIT_USAGE
from meddaemon.cli.medcli import cli as medcli
from meddaemon.engine.tasks import BUILTIN_TASKS
from meddaemon.training.datasets import load_dataset
from meddaemon.training.figures import FIGURES
from meddaemon.training.phantoms import write_phantoms
from meddaemon.training.pipeline import one_run_in
from meddaemon.training.splits import SplitConfig, load_split, make_split
from meddaemon.training.train import checkpoint_epoch

#: on these phantoms (count 12, size 48, seed 5) two or three epochs give a model that calls 'benign'
#: for every validation image: flagged COLLAPSE
FAST = ["--arch", "small_cnn", "--image-size", "32", "--epochs", "2", "--batch-size", "16", "--lr", "1e-3"]


def upgraded(state_dir: Path) -> list[str]:
    """``--state-dir`` of a database made by ``medcli db upgrade``: retrain never creates one."""
    result = CliRunner().invoke(medcli, ["db", "upgrade", "--state-dir", str(state_dir)])
    assert result.exit_code == 0, result.output
    return ["--state-dir", str(state_dir)]


@pytest.fixture(scope="module")
def busi(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_phantoms("busi", tmp_path_factory.mktemp("data") / "busi", count=12, size=48, seed=5).root


def test_retrain_registers_a_version_that_models_list_shows(busi: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    state = upgraded(tmp_path / "state")
    result = runner.invoke(medcli, ["retrain", "busi", "--data", str(busi), *state, *FAST, "--version", "c1", "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["registered"]["status"] == "registered"
    assert summary["input_contract"]["height"] == 32
    assert (tmp_path / "state" / "training" / "busi" / "versions" / "c1" / "MODEL_CARD.md").is_file()
    registered = tmp_path / "state" / "models" / "busi" / "c1"
    assert (registered / "model.safetensors").is_file()
    assert {p.name for p in registered.iterdir()} >= {"MODEL_CARD.md", *FIGURES}  # the card came along

    listed = runner.invoke(medcli, ["models", "list", "--json", *state])
    assert listed.exit_code == 0, listed.output
    assert [(r["task"], r["version"], r["status"]) for r in json.loads(listed.stdout)] == [("busi", "c1", "registered")]
    taken = runner.invoke(medcli, ["retrain", "busi", "--data", str(busi), *state, *FAST, "--version", "c1"])
    assert taken.exit_code == EXIT_USAGE, taken.output
    assert "version 'c1' of busi is already registered; choose another --version" in taken.output
    assert "epoch" not in taken.output  # refused before training, not after it

    again = runner.invoke(
        medcli,
        ["retrain", "busi", "--data", str(busi), *state, *FAST, "--epochs", "3", "--resume", "--promote", "--force"],
    )
    assert again.exit_code == 0, again.output
    assert "resumed from" in again.output and "active" in again.output
    rows = json.loads(runner.invoke(medcli, ["models", "list", "--json", *state]).stdout)
    assert [r["status"] for r in rows] == ["registered", "active"]


def test_a_dataset_whose_file_names_are_not_utf8_is_trained_on_and_registered(tmp_path: Path) -> None:
    """Names from a Latin-1 share: the run used to train, then fail with an encoding error."""
    data = write_phantoms("busi", tmp_path / "data" / "busi", count=12, size=48, seed=5).root
    for image in sorted((data / "benign").glob("*).png"))[:2]:
        latin1 = os.fsencode(image.parent) + b"/sc\xe9n " + os.fsencode(image.name)
        image.rename(os.fsdecode(latin1))
        image.with_name(image.stem + "_mask.png").rename(os.fsdecode(latin1.replace(b").png", b")_mask.png")))
    state = upgraded(tmp_path / "state")
    result = CliRunner().invoke(medcli, ["retrain", "busi", "--data", str(data), *state, *FAST, "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["registered"]["status"] == "registered"
    split = load_split(tmp_path / "state" / "training" / "busi")
    latin1 = [name for name in split.assignments if "\udce9" in name]  # the name's byte, as Python holds it
    assert len(latin1) == 2 and all(os.fsencode(name).startswith(b"benign/sc\xe9n ") for name in latin1)


def test_a_dataset_in_a_folder_whose_name_is_not_utf8_is_trained_on_and_registered(busi: Path, tmp_path: Path) -> None:
    """The model card named the --data path: written as UTF-8 after the whole training, it failed
    ("surrogates not allowed"), exit 1, and every --resume failed the same way."""
    import shutil

    data = Path(os.fsdecode(os.fsencode(tmp_path) + b"/caf\xe9 data")) / "busi"
    shutil.copytree(busi, data)
    state = upgraded(tmp_path / "state")
    result = CliRunner().invoke(medcli, ["retrain", "busi", "--data", str(data), *state, *FAST, "--version", "u1"])
    assert result.exit_code == 0, result.output
    card = (tmp_path / "state" / "models" / "busi" / "u1" / "MODEL_CARD.md").read_text(encoding="utf-8")
    assert "caf\\xe9 data/busi" in card


def test_a_name_that_is_not_utf8_reaches_stderr_as_its_bytes_so_a_printed_command_runs(tmp_path: Path) -> None:
    """stdout wrote such a name as its bytes, stderr (where the commands to run next go: the
    --resume after Ctrl-C) as the six characters \\udce9: the command printed named no folder."""
    import subprocess

    empty = os.fsencode(tmp_path) + b"/caf\xe9"
    os.mkdir(empty)  # a folder holding no dataset: the message names it
    state = upgraded(tmp_path / "state")
    result = subprocess.run(
        [*_medcli("retrain", "busi", *state), "--data", empty],
        capture_output=True,
        timeout=120,
    )
    assert result.returncode == EXIT_USAGE, result.stderr
    assert empty in result.stderr and b"\\udce9" not in result.stderr


def test_a_message_the_terminal_s_encoding_cannot_hold_is_written_escaped_not_lost(tmp_path: Path) -> None:
    """On a Latin-1 terminal a folder named in Chinese was a UnicodeEncodeError and "lost
    sys.stderr", exit 1: the message never reached the user."""
    import subprocess

    folder = tmp_path / "数据"
    folder.mkdir()
    state = upgraded(tmp_path / "state")
    result = subprocess.run(
        [*_medcli("retrain", "busi", *state), "--data", str(folder)],
        capture_output=True,
        timeout=120,
        env={**os.environ, "PYTHONIOENCODING": "latin-1"},
    )
    assert result.returncode == EXIT_USAGE, result.stderr
    assert b"error: bad dataset: " in result.stderr and b"\\u6570\\u636e" in result.stderr


def test_dropping_more_than_five_percent_is_warned_about_on_stderr_before_training(busi: Path, tmp_path: Path) -> None:
    """These phantoms file one lesion under two classes, as BUSI does: 2 of their 36 images are dropped."""
    result = CliRunner().invoke(
        medcli, ["retrain", "busi", "--data", str(busi), *upgraded(tmp_path / "state"), *FAST, "--workers", "2"]
    )

    assert result.exit_code == 0, result.output
    assert "WARNING: 2 of 36 images (5.6%) are dropped, more than 5%: 2 near-duplicates labelled differently" in (
        result.stderr
    )
    assert "WARNING" not in result.stdout
    assert "dropped: 2; 2 near-duplicates labelled differently" in result.stdout
    assert result.stdout.index("dropped: 2") < result.stdout.index("epoch 1")
    [saved] = load_split(tmp_path / "state" / "training" / "busi").report.warnings
    assert f"WARNING: {saved}\n" in result.stderr and saved.endswith("listed in the split report")


def test_the_split_trained_on_is_the_one_an_image_by_image_read_gives(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Decoding each image once, in worker processes, changes nothing: the same images, the same
    split as checking the images first and hashing them one at a time; and no warning under 5%."""
    from meddaemon.training import nearduplicates

    monkeypatch.setattr(nearduplicates, "MIN_IMAGES_PER_WORKER", 8)  # two workers for these 60 images
    data = write_phantoms("busi", tmp_path / "busi", count=20, size=48, seed=5).root
    result = CliRunner().invoke(
        medcli, ["retrain", "busi", "--data", str(data), *upgraded(tmp_path / "state"), *FAST, "--workers", "2"]
    )

    assert result.exit_code == 0, result.output
    assert "are dropped" not in result.stderr  # the model's own flags may still be warned about
    spec = BUILTIN_TASKS["busi"]
    one_by_one = make_split(load_dataset(data, spec), SplitConfig(spec.recipe.split, 0))
    trained_on = load_split(tmp_path / "state" / "training" / "busi")
    assert trained_on.assignments == one_by_one.assignments
    assert trained_on.report == one_by_one.report
    assert len(trained_on.report.dropped) == 2 and len(trained_on.assignments) == 58


def test_a_version_name_whose_folder_exists_exits_2_before_training(busi: Path, tmp_path: Path) -> None:
    state = upgraded(tmp_path / "state")
    (tmp_path / "state" / "training" / "busi" / "versions" / "old").mkdir(parents=True)
    result = CliRunner().invoke(medcli, ["retrain", "busi", "--data", str(busi), *state, *FAST, "--version", "old"])
    assert result.exit_code == EXIT_USAGE, result.output
    assert "already holds a version named 'old'; choose another --version" in result.output
    assert "epoch" not in result.output


def test_an_out_folder_inside_the_dataset_exits_2_and_leaves_the_dataset_as_it_was(busi: Path, tmp_path: Path) -> None:
    """The folder and its lock were made before the dataset was read, and read as a class of BUSI:
    "folder(s) run are not labels of task 'busi'", about a folder the command made itself."""
    import shutil

    data = tmp_path / "busi"
    shutil.copytree(busi, data)
    before = sorted(p.relative_to(data) for p in data.rglob("*"))
    state = upgraded(tmp_path / "state")
    result = CliRunner().invoke(
        medcli, ["retrain", "busi", "--data", str(data), *state, *FAST, "--out", str(data / "run")]
    )
    assert result.exit_code == EXIT_USAGE, result.output
    assert f"--out {data / 'run'} is inside the dataset {data}" in result.output
    assert "epoch" not in result.output
    assert sorted(p.relative_to(data) for p in data.rglob("*")) == before
    hidden = ["--out", str(data / ".runs" / "busi")]  # never read as the dataset's: trained in
    trained = CliRunner().invoke(
        medcli, ["retrain", "busi", "--data", str(data), *state, *FAST, "--epochs", "1", *hidden]
    )
    assert trained.exit_code == 0, trained.output


def test_an_out_folder_is_refused_wherever_the_layout_may_read_images_and_only_there(tmp_path: Path) -> None:
    """COVID's layout reads its optional normal/ folder: a run's figures made there were read as
    normal X-rays by the next retrain. NIH's images are those its table names: a folder in it is not."""
    from meddaemon.training.pipeline import WorkdirRefused

    covid = write_phantoms("covid", tmp_path / "covid", count=2, size=32).root
    with pytest.raises(WorkdirRefused, match="is inside the dataset"), one_run_in(covid / "normal" / "run", covid):
        pass
    nih = write_phantoms("chestxray14", tmp_path / "nih", count=4, size=32).root
    with one_run_in(nih / "runs", nih):
        assert (nih / "runs").is_dir()


def test_a_second_run_in_the_folder_of_one_running_is_refused_before_it_reads_the_dataset(
    busi: Path, tmp_path: Path
) -> None:
    """Two runs of a task in its default folder wrote one ``split.json`` and one checkpoint: each read
    the other's back, and a version was registered with the other run's seed, split and
    training-data fingerprint. The folder is held while a run works in it."""
    state = upgraded(tmp_path / "state")
    workdir = tmp_path / "state" / "training" / "busi"
    args = ["retrain", "busi", "--data", str(busi), *state, *FAST, "--version", "second"]
    with one_run_in(workdir):  # a run working there (this process holds the lock)
        refused = CliRunner().invoke(medcli, args)
    assert refused.exit_code == EXIT_USAGE, refused.output
    assert f"error: another medcli retrain (process {os.getpid()}) is working in {workdir}" in refused.output
    assert "epoch" not in refused.output and not (workdir / "split.json").exists()

    after = CliRunner().invoke(medcli, args)  # the run has ended: the folder is free
    assert after.exit_code == 0, after.output


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("--arch", "nosuch", "unknown architecture 'nosuch'; choose one of"),
        ("--batch-size", "0", "the batch size must be at least 1, not 0"),
        ("--lr", "-1", "the learning rate must be above 0, not -1.0"),
        ("--image-size", "0", "the image size must be at least 8 pixels, not 0"),
        ("--version", "a/b", "--version 'a/b' must be 1-64 letters, digits, '.', '_' or '-'"),
        ("--version", "../escaped", "--version '../escaped' must be 1-64 letters"),
        ("--version", "v2\n", "--version 'v2\\n' must be 1-64 letters"),
        ("--seed", "-1", "Invalid value for '--seed': -1 is not in the range 0<=x<=4294967295"),
        ("--seed", str(10**17), "Invalid value for '--seed'"),
        ("--patience", "-2", "Invalid value for '--patience': -2 is not in the range x>=1"),
        ("--device", "foo", "unknown device 'foo'; choose cpu or cuda"),
        ("--device", "meta", "the device must be cpu or cuda (cuda:N), not 'meta'"),
        ("--arch", "mobilenet_v2 --batch-size 1", "a batch size of 1 cannot train mobilenet_v2 at 32 x 32 pixels"),
        pytest.param(
            "--device",
            "cuda",
            "no CUDA device is available here; use --device cpu",
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is available here"),
        ),
    ],
)
def test_an_option_no_training_can_run_with_exits_2_before_the_dataset_is_read(
    busi: Path, tmp_path: Path, option: str, value: str, message: str
) -> None:
    """An unknown --arch was a KeyError traceback, exit 1, once every image had been decoded and
    hashed (an hour, on ChestX-ray14); a bad --version name, exit 1 after the whole training; a
    negative seed, exit 1 once decoded, and a huge one an overflow; a negative patience stopped
    training after one epoch; a --device torch does not know, or cuda without a GPU, a traceback
    once the dataset was read; --batch-size 1 where batch normalisation has one value per channel,
    PyTorch's "Expected more than 1 value per channel" once the images were hashed."""
    state = upgraded(tmp_path / "state")
    args = ["retrain", "busi", "--data", str(busi), *state, *FAST, option, *value.split(" ")]
    result = CliRunner().invoke(medcli, args)
    assert result.exit_code == EXIT_USAGE and message in result.output, result.output
    assert "images" not in result.output and "Traceback" not in result.output


def test_the_largest_seed_trains(busi: Path, tmp_path: Path) -> None:
    """Seeds derived from it (an epoch's order, an image's augmentation) overflowed torch's 64 bits."""
    state = upgraded(tmp_path / "state")
    args = ["retrain", "busi", "--data", str(busi), *state, *FAST, "--epochs", "1", "--seed", str(2**32 - 1), "--json"]
    result = CliRunner().invoke(medcli, args)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["registered"]["status"] == "registered"


def test_an_image_the_model_cannot_take_is_skipped_and_listed_before_training_not_met_mid_epoch(tmp_path: Path) -> None:
    """A colour image in a grey task (an ultrasound screenshot with yellow calipers) and one whose side
    is under the 32-pixel minimum decode, so the dataset check let them through; the first batch
    holding one stopped the training with a contract_mismatch traceback, exit 1."""
    import shutil

    import numpy as np
    from PIL import Image

    data = tmp_path / "busi"
    shutil.copytree(write_phantoms("busi", tmp_path / "phantoms", count=24, size=48, seed=5).root, data)
    screenshot = np.asarray(Image.open(next((data / "benign").glob("*).png"))).convert("RGB")).copy()
    screenshot[4:14, 4:14] = (255, 220, 0)  # SYNTHETIC caliper mark
    Image.fromarray(screenshot).save(data / "benign" / "benign (900).png")
    Image.fromarray(np.full((20, 48), 128, np.uint8)).save(data / "malignant" / "malignant (900).png")
    Image.fromarray(np.zeros((48, 48), np.uint8)).save(data / "normal" / "normal (999)_mask.png")
    state = upgraded(tmp_path / "state")
    result = CliRunner().invoke(medcli, ["retrain", "busi", "--data", str(data), *state, *FAST, "--json"])
    assert result.exit_code == 0, result.output
    # the dataset's own warnings reach the user too (only the split's did)
    assert "WARNING: normal/: mask(s) normal (999)_mask.png without an image normal (999).png" in result.stderr
    split = load_split(tmp_path / "state" / "training" / "busi" / "split.json")
    dropped = {d.path: d.reason for d in split.report.dropped}
    assert "contract_mismatch: a colour image" in dropped["benign/benign (900).png"]
    assert "smaller than the 32-pixel minimum" in dropped["malignant/malignant (900).png"]


def test_bad_data_exits_2_with_a_message(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    state = upgraded(tmp_path / "s")
    result = CliRunner().invoke(medcli, ["retrain", "busi", "--data", str(tmp_path / "empty"), *state, *FAST])
    assert result.exit_code == 2, result.output
    assert "bad dataset" in result.output and "matches no dataset layout" in result.output


def test_a_class_whose_every_image_is_unreadable_exits_2_naming_it_before_training(tmp_path: Path) -> None:
    """The classes were checked as the layout was read, before any image was decoded: a class
    whose images were all skipped later (under the 5 % of unreadable images a dataset may hold) was
    trained without, and the model calling it for everything was registered and promoted."""
    data = write_phantoms("busi", tmp_path / "busi", count=12, size=48, seed=5).root
    malignant = [p for p in (data / "malignant").glob("*.png") if "_mask" not in p.name]
    for extra in malignant[1:]:
        extra.unlink()
    malignant[0].write_bytes(malignant[0].read_bytes()[:60])
    state = upgraded(tmp_path / "s")
    result = CliRunner().invoke(medcli, ["retrain", "busi", "--data", str(data), *state, *FAST, "--promote"])
    assert result.exit_code == 2, result.output
    assert "class 'malignant' has no usable images: all 1 were skipped" in result.output
    assert f"malignant/{malignant[0].name}: unreadable image" in result.output
    assert not (tmp_path / "s" / "training").exists() or not any((tmp_path / "s" / "training").rglob("*.safetensors"))


def test_no_database_exits_3_before_training_and_creates_none(busi: Path, tmp_path: Path) -> None:
    typo = tmp_path / "stat"
    result = CliRunner().invoke(medcli, ["retrain", "busi", "--data", str(busi), "--state-dir", str(typo), *FAST])
    assert result.exit_code == 3, result.output
    assert f"no meddaemon database at {typo / 'meddaemon.db'}" in result.output
    assert not typo.exists()  # neither a database nor a training folder: nothing was trained


def test_help_explains_the_command() -> None:
    result = CliRunner().invoke(medcli, ["retrain", "--help"])
    assert result.exit_code == 0
    for option in ("--data", "--epochs", "--arch", "--image-size", "--resume", "--promote", "--out", "--json"):
        assert option in result.output


def trained_on_a_copy(busi: Path, tmp_path: Path) -> tuple[Path, list[str]]:
    """A copy of the phantoms, trained on for one epoch (its checkpoint kept); the copy and the
    ``--state-dir`` options."""
    import shutil

    data = tmp_path / "busi"
    shutil.copytree(busi, data)
    state = upgraded(tmp_path / "state")
    first = CliRunner().invoke(medcli, ["retrain", "busi", "--data", str(data), *state, *FAST, "--epochs", "1"])
    assert first.exit_code == 0, first.output
    return data, state


def test_resume_refuses_a_dataset_that_changed(busi: Path, tmp_path: Path) -> None:
    data, state = trained_on_a_copy(busi, tmp_path)
    runner = CliRunner()
    (data / "benign" / "benign (1).png").unlink()
    (data / "benign" / "benign (1)_mask.png").unlink()
    again = runner.invoke(medcli, ["retrain", "busi", "--data", str(data), *state, *FAST, "--resume"])
    assert again.exit_code == 1, again.output
    assert "changed since the checkpoint" in again.output


def test_resume_with_nothing_to_resume_or_other_settings_is_refused_before_the_dataset_is_read(
    busi: Path, tmp_path: Path
) -> None:
    """The checkpoint was looked at only once the whole dataset had been decoded and hashed (hours on
    ChestX-ray14), and the split written, to say there was nothing to resume."""
    data, state = trained_on_a_copy(busi, tmp_path)
    runner = CliRunner()
    empty = tmp_path / "elsewhere"
    nothing = runner.invoke(
        medcli, ["retrain", "busi", "--data", str(data), *state, *FAST, "--resume", "--out", str(empty)]
    )
    assert nothing.exit_code == 1, nothing.output
    assert f"no checkpoint to resume from in {empty}" in nothing.output
    assert "busi dataset:" not in nothing.output and not (empty / "split.json").exists()
    split = tmp_path / "state" / "training" / "busi" / "split.json"
    written = split.stat().st_mtime_ns
    other_lr = runner.invoke(
        medcli, ["retrain", "busi", "--data", str(data), *state, *FAST, "--resume", "--lr", "0.01"]
    )
    assert other_lr.exit_code == 1, other_lr.output
    assert "was made with other settings (lr); cannot resume" in other_lr.output
    assert "busi dataset:" not in other_lr.output and split.stat().st_mtime_ns == written


def same_pixels_other_bytes(png: Path) -> None:
    """Save ``png`` again with a text chunk: the image the split and the pHash see is the same."""
    from PIL import Image, PngImagePlugin

    with Image.open(png) as image:
        image.load()
        info = PngImagePlugin.PngInfo()
        info.add_text("Comment", "SYNTHETIC: saved again")
        image.save(png, pnginfo=info)


def test_resume_refuses_a_dataset_whose_bytes_changed_under_the_same_names(busi: Path, tmp_path: Path) -> None:
    """Only the sides of the split were compared: a file rewritten between the interruption and the
    --resume was trained on, half before, half after, and the fingerprint named only the new bytes."""
    data, state = trained_on_a_copy(busi, tmp_path)
    runner = CliRunner()
    other_seed = runner.invoke(
        medcli, ["retrain", "busi", "--data", str(data), *state, *FAST, "--resume", "--seed", "1"]
    )
    assert other_seed.exit_code == 1 and "was made with --seed 0, not 1; cannot resume" in other_seed.output
    same_pixels_other_bytes(data / "benign" / "benign (1).png")
    again = runner.invoke(medcli, ["retrain", "busi", "--data", str(data), *state, *FAST, "--resume"])
    assert again.exit_code == 1, again.output
    assert "changed since the checkpoint" in again.output


@pytest.mark.parametrize("how", ["rewritten", "removed"])
def test_an_image_changed_while_the_model_trains_stops_the_run_before_anything_is_registered(
    busi: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    """The fingerprint was read after training: it named bytes the model never saw, and a file
    removed meanwhile ended the run in a bare OSError (a traceback for a test image)."""
    import shutil

    from meddaemon.training import pipeline

    data = tmp_path / "busi"
    shutil.copytree(busi, data)
    victim = data / "malignant" / "malignant (2).png"
    real_train = pipeline.train

    def train_then_change(*args: object, **kwargs: object) -> object:
        result = real_train(*args, **kwargs)  # type: ignore[arg-type]
        same_pixels_other_bytes(victim) if how == "rewritten" else victim.unlink()
        return result

    monkeypatch.setattr(pipeline, "train", train_then_change)
    state = upgraded(tmp_path / "state")
    result = CliRunner().invoke(medcli, ["retrain", "busi", "--data", str(data), *state, *FAST, "--epochs", "1"])
    assert result.exit_code == EXIT_USAGE, result.output
    assert "1 image(s) changed or vanished while the model trained: malignant/malignant (2).png" in result.output
    assert "Traceback" not in result.output
    listed = CliRunner().invoke(medcli, ["models", "list", *state, "--json"])
    assert json.loads(listed.output) == [], listed.output


def test_an_image_removed_before_training_reads_it_exits_2_naming_it_and_registers_nothing(
    busi: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Images are read again at every epoch where the set is over the cache (ChestX-ray14, IDC): one
    removed after the split (a network share synced half-way) ended the run in a ScanFailure's
    traceback, exit 1, not the exit 2 of a dataset changed while the model trained."""
    import shutil

    from meddaemon.training import pipeline

    data = tmp_path / "busi"
    shutil.copytree(busi, data)
    real_train = pipeline.train
    removed: list[Path] = []

    def remove_then_train(spec: object, train_samples: list[Any], *args: object, **kwargs: object) -> object:
        removed.append(train_samples[0].path)
        removed[0].unlink()
        return real_train(spec, train_samples, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(pipeline, "train", remove_then_train)
    state = upgraded(tmp_path / "state")
    result = CliRunner().invoke(medcli, ["retrain", "busi", "--data", str(data), *state, *FAST, "--epochs", "1"])
    assert result.exit_code == EXIT_USAGE, result.output
    assert f"{removed[0]}: vanished while the model trained" in result.output
    assert "nothing was registered: train again" in result.output
    assert isinstance(result.exception, SystemExit), result.exception  # said and exited, not raised
    listed = CliRunner().invoke(medcli, ["models", "list", *state, "--json"])
    assert json.loads(listed.output) == [], listed.output


@pytest.mark.parametrize("task", sorted(BUILTIN_TASKS))
def test_without_data_it_says_where_the_dataset_is_published_and_how_to_try_phantoms(task: str, tmp_path: Path) -> None:
    result = CliRunner().invoke(medcli, ["retrain", task, "--state-dir", str(tmp_path / "s")])
    assert result.exit_code == EXIT_USAGE, result.output
    source = BUILTIN_TASKS[task].dataset
    assert source is not None
    for fact in (source.name, source.publisher, source.published, source.licence):
        assert fact in result.output
    suggested = re.search(r"medcli synth (\S+) --out DIR", result.output)
    assert suggested is not None and "SYNTHETIC" in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "s").exists()  # nothing trained, nothing created
    # the command it suggests runs, and writes the task's dataset layout (busi_binary: BUSI's);
    # it suggested `medcli synth busi_binary`, which synth refused
    phantoms = CliRunner().invoke(medcli, ["synth", suggested[1], "--out", str(tmp_path / "p"), "--count", "1"])
    assert phantoms.exit_code == 0, phantoms.output
    assert BUILTIN_TASKS[suggested[1]].dataset == source


def test_a_custom_task_without_data_says_which_layouts_are_read(tmp_path: Path) -> None:
    config = tmp_path / "meddaemon.toml"
    config.write_text(
        '[tasks.knee]\ndescription = "knee"\nlabels = ["ok", "torn"]\nkind = "binary"\n'
        'architecture = "small_cnn"\n[tasks.knee.contract]\nchannels = 1\nheight = 64\nwidth = 64\n'
    )
    result = CliRunner().invoke(medcli, ["retrain", "knee", "--config", str(config)])
    assert result.exit_code == EXIT_USAGE, result.output
    assert "custom task" in result.output and "a folder per class or a CSV manifest" in result.output
    assert "medcli synth" not in result.output  # it suggested `medcli synth knee`, which synth refused


def test_promote_refuses_a_collapsed_model_but_registers_it_unless_forced(busi: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    state = upgraded(tmp_path / "state")
    refused = runner.invoke(
        medcli, ["retrain", "busi", "--data", str(busi), *state, *FAST, "--version", "c1", "--promote", "--json"]
    )
    assert refused.exit_code == EXIT_USAGE, refused.output
    summary = json.loads(refused.stdout)
    assert any(flag.startswith("COLLAPSE") for flag in summary["flags"])  # what this dataset and recipe give
    assert summary["registered"]["status"] == "registered"
    assert summary["promotion_refused"] and summary["promotion_refused"][0].startswith("COLLAPSE")
    assert "not promoted: the model is flagged COLLAPSE" in refused.stderr
    assert f"medcli models promote busi c1 --state-dir {tmp_path / 'state'}" in refused.stderr

    forced = runner.invoke(
        medcli, ["retrain", "busi", "--data", str(busi), *state, *FAST, "--version", "c2", "--promote", "--force"]
    )
    assert forced.exit_code == 0, forced.output
    assert "WARNING: COLLAPSE" in forced.output  # still said loudly
    rows = json.loads(runner.invoke(medcli, ["models", "list", "--json", *state]).stdout)
    assert [(r["version"], r["status"]) for r in rows] == [("c1", "registered"), ("c2", "active")]


def test_the_closing_hint_can_be_run_as_printed(busi: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # the default state dir (.meddaemon) would be another, empty one
    config = tmp_path / "site.toml"
    config.write_text('state_dir = "elsewhere"\n')
    state = tmp_path / "state"
    upgraded(state)
    runner = CliRunner()
    result = runner.invoke(
        medcli,
        ["retrain", "busi", "--config", str(config), "--data", str(busi), "--state-dir", str(state), *FAST,
         "--version", "h1"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    hint = next(line for line in result.output.splitlines() if line.startswith("serve it with: "))
    argv = shlex.split(hint.removeprefix("serve it with: "))
    assert argv == ["medcli", "models", "promote", "busi", "h1", "--config", str(config), "--state-dir", str(state)]
    promoted = runner.invoke(medcli, argv[1:])
    assert promoted.exit_code == 0, promoted.output
    rows = json.loads(runner.invoke(medcli, ["models", "list", "--json", "--state-dir", str(state)]).stdout)
    assert [(r["version"], r["status"]) for r in rows] == [("h1", "active")]


def test_off_a_terminal_it_prints_a_plain_line_per_epoch_and_no_progress_bar(busi: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(medcli, ["retrain", "busi", "--data", str(busi), *upgraded(tmp_path), *FAST])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert [line.split(":")[0] for line in lines if line.startswith("epoch ")] == ["epoch 1/2", "epoch 2/2"]
    assert all("train loss" in line for line in lines if line.startswith("epoch "))  # no bar's label


def _options(argv: list[str]) -> dict[str, object]:
    """``--name value`` pairs (the last value of each); numbers compared as numbers (1e-3 == 0.001)."""

    def value(text: str) -> object:
        try:
            return float(text)
        except ValueError:
            return text

    return {name: value(text) for name, text in zip(argv[::2], argv[1::2], strict=True)}


def _medcli(*args: str) -> list[str]:
    return [sys.executable, "-m", "meddaemon.cli.medcli", *args]


def test_on_a_terminal_it_shows_a_progress_bar(busi: Path, tmp_path: Path) -> None:
    leader, follower = pty.openpty()
    process = subprocess.Popen(
        _medcli("retrain", "busi", "--data", str(busi), *upgraded(tmp_path), *FAST),
        stdin=subprocess.DEVNULL,
        stdout=follower,
        stderr=follower,
    )
    os.close(follower)
    output = b""
    while True:
        try:
            chunk = os.read(leader, 4096)
        except OSError:  # the terminal closed with the process
            break
        if not chunk:
            break
        output += chunk
    os.close(leader)
    assert process.wait(timeout=120) == 0, output.decode(errors="replace")
    text = output.decode(errors="replace")
    assert "epoch 1/2: train loss" in text  # the line per epoch
    assert "%" in text and "loss " in text.replace("train loss", "")  # the bar: percentage and running loss


def test_ctrl_c_exits_130_and_prints_the_command_that_resumes(busi: Path, tmp_path: Path) -> None:
    state = tmp_path / "state"
    upgraded(state)
    args = ["retrain", "busi", "--data", str(busi), "--state-dir", str(state), *FAST, "--epochs", "500"]
    process = subprocess.Popen(
        _medcli(*args, "--patience", "500"),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None
    deadline = time.monotonic() + 120
    for line in process.stdout:
        if line.startswith("epoch 1/500:") or time.monotonic() > deadline:
            break  # said once its checkpoint is written: a Ctrl-C just after it was told "nothing to resume"
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stdout + stderr
    assert "Traceback" not in stderr
    message = next((line for line in stderr.splitlines() if line.startswith("interrupted: ")), stderr)
    assert f"is in {state / 'training' / 'busi'}" in message
    command = shlex.split(message.split("continue with: ", 1)[1])
    assert command[:2] == ["medcli", "retrain"] and command[-1] == "--resume"
    assert command[2] == "busi"
    given = [*args[2:], "--patience", "500"]  # every option the user gave, the last value of each
    assert _options(command[3:-1]) == _options(given)

    command[command.index("--epochs") + 1] = "3"  # resume, but stop sooner
    resumed = CliRunner().invoke(medcli, command[1:])
    assert resumed.exit_code == 0, resumed.output
    assert "resumed from" in resumed.output


def _interrupt(*_: object, **__: object) -> None:
    raise KeyboardInterrupt


def test_ctrl_c_while_the_version_is_written_leaves_a_resume_that_runs(
    busi: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Interrupted between the weights and the card, the version folder was left half-written under
    its final name: the ``--resume`` printed was refused ("already holds a version named")."""
    state = upgraded(tmp_path / "state")
    args = ["retrain", "busi", "--data", str(busi), *state, *FAST, "--version", "w1"]
    with monkeypatch.context() as patched:
        patched.setattr("meddaemon.training.pipeline.write_figures", _interrupt)
        interrupted = CliRunner().invoke(medcli, args)
    assert interrupted.exit_code == 130, interrupted.output
    assert not (tmp_path / "state" / "training" / "busi" / "versions" / "w1").exists()
    command = shlex.split(interrupted.stderr.split("continue with: ", 1)[1].strip())
    resumed = CliRunner().invoke(medcli, command[1:])
    assert resumed.exit_code == 0, resumed.output
    assert {p.name for p in (tmp_path / "state" / "training" / "busi" / "versions").iterdir()} == {"w1"}
    assert (tmp_path / "state" / "models" / "busi" / "w1" / "MODEL_CARD.md").is_file()


def test_ctrl_c_while_registering_exits_130_registers_nothing_and_says_how_to_register(
    busi: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """It exited 1 with click's "Aborted!", the trained version stranded under a name taken."""
    state = upgraded(tmp_path / "state")
    args = ["retrain", "busi", "--data", str(busi), *state, *FAST, "--version", "r1"]
    with monkeypatch.context() as patched:
        patched.setattr("meddaemon.engine.registry.import_version", _interrupt)
        interrupted = CliRunner().invoke(medcli, args)
    assert interrupted.exit_code == 130, interrupted.output
    assert "nothing was registered" in interrupted.stderr
    listed = CliRunner().invoke(medcli, ["models", "list", "--json", *state])
    assert json.loads(listed.stdout) == []
    command = shlex.split(interrupted.stderr.split("register it with: ", 1)[1].strip())
    assert command[:3] == ["medcli", "models", "import"]
    imported = CliRunner().invoke(medcli, command[1:])
    assert imported.exit_code == 0, imported.output
    listed = CliRunner().invoke(medcli, ["models", "list", "--json", *state])
    assert [(r["version"], r["status"]) for r in json.loads(listed.stdout)] == [("r1", "registered")]


def test_a_database_locked_past_its_timeout_at_registration_says_how_to_register_the_trained_version(
    busi: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another process holding SQLite's write lock when the version was registered: "database busy;
    try again", exit 3, and the same command again refused the --version its folder now held."""
    import subprocess
    import sys

    from daemon_harness import SQLITE_LOCKER
    from meddaemon.training import pipeline

    state = upgraded(tmp_path / "state")
    lockers: list[subprocess.Popen[str]] = []
    real_train = pipeline.train

    def train_then_lock(*args: object, **kwargs: object) -> object:
        result = real_train(*args, **kwargs)  # type: ignore[arg-type]
        database = str(tmp_path / "state" / "meddaemon.db")
        lockers.append(
            subprocess.Popen([sys.executable, "-c", SQLITE_LOCKER, database, "60"], stdout=subprocess.PIPE, text=True)
        )
        assert lockers[0].stdout is not None and lockers[0].stdout.readline().strip() == "locked"
        return result

    monkeypatch.setattr(pipeline, "train", train_then_lock)
    monkeypatch.setenv("MEDDAEMON_DB_LOCK_TIMEOUT_SECONDS", "1")
    args = ["retrain", "busi", "--data", str(busi), *state, *FAST, "--version", "b1"]
    try:
        busy = CliRunner().invoke(medcli, args)
    finally:
        for locker in lockers:
            locker.kill()
            locker.wait()
    assert busy.exit_code == 3, busy.output
    assert "nothing was registered" in busy.stderr and "Traceback" not in busy.output
    command = shlex.split(busy.stderr.split("register it with: ", 1)[1].strip())
    assert command[:3] == ["medcli", "models", "import"]
    imported = CliRunner().invoke(medcli, command[1:])
    assert imported.exit_code == 0, imported.output
    listed = CliRunner().invoke(medcli, ["models", "list", "--json", *state])
    assert [r["version"] for r in json.loads(listed.stdout)] == ["b1"]


def test_a_database_removed_while_the_model_trained_says_how_to_register_the_trained_version(
    busi: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from meddaemon.training import pipeline

    state = upgraded(tmp_path / "state")
    real_train = pipeline.train

    def train_then_remove(*args: object, **kwargs: object) -> object:
        result = real_train(*args, **kwargs)  # type: ignore[arg-type]
        for file in (tmp_path / "state").glob("meddaemon.db*"):
            file.unlink()
        return result

    monkeypatch.setattr(pipeline, "train", train_then_remove)
    gone = CliRunner().invoke(medcli, ["retrain", "busi", "--data", str(busi), *state, *FAST, "--version", "g1"])
    assert gone.exit_code == 3, gone.output
    assert "no meddaemon database" in gone.stderr and "nothing was registered" in gone.stderr
    assert "register it with: medcli models import " in gone.stderr
    assert (tmp_path / "state" / "training" / "busi" / "versions" / "g1" / "manifest.json").is_file()


def test_ctrl_c_before_training_starts_offers_no_earlier_run_s_checkpoint(
    busi: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Stopped while it hashed its dataset, a run offered to resume the checkpoint an earlier run had
    left, and the command it printed, with this run's settings, was then refused ("made with other
    settings"); with the same settings it would have gone on with the other run."""
    state = upgraded(tmp_path / "state")
    first = CliRunner().invoke(medcli, ["retrain", "busi", "--data", str(busi), *state, *FAST, "--version", "e1"])
    assert first.exit_code == 0, first.output
    assert checkpoint_epoch(tmp_path / "state" / "training" / "busi") == 2
    with monkeypatch.context() as patched:
        patched.setattr("meddaemon.training.pipeline.split_dataset", _interrupt)
        again = CliRunner().invoke(medcli, ["retrain", "busi", "--data", str(busi), *state, *FAST, "--lr", "1e-2"])
    assert again.exit_code == 130, again.output
    assert "interrupted before the first epoch finished: nothing to resume" in again.stderr
    assert "--resume" not in again.stderr


def test_another_rank_names_an_image_of_its_shard_gone_while_it_trained(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """Under torchrun an image read by rank 1 alone was named by no rank: rank 1 exited 2 without a
    word (rank 0, which says the dataset's faults, never read it) and rank 0 died on gloo."""
    from meddaemon.cli import retrain as retrain_cli
    from meddaemon.training.train import ChangedWhileTraining

    gone = tmp_path / "benign (3).png"

    def shard_reads_a_vanished_image(*_: object) -> None:
        raise ChangedWhileTraining(gone, "vanished while the model trained (the file was deleted)", "")

    monkeypatch.setattr(retrain_cli, "_train_shard", shard_reads_a_vanished_image)
    with pytest.raises(SystemExit) as exited:
        retrain_cli._follow_rank_0(None, tmp_path, None, tmp_path, False, 1)
    assert exited.value.code == EXIT_USAGE
    assert f"bad dataset: {gone}: vanished while the model trained" in capsys.readouterr().err
