"""``medcli report``: rebuild a scan's or a study's PDF on demand, and the summary of a period.

Thin: parse, call ``meddaemon.report``, print. ``medcli report 42`` is short for
``medcli report scan 42``. An unknown scan, or a scan or study without a result, exits 2; a report
that cannot be written 1; a database problem 3.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import click
from sqlalchemy.orm import Session, sessionmaker

from meddaemon.cli.common import (
    EXIT_FAILURE,
    EXIT_USAGE,
    build_settings,
    echo_json,
    handle_errors,
    open_database,
    settings_options,
)
from meddaemon.config import Settings
from meddaemon.db.engine import session_factory

F = TypeVar("F", bound=Callable[..., Any])


class _ScanByDefault(click.Group):
    """A group whose first argument, when it is not a subcommand, is a scan: ``report 42``."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        """Options may come first (``report --json 42``, ``report --state-dir S summary``): the
        subcommand, or ``scan``, goes before them (the group itself has none but ``--help``)."""
        at = self._first_argument(ctx, args)
        if at is not None:
            command = args[at] if args[at] in self.commands else "scan"
            args = [command, *args[:at], *args[at + (command == args[at]) :]]
        return super().parse_args(ctx, args)

    def _first_argument(self, ctx: click.Context, args: list[str]) -> int | None:
        """Where the first of ``args`` is that is neither an option nor an option's value (any
        subcommand's: ``report --since 7d summary``)."""
        taking_values = {
            name
            for command in self.commands.values()
            for param in command.get_params(ctx)
            if isinstance(param, click.Option) and not param.is_flag
            for name in param.opts
        }
        pending_value = False
        for at, arg in enumerate(args):
            if pending_value:
                pending_value = False
            elif arg == "--":
                return None
            elif arg.startswith("-"):
                pending_value = arg in taking_values
            else:
                return at
        return None


def _report_file(_ctx: click.Context, _param: click.Parameter, out: Path | None) -> Path | None:
    """``--out`` as the file a report is written to and recorded at: a symbolic link followed (its
    target written, the link kept), a pipe, a device or a stream of this process refused (renamed
    over, a pipe became a regular file and its reader got nothing)."""
    from meddaemon.files import named_descriptor, output_target

    if out is None:
        return None
    try:
        target = output_target(out)
    except OSError as exc:
        raise click.BadParameter(f"{out} cannot be written: {exc.strerror}", param_hint="--out") from None
    if named_descriptor(out) is not None or (target.exists() and not target.is_file()):
        raise click.BadParameter(
            f"{out} is not a regular file: a report is recorded with the file it is written to", param_hint="--out"
        )
    return target


def _report_options(func: F) -> F:
    func = click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")(func)
    func = click.option(
        "--out",
        type=click.Path(path_type=Path, dir_okay=False),
        callback=_report_file,
        help="Write the PDF here instead of reports/ (a file: it is recorded with the report).",
    )(func)
    func = click.option(
        "--with-phi/--without-phi",
        default=None,
        help="Put patient name, ID, birth date, sex, age and accession number in (default: reports_with_phi).",
    )(func)
    return settings_options(func)


@contextmanager
def _sessions(settings: Settings) -> Iterator[sessionmaker[Session]]:
    engine = open_database(settings)
    try:
        yield session_factory(engine)
    finally:
        engine.dispose()


def _fail(message: str, code: int = EXIT_FAILURE) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


def _print(written: Any, as_json: bool) -> None:
    if as_json:
        echo_json(written.as_dict())
    else:
        phi = "with PHI" if written.with_phi else "de-identified"
        click.echo(f"{written.path}  ({written.pages} page(s), {phi}, sha256 {written.sha256[:16]})")


@click.group(
    cls=_ScanByDefault,
    subcommand_metavar="SCAN_ID|SHA256 | COMMAND [ARGS]...",
    context_settings={"help_option_names": ["-h", "--help"]},
)
def report() -> None:
    """PDF reports: `medcli report SCAN_ID|SHA256` rebuilds a scan's report (also `report scan ...`)."""


