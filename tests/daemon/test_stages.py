"""The daemon's loop and its stages (``daemon/stages.py``): a stage added to the list is started,
recovered, ticked at every turn, finished, drained (``--once`` only) and closed, the last first;
``--once`` ends only when every stage is idle and none finds more work; a stage is told to flush
only when the stages before it are idle; a stop finishes the work in hand but drains nothing; a
stage that fails to start leaves nothing running.

Each test runs a real daemon (SQLite, an empty inbox, no model) with two probe stages around the
real ones, one first and one last in the list, which record what the loop asks of them.
"""

from __future__ import annotations

import signal
import time

import pytest
from sqlalchemy import func, select

from meddaemon.config import Settings
from meddaemon.daemon.service import Daemon
from meddaemon.daemon.stages import Stage
from meddaemon.db.models import Scan
from model_factory import drop_scans


class Probe(Stage):
    name = "probe"

    def __init__(self, label: str, calls: list[tuple[str, str]], busy_turns: int = 0, found: int = 0) -> None:
        self.label = label
        self.calls = calls
        self.busy_turns = busy_turns
        self.found = found
        self.flushes: list[bool] = []
        self.on_tick = lambda: None

    def note(self, call: str) -> None:
        self.calls.append((self.label, call))

    def start(self) -> None:
        self.note("start")

    def recover(self) -> None:
        self.note("recover")

    def tick(self, now: float, flush: bool) -> bool:
        self.note("tick")
        self.flushes.append(flush)
        self.busy_turns = max(0, self.busy_turns - 1)
        self.on_tick()
        return False

    def next_deadline(self) -> float | None:
        return time.monotonic() if self.busy_turns else None

    def idle(self) -> bool:
        return self.busy_turns == 0

    def look_again(self) -> int:
        self.note("look_again")
        found, self.found = self.found, 0
        return found

    def finish(self) -> None:
        self.note("finish")

    def drain(self) -> None:
        self.note("drain")

    def close(self) -> None:
        self.note("close")


class ProbedDaemon(Daemon):
    """The daemon with one probe before its stages and one after: adding a stage is one line."""

    def __init__(self, settings: Settings, first: Probe, last: Probe) -> None:
        super().__init__(settings)
        self.first, self.last = first, last

    def _stages(self, once: bool) -> list[Stage]:
        return [self.first, *super()._stages(once), self.last]


def of(calls: list[tuple[str, str]], label: str) -> list[str]:
    """The calls one probe received, repeated ticks counted once."""
    seen = [call for who, call in calls if who == label]
    return [call for i, call in enumerate(seen) if i == 0 or call != seen[i - 1]]


@pytest.fixture
def settings(make_settings) -> Settings:  # type: ignore[no-untyped-def]
    return make_settings(reports=False)


def test_once_starts_recovers_ticks_finishes_drains_and_closes_every_stage_the_last_closed_first(settings):
    calls: list[tuple[str, str]] = []
    daemon = ProbedDaemon(settings, Probe("first", calls), Probe("last", calls))

    daemon.run(once=True)

    expected = ["start", "recover", "tick", "look_again", "finish", "drain", "close"]
    assert of(calls, "first") == of(calls, "last") == expected
    assert calls.index(("first", "start")) < calls.index(("last", "start"))
    assert calls.index(("last", "recover")) < calls.index(("first", "tick"))
    assert calls.index(("last", "close")) < calls.index(("first", "close"))
    assert [stage.name for stage in daemon.stages] == [
        "probe",
        "models",
        "intake",
        "inference",
        "archive",
        "probe",
    ]


def test_files_waiting_at_start_are_tracked_before_any_stage_recovers_and_read_after(settings):
    """Their stability window runs while the stages recover (the models' load takes seconds), and
    none is read before the moves a previous run left are finished (the intake's ``recover``)."""
    calls: list[tuple[str, str]] = []
    seen: list[tuple[int, int]] = []

    class Looking(Probe):
        def recover(self) -> None:
            super().recover()
            with daemon.sessions() as session:
                seen.append((len(daemon.tracker), session.scalar(select(func.count()).select_from(Scan)) or 0))

    drop_scans(settings.watch)
    daemon = ProbedDaemon(settings, Looking("first", calls), Probe("last", calls))

    daemon.run(once=True)

    assert seen == [(4, 0)]
    assert daemon.stats.files == 4


def test_once_turns_until_every_stage_is_idle_and_flush_waits_for_the_stages_before(settings):
    calls: list[tuple[str, str]] = []
    first, last = Probe("first", calls, busy_turns=3, found=1), Probe("last", calls)
    daemon = ProbedDaemon(settings, first, last)

    daemon.run(once=True)

    assert first.flushes == [True, True, True, True]  # nothing comes before it
    assert last.flushes == [False, False, True, True]  # the first probe was busy for three turns
    assert of(calls, "first").count("look_again") == 2  # it found work once: one turn more


def test_a_stop_finishes_the_work_in_hand_and_drains_nothing(settings):
    calls: list[tuple[str, str]] = []
    first, last = Probe("first", calls), Probe("last", calls)
    daemon = ProbedDaemon(settings, first, last)
    last.on_tick = daemon.request_stop  # as SIGTERM would, during the first turn

    daemon.run()  # live: the file watcher runs too

    assert of(calls, "first") == ["start", "recover", "tick", "finish", "close"]
    assert [stage.name for stage in daemon.stages][:3] == ["probe", "models", "watcher"]


def test_a_stage_that_fails_to_start_leaves_every_stage_closed_and_the_signals_as_they_were(settings):
    calls: list[tuple[str, str]] = []
    first, last = Probe("first", calls), Probe("last", calls)

    def broken() -> None:
        raise RuntimeError("SYNTHETIC: the port is taken")

    last.start = broken  # type: ignore[method-assign]
    handler = signal.getsignal(signal.SIGTERM)
    daemon = ProbedDaemon(settings, first, last)

    with pytest.raises(RuntimeError, match="SYNTHETIC: the port is taken"):
        daemon.run()

    assert of(calls, "first") == ["start", "close"]
    assert of(calls, "last") == ["close"]
    assert signal.getsignal(signal.SIGTERM) == handler
    assert daemon.lease is not None and not daemon.lease.thread.is_alive()
