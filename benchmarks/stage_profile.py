"""CPU time per scan, by stage, of a ``meddaemon start --once`` run (issue 16).

The daemon runs in a child process exactly as the CLI runs it (``meddaemon start --once``, called
in-process so that the stages can be timed), over SYNTHETIC 256x256 grey-noise PNGs in
``inbox/busi/`` with a SYNTHETIC, untrained model promoted (mobilenet_v2 by default, busi,
1x224x224). The stage functions are wrapped with a small profiler that charges each call its
**thread CPU time** (``time.thread_time``), exclusive of the stages it calls; a transaction is charged
to the daemon function that opened it (found on the stack by qualified name). CPU time, not wall
time: it does not grow when the machine is busy with other work.

* The forward pass is what is left of the process's CPU time (``os.times``) once every other stage
  and every other thread is accounted for: the calling thread's share plus ONNX Runtime's (or
  torch's) own thread pool, idle spinning included.
* Start-up (folders, schema, registration, the model's load and backend choice) is counted apart;
  the per-scan figures divide the rest by the files processed.
* ``--workers 0`` (the default here) keeps reading, decoding and preprocessing in the daemon's own
  process so that they can be timed; with workers they happen in child processes, counted only in
  the total (``children``).

    PYTHONPATH=$PWD/src .venv/bin/python benchmarks/stage_profile.py                 # 800 files, reports off then on
    PYTHONPATH=$PWD/src .venv/bin/python benchmarks/stage_profile.py --files 300 --configs noreports
    PYTHONPATH=$PWD/src .venv/bin/python benchmarks/stage_profile.py --cprofile /tmp/once.prof  # + cProfile
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))

#: stage names in table order (the forward pass and start-up are added by the parent)
STAGES = [
    "intake: read + SHA-256",
    "decoding",
    "routing",
    "preprocessing",
    "tx: claim inbox files",
    "tx: record batch (register, route)",
    "tx: moves still due",
    "tx: moves done",
    "tx: result ids and hashes",
    "tx: store results",
    "tx: sweep",
    "tx: archive claim",
    "tx: other",
    "moves (rename, fsync, reason files)",
    "inbox scan",
    "heatmap arrays (CAM)",
    "heatmap files (writer threads)",
    "log lines",
    "report: claim",
    "report: read rows",
    "report: model view + overlays",
    "report: render (reportlab)",
    "report: write PDF + fsync",
    "report: record (tx)",
    "loop and other (main thread)",
]
#: (qualified name of a frame on the stack, stage) for transactions, nearest frame first
TX_OWNERS = [
    ("IntakeStage._claim_inbox_files", "tx: claim inbox files"),
    ("IntakeStage._harvest_group", "tx: record batch (register, route)"),
    ("Daemon._carry_out.<locals>.clear", "tx: moves done"),
    ("Daemon._carry_out", "tx: moves still due"),
    ("ArchiveStage.archive_reported", "tx: archive claim"),
    ("InferenceStage._shas", "tx: result ids and hashes"),
    ("InferenceStage._store", "tx: store results"),
    ("InferenceStage.sweep", "tx: sweep"),
    ("Reporter._claim", "report: claim"),
    ("ReportBuilder.commit", "report: record (tx)"),
    ("Daemon.prepare", "start-up"),
    ("Daemon._join", "start-up"),
]


@dataclass
class StageClock:
    """Thread CPU time per stage, exclusive of nested stages."""

    cpu: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    calls: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    local: threading.local = field(default_factory=threading.local)
    lock: threading.Lock = field(default_factory=threading.Lock)
    #: CPU charged to stages in the main thread (the rest of the main thread is the loop itself)
    main_charged: float = 0.0

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        stack: list[list[float]] = self.local.__dict__.setdefault("stack", [])
        start = time.thread_time()
        stack.append([0.0])
        try:
            yield
        finally:
            spent = time.thread_time() - start
            children = stack.pop()[0]
            if stack:
                stack[-1][0] += spent
            with self.lock:
                self.cpu[name] += spent - children
                self.calls[name] += 1
                if not stack and threading.current_thread() is threading.main_thread():
                    self.main_charged += spent

    def wrap(self, owner: Any, attribute: str, name: str | Callable[[], str]) -> None:
        original = getattr(owner, attribute)
        clock = self

        @functools.wraps(original)
        def timed(*args: Any, **kwargs: Any) -> Any:
            with clock.stage(name() if callable(name) else name):
                return original(*args, **kwargs)

        setattr(owner, attribute, timed)

    def wrap_context(self, owner: Any, attribute: str, name: Callable[[], str]) -> None:
        original = getattr(owner, attribute)
        clock = self

        @contextmanager
        def timed(*args: Any, **kwargs: Any) -> Iterator[Any]:
            with clock.stage(name()), original(*args, **kwargs) as value:
                yield value

        setattr(owner, attribute, timed)


def _tx_owner() -> str:
    frame = sys._getframe(2)
    names = []
    while frame is not None:
        names.append(frame.f_code.co_qualname)
        frame = frame.f_back
    for qualname in names:
        for owner, stage in TX_OWNERS:
            if qualname == owner:
                return stage
    return "tx: other"


def instrument(clock: StageClock) -> None:
    """Wrap the daemon's stage functions (before the daemon is built: some are bound at construction)."""
    from meddaemon.daemon import filing, intake, intake_stage, reporter, service
    from meddaemon.daemon import inference as daemon_inference
    from meddaemon.daemon import loader as model_loader
    from meddaemon.engine import inference as engine_inference
    from meddaemon.report import builder, output

    clock.wrap(intake, "_read", "intake: read + SHA-256")
    clock.wrap(intake, "decode_bytes", "decoding")
    clock.wrap(intake, "route_scan", "routing")
    from meddaemon.engine import preprocess

    wrapped = preprocess if not hasattr(intake, "to_model_input") else intake  # imported on first use since issue 16
    clock.wrap(wrapped, "to_model_input", "preprocessing")
    for module in (service, intake_stage, reporter, builder):
        clock.wrap_context(module, "transaction", _tx_owner)
    for attribute in ("finish_move", "write_reason", "remove_emptied_shard"):
        clock.wrap(filing, attribute, "moves (rename, fsync, reason files)")
    if hasattr(filing, "sync_folders"):
        clock.wrap(filing, "sync_folders", "moves (rename, fsync, reason files)")
    clock.wrap(service.Daemon, "rescan", "inbox scan")
    clock.wrap(engine_inference.ServedModel, "predict", "forward (calling thread)")
    clock.wrap(engine_inference, "cams_from_features", "heatmap arrays (CAM)")
    clock.wrap(daemon_inference, "write_heatmap_files", "heatmap files (writer threads)")
    clock.wrap(model_loader, "load_and_time", "start-up")
    clock.wrap(service.Daemon, "prepare", "start-up")
    # a round's rows are read together (``scans_data``); a checkout before that read them one scan at a time
    rows = "scans_data" if hasattr(builder.ReportBuilder, "scans_data") else "scan_data"
    clock.wrap(builder.ReportBuilder, rows, "report: read rows")
    clock.wrap(builder.ReportBuilder, "images", "report: model view + overlays")
    clock.wrap(builder, "render_scan", "report: render (reportlab)")
    clock.wrap(builder, "render_study", "report: render (reportlab)")
    clock.wrap(output, "write_pdf_aside", "report: write PDF + fsync")
    clock.wrap(output.PdfAside, "put_in_place", "report: write PDF + fsync")
    import logging

    clock.wrap(logging.Logger, "handle", "log lines")


