"""``medcli evaluate``: one command from a dataset as published to stored results and an audit with
confidence intervals; every dataset layout read in place and audited against its own labels;
``medcli audit --evaluation`` audits a run again; usage errors (an unknown
task or model, a device this machine lacks) exit 2 with a message that says why."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from sqlalchemy import Engine, event, select, update

from evaluate_factory import LAYOUT_CASES, listing, read_only
from meddaemon.cli.common import EXIT_USAGE
from meddaemon.cli.medcli import cli as medcli
from meddaemon.db.engine import session_factory
from meddaemon.db.models import Evaluation, Scan
from meddaemon.engine.tasks import BUILTIN_TASKS
from meddaemon.names import is_utf8
from model_factory import CONTRACT, promote_into, write_model
from permissions import held_to_file_modes, unlistable


def state_flags(world) -> list[str]:  # type: ignore[no-untyped-def]
    return ["--state-dir", str(world.settings.state_dir), "--db", world.db_url]


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_one_command_from_a_busi_dataset_to_metrics_with_confidence_intervals(world, busi_phantoms: Path) -> None:
    args = ["evaluate", str(busi_phantoms), "--task", "busi", "--workers", "1", "--audit", "--json"]
    result = CliRunner().invoke(medcli, [*args, *state_flags(world)])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["state"] == "completed" and report["scored"] == 24 and report["failed"] == 0
    # off a terminal (a log file, a CI job) the run is seen to move: no bar, a plain count (stdout the JSON alone)
    assert result.stderr.splitlines()[-1] == "24 of 24 files"
    audit = report["audit"]
    assert audit["join"]["matched"] == 24 and audit["join"]["predictions_without_label"] == 0
    assert audit["inputs"]["labels_format"] == "layout:busi" and audit["inputs"]["key"] == "sha256"
    assert [m["label"] for m in audit["labels"]] == ["benign", "malignant", "normal"]
    auc = audit["labels"][0]["auc"]
    assert auc["lower"] <= auc["value"] <= auc["upper"] and "delong" in auc["ci_method"].lower()
    assert sum(map(sum, audit["multiclass"]["confusion_matrix"])) == 24

    again = CliRunner().invoke(medcli, ["audit", "--evaluation", report["name"], "--json", *state_flags(world)])
    assert again.exit_code == 0, again.output
    audited_again = json.loads(again.stdout)
    assert audited_again["labels"] == audit["labels"]
    # each stored, each with its id, as `medcli audit` gives it (the console's /audits/ID)
    assert audited_again["audit_id"] == audit["audit_id"] + 1
    assert {k: v for k, v in audited_again.items() if k != "audit_id"} == {
        k: v for k, v in audit.items() if k != "audit_id"
    }

    shown = CliRunner().invoke(
        medcli, ["evaluate", str(busi_phantoms), "--task", "busi", "--audit", *state_flags(world)]
    )
    assert shown.exit_code == 0, shown.output
    assert f"audit {audit['audit_id'] + 2} stored" in shown.stdout


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_a_rerun_that_adds_heatmaps_says_so_and_one_that_only_hashes_gives_no_images_per_second(
    world, busi_phantoms: Path
) -> None:
    """It said "0 scored, N already scored" while it stored N maps, and a hashing rerun's images/s."""
    args = ["evaluate", str(busi_phantoms), "--task", "busi", "--workers", "0", "--name", "r", *state_flags(world)]
    files = len([p for p in busi_phantoms.rglob("*.png") if "_mask" not in p.name])
    assert "images/s" in CliRunner().invoke(medcli, args).stdout
    with_maps = CliRunner().invoke(medcli, [*args, "--heatmaps"]).stdout
    assert f"0 scored, {files} already scored ({files} given their heatmaps now)" in with_maps
    hashed = CliRunner().invoke(medcli, [*args, "--heatmaps"]).stdout
    assert f"0 scored, {files} already scored, 0 unreadable" in hashed and "images/s" not in hashed


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_auditing_an_evaluation_whose_dataset_has_moved_says_so_and_exits_2(
    world, busi_phantoms: Path, tmp_path: Path
) -> None:
    """The labels are read from the dataset again: moved, it was a DatasetError traceback, exit 1."""
    dataset = tmp_path / "Dataset_BUSI_with_GT"
    shutil.copytree(busi_phantoms, dataset)
    args = ["evaluate", str(dataset), "--task", "busi", "--workers", "1", "--name", "moved", "--json"]
    assert CliRunner().invoke(medcli, [*args, *state_flags(world)]).exit_code == 0
    dataset.rename(tmp_path / "elsewhere")
    result = CliRunner().invoke(medcli, ["audit", "--evaluation", "moved", *state_flags(world)])
    assert result.exit_code == EXIT_USAGE, result.output
    assert result.output.startswith("error: ") and str(dataset) in result.output and "Traceback" not in result.output


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_an_audit_of_an_evaluation_records_the_hash_of_the_truth_it_read_now(
    world, busi_phantoms: Path, tmp_path: Path
) -> None:
    """An image moved to another class folder: the truth changed, its recorded hash did not (it was
    the evaluation's dataset fingerprint)."""
    dataset = shutil.copytree(busi_phantoms, tmp_path / "Dataset_BUSI_with_GT")
    args = ["evaluate", str(dataset), "--task", "busi", "--workers", "1", "--name", "run1", "--json"]
    assert CliRunner().invoke(medcli, [*args, *state_flags(world)]).exit_code == 0
    audit = ["audit", "--evaluation", "run1", "--bootstrap", "0", "--json", *state_flags(world)]
    before = json.loads(CliRunner().invoke(medcli, audit).stdout)["inputs"]["labels_sha256"]
    again = json.loads(CliRunner().invoke(medcli, audit).stdout)["inputs"]["labels_sha256"]
    moved = sorted((dataset / "benign").glob("*).png"))[0]
    moved.rename(dataset / "malignant" / moved.name)
    after = json.loads(CliRunner().invoke(medcli, audit).stdout)["inputs"]["labels_sha256"]
    assert before == again != after


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_an_audit_after_the_dataset_changed_keeps_moved_images_with_their_new_label_and_names_the_rest(
    world, busi_phantoms: Path, tmp_path: Path
) -> None:
    """The truth was looked up by the names the evaluation read: images moved to another class folder
    (their truth corrected) lost their label and left the audit, as did the images added, and the
    audit said nothing (200 of 1,500 gone from a stored audit, "matched 1300 of 1300 label rows")."""
    dataset = shutil.copytree(busi_phantoms, tmp_path / "Dataset_BUSI_with_GT")
    args = ["evaluate", str(dataset), "--task", "busi", "--workers", "1", "--name", "run1", "--json"]
    assert CliRunner().invoke(medcli, [*args, *state_flags(world)]).exit_code == 0
    truth = {label: len(list((dataset / label).glob("*).png"))) for label in ("benign", "malignant", "normal")}
    for moved in sorted((dataset / "benign").glob("*).png"))[:2]:
        moved.rename(dataset / "malignant" / moved.name)
    removed = sorted((dataset / "normal").glob("*).png"))[0]
    removed.unlink()
    removed.with_name(removed.stem + "_mask.png").unlink()
    noise = np.random.default_rng(900).integers(0, 255, (48, 48), dtype=np.uint8)  # SYNTHETIC
    Image.fromarray(noise).save(dataset / "benign" / "benign (900).png")
    kept = sorted((dataset / "normal").glob("*).png"))[0]  # a copy, its original still there: added
    shutil.copyfile(kept, dataset / "malignant" / "malignant (901).png")

    result = CliRunner().invoke(
        medcli, ["audit", "--evaluation", "run1", "--bootstrap", "0", "--json", *state_flags(world)]
    )

    assert result.exit_code == 0, result.output
    audit = json.loads(result.stdout)
    images = sum(truth.values())
    assert (audit["join"]["matched"], audit["join"]["predictions_without_label"]) == (images - 1, 1)
    by_truth = [sum(row) for row in audit["multiclass"]["confusion_matrix"]]
    assert by_truth == [truth["benign"] - 2, truth["malignant"] + 2, truth["normal"] - 1]
    assert "2 labelled file(s) added to the dataset since the evaluation ran are not in it" in " ".join(audit["notes"])
    assert "1 file(s) the evaluation scored are no longer in the dataset" in " ".join(audit["notes"])
    assert audit["join"].get("conflicts", []) == []


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_a_moved_image_whose_twin_stays_is_audited_under_its_new_label_not_counted_as_added(
    world, busi_phantoms: Path, tmp_path: Path
) -> None:
    """Its bytes were still read under the twin's name, so it was taken for an image added since
    (whose advice, to evaluate again, changes nothing: the bytes are scored)."""
    dataset = shutil.copytree(busi_phantoms, tmp_path / "Dataset_BUSI_with_GT")
    twin = sorted((dataset / "benign").glob("*).png"))[0]
    shutil.copyfile(twin, dataset / "benign" / "benign (950).png")
    args = ["evaluate", str(dataset), "--task", "busi", "--workers", "1", "--name", "run1", "--json"]
    assert CliRunner().invoke(medcli, [*args, *state_flags(world)]).exit_code == 0
    (dataset / "benign" / "benign (950).png").rename(dataset / "normal" / "benign (950).png")

    result = CliRunner().invoke(
        medcli, ["audit", "--evaluation", "run1", "--bootstrap", "0", "--json", *state_flags(world)]
    )

    assert result.exit_code == 0, result.output
    audit = json.loads(result.stdout)
    assert not any("added" in note for note in audit["notes"]), audit["notes"]
    [conflict] = audit["join"]["conflicts"]  # the same bytes, labelled benign and normal: named, not guessed
    assert set(conflict["files"]) == {f"benign/{twin.name}", "normal/benign (950).png"}, conflict


