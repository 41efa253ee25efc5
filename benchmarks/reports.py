"""Reports benchmark: the time a report takes per page, and what reporting costs inference at load.

1. **per page**: a state directory made by the real daemon (``--once``) from SYNTHETIC scans with
   randomly initialised, untrained models at the seeds' input sizes: ``busi`` (MobileNetV2-sized
   1-channel 224x224 input, served by the small CNN so the setup is quick; the report does not
   depend on the architecture), a two-scan DICOM study, and ``chestxray14`` (multilabel, 320x320,
   several labels over threshold, so several overlays and pages). Then, in this process, each
   report kind is built ``--repeats`` times: **render** is the reportlab layout of data already in
   memory; **end to end** is what the report stage does per report: read the rows, decode the
   stored scan again for the model's view, embed the overlays, render, write (temp name, fsync,
   rename) and commit the row. Median, in ms per page.
2. **placement**: why the report stage is a process. A stand-in for the daemon's main loop (pure
   Python: ORM rows into an in-memory SQLite, 64 per transaction) is timed alone, with reports
   rendered over and over in a thread of the same process, and in a separate process at niceness
   0 and 10 (``--placement`` seconds each).
3. **throughput at load**: ``meddaemon start`` (a subprocess, ``--workers 2``, mobilenet_v2 on
   ``busi``, heatmaps on) with reports on (the report process at its default niceness 10), off
   (``MEDDAEMON_REPORTS=false``) and, with ``--configs``, on at niceness 0, alternated ``--rounds``
   times; each run is warmed up with one batch (so the report process has started), then
   ``--files`` 256x256 PNGs are renamed into the inbox and timed until every scan has its result
   (``inferred`` or ``reported``). Reports on: also the time until every scan is ``reported``.

4. **model card figures**: ``training.figures.write_figures`` (the four PNGs beside ``MODEL_CARD.md``)
   for the run the model-card tests make: a 3-epoch small CNN on 12 SYNTHETIC BUSI phantoms (48 px,
   trained at 32 px), multiclass with its 12 test images (as ``medcli retrain`` writes them); and a
   SYNTHETIC 14-label multilabel set of 20 rows with 5 images. Median and slowest of ``--card-repeats``
   after one warm-up (tests/training/test_model_card.py checks what they draw, not how fast).

Every figure records the load of other processes meanwhile (the machine is shared).

    .venv/bin/python benchmarks/reports.py                  # about 4 minutes on 2 cores
    .venv/bin/python benchmarks/reports.py --files 800 --rounds 2 --configs on,off,on-nice0
    .venv/bin/python benchmarks/reports.py --files 0 --repeats 10   # time per page and placement only
    .venv/bin/python benchmarks/reports.py --files 0 --repeats 0 --placement 0   # model card figures only
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import psutil
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))

import inference as bench  # noqa: E402
from dicom_factory import write_png  # noqa: E402
from sqlalchemy import select  # noqa: E402

from meddaemon.config import load_settings  # noqa: E402
from meddaemon.daemon.service import Daemon  # noqa: E402
from meddaemon.db.engine import create_db_engine, session_factory, transaction  # noqa: E402
from meddaemon.db.migrate import upgrade  # noqa: E402
from meddaemon.db.models import Scan  # noqa: E402
from meddaemon.engine import registry  # noqa: E402
from meddaemon.engine.architectures import build_model  # noqa: E402
from meddaemon.engine.tasks import BUILTIN_TASKS  # noqa: E402
from meddaemon.report.builder import ReportBuilder  # noqa: E402
from meddaemon.report.content import study_report_data  # noqa: E402
from meddaemon.report.fonts import report_fonts  # noqa: E402
from meddaemon.report.render import render_scan, render_study  # noqa: E402
from meddaemon.report.summary import parse_since, render_summary, summarise  # noqa: E402
from meddaemon.report.templates import load_template  # noqa: E402
from meddaemon.training.figures import write_figures  # noqa: E402
from meddaemon.training.phantoms import write_phantoms  # noqa: E402
from meddaemon.training.pipeline import retrain  # noqa: E402
from meddaemon.training.train import ScanDataset, TrainConfig  # noqa: E402
from model_factory import drop_study, read_pdf  # noqa: E402

# a reported scan is archived next: both count (waiting for 'reported' alone waited for ever)
DONE_SQL = "SELECT count(*) FROM scans WHERE state IN ('inferred', 'reported', 'archived')"
REPORTED_SQL = "SELECT count(*) FROM scans WHERE state IN ('reported', 'archived')"


# -- 1. time per page ------------------------------------------------------------------------------


def seed_sized_model(folder: Path, task: str) -> Path:
    """The small CNN at the task's own input contract (SYNTHETIC, untrained), low thresholds for
    multilabel so that several labels are positive (several overlays, as in a busy chest X-ray)."""
    spec = BUILTIN_TASKS[task]
    torch.manual_seed(0)
    registry.save_version(
        build_model("small_cnn", spec.contract.channels, spec.num_outputs),
        task=task,
        version="v1",
        labels=spec.labels,
        kind=spec.kind,
        architecture="small_cnn",
        input_contract=spec.contract,
        out_dir=folder,
        training_data_fingerprint="synthetic: random initialisation, untrained (benchmark)",
        thresholds=dict.fromkeys(spec.labels, 0.45) if spec.kind == "multilabel" else None,
    )
    return folder


def make_state(root: Path) -> Daemon:
    settings = load_settings(
        env={},
        flags={
            "watch": root / "inbox",
            "state_dir": root / "state",
            "create_watch": True,
            "stable_seconds": 0.0,
            "workers": 0,
        },
    )
    daemon = Daemon(settings)
    daemon.prepare()
    for task in ("busi", "chestxray14"):
        with transaction(daemon.sessions) as session:
            row = registry.import_version(session, seed_sized_model(root / task, task), settings.models_dir)
            registry.promote(session, row.task_name, row.version)
    rng = np.random.default_rng(0)
    write_png(settings.watch / "busi" / "synthetic_busi.png", rng.integers(0, 255, (256, 256), np.uint8))
    write_png(settings.watch / "chestxray14" / "synthetic_cxr.png", rng.integers(0, 255, (512, 512), np.uint8))
    drop_study(settings.watch)
    daemon.run(once=True)
    return daemon


def median_ms(run: Callable[[], int], repeats: int) -> tuple[float, int]:
    """Median wall ms of ``run`` (which returns its page count) after one warm-up."""
    pages = run()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run()
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times), pages


def per_page(root: Path, repeats: int) -> list[tuple[str, int, float, float]]:
    daemon = make_state(root)
    builder = ReportBuilder(daemon.settings, daemon.sessions)
    fonts = report_fonts()
    with daemon.sessions() as session:
        ids = {s.source_name: s.id for s in session.scalars(select(Scan))}
    out = root / "out"
    rows = []
    for kind, name in (
        ("scan, busi (multiclass)", "busi/synthetic_busi.png"),
        ("scan, chestxray14 (multilabel)", "chestxray14/synthetic_cxr.png"),
    ):
        scan_id = ids[name]
        data = builder.scan_data(scan_id, False)
        images = builder.images(data)
        template = load_template(data.task)
        render_ms, pages = median_ms(lambda: render_scan(data, images, template, fonts).pages, repeats)  # noqa: B023
        e2e_ms, _ = median_ms(lambda: builder.scan_report(scan_id, out=out / "scan.pdf").pages, repeats)  # noqa: B023
        rows.append((f"{kind}, {len(data.heatmaps)} overlay(s)", pages, render_ms / pages, e2e_ms / pages))
    with daemon.sessions() as session:
        uid = session.scalar(select(Scan.study_instance_uid).where(Scan.study_instance_uid.is_not(None)))
        assert uid
        study = study_report_data(session, uid, daemon.settings.task_specs, state_dir=daemon.settings.state_dir)
    study_images = [builder.images(s) for s in study.scans]
    render_ms, pages = median_ms(lambda: render_study(study, study_images, load_template, fonts).pages, repeats)
    e2e_ms, _ = median_ms(lambda: builder.study_report(uid, out=out / "study.pdf").pages, repeats)
    rows.append((f"study, {len(study.scans)} scans", pages, render_ms / pages, e2e_ms / pages))
    with daemon.sessions() as session:
        figures = summarise(session, parse_since("24h"))
    render_ms, pages = median_ms(lambda: render_summary(figures, fonts).pages, repeats)
    rows.append(("summary, 2 tasks", pages, render_ms / pages, render_ms / pages))
    assert read_pdf(out / "scan.pdf")[1] >= 1
    return rows


# -- 2. where the report stage runs: a thread against a process --------------------------------------


def _python_loop_rate(seconds: float) -> float:
    """A stand-in for the daemon's main loop (pure Python, holds the GIL): ORM rows into an
    in-memory SQLite, one transaction per 64, as the bookkeeper does; rows per second."""
    from sqlalchemy import create_engine
    from sqlalchemy.orm import Session as OrmSession

    from meddaemon.db.models import Base, ScanEvent

    engine = create_engine("sqlite://")
    Base.metadata.create_all(engine)
    with OrmSession(engine) as session:
        session.add(Scan(id=1, state="inferred", source_name="synthetic"))
        session.commit()
        rows, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            session.add_all(ScanEvent(scan_id=1, state="inferred", detail="synthetic") for _ in range(64))
            session.commit()
            rows += 64
    engine.dispose()
    return rows / (time.perf_counter() - t0)


def _render_forever(stop, render, nice: int = 0) -> None:  # type: ignore[no-untyped-def]
    if nice:
        os.nice(nice)
    while not stop.is_set():
        render()


def _render_one(state: Path) -> Callable[[], object]:
    settings = load_settings(env={}, flags={"watch": state.parent / "inbox", "state_dir": state})
    engine = create_db_engine(settings.db_url)
    builder = ReportBuilder(settings, session_factory(engine))
    with builder.sessions() as session:
        scan_id = session.scalar(select(Scan.id).where(Scan.source_name == "busi/synthetic_busi.png"))
    data = builder.scan_data(scan_id, False)
    images = builder.images(data)
    template = load_template(data.task)
    return lambda: render_scan(data, images, template, report_fonts())


def _process_target(state: Path, stop, nice: int) -> None:  # type: ignore[no-untyped-def]
    _render_forever(stop, _render_one(state), nice)


def placement(root: Path, seconds: float) -> list[tuple[str, float]]:
    """The stand-in loop's rate alone, with reports rendered in a thread, in a process, in a nice process."""
    import multiprocessing
    import threading

    state = root / "pages" / "state"
    out = [("alone", _python_loop_rate(seconds))]
    stop = threading.Event()
    thread = threading.Thread(target=_render_forever, args=(stop, _render_one(state)))
    thread.start()
    out.append(("reports in a thread", _python_loop_rate(seconds)))
    stop.set()
    thread.join()
    context = multiprocessing.get_context("forkserver")
    for nice in (0, 10):
        stop_p = context.Event()
        proc = context.Process(target=_process_target, args=(state, stop_p, nice))
        proc.start()
        time.sleep(3.0)  # imports
        out.append((f"reports in a process, nice {nice}", _python_loop_rate(seconds)))
        stop_p.set()
        proc.join(30)
    out.append(("alone, again", _python_loop_rate(seconds)))
    return out


