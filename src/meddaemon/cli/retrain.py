"""``medcli retrain TASK --data PATH``: train a task's model on a dataset as published and register
it. Thin: ``meddaemon.training.pipeline`` does the work; torch is imported only when it runs.

Under ``torchrun --nproc-per-node N -m meddaemon.cli.medcli retrain ...`` each process joins the
process group (``training/distributed.py``) and trains with DistributedDataParallel; rank 0 runs the
whole pipeline (split, training, evaluation, version folder) and registers, the other ranks only
train their shard and then wait at a barrier for it.
"""

from __future__ import annotations

import contextlib
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import click

from meddaemon.cli.common import (
    EXIT_DATABASE,
    EXIT_FAILURE,
    EXIT_INTERRUPTED,
    EXIT_SCHEMA_AHEAD,
    EXIT_USAGE,
    build_settings,
    echo_json,
    echo_warning,
    handle_errors,
    hash_workers_option,
    hashing_progress,
    open_database,
    settings_options,
)
from meddaemon.cli.hints import SETTINGS_PARAMS, command_line, given_options
from meddaemon.training import MAX_SEED


@click.command()
@settings_options
@click.argument("task")
@click.option(
    "--data",
    type=click.Path(path_type=Path, exists=True),
    help="Dataset folder or CSV manifest, as published (without it: where the task's dataset is published).",
)
@click.option("--epochs", type=int, help="Most epochs (default: the task's recipe).")
@click.option("--batch-size", type=int, help="Batch size (default: the recipe's).")
@click.option("--lr", type=float, help="Learning rate (default: the recipe's).")
@click.option("--arch", help="Architecture (default: the task's, e.g. mobilenet_v2; small_cnn, resnet18, ...).")
@click.option(
    "--from",
    "from_version",
    metavar="VERSION",
    help="Start from the weights of this registered version of TASK (an imported one too), on its "
    "architecture and input contract; the new version's provenance names it.",
)
@click.option("--image-size", type=int, help="Square input size in pixels (default: the task's contract).")
@click.option(
    "--seed",
    type=click.IntRange(0, MAX_SEED),
    default=0,
    show_default=True,
    help="Seed of the split, the weights and the order.",
)
@click.option(
    "--patience",
    type=click.IntRange(min=1),
    help="Early stopping after N epochs without improvement (default: recipe).",
)
@click.option("--no-augmentation", is_flag=True, help="Train without flips and affine augmentation.")
@click.option("--device", default=None, help="cpu or cuda (default: cuda when present).")
@click.option(
    "--version",
    "version_name",
    help="Name of the new version (default: r<UTC date-time>); a name already taken exits 2 before training.",
)
@click.option("--resume", is_flag=True, help="Continue from the checkpoint in --out.")
@click.option("--promote", is_flag=True, help="Make the new version the task's active model.")
@click.option("--force", is_flag=True, help="Promote even a model flagged COLLAPSE or IMPLAUSIBLE.")
@click.option(
    "--out",
    type=click.Path(path_type=Path, file_okay=False),
    help="Working folder: checkpoints, split.json, versions/<version>/ (default: <state-dir>/training/<task>).",
)
@hash_workers_option
@click.option("--json", "as_json", is_flag=True, help="Machine-readable summary on stdout.")
@handle_errors
def retrain(
    config_file: Path | None,
    task: str,
    data: Path | None,
    epochs: int | None,
    batch_size: int | None,
    lr: float | None,
    arch: str | None,
    from_version: str | None,
    image_size: int | None,
    seed: int,
    patience: int | None,
    no_augmentation: bool,
    device: str | None,
    version_name: str | None,
    resume: bool,
    promote: bool,
    force: bool,
    out: Path | None,
    workers: int,
    as_json: bool,
    **flags: Any,
) -> None:
    """Train TASK's classifier on the dataset at --data and register it as a new version.

    The dataset is read in its published layout (BUSI, ChestX-ray14, covid-chestxray, IDC, a folder
    per class or a CSV manifest) and split train/validation/test without leaks (patients and
    near-duplicates kept on one side). Defaults come from the task's recipe (`medcli tasks`).
    Thresholds are chosen on validation, metrics are measured on test; a collapsed model or an
    implausibly perfect score is flagged loudly. The version (weights, manifest, split.json,
    MODEL_CARD.md) is registered but not served unless --promote; a model flagged COLLAPSE or
    IMPLAUSIBLE is registered but not promoted (exit 2) unless --force. Bad data exits 2; Ctrl-C
    exits 130 and says how to continue with --resume.

    --from VERSION fine-tunes a registered version of TASK (e.g. one imported with `medcli models
    import FILE`): its weights (hash-checked, safetensors) are where training starts, and its
    architecture and input contract (size, channels, normalisation, resize) are kept. An unknown
    version, one of another task, an ONNX graph, or an --arch or --image-size that contradicts it
    exits 2; a version whose files fail verification exits 1.

    Several processes (DistributedDataParallel): `torchrun --nproc-per-node N -m meddaemon.cli.medcli
    retrain ...`; --batch-size is per process (the global batch is N times it).
    """
    import torch
    from sqlalchemy.exc import OperationalError

    from meddaemon.db.engine import session_factory, transaction
    from meddaemon.db.migrate import SchemaError, SchemaTooNew
    from meddaemon.engine import registry
    from meddaemon.logs import error_line
    from meddaemon.training import distributed
    from meddaemon.training.datasets import DatasetError
    from meddaemon.training.evaluate import promotion_blockers
    from meddaemon.training.pipeline import WorkdirRefused, check_resumable, one_run_in, split_dataset
    from meddaemon.training.pipeline import retrain as run_retrain
    from meddaemon.training.train import TrainConfig

    settings = build_settings(config_file, **flags)
    spec = settings.task_specs.get(task)
    if spec is None:
        raise click.BadParameter(
            f"unknown task {task!r}; known: {', '.join(sorted(settings.task_specs))}", param_hint="TASK"
        )
    if data is None:
        click.echo(_where_to_get_data(spec), err=True)
        sys.exit(EXIT_USAGE)
    workdir = out or settings.state_dir / "training" / task
    _check_registry(settings, task, version_name, workdir)
    parent = None if from_version is None else _parent(settings, spec, from_version, arch, image_size)
    try:
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
            processes=distributed.requested_size(),
        )
        (config if parent is None else parent.apply(config)).check_trainable(spec)
    except ValueError as exc:  # checked before the dataset is read
        raise click.UsageError(str(exc)) from None
    with distributed.joined(config.device), contextlib.ExitStack() as held:  # joined: under torchrun, the group
        if not distributed.is_main():
            _follow_rank_0(spec, data, config, workdir, resume, max(1, workers // distributed.world_size()), parent)
            return
        try:
            held.enter_context(one_run_in(workdir, data))
        except WorkdirRefused as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(EXIT_USAGE)
        say = (lambda line: click.echo(line, err=True)) if as_json else click.echo
        ctx = click.get_current_context()
        started = time.time()
        try:
            if resume:
                check_resumable(workdir, config, parent)
            with hashing_progress(disable=not _wants_bar(as_json)) as progress:
                split_data = split_dataset(
                    spec,
                    data,
                    config.seed,
                    workers=workers,
                    progress=progress,
                    contract=trained_on(spec, config, parent),
                )
            outcome = run_retrain(
                spec,
                data,
                config,
                workdir,
                version=version_name,
                resume=resume,
                show_progress=_wants_bar(as_json),
                split_data=split_data,
                log=say,
                warn=echo_warning,
                parent=parent,
            )
        except KeyboardInterrupt:
            since = None if resume else started  # an earlier run's checkpoint is not this run's to resume
            click.echo(_how_to_resume(ctx, task, workdir, config.processes, since), err=True)
            sys.exit(EXIT_INTERRUPTED)
        except DatasetError as exc:
            click.echo(f"error: bad dataset: {exc}", err=True)
            sys.exit(EXIT_USAGE)
        except (ValueError, FileNotFoundError) as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(EXIT_FAILURE)

        blockers = promotion_blockers(outcome.flags) if promote and not force else []
        engine = None
        try:
            engine = open_database(settings)  # on SQLite, it waits for the write lock too
            with transaction(session_factory(engine)) as session:
                state_dir = settings.state_dir
                row = registry.import_version(
                    session, outcome.version_dir, settings.models_dir, tasks=settings.task_specs, state_dir=state_dir
                )
                if promote and not blockers:
                    row = registry.promote(session, row.task_name, row.version)  # verified by its import just now
                registered = registry.version_summary(row, state_dir)
        except registry.RegistryError as exc:
            _not_registered(ctx, outcome.version_dir, f"error ({exc.reason}): {exc.message}")
            sys.exit(EXIT_FAILURE)
        except OperationalError as exc:
            # a lock held past the busy timeout, or the database away: the training is not lost, and
            # the same command again would refuse the --version its folder now holds
            _not_registered(ctx, outcome.version_dir, f"error: the database could not record it: {error_line(exc)}")
            sys.exit(EXIT_DATABASE)
        except SchemaError as exc:  # removed, or upgraded by a newer meddaemon, while the model trained
            _not_registered(ctx, outcome.version_dir, f"error: {exc}")
            sys.exit(EXIT_SCHEMA_AHEAD if isinstance(exc, SchemaTooNew) else EXIT_DATABASE)
        except KeyboardInterrupt:
            _not_registered(ctx, outcome.version_dir, "interrupted while registering")
            sys.exit(EXIT_INTERRUPTED)
        finally:
            if engine is not None:
                engine.dispose()
        distributed.barrier()

        summary = {**outcome.summary(), "registered": registered, "promotion_refused": blockers}
        for flag in outcome.flags:
            click.secho(f"WARNING: {flag}", fg="red", bold=True, err=True)
        promote_line = command_line(
            "models", "promote", task, registered["version"], *given_options(ctx, SETTINGS_PARAMS)
        )
        if blockers:
            click.secho(
                f"not promoted: the model is flagged {', '.join(sorted({b.split(':', 1)[0] for b in blockers}))}; "
                f"it is registered, not served. Read the model card, then serve it anyway with: {promote_line}",
                fg="red",
                bold=True,
                err=True,
            )
        if as_json:
            echo_json(summary)
        else:
            test = outcome.metrics["test"]
            click.echo(
                f"{task}/{registered['version']}: test accuracy {_fmt(test['accuracy'])}, "
                f"ROC-AUC {_fmt(test['roc_auc'])} on {test['n']} images; {registered['status']} in {registered['path']}"
            )
            click.echo(f"model card: {outcome.version_dir / 'MODEL_CARD.md'}")
            if not promote:
                click.echo(f"serve it with: {promote_line}")
    if blockers:
        sys.exit(EXIT_USAGE)


def _check_registry(settings: Any, task: str, version: str | None, workdir: Path) -> None:
    """Before training, not after it: the database the version is registered in exists (exit 3
    otherwise), and a ``--version`` name is a valid one, free there and in the training folder (exit 2)."""
    from meddaemon.db.engine import session_factory
    from meddaemon.engine.registry import NAME_PATTERN
    from meddaemon.training.pipeline import version_name_taken

    if version is not None and not NAME_PATTERN.match(version):
        click.echo(
            f"error: --version {version!r} must be 1-64 letters, digits, '.', '_' or '-', not starting with '.', "
            "'_' or '-'",
            err=True,
        )
        sys.exit(EXIT_USAGE)
    engine = open_database(settings)
    try:
        if version is None:
            return
        with session_factory(engine)() as session:
            taken = version_name_taken(session, task, version, workdir)
    finally:
        engine.dispose()
    if taken is not None:
        click.echo(f"error: {taken}; choose another --version", err=True)
        sys.exit(EXIT_USAGE)


def _parent(settings: Any, spec: Any, reference: str, arch: str | None, image_size: int | None) -> Any:
    """The ``--from`` version, verified; exits 2 (it cannot be trained from) or 1 (its files are refused)."""
    from meddaemon.db.engine import session_factory, transaction
    from meddaemon.engine.registry import ModelRefused
    from meddaemon.training.parent import ParentRefused, resolve_parent

    engine = open_database(settings)
    try:
        with transaction(session_factory(engine)) as session:
            return resolve_parent(
                session, spec, reference, architecture=arch, image_size=image_size, state_dir=settings.state_dir
            )
    except ParentRefused as exc:
        click.echo(f"error ({exc.reason}): --from {reference}: {exc.message}", err=True)
        sys.exit(EXIT_USAGE)
    except ModelRefused as exc:
        click.echo(f"refused ({exc.reason}): --from {reference}: {exc.message}", err=True)
        sys.exit(EXIT_FAILURE)
    finally:
        engine.dispose()


def trained_on(spec: Any, config: Any, parent: Any) -> Any:
    """The input contract the model is trained on (the parent's under ``--from``), which every image
    of the dataset is checked against before training."""
    return (config if parent is None else parent.apply(config)).contract(spec)


def _where_to_get_data(spec: Any) -> str:
    """Why --data is needed, where the task's dataset is published, and how to try without it."""
    from meddaemon.training.phantoms import phantoms_for

    lines = [f"error: medcli retrain {spec.name} needs --data PATH: a dataset in its published layout."]
    if spec.dataset is not None:
        lines += [f"{spec.name} is trained on:", *spec.dataset.lines()]
    else:
        lines.append(f"{spec.name} is a custom task: a folder per class or a CSV manifest (path,label[,patient_id]).")
    phantoms = phantoms_for(spec)
    if phantoms is not None:
        lines.append(
            f"To try the pipeline first: {command_line('synth', phantoms, '--out', 'DIR')} writes SYNTHETIC phantoms "
            f"in that layout; then {command_line('retrain', spec.name, '--data', 'DIR')}"
        )
    return "\n".join(lines)


def _not_registered(ctx: click.Context, version_dir: Path, why: str) -> None:
    import_line = command_line("models", "import", str(version_dir), *given_options(ctx, SETTINGS_PARAMS))
    click.echo(
        f"{why}: nothing was registered; the trained version is whole in {version_dir}; register it with: "
        f"{import_line}",
        err=True,
    )


def _how_to_resume(
    ctx: click.Context, task: str, workdir: Path, processes: int, written_since: float | None = None
) -> str:
    """After Ctrl-C: the epoch the checkpoint holds and the command that continues from it (under
    torchrun with as many processes: their count is part of the recipe, the global batch). A run
    stopped before its training started offered an earlier run's checkpoint, which its command,
    given other settings, then refused."""
    from meddaemon.training import distributed
    from meddaemon.training.train import checkpoint_epoch

    epoch = checkpoint_epoch(workdir, written_since)
    again = given_options(ctx, drop=("resume",))

    def launched(*words: str) -> str:
        if processes == 1:
            return command_line(*words)
        return shlex.join(["torchrun", *distributed.relaunch_options(), "-m", "meddaemon.cli.medcli", *words])

    if epoch is None:
        return "interrupted before the first epoch finished: nothing to resume; start again with: " + launched(
            "retrain", task, *again
        )
    return f"interrupted: the checkpoint after epoch {epoch} is in {workdir}; continue with: " + launched(
        "retrain", task, *again, "--resume"
    )


def _wants_bar(as_json: bool) -> bool:
    """A progress bar (on stderr) only on a terminal; elsewhere the plain line per epoch is enough."""
    return not as_json and sys.stdout.isatty() and sys.stderr.isatty()


def _follow_rank_0(
    spec: Any, data: Path, config: Any, workdir: Path, resume: bool, workers: int, parent: Any = None
) -> None:
    """Another rank's part: its shard of the training, then the wait while rank 0 evaluates, writes and
    registers the version. A refusal rank 0 meets too (the dataset, Ctrl-C) ends it with rank 0's
    exit code and no word: rank 0 says it, where this rank printed it again as a traceback. An image
    of this rank's shard gone while it trained is this rank's to name: rank 0 never reads it."""
    from meddaemon.training import distributed
    from meddaemon.training.datasets import DatasetError
    from meddaemon.training.train import ChangedWhileTraining

    try:
        _train_shard(spec, data, config, workdir, resume, workers, parent)
    except KeyboardInterrupt:
        sys.exit(EXIT_INTERRUPTED)
    except ChangedWhileTraining as exc:
        click.echo(f"error (rank {distributed.rank()}): bad dataset: {exc}", err=True)
        sys.exit(EXIT_USAGE)
    except DatasetError:
        sys.exit(EXIT_USAGE)
    except (ValueError, FileNotFoundError) as exc:
        click.echo(f"error (rank {distributed.rank()}): {exc}", err=True)
        sys.exit(EXIT_FAILURE)
    distributed.barrier()


def _train_shard(
    spec: Any, data: Path, config: Any, workdir: Path, resume: bool, workers: int, parent: Any = None
) -> None:
    """A rank other than 0: the same dataset, split and starting weights as rank 0's pipeline, training only."""
    from meddaemon.training.pipeline import split_dataset
    from meddaemon.training.train import train

    if parent is not None:
        config = parent.apply(config)
    split_data = split_dataset(spec, data, config.seed, workers=workers, contract=config.contract(spec))
    index, split = split_data.index, split_data.split
    train(
        spec, split.samples(index, "train"), split.samples(index, "val"), config, workdir, resume=resume,
        initial_weights=None if parent is None else parent.weights,
    )  # fmt: skip


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"