HOLD_THE_EVALUATION = """
import sys, time
from meddaemon.db.engine import create_db_engine
from meddaemon.evaluate.store import one_run_at_a_time
with one_run_at_a_time(create_db_engine(sys.argv[1]), sys.argv[2]):
    print("held", flush=True)
    time.sleep(60)
"""


@pytest.mark.parametrize("db_url", ["sqlite", "postgresql"], indirect=True)
def test_an_evaluation_no_process_runs_any_more_is_called_interrupted_not_running(
    world, busi_phantoms: Path, db_url: str
) -> None:
    """A run killed (SIGKILL, a power cut) leaves its row running: its audit said "is running" for good,
    and the user waited for a run that no longer was."""
    args = ["evaluate", str(busi_phantoms), "--task", "busi", "--workers", "0", "--name", "killed", "--json"]
    assert CliRunner().invoke(medcli, [*args, *state_flags(world)]).exit_code == 0
    engine = world.engine()
    with engine.begin() as conn:  # the row as a run killed mid-way leaves it
        conn.execute(update(Evaluation).where(Evaluation.name == "killed").values(state="running"))
    engine.dispose()
    audit = ["audit", "--evaluation", "killed", *state_flags(world)]

    gone = CliRunner().invoke(medcli, audit)
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_THE_EVALUATION, db_url, "killed"], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        running = CliRunner().invoke(medcli, audit)
    finally:
        holder.kill()
        holder.wait()

    assert gone.exit_code == EXIT_USAGE and "is interrupted: no process runs it now" in gone.stderr, gone.output
    assert running.exit_code == EXIT_USAGE and "'killed' is running (" in running.stderr, running.output


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_auditing_an_evaluation_as_another_model_version_or_task_is_refused(world, busi_phantoms: Path) -> None:
    """--model-version v2 with --evaluation of v1's run audited v1, exit 0, and stored v1 as asked."""
    args = ["evaluate", str(busi_phantoms), "--task", "busi", "--workers", "1", "--name", "run1", "--json"]
    assert CliRunner().invoke(medcli, [*args, *state_flags(world)]).exit_code == 0
    for option, value, said in (("--model-version", "v2", "scored busi/v1"), ("--task", "busi_binary", "of task busi")):
        result = CliRunner().invoke(medcli, ["audit", "--evaluation", "run1", option, value, *state_flags(world)])
        assert result.exit_code == EXIT_USAGE, result.output
        assert said in result.output and "Traceback" not in result.output
    same = ["audit", "--evaluation", "run1", "--model-version", "v1", "--task", "busi", *state_flags(world)]
    assert CliRunner().invoke(medcli, same).exit_code == 0


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
@pytest.mark.parametrize("layout", LAYOUT_CASES)
def test_every_dataset_layout_is_scored_in_place_and_audited_against_its_own_labels(
    world, tmp_path: Path, layout: str
) -> None:
    """SYNTHETIC data in each layout the training adapters read, on a read-only tree: the files the
    layout names are scored, and the audit counts each label as the layout carries it."""
    case = LAYOUT_CASES[layout](tmp_path / "data")
    if case.task != "busi" or case.contract != CONTRACT:
        model = write_model(tmp_path / "layout_model", task=case.task, version="v2", contract=case.contract)
        promote_into(world.db_url, world.settings.models_dir, model)
    args = ["evaluate", str(case.path), "--task", case.task, "--workers", "0", "--audit", "--json"]
    with read_only(case.tree):
        before = listing(case.tree)
        result = CliRunner().invoke(medcli, [*args, *state_flags(world)])
        assert listing(case.tree) == before  # nothing created, removed, renamed or modified
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["dataset"]["layout"] == layout and report["failed"] == 0
    scored = scan_names(world, report["evaluation_id"])
    assert report["scored"] == len(scored) == len(case.files) and set(scored) == case.files
    audit = report["audit"]
    assert audit["inputs"]["labels_format"] == f"layout:{layout}" and audit["inputs"]["key"] == "sha256"
    assert audit["join"]["matched"] == len(case.files) and audit["join"]["predictions_without_label"] == 0
    assert label_counts(audit, case.task) == case.positives
    if case.patients is not None:
        assert audit["patients"] == case.patients


