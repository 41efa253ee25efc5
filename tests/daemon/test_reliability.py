"""Reliability of the real daemon (docs/design.md section 3), run as a subprocess and abused.

Each test starts ``meddaemon start`` on an inbox under ``tmp_path`` and checks what the database and
the file system say afterwards: kill -9 at random moments, a frozen watcher, files dropped while the
daemon is down, slow writers, duplicates, a database locked by someone else, SIGTERM.

Every file written here is synthetic (``synthetic_*`` names, pixels from a seeded generator).
The daemon's stderr goes to ``tmp_path/logs/``; the tail of every log is printed when a test fails.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import sqlite3
import tempfile
import threading
import time
from collections import Counter
from contextlib import closing
from pathlib import Path

import psutil
import pytest

from daemon_harness import SQLITE_LOCKER, TASK, Daemons, Layout, drop, files_under, sha, synthetic_png, wait_until
from model_factory import promote_into, write_model

pytestmark = pytest.mark.slow


# -- reading the database ------------------------------------------------------------------------


def query(db: Path, sql: str, params: tuple[object, ...] = ()) -> list[tuple]:
    if not db.exists():
        return []
    try:
        with closing(sqlite3.connect(db, timeout=30)) as conn:
            return conn.execute(sql, params).fetchall()
    except sqlite3.OperationalError as exc:
        if "no such table" in str(exc):  # the daemon has not created its schema yet
            return []
        raise


def count(db: Path, table: str) -> int:
    rows = query(db, f"SELECT count(*) FROM {table}")
    return rows[0][0] if rows else 0


def scan_rows(db: Path) -> list[dict[str, object]]:
    columns = (
        "id",
        "sha256",
        "state",
        "task_name",
        "source_name",
        "stored_path",
        "pending_move_from",
        "failure_reason",
        "size_bytes",
    )
    rows = query(db, f"SELECT {', '.join(columns)} FROM scans ORDER BY id")
    return [dict(zip(columns, row, strict=True)) for row in rows]


def duplicate_rows(db: Path) -> list[dict[str, object]]:
    columns = ("id", "scan_id", "source_name", "stored_path", "pending_move_from")
    rows = query(db, f"SELECT {', '.join(columns)} FROM duplicate_arrivals")
    return [dict(zip(columns, row, strict=True)) for row in rows]


def wait_for_committed_moves(db: Path, deadline: float) -> bool:
    """Poll (as fast as SQLite answers) until a row has a committed move not yet finished."""
    sql = (
        "SELECT EXISTS (SELECT 1 FROM scans WHERE pending_move_from IS NOT NULL)"
        " OR EXISTS (SELECT 1 FROM duplicate_arrivals WHERE pending_move_from IS NOT NULL)"
    )
    conn: sqlite3.Connection | None = None
    try:
        while time.monotonic() < deadline:
            try:
                if conn is None and db.exists():
                    conn = sqlite3.connect(db, timeout=0.05)
                if conn is not None and conn.execute(sql).fetchone()[0]:
                    return True
            except sqlite3.OperationalError:  # no schema yet, or busy for a moment
                pass
            time.sleep(0.0005)
        return False
    finally:
        if conn is not None:
            conn.close()


def assert_nothing_half_done(layout: Layout) -> None:
    """Every row's file is where the row says, and no committed move is left to finish."""
    scans, duplicates = scan_rows(layout.db), duplicate_rows(layout.db)
    assert [r for r in scans if r["pending_move_from"]] == []
    assert [r for r in duplicates if r["pending_move_from"]] == []
    missing = [
        r["stored_path"]
        for r in scans + duplicates
        if r["stored_path"] and not layout.stored_file(r["stored_path"]).exists()
    ]
    assert missing == []
    assert query(layout.db, "PRAGMA integrity_check") == [("ok",)]


# -- the specification ---------------------------------------------------------------------------


