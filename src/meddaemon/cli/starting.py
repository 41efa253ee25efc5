"""The ``meddaemon`` command's entry point, light on purpose: ``meddaemon start`` takes SIGTERM,
SIGINT and SIGHUP as a request to stop from its first instant.

Importing the command line (SQLAlchemy, Alembic) and then the daemon (torch) takes most of a second,
and a stop asked for meanwhile (a supervisor stopping a unit that had just started) killed the
process, exit 143, where a clean stop exits 0. Here the request is only noted (``STOP_REQUESTED``);
the daemon, given the same event, honours it once it runs (``Daemon.run``).
"""

from __future__ import annotations

import signal
import sys
import threading
from types import FrameType

#: set by a stop signal that came while ``meddaemon start`` was starting
STOP_REQUESTED = threading.Event()


def _note(signum: int, frame: FrameType | None) -> None:
    STOP_REQUESTED.set()


def main() -> None:
    if sys.argv[1:2] == ["start"]:
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(signum, _note)
    from meddaemon.cli.daemon import main as meddaemon

    meddaemon()