# -- the child: one daemon run ---------------------------------------------------------------------


def child(args: argparse.Namespace) -> None:
    import cProfile

    clock = StageClock()
    instrument(clock)
    from meddaemon.cli import daemon as cli_daemon

    profile = cProfile.Profile(time.thread_time) if args.cprofile else None
    main_start = time.thread_time()
    times_start = os.times()
    wall_start = time.perf_counter()
    result: dict[str, Any] = {}

    def finish() -> None:
        if profile is not None:
            profile.disable()
            profile.dump_stats(args.cprofile)
        times = os.times()
        main = time.thread_time() - main_start
        clock.cpu["loop and other (main thread)"] = main - clock.main_charged
        result.update(
            wall=time.perf_counter() - wall_start,
            process=(times.user - times_start.user) + (times.system - times_start.system),
            children=(times.children_user - times_start.children_user)
            + (times.children_system - times_start.children_system),
            main=main,
            cpu=dict(clock.cpu),
            calls=dict(clock.calls),
        )
        Path(args.out).write_text(json.dumps(result))

    original_exit = cli_daemon._exit

    def exit_after_dump(daemon: Any, code: int) -> Any:
        finish()
        return original_exit(daemon, code)

    cli_daemon._exit = exit_after_dump
    if profile is not None:
        profile.enable()
    cli_daemon.start.main(args.daemon_args, standalone_mode=False)


# -- the parent ------------------------------------------------------------------------------------


@dataclass
class StageRun:
    config: str
    files: int
    wall: float
    process: float
    children: float
    main: float
    cpu: dict[str, float]

    @property
    def startup(self) -> float:
        return self.cpu.get("start-up", 0.0)

    def forward(self) -> float:
        """Process CPU not charged to any other stage: the forward pass with its thread pool."""
        return self.process - sum(v for k, v in self.cpu.items() if k != "forward (calling thread)")

    def outside_forward(self) -> float:
        return sum(self.cpu.get(stage, 0.0) for stage in STAGES)


