"""Whether a process of this host still runs: a zombie does not, and neither does the holder of a
pid that a later process was given."""

from __future__ import annotations

import subprocess
import sys
import time

from meddaemon.processes import process_alive


def test_a_running_process_is_alive_and_a_reaped_one_is_not(running_child: int):
    assert process_alive(running_child)
    reaped = subprocess.Popen([sys.executable, "-c", "pass"])
    reaped.wait()
    assert not process_alive(reaped.pid)


def test_a_killed_process_not_yet_reaped_is_not_alive(zombie: int):
    assert not process_alive(zombie)


def test_a_process_that_started_after_the_moment_asked_about_holds_a_reused_pid(running_child: int):
    assert process_alive(running_child, since=time.time())  # it existed then
    assert not process_alive(running_child, since=time.time() - 3600)  # an hour ago it did not


def test_what_cannot_be_judged_counts_as_alive():
    assert process_alive(1)  # init: another user's process to an unprivileged caller
    assert process_alive(2**70)  # no pid this system can have
