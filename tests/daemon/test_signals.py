"""Signals never stall the daemon's loop: its idle wait for file events ends on time however often
the process is interrupted (log rotation, SIGUSR1 stack dumps, a supervisor's SIGTERM).

CPython 3.11's ``queue.SimpleQueue.get(timeout=...)``, interrupted by a signal near its deadline,
waits until the next put instead of timing out; with an idle inbox that is forever, and the daemon
ignored a SIGTERM received during a model load (it kept waiting for a file event that never came).
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from meddaemon.daemon.service import Daemon


@contextmanager
def signal_storm(signum: int, interval: float) -> Iterator[None]:
    """Send ``signum`` to this process every ``interval`` seconds, with a handler that does nothing."""
    previous = signal.signal(signum, lambda *_: None)
    stop = threading.Event()

    def storm() -> None:
        while not stop.wait(interval):
            os.kill(os.getpid(), signum)

    thread = threading.Thread(target=storm, name="signal-storm", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        signal.signal(signum, previous)


def test_the_idle_wait_ends_on_time_while_signals_keep_arriving(make_settings):
    daemon = Daemon(make_settings())
    rescued, rescue_done = threading.Event(), threading.Event()

    def rescue_a_stuck_wait() -> None:  # a file event after 5 s ends a stuck wait, so a failure fails, not hangs
        if not rescue_done.wait(5.0):
            rescued.set()
            daemon.hints.put_nowait(None)  # type: ignore[arg-type]

    threading.Thread(target=rescue_a_stuck_wait, daemon=True).start()
    longest = 0.0
    with signal_storm(signal.SIGUSR2, 0.0007):
        until = time.monotonic() + 2.0
        while time.monotonic() < until and not rescued.is_set():
            started = time.monotonic()
            daemon._wait_for_work(next_event=started + 0.005)
            longest = max(longest, time.monotonic() - started)
    rescue_done.set()
    assert not rescued.is_set(), "a wait for file events outlived its 5 ms deadline by seconds"
    assert longest < 1.0
