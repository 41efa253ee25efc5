"""``medcli evaluate``: score a cohort where it lies, optionally audit it against its own labels.

Thin: parse, call ``meddaemon.evaluate.pipeline.run_evaluation`` (and ``evaluate.truth`` for
``--audit``), print. A progress bar (images/s, ETA) goes to stderr when it is a terminal.
Exit codes: 0 done, 2 bad usage (``--device cuda`` without a GPU, ``--audit`` of a folder without
labels, a folder holding only a dataset, ``--require`` without ``--audit`` or unreadable) or a
dataset over 5% unreadable, 3 no usable database, 1 a model refused, 5 an ``--audit --require``
criterion fails, 130 Ctrl-C (run it again to resume). A run that stops prints what it read first
(``--json``: its summary, ``state`` "stopped", the unreadable files with their reasons).
"""

from __future__ import annotations

import contextlib
import signal
import sys
from pathlib import Path
from typing import Any

import click

from meddaemon.cli.common import (
    EXIT_CRITERIA_FAILED,
    EXIT_FAILURE,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_TERMINATED,
    EXIT_USAGE,
    build_settings,
    echo_json,
    handle_errors,
    open_database,
    settings_options,
)
from meddaemon.daemon.progress import ProgressLines
from meddaemon.names import shown_name

#: how often a run off a terminal writes its "N of M files" line
PROGRESS_LINE_SECONDS = 30.0


