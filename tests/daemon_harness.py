"""The real daemon as a subprocess, for the tests that abuse it: start it on an inbox, signal it,
kill -9 it with its process group, wait for what its log or database say, and print the logs of
every daemon a failed test started.

Every file written here is synthetic (``synthetic_*`` names, pixels from a seeded generator).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from dicom_factory import write_png
from prometheus_client.parser import text_string_to_metric_families

from meddaemon.daemon.workers import DecodingPool
from meddaemon.stored_paths import stored_file

MEDDAEMON = Path(sys.executable).parent / "meddaemon"
TASK = "busi"  # a first-level folder named after a task routes its files there


# -- synthetic files ---------------------------------------------------------------------------


def synthetic_png(folder: Path, index: int, size: int = 8, channels: int = 0) -> bytes:
    """The bytes of a small synthetic PNG unique to ``index`` (written once under ``folder``)."""
    rng = np.random.default_rng(index)
    shape = (size, size, channels) if channels else (size, size)
    pixels = rng.integers(0, 256, shape, dtype=np.uint8)
    path = write_png(folder / f"synthetic_{index:06d}.png", pixels)
    return path.read_bytes()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def drop(inbox: Path, name: str, data: bytes, *, rename: bool) -> Path:
    """Put a file in the inbox: renamed into place from ``.name.part``, or written directly."""
    target = inbox / name
    target.parent.mkdir(parents=True, exist_ok=True)
    if rename:
        part = target.with_name(f".{target.name}.part")
        part.write_bytes(data)
        os.rename(part, target)
    else:
        target.write_bytes(data)
    return target


def files_under(*folders: Path) -> list[Path]:
    return sorted(
        p for folder in folders if folder.exists() for p in folder.rglob("*") if p.is_file() or p.is_symlink()
    )


# -- the daemon as a subprocess ------------------------------------------------------------------


@dataclass
class Layout:
    root: Path
    inbox: Path = field(init=False)
    state: Path = field(init=False)
    logs: Path = field(init=False)

    def __post_init__(self) -> None:
        self.inbox = self.root / "inbox"
        self.state = self.root / "state"
        self.logs = self.root / "logs"
        for folder in (self.inbox / TASK, self.logs):
            folder.mkdir(parents=True, exist_ok=True)

    @property
    def db(self) -> Path:
        return self.state / "meddaemon.db"

    def stored_file(self, stored: object) -> Path:
        """The file a row's stored path names (relative to the state dir, or absolute)."""
        return stored_file(str(stored), self.state)

    def stored_files(self) -> list[Path]:
        """Every file the daemon has put away (work/, archive/, failed/), ``.reason.json`` excluded."""
        return [
            p
            for p in files_under(self.state / "work", self.state / "archive", self.state / "failed")
            if not p.name.endswith(".reason.json")
        ]

    def inbox_files(self) -> list[Path]:
        return files_under(self.inbox)


class RunningDaemon:
    def __init__(self, proc: subprocess.Popen[bytes], log: Path) -> None:
        self.proc = proc
        self.log = log

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_text(self) -> str:
        try:
            return self.log.read_text("utf-8", "replace")
        except FileNotFoundError:
            return ""

    def tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Until the daemon has its schema and watches the inbox (its "watching ..." log line)."""
        wait_until(lambda: "meddaemon.daemon: watching " in self.log_text(), timeout, "the daemon to start", self)

    def signal(self, signum: int) -> None:
        self.proc.send_signal(signum)

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.signal(signal.SIGUSR1)  # the daemon writes every thread's stack to its log
            time.sleep(1.0)
            pytest.fail(f"the daemon did not exit within {timeout} s; its log ends:\n{self.tail(120)}")

    def kill_hard(self) -> None:
        """kill -9 of the daemon; its decoding workers, orphaned, go too (same process group)."""
        if self.alive():
            self.proc.kill()
        self.proc.wait(10)
        kill_group(self.pid)


def kill_group(pgid: int) -> None:
    with suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


#: ``python -c SQLITE_LOCKER DB SECONDS``: another process holding SQLite's write lock (``BEGIN
#: EXCLUSIVE``) for SECONDS; prints "locked" once it holds it and "released" after
SQLITE_LOCKER = """
import sqlite3, sys, time
conn = sqlite3.connect(sys.argv[1], timeout=30, isolation_level=None)
conn.execute("BEGIN EXCLUSIVE")
print("locked", flush=True)
time.sleep(float(sys.argv[2]))
conn.execute("COMMIT")
print("released", flush=True)
"""


def kill_workers(pool: DecodingPool) -> None:
    """SIGKILL every worker process of ``pool`` (what the kernel's OOM killer does), and wait until
    the pool has noticed."""
    for pid in list(pool.executor._processes):  # type: ignore[union-attr]
        os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while not pool.executor._broken:  # type: ignore[union-attr]
        assert time.monotonic() < deadline, "the pool never noticed its worker's death"
        time.sleep(0.05)


def slow_read_files(seconds: float, *args: Any) -> Any:
    """``intake.read_files`` taking ``seconds`` more, in a decoding worker: a slow decoder."""
    from meddaemon.daemon.intake import read_files

    time.sleep(seconds)
    return read_files(*args)


def daemon_env() -> dict[str, str]:
    """The environment without MEDDAEMON_* settings, so only the flags given here count."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEDDAEMON_")}
    env["PYTHONUNBUFFERED"] = "1"
    return env


