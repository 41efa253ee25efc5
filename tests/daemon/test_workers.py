"""The decoding workers: started ahead of the first read, and results (a model input is 196 KiB)
that outgrow a pipe's default 64 KiB."""

from __future__ import annotations

import fcntl
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from dicom_factory import write_png

from daemon_harness import kill_workers
from meddaemon.daemon.intake_stage import FILES_PER_TASK, READ_AHEAD_PER_WORKER
from meddaemon.daemon.service import Daemon
from meddaemon.daemon.stability import StableFile, signature
from meddaemon.daemon.workers import RESULT_PIPE_BYTES, DecodingPool
from meddaemon.db.models import utcnow

wide_pipes = pytest.mark.skipif(
    int(Path("/proc/sys/fs/pipe-max-size").read_text()) < RESULT_PIPE_BYTES,
    reason=f"/proc/sys/fs/pipe-max-size is below {RESULT_PIPE_BYTES}: the result pipe keeps its default",
)


def model_input(seed: int) -> np.ndarray:
    """A SYNTHETIC model input of a 224 x 224 scan (196 KiB of float32, as intake sends back)."""
    return np.random.default_rng(seed).standard_normal((1, 1, 224, 224), dtype=np.float32)


def wait_until_warm(pool: DecodingPool) -> None:
    deadline = time.monotonic() + 60
    while not pool.warm:
        assert time.monotonic() < deadline, "the workers never answered"
        time.sleep(0.05)


def result_pipe_bytes(pool: DecodingPool) -> int:
    reader = pool.executor._result_queue._reader  # type: ignore[union-attr]
    return fcntl.fcntl(reader.fileno(), fcntl.F_GETPIPE_SZ)


@wide_pipes
def test_the_result_pipe_holds_a_model_input_and_results_come_back_whole():
    pool = DecodingPool(2)
    pool.start()
    try:
        futures = [pool.submit(model_input, seed) for seed in range(12)]
        for seed, future in enumerate(futures):
            np.testing.assert_array_equal(future.result(60), model_input(seed))
        assert result_pipe_bytes(pool) == RESULT_PIPE_BYTES > model_input(0).nbytes
    finally:
        pool.shutdown()


@wide_pipes
def test_a_pool_replaced_after_a_worker_died_has_the_wide_pipe_too():
    pool = DecodingPool(1)
    pool.start()
    try:
        pool.replace()
        np.testing.assert_array_equal(pool.submit(model_input, 3).result(60), model_input(3))
        assert result_pipe_bytes(pool) == RESULT_PIPE_BYTES
    finally:
        pool.shutdown()


def test_a_worker_killed_while_the_pool_is_idle_is_replaced_at_the_next_read():
    """The next submit raised BrokenProcessPool, and the daemon stopped with a traceback (exit 1)."""
    import os

    pool = DecodingPool(1)
    pool.start()
    try:
        first = pool.submit(os.getpid).result(60)
        kill_workers(pool)

        np.testing.assert_array_equal(pool.submit(model_input, 4).result(60), model_input(4))
        assert pool.submit(os.getpid).result(60) != first
    finally:
        pool.shutdown()


def test_a_warmed_up_pool_starts_every_process_before_the_first_read():
    pool = DecodingPool(2)
    pool.start(warm_up=True)
    try:
        wait_until_warm(pool)
        assert len(pool.executor._processes) == 2  # type: ignore[union-attr]
    finally:
        pool.shutdown()


def test_a_pool_started_cold_has_no_process_until_its_first_read():
    """``--once`` on an empty inbox: no worker is started (each would import torch for nothing)."""
    pool = DecodingPool(2)
    pool.start()
    try:
        time.sleep(0.5)
        assert not pool.warm and not pool.executor._processes  # type: ignore[union-attr]
        np.testing.assert_array_equal(pool.submit(model_input, 1).result(60), model_input(1))
    finally:
        pool.shutdown()


