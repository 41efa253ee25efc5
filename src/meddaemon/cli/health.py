"""``meddaemon health``: exit 0 when healthy, 1 when degraded, 2 when down (for probes and timers)."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from meddaemon.cli.common import build_settings, echo_json, handle_errors, settings_options
from meddaemon.daemon.health import HealthLimits, check_health, this_node
from meddaemon.db.readonly import OBSERVER_STATEMENT_SECONDS, read_only_engine

_MARKS = {"ok": "ok", "degraded": "DEGRADED", "down": "DOWN"}


@click.command()
@settings_options
@click.option("--node", help="Require a live daemon on this node (its `node` setting, else its host name).")
@click.option(
    "--this-node",
    "this_node_flag",
    is_flag=True,
    help="Require a live daemon on this machine (as a daemon here would name it).",
)
@click.option(
    "--stuck-minutes",
    type=click.FloatRange(min=0),
    default=10.0,
    show_default=True,
    help="A scan waiting for inference, its report or its active model, a file move held back, or a DICOM "
    "output waiting, longer than this while daemons run: degraded.",
)
@click.option(
    "--min-free-mb",
    type=click.IntRange(min=0),
    default=1024,
    show_default=True,
    help="Free space on the state directory's file system below this is degraded.",
)
@click.option(
    "--failure-window-minutes",
    type=click.FloatRange(min=0, min_open=True),
    default=15.0,
    show_default=True,
    help="Window over which the failure rate is measured.",
)
@click.option(
    "--max-failure-fraction",
    type=click.FloatRange(0, 1),
    default=0.5,
    show_default=True,
    help="Failed fraction of the scans registered in the window above which health is degraded.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@handle_errors
def health(
    config_file: Path | None,
    node: str | None,
    this_node_flag: bool,
    stuck_minutes: float,
    min_free_mb: int,
    failure_window_minutes: float,
    max_failure_fraction: float,
    as_json: bool,
    **flags: object,
) -> None:
    """Check the database, the daemons' heartbeats, the queue, failures, the DICOM outbox, file
    moves, the DICOM receiver (a C-ECHO, when dicom_port is set), the watch folder and disk space;
    writes nothing.

    Exit code 0: healthy; 1: degraded (a daemon past its lease or, on this node, whose process is
    gone, a daemon lost lately, a stuck queue or an active model no daemon serves, many failures,
    DICOM outputs stuck or gone dead lately, file moves held back, the watch folder gone, low disk,
    a schema behind, a DICOM receiver refusing every instance for want of disk); 2: down (database
    unreachable, another application's or newer than this meddaemon, no daemon alive, or the DICOM
    receiver does not answer) or bad usage.
    """
    settings = build_settings(config_file, **flags)
    if this_node_flag:
        node = node or this_node(settings)
    limits = HealthLimits(
        node=node,
        stuck_seconds=stuck_minutes * 60,
        min_free_bytes=min_free_mb * 1024**2,
        failure_window_seconds=failure_window_minutes * 60,
        max_failure_fraction=max_failure_fraction,
    )
    engine = read_only_engine(settings.db_url, settings.busy_timeout, statement_timeout=OBSERVER_STATEMENT_SECONDS)
    try:
        report = check_health(engine, settings, limits)
    finally:
        engine.dispose()
    if as_json:
        echo_json(report.as_dict())
    else:
        for check in report.checks:
            click.echo(f"{_MARKS[check.status]:<9} {check.name:<13} {check.message}")
        click.echo(f"health: {report.status}")
    sys.exit(report.exit_code)
