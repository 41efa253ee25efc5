"""Filesystem events from watchdog, turned into hints for the daemon's loop.

The handler only enqueues paths, so an exception can never reach (and kill) the observer thread.
A kernel event-queue overflow is announced by watchdog only in its log; ``OverflowAlarm`` listens
there and asks the loop for a full rescan.

``WatcherStage`` runs the observer for the daemon (not with ``--once``, where the rescans alone find
the files). Claims nothing; checked at every turn of the loop and restarted if its thread died
(the rescans go on meanwhile); stopped and joined at close. It follows its root: a watch folder
removed (or its share unmounted) is said once, and the folder made again (or mounted again) is
watched anew; the observer stayed on the old folder's inode and no event came, silently, until
a restart (the rescans alone found files, up to ``rescan_seconds`` late).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from watchdog.events import (
    DirCreatedEvent,
    DirMovedEvent,
    FileClosedEvent,
    FileCreatedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers import Observer
from watchdog.observers.api import BaseObserver
from watchdog.observers.polling import PollingObserver

from meddaemon.daemon.stages import Stage
from meddaemon.files import file_identity

log = logging.getLogger(__name__)
#: the daemon's log, where the loop's own events are told
daemon_log = logging.getLogger("meddaemon.daemon")
#: where watchdog announces a lost event
WATCHDOG_LOG = "watchdog.observers"
#: how often the watch folder is checked to be the one watched
ROOT_CHECK_SECONDS = 1.0
#: the events ``HintHandler`` acts on, the only ones asked of the kernel (inotify's mask) and
#: dispatched: not the opens and no-write closes of the daemon's own reads, nor the deletes its
#: moves out of the inbox look like, which cost the observer's threads an event each and which
#: the handler dropped
WATCHED_EVENTS: list[type[FileSystemEvent]] = [
    FileCreatedEvent,
    FileModifiedEvent,
    FileClosedEvent,
    FileMovedEvent,
    DirCreatedEvent,
    DirMovedEvent,
]


@dataclass(frozen=True)
class Hint:
    path: Path
    #: renamed into place: complete now, no stability window to wait
    renamed_in: bool


class HintHandler(FileSystemEventHandler):
    def __init__(self, hints: queue.Queue[Hint]) -> None:
        self.hints = hints

    def on_any_event(self, event: FileSystemEvent) -> None:
        try:
            if event.is_directory and event.event_type not in ("moved", "created"):
                return
            if event.event_type == "moved":
                self.hints.put(Hint(Path(_text(event.dest_path)), renamed_in=True))
            elif event.event_type in ("created", "modified", "closed"):
                self.hints.put(Hint(Path(_text(event.src_path)), renamed_in=False))
        except Exception:  # never let a bad event kill the observer
            log.exception("ignored a watch event that could not be handled")


def _text(path: str | bytes) -> str:
    return path.decode("utf-8", "surrogateescape") if isinstance(path, bytes) else path


class OverflowAlarm(logging.Handler):
    def __init__(self) -> None:
        super().__init__(level=logging.WARNING)
        self.raised = threading.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if "overflow" in record.getMessage().lower():
            self.raised.set()


def start_observer(root: Path, hints: queue.Queue[Hint], kind: str, poll_seconds: float = 1.0) -> BaseObserver:
    observer: BaseObserver = PollingObserver(timeout=poll_seconds) if kind == "polling" else Observer()
    observer.schedule(HintHandler(hints), str(root), recursive=True, event_filter=WATCHED_EVENTS)
    observer.daemon = True
    observer.start()
    return observer


class WatcherStage(Stage):
    name = "watcher"

    def __init__(self, root: Path, hints: queue.Queue[Hint], kind: str) -> None:
        self.root = root
        self.hints = hints
        self.kind = kind
        #: raised on a lost event: the intake stage rescans (one of its ``rescan_triggers``)
        self.alarm = OverflowAlarm()
        self.observer: BaseObserver | None = None
        #: the folder watched, (st_dev, st_ino); None while it is gone
        self.watched: tuple[int, int] | None = None
        self.next_root_check = 0.0
        #: an observer that could not be started (out of inotify watches, say) is tried again then
        self.retry_at = 0.0
        self.retry_seconds = ROOT_CHECK_SECONDS

    def start(self) -> None:
        """Watch the root; an observer that cannot start (out of inotify watches over a large tree)
        is tried again later, as after a restart, not the daemon's death (systemd restarted it every 5 s)."""
        logging.getLogger(WATCHDOG_LOG).addHandler(self.alarm)
        self.watched = file_identity(self.root)
        self._restart(time.monotonic())

    def tick(self, now: float, flush: bool) -> bool:
        if now >= self.next_root_check:
            self.next_root_check = now + ROOT_CHECK_SECONDS
            self._follow_the_root(now)
        stopped = self.observer is None or not self.observer.is_alive()
        if stopped and self.watched is not None and now >= self.retry_at:
            if self.observer is not None:
                daemon_log.error("the file watcher stopped; restarting it (rescans continue meanwhile)")
            self._restart(now)
        return False

    def _follow_the_root(self, now: float) -> None:
        identity = file_identity(self.root)
        if identity == self.watched:
            return
        if identity is None:
            daemon_log.warning(
                "the watch folder %s is gone (removed, or its share unmounted); nothing arrives until it is back",
                self.root,
            )
        elif self.watched is None:
            daemon_log.warning("the watch folder %s is back; watching it again", self.root)
        else:
            daemon_log.warning("the watch folder %s was replaced by another folder; watching that one", self.root)
        self.watched = identity
        if identity is not None:
            self.retry_seconds = ROOT_CHECK_SECONDS
            self._restart(now)

    def _restart(self, now: float) -> None:
        """A new observer on the root; one that cannot start is tried again later, each wait twice the
        last up to a minute (the rescans find the files meanwhile)."""
        self._stop_observer()
        try:
            self.observer = start_observer(self.root, self.hints, self.kind)
        except OSError as exc:
            daemon_log.warning(
                "the file watcher could not watch %s (%s); trying again in %.0f s", self.root, exc, self.retry_seconds
            )
            self.retry_at = now + self.retry_seconds
            self.retry_seconds = min(2 * self.retry_seconds, 60.0)
        else:
            self.retry_seconds = ROOT_CHECK_SECONDS

    def _stop_observer(self) -> None:
        if self.observer is not None:
            self.observer.stop()
            self.observer.join(timeout=5)
            self.observer = None

    def close(self) -> None:
        self._stop_observer()
        logging.getLogger(WATCHDOG_LOG).removeHandler(self.alarm)