def prepare_run(base: Path, model: Path, sources: list[Path], config: str) -> tuple[Path, Path]:
    from inference import TASK

    from meddaemon.config import load_settings
    from meddaemon.db.engine import create_db_engine, session_factory, transaction
    from meddaemon.db.migrate import upgrade
    from meddaemon.engine import registry

    work = base / config
    inbox, state = work / "inbox", work / "state"
    (inbox / TASK).mkdir(parents=True)
    settings = load_settings(env={}, flags={"watch": str(inbox), "state_dir": str(state)})
    engine = create_db_engine(settings.db_url, settings.busy_timeout)
    try:
        upgrade(engine)
        with transaction(session_factory(engine)) as session:
            registry.import_version(session, model, settings.models_dir, tasks=settings.task_specs)
            registry.promote(session, TASK, "v1")
    finally:
        engine.dispose()
    return inbox, state


def run_child(
    inbox: Path, state: Path, files: list[Path], config: str, workers: int, out: Path, cprofile: str | None
) -> dict[str, Any]:
    for source in files:
        os.link(source, inbox / "busi" / source.name)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEDDAEMON_")}
    env["MEDDAEMON_HEATMAPS"] = "false" if config == "noheatmaps" else "true"
    env["MEDDAEMON_REPORTS"] = "true" if config == "reports" else "false"
    env["MEDDAEMON_REPORT_WORKERS"] = "1"  # the reports in this process, where their stages are timed
    daemon_args = ["--once", "--watch", str(inbox), "--state-dir", str(state), "--workers", str(workers)]
    cmd = [sys.executable, __file__, "--child", "--out", str(out), *(["--cprofile", cprofile] if cprofile else [])]
    cmd += ["--", *daemon_args]
    with (out.parent / f"{out.stem}.log").open("wb") as log:
        subprocess.run(cmd, check=True, stdout=log, stderr=log, env=env)
    return json.loads(out.read_text())


def table(runs: list[StageRun]) -> str:
    head = "| stage (ms of CPU per scan) | " + " | ".join(r.config for r in runs) + " |"
    lines = [head, "|---|" + "---:|" * len(runs)]
    for stage in STAGES:
        values = [r.cpu.get(stage, 0.0) * 1000 / r.files for r in runs]
        if all(v < 0.005 for v in values):
            continue
        lines.append(f"| {stage} | " + " | ".join(f"{v:.2f}" for v in values) + " |")
    outside = [r.outside_forward() * 1000 / r.files for r in runs]
    lines.append("| **outside the forward pass, total** | " + " | ".join(f"**{v:.2f}**" for v in outside) + " |")
    forward = [r.forward() * 1000 / r.files for r in runs]
    lines.append("| forward pass (all its threads) | " + " | ".join(f"{v:.2f}" for v in forward) + " |")
    lines.append(
        "| children (decoding workers) | " + " | ".join(f"{r.children * 1000 / r.files:.2f}" for r in runs) + " |"
    )
    lines.append("| start-up, whole run (ms) | " + " | ".join(f"{r.startup * 1000:.0f}" for r in runs) + " |")
    lines.append("| wall, whole run (s) | " + " | ".join(f"{r.wall:.1f}" for r in runs) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--files", type=int, default=800)
    parser.add_argument("--arch", default="mobilenet_v2")
    parser.add_argument("--size", type=int, default=256, help="PNG side (pixels)")
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--configs", default="noreports,reports", help="noreports, reports, noheatmaps")
    parser.add_argument("--cprofile", help="also write a cProfile (main thread, thread CPU) to this path prefix")
    parser.add_argument("--keep", action="store_true")
    parser.add_argument("daemon_args", nargs="*")
    args = parser.parse_args()
    if args.child:
        child(args)
        return

    from inference import make_pngs, write_model

    from meddaemon.engine.tasks import InputContract

    base = Path(tempfile.mkdtemp(prefix="stage-profile-"))
    try:
        contract = InputContract(1, 224, 224, (0.449,), (0.226,), modalities=("US",))
        model = write_model(base / "model", args.arch, contract)
        sources = make_pngs(base / "pngs", "synthetic", args.files, args.size, seed=16)
        warm = make_pngs(base / "warm", "warm", len(args.configs.split(",")), args.size, seed=17)
        runs = []
        for config, warm_png in zip(args.configs.split(","), warm, strict=True):
            inbox, state = prepare_run(base, model, sources, config)
            # a warm-up --once over one file: the model is loaded and its backend choice and ONNX graph
            # kept in the version's folder, as after any first start (an empty inbox loads no model)
            run_child(inbox, state, [warm_png], config, args.workers, base / f"{config}-warm.json", None)
            load = os.getloadavg()
            cprofile = f"{args.cprofile}.{config}" if args.cprofile else None
            raw = run_child(inbox, state, sources, config, args.workers, base / f"{config}.json", cprofile)
            run = StageRun(config, args.files, raw["wall"], raw["process"], raw["children"], raw["main"], raw["cpu"])
            runs.append(run)
            print(
                f"{config}: wall {run.wall:.1f} s, process CPU {run.process:.1f} s, load before {load[0]:.2f}",
                file=sys.stderr,
            )
        print(table(runs))
    finally:
        if args.keep:
            print(f"kept {base}", file=sys.stderr)
        else:
            shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
