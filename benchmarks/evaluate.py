"""``medcli evaluate`` benchmark: the evaluator against what it must keep up with, side by side in one run.

On SYNTHETIC files only (``synthetic_*`` 256x256 grey noise PNGs, seeded) and a randomly initialised
``busi`` model (3 labels, 1x224x224 input; SYNTHETIC weights: the figures are about speed only):

1. **raw**: the same model's batched forward as the evaluator serves it (``ServedModel.predict``,
   the backend ``choose_backend`` picks: eager PyTorch or ONNX Runtime on the CPU; CUDA on a
   machine with a GPU, ``--device``, where every contender runs its model there), inputs already in
   memory, batch ``--batch-size``; images/s, the faster of one batch at a time on every thread and
   two batches at once on half the threads each (``concurrent_batches``: the evaluator's default).
2. **local**: ``run_evaluation`` (the local engine), heatmaps off then on, a fresh database each:
   images/s *streaming* (files written between the first progress report and the last before the
   end, over that time: the pipeline's pace once it runs: decoding processes, forward, bulk writes;
   the end's own report is left out, as the batches in the model at the first are done by then and
   none is at the end) and over the
   *whole call* (also cohort listing, model loading and verification, the decoding processes'
   start-up, the backend choice). Ratio to raw (goal >= 0.9 heatmaps off) on the streaming figure.
   The backend choice is measured once, before the contenders, and kept beside the version as after
   its first run on a machine; ``--measure-backend`` times it again in every engine run. For the
   run with heatmaps off, the *driver's CPU a file* by thread over the same streaming window
   (psutil, at each progress report): its main thread (taking the decoded files, batching, building
   outcomes, the bulk writes), the process pool's result thread (unpickling what the decoding
   processes send), the forward threads; and the rate the driver alone allows, one over main +
   result: the engine's ceiling where the forward is nearly free (a GPU). The decoding processes'
   CPU a file too: with the driver's, what every file costs outside the forward.
3. **rerun**: the same command again on the same database: only hashing (every file reused).
4. **DataLoader**: the script a user would write instead: a ``torch.utils.data.Dataset`` that
   opens each PNG with PIL, ``convert("L")``, resizes to 224x224, ``ToTensor`` and ``Normalize``, a
   ``DataLoader(batch_size, num_workers=--workers)``, eager PyTorch under ``inference_mode``,
   softmax, rows written to a CSV; images/s. Ratio local / DataLoader (goal >= 1.0).
5. **daemon**: ``meddaemon start --once`` (a process of its own, as a user runs it) over a copy of the
   same files in its inbox (copied before the clock starts), reports off, heatmaps off then on as
   the row says, the same model, ``--workers`` decoding processes, ``max_batch`` the evaluator's
   batch; a fresh state directory each. Images/s over the whole process (start-up, model load,
   every file read, scored and archived) and *streaming* (scans whose results were written after
   the first batch's, over the time from the first batch's results to the last). Ratios local /
   daemon, heatmaps off and on.
6. **ray**: ``run_evaluation(engine="ray")`` with a local Ray (``ray.init(address="local")``, this
   machine's cores) started and stopped inside the call; streaming and whole-call images/s. Ratio
   to local (goal >= 0.8), whole calls.
7. **RSS**: the local engine over ``--rss-files`` SYNTHETIC 64x64 PNGs (20,000 by default) with a
   64x64 small_cnn model; the resident set size of this process and its decoding processes (psutil)
   at each progress report: first quarter against last quarter.

    .venv/bin/python benchmarks/evaluate.py     # 800 files, mobilenet_v2; 20,000 for RSS: about 10 minutes on 2 cores
    .venv/bin/python benchmarks/evaluate.py --files 2000 --rss-files 5000 --skip ray,daemon
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import os
import platform
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path

import numpy as np
import psutil
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from dicom_factory import write_png  # noqa: E402
from inference import MEDDAEMON  # noqa: E402

from meddaemon.config import load_settings  # noqa: E402
from meddaemon.daemon import bookkeeper  # noqa: E402
from meddaemon.db.engine import create_db_engine, session_factory, transaction  # noqa: E402
from meddaemon.db.migrate import upgrade  # noqa: E402
from meddaemon.engine import registry  # noqa: E402
from meddaemon.engine.architectures import build_model  # noqa: E402
from meddaemon.engine.backend_cache import BACKEND_FILE, BACKEND_PROBE_BATCH, GRAPH_FOLDER, BackendCache  # noqa: E402
from meddaemon.engine.inference import ServedModel, forward_lanes, pick_device  # noqa: E402
from meddaemon.engine.tasks import BUILTIN_TASKS, GREY_MEAN, GREY_STD, InputContract, all_tasks  # noqa: E402
from meddaemon.evaluate.pipeline import EvaluationRequest, Progress, run_evaluation  # noqa: E402


def write_cohort(folder: Path, count: int, size: int) -> Path:
    rng = np.random.default_rng(0)
    for i in range(count):
        write_png(folder / f"synthetic_{i:06d}.png", rng.integers(0, 255, (size, size), dtype=np.uint8))
    return folder


def write_model(folder: Path, architecture: str, side: int) -> Path:
    spec = BUILTIN_TASKS["busi"]
    torch.manual_seed(0)
    model = build_model(architecture, 1, spec.num_outputs)
    registry.save_version(
        model, task="busi", version="bench", labels=spec.labels, kind=spec.kind, architecture=architecture,
        input_contract=InputContract(1, side, side, GREY_MEAN, GREY_STD), out_dir=folder,
        training_data_fingerprint="synthetic",
    )  # fmt: skip
    return folder


#: ``concurrent_batches`` of the local engine's runs (``--concurrent-batches``; 0: its default)
CONCURRENT_BATCHES = 0
#: where every contender runs its model (``--device``; auto: the GPU when there is one, as the daemon)
DEVICE = "auto"


def measure_backend_choice(model: Path, batch: int) -> None:
    """Time eager PyTorch against ONNX Runtime for ``model`` as the evaluator does (heatmaps off and
    on, the lanes of the local engine and of Ray's actors) and keep the choices beside its weights,
    as a first run of the version on this machine does."""
    device = pick_device(DEVICE)
    lanes = forward_lanes(CONCURRENT_BATCHES, device)
    for heatmaps in (False, True):
        served = ServedModel(1, registry.load_version(model), device, heatmaps=heatmaps, lanes=lanes)
        served.choose_backend(min(batch, BACKEND_PROBE_BATCH), BackendCache(model))


def fresh_database(root: Path, name: str, model: Path):  # type: ignore[no-untyped-def]
    """A new state directory with ``model`` registered and promoted; the backend choices kept
    beside ``model`` (``measure_backend_choice``) are copied with it."""
    flags = {"state_dir": root / name, "watch": root / f"{name}_inbox", "concurrent_batches": CONCURRENT_BATCHES}
    settings = load_settings(env={}, flags=flags)
    engine = create_db_engine(settings.db_url)
    upgrade(engine)
    sessions = session_factory(engine)
    with transaction(sessions) as session:
        bookkeeper.ensure_tasks(session, all_tasks({}))
    with transaction(sessions) as session:
        row = registry.import_version(session, model, settings.models_dir)
        registry.promote(session, row.task_name, row.version)
        folder = settings.stored_file(row.path)
    if (model / BACKEND_FILE).exists():
        shutil.copyfile(model / BACKEND_FILE, folder / BACKEND_FILE)
    if (model / GRAPH_FOLDER).is_dir():  # none when ONNX Runtime could not be used
        shutil.copytree(model / GRAPH_FOLDER, folder / GRAPH_FOLDER)
    return settings, engine


def raw_forward(model_dir: Path, batch: int, total: int) -> tuple[float, str]:
    """images/s and the backend: the faster of one lane and two (two batches at once, half the threads each)."""
    best, name = 0.0, ""
    for lanes in (1, 2):
        loaded = registry.load_version(model_dir)
        served = ServedModel(1, loaded, pick_device(DEVICE), heatmaps=False, lanes=lanes)
        backend = served.choose_backend(batch)
        x = np.random.default_rng(1).standard_normal((batch, 1, 224, 224)).astype(np.float32)
        for _ in range(3):  # a GPU's first batches load kernels: one warm-up left 10x on an H200's figure
            served.predict(x)
        start = time.perf_counter()
        with ThreadPoolExecutor(served.lanes) as pool:
            done = sum(len(p) for p in pool.map(served.predict, [x] * max(1, total // batch)))
        rate = done / (time.perf_counter() - start)
        if rate > best:
            best, name = rate, f"{backend}, {served.lanes} at once"
    return best, name


class ThreadCpu:
    """CPU seconds (user + system) of this process's threads, by kind (the main thread, the process
    pools' result threads, the forward threads, the rest), and of its child processes (the decoding
    processes and their forkserver), taken at each progress report."""

    def __init__(self) -> None:
        self.marks: dict[int, dict[str, float]] = {}
        self.kinds: dict[int, str] = {}
        #: the files done at the first and the last report of the streaming window (``evaluate``)
        self.window = (0, 0)

    def mark(self, done: int) -> None:
        for thread in threading.enumerate():
            if thread.native_id is not None and thread.native_id not in self.kinds:
                self.kinds[thread.native_id] = self._kind(thread)
        totals: dict[str, float] = {}
        me = psutil.Process()
        for t in me.threads():
            kind = self.kinds.get(t.id, "other")
            totals[kind] = totals.get(kind, 0.0) + t.user_time + t.system_time
        for child in me.children(recursive=True):
            with contextlib.suppress(psutil.Error):
                times = child.cpu_times()
                totals["decoding processes"] = totals.get("decoding processes", 0.0) + times.user + times.system
        self.marks[done] = totals

    def ms_a_file(self, first: int, last: int) -> dict[str, float]:
        """Milliseconds of CPU a file by kind of thread, from the report at ``first`` files done to
        the one at ``last`` (a thread that ended meanwhile is missing from the second)."""
        if last <= first:
            return {}
        before, after = self.marks[first], self.marks[last]
        return {kind: 1000 * (after[kind] - before.get(kind, 0.0)) / (last - first) for kind in after}

    @staticmethod
    def _kind(thread: threading.Thread) -> str:
        if thread is threading.main_thread():
            return "main"
        if type(thread).__name__ == "_ExecutorManagerThread":
            return "result"
        return "forward" if thread.name.startswith("forward") else "other"


def evaluate(settings, db, cohort: Path, threads: ThreadCpu | None = None, **options) -> tuple[float, float, dict]:  # type: ignore[no-untyped-def]
    """images/s streaming (between progress reports while the pipeline runs: its pace once started),
    images/s over the whole call, and the run's summary. With ``threads``, their CPU at each report."""
    reports: list[tuple[float, int]] = []

    def progress(p: Progress) -> None:
        reports.append((time.perf_counter(), p.done))
        if threads is not None:
            threads.mark(p.done)

    start = time.perf_counter()
    outcome = run_evaluation(db, settings, EvaluationRequest(cohort, "busi", **options), progress)
    seconds = time.perf_counter() - start
    # from the first report to the last before the end: as many batches are in the model at both
    # (up to the lanes and one more), while the end's report comes once none is: counting to it
    # would credit the window with the work done on the first report's batches before it began
    steady = [r for r in reports if r[1] < reports[-1][1]]
    steady = steady if len(steady) >= 2 else reports
    (t0, d0), (t1, d1) = steady[0], steady[-1]
    streaming = (d1 - d0) / (t1 - t0) if t1 > t0 else float("nan")
    if threads is not None:
        threads.window = (d0, d1)
    return streaming, outcome.summary["files"] / seconds, outcome.summary


