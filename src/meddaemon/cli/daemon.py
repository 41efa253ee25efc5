"""``meddaemon``: run the watch-folder daemon and look at what it did."""

from __future__ import annotations

import contextlib
import dataclasses
import faulthandler
import io
import logging
import os
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

import click

from meddaemon import __version__
from meddaemon.cli.common import (
    EXIT_DATABASE,
    EXIT_FAILURE,
    EXIT_LEASE_LOST,
    EXIT_OK,
    EXIT_USAGE,
    build_settings,
    echo_json,
    handle_errors,
    open_database,
    run_group,
    settings_options,
)
from meddaemon.cli.health import health
from meddaemon.cli.starting import STOP_REQUESTED
from meddaemon.cli.web import web
from meddaemon.config import (
    Settings,
    check_tls_identity,
    default_config_text,
    prepare_state_dir,
    require_inbox_apart,
)
from meddaemon.daemon.inbox import WatchFolderMissing, ensure_watch_folder
from meddaemon.daemon.outage import DatabaseUnavailable
from meddaemon.daemon.progress import ProgressLines
from meddaemon.db.engine import session_factory
from meddaemon.db.queries import status_summary
from meddaemon.logs import setup_logging
from meddaemon.names import shown_name

if TYPE_CHECKING:
    from meddaemon.daemon.intake_stage import RunStats
    from meddaemon.daemon.service import Daemon
    from meddaemon.web.server import WebServer