# -- 3. throughput at load -------------------------------------------------------------------------


class Run:
    """``meddaemon start`` on a fresh folder, reports on or off."""

    def __init__(self, workdir: Path, model: Path, reports: bool, nice: int) -> None:
        self.inbox, self.state = workdir / "inbox", workdir / "state"
        self.staging = self.inbox / ".staging"
        self.staging.mkdir(parents=True)
        (self.inbox / "busi").mkdir()
        self.db = self.state / "meddaemon.db"
        settings = load_settings(env={}, flags={"watch": str(self.inbox), "state_dir": str(self.state)})
        engine = create_db_engine(settings.db_url)
        upgrade(engine)
        with transaction(session_factory(engine)) as session:
            registry.import_version(session, model, settings.models_dir)
            registry.promote(session, "busi", "v1")
        engine.dispose()
        env = {k: v for k, v in os.environ.items() if not k.startswith("MEDDAEMON_")}
        env["MEDDAEMON_REPORTS"] = "true" if reports else "false"
        env["MEDDAEMON_REPORTS_NICE"] = str(nice)
        self.log = (workdir / "daemon.log").open("wb")
        cmd = [
            str(bench.MEDDAEMON),
            "start",
            "--watch",
            str(self.inbox),
            "--state-dir",
            str(self.state),
            "--workers",
            "2",
        ]
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=self.log, env=env, start_new_session=True)

    def drop(self, files: list[Path]) -> float:
        for src in files:
            shutil.copyfile(src, self.staging / src.name)
        t0 = time.monotonic()
        for src in files:
            os.rename(self.staging / src.name, self.inbox / "busi" / src.name.split("__", 1)[1])
        return t0

    def wait(self, sql: str, n: int, timeout: float = 600) -> float:
        deadline = time.monotonic() + timeout
        while bench.count(self.db, sql) < n:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"gave up waiting ({sql}); see {self.log.name}")
            time.sleep(0.02)
        return time.monotonic()

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(60)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)