@click.command()
@click.argument("path", type=click.Path(path_type=Path, exists=True))
@settings_options
@click.option("--task", required=True, help="The task whose model scores the cohort.")
@click.option("--model", "model_version", help="The model version (default: the task's active one).")
@click.option(
    "--name",
    help="The evaluation's name (default: <dataset folder or manifest>-<task>-<version>, with eight hex digits "
    "of the path where another dataset has that name); reruns resume it.",
)
@click.option("--heatmaps", is_flag=True, help="Also write heatmaps, as the daemon does.")
@click.option("--batch-size", default=64, show_default=True, type=click.IntRange(1), help="Images per forward pass.")
@click.option("--workers", type=click.IntRange(0), help="Decoding processes (default: cores - 1; 0: none).")
@click.option(
    "--device",
    type=click.Choice(["auto", "cpu", "cuda"]),
    default="auto",
    show_default=True,
    help="Where the model runs: cuda is this machine's GPU (local engine) or one GPU per Ray actor.",
)
@click.option(
    "--engine",
    type=click.Choice(["local", "ray"]),
    default="local",
    show_default=True,
    help="local: decoding processes and the model on this machine; ray: Ray Data (pip install 'meddaemon[ray]').",
)
@click.option(
    "--ray-address", help="A Ray cluster to join ('auto': the one this node belongs to); default: a local Ray."
)
@click.option(
    "--audit",
    "with_audit",
    is_flag=True,
    help="Then audit against the labels the dataset layout carries (stored, its id printed, as medcli audit does).",
)
@click.option(
    "--require",
    metavar="CRITERIA",
    help='With --audit: criteria as for medcli audit, e.g. "auc>=0.85" (unmet: exit 5).',
)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@handle_errors
def evaluate(
    path: Path,
    config_file: Path | None,
    task: str,
    model_version: str | None,
    name: str | None,
    heatmaps: bool,
    batch_size: int,
    workers: int | None,
    device: str,
    engine: str,
    ray_address: str | None,
    with_audit: bool,
    require: str | None,
    as_json: bool,
    **flags: object,
) -> None:
    """Score every image of PATH in place with a task's model: a dataset as published (BUSI, NIH
    ChestX-ray14, COVID, IDC, folder per class, CSV manifest) or any folder of images.

    Nothing under PATH is written, moved or locked. Results go to the database as the daemon's do
    (scans by SHA-256, a result per label); bytes the model version scored before are not scored
    again, so an interrupted run resumes and a rerun costs only the hashing. Unreadable files, and
    files the dataset's layout leaves out (`left_out` in --json), are listed with their reason; more
    than 5% unreadable stops the run.
    """
    from rich.console import Console

    from meddaemon.evaluate.pipeline import EvaluationRequest, EvaluationStopped, TooManyUnreadable, run_evaluation
    from meddaemon.evaluate.store import EvaluationError
    from meddaemon.training.datasets import DatasetError

    if require is not None:
        _check_criteria(require, with_audit)
    settings = build_settings(config_file, **flags)
    options: dict[str, Any] = {"workers": workers} if workers is not None else {}
    request = EvaluationRequest(
        path=path, task=task, model_version=model_version, name=name, heatmaps=heatmaps, batch_size=batch_size,
        device=device, engine=engine, ray_address=ray_address, audit=with_audit, **options,
    )  # fmt: skip
    err = Console(stderr=True)
    db = open_database(settings)
    try:
        with _progress_bar(err, as_json) as progress:
            try:
                # Ray's driver prints its workers' errors to stdout: with --json, stdout is the JSON alone
                with contextlib.redirect_stdout(sys.stderr) if as_json else contextlib.nullcontext():
                    outcome = run_evaluation(db, settings, request, progress)
            except (EvaluationError, DatasetError) as exc:
                click.echo(f"error: {exc}", err=True)
                sys.exit(EXIT_USAGE)
            except EvaluationStopped as exc:
                _show_stopped(db, exc, as_json)
                click.echo(f"error: {exc}", err=True)
                sys.exit(EXIT_USAGE if isinstance(exc, TooManyUnreadable) else EXIT_FAILURE)
            except KeyboardInterrupt:
                click.echo("interrupted: what was scored is stored; run the same command again to resume", err=True)
                sys.exit(EXIT_INTERRUPTED)
            except SystemExit as exc:  # Ray's driver turns SIGTERM into sys.exit(15)
                if exc.code != signal.SIGTERM:
                    raise
                click.echo(
                    "stopped by SIGTERM: what was scored is stored; run the same command again to resume", err=True
                )
                sys.exit(EXIT_TERMINATED)
        audit, audit_id, refused = _audit(db, settings, outcome.name, require) if with_audit else (None, None, None)
    finally:
        db.dispose()
    summary = outcome.summary
    if as_json:
        echo_json({**summary, "audit": {"audit_id": audit_id, **audit.as_dict()} if audit else None})
    else:
        _print(summary)
        if audit is not None:
            from meddaemon.audit.table import print_audit

            print_audit(audit)
            click.echo(f"audit {audit_id} stored")
    if refused:
        click.echo(f"error: {refused}", err=True)
        sys.exit(EXIT_USAGE)
    sys.exit(EXIT_CRITERIA_FAILED if audit is not None and audit.passed is False else EXIT_OK)


def _check_criteria(require: str, with_audit: bool) -> None:
    """Before anything is scored: criteria without an audit would pass unjudged, exit 0."""
    from meddaemon.audit.criteria import CriteriaError, parse_criteria

    if not with_audit:
        click.echo("error: --require judges the audit: add --audit", err=True)
        sys.exit(EXIT_USAGE)
    try:
        parse_criteria(require)
    except CriteriaError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(EXIT_USAGE)


def _show_stopped(db: Any, stopped: Any, as_json: bool) -> None:
    """The stopped run's summary: the files read so far, the unreadable ones with their reasons."""
    from meddaemon.db.engine import session_factory
    from meddaemon.db.models import Evaluation
    from meddaemon.evaluate.store import evaluation_summary

    if stopped.evaluation_id is None:
        return
    with session_factory(db)() as session:
        row = session.get(Evaluation, stopped.evaluation_id)
        if row is None:
            return
        summary = {**evaluation_summary(session, row), **(stopped.layout_notes or {})}
    if as_json:
        echo_json({**summary, "audit": None})
    else:
        _print(summary)


