"""The processes' log lines: one record, one line (control characters escaped), on stderr, where
systemd's journal or a terminal reads them; the chatty libraries quieted."""

from __future__ import annotations

import logging
import sys

from meddaemon.names import escape_controls


class OneLineFormatter(logging.Formatter):
    """A record's line with its control characters escaped (``names.escape_controls``): a file name
    holding a line break forged log lines of its own in the journal, one holding a terminal escape
    rewrote the screen of whoever read the log. A traceback still follows on its own lines."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        return escape_controls(super().formatMessage(record))


def setup_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(OneLineFormatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
    logging.getLogger("watchdog").setLevel(logging.WARNING)
    logging.getLogger("pydicom").setLevel(logging.ERROR)
    logging.getLogger("alembic").setLevel(logging.WARNING)
