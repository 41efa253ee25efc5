"""``medcli retry``: send failed scans back through the inbox (the work is in ``daemon/retry.py``)."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from meddaemon.cli.common import (
    EXIT_OK,
    EXIT_USAGE,
    build_settings,
    echo_json,
    handle_errors,
    open_database,
    settings_options,
)
from meddaemon.db.engine import session_factory
from meddaemon.names import escape_controls, shown_name


@click.command()
@settings_options
@click.argument("scan", required=False, metavar="[SCAN_ID|SHA256]")
@click.option("--reason", help="Every failed scan with this reason code (e.g. unroutable, contract_mismatch).")
@click.option("--all-failed", is_flag=True, help="Every failed scan not yet retried whose file was kept.")
@click.option(
    "--again",
    is_flag=True,
    help="With --reason or --all-failed: also the scans whose file already failed the same way after a "
    "retry (left alone otherwise, so that a schedule does not send a corrupt file back at every run).",
)
@click.option(
    "--watch",
    type=click.Path(path_type=Path, file_okay=False),
    help="The inbox to send the files back to (default: the configured watch folder).",
)
@click.option("--dry-run", is_flag=True, help="Say what would be sent back; move and record nothing.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@handle_errors
def retry(
    config_file: Path | None,
    scan: str | None,
    reason: str | None,
    all_failed: bool,
    again: bool,
    dry_run: bool,
    as_json: bool,
    **flags: object,
) -> None:
    """Send failed scans back through the inbox, once their cause is fixed (a default task set, a
    model promoted...). Each kept original leaves failed/ for the watch folder, under the name (and
    task folder) it arrived with; the failed scan keeps its history, and the daemon records a new
    attempt. Exit 0 when everything selected was sent back, 2 when something was refused. With
    --reason or --all-failed, scans whose kept original no retry can send back (a link, gone, no
    regular file, or changed by hand), scans another retry sent back meanwhile, and scans whose
    file already failed the same way after a retry (unless --again) are left alone, each named,
    and do not make the exit code 2."""
    from meddaemon.daemon.retry import Selector, retry_failed

    if again and (reason is None and not all_failed):
        raise click.UsageError("--again goes with --reason or --all-failed: a scan named is sent back whatever it did")
    try:
        selector = Selector(scan, reason, all_failed, again)
    except ValueError:  # said in the options' names, not the library's
        raise click.UsageError("give exactly one of SCAN (an id or a SHA-256), --reason CODE or --all-failed") from None
    settings = build_settings(config_file, **{k: v for k, v in flags.items() if v is not None})
    engine = open_database(settings)
    try:
        result = retry_failed(session_factory(engine), settings, selector, dry_run=dry_run)
    finally:
        engine.dispose()
    if as_json:
        echo_json(result.as_dict())
    else:
        verb = "would send back" if dry_run else "sent back"
        for r in result.requeued:
            click.echo(f"scan {r.scan_id} ({r.failure_reason}): {verb} as {shown_name(r.inbox_path)}")
            if r.left_in_failed:
                click.echo(f"warning: {escape_controls(r.left_in_failed)}; the next retry removes it", err=True)
        for refused in result.refused:
            click.echo(f"refused ({refused.code.value}): {escape_controls(refused.message)}", err=True)
        for alone in result.left_alone:
            click.echo(f"left alone ({alone.code.value}): {escape_controls(alone.message)}", err=True)
        if result.without_original:
            click.echo(f"{result.without_original} failed scans kept no file (vanished) and are left alone")
        if not result.requeued and not result.refused and not result.left_alone:
            click.echo("no failed scans to retry")
    sys.exit(EXIT_OK if result.ok else EXIT_USAGE)
