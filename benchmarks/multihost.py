"""Several daemons on one PostgreSQL database and one inbox: throughput with 1, 2 and 3 daemons, and
one daemon killed with SIGKILL midway (every file processed exactly once, its work taken over).

Each daemon runs as its own ``meddaemon start`` process under its own node name, as on separate
hosts, sharing the inbox, the state directory and a fresh PostgreSQL database. All images are
SYNTHETIC (seeded grey noise PNGs, 256x256) and the model is an untrained SYNTHETIC busi classifier.

    .venv/bin/python benchmarks/multihost.py                      # 1,500 files; 1, 2, 3 daemons; kill run
    .venv/bin/python benchmarks/multihost.py --files 300 --daemons 1,3 --kill-files 0
    .venv/bin/python benchmarks/multihost.py --files 600 --daemons 1,3 --kill-files 0 --cold 1

On a machine with 2 cores the daemons share those cores: more daemons cannot add compute, only
overlap (one daemon's database round trips and file moves with another's forward passes).
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import create_engine, func, select, text
from sqlalchemy.orm import Session, sessionmaker

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from inference import MEDDAEMON, SPEC, TASK, make_pngs, write_model  # noqa: E402

from meddaemon.db.clock import read_db_clock  # noqa: E402
from meddaemon.db.engine import create_db_engine, session_factory  # noqa: E402
from meddaemon.db.migrate import upgrade  # noqa: E402
from meddaemon.db.models import DaemonInstance, DuplicateArrival, InboxClaim, Result, Scan, ScanEvent  # noqa: E402
from model_factory import promote_into  # noqa: E402 (tests/, put on the path by inference)

ADMIN_URL = os.environ.get("MEDDAEMON_TEST_POSTGRES", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
WARMUP_PER_DAEMON = 16
DONE = ("inferred", "reported", "archived")


@dataclass
class Run:
    daemons: int
    threads: int
    files: int
    to_inferred_s: float
    to_archived_s: float
    split: dict[str, int]
    killed: str = ""
    takeover_s: float | None = None
    exactly_once: str = ""
    cold: int = 0


class Database:
    """A fresh PostgreSQL database for one run, dropped afterwards."""

    def __init__(self) -> None:
        self.admin = create_engine(ADMIN_URL, isolation_level="AUTOCOMMIT")
        self.name = f"meddaemon_bench_{uuid.uuid4().hex[:10]}"
        with self.admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{self.name}"'))
        self.url = self.admin.url.set(database=self.name).render_as_string(hide_password=False)
        self.engine = create_db_engine(self.url)
        upgrade(self.engine)
        self.sessions: sessionmaker[Session] = session_factory(self.engine)

    def scalar(self, query):  # type: ignore[no-untyped-def]
        with self.sessions() as session:
            return session.scalar(query)

    def drop(self) -> None:
        self.engine.dispose()
        with self.admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)'))
        self.admin.dispose()


class Farm:
    """``n`` daemons on one inbox, state directory and database."""

    def __init__(self, workdir: Path, db: Database, model: Path, workers: int, lease: float) -> None:
        self.workdir, self.db = workdir, db
        self.inbox, self.state = workdir / "inbox", workdir / "state"
        (self.inbox / TASK).mkdir(parents=True)
        self.staging = self.inbox / ".staging"
        self.staging.mkdir()
        self.workers, self.lease = workers, lease
        self.procs: list[subprocess.Popen[bytes]] = []
        promote_into(db.url, self.state / "models", model)

    def start(self, n: int, threads: int, first: int = 0) -> None:
        """Start daemons ``first + 1`` to ``first + n`` (their node names and log files)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("MEDDAEMON_")}
        env["MEDDAEMON_INFERENCE_THREADS"] = str(threads)
        for i in range(first, first + n):
            log = (self.workdir / f"daemon-{i + 1}.log").open("wb")
            cmd = [str(MEDDAEMON), "start", "--watch", str(self.inbox), "--state-dir", str(self.state)]
            cmd += ["--db", self.db.url, "--workers", str(self.workers), "--rescan-seconds", "5"]
            run_env = {**env, "MEDDAEMON_NODE": f"node-{i + 1}", "MEDDAEMON_LEASE_SECONDS": str(self.lease)}
            self.procs.append(
                subprocess.Popen(cmd, stdout=log, stderr=log, env=run_env, start_new_session=True, cwd=self.workdir)
            )

    def log(self, i: int) -> str:
        return (self.workdir / f"daemon-{i + 1}.log").read_text("utf-8", "replace")

    def drop(self, files: list[Path]) -> None:
        """Copy into the staging folder (ignored: a dot folder), then rename into place one by one."""
        staged = []
        for f in files:
            target = self.staging / f.name
            target.write_bytes(f.read_bytes())
            staged.append(target)
        for f in staged:
            os.rename(f, self.inbox / TASK / f.name)

    def wait(self, predicate, timeout: float, what: str) -> float:  # type: ignore[no-untyped-def]
        started = time.monotonic()
        while not predicate():
            if time.monotonic() - started > timeout:
                raise TimeoutError(f"{what} not reached in {timeout} s; see the logs in {self.workdir}")
            if not any(p.poll() is None for p in self.procs):
                raise RuntimeError(f"every daemon exited; see the logs in {self.workdir}")
            time.sleep(0.05)
        return time.monotonic() - started

    def count(self, *states: str) -> int:
        return self.db.scalar(select(func.count()).select_from(Scan).where(Scan.state.in_(states))) or 0

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()

    def split(self) -> dict[str, int]:
        with self.db.sessions() as session:
            details = session.scalars(
                select(ScanEvent.detail)
                .join(Scan, Scan.id == ScanEvent.scan_id)
                .where(ScanEvent.state == "inferred", Scan.source_name.not_like("%warmup%"))
            )
            return dict(sorted(Counter(d.rsplit(" ", 1)[-1] for d in details if d).items()))


