"""Inference benchmark: the real daemon, drop to stored result, against the same model's raw forward.

For each architecture (``busi`` task: 3 labels, 1-channel 224x224 input, mean 0.449 / std 0.226; a
randomly initialised, untrained model written with ``registry.save_version``: SYNTHETIC weights, the
figures are about speed only), measured in one run on one machine:

1. **raw**: the batched forward of the same model as the daemon loads it (``registry.load_version``),
   batch ``max_batch`` (16), CPU, median over repeats after warm-up, images/s; in eager PyTorch under
   ``torch.inference_mode()``, and in ONNX Runtime (``engine/onnx_backend.OnnxRunner``, logits only),
   the backend the daemon serves with on the CPU when it measures it faster. Measured again before
   every daemon run and once after them; the ratios use the median of these measurements (the
   machine is shared and its speed drifts).
2. **seed loop**: the seed projects' one-image-at-a-time loop over the same PNGs: PIL open,
   ``convert("L")``, resize to 224x224, to tensor, normalise, ``model(x.unsqueeze(0))``, softmax,
   eager PyTorch under ``torch.no_grad()``, images/s.
3. **daemon**: ``meddaemon start`` as a subprocess (fresh inbox and state directory, the model
   imported and promoted before it starts), warmed up with one batch, then N synthetic 256x256 grey
   PNGs renamed from ``inbox/.staging/`` into ``inbox/busi/``; timed from the first rename until every
   scan is ``inferred`` in SQLite (polled every 20 ms). Once per configuration (``--workers``,
   heatmaps on or off with ``MEDDAEMON_HEATMAPS=false``; PDF reports off, ``MEDDAEMON_REPORTS=false``,
   so scans stop at ``inferred``: ``benchmarks/reports.py`` measures what reports cost). Ratios:
   daemon / raw (goal >= 0.85) and daemon / seed loop (goal >= 4).
4. **latency**: then, the daemon idle, single PNGs renamed in one at a time (0.4 s apart), each
   timed until its scan is ``inferred`` (polled every 2 ms): p50 / max against the goal
   ``max_wait_ms + one forward of a batch of 1 (measured, backend in use) + 0.5 s``.
5. **RSS** (mobilenet_v2 only): a long burst, ``--rss-files`` PNGs dropped 1,000 at a time, each
   chunk waited for; the resident set size of the daemon and all its descendants (psutil) sampled
   after every chunk, and its peak (every 0.1 s). Small inputs keep it quick: 64x64 PNGs and a
   model with a 64x64 input contract (``--rss-size``). Once per ``--rss-workers`` value (default
   ``2,0``); a daemon that infers nothing for 20 s is recorded as stalled and the run moves on.

Every measurement records the CPU that *other* processes used meanwhile (system-wide busy time,
steal included, minus this benchmark's and the daemon's own), in cores; before each one the
benchmark waits (up to ``--quiet-wait`` s) for the rest of the machine to be quiet.

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
import re
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable
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
from meddaemon.db.engine import create_db_engine, session_factory, transaction  # noqa: E402
from meddaemon.db.migrate import upgrade  # noqa: E402
from meddaemon.engine import registry  # noqa: E402
from meddaemon.engine.architectures import build_model  # noqa: E402
from meddaemon.engine.inference import ServedModel  # noqa: E402
from meddaemon.engine.tasks import BUILTIN_TASKS, GREY_MEAN, GREY_STD, InputContract  # noqa: E402

try:  # the ONNX Runtime backend the daemon may serve with (optional)
    from meddaemon.engine.onnx_backend import BackendUnavailable, OnnxRunner, run_at_once
except ImportError:  # pragma: no cover
    OnnxRunner = None  # type: ignore[assignment,misc]
    BackendUnavailable = RuntimeError  # type: ignore[assignment,misc]

#: the daemon's console script: beside this Python (its virtual environment), else on the PATH
MEDDAEMON = Path(shutil.which("meddaemon", path=str(Path(sys.executable).parent)) or shutil.which("meddaemon") or "")
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
    "w1-noheat": (1, False),
    "w0-noheat": (0, False),
}
DEFAULT_CONFIGS = "w2,w2-noheat,w1,w0"
DEFAULT_FILES = {"mobilenet_v2": 400, "densenet121": 200}
SEED_FILES = {"mobilenet_v2": 64, "densenet121": 24}
#: (warm-up, timed repeats) of a raw measurement at batch 16
RAW_REPEATS = {"mobilenet_v2": (2, 7), "densenet121": (1, 3)}
SERVING = re.compile(r"serving busi/v1 \(.*\) on (\S+) with (\S+)")
CHOSEN = re.compile(r"(\w+) chosen \(eager (\d+), ONNX Runtime (\d+) images/s")


# -- the machine -----------------------------------------------------------------------------------


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


def tree_uss(pid: int) -> int:
    """Private memory (USS) of the tree: RSS counts the shared libraries (libtorch...) once per process."""
    total = 0
    for p in tree(pid):
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            total += p.memory_full_info().uss
    return total


def tree_cpu(pid: int) -> float:
    """CPU seconds (user + system) of a process and its live descendants."""
    total = 0.0
    for p in tree(pid):
        with contextlib.suppress(psutil.NoSuchProcess):
            t = p.cpu_times()
            total += t.user + t.system
    return total


def busy_seconds() -> float:
    """System-wide CPU seconds not idle (steal included: the hypervisor's other guests)."""
    t = psutil.cpu_times()
    return t.user + t.nice + t.system + t.irq + t.softirq + getattr(t, "steal", 0.0)


class Meter:
    """Wall time, the daemon's CPU seconds, and the cores other processes used meanwhile."""

    def __init__(self, daemon_pid: int | None = None) -> None:
        self.daemon_pid = daemon_pid

    def _own(self) -> float:
        me = psutil.Process().cpu_times()  # this process alone (the daemon is its child: counted below)
        return me.user + me.system + (tree_cpu(self.daemon_pid) if self.daemon_pid else 0.0)

    def __enter__(self) -> Meter:
        self.t0, self.busy0, self.own0 = time.monotonic(), busy_seconds(), self._own()
        self.daemon0 = tree_cpu(self.daemon_pid) if self.daemon_pid else 0.0
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall = time.monotonic() - self.t0
        own = self._own() - self.own0
        self.daemon_cpu = (tree_cpu(self.daemon_pid) - self.daemon0) if self.daemon_pid else 0.0
        self.foreign = max(0.0, (busy_seconds() - self.busy0 - own) / max(self.wall, 1e-9))


def wait_quiet(max_wait: float, threshold: float = 0.3) -> float:
    """Wait until other processes use under ``threshold`` cores over one second; returns that load."""
    deadline = time.monotonic() + max_wait
    while True:
        with Meter() as m:
            time.sleep(1.0)
        if m.foreign < threshold or time.monotonic() >= deadline:
            return m.foreign


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


# -- the model and the files -----------------------------------------------------------------------


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


@dataclass
class Raw:
    """Batched forward throughput (img/s) of one backend, with the other load meanwhile (cores)."""

    ips: float
    foreign: float


def median_seconds(run: Callable[[], object], seconds: float, warmups: int = 1, at_least: int = 3) -> float:
    """The median time of repeated ``run()`` over about ``seconds`` (at least ``at_least`` runs), after
    ``warmups`` untimed ones (a GPU loads kernels, cuDNN's autotuner searches, in those)."""
    for _ in range(warmups):
        run()
    times: list[float] = []
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline or len(times) < at_least:
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


class Forwards:
    """The model as the daemon loads it, runnable in eager PyTorch and (if available) ONNX Runtime."""

    def __init__(self, folder: Path, size: int, arch: str) -> None:
        self.model = registry.load_version(folder).model.eval()
        self.size = size
        self.warmup, self.repeats = RAW_REPEATS.get(arch, (1, 4))
        self.x = torch.randn(MAX_BATCH, 1, size, size, generator=torch.Generator().manual_seed(0))
        self.onnx = None
        self.onnx_halves = None
        #: on a machine with a GPU, the model as the daemon serves it there (its default device)
        self.served = (
            ServedModel(1, registry.load_version(folder), torch.device("cuda"), heatmaps=False)
            if torch.cuda.is_available()
            else None
        )
        if OnnxRunner is not None:
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    self.onnx = OnnxRunner.for_model(self.model, self.x, with_activation=False)
                    #: the daemon's default on a CPU of two threads or more: two batches at once, half the threads each
                    half = torch.get_num_threads() // 2
                    if half:
                        self.onnx_halves = OnnxRunner.for_model(self.model, self.x, with_activation=False, threads=half)
            except BackendUnavailable as exc:
                print(f"  ONNX Runtime unavailable: {exc}", file=sys.stderr)

    def _eager(self, x: torch.Tensor) -> Callable[[], object]:
        def run() -> object:
            with torch.inference_mode():
                return self.model(x)

        return run

    def _cuda(self, x: torch.Tensor) -> Callable[[], object]:
        """The forward as the daemon serves it on a GPU (``ServedModel``: bf16 autocast,
        channels_last, pinned copy in, probabilities back to the host), heatmaps off."""
        assert self.served is not None
        array = x.numpy()
        return lambda: self.served.predict(array)  # type: ignore[union-attr]

    def _onnx(self, x: torch.Tensor) -> Callable[[], object]:
        array = x.numpy()
        assert self.onnx is not None
        return lambda: self.onnx.run(array)  # type: ignore[union-attr]

    def _onnx_two_at_once(self, x: torch.Tensor) -> Callable[[], object]:
        """Two batches of ``x`` at once, each on half the threads (``concurrent_batches`` = 2)."""
        array = x.numpy()
        runner = self.onnx_halves
        assert runner is not None
        return lambda: run_at_once(lambda: runner.run(array), 2)

    @staticmethod
    def _median_s(run: Callable[[], object], warmup: int, repeats: int) -> float:
        for _ in range(warmup):
            run()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            run()
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    def batched(self) -> dict[str, Raw]:
        """img/s at batch max_batch: eager, ONNX (all threads on one batch), ONNX with two
        batches at once (half the threads each; ``onnx2``) and, on a machine with a GPU, CUDA."""
        out = {}
        makers = (
            ("eager", self._eager, 1),
            ("onnx", self._onnx, 1),
            ("onnx2", self._onnx_two_at_once, 2),
            ("cuda", self._cuda, 1),
        )
        missing = {"onnx": self.onnx is None, "onnx2": self.onnx_halves is None, "cuda": self.served is None}
        for name, make, batches in makers:
            if missing.get(name):
                continue
            with Meter() as m:
                seconds = self._median_s(make(self.x), self.warmup, self.repeats)
            out[name] = Raw(MAX_BATCH * batches / seconds, m.foreign)
        return out

    def single_ms(self) -> dict[str, float]:
        """ms of one forward of a batch of 1, per backend."""
        out = {"eager": self._median_s(self._eager(self.x[:1]), 2, 10) * 1000}
        if self.onnx is not None:
            out["onnx"] = self._median_s(self._onnx(self.x[:1]), 2, 10) * 1000
        return out

    def seed_loop(self, files: list[Path]) -> Raw:
        """The seeds' loop, one image at a time, eager PyTorch; img/s (after 2 untimed images)."""
        preprocess = transforms.Compose(
            [
                transforms.Resize((self.size, self.size)),
                transforms.ToTensor(),
                transforms.Normalize(GREY_MEAN, GREY_STD),
            ]
        )

        def one(path: Path) -> torch.Tensor:
            image = Image.open(path).convert("L")
            x = preprocess(image)
            return torch.softmax(self.model(x.unsqueeze(0)), dim=1)

        with torch.no_grad():
            for path in files[:2]:
                one(path)
            with Meter() as m:
                for path in files:
                    one(path)
        return Raw(len(files) / m.wall, m.foreign)


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


class Stalled(RuntimeError):
    def __init__(self, inferred: int, message: str) -> None:
        super().__init__(message)
        self.inferred = inferred


class DaemonRun:
    """One ``meddaemon start`` on a fresh inbox/state folder with the model already promoted."""

    def __init__(
        self, workdir: Path, model_folder: Path, workers: int, heatmaps: bool, switch_interval: float | None = None
    ) -> None:
        """``switch_interval``: the daemon's interpreter switch interval in seconds (``sys.setswitchinterval``,
        set at its start by a ``sitecustomize`` module; None: Python's 5 ms), to measure the GIL's hand-over
        (``gil_convoy.py``) without a setting in the daemon."""
        self.workdir = workdir
        self.inbox, self.state = workdir / "inbox", workdir / "state"
        self.staging = self.inbox / ".staging"
        self.db = self.state / "meddaemon.db"
        self.log = workdir / "daemon.log"
        self.staging.mkdir(parents=True)
        (self.inbox / TASK).mkdir()
        self.expected = 0
        self.proc: subprocess.Popen[bytes] | None = None
        # import + promote, as `medcli models import FOLDER` then `medcli models promote busi v1` do
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
        env["MEDDAEMON_REPORTS"] = "false"  # the inference path alone; benchmarks/reports.py measures reports on/off
        if switch_interval is not None:
            site = workdir / "site"
            site.mkdir()
            (site / "sitecustomize.py").write_text(f"import sys\nsys.setswitchinterval({switch_interval!r})\n")
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site), env.get("PYTHONPATH")]))
        cmd = [
            str(MEDDAEMON), "start", "--watch", str(self.inbox), "--state-dir", str(self.state),
            "--workers", str(workers), "--rescan-seconds", "30",
        ]  # fmt: skip
        with self.log.open("wb") as err:
            self.proc = subprocess.Popen(
                cmd, stdout=err, stderr=err, stdin=subprocess.DEVNULL, env=env, start_new_session=True
            )

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def log_text(self) -> str:
        return self.log.read_text("utf-8", "replace")

    def stage(self, files: list[Path]) -> list[tuple[Path, Path]]:
        moves = []
        for src in files:
            staged = self.staging / src.name
            shutil.copyfile(src, staged)
            moves.append((staged, self.inbox / src.name.replace("__", "/")))
        return moves

    def wait_for(self, predicate: Callable[[], bool], timeout: float, what: str, every: float = 0.02) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while not predicate():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                tail = "\n".join(self.log_text().splitlines()[-30:])
                raise RuntimeError(
                    f"gave up waiting for {what} (daemon exit {self.proc.poll()}); its log ends:\n{tail}"
                )
            time.sleep(every)

    def check_no_failures(self) -> None:
        if count(self.db, BAD_SQL):
            with contextlib.closing(sqlite3.connect(self.db)) as conn:
                rows = conn.execute(
                    "SELECT state, failure_reason, count(*) FROM scans WHERE state NOT IN ('inferred', 'routed')"
                    " GROUP BY state, failure_reason"
                ).fetchall()
            raise RuntimeError(f"scans neither routed nor inferred: {rows}; see {self.log}")

    def wait_inferred(self, n: int, timeout: float, what: str, every: float = 0.02, stall: float = 60.0) -> None:
        """Wait for ``n`` inferred scans; :class:`Stalled` when none is added for ``stall`` seconds."""
        progress = [-1, time.monotonic()]

        def done() -> bool:
            inferred = count(self.db, INFERRED_SQL)
            if inferred >= n:
                return True
            now = time.monotonic()
            if inferred != progress[0]:
                progress[:] = [inferred, now]
            elif now - progress[1] > stall:
                children = [" ".join(p.cmdline()[:3])[-60:] for p in tree(self.pid)[1:]]
                raise Stalled(
                    inferred,
                    f"no scan inferred for {stall:.0f} s at {inferred} of {n} ({what}); "
                    f"daemon children: {children}; see {self.log}",
                )
            self.check_no_failures()
            return False

        self.wait_for(done, timeout, what, every)

    def started(self) -> tuple[str, str]:
        """Wait until the model is served; returns (its backend, the daemon's own speed line or '')."""
        self.wait_for(lambda: SERVING.search(self.log_text()) is not None, 180, "the model to be served", 0.05)
        text = self.log_text()
        match = SERVING.search(text)
        assert match is not None
        chosen = CHOSEN.search(text)
        speeds = f"eager {chosen.group(2)}, onnx {chosen.group(3)}" if chosen else ""
        return match.group(2), speeds

    def drop(
        self, moves: list[tuple[Path, Path]], timeout: float, what: str, stall: float = 60.0
    ) -> tuple[float, float]:
        """Rename the files in, wait for all of them; returns (drop seconds, drop to all inferred seconds)."""
        t_first = time.monotonic()
        for staged, target in moves:
            os.rename(staged, target)
        t_last = time.monotonic()
        self.expected += len(moves)
        self.wait_inferred(self.expected, timeout, what, stall=stall)
        return t_last - t_first, time.monotonic() - t_first

    def one_at_a_time(self, moves: list[tuple[Path, Path]], gap: float = 0.4) -> list[float]:
        """Each file alone into the idle daemon: ms from its rename to its inferred row."""
        assert self.proc is not None
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

    def stop(self, timeout: float = 60.0) -> bool:
        """SIGTERM, then SIGKILL to the whole process group if it has not exited within ``timeout`` s;
        returns whether it exited by itself with status 0."""
        if self.proc is None or self.proc.poll() is not None:
            return self.proc is not None and self.proc.returncode == 0
        self.proc.send_signal(signal.SIGTERM)
        clean = False
        try:
            rc = self.proc.wait(timeout)
            clean = rc == 0
            if rc != 0:
                print(f"  warning: the daemon exited {rc} after SIGTERM; see {self.log}", file=sys.stderr)
        except subprocess.TimeoutExpired:
            print(f"  warning: the daemon did not stop within {timeout:.0f} s of SIGTERM; killing it", file=sys.stderr)
        self.kill()
        return clean

    def kill(self) -> None:
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)  # its own session: workers and forkserver too
        if self.proc.poll() is None:
            self.proc.wait()


