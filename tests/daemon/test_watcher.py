"""The file watcher: which filesystem events reach the daemon's loop as hints.

Every file written here is SYNTHETIC (``synthetic_*`` names, a few bytes)."""

from __future__ import annotations

import contextlib
import os
import queue
import time
from pathlib import Path

import pytest

from meddaemon.daemon import watcher
from meddaemon.daemon.watcher import Hint, start_observer


@pytest.fixture
def handled(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The type of every event the observer hands to the daemon's handler."""
    events: list[str] = []
    original = watcher.HintHandler.on_any_event

    def counted(self, event):  # type: ignore[no-untyped-def]
        events.append(event.event_type)
        original(self, event)

    monkeypatch.setattr(watcher.HintHandler, "on_any_event", counted)
    return events


def test_an_arrival_is_a_hint_and_the_daemon_s_own_reads_and_moves_out_are_not_events(
    tmp_path: Path, handled: list[str]
):
    """Issue 16: the kernel is asked only for the events that make hints. Reading an inbox file
    (its opens and no-write closes) and moving it out of the inbox reach the observer's threads
    no more; a file renamed into place, moved in or written in place is a hint as before."""
    inbox, outside = tmp_path / "inbox", tmp_path / "work"
    (inbox / "busi").mkdir(parents=True)
    outside.mkdir()
    read = inbox / "busi" / "synthetic_read.png"
    read.write_bytes(b"synthetic")
    hints: queue.Queue[Hint] = queue.Queue()
    observer = start_observer(inbox, hints, "inotify")
    try:
        for _ in range(20):
            read.read_bytes()
        read.rename(outside / read.name)
        time.sleep(1.0)  # watchdog pairs a move's two halves for half a second
        assert handled == [], "the daemon's reads and moves out are not events"

        (inbox / "busi" / ".synthetic_renamed.png.part").write_bytes(b"synthetic")
        os.replace(inbox / "busi" / ".synthetic_renamed.png.part", inbox / "busi" / "synthetic_renamed.png")
        (tmp_path / "synthetic_moved_in.png").write_bytes(b"synthetic")
        os.replace(tmp_path / "synthetic_moved_in.png", inbox / "busi" / "synthetic_moved_in.png")
        (inbox / "busi" / "synthetic_written.png").write_bytes(b"synthetic")
        expected = {
            Hint(inbox / "busi" / "synthetic_renamed.png", renamed_in=True),
            # from outside the watched tree the kernel tells only of its arrival: watchdog's "created"
            Hint(inbox / "busi" / "synthetic_moved_in.png", renamed_in=False),
            Hint(inbox / "busi" / "synthetic_written.png", renamed_in=False),
        }
        got: set[Hint] = set()
        deadline = time.monotonic() + 10
        while not expected <= got and time.monotonic() < deadline:
            with contextlib.suppress(queue.Empty):
                got.add(hints.get(timeout=0.1))
    finally:
        observer.stop()
        observer.join(timeout=5)
    assert expected <= got
    assert set(handled) <= {"created", "modified", "closed", "moved"}


def test_a_watch_folder_removed_and_made_again_is_said_and_watched_anew(tmp_path: Path, caplog):
    """The observer stayed on the removed folder's inode: no event came from the new folder and
    nothing was logged; only the rescans found its files, up to rescan_seconds late."""
    import shutil

    inbox = tmp_path / "inbox"
    inbox.mkdir()
    hints: queue.Queue[Hint] = queue.Queue()
    stage = watcher.WatcherStage(inbox, hints, "inotify")
    stage.start()
    try:
        shutil.rmtree(inbox)
        stage.tick(now=10.0, flush=False)
        assert f"the watch folder {inbox} is gone" in caplog.text
        (inbox / "busi").mkdir(parents=True)
        stage.tick(now=20.0, flush=False)
        assert f"the watch folder {inbox} is back; watching it again" in caplog.text
        arrived = inbox / "busi" / "synthetic_after.png"
        arrived.write_bytes(b"synthetic")
        got: set[Path] = set()
        deadline = time.monotonic() + 10
        while arrived not in got and time.monotonic() < deadline:
            with contextlib.suppress(queue.Empty):
                got.add(hints.get(timeout=0.1).path)
        assert arrived in got
    finally:
        stage.close()


def test_a_watcher_that_cannot_start_is_tried_again_later_and_never_said_to_be_back(
    tmp_path: Path, caplog, monkeypatch: pytest.MonkeyPatch
):
    """Out of inotify watches (ENOSPC), each restart failed, said the folder was "back" (it never went)
    and tried again a second later, for good: two warnings a second."""
    import errno

    inbox = tmp_path / "inbox"
    inbox.mkdir()
    stage = watcher.WatcherStage(inbox, queue.Queue(), "inotify")
    stage.start()
    try:
        assert stage.observer is not None
        stage.observer.stop()
        stage.observer.join(timeout=5)

        def out_of_watches(*args: object, **kwargs: object) -> None:
            raise OSError(errno.ENOSPC, "inotify watch limit reached")

        monkeypatch.setattr(watcher, "start_observer", out_of_watches)
        for second in range(10):
            stage.tick(now=100.0 + second, flush=False)
        tries = caplog.text.count("could not watch")
        assert 2 <= tries <= 4  # after 1, 2, 4 and 8 s, not every second
        assert "is back" not in caplog.text and "is gone" not in caplog.text
    finally:
        stage.close()


def test_a_watcher_that_cannot_start_at_the_daemon_s_start_is_tried_again_not_fatal(
    tmp_path: Path, caplog, monkeypatch: pytest.MonkeyPatch
):
    """Out of inotify watches over a large tree, the start's OSError ended the daemon (exit 1, and
    systemd restarted it every 5 s); the rescans find the files meanwhile."""
    import errno

    def out_of_watches(*args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, "inotify watch limit reached")

    monkeypatch.setattr(watcher, "start_observer", out_of_watches)
    stage = watcher.WatcherStage(tmp_path, queue.Queue(), "inotify")
    stage.start()
    try:
        assert stage.observer is None and "could not watch" in caplog.text
        monkeypatch.undo()
        stage.tick(now=time.monotonic() + 5, flush=False)
        assert stage.observer is not None and stage.observer.is_alive()
    finally:
        stage.close()
