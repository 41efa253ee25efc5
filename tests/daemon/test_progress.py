"""``start --once`` progress lines: "N of M files", every few seconds and at the end."""

import io

from fake_clock import FakeClock
from meddaemon.daemon.progress import ProgressLines


def test_a_line_when_the_count_changed_and_the_interval_passed_then_the_last_count():
    out, clock = io.StringIO(), FakeClock()
    progress = ProgressLines(out, every=3.0, clock=clock)
    progress.update(0, 10)
    clock.now = 1.0
    progress.update(4, 10)  # too soon
    clock.now = 3.5
    progress.update(4, 12)
    clock.now = 9.0
    progress.update(4, 12)  # nothing new
    progress.finish(12, 12)
    progress.finish(12, 12)
    assert out.getvalue() == "0 of 10 files\n4 of 12 files\n12 of 12 files\n"