def test_reads_are_handed_one_per_worker_until_the_workers_answer_then_sixteen_each(make_settings):
    """A cold daemon holds no file it cannot start on: its peers read the rest meanwhile."""
    daemon = Daemon(make_settings(workers=2, reports=False))
    daemon.workers.start()
    try:
        assert daemon.intake._read_room() == 2
        daemon.workers.warm_up()
        wait_until_warm(daemon.workers)
        assert daemon.intake._read_room() == 2 * READ_AHEAD_PER_WORKER
    finally:
        daemon.workers.shutdown()
        daemon.engine.dispose()


def test_a_group_of_reads_goes_to_the_workers_a_few_files_a_task_and_each_file_keeps_its_own_outcome(
    make_settings, tmp_path: Path
):
    """A task's trip to a worker and back costs the daemon about as much CPU as reading a few files
    (benchmarks/README.md), so a group of files is read in tasks of several; a file that fails in a
    task fails alone, and the read-ahead counts files, not tasks."""
    inbox = tmp_path / "inbox" / "busi"
    rng = np.random.default_rng(5)
    paths = [write_png(inbox / f"synthetic_{i:02d}.png", rng.integers(0, 255, (32, 32), np.uint8)) for i in range(10)]
    paths[4].write_bytes(b"")
    daemon = Daemon(make_settings(workers=2, reports=False))
    daemon.prepare()
    daemon.workers.start()
    try:
        ready = [StableFile(path, signature(path), utcnow(), utcnow()) for path in paths]
        daemon.intake._submit_reads(ready)
        (group,) = daemon.intake.reading
        assert len(group.futures) < len(paths) and max(group.sizes) <= FILES_PER_TASK
        assert sum(group.sizes) == len(paths)

        record = daemon.intake._harvest_group(daemon.intake.reading.pop(0), block=True)
    finally:
        daemon.workers.shutdown()
        daemon.engine.dispose()

    outcomes = {outcome.source_name: outcome for outcome in record.outcomes}
    assert list(outcomes) == [f"busi/synthetic_{i:02d}.png" for i in range(10)]
    assert outcomes["busi/synthetic_04.png"].reason == "empty_file"
    assert [o.state for name, o in outcomes.items() if name != "busi/synthetic_04.png"] == ["waiting_model"] * 9


FORKSERVER_PROBE = """
import os, sys, time
from meddaemon.daemon.workers import FORKSERVER_PRELOAD, DecodingPool

pool = DecodingPool(1, preload=FORKSERVER_PRELOAD if sys.argv[1] == "preload" else ())
pool.start(warm_up=True)
returned = not pool.warm
deadline = time.monotonic() + 120
while not pool.warm and time.monotonic() < deadline:
    time.sleep(0.05)
forkserver = pool.submit(os.getppid).result(60)
maps = open(f"/proc/{forkserver}/maps").read()
print(returned, pool.warm, "libtorch" in maps)
pool.shutdown()
"""


def forkserver_probe(mode: str) -> list[str]:
    """In a fresh interpreter (its forkserver not yet started): whether ``warm_up`` returned before the
    workers answered, whether they did, and whether the forkserver they were forked from holds torch."""
    out = subprocess.run(
        [sys.executable, "-c", FORKSERVER_PROBE, mode], capture_output=True, text=True, timeout=180, check=True
    )
    return out.stdout.split()


def test_a_preloading_pool_forks_its_workers_from_a_forkserver_that_imported_torch_once():
    """The workers start with torch in memory rather than importing it each, and ``warm_up``, which
    would wait for the forkserver's import, returns at once (the daemon imports its own meanwhile)."""
    assert forkserver_probe("preload") == ["True", "True", "True"]


def test_a_pool_without_preload_leaves_the_forkserver_bare():
    """A daemon that also forks its DICOM receiver or its sender at start: they need not wait for torch."""
    assert forkserver_probe("bare") == ["True", "True", "False"]


