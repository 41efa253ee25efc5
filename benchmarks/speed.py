"""The daemon against what a user would run instead, side by side (issue 16), and the goal checks.

Every contender classifies the same SYNTHETIC 256x256 grey-noise PNGs with the same SYNTHETIC,
untrained model (busi, 1x224x224, randomly initialised: speed figures only), in one run, the rounds
interleaved (contender order rotates every round), and the median of the rounds is reported:

On a machine with a GPU the daemon serves the model there (its default device), and so do the
scripts a user would write; the table then adds the raw CUDA forward as the daemon serves it, which
becomes the limit the ratios use (``benchmarks/gpu.sh`` runs it there).

* **raw ONNX Runtime / raw eager, bs 16**: the forward pass alone, in this process, over
  ``files / 16`` batches of the same model as the daemon loads it (no file is read); ONNX Runtime
  both ways the daemon can run it, one batch at a time on every thread and two batches at once on
  half the threads each (``concurrent_batches``): the faster of the two is the limit the ratios use;
* **DataLoader script**: what a user writes instead, a whole process: ``torch.utils.data.DataLoader``
  (2 workers, batch 16; PIL, resize, normalise), eager PyTorch, probabilities to a CSV;
* **seed loop**: the seeds' one-image loop, a whole process: PIL, resize, normalise, ``model(x[None])``;
* **meddaemon --once**: ``meddaemon start --once`` over the inbox, a whole process, heatmaps on and
  reports off, then with PDF reports and archiving. Each round starts from a copy of a state
  directory in which the model was imported, promoted and loaded once (its backend choice and
  ONNX graph kept beside it, as after any first start).

Goal checks: ``--once`` on an empty inbox with the model served (whole process); CPU per scan
outside the forward pass (``stage_profile.py``, heatmaps on, reports off, ``--workers 0``); a
warmed daemon in continuous mode (``meddaemon start``) per architecture, against the raw forward of
the backend it serves with: its rate over the whole burst (from the renames to the last result,
the 2 s stability window every file waits before it is read included) and streaming (between the
burst's tenth result in ten and its tenth from the end, the pipeline full at both: the rate a
steady stream of files gets, which the goal is about). Beside them, in brackets, the ``--once``
runs' pace from their first result to their last (read back from their rows, as ``--timeline``
does): the whole run's ratio also holds the start, which 800 files cannot make up for
(benchmarks/README.md, issue 16's thirteenth pass).

    PYTHONPATH=$PWD/src .venv/bin/python benchmarks/speed.py                      # 800 files, 3 rounds
    PYTHONPATH=$PWD/src .venv/bin/python benchmarks/speed.py --files 200 --rounds 1 --continuous mobilenet_v2=200
    PYTHONPATH=$PWD/src .venv/bin/python benchmarks/speed.py --continuous-only --switch-intervals-ms 5,0.2

``--once-against SRC`` measures one change instead: ``--once`` (reports off) over the files and on an
empty inbox, this tree's code against another checkout's ``src`` (a ``git worktree`` of the commit
before), rounds alternated, nothing else run; with ``--once-reports``, PDF reports and archiving on:

    git worktree add /tmp/before HEAD~1
    .venv/bin/python benchmarks/speed.py --once-against /tmp/before/src --rounds 5

``--timeline`` says where a ``--once`` run's time goes instead: each run's milestones (the files
found by the inbox's first scan, the first one stable, the first scan row, the first and the last
result, the process's end), read back from the rows it wrote, with the default stability window
and with none (``--stable-seconds 0``), alternated, and the raw forward between the rounds:

    PYTHONPATH=$PWD/src .venv/bin/python benchmarks/speed.py --timeline --rounds 4
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))

import stage_profile  # noqa: E402
import torch  # noqa: E402
from inference import MEDDAEMON, TASK, DaemonRun, Forwards, make_pngs, write_model  # noqa: E402

from meddaemon.config import Settings  # noqa: E402
from meddaemon.engine.tasks import GREY_MEAN, GREY_STD, InputContract  # noqa: E402

SIZE = 224
BATCH = 16
CONTRACT = InputContract(1, SIZE, SIZE, (0.449,), (0.226,), modalities=("US",))

#: the scripts a user would write instead (run as whole processes: python, torch, the model, the files)
USER_PRELUDE = textwrap.dedent(
    f"""
    import csv, sys, time
    from pathlib import Path
    import torch
    from PIL import Image
    from torchvision import transforms
    from meddaemon.engine.registry import load_version
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = load_version(Path(sys.argv[1])).model.eval().to(device)
    files = sorted(Path(sys.argv[2]).glob("*.png"))
    preprocess = transforms.Compose([
        transforms.Resize(({SIZE}, {SIZE})), transforms.ToTensor(), transforms.Normalize({GREY_MEAN}, {GREY_STD})
    ])
    """
)
DATALOADER = USER_PRELUDE + textwrap.dedent(
    f"""
    class Files(torch.utils.data.Dataset):
        def __len__(self):
            return len(files)
        def __getitem__(self, i):
            return preprocess(Image.open(files[i]).convert("L")), str(files[i].name)
    if __name__ == "__main__":
        loader = torch.utils.data.DataLoader(Files(), batch_size={BATCH}, num_workers=2)
        with open(sys.argv[3], "w", newline="") as out, torch.inference_mode():
            writer = csv.writer(out)
            for x, names in loader:
                for name, p in zip(names, torch.softmax(model(x.to(device)), dim=1).tolist()):
                    writer.writerow([name, *p])
    """
)
SEED_LOOP = USER_PRELUDE + textwrap.dedent(
    """
    with torch.no_grad():
        for path in files:
            x = preprocess(Image.open(path).convert("L"))
            torch.softmax(model(x[None].to(device)), dim=1).cpu()
    """
)


@dataclass
class Contender:
    name: str
    run: Callable[[], float]  # seconds for the files
    seconds: list[float] = field(default_factory=list)


def load_average() -> str:
    return " / ".join(f"{v:.1f}" for v in os.getloadavg())


def whole_process(cmd: list[str], env: dict[str, str] | None = None, log: Path | None = None) -> float:
    started = time.perf_counter()
    with (log or Path(os.devnull)).open("ab") as out:
        subprocess.run(cmd, check=True, stdout=out, stderr=out, env=env, stdin=subprocess.DEVNULL)
    return time.perf_counter() - started


class StateTemplate:
    """A state directory with the model imported, promoted and loaded once (backend choice and ONNX
    graph kept in its version folder); each round runs in a fresh copy of it. The warm-up scan is
    taken all the way (reported, archived), so that nothing waits in the copies: the check on an
    empty inbox measured 2.66 s while it also wrote that scan's report (1.1 s without it)."""

    def __init__(self, base: Path, model: Path, warmup_png: Path) -> None:
        self.root = base / "template"
        inbox, state = stage_profile.prepare_run(base, model, [], "template")
        os.link(warmup_png, inbox / TASK / warmup_png.name)
        env = daemon_env(reports=True)
        whole_process(once_cmd(inbox, state), env, base / "template.log")
        self.inbox, self.state = inbox, state

    def copy(self, dest: Path) -> tuple[Path, Path]:
        shutil.copytree(self.root, dest)
        return dest / "inbox", dest / "state"


