"""The local engine: a cohort read in place, every image scored once, results where the audit finds
them, bad files listed with the daemon's reason codes, reruns and resumed runs cost only hashing."""

from __future__ import annotations

import faulthandler
import hashlib
import os
import shutil
import signal
import threading
import time
from dataclasses import replace
from pathlib import Path
from unittest.mock import patch

import numpy as np
import pytest
from dicom_factory import write_dicom, write_png, write_structured_report
from sqlalchemy import func, select

from evaluate_factory import World, listing, read_chunk_harming_decoders, read_only
from meddaemon.db.engine import session_factory, transaction
from meddaemon.db.models import Evaluation, EvaluationFile, Heatmap, Result, Scan
from meddaemon.engine.heatmap_grid import read_map
from meddaemon.engine.inference import ServedModel
from meddaemon.evaluate.pipeline import EvaluationRequest, EvaluationStopped, Progress, run_evaluation
from meddaemon.states import ScanState
from model_factory import MostAtOnce, promote_into, write_model


def evaluate(world, path: Path, **options):  # type: ignore[no-untyped-def]
    options.setdefault("workers", 1)
    options.setdefault("batch_size", 8)
    engine = world.engine()
    try:
        return run_evaluation(engine, world.settings, EvaluationRequest(path=path, task="busi", **options))
    finally:
        engine.dispose()


def stored(world) -> dict[str, np.ndarray]:  # type: ignore[no-untyped-def]
    """source_name -> probabilities in label order, for every evaluated scan."""
    engine = world.engine()
    try:
        with session_factory(engine)() as session:
            rows = session.execute(
                select(Scan.source_name, Result.label, Result.probability)
                .join(Result, Result.scan_id == Scan.id)
                .order_by(Scan.id, Result.id)
            ).all()
    finally:
        engine.dispose()
    out: dict[str, list[float]] = {}
    for name, _, probability in rows:
        out.setdefault(name, []).append(probability)
    return {k: np.array(v) for k, v in out.items()}


def test_a_busi_dataset_is_scored_in_place_image_by_image(world, busi_phantoms: Path) -> None:
    outcome = evaluate(world, busi_phantoms)
    images = sorted(p for p in busi_phantoms.rglob("*.png") if "_mask" not in p.name)
    assert outcome.state == "completed"
    assert outcome.summary["files"] == len(images) == outcome.summary["scored"]
    assert outcome.summary["failed"] == 0 and outcome.summary["dataset"]["layout"] == "busi"
    assert len(outcome.summary["dataset"]["fingerprint"]) == 64
    probabilities = stored(world)
    assert sorted(probabilities) == sorted(p.relative_to(busi_phantoms).as_posix() for p in images)
    for row in probabilities.values():
        assert row.shape == (3,) and abs(row.sum() - 1) < 1e-5
    engine = world.engine()
    with session_factory(engine)() as session:
        scans = session.scalars(select(Scan)).all()
        assert {s.state for s in scans} == {ScanState.EVALUATED}
        assert all(s.stored_path is None and Path(s.source_path).is_file() for s in scans)
        assert all(s.evaluation_id == outcome.evaluation_id for s in scans)
    engine.dispose()


def test_a_read_only_tree_is_read_and_left_exactly_as_it_was(world, busi_phantoms: Path, tmp_path: Path) -> None:
    tree = tmp_path / "readonly" / "Dataset_BUSI_with_GT"
    shutil.copytree(busi_phantoms, tree)
    with read_only(tree.parent):
        before = listing(tree.parent)
        outcome = evaluate(world, tree, heatmaps=True)
        assert outcome.state == "completed" and outcome.summary["failed"] == 0
        assert listing(tree.parent) == before  # nothing created, removed, renamed or modified


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_heatmaps_are_found_after_the_state_directory_moves(
    world, busi_phantoms: Path, make_settings, tmp_path: Path
) -> None:
    """Heatmap paths are stored as the daemon stores them: relative to the state directory."""
    evaluate(world, busi_phantoms, heatmaps=True, workers=0)
    moved = tmp_path / "mounted_elsewhere" / "state"
    moved.parent.mkdir()
    world.settings.state_dir.rename(moved)
    settings = make_settings(db=world.db_url, state_dir=moved)
    engine = world.engine()
    with session_factory(engine)() as session:
        maps = session.execute(select(Heatmap.grid, Heatmap.overlay_path, Heatmap.height, Heatmap.width)).all()
    engine.dispose()
    assert len(maps) == 24  # the top label's map of each scan
    for grid, overlay_path, height, width in maps:
        assert settings.stored_file(overlay_path).is_file()
        assert read_map(grid, (height, width)).shape == (height, width)


