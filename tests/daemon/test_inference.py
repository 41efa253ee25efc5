"""End to end: scans dropped into the inbox come out as stored results and heatmaps, with a model
the test trains nothing for but writes, imports and promotes through the real registry."""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from dicom_factory import write_dicom, write_png
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from sqlalchemy import select
from sqlalchemy.exc import OperationalError

from daemon_rows import add_scan
from meddaemon.config import load_settings
from meddaemon.daemon import bookkeeper, filing
from meddaemon.daemon.bookkeeper import HeatmapFile
from meddaemon.daemon.inference import InferenceStage, write_heatmap_files
from meddaemon.daemon.intake import IntakeContext
from meddaemon.daemon.service import Daemon
from meddaemon.daemon.serving import ModelStage
from meddaemon.db.engine import transaction
from meddaemon.db.models import Heatmap, Result, Scan, ScanEvent
from meddaemon.db.queries import tasks_without_model
from meddaemon.engine import registry
from meddaemon.engine.architectures import build_model
from meddaemon.engine.decode import decode_bytes
from meddaemon.engine.heatmap_grid import read_map
from meddaemon.engine.inference import ServedModel
from meddaemon.engine.overlay import jpeg_bytes, model_view, overlay
from meddaemon.engine.preprocess import to_model_input
from meddaemon.overlays import ViewSource, overlay_jpeg
from meddaemon.states import ScanState
from model_factory import CONTRACT, drop_scans, promote, write_model


@pytest.fixture
def daemon(make_settings, tmp_path: Path) -> Daemon:
    d = Daemon(make_settings(max_wait_ms=10, reports=False))  # reports: tests/daemon/test_reporter.py
    d.prepare()
    return d


def test_scans_get_a_result_per_label_and_a_heatmap_for_the_predicted_class(daemon: Daemon, tmp_path: Path):
    promote(daemon, write_model(tmp_path / "model"))
    drop_scans(daemon.settings.watch)

    daemon.run(once=True)

    with daemon.sessions() as session:
        scans = session.scalars(select(Scan)).all()
        assert len(scans) == 4 and {s.state for s in scans} == {"inferred"}
        for scan in scans:
            results = session.scalars(select(Result).where(Result.scan_id == scan.id)).all()
            assert [r.label for r in results] == ["benign", "malignant", "normal"]
            assert sum(r.probability for r in results) == pytest.approx(1.0, abs=1e-5)
            [top] = [r for r in results if r.positive]
            assert top.probability == max(r.probability for r in results)
            assert top.heatmap is not None and all(r.heatmap is None for r in results if not r.positive)
            grid = top.heatmap.grid
            assert top.heatmap.array_path is None  # no file per map: the row keeps it
            assert np.load(io.BytesIO(grid)).shape == (4, 4)  # the grid the model computed the map on
            assert len(grid) == 128 + 4 * 4 * 4  # a .npy of float32 cells, not the 32 x 32 map
            assert (top.heatmap.height, top.heatmap.width) == (32, 32)  # the size it is read at
            array = read_map(grid, (32, 32))
            assert array.shape == (32, 32) and array.min() >= 0 and array.max() <= 1
            assert not daemon.settings.stored_file(top.heatmap.overlay_path).exists()  # drawn on first use
            assert top.latency_ms is not None and top.latency_ms > 0


