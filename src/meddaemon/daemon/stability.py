"""When is a file complete? When it was renamed into place, or when its size and mtime have not
changed for a window measured on the monotonic clock (wall-clock jumps cannot make a growing file
look finished)."""

from __future__ import annotations

import heapq
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from meddaemon.db.models import utcnow


@dataclass(frozen=True)
class Signature:
    """A file's identity while it waits and is read: its size, mtime, inode and change time. The
    change time tells a new file from one that left with the same size and mtime (``cp -p``) and
    the inode it freed; no one can set it."""

    size: int
    mtime_ns: int
    inode: int
    ctime_ns: int

    @classmethod
    def of(cls, st: os.stat_result) -> Signature:
        return cls(st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns)


def signature(path: Path) -> Signature | None:
    """None for a file that is gone, or that cannot be looked at now (its folder locked meanwhile:
    the inbox's scan names the folder, and finds the file again once it can)."""
    try:
        return Signature.of(os.lstat(path))
    except OSError:
        return None


@dataclass
class _Entry:
    signature: Signature
    since: float
    discovered_at: datetime
    complete: bool
    deadline: float = 0.0


@dataclass(frozen=True)
class StableFile:
    path: Path
    signature: Signature
    discovered_at: datetime
    stable_at: datetime


class StabilityTracker:
    """Files discovered but not yet read, each checked again when its window has passed."""

    def __init__(self, window: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.window = window
        self.clock = clock
        self._entries: dict[Path, _Entry] = {}
        self._deadlines: list[tuple[float, int, Path]] = []
        self._counter = 0

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, path: Path) -> bool:
        return path in self._entries

    def observe(self, path: Path, complete: bool = False) -> None:
        """Note a file (again). ``complete`` marks a file renamed into place: no window to wait."""
        sig = signature(path)
        if sig is None:
            self._entries.pop(path, None)
            return
        now = self.clock()
        entry = self._entries.get(path)
        if entry is None:
            self._entries[path] = _Entry(sig, now, utcnow(), complete)
        elif entry.signature != sig:
            entry.signature, entry.since, entry.complete = sig, now, complete
        elif complete:
            entry.complete = True
        else:
            return
        self._schedule(path, now if complete else now + self.window)

    def forget(self, path: Path) -> None:
        self._entries.pop(path, None)

    def next_deadline(self) -> float | None:
        while self._deadlines:
            deadline, _, path = self._deadlines[0]
            entry = self._entries.get(path)
            if entry is not None and entry.deadline == deadline:
                break
            heapq.heappop(self._deadlines)
        return self._deadlines[0][0] if self._deadlines else None

    def pop_stable(self, limit: int) -> list[StableFile]:
        """Files whose signature held still for the window (or that were renamed in), oldest first."""
        now = self.clock()
        ready: list[StableFile] = []
        while self._deadlines and self._deadlines[0][0] <= now and len(ready) < limit:
            deadline, _, path = heapq.heappop(self._deadlines)
            entry = self._entries.get(path)
            if entry is None or entry.deadline != deadline:
                continue
            sig = signature(path)
            if sig is None:
                del self._entries[path]
            elif sig != entry.signature:
                entry.signature, entry.since, entry.complete = sig, now, False
                self._schedule(path, now + self.window)
            elif entry.complete or now - entry.since >= self.window:
                del self._entries[path]
                ready.append(StableFile(path, sig, entry.discovered_at, utcnow()))
            else:
                self._schedule(path, entry.since + self.window)
        return ready

    def _schedule(self, path: Path, deadline: float) -> None:
        self._entries[path].deadline = deadline
        self._counter += 1
        heapq.heappush(self._deadlines, (deadline, self._counter, path))
