"""Filesystem events from watchdog, turned into hints for the daemon's loop.

The handler only enqueues paths, so an exception can never reach (and kill) the observer thread.
A kernel event-queue overflow is announced by watchdog only in its log; ``OverflowAlarm`` listens
there and asks the loop for a full rescan.
"""

from __future__ import annotations

import logging
import queue
import threading
from dataclasses import dataclass
from pathlib import Path

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer
from watchdog.observers.api import BaseObserver
from watchdog.observers.polling import PollingObserver

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Hint:
    path: Path
    #: renamed into place: complete now, no stability window to wait
    renamed_in: bool


class HintHandler(FileSystemEventHandler):
    def __init__(self, hints: queue.SimpleQueue[Hint]) -> None:
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


def start_observer(root: Path, hints: queue.SimpleQueue[Hint], kind: str, poll_seconds: float = 1.0) -> BaseObserver:
    observer: BaseObserver = PollingObserver(timeout=poll_seconds) if kind == "polling" else Observer()
    observer.schedule(HintHandler(hints), str(root), recursive=True)
    observer.daemon = True
    observer.start()
    return observer


def install_overflow_alarm() -> OverflowAlarm:
    alarm = OverflowAlarm()
    logging.getLogger("watchdog.observers").addHandler(alarm)
    return alarm