#: configuration -> (reports on, niceness of the report process)
CONFIGS = {"on": (True, 10), "off": (False, 0), "on-nice0": (True, 0)}


def throughput(
    root: Path, files: int, rounds: int, quiet_wait: float, configs: list[str]
) -> list[dict[str, float | bool | str]]:
    model = bench.write_model(root / "model", "mobilenet_v2", BUILTIN_TASKS["busi"].contract)
    corpus = root / "corpus"
    results: list[dict[str, float | bool | str]] = []
    for r in range(rounds):
        for config in configs if r % 2 == 0 else configs[::-1]:
            reports, nice = CONFIGS[config]
            burst = bench.make_pngs(corpus / f"{r}{reports}", f"synthetic_{r}{int(reports)}", files, 256, seed=10 + r)
            warm = bench.make_pngs(corpus / f"w{r}{reports}", f"synthetic_w{r}{int(reports)}", 16, 256, seed=99 + r)
            run = Run(root / f"run{r}-{config}", model, reports, nice)
            try:
                run.wait(DONE_SQL, 0)
                run.drop(warm)
                run.wait(REPORTED_SQL if reports else DONE_SQL, len(warm), 300)  # the report process is up
                bench.wait_quiet(quiet_wait)
                with bench.Meter(run.proc.pid) as meter:
                    t0 = run.drop(burst)
                    t_done = run.wait(DONE_SQL, len(warm) + files)
                t_reported = run.wait(REPORTED_SQL, len(warm) + files) if reports else t_done
            finally:
                run.stop()
            results.append(
                {
                    "config": config,
                    "reports": reports,
                    "ips": files / (t_done - t0),
                    "wall": t_done - t0,
                    "all_reported": t_reported - t0,
                    "foreign": meter.foreign,
                    "cores": meter.daemon_cpu / meter.wall,
                }
            )
            print(f"  {config}: {results[-1]}", file=sys.stderr)
    return results


