"""Inference benchmark: the real daemon, drop to stored result, against the same model's raw forward.

For each architecture (``busi`` task: 3 labels, 1-channel 224x224 input, mean 0.449 / std 0.226; a
randomly initialised, untrained model written with ``registry.save_version``: SYNTHETIC weights, the
numbers below are about speed only), measured in one run on one machine:

1. **raw**: the batched forward of the same model as the daemon loads it (``registry.load_version``),
   ``torch.inference_mode()``, batch ``max_batch`` (16), CPU, median over repeats after warm-up,
   images/s. It is measured again just before every daemon run, and each daemon run is compared
   with the raw figure taken next to it (the machine is shared; its speed drifts).
2. **seed loop**: the seed projects' one-image-at-a-time loop over the same PNGs: PIL open,
   ``convert("L")``, resize to 224x224, to tensor, normalise, ``model(x.unsqueeze(0))``, softmax,
   under ``torch.no_grad()``, images/s.
3. **daemon**: ``meddaemon start`` as a subprocess (fresh inbox and state directory, the model
   imported and promoted before it starts), warmed up with one batch, then N synthetic 256x256 grey
   PNGs renamed from ``inbox/.staging/`` into ``inbox/busi/``; timed from the first rename until every
   scan is ``inferred`` in SQLite (polled every 20 ms). Once per configuration (``--workers``,
   heatmaps on or off with ``MEDDAEMON_HEATMAPS=false``). Ratios: daemon / raw (goal >= 0.85) and
   daemon / seed loop (goal >= 4).
4. **latency**: then, the daemon idle, single PNGs renamed in one at a time (0.4 s apart), each
   timed until its scan is ``inferred`` (polled every 2 ms): p50 / max against the goal
   ``max_wait_ms + one forward of a batch of 1 (measured) + 0.5 s``.
5. **RSS** (mobilenet_v2 only): a long burst, ``--rss-files`` PNGs dropped 1,000 at a time, each
   chunk waited for; the resident set size of the daemon and all its descendants (psutil) sampled
   after every chunk, and its peak (every 0.1 s). Small inputs keep it quick: 64x64 PNGs and a
   model with a 64x64 input contract (``--rss-size``).

Every file is synthetic (``synthetic_*`` names, seeded noise); the model weights are random.

    .venv/bin/python benchmarks/inference.py                     # everything, about 10 minutes on 2 cores
    .venv/bin/python benchmarks/inference.py --arch mobilenet_v2 --rss-files 0
    .venv/bin/python benchmarks/inference.py --configs w2,w2-noheat --files mobilenet_v2=200
    .venv/bin/python benchmarks/inference.py --keep              # keep the temp folder (daemon logs, databases)
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import psutil
import torch
from PIL import Image
from torchvision import transforms

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from dicom_factory import write_png  # noqa: E402

from meddaemon.config import load_settings  # noqa: E402
from meddaemon.db.engine import create_db_engine, transaction  # noqa: E402
from meddaemon.db.engine import session_factory  # noqa: E402
from meddaemon.db.migrate import upgrade  # noqa: E402
from meddaemon.engine import registry  # noqa: E402
from meddaemon.engine.architectures import build_model  # noqa: E402
from meddaemon.engine.tasks import BUILTIN_TASKS, GREY_MEAN, GREY_STD, InputContract  # noqa: E402

MEDDAEMON = Path(sys.executable).parent / "meddaemon"
TASK = "busi"
SPEC = BUILTIN_TASKS[TASK]
MAX_BATCH = 16  # the daemon's default max_batch
MAX_WAIT_MS = 50.0  # the daemon's default max_wait_ms
#: PNGs dropped and waited for before the timed burst: one full batch, so the workers exist and the
#: model has run once
WARMUP = MAX_BATCH
MIB = 1024 * 1024

#: name -> (workers, heatmaps)
CONFIGS = {
    "w2": (2, True),
    "w2-noheat": (2, False),
    "w1": (1, True),
    "w0": (0, True),
    "w0-noheat": (0, False),
    "w1-noheat": (1, False),
}
DEFAULT_CONFIGS = "w2,w2-noheat,w1,w0"
DEFAULT_FILES = {"mobilenet_v2": 400, "densenet121": 200}
SEED_FILES = {"mobilenet_v2": 64, "densenet121": 24}
RAW_REPEATS = {"mobilenet_v2": 8, "densenet121": 4}


# -- helpers ---------------------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def tree(pid: int) -> list[psutil.Process]:
    try:
        proc = psutil.Process(pid)
        return [proc, *proc.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def tree_rss(pid: int) -> int:
    total = 0
    for p in tree(pid):
        with contextlib.suppress(psutil.NoSuchProcess):
            total += p.memory_info().rss
    return total


def tree_cpu(pid: int) -> float:
    """CPU seconds (user + system) of the daemon and its live descendants."""
    total = 0.0
    for p in tree(pid):
        with contextlib.suppress(psutil.NoSuchProcess):
            t = p.cpu_times()
            total += t.user + t.system
    return total


class PeakSampler:
    """The peak RSS of a process tree, sampled every 0.1 s in a thread."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak = tree_rss(pid)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.1):
            self.peak = max(self.peak, tree_rss(self.pid))

    def __enter__(self) -> PeakSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def write_model(folder: Path, architecture: str, contract: InputContract) -> Path:
    """A randomly initialised (SYNTHETIC, untrained) busi model in the registry's format."""
    torch.manual_seed(0)
    model = build_model(architecture, 1, SPEC.num_outputs)
    registry.save_version(
        model,
        task=TASK,
        version="v1",
        labels=SPEC.labels,
        kind=SPEC.kind,
        architecture=architecture,
        input_contract=contract,
        out_dir=folder,
        training_data_fingerprint="synthetic: random initialisation, untrained (benchmark)",
    )
    return folder


