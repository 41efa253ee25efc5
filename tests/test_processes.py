"""Whether a process of this host still runs: a zombie does not, and neither does the holder of a
pid that a later process was given."""

from __future__ import annotations

import subprocess
import sys
import time

from meddaemon.processes import process_alive


def test_a_running_process_is_alive_and_a_reaped_one_is_not():
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        assert process_alive(child.pid)
    finally:
        child.kill()
        child.wait()
    assert not process_alive(child.pid)


def test_a_killed_process_not_yet_reaped_is_not_alive(zombie: int):
    assert not process_alive(zombie)


def test_a_process_that_started_after_the_moment_asked_about_holds_a_reused_pid():
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        assert process_alive(child.pid, since=time.time())  # it existed then
        assert not process_alive(child.pid, since=time.time() - 3600)  # an hour ago it did not
    finally:
        child.kill()
        child.wait()


def test_what_cannot_be_judged_counts_as_alive():
    assert process_alive(1)  # init: another user's process to an unprivileged caller
    assert process_alive(2**70)  # no pid this system can have