class PngFolder(Dataset):
    def __init__(self, files: list[Path]) -> None:
        self.files = files
        self.transform = transforms.Compose(
            [transforms.Resize((224, 224)), transforms.ToTensor(), transforms.Normalize(GREY_MEAN, GREY_STD)]
        )

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, str]:
        with Image.open(self.files[i]) as image:
            return self.transform(image.convert("L")), self.files[i].name


def dataloader_script(model_dir: Path, cohort: Path, batch: int, workers: int, out: Path) -> float:
    """What a user writes: DataLoader, eager forward, CSV."""
    start = time.perf_counter()
    device = pick_device(DEVICE)
    model = registry.load_version(model_dir).model.eval().to(device)
    loader = DataLoader(
        PngFolder(sorted(cohort.glob("*.png"))), batch_size=batch, num_workers=workers, pin_memory=device.type == "cuda"
    )
    count = 0
    with out.open("w", newline="") as handle, torch.inference_mode():
        writer = csv.writer(handle)
        for x, names in loader:
            probs = torch.softmax(model(x.to(device)), dim=1).cpu().numpy()
            writer.writerows([name, *row] for name, row in zip(names, probs.tolist(), strict=True))
            count += len(names)
    return count / (time.perf_counter() - start)


def daemon_run(root: Path, name: str, model: Path, cohort: Path, heatmaps: bool, workers: int, batch: int) -> dict:
    """``meddaemon start --once`` over a copy of ``cohort`` in its inbox: images/s over the whole
    process and streaming (from the first batch's results to the last), and its JSON summary."""
    settings, engine = fresh_database(root, name, model)
    engine.dispose()
    inbox = settings.watch / "busi"
    inbox.mkdir(parents=True)
    files = sorted(cohort.glob("*.png"))
    for path in files:
        shutil.copyfile(path, inbox / path.name)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEDDAEMON_")}
    python_path = os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")]))
    env |= {"PYTHONPATH": python_path, "MEDDAEMON_REPORTS": "false", "MEDDAEMON_HEATMAPS": str(heatmaps).lower()}
    env |= {"MEDDAEMON_MAX_BATCH": str(batch), "MEDDAEMON_DEVICE": DEVICE}
    command = [str(MEDDAEMON), "start", "--once", "--json", "--stable-seconds", "0"]
    command += ["--watch", str(settings.watch), "--state-dir", str(settings.state_dir), "--workers", str(workers)]
    start = time.perf_counter()
    run = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - start
    if run.returncode != 0:
        raise RuntimeError(f"meddaemon start --once exited {run.returncode}: {run.stderr[-2000:]}")
    summary = json.loads(run.stdout[run.stdout.index("{") :])
    with sqlite3.connect(settings.state_dir / "meddaemon.db") as db:
        stamps = sorted(
            datetime.fromisoformat(t) for (t,) in db.execute("SELECT MIN(created_at) FROM results GROUP BY scan_id")
        )
    if len(stamps) != len(files):
        raise RuntimeError(f"the daemon stored results for {len(stamps)} of {len(files)} files")
    first_batch = sum(1 for t in stamps if t == stamps[0])
    span = (stamps[-1] - stamps[0]).total_seconds()
    streaming = (len(stamps) - first_batch) / span if span > 0 else float("nan")
    return {"streaming": streaming, "whole": len(files) / seconds, "summary": summary}


