"""``meddaemon``: run the watch-folder daemon and look at what it did."""

from __future__ import annotations

import contextlib
import dataclasses
import faulthandler
import io
import signal
import sys
from pathlib import Path

import click

from meddaemon import __version__
from meddaemon.cli.common import (
    EXIT_LEASE_LOST,
    EXIT_OK,
    build_settings,
    echo_json,
    handle_errors,
    settings_options,
    setup_logging,
)
from meddaemon.cli.health import health
from meddaemon.config import default_config_text
from meddaemon.daemon.inbox import Inbox
from meddaemon.daemon.service import Daemon, LeaseLost
from meddaemon.db.engine import create_db_engine, session_factory
from meddaemon.db.migrate import upgrade
from meddaemon.db.queries import status_summary


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="meddaemon")
def cli() -> None:
    """Watch a folder for PNG and DICOM scans and run them through the task's classifier.

    Every file that lands in the inbox is read once it is complete, identified by its SHA-256,
    decoded, routed to a task and recorded in the database; the file then moves to the state
    directory (work/, archive/, or failed/ with a .reason.json). Nothing is ever deleted.
    """


@cli.command()
@click.option("--watch", type=click.Path(path_type=Path, file_okay=False), help="Inbox folder to watch.")
@settings_options
@click.option("--once", is_flag=True, help="Process what is in the inbox, wait for it to settle, and exit.")
@click.option("--stable-seconds", type=float, help="How long size and mtime must hold still before a file is read.")
@click.option("--rescan-seconds", type=float, help="Interval of the full inbox rescan.")
@click.option("--workers", type=int, help="Decoding processes (0: decode in the daemon process).")
@click.option("--batch-size", type=int, help="Files per database transaction.")
@click.option("--default-task", help="Task for scans no folder or rule routes.")
@click.option("--observer", type=click.Choice(["native", "polling"]), help="Event source; polling for network shares.")
@click.option("--log-level", type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False))
@click.option("--json", "as_json", is_flag=True, help="With --once: print a JSON summary on stdout at the end.")
@handle_errors
def start(config_file: Path | None, once: bool, as_json: bool, **flags: object) -> None:
    """Start the daemon on an inbox (stops cleanly on SIGTERM or Ctrl-C, exit code 0)."""
    settings = build_settings(config_file, **flags)
    setup_logging(settings.log_level)
    _dump_stacks_on_sigusr1()
    try:
        stats = Daemon(settings).run(once=once)
    except LeaseLost as exc:
        click.echo(f"error: {exc}; its work was taken over, exiting to be restarted", err=True)
        sys.exit(EXIT_LEASE_LOST)
    if once and as_json:
        echo_json({k: v for k, v in dataclasses.asdict(stats).items() if k != "started"})
    sys.exit(EXIT_OK)


@cli.command()
@click.option(
    "--watch", type=click.Path(path_type=Path, file_okay=False), help="Inbox folder (to count waiting files)."
)
@settings_options
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--recent", default=10, show_default=True, help="How many of the latest failures to list.")
@handle_errors
def status(config_file: Path | None, as_json: bool, recent: int, **flags: object) -> None:
    """Scans per state, failures by reason, the latest failures and throughput."""
    settings = build_settings(config_file, **flags)
    engine = create_db_engine(settings.db_url, settings.busy_timeout)
    upgrade(engine)
    with session_factory(engine)() as session:
        summary = status_summary(session, recent=recent)
    inbox = Inbox(settings.watch, settings.ignore, exclude=[settings.state_dir])
    summary.extra["inbox_waiting"] = sum(1 for _ in inbox.scan()) if settings.watch.is_dir() else 0
    if as_json:
        echo_json(summary.as_dict())
        return
    click.echo(
        f"scans: {summary.total}   duplicates: {summary.duplicates}   "
        f"files waiting in the inbox: {summary.extra['inbox_waiting']}"
    )
    for state, count in sorted(summary.states.items()):
        click.echo(f"  {state:<14} {count}")
    click.echo(
        f"throughput: {summary.registered_last_minute} registered in the last minute, "
        f"{summary.registered_last_hour} in the last hour"
    )
    if summary.pending_moves:
        click.echo(f"moves still to finish: {summary.pending_moves}")
    if summary.failures_by_reason:
        click.echo("failures by reason:")
        for reason, count in sorted(summary.failures_by_reason.items(), key=lambda kv: -kv[1]):
            click.echo(f"  {reason:<28} {count}")
        click.echo("latest failures:")
        for failure in summary.last_failures:
            click.echo(f"  {failure.at:%Y-%m-%d %H:%M:%S}  {failure.source_name}: {failure.reason} ({failure.message})")


@cli.group()
def config() -> None:
    """Inspect the configuration."""


@config.command("show")
@click.option("--watch", type=click.Path(path_type=Path, file_okay=False))
@settings_options
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def config_show(config_file: Path | None, as_json: bool, **flags: object) -> None:
    """Print the effective settings and where each comes from (default, file, env or flag)."""
    settings = build_settings(config_file, **flags)
    values = settings.public_dict()
    if as_json:
        echo_json({"settings": values, "sources": dict(settings.sources)})
        return
    for key, value in values.items():
        source = settings.sources.get(key, "derived")
        click.echo(f"{key} = {_toml_value(value)}    # {source}")


@config.command("default")
def config_default() -> None:
    """Print the default configuration file, with comments (a starting point for --config)."""
    click.echo(default_config_text(), nl=False)


def _toml_value(value: object) -> str:
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + " }"
    return str(value)


def _dump_stacks_on_sigusr1() -> None:
    """``kill -USR1 PID`` writes every thread's stack to stderr: what a daemon that hangs is doing.
    Not where stderr is no real file (Click's test runner)."""
    with contextlib.suppress(io.UnsupportedOperation, AttributeError, ValueError):
        faulthandler.register(signal.SIGUSR1, all_threads=True)


def main() -> None:
    cli(prog_name="meddaemon")


cli.add_command(health)