def make_pngs(folder: Path, prefix: str, count: int, size: int, seed: int) -> list[Path]:
    """Seeded grey noise PNGs (distinct bytes, so no duplicates): ``busi__<prefix>_NNNNN.png``."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    return [
        write_png(folder / f"busi__{prefix}_{i:05d}.png", rng.integers(0, 256, (size, size), dtype=np.uint8))
        for i in range(count)
    ]


# -- in-process measurements -----------------------------------------------------------------------


def raw_forward(model: torch.nn.Module, size: int, batch: int, repeats: int, warmup: int = 2) -> float:
    """Median seconds of one forward of a (batch, 1, size, size) input under inference_mode."""
    x = torch.randn(batch, 1, size, size, generator=torch.Generator().manual_seed(0))
    times = []
    with torch.inference_mode():
        for i in range(warmup + repeats):
            t0 = time.perf_counter()
            model(x)
            if i >= warmup:
                times.append(time.perf_counter() - t0)
    return statistics.median(times)


def seed_loop(model: torch.nn.Module, files: list[Path], size: int) -> float:
    """The seeds' loop, one image at a time; returns images/s (after 2 untimed images)."""
    preprocess = transforms.Compose(
        [transforms.Resize((size, size)), transforms.ToTensor(), transforms.Normalize(GREY_MEAN, GREY_STD)]
    )

    def one(path: Path) -> torch.Tensor:
        image = Image.open(path).convert("L")
        x = preprocess(image)
        return torch.softmax(model(x.unsqueeze(0)), dim=1)

    with torch.no_grad():
        for path in files[:2]:
            one(path)
        t0 = time.perf_counter()
        for path in files:
            one(path)
        return len(files) / (time.perf_counter() - t0)


# -- the daemon ------------------------------------------------------------------------------------


