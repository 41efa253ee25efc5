"""``meddaemon web``: the web console over the daemon's database (the work is in ``meddaemon.web``)."""

from __future__ import annotations

import sys
from pathlib import Path

import click
from sqlalchemy.exc import OperationalError

from meddaemon.cli.common import EXIT_OK, EXIT_USAGE, build_settings, handle_errors, open_database, settings_options
from meddaemon.db.engine import is_sqlite
from meddaemon.logs import setup_logging


@click.command()
@settings_options
@click.option(
    "--host", help="Address to listen on (default: web_host, 127.0.0.1). Beyond loopback, sign-in is required."
)
@click.option(
    "--port", type=click.IntRange(0, 65535), help="Port to listen on (default: web_port, else 8080; 0: any free one)."
)
@click.option(
    "--watch",
    type=click.Path(path_type=Path, file_okay=False),
    help="The inbox Retry sends failed scans back to (default: the configured watch folder).",
)
@click.option("--hash-password", is_flag=True, help="Read a password (prompted, or stdin) and print its password_hash.")
@handle_errors
def web(config_file: Path | None, host: str | None, port: int | None, hash_password: bool, **flags: object) -> None:
    """Serve the web console: overview, worklist, scans with their heatmaps, failures, models, audits.

    Pages read the database without writing; Retry, Promote and Retire (admins only) do what
    `medcli retry` and `medcli models promote/retire` do, and are recorded in web_actions.
    """
    if hash_password:
        from meddaemon.web.auth import hash_password as make_hash

        password = click.prompt("Password", hide_input=True, confirmation_prompt=True) if sys.stdin.isatty() else (
            sys.stdin.readline().rstrip("\n"))  # fmt: skip
        if not password:
            click.echo("error: an empty password", err=True)
            sys.exit(EXIT_USAGE)
        click.echo(make_hash(password))
        sys.exit(EXIT_OK)
    from meddaemon.web.auth import AuthError, AuthPolicy
    from meddaemon.web.server import serve

    settings = build_settings(config_file, **{k: v for k, v in flags.items() if v is not None})
    setup_logging(settings.log_level)
    host = host or settings.web_host
    port = port if port is not None else (settings.web_port or 8080)
    try:
        AuthPolicy.from_settings(settings, host)
    except AuthError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(EXIT_USAGE)
    # none where the settings point, or another schema: exit 3, as for every other command; a server
    # that does not answer for now (restarting, not up yet at boot) gets the 503 page that reloads.
    # Read only, as the pages read: a writer's lock (a daemon in a batch) does not hide the schema
    try:
        open_database(settings, read_only=True).dispose()
    except OperationalError as exc:
        # the server answered (no such database, a login refused): psycopg says so only in its words
        answered = getattr(exc.orig, "sqlstate", None) is not None or "FATAL:" in str(exc.orig)
        if answered or is_sqlite(settings.db_url):
            raise
    serve(settings, host, port)
    sys.exit(EXIT_OK)