def test_stored_heatmap_is_float32_and_equals_pytorch_grad_cams_map(daemon: Daemon, tmp_path: Path):
    promote(daemon, write_model(tmp_path / "model"))
    source = write_png(
        tmp_path / "synthetic_source.png", np.random.default_rng(11).integers(0, 255, (40, 56), np.uint8)
    )
    model_input = to_model_input(decode_bytes(source.read_bytes()), CONTRACT)
    (daemon.settings.watch / "busi").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, daemon.settings.watch / "busi" / "synthetic_heat.png")

    daemon.run(once=True)

    with daemon.sessions() as session:
        [top] = session.scalars(select(Result).where(Result.positive)).all()
        stored = read_map(top.heatmap.grid, (top.heatmap.height, top.heatmap.width))
        label = top.label
    loaded = registry.load_version(daemon.settings.models_dir / "busi" / "v1")
    model = loaded.model
    with GradCAM(model=model, target_layers=[model.features[-1]]) as cam:
        [reference] = cam(
            input_tensor=torch.from_numpy(model_input),
            targets=[ClassifierOutputTarget(loaded.manifest.labels.index(label))],
        )
    assert stored.dtype == np.float32
    assert stored.shape == reference.shape == (32, 32)
    assert float(np.abs(stored - reference).max()) <= 1e-4
    assert float(reference.max() - reference.min()) > 0.5


def test_the_overlay_is_drawn_from_the_stored_map_on_first_use_as_the_inference_stage_drew_it(
    daemon: Daemon, tmp_path: Path
):
    """Issue 16: the inference stage keeps the map's grid in its row and writes no file; the first
    reader draws the overlay from the map and the stored scan, byte for byte the JPEG the inference
    stage wrote before, and keeps it."""
    promote(daemon, write_model(tmp_path / "model"))
    source = write_png(
        tmp_path / "synthetic_source.png", np.random.default_rng(12).integers(0, 255, (40, 56), np.uint8)
    )
    (daemon.settings.watch / "busi").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, daemon.settings.watch / "busi" / "synthetic_heat.png")

    daemon.run(once=True)

    with daemon.sessions() as session:
        [top] = session.scalars(select(Result).where(Result.positive)).all()
        grid = top.heatmap.grid
        overlay_path = daemon.settings.stored_file(top.heatmap.overlay_path)
        stored = daemon.settings.stored_file(session.get(Scan, top.scan_id).stored_path)
    assert not overlay_path.parent.exists()  # nothing written under heatmaps/ for the scan
    model_input = to_model_input(decode_bytes(source.read_bytes()), CONTRACT)[0]
    before = jpeg_bytes(overlay(model_view(model_input, CONTRACT), read_map(grid, (32, 32))))  # the old writer's

    assert overlay_jpeg(grid, overlay_path, ViewSource(stored=stored, contract=CONTRACT), (32, 32)) == before
    assert overlay_path.read_bytes() == before  # kept: the next reader reads it, drawing nothing
    stored.unlink()
    assert overlay_jpeg(grid, overlay_path, ViewSource(stored=stored, contract=CONTRACT), (32, 32)) == before

    # the same scan run again by the same version (a replay after a crash): its old overlay goes
    grid_array = np.load(io.BytesIO(grid))
    write_heatmap_files([HeatmapFile(0, grid, overlay_path, 32, 32, "gradcam")], [grid_array], model_input, CONTRACT)
    assert not overlay_path.exists()
    assert overlay_jpeg(grid, overlay_path, ViewSource(stored=stored, contract=CONTRACT), (32, 32)) is None


def test_waiting_scans_run_once_a_model_is_promoted(daemon: Daemon, tmp_path: Path):
    drop_scans(daemon.settings.watch)
    daemon.run(once=True)
    with daemon.sessions() as session:
        assert {s.state for s in session.scalars(select(Scan))} == {"waiting_model"}

    promote(daemon, write_model(tmp_path / "model"))
    Daemon(daemon.settings).run(once=True)

    with daemon.sessions() as session:
        assert {s.state for s in session.scalars(select(Scan))} == {"inferred"}
        assert session.scalar(select(Heatmap.id).limit(1)) is not None