@dataclass
class DaemonResult:
    arch: str
    config: str
    workers: int
    heatmaps: bool
    backend: str
    daemon_speeds: str
    files: int
    drop_s: float
    wall_s: float
    raw: dict[str, Raw]  # measured just before this run
    cpu_cores: float  # daemon tree CPU seconds / wall during the burst
    foreign: float  # other processes' cores during the burst
    result_latency_ms: list[float]
    alone_ms: list[float]
    rss_main: int
    rss_before: int
    rss_peak: int
    rss_after: int
    uss_after: int
    heatmap_rows: int

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
    raw: dict[str, Raw],
    quiet_wait: float,
) -> DaemonResult:
    workers, heatmaps = CONFIGS[config]
    run = DaemonRun(workdir, model_folder, workers, heatmaps)
    try:
        moves, warm_moves, alone_moves = run.stage(burst), run.stage(warmup), run.stage(alone)
        backend, daemon_speeds = run.started()
        run.drop(warm_moves, 300, "the warm-up files")
        wait_quiet(quiet_wait)
        rss_before = tree_rss(run.pid)
        rss_main = psutil.Process(run.pid).memory_info().rss
        with PeakSampler(run.pid) as sampler, Meter(run.pid) as meter:
            drop_s, wall_s = run.drop(moves, 120 + 2 * len(moves), f"{len(moves)} inferred scans")
        rss_after = tree_rss(run.pid)
        uss_after = tree_uss(run.pid)
        time.sleep(1.0)
        alone_ms = run.one_at_a_time(alone_moves)
        run.stop()
    finally:
        run.kill()
    burst_names = {f"{TASK}/{p.name.split('__', 1)[1]}" for p in burst}
    with contextlib.closing(sqlite3.connect(run.db)) as conn:
        latencies = [
            latency
            for name, latency in conn.execute(
                "SELECT s.source_name, min(r.latency_ms) FROM results r JOIN scans s ON s.id = r.scan_id GROUP BY s.id"
            )
            if name in burst_names
        ]
        heatmap_rows = conn.execute("SELECT count(*) FROM heatmaps").fetchone()[0]
    return DaemonResult(
        arch, config, workers, heatmaps, backend, daemon_speeds, len(moves), drop_s, wall_s, raw,
        meter.daemon_cpu / wall_s, meter.foreign, latencies, alone_ms, rss_main, rss_before,
        max(sampler.peak, rss_after), rss_after, uss_after, heatmap_rows,
    )  # fmt: skip


