"""A file is read only when complete: renamed into place, or unchanged for the window."""

from pathlib import Path

import pytest

from fake_clock import FakeClock
from meddaemon.daemon.stability import StabilityTracker


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(100.0)


def test_a_file_is_stable_only_after_the_window(tmp_path: Path, clock: FakeClock):
    f = tmp_path / "synthetic.png"
    f.write_bytes(b"abc")
    tracker = StabilityTracker(window=2.0, clock=clock)
    tracker.observe(f)
    clock.now += 1.9
    assert tracker.pop_stable(10) == []
    clock.now += 0.2
    [stable] = tracker.pop_stable(10)
    assert stable.path == f and stable.signature.size == 3
    assert len(tracker) == 0


def test_a_growing_file_restarts_its_window(tmp_path: Path, clock: FakeClock):
    f = tmp_path / "growing.dcm"
    f.write_bytes(b"a")
    tracker = StabilityTracker(window=1.0, clock=clock)
    tracker.observe(f)
    for _ in range(5):
        clock.now += 0.9
        with f.open("ab") as handle:
            handle.write(b"more")
        assert tracker.pop_stable(10) == []
        clock.now += 0.2
        assert tracker.pop_stable(10) == []  # the change is seen at the deadline, and the window restarts
    clock.now += 1.0
    [stable] = tracker.pop_stable(10)
    assert stable.signature.size == 21


def test_a_file_renamed_into_place_is_ready_at_once(tmp_path: Path, clock: FakeClock):
    f = tmp_path / "done.png"
    f.write_bytes(b"abc")
    tracker = StabilityTracker(window=60.0, clock=clock)
    tracker.observe(f, complete=True)
    assert [s.path for s in tracker.pop_stable(10)] == [f]


def test_repeated_hints_for_an_unchanged_file_do_not_delay_it(tmp_path: Path, clock: FakeClock):
    f = tmp_path / "x.png"
    f.write_bytes(b"abc")
    tracker = StabilityTracker(window=1.0, clock=clock)
    tracker.observe(f)
    clock.now += 0.5
    tracker.observe(f)
    clock.now += 0.6
    assert len(tracker.pop_stable(10)) == 1


def test_a_file_deleted_while_waiting_is_forgotten(tmp_path: Path, clock: FakeClock):
    f = tmp_path / "gone.png"
    f.write_bytes(b"abc")
    tracker = StabilityTracker(window=1.0, clock=clock)
    tracker.observe(f)
    f.unlink()
    clock.now += 2
    assert tracker.pop_stable(10) == []
    assert len(tracker) == 0


def test_the_wall_clock_plays_no_part(tmp_path: Path, clock: FakeClock):
    """mtime may jump (a clock set back, a copy with preserved times); only the monotonic window counts."""
    import os

    f = tmp_path / "old.png"
    f.write_bytes(b"abc")
    os.utime(f, (0, 0))
    tracker = StabilityTracker(window=5.0, clock=clock)
    tracker.observe(f)
    assert tracker.pop_stable(10) == []


def test_next_deadline_and_batch_limit(tmp_path: Path, clock: FakeClock):
    tracker = StabilityTracker(window=1.0, clock=clock)
    assert tracker.next_deadline() is None
    for i in range(5):
        (tmp_path / f"{i}.png").write_bytes(b"x")
        tracker.observe(tmp_path / f"{i}.png")
    assert tracker.next_deadline() == pytest.approx(101.0)
    clock.now += 1
    assert len(tracker.pop_stable(3)) == 3
    assert len(tracker.pop_stable(3)) == 2