@pytest.mark.parametrize("dies", ["once, under another's scan", "under this scan each time"])
def test_a_worker_that_dies_while_waiting_scans_are_prepared_costs_the_daemon_nothing(
    make_settings, tmp_path: Path, dies: str
):
    """A decoding worker killed (the OOM killer) while the inputs of stored scans were prepared again
    stopped the daemon (BrokenProcessPool out of the harvest, exit 1), its scans left routed. Each is
    now prepared again alone in a fresh worker; one under which the worker dies again fails as
    ``decoder_crashed``, as intake fails a file that kills its worker."""
    import os
    import signal

    from daemon_harness import kill_workers

    settings = make_settings(max_wait_ms=10, reports=False, workers=1)
    first = Daemon(settings)
    first.prepare()
    drop_scans(settings.watch)
    first.run(once=True)
    promote(first, write_model(tmp_path / "model"))
    with first.sessions() as session:
        victim = session.scalars(select(Scan).where(Scan.state == "waiting_model").order_by(Scan.id)).first()
    assert victim is not None

    daemon = Daemon(settings)
    submit, killed = daemon.stage.submit, []

    def submit_then_kill_the_worker(fn, *args):  # type: ignore[no-untyped-def]
        """The worker stopped before this scan's task reaches it, and killed after: a death mid-task."""
        pool = daemon.workers
        preparing_victim = fn.__name__ == "prepare_stored" and Path(args[0]) == settings.stored_file(victim.stored_path)
        if preparing_victim and (not killed or dies == "under this scan each time"):
            pid = pool.submit(os.getpid).result(60)
            os.kill(pid, signal.SIGSTOP)
            future = submit(fn, *args)
            kill_workers(pool)
            killed.append(pid)
            return future
        return submit(fn, *args)

    daemon.stage.submit = submit_then_kill_the_worker
    daemon.run(once=True)

    with daemon.sessions() as session:
        states = {s.id: (s.state, s.failure_reason) for s in session.scalars(select(Scan))}
    expected_victim = ("inferred", None) if dies.startswith("once") else ("failed", "decoder_crashed")
    assert states.pop(victim.id) == expected_victim and len(killed) == (1 if dies.startswith("once") else 2)
    assert set(states.values()) == {("inferred", None)}


def test_a_waiting_scan_whose_work_copy_changed_since_registration_fails_saying_so_and_is_kept(
    daemon: Daemon, tmp_path: Path
):
    """A writer that kept its file open past the stability window wrote on through its handle into
    the work copy: the other image was inferred under the registered SHA-256."""
    write_png(daemon.settings.watch / "busi" / "synthetic_held.png", np.full((48, 48), 40, np.uint8))
    daemon.run(once=True)
    with daemon.sessions() as session:
        [scan] = session.scalars(select(Scan)).all()
    work_copy = daemon.settings.stored_file(scan.stored_path)
    changed = write_png(tmp_path / "other.png", np.full((48, 48), 200, np.uint8)).read_bytes()  # SYNTHETIC
    with open(work_copy, "r+b") as handle:  # through the writer's handle: the same file, other bytes
        handle.truncate(0)
        handle.write(changed)

    promote(daemon, write_model(tmp_path / "model"))
    Daemon(daemon.settings).run(once=True)

    with daemon.sessions() as session:
        [after] = session.scalars(select(Scan)).all()
        assert (after.state, after.failure_reason) == ("failed", "changed_after_registration")
        assert session.scalar(select(Result.id).limit(1)) is None
    kept = daemon.settings.stored_file(after.stored_path)
    assert kept.parent.is_relative_to(daemon.settings.failed_dir)
    assert kept.read_bytes() == changed  # kept as it is