def warm_up(farm: Farm, n: int, corpus: Path) -> None:
    """Every daemon serving the model and past its first batches, before the timed burst."""
    farm.wait(lambda: all("serving busi/v1" in farm.log(i) for i in range(n)), 300, "every daemon serving")
    warm = make_pngs(corpus, f"synthetic_warmup{n}", WARMUP_PER_DAEMON * n, 256, seed=100 + n)
    farm.drop(warm)
    farm.wait(lambda: farm.count("archived") == len(warm), 300, "the warm-up archived")


def run(n: int, burst: list[Path], model: Path, top: Path, args: argparse.Namespace, kill: bool = False) -> Run:
    db = Database()
    farm = Farm(top / f"run-{n}{'-kill' if kill else ''}", db, model, args.workers, args.lease)
    try:
        threads = max(1, (os.cpu_count() or 1) // n) if args.threads == "share" else int(args.threads)
        cold = min(args.cold, n - 1)
        farm.start(n - cold, threads)
        warm_up(farm, n - cold, top / "corpus")
        before = farm.count(*DONE)
        started = time.monotonic()
        farm.start(cold, threads, first=n - cold)  # cold: the burst arrives while they load and fork
        farm.drop(burst)
        total = before + len(burst)
        killed, takeover = "", None
        if kill:
            killed, takeover = kill_one(farm, before + len(burst) // 3)
        farm.wait(lambda: farm.count(*DONE) == total, 900, "all inferred")
        inferred = time.monotonic() - started
        farm.wait(lambda: farm.count("archived") == total, 900, "all archived")
        archived = time.monotonic() - started
        farm.stop()
        check = exactly_once(db, total)
        return Run(n, threads, len(burst), inferred, archived, farm.split(), killed, takeover, check, cold)
    finally:
        farm.stop()
        db.drop()


def kill_one(farm: Farm, after_registered: int) -> tuple[str, float]:
    """SIGKILL the second daemon once a third of the burst is registered and it holds work; returns
    which, and the seconds (database clock) from the kill to another daemon declaring it lost."""
    victim = farm.procs[1]
    farm.wait(lambda: farm.count(*DONE, "routed") >= after_registered, 600, "a third registered")
    while True:
        daemon_id = farm.db.scalar(select(DaemonInstance.id).where(DaemonInstance.pid == victim.pid))
        os.killpg(victim.pid, signal.SIGSTOP)
        held = farm.db.scalar(select(func.count()).select_from(Scan).where(Scan.claimed_by == daemon_id)) or 0
        held += farm.db.scalar(select(func.count()).select_from(InboxClaim).where(InboxClaim.daemon_id == daemon_id))
        if held:
            os.killpg(victim.pid, signal.SIGKILL)
            victim.wait()
            with farm.db.sessions() as session:
                killed_at = read_db_clock(session)
            break
        os.killpg(victim.pid, signal.SIGCONT)
        time.sleep(0.02)
    farm.wait(
        lambda: farm.db.scalar(select(DaemonInstance.state).where(DaemonInstance.id == daemon_id)) == "lost",
        300,
        "the killed daemon declared lost",
    )
    lost_at = farm.db.scalar(select(DaemonInstance.stopped_at).where(DaemonInstance.id == daemon_id))
    return f"daemon {daemon_id} holding {held} items", lost_at - killed_at


def exactly_once(db: Database, total: int) -> str:
    with db.sessions() as session:
        scans = session.scalar(select(func.count()).select_from(Scan))
        names = session.scalar(select(func.count(func.distinct(Scan.source_name))))
        results = session.scalar(select(func.count()).select_from(Result))
        dups = session.scalar(select(func.count()).select_from(DuplicateArrival))
        repeated = session.scalar(
            select(func.count()).select_from(
                select(ScanEvent.scan_id, ScanEvent.state)
                .group_by(ScanEvent.scan_id, ScanEvent.state)
                .having(func.count() > 1)
                .subquery()
            )
        )
    ok = scans == names == total and results == total * len(SPEC.labels) and dups == 0 and repeated == 0
    counts = f"{scans} scans, {names} names, {results} results, {dups} duplicates, {repeated} repeated steps"
    return f"{'yes' if ok else 'NO'}: {counts}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, default=1500)
    parser.add_argument("--daemons", default="1,2,3", help="daemon counts to time, comma-separated")
    parser.add_argument("--kill-files", type=int, default=1500, help="files of the 3-daemon kill run (0: skip)")
    parser.add_argument("--arch", default="mobilenet_v2")
    parser.add_argument("--workers", type=int, default=2, help="decoding processes per daemon")
    parser.add_argument(
        "--threads",
        default="share",
        help="inference_threads per daemon: 'share' (cores / daemons, the advice for daemons sharing a machine) "
        "or a number (0: one per core in every daemon)",
    )
    parser.add_argument(
        "--cold",
        type=int,
        default=0,
        help="daemons of each run (never all of them) started only as the burst is dropped: no model "
        "loaded, no decoding worker started, no warm-up",
    )
    parser.add_argument("--lease", type=float, default=10.0, help="lease_seconds of every daemon")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (logs)")
    args = parser.parse_args()

    top = Path(tempfile.mkdtemp(prefix="meddaemon-multihost-"))
    started = time.monotonic()
    model = write_model(top / "model", args.arch, SPEC.contract)
    corpus = make_pngs(top / "corpus", "synthetic", max(args.files, args.kill_files), 256, seed=1)
    runs = []
    for n in (int(x) for x in args.daemons.split(",") if x):
        runs.append(run(n, corpus[: args.files], model, top, args))
        print(f"{n} daemon(s): {runs[-1]}", file=sys.stderr)
    if args.kill_files:
        runs.append(run(3, corpus[: args.kill_files], model, top, args, kill=True))
        print(f"kill run: {runs[-1]}", file=sys.stderr)

    print(
        f"\nmeddaemon on PostgreSQL, {args.arch} (SYNTHETIC, untrained), {os.cpu_count()} CPUs "
        f"({platform.processor() or platform.machine()}), --workers {args.workers} per daemon, "
        f"lease {args.lease:.0f} s; load average {os.getloadavg()[0]:.2f} at the end; "
        f"{time.monotonic() - started:.0f} s in all\n"
    )
    columns = ["daemons", "cold", "threads each", "files", "drop to all inferred (s)", "files/s"]
    columns += ["drop to all archived (s)", "files/s"]
    columns += ["inferred by", "SIGKILL", "takeover after kill (s)", "exactly once"]
    print("| " + " | ".join(columns) + " |")
    print("|" + "---:|" * 8 + "---|---|---:|---|")
    for r in runs:
        split = ", ".join(f"{k}: {v}" for k, v in r.split.items())
        takeover = f"{r.takeover_s:.1f}" if r.takeover_s is not None else ""
        cells = [r.daemons, r.cold, r.threads or "1 per core", r.files]
        cells += [f"{r.to_inferred_s:.1f}", f"{r.files / r.to_inferred_s:.1f}"]
        cells += [f"{r.to_archived_s:.1f}", f"{r.files / r.to_archived_s:.1f}", split, r.killed or "-"]
        cells += [takeover, r.exactly_once]
        print("| " + " | ".join(str(c) for c in cells) + " |")
    if not args.keep:
        shutil.rmtree(top, ignore_errors=True)
    else:
        print(f"\nkept {top}", file=sys.stderr)


if __name__ == "__main__":
    main()
