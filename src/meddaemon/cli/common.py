"""What both command groups share: settings from --config/env/flags, the database, logging, exit codes.

Heavy modules (torch, the registry, the statistics stack) are never imported here nor at the top of
a command module: ``meddaemon --help``, ``meddaemon health`` and ``medcli --help`` must start fast.
"""

from __future__ import annotations

import codecs
import functools
import json
import os
import sys
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import UTC, date, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click
from sqlalchemy import Engine
from sqlalchemy.exc import DatabaseError, InternalError, OperationalError, ProgrammingError

from meddaemon import heap
from meddaemon.config import CONFIG_ENV, ConfigError, Settings, load_settings
from meddaemon.db.engine import is_lock_error
from meddaemon.db.migrate import ForeignDatabase, SchemaError, SchemaTooNew, database_location, open_current
from meddaemon.logs import error_line

if TYPE_CHECKING:
    from meddaemon.training.nearduplicates import HashProgress

#: Exit codes: each means one thing, the same for every command; the README's "Exit codes" table.
EXIT_OK = 0
#: an unexpected error, or work the command could not do (a model the registry refused, a file it
#: could not write)
EXIT_FAILURE = 1
#: bad usage, configuration or input: an unknown task, model version, scan or column, a bad file
EXIT_USAGE = 2
#: no database where the settings point, its schema behind this meddaemon's, or unreachable
EXIT_DATABASE = 3
#: another daemon sharing the database declared this one lost (it stalled past its lease); a
#: supervisor (systemd's Restart=on-failure) starts it again as a new member
EXIT_LEASE_LOST = 4
#: ``medcli audit --require``: the audit ran and a criterion does not hold
EXIT_CRITERIA_FAILED = 5
#: the database's schema is ahead of this meddaemon (a newer one upgraded it): only upgrading
#: meddaemon helps, so a supervisor must not restart it (exit 3 was restarted every 5 s, for good)
EXIT_SCHEMA_AHEAD = 6
#: stopped by Ctrl-C (128 + SIGINT, the shell's convention): `medcli retrain` says how to --resume
EXIT_INTERRUPTED = 130
#: stopped by SIGTERM where the command caught it (128 + SIGTERM, as a process it ends has): ``medcli
#: evaluate --engine ray``, whose driver Ray makes catch it, records its run interrupted first
EXIT_TERMINATED = 143

#: The configuration both ``meddaemon`` and ``medcli`` read when neither ``--config`` nor
#: ``$MEDDAEMON_CONFIG`` names one, if it exists: the commands find the daemon's database with no flags.
DEFAULT_CONFIG_FILE = Path("/etc/meddaemon/meddaemon.toml")

F = TypeVar("F", bound=Callable[..., Any])


def settings_options(func: F) -> F:
    """--config, --state-dir and --db: enough to find the database of a daemon."""
    func = click.option("--db", help="SQLAlchemy URL (default: SQLite under the state directory).")(func)
    func = click.option(
        "--state-dir",
        type=click.Path(path_type=Path, file_okay=False),
        help="Folder for the database, work/, archive/, failed/.",
    )(func)
    func = click.option(
        "--config",
        "config_file",
        type=click.Path(path_type=Path, dir_okay=False, exists=True),
        help=f"TOML configuration file (default: $MEDDAEMON_CONFIG, else {DEFAULT_CONFIG_FILE} if it exists).",
    )(func)
    return func


def config_file_to_read(given: Path | None, env: Mapping[str, str] | None = None) -> Path | None:
    """``--config``, else none here when ``$MEDDAEMON_CONFIG`` is set (``load_settings`` reads it),
    else ``DEFAULT_CONFIG_FILE`` when it exists."""
    env = os.environ if env is None else env
    if given is not None or env.get(CONFIG_ENV):
        return given
    return DEFAULT_CONFIG_FILE if DEFAULT_CONFIG_FILE.is_file() else None


#: where the running command's database is (``build_settings`` notes it), for its errors' messages:
#: "database unusable: file is not a database" did not say which file
_DATABASE_AT: ContextVar[str | None] = ContextVar("database_at", default=None)


def build_settings(config_file: Path | None, **flags: Any) -> Settings:
    """The effective settings; a bad one is a one-line error and exit 2."""
    try:
        settings = load_settings(config_file_to_read(config_file), flags=flags)
    except ConfigError as exc:
        _fail(str(exc), EXIT_USAGE)
    _DATABASE_AT.set(database_location(settings.db_url))
    return settings


def _database_named() -> str:
    where = _DATABASE_AT.get()
    return f" at {where}" if where else ""


def open_database(settings: Settings, read_only: bool = False) -> Engine:
    """The database of the settings as it is, for every command but ``start`` and ``db upgrade``:
    never created nor migrated (``SchemaError``, exit 3 through ``handle_errors``, when it is not
    there or not at this meddaemon's schema). ``read_only`` for the commands that only read: on
    SQLite they took the write lock like a writer, and a daemon holding it for a few seconds made
    `medcli scans` and `meddaemon status` fail ("database is locked", exit 3)."""
    return open_current(settings.db_url, settings.busy_timeout, read_only=read_only)


def _fail(message: str, code: int) -> Any:
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


def run_group(group: click.Group, prog_name: str) -> None:
    """A console script's entry point: the command group, then the whole heap frozen on the way
    out, so that the interpreter's shutdown skips walking what torch left (``meddaemon.heap``)."""
    names_as_they_are(sys.stdout)
    names_as_they_are(sys.stderr)  # the hints of what to run next (``--data``) go there
    keep_from_others()
    try:
        group(prog_name=prog_name)
    finally:
        heap.freeze_for_exit()


