"""``medcli models``: the model registry (import, list, show, promote, retire).

Thin: each command parses, calls ``meddaemon.engine.registry`` in one transaction, and prints.
A refused model exits 1 with its reason code and message, an unknown version 2, a database problem 3.
The registry (and torch with it) is imported only when a ``models`` command runs, so the rest of
``medcli`` starts fast.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping
from datetime import datetime
from pathlib import Path
from types import ModuleType
from typing import Any, TypeVar

import click
from sqlalchemy.orm import Session, sessionmaker

from meddaemon.cli.common import (
    EXIT_FAILURE,
    EXIT_USAGE,
    build_settings,
    echo_json,
    handle_errors,
    json_value,
    open_database,
    settings_options,
)
from meddaemon.config import Settings
from meddaemon.db.engine import session_factory, transaction

T = TypeVar("T")

json_option = click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")


@click.group()
def models() -> None:
    """The model registry: versions of each task's model, and which one is active."""


#: what is bad usage (exit 2) wherever a command names it: a version that is not there
USAGE_REASONS = frozenset({"unknown_version"})
#: and for a model FILE, whose task, labels and version name are the command's own arguments (a version
#: folder's are its manifest's: refused, exit 1)
FILE_USAGE_REASONS = USAGE_REASONS | {"unknown_task", "task_mismatch", "duplicate_version", "bad_option"}


def _registry() -> ModuleType:
    from meddaemon.engine import registry

    return registry


def _in_transaction(
    settings: Settings,
    work: Callable[[Session], T],
    usage: frozenset[str] = USAGE_REASONS,
    hints: Mapping[str, str] | None = None,
) -> T:
    """``work`` in one transaction; a refusal or registry error exits 2 when its reason is in ``usage``,
    else 1, its message followed by what to do where ``hints`` says it for its reason."""

    def in_one(sessions: sessionmaker[Session]) -> T:
        with transaction(sessions) as session:
            return work(session)

    return _in_sessions(settings, in_one, usage, hints)


def _in_sessions(
    settings: Settings,
    work: Callable[[sessionmaker[Session]], T],
    usage: frozenset[str] = USAGE_REASONS,
    hints: Mapping[str, str] | None = None,
    read_only: bool = False,
) -> T:
    """``work`` given the database's sessions, to open and close as it needs; errors as :func:`_in_transaction`."""
    registry = _registry()
    engine = open_database(settings, read_only=read_only)
    try:
        try:
            return work(session_factory(engine))
        except registry.ModelRefused as exc:
            click.echo(f"refused ({exc.reason}): {exc.message}", err=True)
            sys.exit(EXIT_USAGE if exc.reason in usage else EXIT_FAILURE)
        except registry.RegistryError as exc:
            hint = (hints or {}).get(exc.reason)
            click.echo(f"error ({exc.reason}): {exc.message}" + (f"; {hint}" if hint else ""), err=True)
            sys.exit(EXIT_USAGE if exc.reason in usage else EXIT_FAILURE)
    finally:
        engine.dispose()


def _line(s: dict[str, Any]) -> str:
    line = f"{s['task']:<15} {s['version']:<20} {s['status']:<10} {s['architecture']:<17} {s['sha256'][:12]}"
    line += f"  {s['path']}"
    return line + (f"\n{'':<15} refused by a daemon: {s['refusal']}" if s.get("refusal") else "")


@models.command("list")
@settings_options
@click.option("--task", help="Only this task's versions.")
@json_option
@handle_errors
def list_cmd(config_file: Path | None, task: str | None, as_json: bool, **flags: object) -> None:
    """Every registered version: task, version, status, architecture, SHA-256, folder."""
    settings = build_settings(config_file, **flags)
    registry = _registry()

    def summaries(session: Session) -> list[dict[str, Any]]:
        return [registry.version_summary(r, settings.state_dir) for r in registry.list_versions(session, task)]

    rows = _in_transaction(settings, summaries)
    if task is not None and task not in settings.task_specs and not rows:  # a task the config left has versions still
        raise click.BadParameter(
            f"unknown task {task!r}; known: {', '.join(sorted(settings.task_specs))}", param_hint="--task"
        )
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
        return {**registry.version_summary(row, settings.state_dir), "manifest": row.manifest}

    data = _in_transaction(settings, work)
    data["backend"] = _backend(data["manifest"], settings)
    if as_json:
        echo_json(data)
        return
    manifest = data.pop("manifest")
    for key, value in data.items():
        shown = json_value(value) if isinstance(value, datetime) else value  # in UTC, saying so, on every database
        click.echo(f"{key:<26} {shown if shown is not None else '-'}")
    note = _heatmap_note(manifest)
    if note:
        click.echo(note)
    click.echo("manifest:")
    for key in sorted(manifest):
        value = manifest[key]
        if key == "self_test":
            value = {k: v for k, v in value.items() if k != "expected_probabilities"}
        if key == "backend" and manifest.get("architecture") == "onnx":
            value = data["backend"]
        click.echo(f"  {key:<24} {value}")


