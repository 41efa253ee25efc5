"""``medcli models``: the model registry (import, list, show, promote, retire).

Thin: each command parses, calls ``meddaemon.engine.registry`` in one transaction, and prints.
A refused model exits 1 with its reason code and message; a database problem exits 3.
The registry (and torch with it) is imported only when a ``models`` command runs, so the rest of
``medcli`` starts fast.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any, TypeVar

import click
from sqlalchemy.orm import Session

from meddaemon.cli.common import EXIT_FAILURE, build_settings, echo_json, handle_errors, settings_options
from meddaemon.config import Settings
from meddaemon.db.engine import create_db_engine, session_factory, transaction
from meddaemon.db.migrate import upgrade

T = TypeVar("T")

json_option = click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")


@click.group()
def models() -> None:
    """The model registry: versions of each task's model, and which one is active."""


def _registry() -> ModuleType:
    from meddaemon.engine import registry

    return registry


def _in_transaction(settings: Settings, work: Callable[[Session], T]) -> T:
    registry = _registry()
    engine = create_db_engine(settings.db_url, settings.busy_timeout)
    try:
        upgrade(engine)
        try:
            with transaction(session_factory(engine)) as session:
                return work(session)
        except registry.ModelRefused as exc:
            click.echo(f"refused ({exc.reason}): {exc.message}", err=True)
            sys.exit(EXIT_FAILURE)
        except registry.RegistryError as exc:
            click.echo(f"error ({exc.reason}): {exc.message}", err=True)
            sys.exit(EXIT_FAILURE)
    finally:
        engine.dispose()


def _line(s: dict[str, Any]) -> str:
    return (
        f"{s['task']:<15} {s['version']:<20} {s['status']:<10} {s['architecture']:<17} {s['sha256'][:12]}  {s['path']}"
    )


@models.command("list")
@settings_options
@click.option("--task", help="Only this task's versions.")
@json_option
@handle_errors
def list_cmd(config_file: Path | None, task: str | None, as_json: bool, **flags: object) -> None:
    """Every registered version: task, version, status, architecture, SHA-256, folder."""
    settings = build_settings(config_file, **flags)
    registry = _registry()
    rows = _in_transaction(settings, lambda s: [registry.version_summary(r) for r in registry.list_versions(s, task)])
    if as_json:
        echo_json(rows)
        return
    if not rows:
        click.echo("no model versions registered" + (f" for task {task}" if task else ""))
    for r in rows:
        click.echo(_line(r))


@models.command("show")
@settings_options
@click.argument("task")
@click.argument("version")
@json_option
@handle_errors
def show_cmd(config_file: Path | None, task: str, version: str, as_json: bool, **flags: object) -> None:
    """One version: its registry entry and its manifest."""
    settings = build_settings(config_file, **flags)
    registry = _registry()

    def work(session: Session) -> dict[str, Any]:
        row = registry.get_version(session, task, version)
        return {**registry.version_summary(row), "manifest": row.manifest}

    data = _in_transaction(settings, work)
    if as_json:
        echo_json(data)
        return
    manifest = data.pop("manifest")
    for key, value in data.items():
        click.echo(f"{key:<26} {value if value is not None else '-'}")
    click.echo("manifest:")
    for key in sorted(manifest):
        value = manifest[key]
        if key == "self_test":
            value = {k: v for k, v in value.items() if k != "expected_probabilities"}
        click.echo(f"  {key:<24} {value}")


@models.command("import")
@settings_options
@click.argument("folder", type=click.Path(path_type=Path, exists=True))
@json_option
@handle_errors
def import_cmd(config_file: Path | None, folder: Path, as_json: bool, **flags: object) -> None:
    """Verify FOLDER (model.safetensors + manifest.json) and register a copy of it.

    The SHA-256, the architecture and the self-test are checked first; a refused model is not
    registered (exit 1, with the reason). The new version is 'registered': promote it to serve it.
    """
    settings = build_settings(config_file, **flags)
    registry = _registry()
    data = _in_transaction(
        settings,
        lambda s: registry.version_summary(
            registry.import_version(s, folder, settings.models_dir, tasks=settings.task_specs)
        ),
    )
    if as_json:
        echo_json(data)
        return
    click.echo(
        f"registered {data['task']}/{data['version']} ({data['architecture']}, "
        f"sha256 {data['sha256'][:12]}) in {data['path']}"
    )


@models.command("promote")
@settings_options
@click.argument("task")
@click.argument("version")
@json_option
@handle_errors
def promote_cmd(config_file: Path | None, task: str, version: str, as_json: bool, **flags: object) -> None:
    """Make VERSION the active model of TASK (re-verified first); the previous one goes back to registered."""
    settings = build_settings(config_file, **flags)
    registry = _registry()

    def work(session: Session) -> dict[str, Any]:
        before = registry.active_versions(session).get(task)
        previous = before.version if before is not None and before.version != version else None
        return {**registry.version_summary(registry.promote(session, task, version)), "previous_active": previous}

    data = _in_transaction(settings, work)
    if as_json:
        echo_json(data)
        return
    was = f" (was {data['previous_active']}, now registered)" if data["previous_active"] else ""
    click.echo(f"{task}/{version} is active{was}")


@models.command("retire")
@settings_options
@click.argument("task")
@click.argument("version")
@json_option
@handle_errors
def retire_cmd(config_file: Path | None, task: str, version: str, as_json: bool, **flags: object) -> None:
    """Take VERSION of TASK out of service for good (its files and results stay)."""
    settings = build_settings(config_file, **flags)
    registry = _registry()

    def work(session: Session) -> dict[str, Any]:
        was_active = registry.get_version(session, task, version).status == "active"
        return {**registry.version_summary(registry.retire(session, task, version)), "was_active": was_active}

    data = _in_transaction(settings, work)
    if as_json:
        echo_json(data)
        return
    note = f"; task {task} has no active model now" if data["was_active"] else ""
    click.echo(f"{task}/{version} is retired{note}")
