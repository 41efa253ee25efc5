"""``medcli outbox``: the DICOM objects waiting for, given up on, or past delivery (``dicom/outbox.py``)."""

from __future__ import annotations

import contextlib
from datetime import UTC, datetime
from pathlib import Path

import click

from meddaemon.cli.common import build_settings, echo_json, handle_errors, open_database, settings_options
from meddaemon.db.engine import session_factory, transaction
from meddaemon.names import escape_controls


def _utc(epoch: float | None) -> str | None:
    """An outbox time (seconds since the epoch, by the database's clock) as ISO 8601 in UTC."""
    return None if epoch is None else datetime.fromtimestamp(epoch, UTC).isoformat()


@click.group()
def outbox() -> None:
    """The DICOM outputs queued for their destinations: list, retry the dead, purge the done."""


@outbox.command("list")
@settings_options
@click.option("--status", type=click.Choice(["pending", "delivered", "dead"]), help="Only items in this status.")
@click.option(
    "--limit", type=click.IntRange(min=1), default=50, show_default=True, help="Show at most N items, newest first."
)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@handle_errors
def list_(config_file: Path | None, status: str | None, limit: int, as_json: bool, **flags: object) -> None:
    """The latest items (no patient data) and the queue: counts per status, the oldest pending
    (waiting since it was queued or last retried)."""
    from meddaemon.dicom import outbox as box

    settings = build_settings(config_file, **flags)
    engine = open_database(settings, read_only=True)
    try:
        with session_factory(engine)() as session:
            rows = [
                {
                    "id": i.id,
                    "scan_id": i.scan_id,
                    "object": i.object_key,
                    "destination": i.destination,
                    "status": i.status,
                    "attempts": i.attempts,
                    "last_error": i.last_error,
                    "sop_instance_uid": i.sop_instance_uid,
                    "created_at": _utc(i.created_at),
                    "pending_since": _utc(i.pending_since or i.created_at) if i.status == box.PENDING else None,
                    "next_attempt_at": _utc(i.next_attempt_at) if i.status == box.PENDING else None,
                    "delivered_at": _utc(i.delivered_at),
                }
                for i in box.list_items(session, status, limit)
            ]
            queue = box.summary(session)
    finally:
        engine.dispose()
    if as_json:
        echo_json({"items": rows, "queue": queue.as_dict()})
        return
    for r in rows:
        error = f"  {escape_controls(r['last_error'])}" if r["last_error"] else ""  # the peer's own text
        click.echo(
            f"{r['id']:>6}  scan {r['scan_id']:<6} {r['object']:<24} -> {r['destination']:<12} "
            f"{r['status']:<9} {r['attempts']} attempt(s){error}"
        )
    oldest = queue.oldest_pending_seconds
    click.echo(
        ", ".join(f"{n} {s}" for s, n in queue.counts.items())
        + (f"; oldest pending waits {oldest:.0f} s" if oldest is not None else "")
    )


@outbox.command()
@settings_options
@click.argument("ids", nargs=-1, type=int)
@click.option("--all-dead", is_flag=True, help="Every dead item (whose object was written).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@handle_errors
def retry(config_file: Path | None, ids: tuple[int, ...], all_dead: bool, as_json: bool, **flags: object) -> None:
    """Dead items pending again, due now, their attempts counted afresh (the daemon sends them)."""
    from meddaemon.dicom import outbox as box

    if not ids and not all_dead:
        raise click.UsageError("name item ids or --all-dead")
    settings = build_settings(config_file, **flags)
    engine = open_database(settings)
    try:
        with transaction(session_factory(engine)) as session:
            unknown = box.unknown_items(session, ids)
            if unknown:  # nothing is retried: a mistyped id said "0 item(s) pending again", exit 0
                raise click.BadParameter(
                    f"no outbox item {', '.join(map(str, unknown))} (medcli outbox list shows them)", param_hint="IDS"
                )
            left = box.left_as_they_are(session, ids)
            count = box.retry(session, ids, all_dead)
            waiting = box.pending_unconfigured(session, [d.name for d in settings.destination])
    finally:
        engine.dispose()
    if as_json:
        left_alone = [{"id": item_id, "why": why} for item_id, why in left]
        echo_json({"pending_again": count, "left_alone": left_alone, "pending_unconfigured": waiting})
        return
    for item_id, why in left:
        click.echo(f"item {item_id} {escape_controls(why)}: left as it is")
    click.echo(f"{count} item(s) pending again")
    for name, pending in waiting.items():
        click.echo(
            f"{pending} item(s) pending for destination {escape_controls(repr(name))}, which this configuration does "
            "not name: only a daemon configuring it sends them (their scans are archived once they are sent or dead)"
        )


@outbox.command()
@settings_options
@click.option(
    "--status",
    "statuses",
    type=click.Choice(["delivered", "dead"]),
    multiple=True,
    default=("delivered",),
    show_default=True,
    help="Purge items in this status (repeatable); pending items are never purged.",
)
@click.option(
    "--older-than-days",
    type=click.FloatRange(min=0),
    default=0.0,
    show_default=True,
    help="Only items created more than N days ago (0: all of them).",
)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@handle_errors
def purge(
    config_file: Path | None, statuses: tuple[str, ...], older_than_days: float, as_json: bool, **flags: object
) -> None:
    """Forget delivered (or dead) items and remove their object files; pending ones are never purged."""
    from meddaemon.dicom import outbox as box

    settings = build_settings(config_file, **flags)
    engine = open_database(settings)
    try:
        with transaction(session_factory(engine)) as session:
            purged = box.purge(session, statuses, older_than_days * 86400.0)
    finally:
        engine.dispose()
    for stored in purged.unreferenced:
        with contextlib.suppress(FileNotFoundError):
            settings.stored_file(stored).unlink()
    if as_json:
        echo_json({"purged": purged.items, "statuses": list(statuses), "files_removed": len(purged.unreferenced)})
        return
    click.echo(
        f"purged {purged.items} item(s) ({', '.join(statuses)}); {len(purged.unreferenced)} object file(s) removed"
    )
