"""Ingest benchmark: how fast the real daemon turns dropped files into routed rows.

Runs ``meddaemon start`` as a subprocess on a fresh inbox and state directory, once per
``--workers`` value, and drops the same synthetic files into it: small PNGs into ``inbox/busi/``
and 16-bit DICOMs (mixed transfer syntaxes, native and compressed) at the top of the inbox, routed
by the default routing rules. No model is active, so every scan ends in ``waiting_model``: this
measures ingest alone (stability, SHA-256, decoding, routing, the database, the moves).

Files are written first into ``inbox/.staging/`` (dot folders are ignored by the daemon) before the
daemon starts, then renamed into place one after the other, the way a well-behaved producer
delivers (rename-in: no stability window to wait). Measured:

* wall time from the first rename to the moment every file has a routed row with its move done,
  and from the last rename to that moment (the drain);
* per-file latency ``routed_at - discovered_at`` from the rows themselves (p50 / p95 / max);
* resident memory of the daemon and its worker processes (psutil, RSS summed over the process
  tree), after start-up and before the drop, its peak during the run, and after the drain.

Every file is synthetic (``synthetic_*`` names, ``SYNTHETIC^`` patient names, seeded pixels).

    .venv/bin/python benchmarks/ingest.py                 # 2,000 PNGs + 200 DICOMs, workers 0 and 2
    .venv/bin/python benchmarks/ingest.py --png 500 --dicom 50 --workers 0,1,2
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
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np
import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from dicom_factory import write_dicom, write_png  # noqa: E402
from pydicom.uid import (  # noqa: E402
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    RLELossless,
)

MEDDAEMON = Path(sys.executable).parent / "meddaemon"
TRANSFER_SYNTAXES = (
    ("explicit-le", ExplicitVRLittleEndian),
    ("implicit-le", ImplicitVRLittleEndian),
    ("deflated", DeflatedExplicitVRLittleEndian),
    ("rle", RLELossless),
    ("jpeg2000-lossless", JPEG2000Lossless),
    ("jpegls-lossless", JPEGLSLossless),
)
#: PNGs dropped (and waited for) before the measurement, so the workers exist when it starts
WARMUP = 4
#: (modality, body part) pairs the default routing rules send to busi and chestxray14
DICOM_KINDS = (("US", "BREAST"), ("CR", "CHEST"), ("DX", "CHEST"))


@dataclass
class Result:
    workers: int
    files: int
    wall_s: float
    drain_s: float
    drop_s: float
    latencies_ms: list[float]
    trickle_ms: list[float]
    rss_before: int
    rss_peak: int
    rss_after: int
    states: dict[str, int]

    @property
    def files_per_s(self) -> float:
        return self.files / self.wall_s


def make_corpus(
    folder: Path, n_png: int, n_dicom: int, png_size: int, dicom_size: int, n_trickle: int
) -> tuple[list[Path], list[Path]]:
    """The synthetic files, named by where they go in the inbox (``busi__x.png`` -> ``busi/x.png``),
    and the few PNGs dropped one at a time afterwards."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(20240611)
    files = []
    trickle = [
        write_png(
            folder / f"busi__synthetic_trickle_{i:03d}.png", rng.integers(0, 256, (png_size, png_size), dtype=np.uint8)
        )
        for i in range(n_trickle)
    ]
    warmup = [
        write_png(
            folder / f"busi__synthetic_warmup_{i:03d}.png", rng.integers(0, 256, (png_size, png_size), dtype=np.uint8)
        )
        for i in range(WARMUP)
    ]
    for i in range(n_png):
        pixels = rng.integers(0, 256, (png_size, png_size), dtype=np.uint8)
        files.append(write_png(folder / f"busi__synthetic_{i:05d}.png", pixels))
    ramp = np.add.outer(np.arange(dicom_size), np.arange(dicom_size)).astype(np.uint16) * (4095 // (2 * dicom_size))
    for i in range(n_dicom):
        label, syntax = TRANSFER_SYNTAXES[i % len(TRANSFER_SYNTAXES)]
        modality, body_part = DICOM_KINDS[i % len(DICOM_KINDS)]
        pixels = (ramp + rng.integers(0, 64, (dicom_size, dicom_size), dtype=np.uint16)).astype(np.uint16)
        files.append(
            write_dicom(
                folder / f"synthetic_{i:05d}_{label}.dcm",
                pixels=pixels,
                modality=modality,
                body_part=body_part,
                transfer_syntax=syntax,
                bits_stored=12,
                patient_name=f"SYNTHETIC^BENCH{i:05d}",
            )
        )
    return files, trickle, warmup


def tree_rss(pid: int) -> int:
    try:
        proc = psutil.Process(pid)
        procs = [proc, *proc.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    total = 0
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            total += p.memory_info().rss
    return total


def wait_for(predicate, timeout: float, what: str, proc: subprocess.Popen[bytes], log: Path) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None or time.monotonic() > deadline:
            tail = "\n".join(log.read_text("utf-8", "replace").splitlines()[-30:])
            raise SystemExit(f"gave up waiting for {what} (daemon exit {proc.poll()}); its log ends:\n{tail}")
        time.sleep(0.05)


DONE_SQL = "SELECT count(*) FROM scans WHERE routed_at IS NOT NULL AND pending_move_from IS NULL"


def done_count(db: Path) -> int:
    if not db.exists():
        return 0
    try:
        with sqlite3.connect(db, timeout=30) as conn:
            return conn.execute(DONE_SQL).fetchone()[0]
    except sqlite3.OperationalError:
        return 0


def parse_time(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).replace(tzinfo=None)


def run_once(
    corpus: list[Path],
    trickle: list[Path],
    warmup: list[Path],
    workdir: Path,
    workers: int,
    stable: float,
    batch_size: int | None,
) -> Result:
    inbox, state, staging = workdir / "inbox", workdir / "state", workdir / "inbox" / ".staging"
    staging.mkdir(parents=True)

    def stage(files: list[Path]) -> list[tuple[Path, Path]]:
        moves = []
        for src in files:
            staged = staging / src.name
            shutil.copyfile(src, staged)
            target = inbox / src.name.replace("__", "/")
            target.parent.mkdir(parents=True, exist_ok=True)
            moves.append((staged, target))
        return moves

    moves, trickle_moves, warmup_moves = stage(corpus), stage(trickle), stage(warmup)

    env = {k: v for k, v in os.environ.items() if not k.startswith("MEDDAEMON_")}
    log = workdir / "daemon.log"
    cmd = [
        str(MEDDAEMON),
        "start",
        "--watch",
        str(inbox),
        "--state-dir",
        str(state),
        "--workers",
        str(workers),
        "--stable-seconds",
        str(stable),
        "--rescan-seconds",
        "30",
        *(["--batch-size", str(batch_size)] if batch_size else []),
    ]
    with log.open("wb") as err:
        proc = subprocess.Popen(cmd, stdout=err, stderr=err, stdin=subprocess.DEVNULL, env=env, start_new_session=True)
    try:
        wait_for(lambda: "meddaemon.daemon: watching " in log.read_text("utf-8", "replace"), 60, "start-up", proc, log)
        db = state / "meddaemon.db"
        # warm-up: a few files in one batch, so that the decoding workers (forked on first use) exist
        for staged, target in warmup_moves:
            os.rename(staged, target)
        wait_for(lambda: done_count(db) >= len(warmup_moves), 60, "the warm-up files", proc, log)
        time.sleep(1.0)
        rss_before = tree_rss(proc.pid)
        peak = [rss_before]
        sampling = threading.Event()

        def sample() -> None:
            while not sampling.is_set():
                peak[0] = max(peak[0], tree_rss(proc.pid))
                time.sleep(0.1)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        t_first = time.monotonic()
        for staged, target in moves:
            os.rename(staged, target)
        t_last = time.monotonic()
        wait_for(lambda: done_count(db) >= len(warmup_moves) + len(moves), 600, f"{len(moves)} routed rows", proc, log)
        t_done = time.monotonic()
        sampling.set()
        sampler.join()
        rss_after = tree_rss(proc.pid)
        # an idle daemon: one file at a time, each waited for (drop to routed row, polled every 2 ms)
        trickle_ms = []
        with sqlite3.connect(db, timeout=30) as conn:
            for n, (staged, target) in enumerate(trickle_moves, start=len(warmup_moves) + len(moves) + 1):
                time.sleep(0.2)
                t0 = time.monotonic()
                os.rename(staged, target)
                while conn.execute(DONE_SQL).fetchone()[0] < n:
                    if time.monotonic() - t0 > 60:
                        raise SystemExit(f"{target.name} was not routed within 60 s; see {log}")
                    time.sleep(0.002)
                trickle_ms.append((time.monotonic() - t0) * 1000)
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(60)
        if rc != 0:
            raise SystemExit(f"the daemon exited {rc} after SIGTERM; see {log}")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

    with sqlite3.connect(db) as conn:
        rows = conn.execute(
            "SELECT discovered_at, routed_at FROM scans"
            " WHERE source_name NOT LIKE '%synthetic_trickle_%' AND source_name NOT LIKE '%synthetic_warmup_%'"
        ).fetchall()
        states = dict(conn.execute("SELECT state, count(*) FROM scans GROUP BY state").fetchall())
    latencies = [(parse_time(r) - parse_time(d)).total_seconds() * 1000 for d, r in rows]
    return Result(
        workers,
        len(moves),
        t_done - t_first,
        t_done - t_last,
        t_last - t_first,
        latencies,
        trickle_ms,
        rss_before,
        max(peak[0], rss_after),
        rss_after,
        states,
    )


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def table(results: list[Result]) -> str:
    mib = 1024 * 1024
    lines = [
        "| workers | files | drop (s) | drop to all routed (s) | files/s | drain after last drop (s) "
        "| latency p50 / p95 / max (ms) | one file alone, p50 / max (ms) | RSS before / peak / after (MiB) |",
        "|---:|---:|---:|---:|---:|---:|---|---|---|",
    ]
    for r in results:
        lat = r.latencies_ms
        lines.append(
            f"| {r.workers} | {r.files} | {r.drop_s:.2f} | {r.wall_s:.2f} | {r.files_per_s:.0f} | {r.drain_s:.2f} "
            f"| {statistics.median(lat):.0f} / {percentile(lat, 0.95):.0f} / {max(lat):.0f} "
            + (f"| {statistics.median(r.trickle_ms):.0f} / {max(r.trickle_ms):.0f} " if r.trickle_ms else "| - ")
            + f"| {r.rss_before / mib:.0f} / {r.rss_peak / mib:.0f} / {r.rss_after / mib:.0f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--png", type=int, default=2000, help="synthetic PNGs (default 2000)")
    parser.add_argument("--png-size", type=int, default=64, help="PNG side in pixels (default 64)")
    parser.add_argument("--dicom", type=int, default=200, help="synthetic DICOMs (default 200)")
    parser.add_argument("--dicom-size", type=int, default=256, help="DICOM side in pixels (default 256)")
    parser.add_argument("--trickle", type=int, default=20, help="PNGs then dropped one at a time (default 20)")
    parser.add_argument("--workers", default="0,2", help="comma-separated --workers values (default 0,2)")
    parser.add_argument("--stable-seconds", type=float, default=2.0, help="daemon stability window (default 2.0)")
    parser.add_argument("--batch-size", type=int, help="daemon --batch-size (default: the daemon's)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (logs, databases)")
    args = parser.parse_args()

    top = Path(tempfile.mkdtemp(prefix="meddaemon-bench-"))
    try:
        t0 = time.monotonic()
        corpus, trickle, warmup = make_corpus(
            top / "corpus", args.png, args.dicom, args.png_size, args.dicom_size, args.trickle
        )
        size = sum(p.stat().st_size for p in corpus)
        print(
            f"corpus: {args.png} PNGs {args.png_size}x{args.png_size} 8-bit + {args.dicom} DICOMs "
            f"{args.dicom_size}x{args.dicom_size} 12-bit in {len(TRANSFER_SYNTAXES)} transfer syntaxes "
            f"({', '.join(label for label, _ in TRANSFER_SYNTAXES)}), {size / 1e6:.1f} MB, "
            f"made in {time.monotonic() - t0:.1f} s",
            file=sys.stderr,
        )
        results = []
        for workers in (int(w) for w in args.workers.split(",")):
            result = run_once(
                corpus, trickle, warmup, top / f"workers-{workers}", workers, args.stable_seconds, args.batch_size
            )
            print(
                f"workers={workers}: {result.files} files in {result.wall_s:.2f} s, states {result.states}",
                file=sys.stderr,
            )
            results.append(result)
        print(
            f"\nmeddaemon ingest, {platform.python_implementation()} {platform.python_version()}, "
            f"{os.cpu_count()} CPUs ({platform.processor() or platform.machine()}), "
            f"rename-in drop, stable-seconds {args.stable_seconds}\n"
        )
        print(table(results))
    finally:
        if args.keep:
            print(f"\nkept {top}", file=sys.stderr)
        else:
            shutil.rmtree(top, ignore_errors=True)


if __name__ == "__main__":
    main()
