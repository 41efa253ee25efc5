"""``meddaemon start --once`` progress: "N of M files" on stderr every few seconds, and at the end.

A line at a time, not a bar redrawn in place: the daemon's log lines share the stream.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TextIO


class ProgressLines:
    """Writes ``N of M files`` when the count changed and ``every`` seconds passed since the last line."""

    def __init__(self, stream: TextIO, every: float = 3.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.stream = stream
        self.every = every
        self.clock = clock
        self._last_at: float | None = None
        self._last: tuple[int, int] | None = None

    def update(self, done: int, total: int) -> None:
        now = self.clock()
        if (done, total) == self._last or (self._last_at is not None and now - self._last_at < self.every):
            return
        self._write(done, total)
        self._last_at = now

    def finish(self, done: int, total: int) -> None:
        """The last count, unless it was the last line written."""
        if (done, total) != self._last:
            self._write(done, total)

    def _write(self, done: int, total: int) -> None:
        self.stream.write(f"{done} of {total} files\n")
        self.stream.flush()
        self._last = (done, total)