def test_kill_9_at_random_moments_loses_no_file_and_doubles_no_row(layout: Layout, daemons: Daemons, tmp_path: Path):
    """300 distinct PNGs, a few byte-identical copies and a few bad files stream into inbox/busi/
    while the daemon is killed with SIGKILL at random moments and restarted, five times; a final
    ``--once`` run drains. Then every content has exactly one scan row, every extra copy one
    duplicate row, the inbox is empty, every row's file is where the row says, and the files put
    away are exactly the files written."""
    rng = random.Random(20240611)
    made = tmp_path / "made"
    distinct = [(f"synthetic_{i:04d}.png", synthetic_png(made, i)) for i in range(300)]
    copied = rng.sample(range(300), 6)
    copies = [(f"synthetic_copy_{k:02d}.png", distinct[i][1]) for k, i in enumerate(copied + copied[:1])]
    truncated = synthetic_png(made, 10_000, size=64)
    bad = [
        ("synthetic_bad_empty.png", b""),
        ("synthetic_bad_noise.png", rng.randbytes(3000)),
        ("synthetic_bad_truncated.png", truncated[: len(truncated) // 2]),
        ("synthetic_bad_text.dcm", b"SYNTHETIC: this is not DICOM at all\n"),
    ]
    stream = distinct + copies + bad
    rng.shuffle(stream)
    names_by_sha: dict[str, list[str]] = {}
    for name, data in stream:
        names_by_sha.setdefault(sha(data), []).append(name)

    writer_error: list[BaseException] = []

    def writer() -> None:
        wrng = random.Random(7)
        try:
            for name, data in stream:
                drop(layout.inbox / TASK, name, data, rename=wrng.random() < 0.6)
                time.sleep(wrng.uniform(0.0, 0.06))
        except BaseException as exc:  # pragma: no cover - reported by the assertion below
            writer_error.append(exc)

    thread = threading.Thread(target=writer, name="synthetic-writer")
    thread.start()
    caught_mid_move = 0
    try:
        for round_ in range(5):
            daemon = daemons.start(workers=2 if round_ % 2 else 0, stable=0.3, rescan=1.0, batch_size=16)
            deadline = time.monotonic() + rng.uniform(0.5, 4.0)
            if round_ % 2:
                # aim at the narrowest window: rows committed, their files not yet moved
                caught_mid_move += wait_for_committed_moves(layout.db, deadline + 2.0)
            else:
                time.sleep(max(0.0, deadline - time.monotonic()))
            assert daemon.alive(), f"round {round_}: the daemon died by itself:\n{daemon.tail()}"
            daemon.kill_hard()
    finally:
        thread.join()
    assert writer_error == []
    print(f"{caught_mid_move} of 2 aimed kills landed between a commit and its moves")

    daemons.run_once(workers=0, stable=0.3)

    assert layout.inbox_files() == []
    scans = scan_rows(layout.db)
    by_sha = Counter(r["sha256"] for r in scans)
    assert set(by_sha) == set(names_by_sha), "every distinct content, and only those, is a scan"
    assert [s for s, n in by_sha.items() if n != 1] == [], "one row per content, however often it was killed"
    duplicates = duplicate_rows(layout.db)
    sha_of_scan = {r["id"]: r["sha256"] for r in scans}
    dup_count = Counter(sha_of_scan[d["scan_id"]] for d in duplicates)
    assert dup_count == Counter({s: len(n) - 1 for s, n in names_by_sha.items() if len(n) > 1})
    assert {str(r["source_name"]) for r in scans} | {str(d["source_name"]) for d in duplicates} == {
        f"{TASK}/{name}" for name, _ in stream
    }

    bad_shas = {sha(data) for _, data in bad}
    failed = [r for r in scans if r["state"] == "failed"]
    assert {r["sha256"] for r in failed} == bad_shas
    assert all(r["failure_reason"] for r in failed)
    assert all(Path(f"{layout.stored_file(r['stored_path'])}.reason.json").exists() for r in failed)
    assert {r["state"] for r in scans if r["sha256"] not in bad_shas} == {"waiting_model"}
    assert {r["task_name"] for r in scans if r["sha256"] not in bad_shas} == {TASK}

    assert_nothing_half_done(layout)
    stored = layout.stored_files()
    assert len(stored) == len(stream), "the files put away are exactly the files written"
    for row in scans + duplicates:
        expected = row.get("sha256") or sha_of_scan[row["scan_id"]]
        assert sha(layout.stored_file(row["stored_path"]).read_bytes()) == expected, f"{row['stored_path']} was altered"


def test_a_frozen_watcher_catches_up_with_2000_files(layout: Layout, daemons: Daemons, tmp_path: Path):
    """SIGSTOP freezes the daemon (its watcher thread included) while 2,000 files arrive; after
    SIGCONT every one of them is registered within the timeout, by events or by the rescan."""
    daemon = daemons.start(workers=2, stable=0.3, rescan=2.0)
    daemon.wait_ready()
    made = tmp_path / "made"
    payloads = [synthetic_png(made, i) for i in range(2000)]
    os.kill(daemon.pid, signal.SIGSTOP)
    try:
        for i, data in enumerate(payloads):
            drop(layout.inbox / TASK, f"synthetic_{i:04d}.png", data, rename=i % 2 == 0)
        assert count(layout.db, "scans") == 0
    finally:
        os.kill(daemon.pid, signal.SIGCONT)

    wait_until(lambda: count(layout.db, "scans") == 2000, 90, "2,000 scan rows", daemon, every=0.5)
    wait_until(lambda: layout.inbox_files() == [], 10, "an empty inbox", daemon)
    assert daemon.alive()
    daemon.signal(signal.SIGTERM)
    assert daemon.wait(30) == 0
    assert {r["sha256"] for r in scan_rows(layout.db)} == {sha(p) for p in payloads}
    assert count(layout.db, "duplicate_arrivals") == 0
    assert_nothing_half_done(layout)
    assert len(layout.stored_files()) == 2000


def test_files_dropped_while_the_daemon_is_down_are_processed_at_its_start(
    layout: Layout, daemons: Daemons, tmp_path: Path
):
    """Files that arrive while no daemon runs are found by the startup scan (the periodic rescan is
    an hour away here); work in progress (``.part``, ``.tmp``, dotfiles) is left alone."""
    first = daemons.start(rescan=3600)
    first.wait_ready()
    first.signal(signal.SIGTERM)
    assert first.wait(30) == 0

    made = tmp_path / "made"
    payloads = [synthetic_png(made, i) for i in range(25)]
    for i, data in enumerate(payloads):
        drop(layout.inbox / TASK, f"synthetic_{i:04d}.png", data, rename=i % 3 == 0)
    in_progress = [
        drop(layout.inbox / TASK, name, synthetic_png(made, 100 + k), rename=False)
        for k, name in enumerate(["synthetic_upload.png.part", "synthetic_copying.png.tmp", ".synthetic_rsync.aB3xYz"])
    ]

    second = daemons.start(rescan=3600)
    wait_until(lambda: count(layout.db, "scans") == 25, 30, "25 scan rows", second)
    time.sleep(1.0)  # were anything else to be registered, it would be by now
    assert {r["sha256"] for r in scan_rows(layout.db)} == {sha(p) for p in payloads}
    assert {r["state"] for r in scan_rows(layout.db)} == {"waiting_model"}
    assert layout.inbox_files() == sorted(in_progress), "work in progress waits for its rename"
    second.signal(signal.SIGTERM)
    assert second.wait(30) == 0
    assert_nothing_half_done(layout)


def test_a_slow_writer_is_never_read_before_its_file_is_complete(layout: Layout, daemons: Daemons, tmp_path: Path):
    """A file growing in chunks for 3 s (pauses of 0.1 s, a twentieth of the 2 s window: a loaded
    machine may hold the writer back for more than a pause) is read once, whole: its row has the
    SHA-256 of the complete file. A file written slowly under ``x.png.part`` and renamed to
    ``x.png`` is registered exactly once, never under its .part name."""
    daemon = daemons.start(stable=2.0, rescan=1.0)
    daemon.wait_ready()
    made = tmp_path / "made"
    growing = synthetic_png(made, 1, size=256, channels=3)
    renamed = synthetic_png(made, 2, size=256, channels=3)
    assert len(growing) > 100_000

    def write_slowly(path: Path, data: bytes, chunks: int = 30, pause: float = 0.1) -> None:
        step = -(-len(data) // chunks)
        with path.open("wb") as out:
            for start in range(0, len(data), step):
                out.write(data[start : start + step])
                out.flush()
                time.sleep(pause)

    inbox = layout.inbox / TASK
    part = inbox / "synthetic_renamed.png.part"
    other = threading.Thread(
        target=lambda: (write_slowly(part, renamed), os.rename(part, inbox / "synthetic_renamed.png"))
    )
    other.start()
    write_slowly(inbox / "synthetic_growing.png", growing)
    other.join()

    wait_until(lambda: count(layout.db, "scans") >= 2, 20, "both files registered", daemon)
    time.sleep(2.5)  # two more rescans: nothing may be registered twice
    rows = {r["source_name"]: r for r in scan_rows(layout.db)}
    assert set(rows) == {f"{TASK}/synthetic_growing.png", f"{TASK}/synthetic_renamed.png"}
    assert rows[f"{TASK}/synthetic_growing.png"]["sha256"] == sha(growing)
    assert rows[f"{TASK}/synthetic_growing.png"]["size_bytes"] == len(growing)
    assert rows[f"{TASK}/synthetic_renamed.png"]["sha256"] == sha(renamed)
    assert {r["state"] for r in rows.values()} == {"waiting_model"}
    assert count(layout.db, "duplicate_arrivals") == 0
    assert layout.inbox_files() == []
    assert_nothing_half_done(layout)


def test_the_same_bytes_under_two_names_are_one_scan_and_one_duplicate(
    layout: Layout, daemons: Daemons, tmp_path: Path
):
    """Two names, the same bytes: one scan row, one duplicate row pointing at it; a third copy
    arriving later (a later batch) is one more duplicate, still never a second scan."""
    data = synthetic_png(tmp_path / "made", 42)
    daemon = daemons.start()
    daemon.wait_ready()
    drop(layout.inbox / TASK, "synthetic_a.png", data, rename=False)
    drop(layout.inbox / TASK, "synthetic_b.png", data, rename=True)
    wait_until(
        lambda: count(layout.db, "scans") + count(layout.db, "duplicate_arrivals") == 2, 20, "two arrivals", daemon
    )

    [scan] = scan_rows(layout.db)
    [duplicate] = duplicate_rows(layout.db)
    assert scan["sha256"] == sha(data) and scan["state"] == "waiting_model"
    assert duplicate["scan_id"] == scan["id"]
    assert {scan["source_name"], duplicate["source_name"]} == {f"{TASK}/synthetic_a.png", f"{TASK}/synthetic_b.png"}
    assert "archive/duplicates" in Path(str(duplicate["stored_path"])).as_posix()

    drop(layout.inbox / TASK, "synthetic_c.png", data, rename=True)
    wait_until(lambda: count(layout.db, "duplicate_arrivals") == 2, 20, "the third copy", daemon)
    assert count(layout.db, "scans") == 1
    assert {d["scan_id"] for d in duplicate_rows(layout.db)} == {scan["id"]}
    assert len(files_under(layout.state / "work")) == 1
    assert len(files_under(layout.state / "archive" / "duplicates")) == 2
    assert layout.inbox_files() == []
    daemon.signal(signal.SIGTERM)
    assert daemon.wait(30) == 0
    assert_nothing_half_done(layout)


def test_a_database_locked_by_another_process_for_10_s_delays_but_loses_nothing(
    layout: Layout, daemons: Daemons, tmp_path: Path
):
    """Another process holds ``BEGIN EXCLUSIVE`` on the SQLite file for 10 s (longer than the
    daemon's busy timeout) while 40 files arrive: the daemon waits and retries, stays alive, commits
    nothing meanwhile, and registers all 40 once the lock is released. The busy timeout is 2 s here
    (5 s by default) so that a first write tried as late as 8 s into the lock, on a slow machine,
    still runs into it and retries."""
    daemon = daemons.start(stable=0.3, rescan=1.0, env={"MEDDAEMON_BUSY_TIMEOUT": "2"})
    daemon.wait_ready()
    locker = daemons.helper("-c", SQLITE_LOCKER, str(layout.db), "10")
    assert locker.stdout is not None and locker.stdout.readline().strip() == b"locked"
    locked_at = time.monotonic()

    made = tmp_path / "made"
    payloads = [synthetic_png(made, i) for i in range(40)]
    for i, data in enumerate(payloads):
        drop(layout.inbox / TASK, f"synthetic_{i:04d}.png", data, rename=i % 2 == 0)
        time.sleep(0.05)
    while time.monotonic() - locked_at < 9.0:
        assert daemon.alive(), f"the daemon died while the database was locked:\n{daemon.tail()}"
        time.sleep(0.25)
    assert count(layout.db, "scans") == 0, "nothing can be committed while the lock is held"
    assert locker.wait(15) == 0, locker.stderr.read() if locker.stderr else ""

    wait_until(lambda: count(layout.db, "scans") == 40, 30, "40 scan rows after the lock", daemon)
    wait_until(lambda: layout.inbox_files() == [], 10, "an empty inbox", daemon)
    assert daemon.alive()
    assert "database is locked by another process" in daemon.log_text()
    assert {r["sha256"] for r in scan_rows(layout.db)} == {sha(p) for p in payloads}
    daemon.signal(signal.SIGTERM)
    assert daemon.wait(30) == 0
    assert_nothing_half_done(layout)
    assert len(layout.stored_files()) == 40


def test_waiting_for_a_lock_held_elsewhere_the_daemon_keeps_systemd_s_watchdog_fed_and_stops_when_asked(
    layout: Layout, daemons: Daemons, tmp_path: Path
):
    """Another process holds the SQLite write lock for 60 s. Under WatchdogSec the daemon went quiet
    (no WATCHDOG=1 for as long as the lock, so systemd killed it), and SIGTERM waited for the lock.
    Now it keeps pinging, SIGTERM ends it in seconds with exit 0, and its files wait in the inbox."""
    folder = tmp_path if len(str(tmp_path)) < 90 else Path(tempfile.mkdtemp(prefix="sd"))
    systemd = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    systemd.bind(str(folder / "notify.sock"))
    systemd.settimeout(0.2)
    watchdog = {"NOTIFY_SOCKET": str(folder / "notify.sock"), "WATCHDOG_USEC": "2000000"}
    daemon = daemons.start(stable=0.3, rescan=1.0, env={"MEDDAEMON_BUSY_TIMEOUT": "1", **watchdog})
    daemon.wait_ready()
    locker = daemons.helper("-c", SQLITE_LOCKER, str(layout.db), "60")
    assert locker.stdout is not None and locker.stdout.readline().strip() == b"locked"
    made = tmp_path / "made"
    payloads = [synthetic_png(made, i) for i in range(4)]
    for i, data in enumerate(payloads):
        drop(layout.inbox / TASK, f"synthetic_{i:04d}.png", data, rename=True)
    wait_until(lambda: "database is locked by another process" in daemon.log_text(), 30, "the lock met", daemon)

    pings: list[float] = []
    watched_until = time.monotonic() + 6.0
    while time.monotonic() < watched_until:
        try:
            if b"WATCHDOG=1" in systemd.recv(4096):
                pings.append(time.monotonic())
        except TimeoutError:
            pass
    systemd.close()
    assert len(pings) >= 3, f"{len(pings)} watchdog pings in 6 s of waiting for the lock (WatchdogSec 2 s)"
    daemon.signal(signal.SIGTERM)
    asked = time.monotonic()
    assert daemon.wait(20) == 0, daemon.tail()
    assert time.monotonic() - asked < 15 and locker.poll() is None, "stopped while the lock was still held"
    assert "stopping as asked while the database was locked by another process" in daemon.log_text()
    assert len(layout.inbox_files()) == 4, "the files not recorded wait in the inbox"
    locker.kill()


def test_a_daemon_serving_a_model_stops_at_once_while_another_process_holds_the_lock(
    layout: Layout, daemons: Daemons, tmp_path: Path
):
    """With a model served, its report process looked for work under a lock held elsewhere in a
    retry that never asked whether to stop, and so did the claim of inbox files: SIGTERM took 39 s
    (the daemon's 30 s wait for the report process, then its heartbeat's and sign-off's waits for the
    lock), or never ended while the lock was held, past Docker's 10 s before it kills. A statement
    already waiting for the lock finishes its wait (``busy_timeout``, 2 s here) first."""
    promote_into(f"sqlite:///{layout.db}", layout.state / "models", write_model(tmp_path / "model"))
    daemon = daemons.start(stable=0.3, rescan=1.0, env={"MEDDAEMON_BUSY_TIMEOUT": "2"})
    wait_until(lambda: "report process started" in daemon.log_text(), 60, "the report process", daemon)
    locker = daemons.helper("-c", SQLITE_LOCKER, str(layout.db), "120")
    assert locker.stdout is not None and locker.stdout.readline().strip() == b"locked"
    drop(layout.inbox / TASK, "synthetic_0000.png", synthetic_png(tmp_path / "made", 0), rename=True)
    wait_until(lambda: "database is locked by another process" in daemon.log_text(), 30, "the lock met", daemon)
    time.sleep(1.0)  # the report process's claim waits on the lock too
    daemon.signal(signal.SIGTERM)
    asked = time.monotonic()
    assert daemon.wait(60) == 0, daemon.tail()
    took = time.monotonic() - asked
    assert took < 8, f"stopping took {took:.1f} s while the lock was held"
    assert locker.poll() is None, "stopped while the lock was still held"
    assert "did not stop within" not in daemon.log_text()
    assert "not signing off (the database was locked by another process)" in daemon.log_text()
    assert len(layout.inbox_files()) == 1, "the file not recorded waits in the inbox"
    locker.kill()


@pytest.mark.parametrize("stop", [False, True], ids=["lock released", "SIGTERM"])
def test_a_daemon_starting_while_another_process_holds_the_lock_waits_for_it_or_stops_when_asked(
    layout: Layout, daemons: Daemons, tmp_path: Path, stop: bool
):
    """The schema's upgrade at start went through once: with medcli db upgrade, a retry or a backup
    holding SQLite's write lock, the daemon exited 3 after the busy timeout (systemd restarted it in
    a loop), and a SIGTERM meanwhile ended it with 3 too."""
    daemons.run_once()  # the database exists
    drop(layout.inbox / TASK, "synthetic_0000.png", synthetic_png(tmp_path / "made", 0), rename=True)
    # held 8 s: a daemon starting on a loaded machine (importing torch) took more than 4 and never met it
    locker = daemons.helper("-c", SQLITE_LOCKER, str(layout.db), "60" if stop else "8")
    assert locker.stdout is not None and locker.stdout.readline().strip() == b"locked"
    daemon = daemons.start(once=True, env={"MEDDAEMON_BUSY_TIMEOUT": "1"}, extra=("--json",))
    wait_until(lambda: "database is locked by another process" in daemon.log_text(), 30, "the lock met", daemon)
    if stop:
        daemon.signal(signal.SIGTERM)
        assert daemon.wait(20) == 0, daemon.tail()
        text = daemon.log_text()
        assert "stopping as asked while starting: the database was locked by another process" in text
        assert "stopped before the inbox was drained: 1 files left in it" in text
        assert locker.poll() is None and len(layout.inbox_files()) == 1
        locker.kill()
    else:
        assert daemon.wait(60) == 0, daemon.tail()
        assert locker.poll() == 0 and layout.inbox_files() == []


def test_a_once_run_stopped_before_the_inbox_was_drained_says_so(layout: Layout, daemons: Daemons, tmp_path: Path):
    """It ended with "0 of 0 files" and a JSON summary like a drained run's, exit 0: a script read
    the inbox as drained with its files still in it."""
    for i in range(3):
        drop(layout.inbox / TASK, f"synthetic_{i:04d}.png", synthetic_png(tmp_path / "made", i), rename=True)
    daemon = daemons.start(once=True, stable=60.0, extra=("--json",))
    wait_until(lambda: "0 of 3 files" in daemon.log_text(), 30, "the files seen", daemon)
    daemon.signal(signal.SIGINT)
    assert daemon.wait(30) == 0, daemon.tail()
    text = daemon.log_text()
    start = text.index("\n{\n") + 1
    summary = json.loads(text[start : text.index("\n}", start) + 2])  # --json's summary, among the log lines
    assert (summary["drained"], summary["left"], summary["routed"]) == (False, 3, 0)
    assert "stopped before the inbox was drained: 3 files left in it" in text and "0 of 0 files" not in text
    assert len(layout.inbox_files()) == 3


@pytest.mark.parametrize("how", ["removed", "replaced"])
def test_a_state_directory_removed_or_replaced_under_the_daemon_stops_it_before_it_takes_a_file(
    layout: Layout, daemons: Daemons, tmp_path: Path, how: str
):
    """The folders were made again by path while the rows went into the deleted database it held
    open: the files it took then lay in work/ with no row, never processed after a restart."""
    daemon = daemons.start(stable=0.3, rescan=0.5)
    daemon.wait_ready()
    if how == "removed":
        shutil.rmtree(layout.state)
    else:
        layout.state.rename(tmp_path / "state.old")
        layout.state.mkdir()
    drop(layout.inbox / TASK, "synthetic_0000.png", synthetic_png(tmp_path / "made", 0), rename=True)
    assert daemon.wait(30) == 1, daemon.tail()
    assert f"the state directory {layout.state} (or its database) was removed or replaced" in daemon.log_text()
    assert len(layout.inbox_files()) == 1 and not (layout.state / "work").exists()


@pytest.mark.parametrize("after", [0.1, 0.4])
def test_sigterm_while_the_daemon_is_still_starting_exits_0(daemons: Daemons, after: float):
    """Importing the command line and torch takes most of a second, before the daemon's own handlers:
    a stop then (a supervisor stopping a unit that had just started) killed it, exit 143."""
    daemon = daemons.start()
    time.sleep(after)
    daemon.signal(signal.SIGTERM)
    assert daemon.wait(60) == 0, daemon.tail()
    assert "stopped:" in daemon.log_text()


@pytest.mark.parametrize("after", [1.0, 2.0])
def test_ctrl_c_while_the_decoding_workers_start_exits_0_without_a_traceback(daemons: Daemons, after: float):
    """Ctrl-C reaches the whole process group: the workers' forkserver, still importing torch (Python's
    forkserver ignores SIGINT only after), printed its KeyboardInterrupt traceback, and the daemon's
    thread starting the workers an EOFError one, about 50 lines under a clean "stopped"."""
    daemon = daemons.start(workers=1)
    time.sleep(after)
    os.killpg(daemon.pid, signal.SIGINT)
    assert daemon.wait(60) == 0, daemon.tail()
    assert "stopped:" in daemon.log_text() and "Traceback" not in daemon.log_text(), daemon.tail(80)


def test_a_once_run_on_an_empty_inbox_starts_no_worker_and_leaves_no_process_behind(daemons: Daemons):
    """The workers' forkserver was started with the pool: it imported torch for 3 s of CPU and lived
    on for as long after the command had exited 0, at every poll of a timer running --once."""
    daemon = daemons.start(once=True, workers=2)
    assert daemon.wait(60) == 0, daemon.tail()

    def group_gone() -> bool:
        """No process of the daemon's group left but zombies (its resource tracker, ended, waits for
        init to reap it)."""
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rpartition(")")[2].split()
            except OSError:
                continue
            if int(fields[2]) == daemon.pid and fields[0] != "Z":  # fields[2]: pgrp, fields[0]: state
                return False
        return True

    wait_until(group_gone, 1.0, "every process of the daemon's group to be gone")


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP], ids=["SIGTERM", "SIGINT", "SIGHUP"])
def test_sigterm_mid_stream_exits_0_with_nothing_half_done(
    layout: Layout, daemons: Daemons, tmp_path: Path, signum: int
):
    """Stopped while it works through 400 files, the daemon finishes the batch in hand and exits 0:
    no committed move left unfinished, no worker process left behind, every file either still in
    the inbox or put away; a ``--once`` run then registers the rest. SIGHUP goes to the whole
    process group, as a closed terminal sends it: it killed the daemon at once (exit 129, its row
    left running) and left its decoding workers behind."""
    made = tmp_path / "made"
    payloads = [synthetic_png(made, i) for i in range(400)]
    for i, data in enumerate(payloads):
        drop(layout.inbox / TASK, f"synthetic_{i:04d}.png", data, rename=False)

    daemon = daemons.start(workers=2, stable=0.2, batch_size=16)
    wait_until(lambda: count(layout.db, "scans") >= 16, 60, "the first batches", daemon, every=0.05)
    workers = psutil.Process(daemon.pid).children(recursive=True)
    if signum == signal.SIGHUP:
        os.killpg(daemon.pid, signum)
    else:
        daemon.signal(signum)
    assert daemon.wait(30) == 0
    _gone, alive = psutil.wait_procs(workers, timeout=10)
    assert alive == [], "the decoding workers stop with the daemon"
    assert "finishing the batch in hand" in daemon.log_text()

    assert_nothing_half_done(layout)
    registered = count(layout.db, "scans")
    assert registered < 400, "the stop came mid-stream (make the stream longer if this fails)"
    assert len(layout.inbox_files()) + len(layout.stored_files()) == 400
    assert len(layout.inbox_files()) == 400 - registered

    daemons.run_once(workers=0, stable=0.2)
    assert {r["sha256"] for r in scan_rows(layout.db)} == {sha(p) for p in payloads}
    assert layout.inbox_files() == []
    assert_nothing_half_done(layout)


def test_a_daemon_killed_alone_leaves_no_process_of_its_own_behind(layout: Layout, daemons: Daemons, tmp_path: Path):
    """kill -9 of the daemon's pid only (its children are not signalled): its decoding workers, each
    holding both ends of the pool's task queue, never saw it go, and lived on with the forkserver
    waiting for them, after every such kill."""
    daemon = daemons.start(workers=2, stable=0.2)
    drop(layout.inbox / TASK, "synthetic_warm.png", synthetic_png(tmp_path, 1), rename=True)
    wait_until(lambda: count(layout.db, "scans") == 1, 60, "the first file", daemon)
    family = psutil.Process(daemon.pid).children(recursive=True)
    assert len(family) >= 3, "a forkserver and two decoding workers at least"
    os.kill(daemon.pid, signal.SIGKILL)
    daemon.proc.wait(10)
    _gone, alive = psutil.wait_procs(family, timeout=15)
    assert [p.pid for p in alive] == []