def test_a_scan_outside_the_models_contract_fails_with_contract_mismatch(daemon: Daemon, tmp_path: Path):
    promote(daemon, write_model(tmp_path / "model"))
    write_png(daemon.settings.watch / "busi" / "synthetic_tiny.png", np.zeros((16, 16), np.uint8))
    write_dicom(daemon.settings.watch / "busi" / "synthetic_ct.dcm", modality="CT", body_part="CHEST")
    daemon.run(once=True)
    with daemon.sessions() as session:
        scans = session.scalars(select(Scan)).all()
        reasons = {s.source_name: (s.state, s.failure_reason, s.task_name) for s in scans}
        events = select(ScanEvent.state).order_by(ScanEvent.id)
        steps = {s.source_name: list(session.scalars(events.where(ScanEvent.scan_id == s.id))) for s in scans}
    # routed to busi, refused by busi's contract: the task is kept, as for a scan that waited for the model
    assert reasons == {
        "busi/synthetic_tiny.png": ("failed", "contract_mismatch", "busi"),
        "busi/synthetic_ct.dcm": ("failed", "contract_mismatch", "busi"),
    }
    assert steps["busi/synthetic_tiny.png"] == ["registered", "routed", "failed"]
    assert (daemon.settings.failed_dir / "busi" / "synthetic_tiny.png.reason.json").exists()


def test_each_file_s_line_is_logged_as_its_row_is_committed_before_its_move(
    daemon: Daemon, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
):
    """A daemon killed while it moved a batch out of the inbox (a long copy to another file system)
    had logged nothing of it: the lines came after the moves, and recovery finishes them unnamed."""

    class Killed(BaseException):
        pass

    def killed_mid_move(*args: object, **kwargs: object) -> None:
        raise Killed

    monkeypatch.setattr(filing, "finish_move", killed_mid_move)
    (daemon.settings.watch / "busi").mkdir(parents=True, exist_ok=True)
    (daemon.settings.watch / "busi" / "synthetic_junk.png").write_bytes(b"SYNTHETIC, no image")
    with caplog.at_level(logging.INFO), pytest.raises(Killed):
        daemon.run(once=True)
    assert "busi/synthetic_junk.png -> failed: unrecognised_format" in caplog.text
    # the move never came: the line says where the file goes, not that it is kept there
    assert "; its file goes to " in caplog.text and "kept at" not in caplog.text


def test_a_model_damaged_after_promotion_is_refused_and_its_scans_wait(daemon: Daemon, tmp_path: Path, caplog):
    promote(daemon, write_model(tmp_path / "model"))
    stored = daemon.settings.models_dir / "busi" / "v1" / "model.safetensors"
    data = bytearray(stored.read_bytes())
    data[-1] ^= 0x01
    stored.write_bytes(bytes(data))
    drop_scans(daemon.settings.watch)

    daemon.run(once=True)

    with daemon.sessions() as session:
        assert {s.state for s in session.scalars(select(Scan))} == {"waiting_model"}
        assert session.scalar(select(Result.id).limit(1)) is None
        why = set(session.scalars(select(ScanEvent.detail).where(ScanEvent.state == "waiting_model")))
    assert "refusing model busi/v1: hash_mismatch" in caplog.text
    assert why == {"model busi/v1 could not be loaded: refused, hash_mismatch"}


def test_scans_of_a_task_without_an_active_version_wait_saying_so(daemon: Daemon):
    drop_scans(daemon.settings.watch)

    daemon.run(once=True)

    with daemon.sessions() as session:
        why = set(session.scalars(select(ScanEvent.detail).where(ScanEvent.state == "waiting_model")))
    assert why == {"no active model for task busi"}


def test_a_registered_manifest_edited_by_hand_is_refused_and_its_scans_wait(daemon: Daemon, tmp_path: Path, caplog):
    """The same weights, a threshold changed in the folder's manifest.json: the calls would follow the
    folder and the stored thresholds the registration (a 0.51 called negative at 0.50)."""
    promote(daemon, write_model(tmp_path / "model"))
    manifest = daemon.settings.models_dir / "busi" / "v1" / "manifest.json"
    edited = json.loads(manifest.read_text())
    edited["thresholds"]["malignant"] = 0.9
    manifest.write_text(json.dumps(edited))
    drop_scans(daemon.settings.watch)

    daemon.run(once=True)

    with daemon.sessions() as session:
        assert {s.state for s in session.scalars(select(Scan))} == {"waiting_model"}
        assert session.scalar(select(Result.id).limit(1)) is None
    assert "refusing model busi/v1: bad_manifest" in caplog.text and "thresholds differ" in caplog.text