@dataclass
class RssResult:
    size: int
    chunk: int
    workers: int
    backend: str = ""
    #: (files done, RSS bytes, USS bytes, processes in the tree)
    samples: list[tuple[int, int, int, int]] = field(default_factory=list)
    peak: int = 0
    wall_s: float = 0.0
    before: int = 0
    stalled: str = ""

    def slope(self, skip_first: bool = True, index: int = 1) -> float:
        """Least-squares MiB per 1,000 files over the samples (the first one, warm-up growth, left out)."""
        pts = self.samples[1:] if skip_first and len(self.samples) > 2 else self.samples
        if len(pts) < 2:
            return float("nan")
        x = np.array([p[0] / 1000 for p in pts])
        y = np.array([p[index] / MIB for p in pts])
        return float(np.polyfit(x, y, 1)[0])


def run_rss(
    model_folder: Path, files: list[Path], warmup: list[Path], workdir: Path, chunk: int, size: int, workers: int
) -> RssResult:
    """Chunks of files, each waited for, RSS sampled after each; a stalled daemon ends the run (recorded)."""
    run = DaemonRun(workdir, model_folder, workers, True)
    result = RssResult(size, chunk, workers)
    t0 = time.monotonic()
    try:
        moves, warm_moves = run.stage(files), run.stage(warmup)
        result.backend, _ = run.started()
        run.drop(warm_moves, 300, "the warm-up files")
        time.sleep(1.0)
        result.before = tree_rss(run.pid)
        t0 = time.monotonic()
        with PeakSampler(run.pid) as sampler:
            try:
                for start in range(0, len(moves), chunk):
                    part = moves[start : start + chunk]
                    run.drop(part, 120 + 2 * len(part), f"files {start} to {start + len(part)}", stall=20)
                    done = start + len(part)
                    result.samples.append((done, tree_rss(run.pid), tree_uss(run.pid), len(tree(run.pid))))
                    print(
                        f"  rss, workers {workers}: {done} files, RSS {result.samples[-1][1] / MIB:.0f} MiB, "
                        f"USS {result.samples[-1][2] / MIB:.0f} MiB, {result.samples[-1][3]} processes",
                        file=sys.stderr,
                    )
            except Stalled as stall:
                result.stalled = str(stall)
                print(f"  rss, workers {workers}: STALLED: {stall}", file=sys.stderr)
            result.wall_s = time.monotonic() - t0
            result.peak = sampler.peak
        if not run.stop(timeout=10 if result.stalled else 60) and result.stalled:
            result.stalled += "; it did not stop within 10 s of SIGTERM either (killed)"
    finally:
        run.kill()
    return result