def label_counts(audit: dict, task: str) -> dict[str, int]:
    """Files per label as the audit counted them: a binary audit reports its positive label, whose
    negatives carry the task's other label."""
    counts = {m["label"]: m["positives"] for m in audit["labels"]}
    if audit["kind"] == "binary":
        [entry] = audit["labels"]
        [negative] = set(BUILTIN_TASKS[task].labels) - {entry["label"]}
        counts[negative] = entry["negatives"]
    return counts


def scan_names(world, evaluation_id: int | None = None) -> list[str]:  # type: ignore[no-untyped-def]
    """The source names of the stored scans (of one evaluation when given)."""
    query = select(Scan.source_name)
    if evaluation_id is not None:
        query = query.where(Scan.evaluation_id == evaluation_id)
    engine = world.engine()
    try:
        with session_factory(engine)() as session:
            return list(session.scalars(query).all())
    finally:
        engine.dispose()


@pytest.mark.parametrize("db_url", ["sqlite", "postgresql"], indirect=True)
def test_file_names_that_are_not_utf8_are_scored_stored_percent_escaped_and_audited(
    world, busi_phantoms: Path, tmp_path: Path
) -> None:
    """A name from a Latin-1 share cannot be stored as the system gives it (the run stopped with a
    traceback, one file of three scored): the tree is left as it is, and the name is stored with
    each such byte as %XX, the audit joining it to its folder's label."""
    data = tmp_path / "latin1_busi"
    shutil.copytree(busi_phantoms, data)
    benign = sorted((data / "benign").glob("*).png"))[:2]
    for i, image in enumerate(benign):
        image.rename(os.fsdecode(os.fsencode(image.parent) + f"/sc\xe9n {i}.png".encode("latin-1")))
    args = ["evaluate", str(data), "--task", "busi", "--workers", "0", "--audit", "--json", *state_flags(world)]
    result = CliRunner().invoke(medcli, args)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["scored"] == 24 and report["failed"] == 0 and report["audit"]["join"]["matched"] == 24
    assert {"benign/sc%E9n 0.png", "benign/sc%E9n 1.png"} <= set(scan_names(world, report["evaluation_id"]))
    assert sum(not is_utf8(p.name) for p in (data / "benign").iterdir()) == 2  # read in place, never renamed


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_a_dataset_whose_own_path_is_not_utf8_is_refused_before_anything_is_scored(
    world, busi_phantoms: Path, tmp_path: Path
) -> None:
    """Its path is stored, to read its labels again for ``medcli audit --evaluation``."""
    data = Path(os.fsdecode(os.fsencode(tmp_path) + b"/d\xe9p\xf4t"))
    shutil.copytree(busi_phantoms, data)
    result = CliRunner().invoke(medcli, ["evaluate", str(data), "--task", "busi", *state_flags(world)])
    assert result.exit_code == EXIT_USAGE
    assert "d\\xe9p\\xf4t: the dataset's path is not UTF-8" in result.stderr and "symbolic link" in result.stderr
    assert scan_names(world) == []


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_a_folder_without_labels_is_evaluated_but_its_audit_refused_before_anything_is_scored(
    world, busi_phantoms: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "unlabelled"
    folder.mkdir()
    for image in sorted(busi_phantoms.glob("benign/*).png"))[:3]:
        (folder / image.name).write_bytes(image.read_bytes())
    args = ["evaluate", str(folder), "--task", "busi", "--workers", "0", *state_flags(world)]
    audited = CliRunner().invoke(medcli, [*args, "--audit"])
    assert audited.exit_code == EXIT_USAGE
    assert "without labels" in audited.stderr and "--labels" in audited.stderr
    assert scan_names(world) == []
    plain = CliRunner().invoke(medcli, [*args, "--json"])
    assert plain.exit_code == 0, plain.output
    assert json.loads(plain.stdout)["dataset"]["layout"] == "images" and len(scan_names(world)) == 3


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_a_folder_holding_only_a_dataset_is_refused_with_the_dataset_root(
    world, busi_phantoms: Path, tmp_path: Path
) -> None:
    """Not scored as a folder of images: BUSI's masks are no inputs, and the labels are one level down."""
    dataset = tmp_path / "Downloads" / "Dataset_BUSI_with_GT"
    shutil.copytree(busi_phantoms, dataset)
    args = ["evaluate", str(dataset.parent), "--task", "busi", "--workers", "0", *state_flags(world)]
    result = CliRunner().invoke(medcli, args)
    assert result.exit_code == EXIT_USAGE, result.output
    assert f"expected the dataset root {dataset}" in result.stderr
    assert scan_names(world) == []


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_an_archive_with_a_folder_this_user_cannot_list_is_refused_before_anything_is_scored(
    world, busi_phantoms: Path, tmp_path: Path
) -> None:
    """Its images would otherwise be left out of the run's counts unseen: the folder is named."""
    archive = tmp_path / "archive"
    images = sorted(busi_phantoms.glob("benign/*).png"))[:3]
    for folder, image in zip(("2024", "2025", "2025/restricted"), images, strict=True):
        (archive / folder).mkdir(parents=True, exist_ok=True)
        (archive / folder / image.name).write_bytes(image.read_bytes())
    command = [str(Path(sys.executable).parent / "medcli"), "evaluate", str(archive), "--task", "busi"]
    with unlistable(archive / "2025" / "restricted"):
        done = subprocess.run(
            held_to_file_modes([*command, "--workers", "0", *state_flags(world)]), capture_output=True, text=True
        )
    assert done.returncode == EXIT_USAGE, done.stdout + done.stderr
    assert done.stderr.splitlines() == [
        f"error: {archive / '2025' / 'restricted'}: cannot be read (Permission denied); "
        "expected a dataset whose every folder and file this user can read"
    ]
    assert scan_names(world) == []


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_usage_errors_exit_2_with_one_line(world, busi_phantoms: Path) -> None:
    runner = CliRunner()
    unknown_task = runner.invoke(medcli, ["evaluate", str(busi_phantoms), "--task", "nope", *state_flags(world)])
    assert unknown_task.exit_code == EXIT_USAGE and "unknown task 'nope'" in unknown_task.stderr
    unknown_model = runner.invoke(
        medcli, ["evaluate", str(busi_phantoms), "--task", "busi", "--model", "v9", *state_flags(world)]
    )
    assert unknown_model.exit_code == EXIT_USAGE and "v9" in unknown_model.stderr


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_with_no_active_model_a_run_names_the_versions_there_are_and_scores_with_none(
    world, busi_phantoms: Path
) -> None:
    """The task's only version retired: the run scored the cohort with it, out of service for good,
    as the audit's fallback (the newest version with results) picked it."""
    runner = CliRunner()
    first = runner.invoke(
        medcli, ["evaluate", str(busi_phantoms), "--task", "busi", "--workers", "0", *state_flags(world)]
    )
    assert first.exit_code == 0, first.output
    retired = runner.invoke(medcli, ["models", "retire", "busi", "v1", *state_flags(world)])
    assert retired.exit_code == 0, retired.output
    scored_before = len(scan_names(world))
    extra = busi_phantoms.parent / "more"
    shutil.copytree(busi_phantoms, extra)
    (extra / "benign" / "benign (1).png").write_bytes(b"\x89PNG not the same bytes")  # a file not yet scored
    result = runner.invoke(medcli, ["evaluate", str(extra), "--task", "busi", "--workers", "0", *state_flags(world)])
    assert result.exit_code == EXIT_USAGE, result.output
    assert (
        "task 'busi' has no active model version; name one with --model VERSION (known: v1 (retired))" in result.stderr
    )
    assert len(scan_names(world)) == scored_before


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_device_cuda_without_a_gpu_is_a_usage_error_that_says_why(world, busi_phantoms: Path) -> None:
    args = ["evaluate", str(busi_phantoms), "--task", "busi", "--device", "cuda", "--workers", "0"]
    result = CliRunner().invoke(medcli, [*args, *state_flags(world)])
    assert result.exit_code == EXIT_USAGE, result.output
    assert "no CUDA device" in result.stderr and "--device cpu" in result.stderr


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
@pytest.mark.parametrize(
    ("options", "says"),
    [
        (["--require", "auc>=0.99"], "--require judges the audit: add --audit"),
        (["--audit", "--require", "auc>>0.9"], "cannot read criterion 'auc>>0.9'"),
    ],
    ids=["without-audit", "unreadable"],
)
def test_require_without_audit_or_unreadable_is_refused_before_anything_is_scored(
    world, busi_phantoms: Path, options: list[str], says: str
) -> None:
    """Without --audit the criteria were never judged (exit 0); an unreadable one was refused only
    once the whole cohort was scored."""
    args = ["evaluate", str(busi_phantoms), "--task", "busi", "--workers", "0", *options, *state_flags(world)]
    result = CliRunner().invoke(medcli, args)
    assert result.exit_code == EXIT_USAGE and says in result.stderr
    engine = world.engine()
    with session_factory(engine)() as session:
        assert session.scalars(select(Scan)).all() == []
    engine.dispose()


def busi_with_unreadable(
    source: Path, tmp_path: Path, empty: tuple[str, ...] = ("benign/benign (90).png", "benign/benign (91).png")
) -> Path:
    """The SYNTHETIC BUSI phantoms with ``empty`` PNGs added (by default two: over 5% unreadable)."""
    dataset = tmp_path / "Dataset_BUSI_with_GT"
    shutil.copytree(source, dataset)
    for name in empty:
        (dataset / name).write_bytes(b"")
    return dataset


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_a_run_stopped_for_unreadable_files_lists_them_and_json_says_stopped(
    world, busi_phantoms: Path, tmp_path: Path
) -> None:
    """It printed only "see the unreadable files (medcli evaluate ... --json)", which stopped the same
    way and printed nothing on stdout."""
    dataset = busi_with_unreadable(busi_phantoms, tmp_path)
    args = ["evaluate", str(dataset), "--task", "busi", "--workers", "0", *state_flags(world)]
    result = CliRunner().invoke(medcli, [*args, "--json"])
    assert result.exit_code == EXIT_USAGE and "cannot be read" in result.stderr
    summary = json.loads(result.stdout)
    assert summary["state"] == "stopped" and summary["audit"] is None
    # the files read when it stopped are counted last (the count before them was the last said)
    read = summary["scored"] + summary["reused"] + summary["failed"]
    assert f"{read} of {summary['files']} files\nerror: 2 of 26 images cannot be read" in result.stderr
    assert {(u["path"], u["reason"]) for u in summary["unreadable"]} == {
        ("benign/benign (90).png", "empty_file"),
        ("benign/benign (91).png", "empty_file"),
    }
    text = CliRunner().invoke(medcli, args)
    assert text.exit_code == EXIT_USAGE
    assert "unreadable benign/benign (90).png: empty_file" in text.stdout


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_an_evaluation_that_did_not_complete_is_not_audited_as_if_it_were_the_dataset(
    world, busi_phantoms: Path, tmp_path: Path
) -> None:
    """The files never scored dropped out of the join: metrics (and --require) of part of the
    dataset, exit 0, nothing said."""
    dataset = busi_with_unreadable(busi_phantoms, tmp_path)
    args = ["evaluate", str(dataset), "--task", "busi", "--workers", "0", "--json", *state_flags(world)]
    name = json.loads(CliRunner().invoke(medcli, args).stdout)["name"]

    audit = CliRunner().invoke(medcli, ["audit", "--evaluation", name, *state_flags(world)])
    assert audit.exit_code == EXIT_USAGE
    assert f"evaluation {name!r} is stopped" in audit.stderr and "part of the dataset" in audit.stderr


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_files_left_to_a_daemon_still_working_on_their_bytes_are_listed_and_keep_the_run_from_its_audit(
    world, busi_phantoms: Path
) -> None:
    """They were left out without a word: the counts did not add up to the files, and --audit judged
    the model on the rest, exit 0."""
    from meddaemon.db.engine import transaction

    image = busi_phantoms / "malignant" / "malignant (1).png"
    engine = world.engine()
    with transaction(session_factory(engine)) as session:  # a scan of the same bytes the daemon has not scored yet
        session.add(
            Scan(
                sha256=hashlib.sha256(image.read_bytes()).hexdigest(),
                state="routed",
                task_name="busi",
                source_name="busi/x.png",
            )
        )
    args = ["evaluate", str(busi_phantoms), "--task", "busi", "--workers", "0", "--name", "run1", *state_flags(world)]

    audited = CliRunner().invoke(medcli, [*args, "--audit", "--json"])
    assert audited.exit_code == EXIT_USAGE, audited.output
    report = json.loads(audited.stdout)
    assert report["scored"] == 23 and report["left_to_daemon"] == [
        {"path": "malignant/malignant (1).png", "message": "the daemon is still working on these bytes"}
    ]
    assert "1 files left to the daemon" in report["message"]
    assert "left 1 of its 24 files to the daemon" in audited.stderr and "part of the dataset" in audited.stderr

    text = CliRunner().invoke(medcli, args)
    assert "1 left to the daemon" in text.stdout
    assert "left malignant/malignant (1).png: the daemon is still working on these bytes" in text.stdout

    with transaction(session_factory(engine)) as session:  # the daemon failed it: the evaluation scores it
        session.execute(
            update(Scan).where(Scan.sha256 == hashlib.sha256(image.read_bytes()).hexdigest()).values(state="failed")
        )
    engine.dispose()
    again = CliRunner().invoke(medcli, [*args, "--audit", "--json"])
    assert again.exit_code == 0, again.output
    assert json.loads(again.stdout)["audit"]["join"]["matched"] == 24


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_a_daemon_registering_the_same_bytes_between_the_run_s_read_and_its_insert_leaves_the_file_to_it(
    world, busi_phantoms: Path
) -> None:
    """On PostgreSQL the two writers do not wait for each other: the run's insert of a scan it had
    just read as new met the daemon's, and the run stopped with a UniqueViolation traceback, exit 1,
    nothing on standard output. Its chunk is written again, and finds the daemon's scan."""
    from meddaemon.db.engine import transaction

    image = busi_phantoms / "malignant" / "malignant (1).png"
    sessions = session_factory(world.engine())
    registered: list[str] = []

    def daemon_registers_first(_conn, _cursor, statement: str, *_args) -> None:  # type: ignore[no-untyped-def]
        if statement.startswith("INSERT INTO scans") and not registered:
            registered.append(statement)
            with transaction(sessions) as session:
                sha = hashlib.sha256(image.read_bytes()).hexdigest()
                session.add(Scan(sha256=sha, state="routed", task_name="busi", source_name="busi/x.png"))

    event.listen(Engine, "before_cursor_execute", daemon_registers_first)
    try:
        args = ["evaluate", str(busi_phantoms), "--task", "busi", "--workers", "0", "--json", *state_flags(world)]
        result = CliRunner().invoke(medcli, args)
    finally:
        event.remove(Engine, "before_cursor_execute", daemon_registers_first)
    assert registered and result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["state"] == "completed" and report["scored"] == 23
    assert [f["path"] for f in report["left_to_daemon"]] == ["malignant/malignant (1).png"]


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_the_audit_of_an_evaluation_says_how_many_labelled_files_could_not_be_read(
    world, busi_phantoms: Path, tmp_path: Path
) -> None:
    """Under 5% unreadable the run completes; its audit left those images out without a word."""
    dataset = busi_with_unreadable(busi_phantoms, tmp_path, ("malignant/malignant (90).png",))
    args = ["evaluate", str(dataset), "--task", "busi", "--workers", "0", "--audit", "--json", *state_flags(world)]
    result = CliRunner().invoke(medcli, args)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["failed"] == 1 and report["audit"]["join"]["matched"] == 24
    note = "1 labelled file(s) could not be read and are left out (the evaluation lists them)"
    assert note in report["audit"]["notes"]


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_a_patch_the_idc_layout_leaves_out_is_named_with_its_reason_not_dropped_unmentioned(
    world, tmp_path: Path
) -> None:
    """A patch named ``..._class0.png`` filed under ``1/``: ``dataset inspect`` lists it as skipped,
    an evaluation left it out with ``skipped: 0`` and no word."""
    case = LAYOUT_CASES["idc"](tmp_path / "data")
    model = write_model(tmp_path / "layout_model", task=case.task, version="v2", contract=case.contract)
    promote_into(world.db_url, world.settings.models_dir, model)
    negative = next(case.path.glob("*/0/*class0.png"))
    misfiled = negative.parent.parent / "1" / negative.name
    misfiled.parent.mkdir(exist_ok=True)
    shutil.copyfile(negative, misfiled)
    args = ["evaluate", str(case.path), "--task", case.task, "--workers", "0", *state_flags(world)]

    as_json = CliRunner().invoke(medcli, [*args, "--json"])
    as_text = CliRunner().invoke(medcli, [*args, "--name", "again"])

    assert as_json.exit_code == 0, as_json.output
    report = json.loads(as_json.stdout)
    [left] = report["left_out"]
    assert left["path"] == misfiled.relative_to(case.path).as_posix() and "filed under 1/" in left["message"]
    assert report["files"] == len(case.files)
    assert "1 left out by the layout" in as_text.output and f"left out {left['path']}: " in as_text.output


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_a_stopped_run_still_names_what_the_layout_left_out(world, tmp_path: Path) -> None:
    """A run stopped for unreadable files showed its summary without the files the layout left out."""
    case = LAYOUT_CASES["idc"](tmp_path / "data")
    model = write_model(tmp_path / "layout_model", task=case.task, version="v2", contract=case.contract)
    promote_into(world.db_url, world.settings.models_dir, model)
    negative = next(case.path.glob("*/0/*class0.png"))
    misfiled = negative.parent.parent / "1" / negative.name
    shutil.copyfile(negative, misfiled)
    for i in range(len(case.files)):  # SYNTHETIC empty patches: far over the 5% a run allows
        (negative.parent.parent / "1" / f"empty_x{i}_y0_class1.png").write_bytes(b"")
    args = ["evaluate", str(case.path), "--task", case.task, "--workers", "0", "--json", *state_flags(world)]

    result = CliRunner().invoke(medcli, args)

    assert result.exit_code == EXIT_USAGE, result.output
    summary = json.loads(result.stdout)
    assert summary["state"] == "stopped"
    assert [left["path"] for left in summary["left_out"]] == [misfiled.relative_to(case.path).as_posix()]


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_a_manifest_s_repeated_row_is_read_once_and_the_run_says_so(world, busi_phantoms: Path, tmp_path: Path) -> None:
    images = sorted(busi_phantoms.glob("*/* (?).png"))
    rows = [f"{image},{image.parent.name}" for image in images]
    manifest = tmp_path / "cohort" / "labels.csv"
    manifest.parent.mkdir()
    manifest.write_text("path,label\n" + "\n".join([*rows, rows[0]]) + "\n")
    args = ["evaluate", str(manifest), "--task", "busi", "--workers", "0", *state_flags(world)]

    result = CliRunner().invoke(medcli, args)

    assert result.exit_code == 0, result.output
    assert f"{len(images)} files" in result.output
    assert (
        f"warning: labels.csv: 1 row(s) repeat an image named before (rows {len(rows) + 2}): read once" in result.output
    )


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_a_conflict_in_a_folder_layout_is_named_by_its_images(world, busi_phantoms: Path, tmp_path: Path) -> None:
    """The same bytes filed under two classes: the conflict named "lines" 1 and 13, the images' ranks
    in a listing no user sees, where a folder layout has no lines to name."""
    dataset = tmp_path / "Dataset_BUSI_with_GT"
    shutil.copytree(busi_phantoms, dataset)
    first = sorted(dataset.glob("benign/* (?).png"))[0]
    shutil.copyfile(first, dataset / "malignant" / "malignant (99).png")  # SYNTHETIC: filed twice
    args = ["evaluate", str(dataset), "--task", "busi", "--workers", "0", "--audit", "--json", *state_flags(world)]

    result = CliRunner().invoke(medcli, args)

    assert result.exit_code == 0, result.output
    [conflict] = json.loads(result.stdout)["audit"]["join"]["conflicts"]
    assert conflict["files"] == [f"benign/{first.name}", "malignant/malignant (99).png"] and conflict["lines"] == []


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_a_conflict_in_a_manifest_is_named_by_the_lines_of_the_manifest(
    world, busi_phantoms: Path, tmp_path: Path
) -> None:
    """Two files of the same bytes labelled differently: the audit named them by their rank among the
    scored files (1 and 13), where ``medcli audit --labels`` names the lines of the file (2 and 14)."""
    images = sorted(busi_phantoms.glob("*/* (?).png"))
    twin = tmp_path / "cohort" / "twin.png"  # SYNTHETIC: the first image's bytes under another name
    twin.parent.mkdir()
    shutil.copyfile(images[0], twin)
    other = next(label for label in ("benign", "malignant", "normal") if label != images[0].parent.name)
    rows = [f"{image},{image.parent.name}" for image in images] + [f"twin.png,{other}"]
    manifest = tmp_path / "cohort" / "labels.csv"
    manifest.write_text("path,label\n" + "\n".join(rows) + "\n")
    args = ["evaluate", str(manifest), "--task", "busi", "--workers", "0", "--audit", "--json", *state_flags(world)]

    result = CliRunner().invoke(medcli, args)

    assert result.exit_code == 0, result.output
    [conflict] = json.loads(result.stdout)["audit"]["join"]["conflicts"]
    assert conflict["lines"] == [2, len(rows) + 1]
