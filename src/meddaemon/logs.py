"""The processes' log lines: one record, one line (control characters escaped), on stderr, where
systemd's journal or a terminal reads them; the chatty libraries quieted."""

from __future__ import annotations

import logging
import sys
import warnings

from meddaemon.names import escape_controls


class OneLineFormatter(logging.Formatter):
    """A record's line with its control characters escaped (``names.escape_controls``): a file name
    holding a line break forged log lines of its own in the journal, one holding a terminal escape
    rewrote the screen of whoever read the log. A traceback still follows on its own lines."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        return escape_controls(super().formatMessage(record))


#: libraries whose warnings and log lines quote element values, a patient's name among them
VALUE_QUOTING_LIBRARIES = ("pydicom", "highdicom")


def setup_logging(level: str) -> None:
    """Every process of the daemon calls this first (the report, outbox and receiver processes too)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(OneLineFormatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
    logging.getLogger("watchdog").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    # at DEBUG, urllib3 logs each request's line: a DICOMweb destination's query, its token with it
    # (and requests' charset_normalizer a guess at each answer's encoding)
    for library in ("urllib3", "charset_normalizer"):
        logging.getLogger(library).setLevel(logging.WARNING)
    quiet_libraries()


def quiet_libraries() -> None:
    """pydicom's and highdicom's warnings and log lines quote element values (highdicom quotes a
    patient's name of one component): PHI stays out of the log. pydicom is imported first, because
    its import sets its logger's level again. Pillow's warning of a "decompression bomb" over 89 M
    pixels says what ``max_pixels`` decides, in two raw lines outside the log's format."""
    import pydicom  # noqa: F401
    from PIL import Image

    for name in VALUE_QUOTING_LIBRARIES:
        warnings.filterwarnings("ignore", module=rf"{name}(\..*)?")
        logging.getLogger(name).setLevel(logging.CRITICAL)
    warnings.filterwarnings("ignore", category=UserWarning, message=r".*(VR|value|Invalid|Expected).*")
    warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


def error_line(exc: BaseException) -> str:
    """An error's message on one line of at most 300 characters: the driver's own (``orig``) where
    SQLAlchemy wraps one, which leaves out the statement and its parameters."""
    text = str(getattr(exc, "orig", None) or exc)
    return " ".join(text.split())[:300]