def test_a_second_run_scores_nothing_again(world, busi_phantoms: Path) -> None:
    first = evaluate(world, busi_phantoms)
    again = evaluate(world, busi_phantoms)
    assert again.evaluation_id == first.evaluation_id
    assert again.summary["scored"] == 0 and again.summary["reused"] == first.summary["files"]
    assert again.summary["dataset"]["fingerprint"] == first.summary["dataset"]["fingerprint"]
    engine = world.engine()
    with session_factory(engine)() as session:
        assert session.scalar(select(func.count()).select_from(Scan)) == first.summary["files"]
        assert session.scalar(select(func.count()).select_from(Result)) == 3 * first.summary["files"]
        assert session.scalar(select(func.count()).select_from(EvaluationFile)) == first.summary["files"]
    engine.dispose()


def test_a_rerun_with_heatmaps_after_one_without_adds_the_maps_to_the_results_it_keeps(
    world, busi_phantoms: Path
) -> None:
    """It said "already scored" for every file and wrote no map; a third run only hashes. The run
    that adds the maps says so, and only the files run through the model count in images/s."""
    first = evaluate(world, busi_phantoms)
    before = stored(world)
    with_maps = evaluate(world, busi_phantoms, heatmaps=True)
    again = evaluate(world, busi_phantoms, heatmaps=True)

    assert with_maps.summary["scored"] == 0 and with_maps.summary["reused"] == first.summary["files"]
    assert with_maps.summary["heatmaps_added"] == first.summary["files"] and with_maps.summary["images_per_second"]
    assert again.summary["reused"] == first.summary["files"]
    assert again.summary["heatmaps_added"] == 0 and again.summary["images_per_second"] is None  # hashed only
    assert first.summary["heatmaps_added"] == 0 and first.summary["images_per_second"] > 0
    engine = world.engine()
    with session_factory(engine)() as session:
        mapped = session.scalars(select(Result.scan_id).join(Heatmap, Heatmap.result_id == Result.id)).all()
        overlays = session.scalars(select(Heatmap.overlay_path)).all()
        assert session.scalar(select(func.count()).select_from(Result)) == 3 * first.summary["files"]
    engine.dispose()
    assert sorted(mapped) == sorted(set(mapped)) and len(mapped) == first.summary["files"]  # the top label's, once
    assert all(world.settings.stored_file(path).is_file() for path in overlays)
    assert stored(world).keys() == before.keys()
    assert all(np.array_equal(stored(world)[name], p) for name, p in before.items())