def _audit(db: Any, settings: Any, name: str, require: str | None) -> tuple[Any, int | None, str | None]:
    """The evaluation's audit and its stored row's id, as `medcli audit --evaluation` gives them; or
    why it cannot be audited (the run's summary is shown all the same)."""
    from meddaemon.audit.criteria import CriteriaError
    from meddaemon.audit.labels import LabelFileError
    from meddaemon.audit.predictions import AuditInputError
    from meddaemon.audit.run import AuditRequest
    from meddaemon.audit.store import save_audit
    from meddaemon.db.engine import session_factory, transaction
    from meddaemon.evaluate.truth import audit_evaluation

    try:
        with transaction(session_factory(db)) as session:
            result = audit_evaluation(session, name, AuditRequest(require=require), settings.task_specs)
            audit_id = save_audit(session, result).id
    except (LabelFileError, AuditInputError, CriteriaError) as exc:
        return None, None, str(exc)
    return result, audit_id, None


class _progress_bar:
    """The pipeline's progress callback shown on stderr: a rich bar (files/s and ETA) on a terminal,
    unless ``--json``; elsewhere (a log file, a CI job) "N of M files" every ``PROGRESS_LINE_SECONDS``
    and at the end, so a long run is seen to move."""

    def __init__(self, console: Any, as_json: bool) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.bar = Progress(
            TextColumn("evaluate"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[rate]} files/s"),
            TimeRemainingColumn(), console=console, transient=True, disable=as_json or not console.is_terminal,
        )  # fmt: skip
        self.task = self.bar.add_task("evaluate", total=None, rate="-")
        self.lines = None if console.is_terminal else ProgressLines(sys.stderr, every=PROGRESS_LINE_SECONDS)
        self.last: tuple[int, int] | None = None

    def __enter__(self) -> Any:
        self.bar.__enter__()

        def update(progress: Any) -> None:
            rate = f"{progress.files_per_second:.0f}"
            self.bar.update(self.task, completed=progress.done, total=progress.total, rate=rate)
            self.last = (progress.done, progress.total)
            if self.lines is not None:
                self.lines.update(*self.last)

        return update

    def __exit__(self, *exc: object) -> None:
        self.bar.__exit__(*exc)  # type: ignore[arg-type]
        if self.lines is not None and self.last is not None:
            self.lines.finish(*self.last)


def _print(summary: dict[str, Any]) -> None:
    click.echo(
        f"evaluation {summary['evaluation_id']} ({summary['name']}): {summary['state']}; "
        f"{summary['files']} files: {summary['scored']} scored, {summary['reused']} already scored"
        + (f" ({summary['heatmaps_added']} given their heatmaps now)" if summary.get("heatmaps_added") else "")
        + ", "
        f"{summary['failed']} unreadable"
        + (f", {len(summary['not_images'])} not images" if summary["not_images"] else "")
        + (f", {len(summary['left_to_daemon'])} left to the daemon" if summary["left_to_daemon"] else "")
        + (f", {len(summary['left_out'])} left out by the layout" if summary.get("left_out") else "")
        + (f"; {summary['images_per_second']:.1f} images/s" if summary["images_per_second"] else "")
    )
    if summary["left_to_daemon"]:
        click.echo(f"  {summary['message']}")
    for warning in summary.get("warnings", []):
        click.echo(f"  warning: {warning}")
    shown = (
        ("unreadable", "unreadable"),
        ("not an image", "not_images"),
        ("left", "left_to_daemon"),
        ("left out", "left_out"),
    )
    for what, key in shown:
        for item in summary.get(key, [])[:20]:
            why = f"{item['reason']} ({item['message']})" if "reason" in item else item["message"]
            click.echo(f"  {what} {shown_name(item['path'])}: {why}")
        if len(summary.get(key, [])) > 20:
            click.echo(f"  ... and {len(summary[key]) - 20} more (--json lists them all)")