def keep_from_others() -> None:
    """No file or folder the commands write is the other users': the state folder, the database,
    reports and kept scans hold patient data, and under a umask of 022 (a shell, a container) they
    were readable by every user of the host. The umask only gains bits here (systemd's unit sets 0027)."""
    os.umask(os.umask(0) | 0o007)


def names_as_they_are(stream: Any) -> None:
    """A file name that is not UTF-8 (a Latin-1 share) is written to ``stream`` as the bytes it
    is, as ``ls`` shows it: in a UTF-8 locale Python's stdout refuses it, and the command that
    printed a dataset's file names stopped with a traceback. Any other character the stream cannot
    hold (Chinese on a Latin-1 terminal, a lone surrogate) is written ``\\u6570``: with plain
    ``surrogateescape`` such a message was lost in a UnicodeEncodeError."""
    if hasattr(stream, "reconfigure"):
        stream.reconfigure(errors=NAME_BYTES)


def _name_bytes(error: UnicodeError) -> tuple[bytes, int]:
    if not isinstance(error, UnicodeEncodeError):
        raise error
    out = bytearray()
    for char in error.object[error.start : error.end]:
        if 0xDC80 <= ord(char) <= 0xDCFF:  # a byte of a name that was not UTF-8, as Python holds it
            out.append(ord(char) - 0xDC00)
        else:
            out += char.encode("ascii", "backslashreplace")
    return bytes(out), error.end


#: the error handler of ``names_as_they_are``
NAME_BYTES = "meddaemon-name-bytes"
codecs.register_error(NAME_BYTES, _name_bytes)


#: SQLSTATEs of errors an operator cures, not a developer: a read-only transaction (a standby,
#: ``default_transaction_read_only``) and a privilege not granted; the rest of class 25 (a
#: transaction aborted and used on) is a bug
_OPERATORS_SQLSTATES = ("25006", "42501")


def _a_bug(error: DatabaseError) -> bool:
    """Whether a database error is meddaemon's to fix, whose traceback a developer needs (a broken
    constraint, a statement the server cannot run), rather than the database's state: a file that
    is no SQLite database or a damaged one (a plain ``DatabaseError``), a read-only server, a
    privilege not granted."""
    if type(error) is DatabaseError:
        return False
    if isinstance(error, (ProgrammingError, InternalError)):
        state = str(getattr(error.orig, "sqlstate", None) or "")
        return state not in _OPERATORS_SQLSTATES
    return True


def handle_errors(func: F) -> F:
    """Turn the errors a user can act on into a one-line message and a meaningful exit code."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        _DATABASE_AT.set(None)  # not a database an earlier command in this process named
        try:
            return func(*args, **kwargs)
        except ConfigError as exc:
            _fail(str(exc), EXIT_USAGE)
        except SchemaTooNew as exc:
            _fail(str(exc), EXIT_SCHEMA_AHEAD)
        except ForeignDatabase as exc:  # a setting pointing at the wrong database: restarting never helps
            _fail(str(exc), EXIT_USAGE)
        except SchemaError as exc:
            _fail(str(exc), EXIT_DATABASE)
        except OperationalError as exc:
            if is_lock_error(exc):
                _fail(
                    f"database busy: another process held its lock past the wait allowed ({error_line(exc)}); "
                    "try again",
                    EXIT_DATABASE,
                )
            _fail(f"database unavailable{_database_named()}: {error_line(exc)}", EXIT_DATABASE)
        except DatabaseError as exc:
            if _a_bug(exc):
                raise
            _fail(f"database unusable{_database_named()}: {error_line(exc)}", EXIT_DATABASE)
        except KeyboardInterrupt:  # click's own answer is "Aborted!", exit 1
            _fail("interrupted (Ctrl-C)", EXIT_INTERRUPTED)

    wrapper.handles_errors = True  # type: ignore[attr-defined]
    return wrapper  # type: ignore[return-value]


def json_value(value: object) -> object:
    """What ``json`` cannot write itself: a timestamp as ISO 8601 in UTC with its offset (a naive one,
    as SQLite returns them, is UTC: the daemon stores UTC), a date as ISO 8601, anything else as text."""
    if isinstance(value, datetime):
        aware = value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
        return aware.isoformat()
    if isinstance(value, date):
        return value.isoformat()
    return str(value)


def echo_json(data: object) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=True, default=json_value))


def hash_workers_option(func: F) -> F:
    """--workers: the processes that decode and pHash a dataset's images (``dataset inspect``, ``retrain``)."""
    return click.option(
        "--workers",
        type=click.IntRange(min=1),
        default=os.cpu_count() or 1,
        show_default="the number of cores",
        help="Processes decoding and hashing the images.",
    )(func)


@contextmanager
def hashing_progress(*, disable: bool) -> Iterator[HashProgress]:
    """A rich progress bar on stderr (when it is a terminal) fed by ``(done, total)`` calls."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    err = Console(stderr=True)
    columns = (TextColumn("decoding and hashing"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=err, transient=True, disable=disable or not err.is_terminal) as bar:
        task = bar.add_task("hashing", total=None)

        def progress(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        yield progress


def echo_warning(warning: str) -> None:
    """A warning a person must not miss: ``WARNING: ...`` on stderr, bold."""
    click.secho(f"WARNING: {warning}", err=True, fg="yellow", bold=True)