def test_copies_count_as_files_in_the_maps_added_and_in_images_per_second_and_a_run_without_maps_adds_none(
    world, busi_phantoms: Path, tmp_path: Path
) -> None:
    """Two copies of one image read "N already scored (N - 1 given their heatmaps now)", the copy
    decoded but left out of images/s; a run without --heatmaps claimed maps another run wrote."""
    import shutil

    cohort = tmp_path / "cohort"
    shutil.copytree(busi_phantoms, cohort)
    image = next(p for p in sorted(cohort.rglob("*.png")) if "_mask" not in p.name)
    shutil.copy(image, image.with_name(f"copy of {image.name}"))  # the same bytes under a second name
    first = evaluate(world, cohort, workers=0)
    files = first.summary["files"]
    with_maps = evaluate(world, cohort, workers=0, heatmaps=True)
    assert with_maps.summary["heatmaps_added"] == files  # every file has its map now, the copy too
    other = evaluate(world, busi_phantoms, workers=0, name="other")  # no --heatmaps: maps are not its own
    assert other.summary["heatmaps_added"] == 0 and other.summary["images_per_second"] is None
    assert first.summary["scored"] == files - 1 and first.summary["reused"] == 1  # the copy, decoded all the same


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_reruns_with_heatmaps_of_a_version_that_makes_none_score_nothing_again(
    world, busi_phantoms: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Scans that can never have a map (a version without heatmaps, as an ONNX import without
    --cam-tensor) were taken for scans missing theirs: decoded and run through the model again on
    every --heatmaps rerun or resume, their output thrown away."""
    promote_into(world.db_url, world.settings.models_dir, write_model(tmp_path / "v2", version="v2", heatmaps=False))
    forwarded: list[int] = []
    predict = ServedModel.predict

    def counted(self: ServedModel, inputs: np.ndarray):  # type: ignore[no-untyped-def]
        forwarded.append(len(inputs))
        return predict(self, inputs)

    monkeypatch.setattr(ServedModel, "predict", counted)
    runs = []
    for _ in range(3):
        runs.append(evaluate(world, busi_phantoms, heatmaps=True, model_version="v2"))
        runs[-1].summary["forwarded"] = sum(forwarded)
        forwarded.clear()
    assert [r.summary["forwarded"] for r in runs] == [runs[0].summary["files"], 0, 0]
    assert [r.summary["reused"] for r in runs[1:]] == [runs[0].summary["files"]] * 2


def test_a_rerun_after_files_left_the_cohort_lists_counts_and_fingerprints_the_cohort_as_it_is(
    world, tmp_path: Path
) -> None:
    """The rows of a file deleted since an earlier run stayed: listed unreadable, in the fingerprint
    (the same as the cohort with it), and in the audit's predictions."""
    folder = tmp_path / "images"
    rng = np.random.default_rng(6)
    for i in range(20):
        write_png(folder / f"ok_{i:02}.png", rng.integers(0, 255, (40, 48), dtype=np.uint8))
    before = evaluate(world, folder)
    (folder / "bad.png").write_bytes(b"SYNTHETIC, not an image")
    with_bad = evaluate(world, folder)
    assert [f["path"] for f in with_bad.summary["unreadable"]] == ["bad.png"]
    (folder / "bad.png").unlink()
    (folder / "ok_19.png").rename(folder / "renamed.png")
    after = evaluate(world, folder)
    assert after.summary["unreadable"] == [] and after.summary["files"] == 20
    assert after.summary["dataset"]["fingerprint"] not in (with_bad.summary["dataset"]["fingerprint"], None)
    engine = world.engine()
    with session_factory(engine)() as session:
        paths = set(session.scalars(select(EvaluationFile.path)))
    engine.dispose()
    assert paths == {f"ok_{i:02}.png" for i in range(19)} | {"renamed.png"}
    assert before.summary["dataset"]["fingerprint"] != after.summary["dataset"]["fingerprint"]  # another name


def test_the_backend_choice_is_measured_once_per_version_and_kept_beside_it(
    world, busi_phantoms: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """As the daemon's: the first run times eager PyTorch against ONNX Runtime and keeps the choice
    and the exported graph in the version's folder; a run over other files reads them instead."""
    other = tmp_path / "other"
    shutil.copytree(busi_phantoms / "benign", other)
    for image in other.glob("*.png"):
        image.write_bytes(image.read_bytes() + b"other")  # other bytes: nothing reused, all scored
    caplog.set_level("INFO", logger="meddaemon")
    evaluate(world, busi_phantoms)
    assert "chosen (measured" in caplog.text and "not measured again" not in caplog.text
    folders = list(world.settings.models_dir.rglob("backend.json"))
    assert len(folders) == 1 and list((folders[0].parent / "onnx").glob("graph-*.onnx"))
    caplog.clear()
    second = evaluate(world, other)
    assert second.summary["scored"] == second.summary["files"] > 0
    assert "not measured again" in caplog.text and "chosen (measured" not in caplog.text


def test_a_run_after_one_that_chose_onnx_runtime_is_served_from_the_kept_graph_with_the_same_probabilities(
    world, busi_phantoms: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """engine/serving.py: the network is not built again; the same pixels get the same probabilities."""
    other = tmp_path / "other"
    shutil.copytree(busi_phantoms / "benign", other)
    for image in other.glob("*.png"):
        image.write_bytes(image.read_bytes() + b"other")  # other bytes, the same pixels
    evaluate(world, busi_phantoms)
    [choices] = world.settings.models_dir.rglob("backend.json")
    choices.write_text(choices.read_text().replace('"backend": "eager"', '"backend": "onnx"'))
    caplog.set_level("INFO", logger="meddaemon")

    second = evaluate(world, other)

    assert second.summary["scored"] == second.summary["files"] > 0
    assert "served from the graph kept with the version" in caplog.text
    probabilities = stored(world)
    both = [name for name in probabilities if f"benign/{name}" in probabilities]
    assert both
    for name in both:
        np.testing.assert_allclose(probabilities[name], probabilities[f"benign/{name}"], atol=1e-5)


def test_the_local_engine_keeps_as_many_batches_in_the_model_as_it_has_lanes_and_keeps_their_order(
    busi_phantoms: Path, make_settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ONNX Runtime with ``concurrent_batches = 2``: two batches in the model at once, never more;
    every file scored once, with the probabilities a run of one batch at a time gives."""
    predict = MostAtOnce(ServedModel.predict, 0.1)
    monkeypatch.setattr(ServedModel, "predict", lambda self, inputs: predict(self, inputs))
    model = write_model(tmp_path / "model", version="v1", backend="onnx")
    probabilities: dict[int, dict[str, np.ndarray]] = {}
    for lanes in (2, 1):
        url = f"sqlite:///{tmp_path / f'lanes-{lanes}.db'}"
        settings = make_settings(
            db=url, state_dir=tmp_path / f"state-{lanes}", inference_threads=2, concurrent_batches=lanes
        )
        promote_into(url, settings.models_dir, model)
        world = World(settings, url)
        predict.most = 0
        outcome = evaluate(world, busi_phantoms, batch_size=2, workers=0)
        assert outcome.state == "completed" and outcome.summary["scored"] == outcome.summary["files"] == 24
        assert predict.most == lanes
        probabilities[lanes] = stored(world)
    assert sorted(probabilities[2]) == sorted(probabilities[1])
    for name, row in probabilities[1].items():
        np.testing.assert_allclose(probabilities[2][name], row, atol=1e-6)


def test_unreadable_files_are_listed_with_reasons_and_the_run_goes_on(world, tmp_path: Path) -> None:
    folder = tmp_path / "images"
    rng = np.random.default_rng(1)
    for i in range(40):
        write_png(folder / f"ok_{i:02}.png", rng.integers(0, 255, (40, 48), dtype=np.uint8))
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    outcome = evaluate(world, folder, workers=0)
    assert outcome.state == "completed" and outcome.summary["dataset"]["layout"] == "images"
    assert outcome.summary["scored"] == 40 and outcome.summary["failed"] == 1
    [bad] = outcome.summary["unreadable"]
    assert bad["path"] == "broken.png" and bad["reason"] in ("corrupt_image", "truncated_image")


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)  # the decoding processes' work: one backend
@pytest.mark.parametrize(
    ("harmful", "reason"), [("crash.png", "decoder_crashed"), ("stall.png", "decode_timeout"), ("crash_once.png", None)]
)
def test_a_file_that_kills_or_stalls_its_decoding_process_is_listed_and_the_run_goes_on(
    world, tmp_path: Path, harmful: str, reason: str | None
) -> None:
    """A native decoder that dies on a file (a segfault) or never ends on it, or a decoding process
    the kernel kills under a healthy read: the files in hand are read again one at a time, each in
    a process of its own; the one that harms its process again fails with the daemon's reason, every
    other file is scored once, and the run completes. A dead process stopped the run (BrokenProcessPool)
    and one that never ended held it for ever."""
    folder = tmp_path / "images"
    rng = np.random.default_rng(5)
    for i in range(40):
        write_png(folder / f"ok_{i:02}.png", rng.integers(0, 255, (40, 48), dtype=np.uint8))
    write_png(folder / harmful, rng.integers(0, 255, (40, 48), dtype=np.uint8))
    world.settings = replace(world.settings, read_timeout_seconds=3.0)
    with patch("meddaemon.evaluate.pipeline.read_chunk", read_chunk_harming_decoders):
        outcome = evaluate(world, folder, workers=2)
    assert outcome.state == "completed"
    scored = stored(world)
    if reason is None:
        assert sorted(scored) == sorted([f"ok_{i:02}.png" for i in range(40)] + [harmful])
        assert outcome.summary["failed"] == 0
        return
    assert sorted(scored) == [f"ok_{i:02}.png" for i in range(40)]
    assert outcome.summary["scored"] == 40 and outcome.summary["failed"] == 1
    [bad] = outcome.summary["unreadable"]
    assert (bad["path"], bad["reason"]) == (harmful, reason)


def test_ctrl_c_while_a_file_that_never_ends_is_read_alone_stops_the_run_at_once(world, tmp_path: Path) -> None:
    """After a process died, the files in hand are read one at a time: Ctrl-C during the lone read of
    a file that never ends waited for it for ever (the close waited for the processes to finish)."""
    folder = tmp_path / "images"
    rng = np.random.default_rng(6)
    for name in ("crash_once.png", "ok_00.png", "ok_01.png", "stall.png"):
        write_png(folder / name, rng.integers(0, 255, (40, 48), dtype=np.uint8))
    world.settings = replace(world.settings, read_timeout_seconds=120.0)

    def ctrl_c_once_the_stalled_read_began() -> None:
        deadline = time.monotonic() + 60
        while not (folder / "stall.png.reading").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGINT)

    threading.Thread(target=ctrl_c_once_the_stalled_read_began, daemon=True).start()
    faulthandler.dump_traceback_later(90, exit=True)  # a hang ends the test process, loudly, not the suite's time
    began = time.monotonic()
    try:
        with (
            patch("meddaemon.evaluate.pipeline.read_chunk", read_chunk_harming_decoders),
            pytest.raises(KeyboardInterrupt),
        ):
            evaluate(world, folder, workers=2)
    finally:
        faulthandler.cancel_dump_traceback_later()
    assert time.monotonic() - began < 60
    engine = world.engine()
    with session_factory(engine)() as session:
        [row] = session.scalars(select(Evaluation)).all()
        assert row.state == "interrupted"
    engine.dispose()


def test_a_file_over_max_file_bytes_is_listed_too_large_unread_and_the_run_goes_on(world, tmp_path: Path) -> None:
    """Each decoding process holds a file whole in memory: one of many gigabytes (a slide, a video
    dropped among the scans) is refused by its size, before a byte of it is read."""
    folder = tmp_path / "images"
    rng = np.random.default_rng(2)
    for i in range(40):
        write_png(folder / f"ok_{i:02}.png", rng.integers(0, 255, (40, 48), dtype=np.uint8))
    with open(folder / "huge.png", "wb") as sparse:  # 6 GiB that take no disk: a hole
        sparse.truncate(6 * 1024**3)
    outcome = evaluate(world, folder, workers=1)
    assert outcome.summary["scored"] == 40 and outcome.summary["failed"] == 1
    [bad] = outcome.summary["unreadable"]
    assert bad["path"] == "huge.png" and bad["reason"] == "too_large"
    assert bad["message"] == f"the file holds {6 * 1024**3} bytes, over max_file_bytes ({4 * 1024**3}); it was not read"


def test_objects_that_are_no_images_are_listed_apart_and_never_stop_the_run(world, tmp_path: Path) -> None:
    """A PACS export holds structured reports beside the images, and meddaemon's own results where it
    delivered them: here one file in six. Counted as unreadable, they stopped the run at its 5 %."""
    folder = tmp_path / "pacs_export"
    rng = np.random.default_rng(3)
    for i in range(10):
        write_png(folder / f"ok_{i:02}.png", rng.integers(0, 255, (40, 48), dtype=np.uint8))
    write_structured_report(folder / "report.dcm")
    write_dicom(folder / "meddaemon_capture.dcm", extra={"Manufacturer": "meddaemon"})
    outcome = evaluate(world, folder, workers=0)
    assert outcome.state == "completed"
    assert (outcome.summary["scored"], outcome.summary["failed"], outcome.summary["skipped"]) == (10, 0, 2)
    assert outcome.summary["unreadable"] == [] and outcome.summary["failures_by_reason"] == {}
    assert [(f["path"], f["reason"]) for f in outcome.summary["not_images"]] == [
        ("meddaemon_capture.dcm", "own_output"),
        ("report.dcm", "no_pixel_data"),
    ]


def test_objects_that_are_no_images_never_hide_unreadable_images_from_the_five_percent(world, tmp_path: Path) -> None:
    """Two of ten images unreadable, beside forty structured reports: 2 of 50 files is under 5 %, but
    the reports are no images, and 2 of 10 images is the dataset at fault, as training counts it."""
    folder = tmp_path / "pacs_export"
    rng = np.random.default_rng(4)
    for i in range(8):
        write_png(folder / f"ok_{i:02}.png", rng.integers(0, 255, (40, 48), dtype=np.uint8))
    (folder / "empty.png").write_bytes(b"")
    (folder / "truncated.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00")
    for i in range(40):
        write_structured_report(folder / f"report_{i:02}.dcm")
    with pytest.raises(EvaluationStopped, match="2 of 10 images cannot be read"):
        evaluate(world, folder, workers=0)


def test_more_than_five_percent_unreadable_stops_with_a_message(world, tmp_path: Path) -> None:
    folder = tmp_path / "images"
    rng = np.random.default_rng(2)
    for i in range(10):
        write_png(folder / f"ok_{i:02}.png", rng.integers(0, 255, (40, 48), dtype=np.uint8))
    (folder / "empty.png").write_bytes(b"")
    with pytest.raises(EvaluationStopped, match="1 of 11 images cannot be read"):
        evaluate(world, folder, workers=0)
    engine = world.engine()
    with session_factory(engine)() as session:
        [row] = session.scalars(select(Evaluation)).all()
        assert row.state == "stopped" and "cannot be read" in (row.message or "")
        assert row.failures == {"empty_file": 1}
    engine.dispose()


def test_progress_is_reported_with_files_per_second_up_to_the_whole_cohort(world, busi_phantoms: Path) -> None:
    seen: list[Progress] = []
    engine = world.engine()
    request = EvaluationRequest(path=busi_phantoms, task="busi", workers=0, batch_size=4)
    with patch("meddaemon.evaluate.pipeline.FLUSH_SECONDS", 0.0):  # a write (and a report) per batch
        run_evaluation(engine, world.settings, request, seen.append)
    engine.dispose()
    done = [p.done for p in seen]
    assert len(seen) > 2 and done == sorted(done) and done[-1] == seen[-1].total == 24
    assert all(p.files_per_second > 0 for p in seen)


def test_scans_the_daemon_is_still_working_on_are_left_to_it(world, busi_phantoms: Path) -> None:

    image = next(busi_phantoms.glob("benign/*).png"))
    sha = hashlib.sha256(image.read_bytes()).hexdigest()
    engine = world.engine()
    with transaction(session_factory(engine)) as session:
        session.add(Scan(sha256=sha, state="routed", task_name="busi", source_name="inbox/busi/x.png"))
    outcome = run_evaluation(engine, world.settings, EvaluationRequest(busi_phantoms, "busi", workers=0))
    with session_factory(engine)() as session:
        [row] = session.scalars(select(EvaluationFile).where(EvaluationFile.sha256 == sha)).all()
        assert row.outcome == "skipped" and row.scan_id is None
        assert session.scalar(select(func.count()).select_from(Scan).where(Scan.sha256 == sha)) == 1
        assert session.scalar(select(func.count()).select_from(Result)) == 3 * 23
    engine.dispose()
    assert outcome.summary["scored"] == 23 and outcome.summary["skipped"] == 1


def test_an_unexpected_error_leaves_the_run_marked_stopped_with_its_message(world, busi_phantoms: Path) -> None:
    def broken(self, inputs):  # type: ignore[no-untyped-def]
        raise RuntimeError("SYNTHETIC fault in the forward pass")

    engine = world.engine()
    with patch("meddaemon.engine.inference.ServedModel.predict", broken), pytest.raises(RuntimeError):
        run_evaluation(engine, world.settings, EvaluationRequest(busi_phantoms, "busi", workers=0))
    with session_factory(engine)() as session:
        [row] = session.scalars(select(Evaluation)).all()
        assert row.state == "stopped" and "SYNTHETIC fault" in (row.message or "")
        assert row.finished_at is not None and row.dataset_fingerprint is None
    engine.dispose()


def test_a_fault_handing_the_first_files_to_the_decoding_processes_stops_the_run_with_its_message(
    world, busi_phantoms: Path
) -> None:
    """The first chunks go to the decoding processes from a thread of their own (beside the model's
    load): what stops it is raised in the run, never a run that ends early with files unscored."""

    def broken(self):  # type: ignore[no-untyped-def]
        raise RuntimeError("SYNTHETIC fault handing out the first chunks")

    engine = world.engine()
    with patch("meddaemon.evaluate.pipeline.Decoders._fill", broken), pytest.raises(RuntimeError, match="SYNTHETIC"):
        run_evaluation(engine, world.settings, EvaluationRequest(busi_phantoms, "busi", workers=1))
    with session_factory(engine)() as session:
        [row] = session.scalars(select(Evaluation)).all()
        assert row.state == "stopped" and "SYNTHETIC fault handing out" in (row.message or "")
    engine.dispose()


def test_a_name_longer_than_the_database_keeps_is_refused_and_a_long_folder_s_default_name_is_cut(
    world, tmp_path: Path
) -> None:
    """evaluations.name holds 255 characters: PostgreSQL refused a longer one with a traceback."""
    from meddaemon.evaluate.store import EvaluationError

    folder = tmp_path / ("synthetic_" + "x" * 240)
    rng = np.random.default_rng(8)
    for i in range(3):
        write_png(folder / f"ok_{i}.png", rng.integers(0, 255, (40, 48), dtype=np.uint8))
    with pytest.raises(EvaluationError, match="--name is at most 255 characters, not 256"):
        evaluate(world, folder, name="n" * 256)
    outcome = evaluate(world, folder)
    assert outcome.state == "completed" and len(outcome.name) == 255 and outcome.name.startswith("synthetic_x")


def test_a_path_through_dot_dot_names_the_folder_it_reaches(
    world, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``medcli evaluate ..`` was named ``..-busi-v1``, stored as ``<cwd>/..``, was one evaluation
    apart from the same folder given as ``.``, and refused every other folder given as ``..``."""
    rng = np.random.default_rng(9)
    for side in ("a", "b"):
        write_png(tmp_path / side / f"synthetic_{side}.png", rng.integers(0, 255, (40, 48), dtype=np.uint8))
        (tmp_path / side / "x").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "a", target_is_directory=True)
    monkeypatch.chdir(tmp_path)
    first = evaluate(world, Path("a/x/.."))
    second = evaluate(world, Path("b/x/.."))
    again = evaluate(world, Path("a"))
    assert (first.name, second.name) == ("a-busi-v1", "b-busi-v1")
    assert again.evaluation_id == first.evaluation_id and again.summary["scored"] == 0
    through_a_link = evaluate(world, Path("link"), name="by-link")  # a link is kept as given
    assert evaluate(world, Path("b/../link"), name="by-link").evaluation_id == through_a_link.evaluation_id
    engine = world.engine()
    with session_factory(engine)() as session:
        assert session.scalar(select(Evaluation.dataset_path).where(Evaluation.id == first.evaluation_id)) == str(
            tmp_path / "a"
        )
    engine.dispose()


def test_two_datasets_of_one_folder_name_or_two_manifests_of_one_folder_get_names_of_their_own(
    world, tmp_path: Path
) -> None:
    """Every copy of BUSI is ``Dataset_BUSI_with_GT``, and a manifest was named by its folder: the
    second dataset's default name was the first's, and the run was refused ('give another --name')."""
    import hashlib

    rng = np.random.default_rng(10)
    copies = [tmp_path / where / "synthetic_cohort" for where in ("full", "subset")]
    for copy in copies:
        for i in range(3):
            write_png(copy / f"synthetic_{i}.png", rng.integers(0, 255, (40, 48), dtype=np.uint8))
    rows = "".join(f"synthetic_{i}.png,{label}\n" for i, label in enumerate(("benign", "malignant", "normal")))
    for manifest in ("a.csv", "b.csv"):
        (copies[0] / manifest).write_text("path,label\n" + rows)

    full, subset, full_again = (evaluate(world, path) for path in (copies[0], copies[1], copies[0]))
    by_a, by_b = (evaluate(world, copies[0] / manifest) for manifest in ("a.csv", "b.csv"))

    hashed = hashlib.sha256(str(copies[1]).encode()).hexdigest()[:8]
    assert (full.name, subset.name) == ("synthetic_cohort-busi-v1", f"synthetic_cohort-{hashed}-busi-v1")
    assert full_again.evaluation_id == full.evaluation_id and full_again.summary["scored"] == 0
    assert evaluate(world, copies[1]).evaluation_id == subset.evaluation_id  # the same command, the same evaluation
    assert (by_a.name, by_b.name) == ("a-busi-v1", "b-busi-v1")
    assert all(run.state == "completed" for run in (full, subset, by_a, by_b))


def test_a_manifest_s_run_named_by_its_folder_by_an_earlier_release_is_still_resumed_by_the_same_command(
    world, tmp_path: Path
) -> None:
    """Manifests were named by their folder: a run of one interrupted before the upgrade is found
    under that name again, not begun anew under the manifest's own."""
    from sqlalchemy import update

    rng = np.random.default_rng(11)
    folder = tmp_path / "synthetic_cohort"
    for i in range(3):
        write_png(folder / f"synthetic_{i}.png", rng.integers(0, 255, (40, 48), dtype=np.uint8))
    manifest = folder / "labels.csv"
    manifest.write_text("path,label\n" + "".join(
        f"synthetic_{i}.png,{label}\n" for i, label in enumerate(("benign", "malignant", "normal"))))  # fmt: skip
    first = evaluate(world, manifest)
    engine = world.engine()
    with transaction(session_factory(engine)) as session:  # as the release before named it
        session.execute(update(Evaluation).values(name="synthetic_cohort-busi-v1"))
    engine.dispose()

    again = evaluate(world, manifest)

    assert (again.name, again.evaluation_id) == ("synthetic_cohort-busi-v1", first.evaluation_id)
    assert again.summary["scored"] == 0


class SigintInFinaliser:
    """Sends this process SIGINT from its ``__del__`` and stays there long enough for Python to run
    the handler: what a Ctrl-C landing while the garbage collector finalises an object does."""

    def __del__(self) -> None:
        import os
        import signal
        import time

        os.kill(os.getpid(), signal.SIGINT)
        began = time.monotonic()
        while time.monotonic() - began < 0.2:
            pass


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # the dropped one, as intended
def test_ctrl_c_landing_in_a_finaliser_still_stops_the_run_as_interrupted(world, busi_phantoms: Path) -> None:
    """Python drops an exception raised inside ``__del__`` ("Exception ignored in"): the run went on
    to its end and exited 0 (a CI run saw it: 641 of 6,000 files written at the Ctrl-C, then all)."""
    engine = world.engine()
    request = EvaluationRequest(path=busi_phantoms, task="busi", workers=0, batch_size=4)
    reports = []

    def progress(p: Progress) -> None:
        reports.append(p)
        if len(reports) == 1:
            finalised = SigintInFinaliser()
            del finalised

    with patch("meddaemon.evaluate.pipeline.FLUSH_SECONDS", 0.0), pytest.raises(KeyboardInterrupt):
        run_evaluation(engine, world.settings, request, progress)
    with session_factory(engine)() as session:
        [row] = session.scalars(select(Evaluation)).all()
        assert row.state == "interrupted" and row.scored < 24
    engine.dispose()


def test_a_run_ended_by_a_signal_exiting_python_is_interrupted_not_completed(world, busi_phantoms: Path) -> None:
    """Ray's driver turns SIGTERM (a scheduler's stop, `timeout`) into SystemExit: the run was
    recorded completed with the files it had not scored missing, and audited as a whole cohort."""
    engine = world.engine()
    request = EvaluationRequest(path=busi_phantoms, task="busi", workers=0, batch_size=4)

    def progress(p: Progress) -> None:
        raise SystemExit(15)

    with patch("meddaemon.evaluate.pipeline.FLUSH_SECONDS", 0.0), pytest.raises(SystemExit):
        run_evaluation(engine, world.settings, request, progress)
    with session_factory(engine)() as session:
        [row] = session.scalars(select(Evaluation)).all()
        assert row.state == "interrupted" and row.scored < 24
        assert "run the same command again to resume" in row.message
    engine.dispose()
