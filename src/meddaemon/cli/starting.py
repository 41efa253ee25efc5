"""The ``meddaemon`` and ``medcli`` commands' entry points, light on purpose: ``meddaemon start``
takes SIGTERM, SIGINT and SIGHUP as a request to stop from its first instant, and every other
command a Ctrl-C while it is imported as it does one while it runs.

Importing the command line (SQLAlchemy, Alembic) and then the daemon (torch) takes most of a second,
and a stop asked for meanwhile (a supervisor stopping a unit that had just started) killed the
process, exit 143, where a clean stop exits 0. Here the request is only noted (``STOP_REQUESTED``);
the daemon, given the same event, honours it once it runs (``Daemon.run``). A Ctrl-C in the import of
another command printed a ``KeyboardInterrupt`` traceback.
"""

from __future__ import annotations

import signal
import sys
import threading
from types import FrameType
from typing import NoReturn

#: set by a stop signal that came while ``meddaemon start`` was starting
STOP_REQUESTED = threading.Event()


def _note(signum: int, frame: FrameType | None) -> None:
    STOP_REQUESTED.set()


#: ``cli.common.EXIT_INTERRUPTED``, which cannot be imported before the command line is
EXIT_INTERRUPTED = 130


def _interrupted() -> NoReturn:
    sys.stderr.write("error: interrupted (Ctrl-C)\n")
    sys.exit(EXIT_INTERRUPTED)


def main() -> None:
    """``meddaemon``."""
    if sys.argv[1:2] == ["start"]:
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(signum, _note)
    try:
        from meddaemon.cli.daemon import main as meddaemon
    except KeyboardInterrupt:
        _interrupted()
    meddaemon()


def medcli() -> None:
    """``medcli``."""
    try:
        from meddaemon.cli.medcli import main as run
    except KeyboardInterrupt:
        _interrupted()
    run()