def _backend(manifest: dict[str, Any], settings: Settings) -> str:
    """What runs the version here: ONNX Runtime and its providers for an imported ONNX graph (on the
    configured device), else the manifest's backend (auto: the faster of eager PyTorch and ONNX Runtime)."""
    if manifest.get("architecture") != "onnx":
        return str(manifest.get("backend", "auto"))
    from meddaemon.engine.importers.onnx_model import served_backend
    from meddaemon.engine.inference import pick_device

    return served_backend(pick_device(settings.device))


def _floats(text: str | None) -> tuple[float, ...] | None:
    if text is None:
        return None
    try:
        return tuple(float(x) for x in text.split(","))
    except ValueError:
        raise click.BadParameter(f"{text!r} is not a comma-separated list of numbers") from None


def _thresholds(values: tuple[str, ...]) -> dict[str, float] | None:
    out: dict[str, float] = {}
    for value in values:
        label, sep, number = value.partition("=")
        try:
            out[label] = float(number)
        except ValueError:
            sep = ""
        if not sep or not label:
            raise click.BadParameter(f"{value!r} is not LABEL=PROBABILITY", param_hint="--threshold")
    return out or None


@models.command("import")
@settings_options
@click.argument("path", type=click.Path(path_type=Path, exists=True))
@click.option("--task", help="The task the model is for (a FILE only; a folder's manifest names it).")
@click.option("--arch", "architecture", help="The network in the file (default: the task's).")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["auto", "torch", "safetensors", "keras-h5", "onnx"]),
    default="auto",
    show_default=True,
    help="The file's format (auto: told by its first bytes, else by its suffix).",
)
@click.option("--version", "version", help="Version name (default: the file's name and SHA-256 prefix).")
@click.option("--labels", help="The file's outputs in order, comma-separated, when not the task's order.")
@click.option("--image-size", type=int, help="Input height and width in pixels (8 to 1024).")
@click.option("--channels", type=click.Choice(["1", "3"]), help="Input channels (default: the task's).")
@click.option("--mean", help="Per-channel normalisation mean, comma-separated.")
@click.option("--std", help="Per-channel normalisation std, comma-separated.")
@click.option(
    "--resize-then-crop/--stretch",
    "resize_then_crop",
    default=None,
    help="Resize the shorter side then centre-crop, or stretch to the size (default: the task's).",
)
@click.option(
    "--per-image-normalisation/--fixed-normalisation",
    "per_image",
    default=None,
    help="Normalise each image by its own mean and std (Keras samplewise), or by --mean/--std.",
)
@click.option(
    "--outputs",
    type=click.Choice(["logits", "probabilities"]),
    default="logits",
    show_default=True,
    help="What the model's outputs are: probabilities when it ends in Softmax or Sigmoid (needed then).",
)
@click.option("--threshold", "thresholds", multiple=True, help="LABEL=PROBABILITY (repeatable; default 0.5).")
@click.option("--cam-tensor", help="ONNX: the last feature map, for CAM heatmaps.")
@json_option
@handle_errors
def import_cmd(
    config_file: Path | None,
    path: Path,
    task: str | None,
    architecture: str | None,
    fmt: str,
    version: str | None,
    labels: str | None,
    image_size: int | None,
    channels: str | None,
    mean: str | None,
    std: str | None,
    resize_then_crop: bool | None,
    per_image: bool | None,
    outputs: str,
    thresholds: tuple[str, ...],
    cam_tensor: str | None,
    as_json: bool,
    **flags: object,
) -> None:
    """Verify a model and register a copy of it.

    PATH is a meddaemon version folder (model.safetensors + manifest.json), or a trained model FILE
    to convert: a PyTorch state dict (.pt/.pth, or .safetensors), Keras weights (.h5, .weights.h5,
    .keras) or an ONNX graph (its weights beside it, if so), with --task. The SHA-256, the architecture and the
    self-test are checked first; a refused model is not registered (exit 1, with the reason; 2 when
    the reason is a FILE's --task, --labels, --version or --threshold). The new version is 'registered': promote
    it to serve it.
    """
    settings = build_settings(config_file, **flags)
    registry = _registry()
    if path.is_dir():
        file_options = {
            "--task": task, "--arch": architecture, "--version": version, "--labels": labels,
            "--image-size": image_size, "--channels": channels, "--mean": mean, "--std": std,
            "--resize-then-crop/--stretch": resize_then_crop, "--per-image-normalisation": per_image,
            "--threshold": thresholds or None, "--cam-tensor": cam_tensor,
            "--format": None if fmt == "auto" else fmt, "--outputs": None if outputs == "logits" else outputs,
        }  # fmt: skip
        given = [name for name, value in file_options.items() if value is not None]
        if given:
            raise click.UsageError(
                f"{', '.join(given)} {'applies' if len(given) == 1 else 'apply'} to a model FILE; the version folder "
                f"{path} carries its own manifest"
            )

        def work(session: Session) -> Any:
            return registry.import_version(
                session, path, settings.models_dir, tasks=settings.task_specs, state_dir=settings.state_dir
            )

        usage = USAGE_REASONS
        hints = {
            "duplicate_version": "the folder's manifest names that version: to register it as another, copy the "
            'folder, set a new "version" in the copy\'s manifest.json (its sha256 is of the weights alone) and '
            "import the copy"
        }

    else:
        if task is None:
            raise click.UsageError("importing a model file needs --task (the folder of a version names its own)")
        from meddaemon.engine import importers

        options = importers.ImportOptions(
            task=task,
            architecture=architecture,
            format=fmt,
            version=version,
            labels=tuple(x.strip() for x in labels.split(",")) if labels else None,
            image_size=image_size,
            channels=int(channels) if channels else None,
            mean=_floats(mean),
            std=_floats(std),
            resize_then_crop=resize_then_crop,
            per_image_normalisation=per_image,
            outputs=outputs,
            thresholds=_thresholds(thresholds),
            cam_tensor=cam_tensor,
        )

        def work(session: Session) -> Any:
            return importers.import_file(
                session, path, options, settings.models_dir, tasks=settings.task_specs, state_dir=settings.state_dir
            )

        usage = FILE_USAGE_REASONS
        hints = {"duplicate_version": "give it another --version"}

    def summary(session: Session) -> dict[str, Any]:
        row = work(session)
        return {**registry.version_summary(row, settings.state_dir), "manifest": row.manifest}

    data = _in_transaction(settings, summary, usage, hints)
    manifest = data.pop("manifest")
    if as_json:
        echo_json({**data, "provenance": manifest.get("provenance", {}), "heatmaps": manifest.get("heatmaps", True)})
        return
    click.echo(
        f"registered {data['task']}/{data['version']} ({data['architecture']}, "
        f"sha256 {data['sha256'][:12]}) in {data['path']}"
    )
    note = _heatmap_note(manifest)
    if note:
        click.echo(note)