class Daemons:
    """Starts daemons (and helper processes) in their own process groups; kills whatever is left."""

    def __init__(self, layout: Layout) -> None:
        self.layout = layout
        self.started: list[RunningDaemon] = []
        self.helpers: list[subprocess.Popen[bytes]] = []

    def start(
        self,
        *,
        once: bool = False,
        stable: float = 0.3,
        rescan: float = 2.0,
        workers: int = 0,
        batch_size: int | None = None,
        extra: tuple[str, ...] = (),
        env: dict[str, str] | None = None,
        watch: str | None = None,
        wrap: Callable[[list[str]], list[str]] = list,
    ) -> RunningDaemon:
        """A daemon on the layout's inbox and state dir; ``env`` adds settings (``MEDDAEMON_*``);
        ``watch`` spells the inbox another way (relative to the layout's root, the daemon's cwd);
        ``wrap`` runs the command inside another (``permissions.held_to_file_modes``)."""
        log = self.layout.logs / f"daemon-{len(self.started) + 1:02d}.log"
        cmd = [
            str(MEDDAEMON),
            "start",
            "--watch",
            watch or str(self.layout.inbox),
            "--state-dir",
            str(self.layout.state),
            "--stable-seconds",
            str(stable),
            "--rescan-seconds",
            str(rescan),
            "--workers",
            str(workers),
            *(["--batch-size", str(batch_size)] if batch_size else []),
            *(["--once"] if once else []),
            *extra,
        ]
        with log.open("wb") as err:
            proc = subprocess.Popen(
                wrap(cmd),
                stdin=subprocess.DEVNULL,
                stdout=err,
                stderr=err,
                env={**daemon_env(), **(env or {})},
                start_new_session=True,
                cwd=self.layout.root,
            )
        daemon = RunningDaemon(proc, log)
        self.started.append(daemon)
        return daemon

    def helper(self, *args: str) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(
            [sys.executable, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True
        )
        self.helpers.append(proc)
        return proc

    def run_once(self, timeout: float = 90.0, **options: object) -> RunningDaemon:
        daemon = self.start(once=True, **options)  # type: ignore[arg-type]
        rc = daemon.wait(timeout)
        assert rc == 0, f"--once exited {rc}; its log ends:\n{daemon.tail()}"
        return daemon

    def cleanup(self) -> None:
        for proc in [d.proc for d in self.started] + self.helpers:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGCONT)  # a stopped daemon must be able to die
            kill_group(proc.pid)
            with suppress(subprocess.TimeoutExpired):
                proc.wait(10)

    def logs(self) -> str:
        parts = []
        for daemon in self.started:
            parts.append(f"===== {daemon.log.name} (pid {daemon.pid}, exit {daemon.proc.returncode}) =====")
            parts.append(daemon.tail(60))
        return "\n".join(parts)


@pytest.fixture
def layout(tmp_path: Path) -> Layout:
    return Layout(tmp_path)


@pytest.fixture
def daemons(layout: Layout, request: pytest.FixtureRequest) -> Iterator[Daemons]:
    failed_before = request.session.testsfailed
    farm = Daemons(layout)
    try:
        yield farm
    finally:
        farm.cleanup()
        if request.session.testsfailed > failed_before:
            capture = request.config.pluginmanager.getplugin("capturemanager")
            with capture.global_and_fixture_disabled():
                sys.stderr.write(f"\n--- daemon logs of {request.node.name} ---\n{farm.logs()}\n")


def wait_until(
    predicate: Callable[[], bool], timeout: float, what: str, daemon: RunningDaemon | None = None, every: float = 0.1
) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return
        if daemon is not None and not daemon.alive() and not predicate():
            pytest.fail(f"the daemon exited ({daemon.proc.returncode}) while waiting for {what}:\n{daemon.tail()}")
        if time.monotonic() > deadline:
            log = f"; the daemon's log ends:\n{daemon.tail()}" if daemon else ""
            pytest.fail(f"timed out after {timeout} s waiting for {what}{log}")
        time.sleep(every)


# -- what a running daemon serves ----------------------------------------------------------------


def scrape(url: str) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """``{sample name: {sorted label pairs: value}}`` from the text the endpoint served."""
    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.status == 200
        text = response.read().decode()
    samples: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return samples


def one(samples, name: str, **labels: str) -> float:
    return samples[name][tuple(sorted(labels.items()))]