def rss_run(root: Path, files: int, workers: int) -> list[tuple[int, float]]:
    cohort = write_cohort(root / "rss_cohort", files, 64)
    model = write_model(root / "rss_model", "small_cnn", 64)
    settings, engine = fresh_database(root, "rss_state", model)
    me = psutil.Process()
    samples: list[tuple[int, float]] = []

    def sample(progress: Progress) -> None:
        rss = me.memory_info().rss + sum(c.memory_info().rss for c in me.children(recursive=True))
        samples.append((progress.done, rss / 2**20))

    run_evaluation(engine, settings, EvaluationRequest(cohort, "busi", workers=workers, batch_size=64), sample)
    engine.dispose()
    return samples


def device_name(setting: str) -> str:
    device = pick_device(setting)
    return f"cuda ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else str(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--files", type=int, default=800)
    parser.add_argument("--arch", default="mobilenet_v2")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1))
    parser.add_argument("--rss-files", type=int, default=20000)
    parser.add_argument(
        "--concurrent-batches", type=int, default=0, help="the local engine's concurrent_batches (0: its default)"
    )
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                        help="every contender's device (auto: the GPU when there is one)")  # fmt: skip
    parser.add_argument("--skip", default="", help="comma-separated: heatmaps, dataloader, daemon, ray, rss")
    parser.add_argument("--measure-backend", action="store_true",
                        help="every engine run times its backends (a version's first run on a machine); by "
                             "default the choice is measured once, before the contenders, and kept")  # fmt: skip
    args = parser.parse_args()
    global CONCURRENT_BATCHES, DEVICE
    CONCURRENT_BATCHES, DEVICE = args.concurrent_batches, args.device
    skip = set(filter(None, args.skip.split(",")))
    root = Path(tempfile.mkdtemp(prefix="evaluate-bench-"))
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, load average "
          f"{' '.join(f'{x:.1f}' for x in os.getloadavg())}; torch {torch.__version__}; {args.files} files, "
          f"{args.arch}, batch {args.batch_size}, workers {args.workers}; "
          f"device {device_name(args.device)}")  # fmt: skip
    try:
        cohort = write_cohort(root / "cohort", args.files, 256)
        model = write_model(root / "model", args.arch, 224)
        if not args.measure_backend:
            measure_backend_choice(model, args.batch_size)
        figures: dict[str, float] = {}
        raw_images = max(args.files // 2, 4 * args.batch_size)
        raws = [raw_forward(model, args.batch_size, raw_images)]
        print(f"raw forward ({raws[0][1]}): {raws[0][0]:.1f} images/s")

        common = {"workers": args.workers, "batch_size": args.batch_size, "device": args.device}
        settings, engine = fresh_database(root, "local", model)
        threads = ThreadCpu()
        figures["local"], wall, summary = evaluate(settings, engine, cohort, threads, **common)
        figures["local_wall"] = wall
        print(f"local engine, heatmaps off: {figures['local']:.1f} images/s streaming "
              f"({wall:.1f} over the whole call; {summary['scored']} scored)")  # fmt: skip
        cpu = threads.ms_a_file(*threads.window)
        driver = cpu.get("main", 0.0) + cpu.get("result", 0.0)
        if driver > 0:
            print("  CPU a file while streaming (ms): " + ", ".join(f"{k} {v:.3f}" for k, v in sorted(cpu.items()))
                  + f"; the driver's main + result threads allow at most {1000 / driver:.0f} files/s")  # fmt: skip
        _, figures["rerun"], summary = evaluate(settings, engine, cohort, **common)
        print(f"rerun (hashing only): {figures['rerun']:.1f} images/s over the whole call ({summary['reused']} reused)")
        engine.dispose()
        if "heatmaps" not in skip:
            settings, engine = fresh_database(root, "heatmaps", model)
            figures["heatmaps"], wall, _ = evaluate(settings, engine, cohort, heatmaps=True, **common)
            figures["heatmaps_wall"] = wall
            engine.dispose()
            print(f"local engine, heatmaps on: {figures['heatmaps']:.1f} images/s streaming ({wall:.1f} whole call)")
        if "dataloader" not in skip:
            figures["dataloader"] = dataloader_script(model, cohort, args.batch_size, args.workers, root / "out.csv")
            print(f"DataLoader script (num_workers={args.workers}): {figures['dataloader']:.1f} images/s")
        if "daemon" not in skip:
            for maps in (False, True):
                key = "daemon_heatmaps" if maps else "daemon"
                run = daemon_run(root, key, model, cohort, maps, args.workers, args.batch_size)
                figures[key], figures[f"{key}_wall"] = run["streaming"], run["whole"]
                print(f"daemon --once, heatmaps {'on' if maps else 'off'}, reports off: {run['streaming']:.1f} "
                      f"images/s streaming ({run['whole']:.1f} over the whole process; {run['summary']})")  # fmt: skip
        if "ray" not in skip:
            settings, engine = fresh_database(root, "ray", model)
            figures["ray"], wall, _ = evaluate(settings, engine, cohort, engine="ray", **common)
            figures["ray_wall"] = wall
            engine.dispose()
            print(f"ray engine, one machine: {figures['ray']:.1f} images/s streaming ({wall:.1f} whole call)")
        raws.append(raw_forward(model, args.batch_size, raw_images))
        print(f"raw forward again ({raws[1][1]}): {raws[1][0]:.1f} images/s")
        figures["raw"] = float(np.mean([r for r, _ in raws]))
        print("ratios (raw: the mean of both measurements; the machine's load drifts):")
        print(f"  local streaming / raw forward  {figures['local'] / figures['raw']:.2f}  (goal >= 0.9)")
        print(f"  local whole call / raw forward {figures['local_wall'] / figures['raw']:.2f}")
        if "heatmaps" in figures:
            print(f"  local with heatmaps / raw      {figures['heatmaps'] / figures['raw']:.2f}  (streaming)")
        if "dataloader" in figures:
            ratio = figures["local_wall"] / figures["dataloader"]
            print(f"  local / DataLoader script      {ratio:.2f}  (goal >= 1.0; both whole calls)")
        if "daemon" in figures:
            print(f"  local / daemon, heatmaps off   {figures['local_wall'] / figures['daemon_wall']:.2f} whole calls, "
                  f"{figures['local'] / figures['daemon']:.2f} streaming")  # fmt: skip
        if "daemon_heatmaps" in figures and "heatmaps" in figures:
            print(f"  local / daemon, heatmaps on    {figures['heatmaps_wall'] / figures['daemon_heatmaps_wall']:.2f} "
                  f"whole calls, {figures['heatmaps'] / figures['daemon_heatmaps']:.2f} streaming")  # fmt: skip
        if "ray" in figures:
            ratio = figures["ray_wall"] / figures["local_wall"]
            print(f"  ray / local                    {ratio:.2f}  (goal >= 0.8; both whole calls)")
            print(f"  ray / local, streaming         {figures['ray'] / figures['local']:.2f}")
        print(f"  rerun / local                  {figures['rerun'] / figures['local_wall']:.2f}  (whole calls)")
        if "rss" not in skip and args.rss_files:
            samples = rss_run(root, args.rss_files, args.workers)
            quarter = max(1, len(samples) // 4)
            first = max(r for _, r in samples[:quarter])
            last = max(r for _, r in samples[-quarter:])
            print(f"RSS over {args.rss_files} files (driver + decoding processes): first quarter peak "
                  f"{first:.0f} MiB, last quarter peak {last:.0f} MiB ({len(samples)} samples)")  # fmt: skip
        print(f"load average after: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
