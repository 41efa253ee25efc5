"""What both command groups share: settings from --config/env/flags, logging, exit codes."""

from __future__ import annotations

import functools
import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click
from sqlalchemy.exc import OperationalError

from meddaemon.config import ConfigError, Settings, load_settings
from meddaemon.db.migrate import SchemaTooNew

#: Exit codes, documented in the README.
EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_DATABASE = 3
#: another daemon sharing the database declared this one lost (it stalled past its lease); a
#: supervisor (systemd's Restart=on-failure) starts it again as a new member
EXIT_LEASE_LOST = 4

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
        help="TOML configuration file (default: $MEDDAEMON_CONFIG if set).",
    )(func)
    return func


def build_settings(config_file: Path | None, **flags: Any) -> Settings:
    try:
        return load_settings(config_file, flags=flags)
    except ConfigError as exc:
        raise click.UsageError(str(exc)) from exc


def handle_errors(func: F) -> F:
    """Turn the errors a user can act on into a one-line message and a meaningful exit code."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except SchemaTooNew as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(EXIT_DATABASE)
        except OperationalError as exc:
            click.echo(f"error: database unavailable: {exc.orig}", err=True)
            sys.exit(EXIT_DATABASE)

    return wrapper  # type: ignore[return-value]


def setup_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        stream=sys.stderr,
        force=True,
    )
    logging.getLogger("watchdog").setLevel(logging.WARNING)
    logging.getLogger("pydicom").setLevel(logging.ERROR)
    logging.getLogger("alembic").setLevel(logging.WARNING)


def echo_json(data: object) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=True, default=str))