def _default(key: str) -> str:
    """A setting's built-in default, for --help: the options themselves default to nothing, so that
    the config file and the environment come before it (``meddaemon config show`` gives the values in force)."""
    return str(next(f.default for f in dataclasses.fields(Settings) if f.name == key))


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
@click.option(
    "--create-watch",
    is_flag=True,
    default=None,
    help="Create the inbox folder if it is missing (otherwise a missing inbox is an error, exit 2).",
)
@settings_options
@click.option("--once", is_flag=True, help="Process what is in the inbox, wait for it to settle, and exit.")
@click.option(
    "--stable-seconds",
    type=float,
    help=f"How long size and mtime must hold still before a file is read (default: {_default('stable_seconds')}).",
)
@click.option(
    "--rescan-seconds", type=float, help=f"Interval of the full inbox rescan (default: {_default('rescan_seconds')})."
)
@click.option(
    "--workers", type=int, help=f"Decoding processes (0: decode in the daemon process; default: {_default('workers')})."
)
@click.option("--batch-size", type=int, help=f"Files per database transaction (default: {_default('batch_size')}).")
@click.option(
    "--default-task", help="Task for scans no folder or rule routes (default: none, such scans fail as unroutable)."
)
@click.option(
    "--observer",
    type=click.Choice(["native", "polling"]),
    help=f"Event source; polling for network shares (default: {_default('observer')}).",
)
@click.option(
    "--log-level",
    type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False),
    help="Least level logged (default: log_level, INFO).",
)
@click.option(
    "--dicom-port",
    type=click.IntRange(0, 65535),
    help="Receive DICOM (C-STORE, C-ECHO) on this TCP port; 0: no DICOM receiver (config: dicom_port).",
)
@click.option(
    "--dicom-host", help="Address the DICOM receiver listens on (default 127.0.0.1; 0.0.0.0: every interface)."
)
@click.option("--ae-title", help="The DICOM receiver's AE title, which senders call (default MEDDAEMON).")
@click.option("--json", "as_json", is_flag=True, help="With --once: print a JSON summary on stdout at the end.")
@handle_errors
def start(config_file: Path | None, once: bool, as_json: bool, **flags: object) -> None:
    """Start the daemon on an inbox (stops cleanly on SIGTERM or Ctrl-C, exit code 0).

    With --dicom-port the daemon is also a DICOM node: modalities and PACS push instances to it
    (C-STORE, calling --ae-title), which land in <inbox>/dicom/ and go the way of every inbox file.
    Which calling AE titles may send is dicom_allowed_callers in the config (empty: any).
    """
    from meddaemon.daemon.service import Daemon, LeaseLost, StateDirectoryGone

    if as_json and not once:  # accepted, it printed nothing: a daemon that runs on has no summary
        raise click.UsageError("--json goes with --once: the summary of a run that ends")
    settings = build_settings(config_file, **flags)
    require_inbox_apart(settings)
    try:  # before the state folder is made: a mistyped --watch leaves nothing behind
        ensure_watch_folder(settings.watch, settings.create_watch)
    except WatchFolderMissing as exc:  # a bad setting: named with where it came from, as the others
        click.echo(f"error: setting 'watch' from {settings.sources.get('watch')}: {exc}", err=True)
        sys.exit(EXIT_USAGE)
    prepare_state_dir(settings)
    check_tls_identity(settings)
    setup_logging(settings.log_level)
    _dump_stacks_on_sigusr1()
    progress = ProgressLines(sys.stderr) if once else None
    daemon = Daemon(settings, stop_requested=STOP_REQUESTED)
    if STOP_REQUESTED.is_set():
        logging.getLogger("meddaemon.daemon").info("asked to stop while starting: stopping once started")
    web_console = _start_web_console(settings) if settings.web_port and not once else None
    try:
        stats = daemon.run(once=once, progress=progress.update if progress else None)
    except WatchFolderMissing as exc:
        click.echo(f"error: {exc}", err=True)
        _exit(daemon, EXIT_USAGE)
    except LeaseLost as exc:
        click.echo(f"error: {exc}; its work was taken over, exiting to be restarted", err=True)
        _exit(daemon, EXIT_LEASE_LOST)
    except DatabaseUnavailable as exc:
        click.echo(f"error: {exc}", err=True)
        _exit(daemon, EXIT_DATABASE)
    except StateDirectoryGone as exc:
        click.echo(f"error: {exc}", err=True)
        _exit(daemon, EXIT_FAILURE)
    finally:
        if web_console is not None:
            web_console.stop()
    if progress is not None:
        progress.finish(stats.files, stats.files + stats.left)
    if stats.held:
        click.echo(
            f"error: {stats.held} files could not be moved out of the inbox (each named in the log; "
            f"{stats.left} files left in it): run again once they can",
            err=True,
        )
    if stats.unlisted:
        click.echo(
            f"error: {stats.unlisted} inbox folders could not be listed (each named in the log): their files "
            "were not read; run again once they can",
            err=True,
        )
    if stats.unreported:
        click.echo(
            f"error: the reports of {stats.unreported} scans could not be written or built (each named in the "
            "log): those scans stay inferred in work/; run again once they can",
            err=True,
        )
    if stats.unreported_studies:
        click.echo(
            f"error: the reports of {stats.unreported_studies} studies could not be written or built (each named "
            "in the log): run again once they can",
            err=True,
        )
    if stats.refused_models:
        click.echo(
            f"error: the active models {', '.join(stats.refused_models)} were refused (the log says why): "
            "their scans wait for them, or the version before served them",
            err=True,
        )
    if stats.outputs_waiting:
        click.echo(
            f"{stats.outputs_waiting} DICOM outputs wait in the outbox for their destinations (medcli outbox list "
            "says why): the daemon, or the next --once, sends them",
            err=True,
        )
    if not (stats.drained or stats.held or stats.unlisted):
        click.echo(cut_short(stats), err=True)
    if once and as_json:
        echo_json({k: v for k, v in dataclasses.asdict(stats).items() if k != "started"})
    undone = stats.held or stats.unlisted or stats.unreported or stats.unreported_studies or stats.refused_models
    _exit(daemon, EXIT_FAILURE if undone else EXIT_OK)


def cut_short(stats: RunStats) -> str:
    """What a ``--once`` run a stop cut short left undone: files in the inbox, or, the inbox taken in
    ("0 files left in it" said of an empty inbox), the work on its scans."""
    if stats.left:
        return f"stopped before the inbox was drained: {stats.left} files left in it"
    if not stats.files:  # a stop at start, or on an empty inbox: nothing of this run's was cut short
        return "stopped as asked before the run ended: no file was taken from the inbox, which holds none"
    return (
        "stopped before the run was done: every file was taken in from the inbox, but the work on its scans "
        "(inference, reports, DICOM outputs) was cut short; the daemon, or another --once run, finishes it"
    )


def _exit(daemon: Daemon, code: int) -> NoReturn:
    """Exit with ``code``; at once (``os._exit``) when a model load was left running in its thread,
    which Python's shutdown would otherwise turn into an abort (exit 134)."""
    if daemon.stage.loader.alive():
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