def test_another_version_s_folder_swapped_in_is_refused_not_served_under_the_registered_hash(
    daemon: Daemon, tmp_path: Path, caplog
):
    """Weights and manifest of another model copied over the registered folder: each agrees with the
    other, but not with the database's row."""
    promote(daemon, write_model(tmp_path / "model"))
    torch.manual_seed(7)
    other = build_model("small_cnn", 1, 3)
    registry.save_version(
        other, task="busi", version="v1", labels=["benign", "malignant", "normal"], kind="multiclass",
        architecture="small_cnn", input_contract=CONTRACT, out_dir=tmp_path / "other",
        training_data_fingerprint="synthetic",
    )  # fmt: skip
    served_folder = daemon.settings.models_dir / "busi" / "v1"
    for name in ("model.safetensors", "manifest.json"):
        shutil.copyfile(tmp_path / "other" / name, served_folder / name)
    drop_scans(daemon.settings.watch)

    daemon.run(once=True)

    with daemon.sessions() as session:
        assert {s.state for s in session.scalars(select(Scan))} == {"waiting_model"}
    assert "refusing model busi/v1: hash_mismatch" in caplog.text


def test_multilabel_and_binary_tasks_store_every_label(daemon: Daemon, tmp_path: Path):
    promote(daemon, write_model(tmp_path / "cxr", task="chestxray14", architecture="resnet18"))
    promote(daemon, write_model(tmp_path / "covid", task="covid", architecture="mobilenet_v2"))
    rng = np.random.default_rng(3)
    write_png(daemon.settings.watch / "chestxray14" / "synthetic_cxr.png", rng.integers(0, 255, (40, 40), np.uint8))
    write_png(daemon.settings.watch / "covid" / "synthetic_cov.png", rng.integers(0, 255, (40, 40), np.uint8))
    daemon.run(once=True)
    with daemon.sessions() as session:
        by_task: dict[str, list[Result]] = {}
        for scan in session.scalars(select(Scan)):
            assert scan.state == "inferred"
            by_task[scan.task_name] = session.scalars(select(Result).where(Result.scan_id == scan.id)).all()
        assert len(by_task["chestxray14"]) == 14
        for r in by_task["chestxray14"]:
            assert r.positive == (r.probability >= r.threshold)
            assert (r.heatmap is not None) == r.positive
        normal, covid = by_task["covid"]
        assert (normal.label, covid.label) == ("normal", "covid")
        assert normal.probability + covid.probability == pytest.approx(1.0, abs=1e-6)
        assert covid.positive == (covid.probability >= 0.5) and normal.positive != covid.positive
        assert covid.heatmap is not None and normal.heatmap is None  # binary: the positive label's map


def test_a_nan_output_fails_that_scan_and_keeps_its_file(daemon: Daemon, tmp_path: Path):
    promote(daemon, write_model(tmp_path / "model"))
    daemon.stage.refresh_models()
    daemon.stage.wait_for_loads()
    with torch.no_grad():
        daemon.stage.served["busi"].model.head.linear.bias.fill_(float("nan"))
    daemon.stage.served["busi"].onnx = None  # the poisoned eager model is the one that runs
    write_png(daemon.settings.watch / "busi" / "synthetic_nan.png", np.full((40, 40), 9, np.uint8))
    daemon.run(once=True)
    with daemon.sessions() as session:
        [scan] = session.scalars(select(Scan)).all()
        assert (scan.state, scan.failure_reason) == ("failed", "non_finite_output")
        assert session.scalar(select(Result.id).limit(1)) is None
    assert (daemon.settings.failed_dir / "busi" / "synthetic_nan.png").exists()


