"""DICOM results out benchmark: objects written and sent per second, and what DICOM outputs cost the
daemon's end-to-end throughput.

1. **written**: a state directory made by the real daemon (``--once``, no destination) from
   ``--files`` SYNTHETIC breast ultrasound DICOMs (a randomly initialised, untrained small CNN on
   ``busi``: per scan an SR, a Parametric Map, a Secondary Capture and the Encapsulated PDF).
   Then, in this process, ``DicomOutputs.prepare`` (read the rows and source header, build, write
   with fsync) for every scan (set back to ``inferred`` for it: prepare writes nothing for a scan
   already reported): objects per second, and the build CPU time of each kind (median ms).
2. **sent**: those objects queued for Orthanc (Debian ``orthanc`` + ``orthanc-dicomweb``, started
   here on loopback) by C-STORE and by STOW-RS, and sent by the outbox sender (``drain``): objects
   per second per protocol, and this process's CPU time an object. Then by C-STORE again as the
   daemon's stream sends them, a scan's four objects a round, with an association each round
   (``keep_open_seconds = 0``) and with the association kept, alternated twice; and as a
   steady stream of scans does, one scan's objects every 0.1 s (``DimseSender`` alone), each way,
   alternated twice: ms a send takes an object, and CPU ms an object. Skipped when Orthanc is not
   installed.
3. **end to end**: ``meddaemon start`` (a subprocess, ``--workers 2``, reports on) without
   destinations, then with all four outputs for Orthanc by C-STORE (a folder without Orthanc);
   each run warmed up (the model served, the report process started), then ``--files`` DICOMs
   renamed into the inbox and timed until every scan is archived (with outputs: delivered first).
   Both runs poll for scans to archive every 0.25 s (``model_poll_seconds``; 2 s by default, to
   which a run of a few seconds would be rounded).
   Scans per second, and the cost of the outputs. Alternated ``--rounds`` times. With Orthanc, also
   its CPU time a scan during the run with outputs: the PACS storing them shares the 2 cores here,
   where at a site it runs on a machine of its own.
4. **CPU per scan** (``--cpu``, instead of 1 to 3): ``Daemon.run(once=True)`` in this process
   (``workers = 0``: decoding here too; 16 scans or fewer: the reports too) over ``--files`` DICOMs,
   after a one-scan warm-up, without destinations and then with all four outputs for a folder: the
   process's CPU time (user + system, not wall time: it does not grow with others' load) per scan,
   alternated ``--rounds`` times; ``--cprofile DIR`` writes a cProfile (CPU-time clock) of each run.
   The cost fraction is outputs CPU / (daemon CPU + outputs CPU). ``--task chestxray14`` measures it
   with that preset's architecture (DenseNet-121, SYNTHETIC random weights, never downloaded) at its
   320 x 320 input, on SYNTHETIC 320 x 320 DX chest DICOMs: a multilabel model, with a Parametric Map
   and a Secondary Capture for every label over its threshold.

Every figure records the load of other processes meanwhile (the machine is shared).

    .venv/bin/python benchmarks/dicom_out.py                 # about a minute on 2 cores
    .venv/bin/python benchmarks/dicom_out.py --files 64 --rounds 2
    .venv/bin/python benchmarks/dicom_out.py --end-to-end-only --arch mobilenet_v2   # a seed-sized model
    .venv/bin/python benchmarks/dicom_out.py --cpu --files 16 --rounds 3               # about a minute
    .venv/bin/python benchmarks/dicom_out.py --cpu --task chestxray14 --files 6        # about 3 minutes
    .venv/bin/python benchmarks/dicom_out.py --objects --task chestxray14 --files 20 --rounds 5  # about a minute

5. **objects** (``--objects``, instead of 1 to 4): a scan's objects built and encoded in this
   process, the part of ``prepare`` that ``meddaemon.dicom`` decides, without a daemon or a
   database: ``--files`` (at least 14) SYNTHETIC scans of ``--task`` (busi: one label called, with a
   map and an overlay; chestxray14: every other of its 14 labels), each its own SOP Instance UID and
   probabilities, after two warm-up scans and with the heap settled as the report process settles
   it. Medians of CPU ms per scan: each kind built (``build_objects``), then every object encoded
   (``encoding.encode``), and the KiB of each kind in the last scan; ``--rounds`` runs, each in a
   fresh process so that no run inherits another's patterns. It does not move with the daemon's
   other work, as ``--cpu`` does.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from dicom_factory import write_dicom  # noqa: E402
from sqlalchemy import func, select, update  # noqa: E402

from meddaemon.config import DestinationConfig, load_settings  # noqa: E402
from meddaemon.daemon.service import Daemon  # noqa: E402
from meddaemon.db.engine import transaction  # noqa: E402
from meddaemon.db.models import Scan  # noqa: E402
from meddaemon.dicom import outbox  # noqa: E402
from meddaemon.dicom.content import scan_facts  # noqa: E402
from meddaemon.dicom.senders import DimseSender  # noqa: E402
from meddaemon.dicom.writer import DicomOutputs, build_objects  # noqa: E402
from meddaemon.report.output import scan_report_path  # noqa: E402
from meddaemon.states import ScanState  # noqa: E402
from meddaemon.stored_paths import stored_file  # noqa: E402
from model_factory import promote, promote_into, write_model  # noqa: E402
from orthanc import DICOMWEB_PLUGIN, ORTHANC, Orthanc  # noqa: E402

MEDDAEMON = Path(sys.executable).parent / "meddaemon"
STUDY = "1.2.826.0.1.3680043.8.498.2024001"


def process_cpu(pid: int) -> float:
    """CPU seconds (user + system) process ``pid`` has used so far."""
    times = psutil.Process(pid).cpu_times()
    return times.user + times.system


def others_load() -> float:
    """CPU seconds per second used by processes other than this one and its children, over 1 s."""
    mine = {os.getpid(), *(c.pid for c in psutil.Process().children(recursive=True))}
    before = psutil.cpu_times()
    time.sleep(1.0)
    after = psutil.cpu_times()
    busy = (after.user - before.user) + (after.system - before.system)
    own = sum(p.cpu_percent(None) for p in psutil.process_iter() if p.pid in mine) / 100
    return max(0.0, busy - own)


#: per task: the SYNTHETIC sources' modality, body part and size (a side of the square image)
SOURCES = {"busi": ("US", "BREAST", 64), "chestxray14": ("DX", "CHEST", 320)}


def drop_dicoms(inbox: Path, count: int, offset: int = 0, task: str = "busi") -> None:
    modality, body_part, side = SOURCES[task]
    rng = np.random.default_rng(offset)
    staging = inbox.parent / "staging"
    for i in range(offset, offset + count):
        path = write_dicom(
            staging / f"synthetic_{i:04d}.dcm",
            pixels=rng.integers(0, 255, (side, side), dtype=np.uint8),
            modality=modality,
            body_part=body_part,
            extra={"StudyInstanceUID": STUDY},
        )
        (inbox / task).mkdir(parents=True, exist_ok=True)
        os.rename(path, inbox / task / path.name)


# -- 1. written ------------------------------------------------------------------------------------


def written(root: Path, files: int) -> tuple[Daemon, float, int, dict[str, float]]:
    (root / "share").mkdir(parents=True, exist_ok=True)
    settings = load_settings(
        env={},
        flags={
            "watch": root / "inbox",
            "state_dir": root / "state",
            "create_watch": True,
            "stable_seconds": 0.0,
            "workers": 0,
            "destination": [{"name": "share", "kind": "folder", "path": str(root / "share")}],
        },
    )
    daemon = Daemon(settings)
    daemon.prepare()
    promote(daemon, write_model(root / "model"))
    drop_dicoms(settings.watch, files)
    daemon.run(once=True)
    with daemon.sessions() as session:
        ids = list(session.scalars(select(Scan.id).where(Scan.format == "dicom")))
        shas = dict(session.execute(select(Scan.id, Scan.sha256).where(Scan.id.in_(ids))).all())
    with transaction(daemon.sessions) as session:  # prepare writes the objects of inferred scans only
        session.execute(update(Scan).where(Scan.id.in_(ids)).values(state=ScanState.INFERRED))
    outputs = DicomOutputs(settings)
    t0 = time.perf_counter()
    objects = 0
    for scan_id in ids:
        pdf = scan_report_path(settings.reports_dir, shas[scan_id], False).read_bytes()
        objects += len(outputs.prepare(daemon.sessions, scan_id, pdf).objects)
    elapsed = time.perf_counter() - t0
    with transaction(daemon.sessions) as session:
        session.execute(update(Scan).where(Scan.id.in_(ids)).values(state=ScanState.ARCHIVED))
    per_kind: dict[str, list[float]] = {}
    with daemon.sessions() as session:
        facts = [scan_facts(session, i, settings.state_dir, settings.dicom_uid_root) for i in ids[:8]]
    for f in facts:
        for kind in ("sr", "pmap", "sc", "pdf"):
            t = time.process_time()
            build_objects(f, (kind,), b"%PDF-1.4\n" + b"0" * 60_000, False)
            per_kind.setdefault(kind, []).append((time.process_time() - t) * 1000)
    return daemon, objects / elapsed, objects, {k: statistics.median(v) for k, v in per_kind.items()}


# -- 2. sent ---------------------------------------------------------------------------------------


#: (destination name, kind, objects a round, keep_open_seconds, what the line says)
SENDS = [
    ("pacs", "dicom", 32, 5.0, "C-STORE"),
    ("web", "dicomweb", 32, 5.0, "STOW-RS"),
    ("pacs-scan-new", "dicom", 4, 0.0, "C-STORE, a scan's 4 objects a round, an association each"),
    ("pacs-scan-kept", "dicom", 4, 5.0, "C-STORE, a scan's 4 objects a round, the association kept"),
    ("pacs-scan-new-2", "dicom", 4, 0.0, "C-STORE, a scan's 4 objects a round, an association each"),
    ("pacs-scan-kept-2", "dicom", 4, 5.0, "C-STORE, a scan's 4 objects a round, the association kept"),
]


def sent(daemon: Daemon, root: Path) -> dict[str, list[tuple[float, float]]]:
    """{what: [(objects/s, this process's CPU ms an object)]}: the first two send the objects for the
    first time, the others again (Orthanc answers a resent instance as stored)."""
    server = Orthanc(root / "orthanc")
    server.start()
    try:
        rates: dict[str, list[tuple[float, float]]] = {}
        for name, kind, batch, keep_open, what in SENDS:
            destination = {**server.destination(name, kind), "keep_open_seconds": keep_open}
            settings = load_settings(
                env={},
                flags={
                    "watch": daemon.settings.watch,
                    "state_dir": daemon.settings.state_dir,
                    "destination": [destination],
                },
            )
            with transaction(daemon.sessions) as session:
                rows = session.execute(
                    select(outbox.OutboxItem).where(outbox.OutboxItem.destination == "share")
                ).scalars()
                items = {}
                for row in rows:
                    items.setdefault(row.scan_id, []).append(
                        outbox.NewItem(row.object_key, name, row.sop_class_uid, row.sop_instance_uid, row.path)
                    )
                count = sum(outbox.enqueue(session, scan_id, new) for scan_id, new in items.items())
            t0, c0 = time.perf_counter(), time.process_time()
            outbox.OutboxSender(settings, daemon.sessions, None, batch=batch).drain()
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
            rates.setdefault(f"{what} ({count} objects)", []).append((count / wall, cpu * 1000 / count))
        rates.update(trickled(daemon, server))
        return rates
    finally:
        server.stop()


#: the daemon's stream: a scan's objects queued every TRICKLE_SECONDS (about its rate with outputs)
TRICKLE_SECONDS = 0.1


def trickled(daemon: Daemon, server: Orthanc) -> dict[str, list[tuple[float, float]]]:
    """C-STORE of each scan's objects in turn, TRICKLE_SECONDS apart (``DimseSender``, as the outbox
    sends a round): with an association each round and with one kept open, alternated twice;
    (ms a send takes an object, this process's CPU ms an object)."""
    with daemon.sessions() as session:
        rows = session.execute(
            select(outbox.OutboxItem.scan_id, outbox.OutboxItem.path)
            .where(outbox.OutboxItem.destination == "share")
            .order_by(outbox.OutboxItem.id)
        ).all()
    scans: dict[int, list[Path]] = {}
    for scan_id, path in rows:
        scans.setdefault(scan_id, []).append(stored_file(path, daemon.settings.state_dir))
    count = sum(len(paths) for paths in scans.values())
    figures: dict[str, list[tuple[float, float]]] = {}
    for keep_open in (0.0, 5.0, 0.0, 5.0):
        destination = DestinationConfig(**{**server.destination("pacs", "dicom"), "keep_open_seconds": keep_open})
        sender, sending = DimseSender(destination), 0.0
        c0 = time.process_time()
        for paths in scans.values():
            t0 = time.perf_counter()
            assert all(d.acknowledged for d in sender.send(paths)), "Orthanc did not store an object"
            sending += time.perf_counter() - t0
            sender.release_idle()
            time.sleep(TRICKLE_SECONDS)
        sender.close()
        cpu = (time.process_time() - c0) * 1000 / count
        how = "an association each round" if keep_open == 0 else "the association kept"
        what = f"C-STORE, a scan's objects every {TRICKLE_SECONDS} s, {how} ({count} objects)"
        figures.setdefault(what, []).append((sending * 1000 / count, cpu))
    return figures


# -- 3. end to end ---------------------------------------------------------------------------------


def seed_sized_model(folder: Path, architecture: str) -> Path:
    """An untrained (SYNTHETIC) ``busi`` model at the preset's own input contract (224 x 224)."""
    import torch

    from meddaemon.engine import registry
    from meddaemon.engine.architectures import build_model
    from meddaemon.engine.tasks import BUILTIN_TASKS

    spec = BUILTIN_TASKS["busi"]
    torch.manual_seed(0)
    registry.save_version(
        build_model(architecture, spec.contract.channels, spec.num_outputs),
        task="busi",
        version="v1",
        labels=spec.labels,
        kind=spec.kind,
        architecture=architecture,
        input_contract=spec.contract,
        out_dir=folder,
        training_data_fingerprint="synthetic: random initialisation, untrained (benchmark)",
    )
    return folder


#: the archive stage's cadence (``model_poll_seconds``) in the end-to-end runs: at the default 2 s
#: a run of a few seconds was timed to the poll after its last delivery, not to the delivery
ARCHIVE_POLL_SECONDS = 0.25


def end_to_end(root: Path, files: int, destination: str | None, architecture: str) -> tuple[float, float]:
    """Scans per second from the inbox to ``reported`` (the daemon's own work: inference, the report
    and, with destinations, the DICOM objects) and to ``archived`` (with destinations: delivered
    first), the daemon warmed up first."""
    shutil.rmtree(root, ignore_errors=True)
    inbox, state = root / "inbox", root / "state"
    (inbox / "busi").mkdir(parents=True)
    model = write_model(root / "model") if architecture == "tiny" else seed_sized_model(root / "model", architecture)
    promote_into(f"sqlite:///{state / 'meddaemon.db'}", state / "models", model)
    config = root / "meddaemon.toml"
    config.write_text(f"model_poll_seconds = {ARCHIVE_POLL_SECONDS}\n{destination or ''}")
    log = (root / "daemon.log").open("wb")
    proc = subprocess.Popen(
        [
            str(MEDDAEMON),
            "start",
            *("--config", str(config), "--watch", str(inbox), "--state-dir", str(state)),
            *("--stable-seconds", "0.2", "--workers", "2", "--rescan-seconds", "5"),
        ],
        stdout=log,
        stderr=log,
        env={k: v for k, v in os.environ.items() if not k.startswith("MEDDAEMON_")},
        start_new_session=True,
    )
    db = sqlite3.connect(state / "meddaemon.db", timeout=30)

    def count(states: str) -> int:
        return int(db.execute(f"SELECT count(*) FROM scans WHERE state IN ({states})").fetchone()[0])

    def wait(n: int, states: str = "'archived'", timeout: float = 600.0) -> None:
        deadline = time.monotonic() + timeout
        while count(states) < n:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the daemon stopped or stalled; see {root / 'daemon.log'}")
            time.sleep(0.05)

    try:
        drop_dicoms(inbox, 2, offset=10_000)
        wait(2)
        t0 = time.perf_counter()
        drop_dicoms(inbox, files)
        wait(files + 2, "'reported', 'archived'")
        reported = time.perf_counter() - t0
        wait(files + 2)
        return files / reported, files / (time.perf_counter() - t0)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(60)
        db.close()
        log.close()


# -- 4. CPU per scan --------------------------------------------------------------------------------


def cpu_model(folder: Path, task: str) -> Path:
    """An untrained (SYNTHETIC) model: for ``busi`` the small CNN at 32 x 32, for any other task its
    preset's architecture at the preset's input contract (``chestxray14``: DenseNet-121 at 320 x 320)."""
    if task == "busi":
        return write_model(folder)
    from meddaemon.engine.tasks import BUILTIN_TASKS

    spec = BUILTIN_TASKS[task]
    return write_model(folder, task, architecture=spec.architecture, contract=spec.contract)


def cpu_per_scan(root: Path, files: int, outputs: bool, cprofile: Path | None, task: str) -> tuple[float, float, int]:
    """CPU seconds per scan of a ``--once`` run over ``files`` DICOMs, the daemon warmed up first; of
    them, the CPU seconds per scan of ``DicomOutputs.prepare`` (reading the facts, building, encoding,
    writing the objects: its own thread's CPU time, less noisy than the difference of two runs); and
    the number of objects written."""
    import cProfile

    flags: dict[str, object] = {
        "watch": root / "inbox",
        "state_dir": root / "state",
        "create_watch": True,
        "stable_seconds": 0.0,
        "workers": 0,
    }
    if outputs:
        (root / "share").mkdir(parents=True, exist_ok=True)
        flags["destination"] = [{"name": "share", "kind": "folder", "path": str(root / "share")}]
    settings = load_settings(env={}, flags=flags)
    warm = Daemon(settings)
    warm.prepare()
    promote(warm, cpu_model(root / "model", task))
    drop_dicoms(settings.watch, 1, offset=5000, task=task)
    warm.run(once=True)
    warm.engine.dispose()
    daemon = Daemon(settings)
    drop_dicoms(settings.watch, files, task=task)
    profile = cProfile.Profile(time.process_time) if cprofile else None
    prepared = [0.0]
    prepare = DicomOutputs.prepare

    def timed_prepare(self: DicomOutputs, *args: Any, **kwargs: Any) -> Any:
        start = time.thread_time()
        try:
            return prepare(self, *args, **kwargs)
        finally:
            prepared[0] += time.thread_time() - start

    DicomOutputs.prepare = timed_prepare  # type: ignore[method-assign]
    before = os.times()
    if profile is not None:
        profile.enable()
    try:
        daemon.run(once=True)
    finally:
        DicomOutputs.prepare = prepare  # type: ignore[method-assign]
    if profile is not None:
        profile.disable()
        cprofile.mkdir(parents=True, exist_ok=True)
        profile.dump_stats(cprofile / f"once_{task}_{'with' if outputs else 'without'}_outputs.prof")
    after = os.times()
    with daemon.sessions() as session:
        objects = session.scalar(select(func.count()).select_from(outbox.OutboxItem)) or 0
    daemon.engine.dispose()
    return (after.user - before.user + after.system - before.system) / files, prepared[0] / files, objects


def main_cpu(files: int, rounds: int, cprofile: Path | None, task: str) -> None:
    runs: dict[bool, list[float]] = {False: [], True: []}
    prepares: list[float] = []
    objects = 0
    for _ in range(rounds):
        load = others_load()
        for outputs in (False, True):
            with tempfile.TemporaryDirectory(prefix="meddaemon-dicom-cpu-") as tmp:
                cpu, prepared, count = cpu_per_scan(Path(tmp), files, outputs, cprofile, task)
                runs[outputs].append(cpu)
                objects = max(objects, count)
        prepares.append(prepared)
        print(
            f"  round (others' load {load:.2f} cores): without outputs {runs[False][-1] * 1000:.0f} ms, "
            f"with {runs[True][-1] * 1000:.0f} ms CPU per scan, of which prepare {prepared * 1000:.0f} ms"
        )
    without, with_ = statistics.median(runs[False]), statistics.median(runs[True])
    cost, prepared = with_ - without, statistics.median(prepares)
    # the difference of two runs is as noisy as the daemon's own CPU time (tens of ms with a large
    # model); prepare's own CPU time is a part of the outputs' cost, so a floor of the fraction
    floor = prepared / (without + prepared)
    met = max(cost / with_, floor) <= 0.10
    print(
        f"CPU per scan ({task}), --once over {files} scans: without outputs {without * 1000:.0f} ms, with all "
        f"four to a folder {with_ * 1000:.0f} ms ({objects} objects, the warm-up scan's included): "
        f"the outputs cost {cost * 1000:.0f} ms a scan, {cost / with_:.0%} of the CPU; "
        f"DicomOutputs.prepare alone {prepared * 1000:.0f} ms a scan, at least {floor:.0%} "
        f"(goal: at most 10%: {'met' if met else 'not met'})"
    )


def objects_per_scan(root: Path, files: int, task: str) -> dict[str, float]:
    """CPU ms per scan of ``--objects``: each kind built, and all of a scan's objects encoded."""
    from PIL import Image

    from meddaemon import heap
    from meddaemon.dicom import encoding
    from meddaemon.dicom.content import ScanFacts, read_source
    from meddaemon.engine.heatmap_grid import grid_bytes
    from meddaemon.engine.tasks import all_tasks
    from meddaemon.label_results import LabelResult

    modality, body_part, side = SOURCES[task]
    rng = np.random.default_rng(0)
    labels = all_tasks()[task].labels
    results = []
    for number, label in enumerate(labels):
        called = number % 2 == 0 if task == "chestxray14" else number == 1
        grid = overlay = None
        if called:  # a map kept as the daemon keeps it: its 7 x 7 grid, read at the input's size
            grid, overlay = grid_bytes(rng.random((7, 7)).astype(np.float32)), root / f"{label}.jpg"
            Image.fromarray(rng.integers(0, 255, (side, side, 3), dtype=np.uint8)).save(overlay, quality=90)
        results.append((label, called, grid, overlay))
    architecture = "densenet121" if task == "chestxray14" else "small_cnn"
    spent: dict[str, list[float]] = {}
    for number in range(files + 2):
        pixels = rng.integers(0, 4000, (side, side), dtype=np.uint16)
        source = read_source(write_dicom(root / "source.dcm", pixels=pixels, modality=modality, body_part=body_part))
        facts = ScanFacts(
            number,
            f"{number:064x}",
            task,
            "v1",
            architecture,
            tuple(
                LabelResult(label, p, 0.5, called, None, overlay, (side, side) if called else None, grid)
                for (label, called, grid, overlay), p in zip(results, rng.random(len(results)), strict=True)
            ),
            source,
            "1.2.826.0.1.3680043.10.",
        )
        built = []
        for kind in ("sr", "pmap", "sc", "pdf"):
            start = time.process_time()
            built += build_objects(facts, (kind,), b"%PDF-1.4\n%%EOF\n", False)
            spent.setdefault(kind, []).append(time.process_time() - start)
        start = time.process_time()
        encoded = [(key, encoding.encode(ds)) for key, ds in built]
        spent.setdefault("encode", []).append(time.process_time() - start)
        if number == 1:
            heap.settle()
            spent = {}
    medians = {k: statistics.median(v) * 1000 for k, v in spent.items()}
    medians["all"] = statistics.median(sum(v[i] for v in spent.values()) for i in range(files)) * 1000
    medians["objects"] = len(built)
    for kind in ("sr", "pmap", "sc", "pdf"):  # the last scan's objects: KiB a scan by kind
        medians[f"{kind} KiB"] = sum(len(data) for key, data in encoded if key.split(":")[0] == kind) / 1024
    return medians


def main_objects(files: int, rounds: int, task: str) -> None:
    for _ in range(rounds):
        run = subprocess.run(
            [sys.executable, __file__, "--objects-run", "--files", str(files), "--task", task],
            capture_output=True,
            text=True,
            check=True,
        )
        print(run.stdout.strip())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=24)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument(
        "--arch",
        default="tiny",
        help="end to end: 'tiny' (the small CNN at 32 x 32: reports dominate) or an architecture at busi's 224 x 224",
    )
    parser.add_argument("--end-to-end-only", action="store_true")
    parser.add_argument("--cpu", action="store_true", help="only the CPU time per scan of --once runs (4.)")
    parser.add_argument("--cprofile", type=Path, help="with --cpu: write a cProfile of each run here")
    parser.add_argument(
        "--task",
        choices=sorted(SOURCES),
        default="busi",
        help="with --cpu or --objects: busi (the small CNN at 32 x 32) or chestxray14 (its preset, DenseNet-121 at "
        "320 x 320)",
    )
    parser.add_argument("--objects", action="store_true", help="only a scan's objects built and encoded (5.)")
    parser.add_argument("--objects-run", action="store_true", help=argparse.SUPPRESS)  # one run of --objects
    args = parser.parse_args()
    if args.objects_run:
        with tempfile.TemporaryDirectory(prefix="meddaemon-dicom-objects-") as tmp:
            ms = objects_per_scan(Path(tmp), max(args.files, 14), args.task)
        kinds = ", ".join(f"{k} {ms[k]:.1f}" for k in ("sr", "pmap", "sc", "pdf", "encode"))
        print(f"objects ({args.task}, {ms['objects']:.0f} a scan), ms CPU a scan: {kinds}; all {ms['all']:.1f}")
        sizes = ", ".join(f"{k} {ms[f'{k} KiB']:.0f}" for k in ("sr", "pmap", "sc", "pdf"))
        print(f"  KiB a scan: {sizes}")
        return
    if args.objects:
        main_objects(args.files, args.rounds, args.task)
        return
    if args.cpu:
        main_cpu(args.files, args.rounds, args.cprofile, args.task)
        return
    have_orthanc = ORTHANC.exists() and DICOMWEB_PLUGIN.exists()
    print(f"# {platform.node()}, {os.cpu_count()} cores, python {platform.python_version()}")
    with tempfile.TemporaryDirectory(prefix="meddaemon-dicom-out-") as tmp:
        root = Path(tmp)
        if not args.end_to_end_only:
            daemon, rate, objects, per_kind = written(root / "written", args.files)
            print(f"written: {objects} objects for {args.files} scans, {rate:.1f} objects/s (build + fsync'd write)")
            print("  build, median ms: " + ", ".join(f"{k} {v:.1f}" for k, v in per_kind.items()))
            if have_orthanc:
                for what, figures in sent(daemon, root).items():
                    unit = "ms a send, an object" if "every" in what else "objects/s"
                    shown = "; ".join(f"{rate:.1f} {unit}, CPU {cpu:.2f} ms an object" for rate, cpu in figures)
                    print(f"sent to Orthanc by {what}: {shown}")
            else:
                print("sent: skipped (Orthanc not installed)")
            daemon.engine.dispose()
        if have_orthanc:
            pacs = Orthanc(root / "orthanc-e2e")
            pacs.start()
            d = pacs.destination("pacs", "dicom")
            table = f'[[destination]]\nname = "pacs"\nkind = "dicom"\nae_title = "{d["ae_title"]}"\n'
            table += f'host = "127.0.0.1"\nport = {d["port"]}\n'
        else:
            pacs = None
            (root / "share-e2e").mkdir(parents=True, exist_ok=True)
            table = f'[[destination]]\nname = "share"\nkind = "folder"\npath = "{root / "share-e2e"}"\n'
        try:
            off, on, pacs_cpu = [], [], []
            for _ in range(args.rounds):
                load = others_load()
                off.append(end_to_end(root / "e2e", args.files, None, args.arch))
                before = process_cpu(pacs.proc.pid) if pacs is not None and pacs.proc is not None else 0.0
                on.append(end_to_end(root / "e2e", args.files, table, args.arch))
                if pacs is not None and pacs.proc is not None:  # the warm-up's 2 scans included
                    pacs_cpu.append((process_cpu(pacs.proc.pid) - before) / (args.files + 2) * 1000)
                stored = f"; Orthanc storing them: {pacs_cpu[-1]:.1f} ms CPU a scan" if pacs_cpu else ""
                print(
                    f"  round (others' load {load:.2f} cores): to reported off {off[-1][0]:.2f}, on {on[-1][0]:.2f}; "
                    f"to archived off {off[-1][1]:.2f}, on {on[-1][1]:.2f} scans/s{stored}"
                )
        finally:
            if pacs is not None:
                pacs.stop()
        where = "Orthanc by C-STORE" if have_orthanc else "a folder"
        for i, stage in enumerate(("reported", "archived")):
            without, with_ = statistics.median(r[i] for r in off), statistics.median(r[i] for r in on)
            print(
                f"end to end ({args.arch}), inbox to {stage}, {args.files} scans: "
                f"without outputs {without:.2f} scans/s, "
                f"with all four to {where} {with_:.2f} scans/s: cost {1 - with_ / without:.0%}"
            )


if __name__ == "__main__":
    main()