INFERRED_SQL = "SELECT count(*) FROM scans WHERE state = 'inferred'"
BAD_SQL = "SELECT count(*) FROM scans WHERE state NOT IN ('inferred', 'routed')"


def count(db: Path, sql: str) -> int:
    if not db.exists():
        return 0
    try:
        with contextlib.closing(sqlite3.connect(db, timeout=30)) as conn:
            return conn.execute(sql).fetchone()[0]
    except sqlite3.OperationalError:
        return 0


class DaemonRun:
    """One ``meddaemon start`` on a fresh inbox/state folder with the model already promoted."""

    def __init__(self, workdir: Path, model_folder: Path, workers: int, heatmaps: bool, extra_env: dict | None = None):
        self.workdir = workdir
        self.inbox, self.state = workdir / "inbox", workdir / "state"
        self.staging = self.inbox / ".staging"
        self.db = self.state / "meddaemon.db"
        self.log = workdir / "daemon.log"
        self.staging.mkdir(parents=True)
        (self.inbox / TASK).mkdir()
        self.expected = 0
        settings = load_settings(env={}, flags={"watch": str(self.inbox), "state_dir": str(self.state)})
        engine = create_db_engine(settings.db_url, settings.busy_timeout)
        try:
            upgrade(engine)
            with transaction(session_factory(engine)) as session:
                registry.import_version(session, model_folder, settings.models_dir, tasks=settings.task_specs)
                registry.promote(session, TASK, "v1")
        finally:
            engine.dispose()
        env = {k: v for k, v in os.environ.items() if not k.startswith("MEDDAEMON_")}
        env["MEDDAEMON_HEATMAPS"] = "true" if heatmaps else "false"
        env.update(extra_env or {})
        cmd = [
            str(MEDDAEMON), "start", "--watch", str(self.inbox), "--state-dir", str(self.state),
            "--workers", str(workers), "--rescan-seconds", "30",
        ]  # fmt: skip
        with self.log.open("wb") as err:
            self.proc = subprocess.Popen(
                cmd, stdout=err, stderr=err, stdin=subprocess.DEVNULL, env=env, start_new_session=True
            )

    def stage(self, files: list[Path]) -> list[tuple[Path, Path]]:
        moves = []
        for src in files:
            staged = self.staging / src.name
            shutil.copyfile(src, staged)
            moves.append((staged, self.inbox / src.name.replace("__", "/")))
        return moves

    def wait_for(self, predicate, timeout: float, what: str, every: float = 0.02) -> None:  # type: ignore[no-untyped-def]
        deadline = time.monotonic() + timeout
        while not predicate():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                tail = "\n".join(self.log.read_text("utf-8", "replace").splitlines()[-30:])
                raise RuntimeError(f"gave up waiting for {what} (daemon exit {self.proc.poll()}); its log ends:\n{tail}")
            time.sleep(every)

    def check_no_failures(self) -> None:
        bad = count(self.db, BAD_SQL)
        if bad:
            with contextlib.closing(sqlite3.connect(self.db)) as conn:
                rows = conn.execute(
                    "SELECT state, failure_reason, count(*) FROM scans WHERE state NOT IN ('inferred', 'routed')"
                    " GROUP BY state, failure_reason"
                ).fetchall()
            raise RuntimeError(f"{bad} scans neither routed nor inferred: {rows}; see {self.log}")

    def wait_inferred(self, n: int, timeout: float, what: str, every: float = 0.02) -> None:
        def done() -> bool:
            if count(self.db, INFERRED_SQL) >= n:
                return True
            self.check_no_failures()
            return False

        self.wait_for(done, timeout, what, every)

    def started(self) -> None:
        self.wait_for(lambda: "serving busi/v1" in self.log.read_text("utf-8", "replace"), 120, "start-up", 0.05)

    def drop(self, moves: list[tuple[Path, Path]], timeout: float, what: str) -> tuple[float, float]:
        """Rename the files in, wait for all of them; returns (drop seconds, drop to all inferred seconds)."""
        t_first = time.monotonic()
        for staged, target in moves:
            os.rename(staged, target)
        t_last = time.monotonic()
        self.expected += len(moves)
        self.wait_inferred(self.expected, timeout, what)
        return t_last - t_first, time.monotonic() - t_first

    def one_at_a_time(self, moves: list[tuple[Path, Path]], gap: float = 0.4) -> list[float]:
        """Each file alone into the idle daemon: ms from its rename to its inferred row."""
        out = []
        with contextlib.closing(sqlite3.connect(self.db, timeout=30)) as conn:
            for staged, target in moves:
                time.sleep(gap)
                self.expected += 1
                t0 = time.monotonic()
                os.rename(staged, target)
                while conn.execute(INFERRED_SQL).fetchone()[0] < self.expected:
                    if time.monotonic() - t0 > 60 or self.proc.poll() is not None:
                        raise RuntimeError(f"{target.name} was not inferred within 60 s; see {self.log}")
                    time.sleep(0.002)
                out.append((time.monotonic() - t0) * 1000)
        return out

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                rc = self.proc.wait(60)
            except subprocess.TimeoutExpired:
                rc = None
            if rc != 0:
                print(f"  warning: the daemon exited {rc} after SIGTERM; see {self.log}", file=sys.stderr)

    def kill(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


@dataclass
class DaemonResult:
    arch: str
    config: str
    workers: int
    heatmaps: bool
    files: int
    drop_s: float
    wall_s: float
    raw_ips: float  # the raw forward measured just before this run
    cpu_s: float  # daemon tree CPU seconds during the burst
    result_latency_ms: list[float]
    alone_ms: list[float]
    rss_before: int
    rss_peak: int
    rss_after: int
    heatmap_rows: int
    load: tuple[float, float, float]

    @property
    def ips(self) -> float:
        return self.files / self.wall_s


def run_daemon(
    arch: str,
    config: str,
    model_folder: Path,
    burst: list[Path],
    warmup: list[Path],
    alone: list[Path],
    workdir: Path,
    raw_ips: float,
) -> DaemonResult:
    workers, heatmaps = CONFIGS[config]
    run = DaemonRun(workdir, model_folder, workers, heatmaps)
    try:
        moves, warm_moves, alone_moves = run.stage(burst), run.stage(warmup), run.stage(alone)
        run.started()
        run.drop(warm_moves, 300, "the warm-up files")
        time.sleep(1.0)
        rss_before = tree_rss(run.proc.pid)
        cpu0 = tree_cpu(run.proc.pid)
        load = os.getloadavg()
        with PeakSampler(run.proc.pid) as sampler:
            drop_s, wall_s = run.drop(moves, 120 + 2 * len(moves), f"{len(moves)} inferred scans")
        cpu_s = tree_cpu(run.proc.pid) - cpu0
        rss_after = tree_rss(run.proc.pid)
        time.sleep(1.0)
        alone_ms = run.one_at_a_time(alone_moves)
        run.stop()
    finally:
        run.kill()
    with contextlib.closing(sqlite3.connect(run.db)) as conn:
        burst_names = tuple(f"{TASK}/{p.name.split('__', 1)[1]}" for p in burst)
        latencies = [
            row[1]
            for row in conn.execute(
                "SELECT s.source_name, min(r.latency_ms) FROM results r JOIN scans s ON s.id = r.scan_id"
                " GROUP BY s.id"
            )
            if row[0] in set(burst_names)
        ]
        heatmap_rows = conn.execute("SELECT count(*) FROM heatmaps").fetchone()[0]
    return DaemonResult(
        arch, config, workers, heatmaps, len(moves), drop_s, wall_s, raw_ips, cpu_s, latencies, alone_ms,
        rss_before, max(sampler.peak, rss_after), rss_after, heatmap_rows, load,
    )  # fmt: skip


@dataclass
class RssResult:
    size: int
    chunk: int
    samples: list[tuple[int, int]] = field(default_factory=list)  # (files done, RSS bytes)
    peak: int = 0
    wall_s: float = 0.0
    before: int = 0

    def slope(self, skip_first: bool = True) -> float:
        """Least-squares MiB per 1,000 files over the samples (the first one, warm-up growth, left out)."""
        pts = self.samples[1:] if skip_first and len(self.samples) > 2 else self.samples
        x = np.array([p[0] / 1000 for p in pts])
        y = np.array([p[1] / MIB for p in pts])
        return float(np.polyfit(x, y, 1)[0]) if len(pts) >= 2 else float("nan")


def run_rss(model_folder: Path, files: list[Path], warmup: list[Path], workdir: Path, chunk: int, size: int) -> RssResult:
    run = DaemonRun(workdir, model_folder, 2, True)  # the defaults: 2 workers, heatmaps on
    result = RssResult(size, chunk)
    try:
        moves, warm_moves = run.stage(files), run.stage(warmup)
        run.started()
        run.drop(warm_moves, 300, "the warm-up files")
        time.sleep(1.0)
        result.before = tree_rss(run.proc.pid)
        t0 = time.monotonic()
        with PeakSampler(run.proc.pid) as sampler:
            for start in range(0, len(moves), chunk):
                part = moves[start : start + chunk]
                run.drop(part, 120 + 2 * len(part), f"files {start} to {start + len(part)}")
                done = start + len(part)
                result.samples.append((done, tree_rss(run.proc.pid)))
                print(f"  rss: {done} files, {result.samples[-1][1] / MIB:.0f} MiB", file=sys.stderr)
        result.wall_s = time.monotonic() - t0
        result.peak = sampler.peak
        run.stop()
    finally:
        run.kill()
    return result


# -- output ----------------------------------------------------------------------------------------


@dataclass
class ArchFigures:
    arch: str
    raw_ips: list[float]  # every raw measurement, in order
    b1_ms: float
    seed_ips: float
    seed_files: int


def goal(ok: bool) -> str:
    return "met" if ok else "**not met**"


def tables(figs: dict[str, ArchFigures], results: list[DaemonResult], rss: RssResult | None) -> str:
    out = []
    out.append("### Baselines (same process, no daemon running)\n")
    out.append(
        "| model | raw batched forward, batch 16 (img/s): median of runs [min-max] | forward, batch 1 (ms) "
        "| seed loop (img/s) | raw / seed loop |"
    )
    out.append("|---|---|---:|---:|---:|")
    for f in figs.values():
        med = statistics.median(f.raw_ips)
        out.append(
            f"| {f.arch} | {med:.1f} [{min(f.raw_ips):.1f}-{max(f.raw_ips):.1f}] ({len(f.raw_ips)} runs) "
            f"| {f.b1_ms:.0f} | {f.seed_ips:.1f} ({f.seed_files} files) | {med / f.seed_ips:.1f}x |"
        )
    out.append("\n### Daemon: drop to stored result\n")
    out.append(
        "| model | workers | heatmaps | files | drop to all inferred (s) | daemon img/s | raw img/s (just before) "
        "| daemon / raw (goal >= 0.85) | daemon / seed loop (goal >= 4x) | daemon CPU (cores busy) "
        "| result latency p50 / max (ms) | RSS before / peak / after (MiB) |"
    )
    out.append("|---|---:|---|---:|---:|---:|---:|---|---|---:|---|---|")
    for r in results:
        f = figs[r.arch]
        to_raw = r.ips / r.raw_ips
        to_seed = r.ips / f.seed_ips
        lat = r.result_latency_ms
        out.append(
            f"| {r.arch} | {r.workers} | {'on' if r.heatmaps else 'off'} | {r.files} | {r.wall_s:.1f} | {r.ips:.1f} "
            f"| {r.raw_ips:.1f} | {to_raw:.2f} ({goal(to_raw >= 0.85)}) | {to_seed:.1f}x ({goal(to_seed >= 4)}) "
            f"| {r.cpu_s / r.wall_s:.2f} "
            f"| {statistics.median(lat):.0f} / {max(lat):.0f} "
            f"| {r.rss_before / MIB:.0f} / {r.rss_peak / MIB:.0f} / {r.rss_after / MIB:.0f} |"
        )
    out.append("\n### One file into an idle daemon\n")
    out.append(
        "| model | workers | heatmaps | files | rename to inferred p50 / max (ms) "
        "| goal: max_wait_ms + forward(1) + 500 ms | max within goal |"
    )
    out.append("|---|---:|---|---:|---|---:|---|")
    for r in results:
        f = figs[r.arch]
        target = MAX_WAIT_MS + f.b1_ms + 500
        if r.alone_ms:
            out.append(
                f"| {r.arch} | {r.workers} | {'on' if r.heatmaps else 'off'} | {len(r.alone_ms)} "
                f"| {statistics.median(r.alone_ms):.0f} / {max(r.alone_ms):.0f} | {target:.0f} "
                f"| {goal(max(r.alone_ms) <= target)} (p50 {goal(statistics.median(r.alone_ms) <= target)}) |"
            )
    if rss is not None and rss.samples:
        out.append(f"\n### RSS over {rss.samples[-1][0]:,} files (mobilenet_v2, {rss.size}x{rss.size} input, workers 2, heatmaps on)\n")
        out.append("| files done | " + " | ".join(f"{n:,}" for n, _ in rss.samples) + " |")
        out.append("|---|" + "---:|" * len(rss.samples))
        out.append("| RSS (MiB) | " + " | ".join(f"{b / MIB:.0f}" for _, b in rss.samples) + " |")
        first, last = rss.samples[0][1], rss.samples[-1][1]
        out.append(
            f"\nbefore the burst {rss.before / MIB:.0f} MiB; first sample {first / MIB:.0f}, last {last / MIB:.0f}, "
            f"peak {rss.peak / MIB:.0f} MiB (every 0.1 s); slope {rss.slope():+.2f} MiB per 1,000 files "
            f"(least squares, first sample left out), {rss.slope(False):+.2f} with it; "
            f"{rss.samples[-1][0] / rss.wall_s:.0f} files/s"
        )
    return "\n".join(out)


# -- main ------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="mobilenet_v2,densenet121", help="comma-separated architectures")
    parser.add_argument(
        "--files", default="", help="burst sizes, e.g. mobilenet_v2=400,densenet121=200 (defaults: those)"
    )
    parser.add_argument("--configs", default=DEFAULT_CONFIGS, help=f"daemon configurations, of {list(CONFIGS)}")
    parser.add_argument("--alone", type=int, default=10, help="single files into the idle daemon, per run (10)")
    parser.add_argument("--rss-files", type=int, default=10000, help="files of the RSS run (0: skip)")
    parser.add_argument("--rss-size", type=int, default=64, help="PNG side and model input of the RSS run (64)")
    parser.add_argument("--rss-chunk", type=int, default=1000, help="files per RSS sample (1000)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (logs, databases)")
    args = parser.parse_args()

    archs = [a for a in args.arch.split(",") if a]
    configs = [c for c in args.configs.split(",") if c]
    for c in configs:
        if c not in CONFIGS:
            parser.error(f"unknown configuration {c!r}; known: {list(CONFIGS)}")
    burst_sizes = dict(DEFAULT_FILES)
    for item in filter(None, args.files.split(",")):
        name, _, n = item.partition("=")
        burst_sizes[name] = int(n)

    top = Path(tempfile.mkdtemp(prefix="meddaemon-infbench-"))
    started = time.monotonic()
    load_start = os.getloadavg()
    figs: dict[str, ArchFigures] = {}
    results: list[DaemonResult] = []
    rss: RssResult | None = None
    try:
        size = SPEC.contract.height
        n_burst = max(burst_sizes.get(a, 200) for a in archs)
        corpus = top / "corpus"
        burst_all = make_pngs(corpus, "synthetic", n_burst, 256, seed=1)
        warmup = make_pngs(corpus, "synthetic_warmup", WARMUP, 256, seed=2)
        alone = make_pngs(corpus, "synthetic_alone", args.alone, 256, seed=3)
        print(f"corpus: {n_burst} + {WARMUP} + {args.alone} PNGs 256x256 8-bit grey noise", file=sys.stderr)

        for arch in archs:
            folder = write_model(top / f"model-{arch}", arch, SPEC.contract)
            model = registry.load_version(folder).model.eval()
            repeats = RAW_REPEATS.get(arch, 4)
            b1 = raw_forward(model, size, 1, 10) * 1000
            raw = [MAX_BATCH / raw_forward(model, size, MAX_BATCH, repeats)]
            seed = seed_loop(model, burst_all[: SEED_FILES.get(arch, 24)], size)
            figs[arch] = ArchFigures(arch, raw, b1, seed, SEED_FILES.get(arch, 24))
            print(
                f"{arch}: raw {raw[0]:.1f} img/s at batch {MAX_BATCH}, batch of 1 {b1:.0f} ms, seed loop {seed:.1f} img/s",
                file=sys.stderr,
            )
            burst = burst_all[: burst_sizes.get(arch, 200)]
            for i, config in enumerate(configs):
                raw_now = raw[-1] if i == 0 else MAX_BATCH / raw_forward(model, size, MAX_BATCH, repeats)
                if i:
                    raw.append(raw_now)
                result = run_daemon(
                    arch, config, folder, burst, warmup, alone, top / f"run-{arch}-{config}", raw_now
                )
                results.append(result)
                print(
                    f"{arch} {config}: {result.files} files in {result.wall_s:.1f} s = {result.ips:.1f} img/s "
                    f"(raw {raw_now:.1f}, ratio {result.ips / raw_now:.2f}); one file alone p50 "
                    f"{statistics.median(result.alone_ms):.0f} ms; {result.heatmap_rows} heatmaps",
                    file=sys.stderr,
                )
            raw.append(MAX_BATCH / raw_forward(model, size, MAX_BATCH, repeats))
            del model

        if args.rss_files > 0:
            small = InputContract(1, args.rss_size, args.rss_size, GREY_MEAN, GREY_STD, modalities=("US",))
            folder = write_model(top / "model-rss", "mobilenet_v2", small)
            files = make_pngs(top / "corpus-rss", "synthetic_rss", args.rss_files, args.rss_size, seed=4)
            warm = make_pngs(top / "corpus-rss", "synthetic_rss_warmup", WARMUP, args.rss_size, seed=5)
            print(f"rss: {len(files)} PNGs {args.rss_size}x{args.rss_size}", file=sys.stderr)
            rss = run_rss(folder, files, warm, top / "run-rss", args.rss_chunk, args.rss_size)

        print(
            f"\nmeddaemon inference, {platform.python_implementation()} {platform.python_version()}, "
            f"torch {torch.__version__} ({torch.get_num_threads()} threads), {os.cpu_count()} CPUs "
            f"({platform.processor() or platform.machine()}), CPU only, SYNTHETIC untrained models; "
            f"load average {load_start[0]:.2f} at start, {os.getloadavg()[0]:.2f} at the end; "
            f"{time.monotonic() - started:.0f} s in all\n"
        )
        print(tables(figs, results, rss))
    finally:
        if args.keep:
            print(f"\nkept {top}", file=sys.stderr)
        else:
            shutil.rmtree(top, ignore_errors=True)


if __name__ == "__main__":
    main()