def frozen_when(daemon: Daemon, frozen: Callable[[Callable, tuple], bool]) -> list[int]:
    """Reads for which ``frozen(fn, args)`` holds never end: the worker that takes one is stopped
    (SIGSTOP) as it gets it, a stand-in for a decoder caught in a loop. Returns the pids stopped."""
    import os
    import signal

    pool, stopped = daemon.workers, []
    submit = pool.submit

    def submit_then_freeze(fn, *args):  # type: ignore[no-untyped-def]
        if not frozen(fn, args):
            return submit(fn, *args)
        pid = submit(os.getpid).result(60)
        os.kill(pid, signal.SIGSTOP)
        stopped.append(pid)
        return submit(fn, *args)

    pool.submit = submit_then_freeze  # type: ignore[method-assign]
    return stopped


def reads_of(victim: Path) -> Callable[[Callable, tuple], bool]:
    """A read of ``victim``, alone (``read_file``) or in a task of several (``read_files``)."""
    return lambda fn, args: (
        bool(args) and (args[0] == victim or (isinstance(args[0], list) and any(item[0] == victim for item in args[0])))
    )


def test_a_read_that_never_ends_is_given_up_and_its_file_alone_fails_as_decode_timeout(
    make_settings, tmp_path: Path, caplog
):
    """A decode that never ended held every file read after it (none recorded 30 s on), every stop,
    and systemd's watchdog still heard from the daemon. Past ``read_timeout_seconds`` the workers
    are killed and the files read again one at a time; the one that never ends alone fails."""
    from sqlalchemy import select

    from meddaemon.db.models import Scan

    rng = np.random.default_rng(6)
    inbox = tmp_path / "inbox" / "busi"
    paths = [write_png(inbox / f"synthetic_{i}.png", rng.integers(0, 255, (32, 32), np.uint8)) for i in range(3)]
    daemon = Daemon(make_settings(workers=1, reports=False, read_timeout_seconds=3.0))
    daemon.prepare()
    daemon.workers.start()
    stopped = frozen_when(daemon, reads_of(paths[1]))
    try:
        daemon.intake._submit_reads([StableFile(p, signature(p), utcnow(), utcnow()) for p in paths])
        began = time.monotonic()
        while daemon.intake.reading:
            assert time.monotonic() - began < 60, "the reads were never given up"
            daemon.intake._harvest_reads()
            time.sleep(0.05)
    finally:
        daemon.workers.shutdown()
        daemon.engine.dispose()

    with daemon.sessions() as session:
        scans = {Path(s.source_name).name: (s.state, s.failure_reason) for s in session.scalars(select(Scan))}
    assert scans == {
        "synthetic_0.png": ("waiting_model", None),
        "synthetic_1.png": ("failed", "decode_timeout"),
        "synthetic_2.png": ("waiting_model", None),
    }
    assert len(stopped) == 2  # the batch's task, then the file alone
    assert "had not ended after 3 s (read_timeout_seconds)" in caplog.text