def _heatmap_note(manifest: dict[str, Any]) -> str | None:
    """A sentence when the version makes no heatmaps, so nobody looks for a map that never comes."""
    if manifest.get("heatmaps", True):
        return None
    if manifest.get("architecture") == "onnx":
        provenance = manifest.get("provenance") or {}
        if provenance.get("cam_tensor"):  # given, and found wanting: say why
            why = str(provenance.get("heatmaps", "")).removeprefix("none: ")
            return (
                f"heatmaps: none - --cam-tensor {provenance['cam_tensor']} gave no CAM: {why}; its results and "
                "reports have no heatmap"
            )
        return (
            "heatmaps: none - this ONNX model exposes no feature map for CAM (import it with --cam-tensor "
            "naming the last feature map before global pooling); its results and reports have no heatmap"
        )
    return "heatmaps: disabled for this version; its results and reports have no heatmap"


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
    verified = _in_sessions(
        settings,
        lambda sessions: registry.verify_registered_copy(
            sessions, task, version, settings.state_dir, settings.task_specs
        ),
        read_only=True,  # a writer's BEGIN IMMEDIATE would wait for (or fail on) a daemon's lock
    )

    def work(session: Session) -> dict[str, Any]:
        registry.lock_task(session, task)  # the version active now is the one this promotion demotes
        before = registry.active_versions(session).get(task)
        previous = before.version if before is not None and before.version != version else None
        refused = registry.get_version(session, task, version).refusal
        promoted = registry.promote(session, task, version, verified=verified)
        summary = registry.version_summary(promoted, settings.state_dir)
        return {**summary, "previous_active": previous, "cleared_refusal": refused}

    data = _in_transaction(settings, work)
    if as_json:
        echo_json(data)
        return
    was = f" (was {data['previous_active']}, now registered)" if data["previous_active"] else ""
    click.echo(f"{task}/{version} is active{was}")
    if data["cleared_refusal"] is not None:
        click.echo(f"a daemon's refusal of it ({data['cleared_refusal']}) is cleared: they try it again")


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
        retired = registry.retire(session, task, version)
        return {**registry.version_summary(retired, settings.state_dir), "was_active": was_active}

    data = _in_transaction(settings, work)
    if as_json:
        echo_json(data)
        return
    note = f"; task {task} has no active model now" if data["was_active"] else ""
    click.echo(f"{task}/{version} is retired{note}")
