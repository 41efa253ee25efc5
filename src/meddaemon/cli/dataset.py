"""``medcli dataset inspect``: what a dataset folder holds, read as ``medcli retrain`` will read it,
and the leak-free split it would get. Thin: ``meddaemon.training`` does the work."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

import click

from meddaemon.cli.common import (
    EXIT_USAGE,
    build_settings,
    echo_json,
    echo_warning,
    handle_errors,
    hash_workers_option,
    hashing_progress,
    settings_options,
)
from meddaemon.training import MAX_SEED

if TYPE_CHECKING:
    from meddaemon.training.datasets import DatasetIndex


@click.group()
def dataset() -> None:
    """Datasets for retraining: their layout, labels, patients and split."""


@dataset.command("inspect")
@click.argument("path", type=click.Path(path_type=Path, exists=True))
@click.option(
    "--task", help="Label the images with this task's labels and split them by its recipe (a custom task's too)."
)
@click.option("--seed", type=click.IntRange(0, MAX_SEED), default=0, show_default=True, help="Seed of the split.")
@click.option("--no-split", is_flag=True, help="Only read the dataset (no perceptual hashing, no split).")
@hash_workers_option
@settings_options
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@handle_errors
def inspect(
    path: Path,
    task: str | None,
    seed: int,
    no_split: bool,
    workers: int,
    config_file: Path | None,
    as_json: bool,
    **flags: object,
) -> None:
    """Detect the layout of PATH (a folder, or a CSV manifest), count images per label and
    patients, list what was skipped and why, and show the split: what was merged (a patient, a
    group of near-duplicate images) and what was dropped. A progress bar on stderr counts the
    images decoded and hashed. --task takes the tasks of the config (`medcli tasks`) as retrain does."""
    from meddaemon.training.datasets import DatasetError
    from meddaemon.training.splits import SplitConfig, load_hashed_dataset, make_split

    spec = None
    if task is not None:
        specs = build_settings(config_file, **flags).task_specs
        spec = specs.get(task)
        if spec is None:
            raise click.BadParameter(f"unknown task {task!r}; known: {', '.join(sorted(specs))}", param_hint="--task")
    try:
        with hashing_progress(disable=as_json) as progress:
            loaded = load_hashed_dataset(path, spec, workers=workers, progress=progress)
    except DatasetError as exc:
        click.echo(f"error: {exc}", err=True)
        raise SystemExit(EXIT_USAGE) from None
    index = loaded.index
    fractions = spec.recipe.split if spec else (0.7, 0.15, 0.15)
    split = None if no_split else make_split(index, SplitConfig(fractions, seed), loaded.hashes)
    if as_json:
        echo_json({**_summary(index), "split": None if split is None else asdict(split.report)})
        return
    summary = _summary(index)
    click.echo(f"{summary['layout']} dataset at {index.root}: {summary['images']} images, {summary['kind']}")
    click.echo("  " + "  ".join(f"{label} {n}" for label, n in index.counts().items()))
    click.echo(f"  patients: {summary['patients'] if summary['patients'] is not None else 'not given'}")
    for skipped in index.skipped:
        click.echo(f"  skipped {index.relative(skipped.path)}: {skipped.reason}")
    for warning in index.warnings:
        click.echo(f"  warning: {warning}")
    if split is not None:
        click.echo("split:")
        for line in split.report.lines():
            click.echo(f"  {line}")
        for warning in split.report.warnings:
            echo_warning(warning)


def _summary(index: DatasetIndex) -> dict[str, object]:
    return {
        "layout": index.layout,
        "root": str(index.root),
        "kind": index.kind,
        "images": len(index.samples),
        "counts": index.counts(),
        "patients": index.patients(),
        "skipped": [{"path": index.relative(s.path), "reason": s.reason} for s in index.skipped],
        "warnings": index.warnings,
    }