def test_scans_whose_heatmaps_cannot_be_written_stay_routed_and_run_again(make_settings, tmp_path: Path, caplog):
    """A full or broken disk under heatmaps/: no result row without its files (with reports on, the
    model's view and the overlays), the scans wait."""
    settings = make_settings(max_wait_ms=10, rescan_seconds=0.2, reports=True)
    daemon = Daemon(settings)
    daemon.prepare()
    promote(daemon, write_model(tmp_path / "model"))
    settings.heatmaps_dir.parent.mkdir(parents=True, exist_ok=True)
    settings.heatmaps_dir.write_bytes(b"a file where the heatmaps folder should be")  # every write fails
    drop_scans(settings.watch)

    daemon.run(once=True)

    with daemon.sessions() as session:
        assert {s.state for s in session.scalars(select(Scan))} == {"routed"}
        assert session.scalar(select(Result.id).limit(1)) is None
    assert "could not write its heatmap files" in caplog.text and "stays routed" in caplog.text

    settings.heatmaps_dir.unlink()
    Daemon(settings).run(once=True)

    with daemon.sessions() as session:
        assert "routed" not in {s.state for s in session.scalars(select(Scan))}
        heatmaps = session.scalars(select(Heatmap)).all()
        assert len(heatmaps) == 4 and all(settings.stored_file(h.overlay_path).exists() for h in heatmaps)


