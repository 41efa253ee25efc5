"""Filesystem events from watchdog, turned into hints for the daemon's loop.

The handler only enqueues paths, so an exception can never reach (and kill) the observer thread.
A kernel event-queue overflow is announced by watchdog only in its log; ``OverflowAlarm`` listens
there and asks the loop for a full rescan.

``WatcherStage`` runs the observer for the daemon (not with ``--once``, where the rescans alone find
the files). Claims nothing; checked at every turn of the loop and restarted if its thread died
(the rescans go on meanwhile); stopped and joined at close.
"""

from __future__ import annotations

import logging
import queue
import threading
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

log = logging.getLogger(__name__)
#: the daemon's log, where the loop's own events are told
daemon_log = logging.getLogger("meddaemon.daemon")
#: where watchdog announces a lost event
WATCHDOG_LOG = "watchdog.observers"
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

    def start(self) -> None:
        logging.getLogger(WATCHDOG_LOG).addHandler(self.alarm)
        self.observer = start_observer(self.root, self.hints, self.kind)

    def tick(self, now: float, flush: bool) -> bool:
        if self.observer is not None and not self.observer.is_alive():
            daemon_log.error("the file watcher stopped; restarting it (rescans continue meanwhile)")
            self.observer = start_observer(self.root, self.hints, self.kind)
        return False

    def close(self) -> None:
        if self.observer is not None:
            self.observer.stop()
            self.observer.join(timeout=5)
        logging.getLogger(WATCHDOG_LOG).removeHandler(self.alarm)
