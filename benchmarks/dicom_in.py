"""DICOM network in benchmark: instances per second received by meddaemon to ``registered``, against
dcmtk's ``storescp`` writing the same instances to disk on the same machine.

The same senders for both: dcmtk's ``storescu``, one process with every instance in one association,
or ``--associations`` processes at once, each with its share. dcmtk's tools run with ``TCP_NODELAY=1``
in their environment: without it (``--dcmtk-defaults``) dcmtk leaves Nagle's algorithm on, and each
of ``storescp``'s answers waits for the sender's delayed ACK (``storescp`` then takes about 21
instances/s whatever the machine). ``--sender orthanc``: Orthanc, a real PACS as it runs by default
(dcmtk underneath, Nagle on), pushes the instances instead, ``--associations`` store jobs at once.
The instances are SYNTHETIC CT slices (``--size`` x ``--size`` 16-bit, Explicit VR Little Endian,
made with ``tests/dicom_factory.py``), fresh ones (new SOP Instance UIDs) for every run.

- **storescp**: ``storescp --fork`` (a process per association, as mercure runs it) writing to a
  folder; timed from the senders' start until they have all exited (storescp answers each C-STORE
  after writing the file, without fsync). Instances per second.
- **meddaemon**: ``meddaemon start --dicom-port`` (a subprocess, ``--workers``, no model: every scan
  ends ``waiting_model``), warmed up with a few instances; timed from the senders' start until they
  have all exited (**acknowledged**: every instance fsynced in the inbox, its row committed) and
  until every instance is a scan registered and moved out of the inbox (**registered**, polled in
  the database every 50 ms).

Runs alternate between the two, ``--rounds`` times per number of associations; the figures are
medians, each with the CPU load of other processes meanwhile (the machine may be shared).

- **where the time goes** (``--breakdown``): the receiver alone, in this process (no daemon), with
  each number of ``--associations``; milliseconds per instance in each step of the C-STORE handler
  (summed over the association threads), the rest (pynetdicom receiving the PDUs, storescu), and the
  folder fsyncs run per instance (under 1 when associations share them).

    .venv/bin/python benchmarks/dicom_in.py                        # 200 instances, 1 and 4 associations
    .venv/bin/python benchmarks/dicom_in.py --instances 400 --size 512 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from dicom_factory import write_dicom  # noqa: E402
from dicom_out import others_load  # noqa: E402

from dicom_senders import dcmtk  # noqa: E402

MEDDAEMON = Path(sys.executable).parent / "meddaemon"


@dataclass
class Run:
    receiver: str
    associations: int
    instances: int
    acknowledged_s: float
    registered_s: float | None
    load: float

    @property
    def acknowledged_rate(self) -> float:
        return self.instances / self.acknowledged_s

    @property
    def registered_rate(self) -> float | None:
        return None if self.registered_s is None else self.instances / self.registered_s


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def make_instances(folder: Path, count: int, size: int, seed: int) -> list[Path]:
    rng = np.random.default_rng(seed)
    study = f"1.2.826.0.1.3680043.8.498.{seed}.1"
    series = f"1.2.826.0.1.3680043.8.498.{seed}.2"
    return [
        write_dicom(
            folder / f"synthetic_{i:05d}.dcm",
            pixels=rng.integers(0, 4096, (size, size)).astype(np.uint16),
            modality="CT",
            extra={"StudyInstanceUID": study, "SeriesInstanceUID": series, "InstanceNumber": i + 1},
        )
        for i in range(count)
    ]


#: dcmtk disables Nagle's algorithm only when TCP_NODELAY is set (see the module docstring);
#: ``--dcmtk-defaults`` leaves it unset, as a modality or PACS built on dcmtk runs unless told
DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}


#: how a run's instances reach a receiver: (port, called AE title, files, associations) -> seconds
Send = Callable[[int, str, list[Path], int], float]


def send(port: int, called: str, files: list[Path], associations: int) -> float:
    """``associations`` storescu processes at once, each with its share; seconds until all exited."""
    storescu = dcmtk("storescu")
    shares = [files[i::associations] for i in range(associations)]
    started = time.perf_counter()
    procs = [
        subprocess.Popen(
            [storescu, "-aet", "BENCH", "-aec", called, "127.0.0.1", str(port), *map(str, share)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env=DCMTK_ENV,
        )
        for share in shares
    ]
    for proc in procs:
        _, err = proc.communicate(timeout=1800)
        if proc.returncode != 0:
            raise RuntimeError(f"storescu failed: {err.decode(errors='replace')[-500:]}")
    return time.perf_counter() - started


class PacsSender:
    """Orthanc, a real PACS as it runs by default, pushing the instances (``--sender orthanc``): each
    run's instances uploaded through its REST API beforehand (not timed), then sent by C-STORE to the
    receiver in ``associations`` store jobs at once, each with its share; seconds until all answered.
    Orthanc is dcmtk underneath, with Nagle's algorithm on."""

    def __init__(self, work: Path, associations: int) -> None:
        from orthanc import Orthanc, require_orthanc

        require_orthanc()
        self.orthanc = Orthanc(work / "orthanc")
        config = json.loads(self.orthanc.config.read_text())
        config["ConcurrentJobs"] = max(associations, 1)
        self.orthanc.config.write_text(json.dumps(config))
        self.orthanc.start()

    def __call__(self, port: int, called: str, files: list[Path], associations: int) -> float:
        ids = [self.orthanc.upload(path)["ID"] for path in files]
        body = json.dumps({"AET": called, "Host": "127.0.0.1", "Port": port}).encode()
        request = urllib.request.Request(f"{self.orthanc.url}/modalities/{called}", data=body, method="PUT")
        urllib.request.urlopen(request, timeout=10).close()
        shares = [ids[i::associations] for i in range(associations)]
        answers: list[dict[str, object]] = []
        started = time.perf_counter()
        threads = [
            threading.Thread(target=lambda s=share: answers.append(self.orthanc.store(called, s, 1800)))
            for share in shares
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        elapsed = time.perf_counter() - started
        failed = sum(int(a.get("FailedInstancesCount", 0)) for a in answers)  # type: ignore[call-overload]
        if len(answers) != associations or failed:
            raise RuntimeError(f"Orthanc did not send every instance: {answers}")
        return elapsed

    def stop(self) -> None:
        self.orthanc.stop()


def storescp_run(work: Path, files: list[Path], associations: int, sender: Send = send) -> Run:
    out = work / f"storescp-{time.monotonic_ns()}"
    out.mkdir()
    port = free_port()
    server = subprocess.Popen(
        [dcmtk("storescp"), "--fork", "-aet", "STORESCP", "-od", str(out), str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=DCMTK_ENV,
    )
    try:
        _wait_port(port)
        load = others_load()
        elapsed = sender(port, "STORESCP", files, associations)
        assert sum(1 for _ in out.iterdir()) == len(files), "storescp did not write every instance"
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(30)
    shutil.rmtree(out)
    return Run("storescp", associations, len(files), elapsed, None, load)


class Daemon:
    def __init__(self, work: Path, workers: int) -> None:
        self.root = work / "meddaemon"
        (self.root / "inbox").mkdir(parents=True)
        self.port = free_port()
        self.log = (self.root / "daemon.log").open("wb")
        self.proc = subprocess.Popen(
            [
                *(str(MEDDAEMON), "start", "--watch", str(self.root / "inbox")),
                *("--state-dir", str(self.root / "state"), "--dicom-port", str(self.port)),
                *("--workers", str(workers), "--default-task", "busi"),
            ],
            stdout=self.log,
            stderr=self.log,
        )
        deadline = time.monotonic() + 180
        while "listening on" not in (self.root / "daemon.log").read_text(errors="replace"):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the daemon's receiver did not start; see " + str(self.root / "daemon.log"))
            time.sleep(0.2)

    def settled(self) -> int:
        """Scans and duplicates recorded whose file has left the inbox."""
        with sqlite3.connect(self.root / "state" / "meddaemon.db", timeout=30) as conn:
            return int(
                conn.execute(
                    "SELECT (SELECT count(*) FROM scans WHERE pending_move_from IS NULL)"
                    " + (SELECT count(*) FROM duplicate_arrivals WHERE pending_move_from IS NULL)"
                ).fetchone()[0]
            )

    def run(self, files: list[Path], associations: int, sender: Send = send) -> Run:
        before = self.settled()
        load = others_load()
        started = time.perf_counter()
        acknowledged = sender(self.port, "MEDDAEMON", files, associations)
        while self.settled() < before + len(files):
            time.sleep(0.05)
        return Run("meddaemon", associations, len(files), acknowledged, time.perf_counter() - started, load)

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(120)
        self.log.close()


def _wait_port(port: int) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on port {port}")


def breakdown(work: Path, files: list[Path], associations: int = 1, sender: Send = send) -> dict[str, float]:
    """Milliseconds per instance in each step of the receiver's C-STORE handler (see the docstring),
    summed over the association threads, and the folder fsyncs run per instance (below 1: shared)."""
    from collections import Counter

    from meddaemon.config import load_settings
    from meddaemon.db.engine import create_db_engine, session_factory
    from meddaemon.db.migrate import upgrade
    from meddaemon.dicom import receiver

    spent: Counter[str] = Counter()
    lock = threading.Lock()

    def timed(name: str, step):  # type: ignore[no-untyped-def]
        def run(*args, **kwargs):  # type: ignore[no-untyped-def]
            started = time.perf_counter()
            try:
                return step(*args, **kwargs)
            finally:
                with lock:
                    spent[name] += time.perf_counter() - started

        return run

    steps = {
        (receiver, "_facts"): "header read",
        (receiver.Receiver, "_write_and_record"): "write, fdatasync || row",
        (receiver.Receiver, "_record"): "  of which the row",
        (receiver.FolderSync, "sync"): "folder fsync (shared)",
        (receiver.Receiver, "_store"): "handler in all",
    }
    originals = {key: getattr(*key) for key in steps}
    for (owner, name), label in steps.items():
        setattr(owner, name, timed(label, originals[(owner, name)]))
    try:
        root = work / f"breakdown-{associations}"
        settings = load_settings(
            env={}, flags={"watch": root / "inbox", "state_dir": root / "state", "dicom_min_free_bytes": 0}
        )
        settings.state_dir.mkdir(parents=True)
        settings.watch.mkdir(parents=True)
        engine = create_db_engine(settings.db_url)
        upgrade(engine)
        scp = receiver.Receiver(settings, session_factory(engine), "bench")
        scp.start()
        total = sender(scp.address[1], "MEDDAEMON", files, associations)
        fsyncs = scp.folder_sync.fsyncs
        scp.stop()
        engine.dispose()
    finally:
        for (owner, name), original in originals.items():
            setattr(owner, name, original)
    out = {label: 1000 * seconds / len(files) for label, seconds in spent.items()}
    out["outside the handler"] = 1000 * total * associations / len(files) - out["handler in all"]
    out["wall time"] = 1000 * total / len(files)
    out["folder fsyncs an instance"] = fsyncs / len(files)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--instances", type=int, default=200)
    parser.add_argument("--size", type=int, default=256, help="rows and columns of each SYNTHETIC slice")
    parser.add_argument("--associations", default="1,4", help="comma-separated numbers of concurrent senders")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2, help="the daemon's decoding processes")
    parser.add_argument("--breakdown", action="store_true", help="only where the receiver's time goes")
    parser.add_argument(
        "--dcmtk-defaults",
        action="store_true",
        help="dcmtk's tools with Nagle's algorithm left on (no TCP_NODELAY), as they run unless told",
    )
    parser.add_argument(
        "--sender",
        choices=("storescu", "orthanc"),
        default="storescu",
        help="who pushes the instances: dcmtk's storescu, or Orthanc (a real PACS, as it runs by default)",
    )
    args = parser.parse_args()
    if args.dcmtk_defaults:
        DCMTK_ENV.pop("TCP_NODELAY", None)
    counts = [int(a) for a in args.associations.split(",")]
    if args.breakdown:
        with tempfile.TemporaryDirectory(prefix="dicom-in-bench-") as tmp:
            files = make_instances(Path(tmp) / "set", args.instances, args.size, 0)
            pacs = PacsSender(Path(tmp), max(counts)) if args.sender == "orthanc" else None
            for associations in counts:
                load = others_load()
                print(f"{associations} association(s):")
                for label, value in breakdown(Path(tmp), files, associations, pacs or send).items():
                    unit = "" if label.startswith("folder fsyncs") else " ms an instance"
                    print(f"  {label:<26} {value:6.2f}{unit}")
                print(f"  (others' load {load:.1f} cores)")
            if pacs is not None:
                pacs.stop()
        return

    with tempfile.TemporaryDirectory(prefix="dicom-in-bench-") as tmp:
        work = Path(tmp)
        print(f"# {platform.node()}, {platform.processor() or platform.machine()}, python {platform.python_version()}")
        print(f"# {args.instances} SYNTHETIC {args.size}x{args.size} 16-bit CT instances a run, {args.rounds} rounds")
        print(f"# sender: {args.sender}{', dcmtk as it runs by default (Nagle on)' if args.dcmtk_defaults else ''}")
        daemon = Daemon(work, args.workers)
        pacs = PacsSender(work, max(counts)) if args.sender == "orthanc" else None
        sender: Send = pacs or send
        runs: list[Run] = []
        seed = 0
        try:
            daemon.run(make_instances(work / "warmup", 4, args.size, seed), 1, sender)  # workers forked, tables warm
            for _ in range(args.rounds):
                for associations in counts:
                    for receiver in ("storescp", "meddaemon"):
                        seed += 1
                        files = make_instances(work / f"set{seed}", args.instances, args.size, seed)
                        if receiver == "storescp":
                            runs.append(storescp_run(work, files, associations, sender))
                        else:
                            runs.append(daemon.run(files, associations, sender))
                        shutil.rmtree(work / f"set{seed}")
                        print(_row(runs[-1]), flush=True)
        finally:
            daemon.stop()
            if pacs is not None:
                pacs.stop()
        print()
        print(
            "| associations | storescp inst/s | meddaemon acknowledged inst/s | meddaemon registered inst/s | ratio |"
        )
        print("|---:|---:|---:|---:|---:|")
        for associations in counts:
            scp = statistics.median(
                r.acknowledged_rate for r in runs if r.receiver == "storescp" and r.associations == associations
            )
            ours = [r for r in runs if r.receiver == "meddaemon" and r.associations == associations]
            ack = statistics.median(r.acknowledged_rate for r in ours)
            reg = statistics.median(r.registered_rate or 0.0 for r in ours)
            load = statistics.median(r.load for r in runs if r.associations == associations)
            ratio = f"{reg / scp:.2f} (others' load {load:.1f} cores)"
            print(f"| {associations} | {scp:.1f} | {ack:.1f} | {reg:.1f} | {ratio} |")


def _row(run: Run) -> str:
    registered = f", registered {run.registered_rate:.1f}/s" if run.registered_rate is not None else ""
    return (
        f"{run.receiver:<9} {run.associations} association(s): {run.instances} acknowledged in "
        f"{run.acknowledged_s:.2f} s ({run.acknowledged_rate:.1f}/s){registered}; others' load {run.load:.1f} cores"
    )


if __name__ == "__main__":
    main()
