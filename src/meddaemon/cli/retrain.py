"""``medcli retrain TASK --data PATH``: train a task's model on a dataset as published and register
it. Thin: ``meddaemon.training.pipeline`` does the work; torch is imported only when it runs.

Under ``torchrun --nproc-per-node N -m meddaemon.cli.medcli retrain ...`` each process joins the
process group (``training/distributed.py``) and trains with DistributedDataParallel; rank 0 runs the
whole pipeline (split, training, evaluation, version folder) and registers, the other ranks only
train their shard and then wait at a barrier for it.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from meddaemon.cli.common import EXIT_FAILURE, EXIT_USAGE, build_settings, echo_json, handle_errors, settings_options


@click.command()
@settings_options
@click.argument("task")
@click.option(
    "--data", required=True, type=click.Path(path_type=Path, exists=True), help="Dataset folder or CSV manifest."
)
@click.option("--epochs", type=int, help="Most epochs (default: the task's recipe).")
@click.option("--batch-size", type=int, help="Batch size (default: the recipe's).")
@click.option("--lr", type=float, help="Learning rate (default: the recipe's).")
@click.option("--arch", help="Architecture (default: the task's, e.g. mobilenet_v2; small_cnn, resnet18, ...).")
@click.option("--image-size", type=int, help="Square input size in pixels (default: the task's contract).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the split, the weights and the order.")
@click.option("--patience", type=int, help="Early stopping after N epochs without improvement (default: recipe).")
@click.option("--no-augmentation", is_flag=True, help="Train without flips and affine augmentation.")
@click.option("--device", default=None, help="cpu or cuda (default: cuda when present).")
@click.option("--version", "version_name", help="Name of the new version (default: r<UTC date-time>).")
@click.option("--resume", is_flag=True, help="Continue from the checkpoint in --out.")
@click.option("--promote", is_flag=True, help="Make the new version the task's active model.")
@click.option(
    "--out",
    type=click.Path(path_type=Path, file_okay=False),
    help="Working folder: checkpoints, split.json, versions/<version>/ (default: <state-dir>/training/<task>).",
)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable summary on stdout.")
@handle_errors
def retrain(
    config_file: Path | None,
    task: str,
    data: Path,
    epochs: int | None,
    batch_size: int | None,
    lr: float | None,
    arch: str | None,
    image_size: int | None,
    seed: int,
    patience: int | None,
    no_augmentation: bool,
    device: str | None,
    version_name: str | None,
    resume: bool,
    promote: bool,
    out: Path | None,
    as_json: bool,
    **flags: Any,
) -> None:
    """Train TASK's classifier on the dataset at --data and register it as a new version.

    The dataset is read in its published layout (BUSI, ChestX-ray14, covid-chestxray, IDC, a folder
    per class or a CSV manifest) and split train/validation/test without leaks (patients and
    near-duplicates kept on one side). Defaults come from the task's recipe (`medcli tasks`).
    Thresholds are chosen on validation, metrics are measured on test; a collapsed model or an
    implausibly perfect score is flagged loudly. The version (weights, manifest, split.json,
    MODEL_CARD.md) is registered but not served unless --promote. Bad data exits 2.

    Several processes (DistributedDataParallel): `torchrun --nproc-per-node N -m meddaemon.cli.medcli
    retrain ...`; --batch-size is per process (the global batch is N times it).
    """
    import torch

    from meddaemon.db.engine import create_db_engine, session_factory, transaction
    from meddaemon.db.migrate import upgrade
    from meddaemon.engine import registry
    from meddaemon.training import distributed
    from meddaemon.training.datasets import DatasetError
    from meddaemon.training.pipeline import retrain as run_retrain
    from meddaemon.training.train import TrainConfig

    settings = build_settings(config_file, **flags)
    spec = settings.task_specs.get(task)
    if spec is None:
        raise click.BadParameter(
            f"unknown task {task!r}; known: {', '.join(sorted(settings.task_specs))}", param_hint="TASK"
        )
    config = TrainConfig.from_task(
        spec,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        architecture=arch,
        image_size=image_size,
        seed=seed,
        patience=patience,
        augmentation=False if no_augmentation else None,
        device=device or ("cuda" if torch.cuda.is_available() else "cpu"),
    )
    workdir = out or settings.state_dir / "training" / task
    distributed.setup(config.device)  # under torchrun: join the process group (a no-op otherwise)
    click.get_current_context().call_on_close(distributed.teardown)
    if not distributed.is_main():
        _train_shard(spec, data, config, workdir, resume)
        distributed.barrier()  # rank 0 evaluates, writes and registers the version
        return
    say = (lambda line: click.echo(line, err=True)) if as_json else click.echo
    try:
        outcome = run_retrain(
            spec, data, config, workdir, version=version_name, resume=resume, show_progress=not as_json, log=say
        )
    except DatasetError as exc:
        click.echo(f"error: bad dataset: {exc}", err=True)
        sys.exit(EXIT_USAGE)
    except (ValueError, FileNotFoundError) as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(EXIT_FAILURE)

    engine = create_db_engine(settings.db_url, settings.busy_timeout)
    try:
        upgrade(engine)
        with transaction(session_factory(engine)) as session:
            row = registry.import_version(session, outcome.version_dir, settings.models_dir, tasks=settings.task_specs)
            if promote:
                row = registry.promote(session, row.task_name, row.version)
            registered = registry.version_summary(row)
    except registry.RegistryError as exc:
        click.echo(f"error ({exc.reason}): {exc.message}", err=True)
        sys.exit(EXIT_FAILURE)
    finally:
        engine.dispose()
    distributed.barrier()

    summary = {**outcome.summary(), "registered": registered}
    for flag in outcome.flags:
        click.secho(f"WARNING: {flag}", fg="red", bold=True, err=True)
    if as_json:
        echo_json(summary)
        return
    test = outcome.metrics["test"]
    click.echo(
        f"{task}/{registered['version']}: test accuracy {_fmt(test['accuracy'])}, ROC-AUC {_fmt(test['roc_auc'])} "
        f"on {test['n']} images; {registered['status']} in {registered['path']}"
    )
    click.echo(f"model card: {outcome.version_dir / 'MODEL_CARD.md'}")
    if not promote:
        click.echo(f"serve it with: medcli models promote {task} {registered['version']}")


def _train_shard(spec: Any, data: Path, config: Any, workdir: Path, resume: bool) -> None:
    """A rank other than 0: the same dataset and split as rank 0's pipeline, training only."""
    from meddaemon.training.datasets import load_dataset
    from meddaemon.training.splits import SplitConfig, make_split
    from meddaemon.training.train import train

    index = load_dataset(data, spec)
    split = make_split(index, SplitConfig(spec.recipe.split, config.seed))
    train(spec, split.samples(index, "train"), split.samples(index, "val"), config, workdir, resume=resume)


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"