def _start_web_console(settings: Settings) -> WebServer:
    """The web console from a thread of the daemon's process (``web_port``); its own database engines."""
    from meddaemon.web.server import start_in_thread

    server = start_in_thread(settings)
    logging.getLogger("meddaemon.web").info("web console on %s", server.url)
    return server


@cli.command()
@click.option(
    "--watch", type=click.Path(path_type=Path, file_okay=False), help="Inbox folder (to count waiting files)."
)
@settings_options
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option(
    "--recent",
    type=click.IntRange(min=0),
    default=10,
    show_default=True,
    help="How many of the latest failures not yet retried to list (0: none).",
)
@handle_errors
def status(config_file: Path | None, as_json: bool, recent: int, **flags: object) -> None:
    """Scans per state, failures by reason, the latest failures and throughput."""
    from meddaemon.daemon.inbox import Inbox, folder_words

    settings = build_settings(config_file, **flags)
    engine = open_database(settings, read_only=True)
    try:
        with session_factory(engine)() as session:
            summary = status_summary(session, recent=recent)
    finally:
        engine.dispose()
    unlisted: list[tuple[str, str]] = []
    # no watch folder given and none in the default place (./inbox): nothing to count, nor to warn of
    # (it said "files waiting: 0" and that the watch folder was gone, its share unmounted)
    if settings.sources.get("watch") == "default" and not settings.watch.exists():
        summary.extra["inbox_waiting"] = None
    else:
        inbox = Inbox(settings.watch, settings.ignore, exclude=[settings.state_dir])
        summary.extra["inbox_waiting"] = sum(1 for _ in inbox.scan())  # a watch folder gone is an unlisted one
        unlisted = sorted(inbox.unlisted.items())
    summary.extra["inbox_unlisted"] = {shown_name(name): why for name, why in unlisted}
    if as_json:
        echo_json(summary.as_dict())
        return
    waiting = summary.extra["inbox_waiting"]
    click.echo(
        f"scans: {summary.total}   duplicates: {summary.duplicates}   "
        + (f"files waiting in the inbox: {waiting}" if waiting is not None else "inbox: not counted (give --watch)")
    )
    for state, count in sorted(summary.states.items()):
        click.echo(f"  {state:<14} {count}")
    click.echo(
        f"throughput: {summary.registered_last_minute} registered in the last minute, "
        f"{summary.registered_last_hour} in the last hour"
    )
    for name, why in unlisted:
        click.echo(
            f"cannot list {folder_words(name)} ({why}): its files are not counted, "
            "and a daemon running as this user cannot read them"
        )
    if summary.pending_moves:
        click.echo(f"moves still to finish: {summary.pending_moves}")
    if summary.waiting_model:
        click.echo("tasks without an active model (scans waiting for one):")
        for task, count in summary.waiting_model.items():
            click.echo(f"  {task:<14} {count}")
    if summary.waiting_active_model:
        click.echo("tasks whose active model no daemon serves (refused or failing to load: the log says why):")
        for task, count in summary.waiting_active_model.items():
            click.echo(f"  {task:<14} {count}")
    if summary.refused_active_model:
        click.echo("active models a daemon refused (mend the files and promote them again, or promote another):")
        for task, refused in summary.refused_active_model.items():
            click.echo(f"  {task}/{refused['version']}: {refused['refusal']}")
    if summary.failures_by_reason:
        click.echo("failures by reason:")
        for reason, count in sorted(summary.failures_by_reason.items(), key=lambda kv: -kv[1]):
            click.echo(f"  {reason:<28} {count}")
        if summary.last_failures:
            click.echo("latest failures (UTC):")
        for failure in summary.last_failures:
            name = shown_name(failure.source_name)
            click.echo(f"  {failure.at:%Y-%m-%d %H:%M:%S}  {name}: {failure.reason} ({failure.message})")


@cli.group()
def config() -> None:
    """Inspect the configuration."""


@config.command("show")
@click.option("--watch", type=click.Path(path_type=Path, file_okay=False), help="Inbox folder, as for start.")
@settings_options
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@handle_errors
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
@handle_errors
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
    run_group(cli, "meddaemon")


cli.add_command(health)
cli.add_command(web)