# -- output ----------------------------------------------------------------------------------------


@dataclass
class Baseline:
    arch: str
    raws: list[dict[str, Raw]]  # every raw measurement, in order
    single_ms: dict[str, float]
    seeds: list[Raw]
    seed_files: int

    def median(self, backend: str) -> float:
        values = [r[backend].ips for r in self.raws if backend in r]
        return statistics.median(values) if values else float("nan")

    def seed_best(self) -> float:
        return max(s.ips for s in self.seeds)


def met(ok: bool) -> str:
    return "met" if ok else "**not met**"


def tables(bases: dict[str, Baseline], results: list[DaemonResult], rss: list[RssResult]) -> str:
    out = ["### Baselines (the benchmark's own process, no daemon running)\n"]
    out.append(
        "| model | raw eager, batch 16 (img/s): median [min-max] | raw ONNX Runtime, batch 16 (img/s): median "
        "[min-max] | batch of 1, eager / ONNX (ms) | seed loop (img/s): best of "
        "| other load during raw / seed (cores) |"
    )
    out.append("|---|---|---|---|---|---|")
    for b in bases.values():

        def spread(backend: str, b: Baseline = b) -> str:
            values = [r[backend].ips for r in b.raws if backend in r]
            if not values:
                return "-"
            return f"{statistics.median(values):.1f} [{min(values):.1f}-{max(values):.1f}] ({len(values)} runs)"

        foreign_raw = max(r[k].foreign for r in b.raws for k in r)
        out.append(
            f"| {b.arch} | {spread('eager')} | {spread('onnx')} "
            f"| {b.single_ms['eager']:.0f} / {b.single_ms.get('onnx', float('nan')):.0f} "
            f"| {b.seed_best():.1f} ({', '.join(f'{s.ips:.1f}' for s in b.seeds)}; {b.seed_files} files) "
            f"| up to {foreign_raw:.2f} / up to {max(s.foreign for s in b.seeds):.2f} |"
        )
    out.append("\n### Daemon: drop to stored result\n")
    out.append(
        "daemon / raw: against the raw forward *of the backend the daemon serves with*, the median of all the raw "
        "measurements of the run (in brackets: against the one taken just before this daemon run); "
        "daemon / seed loop: against the best seed-loop figure.\n"
    )
    out.append(
        "| model | workers | heatmaps | backend | files | drop to all inferred (s) | daemon img/s "
        "| raw img/s eager / ONNX (just before) | daemon / raw (goal >= 0.85) | daemon / seed loop (goal >= 4x) "
        "| daemon CPU (cores) | other load (cores) | result latency p50 / max (ms) "
        "| RSS main / tree before / peak / after (MiB) | USS after (MiB) |"
    )
    out.append("|---|---:|---|---|---:|---:|---:|---|---|---|---:|---:|---|---|---:|")
    for r in results:
        b = bases[r.arch]
        # ONNX Runtime: the faster of one batch on every thread and two at once (the daemon's default on
        # the CPU, concurrent_batches 0: two), as speed.py takes it; the ratio was against one batch only
        onnx = [k for k in ("onnx", "onnx2") if k in r.raw and b.median(k) == b.median(k)]
        served = max(onnx, key=b.median) if r.backend == "onnx" and onnx else "eager"
        to_raw = r.ips / b.median(served)
        to_adjacent = r.ips / r.raw[served].ips
        to_seed = r.ips / b.seed_best()
        lat = r.result_latency_ms
        raw_text = f"{r.raw['eager'].ips:.1f} / " + (f"{r.raw['onnx'].ips:.1f}" if "onnx" in r.raw else "-")
        out.append(
            f"| {r.arch} | {r.workers} | {'on' if r.heatmaps else 'off'} | {r.backend} | {r.files} | {r.wall_s:.1f} "
            f"| {r.ips:.1f} | {raw_text} | {to_raw:.2f} ({to_adjacent:.2f}) {met(to_raw >= 0.85)} "
            f"| {to_seed:.1f}x {met(to_seed >= 4)} | {r.cpu_cores:.2f} | {r.foreign:.2f} "
            f"| {statistics.median(lat):.0f} / {max(lat):.0f} "
            f"| {r.rss_main / MIB:.0f} / {r.rss_before / MIB:.0f} / {r.rss_peak / MIB:.0f} / {r.rss_after / MIB:.0f} "
            f"| {r.uss_after / MIB:.0f} |"
        )
    out.append("\n### One file into an idle daemon\n")
    out.append(
        "| model | workers | heatmaps | files | rename to inferred p50 / max (ms) "
        "| goal: max_wait_ms + forward of 1 (backend in use) + 500 ms | met |"
    )
    out.append("|---|---:|---|---:|---|---:|---|")
    for r in results:
        b = bases[r.arch]
        if not r.alone_ms:
            continue
        target = MAX_WAIT_MS + b.single_ms.get(r.backend, b.single_ms["eager"]) + 500
        out.append(
            f"| {r.arch} | {r.workers} | {'on' if r.heatmaps else 'off'} | {len(r.alone_ms)} "
            f"| {statistics.median(r.alone_ms):.0f} / {max(r.alone_ms):.0f} | {target:.0f} "
            f"| max {met(max(r.alone_ms) <= target)}, p50 {met(statistics.median(r.alone_ms) <= target)} |"
        )
    for r in rss:
        out.append(
            f"\n### RSS over a long burst: mobilenet_v2, {r.size}x{r.size} PNGs and input contract, "
            f"workers {r.workers}, heatmaps on, backend {r.backend}\n"
        )
        if r.samples:
            out.append("| files done | " + " | ".join(f"{s[0]:,}" for s in r.samples) + " |")
            out.append("|---|" + "---:|" * len(r.samples))
            out.append("| RSS, daemon + children (MiB) | " + " | ".join(f"{s[1] / MIB:.0f}" for s in r.samples) + " |")
            out.append("| USS, daemon + children (MiB) | " + " | ".join(f"{s[2] / MIB:.0f}" for s in r.samples) + " |")
            out.append("| processes | " + " | ".join(str(s[3]) for s in r.samples) + " |")
            n = r.samples[-1][0]
            out.append(
                f"\nRSS before the burst {r.before / MIB:.0f} MiB; first sample {r.samples[0][1] / MIB:.0f}, "
                f"last {r.samples[-1][1] / MIB:.0f}, peak {r.peak / MIB:.0f} MiB (sampled every 0.1 s); slope "
                f"{r.slope():+.2f} MiB per 1,000 files (least squares, first sample left out; "
                f"{r.slope(False):+.2f} with it; USS {r.slope(index=2):+.2f}); {n:,} files in {r.wall_s:.0f} s"
            )
        if r.stalled:
            out.append(f"\n**The daemon stalled**: {r.stalled}")
    return "\n".join(out)