@pytest.mark.slow
def test_a_file_arriving_during_a_forward_pass_is_recorded_before_the_pass_ends(
    make_settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """The forward pass runs in a thread of its own: the loop goes on recording files (and storing
    results, feeding the workers) while a batch is in the model. One lane, so that every batch
    runs in that thread (two lanes: the test below)."""
    daemon = Daemon(make_settings(max_wait_ms=10, reports=False, model_poll_seconds=0.2, concurrent_batches=1))
    daemon.prepare()
    promote(daemon, write_model(tmp_path / "model"))
    release = threading.Event()
    forward_threads: list[str] = []
    predict = ServedModel.predict

    def held(self: ServedModel, inputs: np.ndarray) -> list:
        forward_threads.append(threading.current_thread().name)
        assert release.wait(60)
        return predict(self, inputs)

    monkeypatch.setattr(ServedModel, "predict", held)

    def states() -> dict[str, str]:
        with daemon.sessions() as session:
            return {s.source_name: s.state for s in session.scalars(select(Scan))}

    def wait_until(condition: Callable[[], bool], what: str) -> None:
        deadline = time.monotonic() + 60
        while not condition():
            assert time.monotonic() < deadline and runner.is_alive(), f"gave up waiting for {what}: {states()}"
            time.sleep(0.05)

    drop_scans(daemon.settings.watch)
    runner = threading.Thread(target=daemon.run)
    runner.start()
    try:
        wait_until(lambda: bool(forward_threads), "a batch in the forward pass")
        write_png(daemon.settings.watch / "busi" / "synthetic_late.png", np.full((48, 64), 7, np.uint8))
        wait_until(lambda: states().get("busi/synthetic_late.png") == "routed", "the late file recorded")
        assert "inferred" not in states().values() and not release.is_set()

        release.set()
        wait_until(lambda: set(states().values()) == {"inferred"} and len(states()) == 5, "every scan inferred")
    finally:
        release.set()
        daemon.request_stop()
        runner.join(60)
    assert not runner.is_alive()
    assert set(forward_threads) == {"forward_0"}


@pytest.mark.parametrize("lanes", [1, 2])
def test_onnx_runtime_runs_as_many_batches_at_once_as_concurrent_batches_says(
    make_settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, lanes: int
):
    """Batches of one scan, each held in the model: ``concurrent_batches`` of them are in it at once
    (in as many forward threads), the others wait; every scan is inferred once they are let go."""
    settings = make_settings(max_wait_ms=10, max_batch=1, reports=False, inference_threads=2, concurrent_batches=lanes)
    daemon = Daemon(settings)
    daemon.prepare()
    promote(daemon, write_model(tmp_path / "model", backend="onnx"))
    release = threading.Event()
    held: list[str] = []
    predict = ServedModel.predict

    def held_predict(self: ServedModel, inputs: np.ndarray) -> list:
        assert self.backend == "onnx" and self.lanes == lanes
        held.append(threading.current_thread().name)
        assert release.wait(60)
        return predict(self, inputs)

    monkeypatch.setattr(ServedModel, "predict", held_predict)
    drop_scans(daemon.settings.watch)
    runner = threading.Thread(target=daemon.run, kwargs={"once": True})
    runner.start()
    try:
        deadline = time.monotonic() + 60
        while len(held) < lanes:
            assert time.monotonic() < deadline and runner.is_alive(), f"{len(held)} batches in the model"
            time.sleep(0.05)
        time.sleep(1.0)
        assert sorted(held) == [f"forward_{i}" for i in range(lanes)], "no more batches than lanes at once"
    finally:
        release.set()
        runner.join(60)
    assert not runner.is_alive()
    with daemon.sessions() as session:
        assert [s.state for s in session.scalars(select(Scan))] == ["inferred"] * 4
        assert len(session.scalars(select(Result)).all()) == 4 * 3


def test_the_running_daemon_picks_up_a_promoted_model_without_a_restart(tmp_path: Path):
    import os
    import signal
    import subprocess
    import sys
    import time

    bindir = Path(sys.executable).parent
    state, inbox = tmp_path / "state", tmp_path / "inbox"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEDDAEMON_")}
    env["MEDDAEMON_MODEL_POLL_SECONDS"] = "0.5"
    env["MEDDAEMON_REPORTS"] = "false"
    log = (tmp_path / "daemon.log").open("w")
    daemon = subprocess.Popen(
        [
            bindir / "meddaemon",
            "start",
            "--watch",
            inbox,
            "--create-watch",
            "--state-dir",
            state,
            "--stable-seconds",
            "0.2",
            "--workers",
            "0",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
    )
    try:
        drop_scans(inbox)
        sessions = Daemon(load_settings(env={}, flags={"watch": inbox, "state_dir": state})).sessions

        def states() -> set[str]:
            try:
                with sessions() as session:
                    return {s.state for s in session.scalars(select(Scan))}
            except OperationalError:  # the daemon has not created the schema yet
                return set()

        deadline = time.monotonic() + 60
        while states() != {"waiting_model"} and time.monotonic() < deadline:
            time.sleep(0.2)
        assert states() == {"waiting_model"}

        folder = write_model(tmp_path / "model")
        for args in (["import", folder], ["promote", "busi", "v1"]):
            subprocess.run([bindir / "medcli", "models", *args, "--state-dir", state], check=True, env=env)

        deadline = time.monotonic() + 60  # its own: the two medcli runs take half a minute on a loaded machine
        while states() != {"inferred"} and time.monotonic() < deadline:
            time.sleep(0.2)
        assert states() == {"inferred"}, (tmp_path / "daemon.log").read_text()[-3000:]
        assert daemon.poll() is None
    finally:
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(30) == 0


def test_the_inferred_log_line_names_the_model_and_claims_no_size(
    daemon: Daemon, tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    caplog.set_level(logging.INFO, logger="meddaemon.daemon")
    promote(daemon, write_model(tmp_path / "model"))
    drop_scans(daemon.settings.watch)
    daemon.run(once=True)
    inferred = [r.getMessage() for r in caplog.records if "-> inferred" in r.getMessage()]
    assert len(inferred) == 4
    assert all("0 bytes" not in line and "task busi, model v1, top " in line for line in inferred)


@pytest.mark.parametrize("backend", ["eager", "onnx"])
def test_a_scan_prepared_for_the_version_served_before_a_swap_is_prepared_again_for_the_new_one(
    daemon: Daemon, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, backend: str
):
    """A scan read while v1 (32 x 32) was served and recorded after v2 (64 x 64) was swapped in went
    into v2's queue with v1's input: stored as v2's result without a word (eager), or the daemon
    stopped on ONNX Runtime's refusal of the shape (exit 1)."""
    promote(
        daemon,
        write_model(
            tmp_path / "v2", version="v2", contract=dataclasses.replace(CONTRACT, height=64, width=64), backend=backend
        ),
    )
    read_before_the_swap = IntakeContext(daemon.intake.decode_options, daemon.intake.policy, {"busi": CONTRACT})
    monkeypatch.setattr(type(daemon.intake), "intake_context", lambda self: read_before_the_swap)
    drop_scans(daemon.settings.watch)
    daemon.run(once=True)
    with daemon.sessions() as session:
        states = {s.state for s in session.scalars(select(Scan))}
        sizes = set(session.execute(select(Heatmap.height, Heatmap.width)).all())
    assert states == {"inferred"} and sizes == {(64, 64)}


def test_routed_scans_of_a_task_whose_active_version_is_retired_wait_for_a_model(daemon: Daemon, tmp_path: Path):
    """They stayed routed, claimed: not counted as waiting for a model by status, and a stuck
    queue for health after its limit."""
    promote(daemon, write_model(tmp_path / "v1"))
    daemon.stage.refresh_models()
    daemon.stage.wait_for_loads()
    with transaction(daemon.sessions) as session:
        queued = add_scan(session, 1, ScanState.ROUTED, claimed_by=None).id
    with transaction(daemon.sessions) as session:
        registry.retire(session, "busi", "v1")
    daemon.stage.refresh_models()
    with daemon.sessions() as session:
        assert "busi" not in daemon.stage.served
        assert session.get(Scan, queued).state == "waiting_model"
        assert tasks_without_model(session)["busi"] == 1


def test_routed_scans_of_a_task_with_an_active_version_are_left_to_whoever_serves_it(daemon: Daemon, tmp_path: Path):
    """Only tasks without an active version, or whose retired version this daemon stopped serving,
    have their routed scans settled: a daemon still loading a task's model (at its start, or beside
    another daemon serving it) moved them to waiting_model with its own reason, two events a scan."""
    promote(daemon, write_model(tmp_path / "v1"))
    with transaction(daemon.sessions) as session:
        queued = add_scan(session, 1, ScanState.ROUTED, claimed_by=None).id
    with transaction(daemon.sessions) as session:
        assert bookkeeper.wait_for_a_model(session, served_tasks=set(), daemon_id=None) == 0
    with daemon.sessions() as session:
        assert session.get(Scan, queued).state == "routed"


def test_a_version_retired_while_it_loads_is_never_served(make_settings, tmp_path: Path, monkeypatch):
    """The finished load was checked against the active versions read at the last poll (up to
    ``model_poll_seconds`` before): a version retired while it loaded was served all the same, and
    scans stored under it until the next poll, each result dated after its retirement."""
    loading, go_on = threading.Event(), threading.Event()
    load = InferenceStage._load

    def held(self, request):  # type: ignore[no-untyped-def]
        loading.set()
        assert go_on.wait(60)
        return load(self, request)

    monkeypatch.setattr(InferenceStage, "_load", held)
    daemon = Daemon(make_settings(max_wait_ms=10, reports=False))
    daemon.prepare()
    models = ModelStage(daemon.stage, daemon.sessions, daemon.guarded, lambda: False, poll_seconds=60, once=False)
    promote(daemon, write_model(tmp_path / "v1"))
    models.recover()
    models.tick(time.monotonic(), flush=False)  # the first poll: the next is a minute away
    assert loading.wait(60)
    with transaction(daemon.sessions) as session:
        registry.retire(session, "busi", "v1")
    go_on.set()
    deadline = time.monotonic() + 60
    while daemon.stage.loader.busy():  # the daemon's turns between two polls
        assert time.monotonic() < deadline
        models.tick(time.monotonic(), flush=False)
        time.sleep(0.05)
    models.tick(time.monotonic(), flush=False)
    assert "busi" not in daemon.stage.served