#: ``concurrent_batches`` of the ``--once`` daemons (``--concurrent-batches``; None: the default)
CONCURRENT_BATCHES: int | None = None


def daemon_env(reports: bool, heatmaps: bool = True, code: Path | None = None) -> dict[str, str]:
    """The ``--once`` daemons' environment; ``code``: the ``src`` folder they import meddaemon from."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEDDAEMON_")}
    if code is not None:
        env["PYTHONPATH"] = str(code)
    env["MEDDAEMON_HEATMAPS"] = "true" if heatmaps else "false"
    env["MEDDAEMON_REPORTS"] = "true" if reports else "false"
    if CONCURRENT_BATCHES is not None:
        env["MEDDAEMON_CONCURRENT_BATCHES"] = str(CONCURRENT_BATCHES)
    return env


def once_cmd(inbox: Path, state: Path) -> list[str]:
    return [str(MEDDAEMON), "start", "--once", "--watch", str(inbox), "--state-dir", str(state)]


def once_over(template: StateTemplate, files: list[Path], dest: Path, reports: bool, code: Path | None = None) -> float:
    inbox, state = template.copy(dest)
    for source in files:
        os.link(source, inbox / TASK / source.name)
    seconds = whole_process(once_cmd(inbox, state), daemon_env(reports, code=code), dest.with_suffix(".log"))
    left = sum(1 for _ in (inbox / TASK).iterdir())
    if left:
        raise RuntimeError(f"{left} files left in the inbox after --once; see {dest.with_suffix('.log')}")
    shutil.rmtree(dest, ignore_errors=True)
    return seconds


def once_empty(template: StateTemplate, dest: Path, reports: bool, code: Path | None = None) -> float:
    """Seconds of ``--once`` on an empty inbox, in a fresh copy of the template at ``dest``."""
    inbox, state = template.copy(dest)
    seconds = whole_process(once_cmd(inbox, state), daemon_env(reports, code=code), dest.parent / "empty.log")
    shutil.rmtree(dest, ignore_errors=True)
    return seconds


def once_against(
    template: StateTemplate, pngs: list[Path], base: Path, against: Path, rounds: int, reports: bool
) -> None:
    """``--once`` with this tree's code and with ``against``'s, over the files and on an empty
    inbox, alternating (which goes first swaps every round); a table of the rounds and medians."""
    codes = {"this tree": ROOT / "src", str(against): against}
    over: dict[str, list[float]] = {name: [] for name in codes}
    empty: dict[str, list[float]] = {name: [] for name in codes}
    counter = iter(range(1_000_000))
    for round_ in range(rounds):
        names = list(codes) if round_ % 2 == 0 else list(codes)[::-1]
        for name in names:
            over[name].append(once_over(template, pngs, base / f"once-{next(counter)}", reports, codes[name]))
            empty[name].append(once_empty(template, base / f"empty-{next(counter)}", reports, codes[name]))
            figures = f"{over[name][-1]:.2f} s, empty {empty[name][-1]:.2f} s"
            print(f"  round {round_ + 1}: {name}: {figures}", file=sys.stderr)
    what = "PDF reports and archiving" if reports else "reports off"
    print(f"\n`--once` over {len(pngs)} SYNTHETIC PNGs (heatmaps on, {what}) and on an empty inbox, seconds\n")
    print("| round | " + " | ".join(f"{n} | empty" for n in codes) + " |\n|---|" + "---:|---:|" * len(codes))
    for round_ in range(rounds):
        cells = [f"{over[n][round_]:.2f} | {empty[n][round_]:.2f}" for n in codes]
        print(f"| {round_ + 1} | " + " | ".join(cells) + " |")
    medians = [f"{statistics.median(over[n]):.2f} | {statistics.median(empty[n]):.2f}" for n in codes]
    print("| **median** | " + " | ".join(medians) + " |")
    print(f"\nload average at the end: {load_average()}")


@dataclass(frozen=True)
class OnceTimeline:
    """Where a ``--once`` run's time goes: seconds from the process's launch to each milestone, read
    back from the rows it wrote (``discovered_at``, ``stable_at``, ``registered_at``, the results'
    ``created_at``)."""

    stable_seconds: float
    files: int
    wall: float  # the whole process
    seen: float  # the inbox's first scan found the files (their stability window starts)
    stable: float  # the first file's window over
    registered: float  # the first scan row committed
    first_result: float
    last_result: float

    @property
    def streaming(self) -> float | None:
        """Images/s from the first result to the last: the pipeline's pace once it runs; None for a run
        whose results all came at once (one batch: ``--files`` up to ``max_batch``)."""
        span = self.last_result - self.first_result
        return (self.files - 1) / span if span > 0 else None


def streaming_paces(runs: list[OnceTimeline]) -> list[float]:
    """The streaming pace of each run that has one (more than one batch of results)."""
    return [pace for run in runs if (pace := run.streaming) is not None]


def once_timeline(template: StateTemplate, files: list[Path], dest: Path, stable_seconds: float) -> OnceTimeline:
    """One ``--once`` run (heatmaps on, reports off) over ``files`` in a fresh copy of the template,
    with ``stable_seconds`` as the stability window, and its milestones."""
    inbox, state = template.copy(dest)
    for source in files:
        os.link(source, inbox / TASK / source.name)
    command = [*once_cmd(inbox, state), "--stable-seconds", str(stable_seconds)]
    launched = datetime.now(UTC).replace(tzinfo=None)
    wall = whole_process(command, daemon_env(reports=False), dest.with_suffix(".log"))

    def after_launch(column: str, table: str, pick: Callable[[list[datetime]], datetime]) -> float:
        stamps = [datetime.fromisoformat(t) for (t,) in db.execute(f"SELECT {column} FROM {table}")]
        return (pick([t for t in stamps if t >= launched]) - launched).total_seconds()

    left = sum(1 for _ in (inbox / TASK).iterdir())
    if left:
        raise RuntimeError(f"{left} files left in the inbox after --once; see {dest.with_suffix('.log')}")
    with contextlib.closing(sqlite3.connect(state / "meddaemon.db")) as db:
        timeline = OnceTimeline(
            stable_seconds,
            len(files),
            wall,
            seen=after_launch("discovered_at", "scans", min),
            stable=after_launch("stable_at", "scans", min),
            registered=after_launch("registered_at", "scans", min),
            first_result=after_launch("created_at", "results", min),
            last_result=after_launch("created_at", "results", max),
        )
    shutil.rmtree(dest, ignore_errors=True)
    return timeline


def once_timed(template: StateTemplate, files: list[Path], dest: Path, runs: list[OnceTimeline]) -> float:
    """Seconds of a ``--once`` run (reports off, the default window), its milestones kept in ``runs``."""
    runs.append(once_timeline(template, files, dest, Settings.stable_seconds))
    return runs[-1].wall


def timelines(template: StateTemplate, pngs: list[Path], base: Path, forwards: Forwards, rounds: int) -> None:
    """``--once`` with the default stability window and with none, alternated, each run's milestones,
    and the raw forward between the rounds: what bounds the run's ratio to the raw forward."""
    window = Settings.stable_seconds
    runs: list[OnceTimeline] = []
    raw: list[float] = []
    for round_ in range(rounds):
        windows = [window, 0.0] if round_ % 2 == 0 else [0.0, window]
        for seconds in windows:
            runs.append(once_timeline(template, pngs, base / f"timeline-{len(runs)}", seconds))
            print(f"  round {round_ + 1}: window {seconds:g} s: {runs[-1].wall:.2f} s", file=sys.stderr)
        raw.append(max(len(pngs) / raw_forward(forwards, backend, len(pngs)) for backend in ("onnx", "onnx2")))
    limit = statistics.median(raw)
    print(f"\n`meddaemon start --once` over {len(pngs)} SYNTHETIC 256x256 PNGs (heatmaps on, reports off), seconds "
          f"from the launch; raw ONNX Runtime forward {limit:.1f} images/s (median of {len(raw)}, the faster "
          f"way)\n")  # fmt: skip
    print("| window (s) | files seen | first stable | first registered | first result | last result | whole run "
          "| streaming images/s | run / raw forward |\n|---:|---:|---:|---:|---:|---:|---:|---:|---:|")  # fmt: skip
    for run in sorted(runs, key=lambda r: -r.stable_seconds):
        stamps = [run.seen, run.stable, run.registered, run.first_result, run.last_result, run.wall]
        pace = "-" if run.streaming is None else f"{run.streaming:.1f}"
        cells = [f"{run.stable_seconds:g}", *(f"{t:.2f}" for t in stamps), pace]
        print("| " + " | ".join([*cells, f"{len(pngs) / run.wall / limit:.2f}"]) + " |")
    print(f"\nload average at the end: {load_average()}")