# -- 4. the model card's figures ---------------------------------------------------------------------


def card_figures(root: Path, repeats: int) -> list[tuple[str, int, float, float]]:
    """(figure set, images in the grid, median s, slowest s) of ``write_figures``, as in the module docstring."""
    busi = BUILTIN_TASKS["busi"]
    data = write_phantoms("busi", root / "busi", count=12, size=48, seed=5).root
    config = TrainConfig.from_task(
        busi, architecture="small_cnn", epochs=3, batch_size=16, lr=1e-3, image_size=32, seed=0
    )
    run = retrain(busi, data, config, root / "run", version="card")
    dataset = ScanDataset(run.split.samples(run.index, "test"), busi.labels, busi.kind, run.result.contract)
    images = [dataset.image(i) for i in range(min(12, len(dataset)))]
    validation = run.result.validation
    rng = np.random.default_rng(0)
    labels = tuple(f"finding{j}" for j in range(14))
    truth14 = (rng.random((20, 14)) < 0.3).astype(np.int64)
    probs14 = np.clip(truth14 * 0.5 + rng.random((20, 14)) * 0.5, 0, 1)
    sets = {
        "busi (multiclass), 3 epochs": dict(
            kind="multiclass", labels=busi.labels, probabilities=validation.probabilities, truth=validation.truth,
            thresholds=None, model=run.result.model, images=images,
        ),
        "14 labels (multilabel), 20 rows": dict(
            kind="multilabel", labels=labels, probabilities=probs14, truth=truth14,
            thresholds=dict.fromkeys(labels, 0.5), model=build_model("small_cnn", 1, 14).eval(), images=images[:5],
        ),
    }  # fmt: skip
    rows = []
    for name, figure_set in sets.items():

        def draw(figure_set: dict = figure_set) -> int:
            write_figures(root / "figures", history=run.result.history, contract=run.result.contract, **figure_set)
            return len(figure_set["images"])

        draw()  # warm-up: matplotlib's fonts and caches
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            draw()
            times.append(time.perf_counter() - t0)
        rows.append((name, len(figure_set["images"]), statistics.median(times), max(times)))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=20, help="timed builds of each report kind (20)")
    parser.add_argument("--files", type=int, default=400, help="PNGs per throughput run (400)")
    parser.add_argument("--rounds", type=int, default=2, help="pairs of runs, reports on and off (2)")
    parser.add_argument("--configs", default="on,off", help=f"throughput configurations, of {list(CONFIGS)} (on,off)")
    parser.add_argument("--quiet-wait", type=float, default=10.0, help="max s to wait for a quiet machine (10)")
    parser.add_argument("--placement", type=float, default=5.0, help="s per placement measurement (0: skip)")
    parser.add_argument("--card-repeats", type=int, default=5, help="timed model card figure sets (5; 0: skip)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = parser.parse_args()
    top = Path(tempfile.mkdtemp(prefix="meddaemon-reportbench-"))
    load = os.getloadavg()
    try:
        pages = per_page(top / "pages", args.repeats) if args.repeats else []
        places = placement(top, args.placement) if args.placement else []
        configs = [c for c in args.configs.split(",") if c]
        runs = throughput(top / "load", args.files, args.rounds, args.quiet_wait, configs) if args.files else []
        cards = card_figures(top / "card", args.card_repeats) if args.card_repeats else []
    finally:
        if not args.keep:
            shutil.rmtree(top, ignore_errors=True)
    cpu = platform.processor() or platform.machine()
    print(
        f"\nMachine: {psutil.cpu_count()} cores ({cpu}), {psutil.virtual_memory().total / 2**30:.0f} GB, "
        f"Python {platform.python_version()}; load average at start {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f}, "
        f"at end {os.getloadavg()[0]:.2f}"
    )
    if pages:
        print("\n| report | pages | render (ms/page) | end to end (ms/page) | goal <= 50 ms |")
        print("|---|---:|---:|---:|---|")
        for kind, n, render_ms, e2e_ms in pages:
            print(f"| {kind} | {n} | {render_ms:.1f} | {e2e_ms:.1f} | {'met' if e2e_ms <= 50 else 'NOT met'} |")
    if places:
        print("\n| the stand-in main loop (pure Python) | rows/s | against alone |")
        print("|---|---:|---:|")
        for name, rate in places:
            print(f"| {name} | {rate:,.0f} | {100 * (rate - places[0][1]) / places[0][1]:+.0f}% |")
    if runs:
        print("\n| reports | files/s (drop to all results) | drop to all reported (s) | daemon cores | other load |")
        print("|---|---:|---:|---:|---:|")
        for r in runs:
            print(
                f"| {r['config']} | {r['ips']:.1f} | {r['all_reported']:.1f} | {r['cores']:.2f} | {r['foreign']:.2f} |"
            )
        medians = {c: statistics.median(float(r["ips"]) for r in runs if r["config"] == c) for c in configs}
        off = medians.get("off")
        for config, ips in medians.items():
            change = f": {100 * (ips - off) / off:+.1f}% against off (goal >= -5%)" if off and config != "off" else ""
            print(f"median files/s, {config}: {ips:.1f}{change}")
    if cards:
        print(f"\n| model card figures (4 PNGs) | grid images | median s | slowest s (of {args.card_repeats}) |")
        print("|---|---:|---:|---:|")
        for name, n, median_s, slowest_s in cards:
            print(f"| {name} | {n} | {median_s:.2f} | {slowest_s:.2f} |")


if __name__ == "__main__":
    main()