def test_a_stop_gives_up_reads_that_do_not_end_and_leaves_their_files_unclaimed_in_the_inbox(
    make_settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """``finish`` waited for the reads in hand without a bound: SIGTERM, a second SIGTERM and SIGINT
    all waited on a frozen worker, until systemd's SIGKILL."""
    from sqlalchemy import select

    from meddaemon.daemon import intake_stage
    from meddaemon.db.models import InboxClaim

    monkeypatch.setattr(intake_stage, "STOP_READ_WAIT_SECONDS", 1.0)
    inbox = tmp_path / "inbox" / "busi"
    path = write_png(inbox / "synthetic_0.png", np.zeros((32, 32), np.uint8))
    daemon = Daemon(make_settings(workers=1, reports=False))
    daemon.prepare()
    daemon.workers.start()
    frozen_when(daemon, reads_of(path))
    try:
        daemon.intake._submit_reads([StableFile(path, signature(path), utcnow(), utcnow())])
        began = time.monotonic()
        daemon.intake.finish()
        took = time.monotonic() - began
    finally:
        daemon.workers.shutdown()
        daemon.engine.dispose()

    assert took < 10 and path.is_file() and not daemon.intake.reading
    with daemon.sessions() as session:
        assert session.scalars(select(InboxClaim).where(InboxClaim.done_at.is_(None))).all() == []


def test_a_read_s_timeout_counts_from_when_it_runs_not_while_it_waits_behind_others(
    make_settings, tmp_path: Path, caplog
):
    """Reads queued behind others' counted their wait: five reads of 1 s each for one worker, under a
    timeout of 3.5 s, had the last ones declared timed out and the worker killed under a healthy read."""
    from functools import partial

    from daemon_harness import slow_read_files
    from meddaemon.daemon.intake import read_files

    rng = np.random.default_rng(7)
    inbox = tmp_path / "inbox" / "busi"
    paths = [write_png(inbox / f"synthetic_{i}.png", rng.integers(0, 255, (32, 32), np.uint8)) for i in range(5)]
    daemon = Daemon(make_settings(workers=1, reports=False, read_timeout_seconds=3.5))
    daemon.prepare()
    daemon.workers.start(warm_up=True)
    wait_until_warm(daemon.workers)  # a cold worker's start (its imports: seconds) is no read
    submit = daemon.workers.submit
    daemon.workers.submit = lambda fn, *args: submit(  # type: ignore[method-assign]
        partial(slow_read_files, 1.0) if fn is read_files else fn, *args
    )
    try:
        for path in paths:  # five groups, one after the other
            daemon.intake._submit_reads([StableFile(path, signature(path), utcnow(), utcnow())])
        began = time.monotonic()
        while daemon.intake.reading:
            assert time.monotonic() - began < 60
            daemon.intake._harvest_reads()
            time.sleep(0.02)
    finally:
        daemon.workers.shutdown()
        daemon.engine.dispose()

    assert "had not ended" not in caplog.text and daemon.intake.stats.routed == 5


def test_a_read_again_alone_keeps_the_daemon_alive_and_a_stop_ends_it(make_settings, tmp_path: Path):
    """After a worker died, the files of its batch are read again one at a time in the daemon's loop:
    waited for whole, a read that never ended there held systemd's watchdog (60 s in the shipped unit,
    under the 300 s timeout) and every stop. The wait tells the daemon alive every second, and a
    stop ends it, the file left in the inbox, its claim given back."""
    import threading

    from sqlalchemy import select

    from daemon_harness import kill_workers
    from meddaemon.db.models import InboxClaim

    path = write_png(tmp_path / "inbox" / "busi" / "synthetic_0.png", np.zeros((32, 32), np.uint8))
    daemon = Daemon(make_settings(workers=1, reports=False, read_timeout_seconds=120))
    daemon.prepare()
    daemon.workers.start()
    frozen_when(daemon, reads_of(path))
    alive = []
    daemon.intake.outage.while_waiting = lambda: alive.append(time.monotonic())
    try:
        daemon.intake._submit_reads([StableFile(path, signature(path), utcnow(), utcnow())])
        kill_workers(daemon.workers)  # its batch is read again alone, in a fresh worker, frozen in turn
        threading.Timer(3.0, daemon.stop_requested.set).start()
        began = time.monotonic()
        while daemon.intake.reading:
            daemon.intake._harvest_reads()
        took = time.monotonic() - began
    finally:
        daemon.workers.shutdown()
        daemon.engine.dispose()

    assert 2.5 < took < 10 and len(alive) >= 2 and path.is_file()
    with daemon.sessions() as session:
        assert session.scalars(select(InboxClaim).where(InboxClaim.done_at.is_(None))).all() == []


def test_a_task_s_own_timeout_error_is_raised_at_once_not_waited_on_as_the_read_s():
    """A task that ended in its own TimeoutError (an ETIMEDOUT from a share) was taken for a slice of
    the wait running out: the loop spun, the daemon alive, until the 300 s timeout, then called it
    the read's."""
    from concurrent.futures import Future

    from meddaemon.daemon.workers import wait_for

    future: Future = Future()
    future.set_exception(TimeoutError(110, "SYNTHETIC: the share timed out"))
    calls = []
    began = time.monotonic()
    with pytest.raises(TimeoutError, match="the share timed out"):
        wait_for(future, 30.0, keep_alive=lambda: calls.append(1))
    assert time.monotonic() - began < 1 and not calls
