"""``medcli``: the tools around the daemon (scans, the database; training and audits grow here)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import click
from sqlalchemy import select

from meddaemon import __version__
from meddaemon.cli.audit import audit
from meddaemon.cli.common import (
    build_settings,
    echo_json,
    handle_errors,
    open_database,
    run_group,
    settings_options,
)
from meddaemon.cli.dataset import dataset
from meddaemon.cli.evaluate import evaluate
from meddaemon.cli.models import models
from meddaemon.cli.outbox import outbox
from meddaemon.cli.report import report
from meddaemon.cli.retrain import retrain
from meddaemon.cli.retry import retry
from meddaemon.cli.synth import synth
from meddaemon.config import prepare_state_dir
from meddaemon.db.engine import create_db_engine, session_factory
from meddaemon.db.migrate import head_revision, upgrade
from meddaemon.db.models import Scan
from meddaemon.names import shown_name
from meddaemon.states import PERSISTED


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="medcli")
def cli() -> None:
    """Tools for the scans, models and database of a meddaemon installation."""


@cli.group()
def db() -> None:
    """The database schema."""


@db.command("upgrade")
@settings_options
@handle_errors
def db_upgrade(config_file: Path | None, **flags: object) -> None:
    """Create the schema or bring it to the latest revision (the daemon also does this at start)."""
    settings = build_settings(config_file, **flags)
    if not settings.db:  # the database in the state folder: one it cannot keep its state in is exit 2, as `start`
        prepare_state_dir(settings)
    engine = create_db_engine(settings.db_url, settings.busy_timeout)
    before = upgrade(engine)
    click.echo(f"schema at revision {head_revision()} (was {before or 'empty'})")


@cli.command()
@settings_options
@click.option("--state", type=click.Choice(sorted(s.value for s in PERSISTED)), help="Only scans in this state.")
@click.option(
    "--limit", type=click.IntRange(min=1), default=50, show_default=True, help="Show at most N scans, newest first."
)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@handle_errors
def scans(config_file: Path | None, state: str | None, limit: int, as_json: bool, **flags: object) -> None:
    """List the latest scans: id, state, task, reason, name as received (no patient data), and for
    scans received over DICOM the sender (calling AE @ address) and, when an instance was received
    with different contents, which version of it the scan is. A failure `medcli retry` sent back
    says "(retried)": its new attempt is a scan of its own."""
    from meddaemon.dicom.provenance import provenance

    settings = build_settings(config_file, **flags)
    engine = open_database(settings, read_only=True)
    query = select(Scan).order_by(Scan.id.desc()).limit(limit)
    if state:
        query = query.where(Scan.state == state)
    try:
        with session_factory(engine)() as session:
            found = list(session.scalars(query))
            senders = provenance(session, [s.sha256 for s in found if s.sha256])
            rows = [
                {
                    "id": s.id,
                    "state": s.state,
                    "task": s.task_name,
                    "reason": s.failure_reason,
                    "source_name": s.source_name,
                    "sha256": s.sha256,
                    "modality": s.modality,
                    "format": s.format,
                    "registered_at": s.registered_at,
                    "stored_path": str(settings.stored_file(s.stored_path)) if s.stored_path else None,
                    "received": senders[s.sha256].as_dict() if s.sha256 in senders else None,
                    # a failure sent back by `medcli retry`: its new attempt is a scan of its own
                    "retried_at": s.retried_at,
                }
                for s in found
            ]
    finally:
        engine.dispose()
    if as_json:
        echo_json(rows)
        return
    for r in rows:
        sender = f"  {senders[r['sha256']].describe()}" if r["sha256"] in senders else ""
        name = shown_name(r["source_name"])
        line = f"{r['id']:>6}  {r['state']:<14} {r['task'] or '-':<15} {r['reason'] or '':<24} {name}"
        click.echo(line + sender + ("  (retried)" if r["retried_at"] else ""))


@cli.command()
@settings_options
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output (every field of every task).")
@handle_errors
def tasks(config_file: Path | None, as_json: bool, **flags: object) -> None:
    """The tasks: the five seed presets (on four datasets) and the custom tasks of the config."""
    settings = build_settings(config_file, **flags)
    specs = settings.task_specs
    if as_json:
        echo_json({name: dataclasses.asdict(spec) for name, spec in specs.items()})
        return
    for spec in specs.values():
        c = spec.contract
        click.echo(
            f"{spec.name:<15} {spec.kind:<10} {len(spec.labels):>2} labels  {spec.architecture:<17} "
            f"{c.channels}x{c.height}x{c.width}  {spec.description}"
        )


@cli.command("decoders")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@handle_errors
def decoders(as_json: bool) -> None:
    """Which DICOM transfer syntaxes this installation can decode, and with which plugin."""
    from meddaemon.engine.decode import decodable_transfer_syntaxes

    support = decodable_transfer_syntaxes()
    if as_json:
        echo_json(
            [{"uid": s.uid, "name": s.name, "decodable": s.decodable, "plugins": list(s.plugins)} for s in support]
        )
        return
    for s in support:
        click.echo(f"{'yes' if s.decodable else 'no ':<4} {s.name:<50} {', '.join(s.plugins)}")


cli.add_command(models)
cli.add_command(synth)
cli.add_command(dataset)
cli.add_command(audit)
cli.add_command(report)
cli.add_command(retrain)
cli.add_command(retry)
cli.add_command(outbox)
cli.add_command(evaluate)


def main() -> None:
    run_group(cli, "medcli")


if __name__ == "__main__":
    main()