@report.command("scan")
@click.argument("scan")
@_report_options
@handle_errors
def scan_cmd(
    scan: str, with_phi: bool | None, out: Path | None, as_json: bool, config_file: Path | None, **flags: object
) -> None:
    """Rebuild the report of SCAN (its id, SHA-256, or a unique SHA-256 prefix of 8+ characters)."""
    from meddaemon.report.builder import ReportBuilder
    from meddaemon.report.content import AmbiguousScan, NoResult, find_scan

    settings = build_settings(config_file, **flags)
    with _sessions(settings) as sessions:
        with sessions() as session:
            try:
                row = find_scan(session, scan)
            except AmbiguousScan as exc:
                _fail(str(exc), EXIT_USAGE)
            scan_id = row.id if row is not None else None
        if scan_id is None:
            _fail(f"no scan {scan!r} (give its id, its SHA-256 or a unique prefix of 8+ characters)", EXIT_USAGE)
        assert scan_id is not None
        try:
            written = ReportBuilder(settings, sessions).scan_report(scan_id, with_phi, out)
        except NoResult as exc:
            _fail(str(exc), EXIT_USAGE)
        except OSError as exc:
            _fail(f"could not write the report: {exc.strerror or exc}")
    _print(written, as_json)


@report.command("study")
@click.argument("study_uid")
@_report_options
@handle_errors
def study_cmd(
    study_uid: str, with_phi: bool | None, out: Path | None, as_json: bool, config_file: Path | None, **flags: object
) -> None:
    """Rebuild the report of the study STUDY_UID: every scan of it that has a result."""
    from meddaemon.report.builder import ReportBuilder
    from meddaemon.report.content import NoResult

    settings = build_settings(config_file, **flags)
    with _sessions(settings) as sessions:
        try:
            written = ReportBuilder(settings, sessions).study_report(study_uid, with_phi, out)
        except NoResult as exc:
            _fail(f"study {study_uid}: {exc}", EXIT_USAGE)
        except OSError as exc:
            _fail(f"could not write the report: {exc.strerror or exc}")
    _print(written, as_json)


@report.command("summary")
@click.option("--since", default="24h", show_default=True, help="A duration (24h, 7d, 90m) or an ISO date/time.")
@click.option("--until", "until_text", help="End of the period (ISO date/time; default: now).")
@click.option(
    "--out",
    type=click.Path(path_type=Path, dir_okay=False),
    callback=_report_file,
    help="Write the PDF here (a file: it is recorded with the report).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the figures as JSON (a PDF is written only with --out).")
@settings_options
@handle_errors
def summary_cmd(
    since: str, until_text: str | None, out: Path | None, as_json: bool, config_file: Path | None, **flags: object
) -> None:
    """The period's cohort: scans per task and state, calls per label, failures by reason, latency
    percentiles and a histogram of probabilities per label. No patient data."""
    from meddaemon.db.engine import transaction, with_lock_retry
    from meddaemon.report import output
    from meddaemon.report.fonts import report_fonts
    from meddaemon.report.summary import parse_since, render_summary, summarise

    settings = build_settings(config_file, **flags)
    try:
        start = parse_since(since)
        end = parse_since(until_text) if until_text else None
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from exc
    if end is not None and end <= start:
        raise click.BadParameter(f"--until {until_text} is not after --since {since}", param_hint="--until")
    if end is None and start >= datetime.now(UTC):  # a period ending before it begins: an empty report, exit 0
        raise click.BadParameter(f"{since} is in the future", param_hint="--since")
    with _sessions(settings) as sessions:
        with sessions() as session:
            figures = summarise(session, start, end)
        path = None
        if out is not None or not as_json:
            path = (out or output.summary_report_path(settings.reports_dir, figures.since, figures.until)).absolute()
            rendered = render_summary(figures, report_fonts(settings.reports_font))
            try:
                sha = output.write_pdf(path, rendered.data)
            except OSError as exc:
                _fail(f"could not write the report: {exc.strerror or exc}")

            def record() -> None:
                with transaction(sessions) as session:
                    output.record_report(
                        session,
                        kind="summary",
                        path=path,
                        state_dir=settings.state_dir,
                        sha256=sha,
                        size=len(rendered.data),
                        pages=rendered.pages,
                        with_phi=False,
                    )

            with_lock_retry(record)
    if as_json:
        data = figures.as_dict()
        data["report"] = str(path) if path else None
        echo_json(data)
        return
    click.echo(f"{figures.scans} scans from {figures.since:%Y-%m-%d %H:%M} to {figures.until:%Y-%m-%d %H:%M} UTC")
    for state, n in sorted(figures.states.items()):
        click.echo(f"  {state:<14} {n}")
    for reason, n in sorted(figures.failures_by_reason.items()):
        click.echo(f"  failed: {reason:<24} {n}")
    click.echo(str(path))