# -- main ------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="mobilenet_v2,densenet121", help="comma-separated architectures")
    parser.add_argument("--files", default="", help="burst sizes, e.g. mobilenet_v2=400,densenet121=200 (the defaults)")
    parser.add_argument("--configs", default=DEFAULT_CONFIGS, help=f"daemon configurations, of {list(CONFIGS)}")
    parser.add_argument("--alone", type=int, default=10, help="single files into the idle daemon, per run (10)")
    parser.add_argument("--rss-files", type=int, default=10000, help="files of the RSS run (0: skip)")
    parser.add_argument("--rss-size", type=int, default=64, help="PNG side and model input of the RSS run (64)")
    parser.add_argument("--rss-chunk", type=int, default=1000, help="files per RSS sample (1000)")
    parser.add_argument(
        "--rss-workers", default="2,0", help="--workers of the RSS runs, in order (default 2,0: the default, then none)"
    )
    parser.add_argument("--quiet-wait", type=float, default=10.0, help="max s to wait for a quiet machine (10)")
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
    bases: dict[str, Baseline] = {}
    results: list[DaemonResult] = []
    rss: list[RssResult] = []
    try:
        size = SPEC.contract.height
        n_burst = max((burst_sizes.get(a, 200) for a in archs), default=0)
        corpus = top / "corpus"
        burst_all = make_pngs(corpus, "synthetic", n_burst, 256, seed=1)
        warmup = make_pngs(corpus, "synthetic_warmup", WARMUP, 256, seed=2)
        alone = make_pngs(corpus, "synthetic_alone", args.alone, 256, seed=3)
        print(f"corpus: {n_burst} + {WARMUP} + {args.alone} PNGs 256x256 8-bit grey noise", file=sys.stderr)

        for arch in archs:
            folder = write_model(top / f"model-{arch}", arch, SPEC.contract)
            forwards = Forwards(folder, size, arch)
            wait_quiet(args.quiet_wait)
            base = Baseline(arch, [forwards.batched()], forwards.single_ms(), [], SEED_FILES.get(arch, 24))
            base.seeds.append(forwards.seed_loop(burst_all[: base.seed_files]))
            bases[arch] = base
            first = base.raws[0]
            print(
                f"{arch}: raw eager {first['eager'].ips:.1f} img/s"
                + (f", onnx {first['onnx'].ips:.1f} img/s" if "onnx" in first else "")
                + f" at batch {MAX_BATCH}; batch of 1 {base.single_ms}; seed loop {base.seeds[0].ips:.1f} img/s",
                file=sys.stderr,
            )
            burst = burst_all[: burst_sizes.get(arch, 200)]
            for i, config in enumerate(configs):
                if i:
                    wait_quiet(args.quiet_wait)
                    base.raws.append(forwards.batched())
                result = run_daemon(
                    arch, config, folder, burst, warmup, alone, top / f"run-{arch}-{config}", base.raws[-1],
                    args.quiet_wait,
                )  # fmt: skip
                results.append(result)
                served = "onnx" if result.backend == "onnx" and "onnx" in result.raw else "eager"
                print(
                    f"{arch} {config}: backend {result.backend} ({result.daemon_speeds}); {result.files} files in "
                    f"{result.wall_s:.1f} s = {result.ips:.1f} img/s (raw {served} {result.raw[served].ips:.1f}, "
                    f"ratio {result.ips / result.raw[served].ips:.2f}); daemon CPU {result.cpu_cores:.2f} cores, "
                    f"other load {result.foreign:.2f}; one file alone p50 {statistics.median(result.alone_ms):.0f} ms; "
                    f"{result.heatmap_rows} heatmaps",
                    file=sys.stderr,
                )
            wait_quiet(args.quiet_wait)
            base.raws.append(forwards.batched())
            base.seeds.append(forwards.seed_loop(burst_all[: base.seed_files]))
            del forwards

        if args.rss_files > 0:
            small = InputContract(1, args.rss_size, args.rss_size, GREY_MEAN, GREY_STD, modalities=("US",))
            folder = write_model(top / "model-rss", "mobilenet_v2", small)
            files = make_pngs(top / "corpus-rss", "synthetic_rss", args.rss_files, args.rss_size, seed=4)
            warm = make_pngs(top / "corpus-rss", "synthetic_rss_warmup", WARMUP, args.rss_size, seed=5)
            print(f"rss: {len(files)} PNGs {args.rss_size}x{args.rss_size}", file=sys.stderr)
            for workers in (int(w) for w in args.rss_workers.split(",") if w):
                rss.append(
                    run_rss(folder, files, warm, top / f"run-rss-w{workers}", args.rss_chunk, args.rss_size, workers)
                )

        print(
            f"\nmeddaemon inference, {platform.python_implementation()} {platform.python_version()}, "
            f"torch {torch.__version__} ({torch.get_num_threads()} threads), {os.cpu_count()} CPUs "
            f"({platform.processor() or platform.machine()}), CPU only, SYNTHETIC untrained models; "
            f"load average {load_start[0]:.2f} at start, {os.getloadavg()[0]:.2f} at the end; "
            f"{time.monotonic() - started:.0f} s in all\n"
        )
        print(tables(bases, results, rss))
    finally:
        if args.keep:
            print(f"\nkept {top}", file=sys.stderr)
        else:
            shutil.rmtree(top, ignore_errors=True)


if __name__ == "__main__":
    main()