def raw_forward(forwards: Forwards, backend: str, files: int) -> float:
    """Seconds for ``files`` images: ``onnx`` one batch at a time on every thread, ``onnx2`` two at
    once on half the threads each, ``eager``, ``cuda`` (as the daemon serves it on a GPU)."""
    makers = {
        "onnx": forwards._onnx,
        "onnx2": forwards._onnx_two_at_once,
        "eager": forwards._eager,
        "cuda": forwards._cuda,
    }
    per_run = 2 * BATCH if backend == "onnx2" else BATCH
    run = makers[backend](forwards.x)
    run()
    started = time.perf_counter()
    for _ in range(max(1, files // per_run)):
        run()
    return (time.perf_counter() - started) * files / (max(1, files // per_run) * per_run)


@dataclass
class Continuous:
    burst: float  # images/s from the renames to the last result
    streaming: float  # images/s in the middle of the burst (between its tenth result in ten and the tenth from the end)
    raw: float  # images/s of the raw forward of the backend served
    backend: str


@dataclass(frozen=True)
class Burst:
    """A continuous run's model and files, written once for every switch interval it runs at."""

    arch: str
    model: Path
    files: list[Path]
    warm: list[Path]

    @classmethod
    def write(cls, arch: str, files: int, base: Path) -> Burst:
        model = write_model(base / f"model-{arch}", arch, CONTRACT)
        burst = make_pngs(base / f"burst-{arch}", "burst", files, 256, seed=161)
        return cls(arch, model, burst, make_pngs(base / f"warm-{arch}", "warm", BATCH, 256, seed=162))


def continuous(burst: Burst, base: Path, switch_interval: float | None = None) -> Continuous:
    """A warmed daemon (``meddaemon start``, default settings, reports off) over the burst's PNGs
    (copies of them) renamed in at once; ``switch_interval``: its interpreter's, in seconds
    (None: Python's)."""
    files = len(burst.files)
    forwards = Forwards(burst.model, SIZE, burst.arch)
    workdir = base / f"continuous-{burst.arch}-{switch_interval}"
    run = DaemonRun(workdir, burst.model, workers=2, heatmaps=True, switch_interval=switch_interval)
    try:
        backend, _ = run.started()
        run.drop(run.stage(burst.warm), 600, "the warm-up")
        _, wall = run.drop(run.stage(burst.files), 3600, "the burst")
        run.check_no_failures()
    finally:
        run.stop()
    with contextlib.closing(sqlite3.connect(run.db)) as db:
        stamps = sorted(
            datetime.fromisoformat(t) for (t,) in db.execute("SELECT MIN(created_at) FROM results GROUP BY scan_id")
        )[-files:]  # the burst's: the warm-up's came before
    # between the k-th result and the k-th from the end, the pipeline full at both ends: from the very
    # first result to the last would credit the window with the batches already in the model at its start
    k = streaming_margin(files)
    streaming = (files - 1 - 2 * k) / (stamps[files - 1 - k] - stamps[k]).total_seconds()
    raw = forwards.batched()
    # ONNX Runtime: the faster of one batch on every thread and two at once, as the daemon may serve either
    limit = max(r.ips for k, r in raw.items() if k.startswith("onnx")) if backend == "onnx" else raw[backend].ips
    return Continuous(files / wall, streaming, limit, backend)


def streaming_margin(files: int) -> int:
    """The results left out at each end of a burst's streaming window; a burst too short for a
    window of a few batches is refused (96 files gave a negative span and a figure of nonsense, 48 an
    IndexError)."""
    k = max(files // 10, 3 * BATCH)
    if files - 1 - 2 * k < 2 * BATCH:
        raise SystemExit(f"--continuous ARCH=FILES needs at least {2 * k + 2 * BATCH + 1} files, not {files}")
    return k


def continuous_checks(archs: str, intervals_ms: str, base: Path) -> list[tuple[str, str, str]]:
    """The warmed continuous daemon's goal checks, for each ``ARCH=FILES`` of ``archs`` and each
    switch interval of ``intervals_ms`` (ms, comma-separated; empty: Python's own)."""
    checks = []
    intervals = [float(v) / 1000 for v in filter(None, intervals_ms.split(","))] or [None]
    for item in filter(None, archs.split(",")):
        arch, _, count = item.partition("=")
        streaming_margin(int(count or 200))  # before anything runs
        burst = Burst.write(arch, int(count or 200), base)
        for interval in intervals:
            run = continuous(burst, base, interval)
            goal = ">= 0.85" if arch == "densenet121" else ">= 0.7"
            what = f"warmed continuous daemon / raw forward ({run.backend}), {arch}"
            if interval is not None:
                what += f", switch interval {interval * 1000:g} ms"
            figures = f"{run.streaming:.1f} (burst {run.burst:.1f}) / {run.raw:.1f} img/s"
            ratios = f"{run.streaming / run.raw:.2f} ({run.burst / run.raw:.2f})"
            checks.append((f"{what}, streaming (burst): {figures}", ratios, goal))
    return checks


def print_checks(checks: list[tuple[str, str, str]]) -> None:
    print("\n| goal check | measured | goal |\n|---|---:|---|")
    for name, value, goal in checks:
        print(f"| {name} | {value} | {goal} |")
    print(f"\nload average at the end: {load_average()}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=800)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--arch", default="mobilenet_v2", help="architecture of the side-by-side table")
    parser.add_argument(
        "--continuous",
        default="densenet121=200,mobilenet_v2=800",
        help="ARCH=FILES,... for the warmed continuous daemon ('' skips it)",
    )
    parser.add_argument(
        "--switch-intervals-ms",
        default="",
        help="MS,...: run each continuous daemon at each of these interpreter switch intervals (default: Python's)",
    )
    parser.add_argument("--continuous-only", action="store_true", help="only the continuous daemons' checks")
    parser.add_argument("--profile-files", type=int, default=800, help="files of the CPU-per-scan check (0 skips)")
    parser.add_argument("--concurrent-batches", type=int, help="the --once daemons' concurrent_batches")
    parser.add_argument("--once-against", type=Path, metavar="SRC", help="only --once: this tree against SRC's code")
    parser.add_argument("--once-reports", action="store_true", help="--once-against with reports and archiving")
    parser.add_argument(
        "--timeline", action="store_true", help="only --once: its milestones, with the stability window and without"
    )
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args()
    global CONCURRENT_BATCHES
    CONCURRENT_BATCHES = args.concurrent_batches

    base = Path(tempfile.mkdtemp(prefix="speed-"))
    print(f"load average at the start: {load_average()}", file=sys.stderr)
    try:
        if args.continuous_only:
            print_checks(continuous_checks(args.continuous, args.switch_intervals_ms, base))
            return
        model = write_model(base / "model", args.arch, CONTRACT)
        pngs = make_pngs(base / "pngs", "synthetic", args.files, 256, seed=16)
        warm = make_pngs(base / "warm", "warm", 1, 256, seed=17)[0]
        template = StateTemplate(base, model, warm)
        if args.once_against:
            once_against(template, pngs, base, args.once_against.resolve(), args.rounds, args.once_reports)
            return
        forwards = Forwards(model, SIZE, args.arch)
        if args.timeline:
            timelines(template, pngs, base, forwards, args.rounds)
            return
        python = sys.executable
        scripts = {"dataloader": base / "dataloader.py", "seed": base / "seed_loop.py"}
        scripts["dataloader"].write_text(DATALOADER)
        scripts["seed"].write_text(SEED_LOOP)
        counter = iter(range(1_000_000))
        once_runs: list[OnceTimeline] = []  # the --once runs without reports, their milestones
        gpu = forwards.served is not None  # the daemon's default device is then the GPU: the limit is its forward
        where = "on the GPU (CUDA)" if gpu else "eager"
        cuda_raw = Contender(
            "raw batched forward, CUDA as the daemon serves it (bf16, channels_last), bs 16",
            lambda: raw_forward(forwards, "cuda", args.files),
        )
        contenders = [
            *([cuda_raw] if gpu else []),
            onnx_one := Contender(
                "raw batched forward, ONNX Runtime, bs 16", lambda: raw_forward(forwards, "onnx", args.files)
            ),
            onnx_two := Contender(
                "raw batched forward, ONNX Runtime, bs 16, two batches at once",
                lambda: raw_forward(forwards, "onnx2", args.files),
            ),
            Contender("raw batched forward, eager PyTorch, bs 16", lambda: raw_forward(forwards, "eager", args.files)),
            dataloader := Contender(
                f"a DataLoader script (2 workers, bs 16, {where}, CSV out)",
                lambda: whole_process(
                    [python, str(scripts["dataloader"]), str(model), str(pngs[0].parent), str(base / "out.csv")]
                ),
            ),
            Contender(
                f"the seeds' one-image loop (PIL, resize, normalise, `model(x[None])`, {where})",
                lambda: whole_process([python, str(scripts["seed"]), str(model), str(pngs[0].parent)]),
            ),
            once_off := Contender(
                "`meddaemon start --once`, heatmaps on, reports off",
                lambda: once_timed(template, pngs, base / f"once-{next(counter)}", once_runs),
            ),
            once_on := Contender(
                "`meddaemon start --once`, heatmaps, PDF reports, archive",
                lambda: once_over(template, pngs, base / f"once-{next(counter)}", reports=True),
            ),
        ]
        empty: list[float] = []
        loads = []
        for round_ in range(args.rounds):
            order = contenders[round_ % len(contenders) :] + contenders[: round_ % len(contenders)]
            for contender in order:
                loads.append(os.getloadavg()[0])
                contender.seconds.append(contender.run())
                print(f"  round {round_ + 1}: {contender.name}: {contender.seconds[-1]:.1f} s", file=sys.stderr)
            empty.append(once_empty(template, base / f"empty-{round_}", reports=True))

        speeds = {c.name: args.files / statistics.median(c.seconds) for c in contenders}
        if gpu:
            limit, limit_name = speeds[cuda_raw.name], "the raw CUDA forward"
        else:  # the faster way to run ONNX Runtime
            limit = max(speeds[onnx_one.name], speeds[onnx_two.name])
            limit_name = "the faster raw ONNX Runtime forward"
        device = torch.cuda.get_device_name() if gpu else "no GPU"
        print(f"\n{args.files} SYNTHETIC 256x256 PNGs, {args.arch} (busi, 1x{SIZE}x{SIZE}, untrained), "
              f"median of {args.rounds} round(s); load average (1 min) during the runs "
              f"{min(loads):.1f} to {max(loads):.1f} on {os.cpu_count()} cores, {device}\n")  # fmt: skip
        print(f"| contender | images/s | / {limit_name} |\n|---|---:|---:|")
        for contender in contenders:
            print(f"| {contender.name} | {speeds[contender.name]:.1f} | {speeds[contender.name] / limit:.2f} |")

        off, on = speeds[once_off.name], speeds[once_on.name]
        checks = [
            ("`--once` on an empty inbox, model served (s)", f"{statistics.median(empty):.2f}", "<= 2 s"),
            (f"--once (reports off) / {limit_name}", f"{off / limit:.2f}", ">= 0.6"),
            ("--once (reports off) / DataLoader script", f"{off / speeds[dataloader.name]:.2f}", ">= 2"),
            ("--once with PDF reports and archive / without", f"{on / off:.2f}", ">= 0.5"),
            (
                f"(--once, reports off, from its first result to its last / {limit_name})",
                f"{statistics.median(paces) / limit:.2f}" if (paces := streaming_paces(once_runs)) else "-",
                "(the pace once it runs; the 0.6 above is of the whole run; - for runs of one batch)",
            ),
        ]
        if args.profile_files:
            files = pngs[: args.profile_files]
            inbox, state = stage_profile.prepare_run(base, model, files, "profile")
            raw = stage_profile.run_child(inbox, state, files, "noreports", 0, base / "profile.json", None)
            measured = {k: raw[k] for k in ("wall", "process", "children", "main", "cpu")}
            profiled = stage_profile.StageRun("noreports", len(files), **measured)
            per_scan = f"{profiled.outside_forward() * 1000 / len(files):.2f}"
            checks.append(("CPU per scan outside the forward pass, heatmaps on, reports off (ms)", per_scan, "<= 2 ms"))
        print_checks(checks + continuous_checks(args.continuous, args.switch_intervals_ms, base))
    finally:
        if args.keep:
            print(f"kept {base}", file=sys.stderr)
        else:
            shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
