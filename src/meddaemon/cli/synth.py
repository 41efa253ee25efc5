"""``medcli synth``: write a SYNTHETIC phantom dataset in a seed dataset's published layout.

Thin: parses, calls ``meddaemon.training.phantoms.write_phantoms`` and prints what was written.
"""

from __future__ import annotations

from pathlib import Path

import click

from meddaemon.cli.common import EXIT_FAILURE, EXIT_USAGE, handle_errors
from meddaemon.training.phantoms import MIN_SIZE, PHANTOM_DEFAULTS, write_phantoms

_DEFAULTS = "; ".join(f"{task}: {d.count} {d.count_means}, {d.size} px" for task, d in PHANTOM_DEFAULTS.items())


@click.command("synth", epilog=f"Defaults: {_DEFAULTS}.")
@click.argument("task", type=click.Choice(sorted(PHANTOM_DEFAULTS)))
@click.option("--out", required=True, type=click.Path(path_type=Path, file_okay=False),
              help="The dataset root to write (created, or an empty folder; written whole or not at all).")  # fmt: skip
@click.option("--count", type=click.IntRange(min=1), help="Images per class (chestxray14: images in all).")
@click.option(
    "--size", type=click.IntRange(min=MIN_SIZE), help=f"Side of each square image in pixels (at least {MIN_SIZE})."
)
@click.option("--seed", default=0, show_default=True, help="The same seed writes the same dataset.")
@handle_errors
def synth(task: str, out: Path, count: int | None, size: int | None, seed: int) -> None:
    """Write SYNTHETIC phantoms for TASK into OUT, in the layout its dataset is published in.

    \b
    busi            Dataset_BUSI_with_GT: benign/ malignant/ normal/ with "benign (1).png",
                    "benign (1)_mask.png" (some "_mask_1.png"), a few near-duplicate images
    chestxray14     images/00000001_000.png, Data_Entry_2017.csv, BBox_List_2017.csv,
                    train_val_list.txt / test_list.txt split by patient
    covid           metadata.csv (patientid, finding, view, folder, filename) and images/
    histopathology  <patient>/{0,1}/<patient>_idx5_x<X>_y<Y>_class<C>.png RGB patches

    The class is drawn so a model can learn it (lesion shape, findings in known boxes, opacities,
    nuclei). Every dataset is marked SYNTHETIC: a README.txt at its root and a comment in every PNG.
    """
    try:
        written = write_phantoms(task, out, count=count, size=size, seed=seed)
    except (ValueError, FileExistsError) as exc:  # an option value this task's phantoms cannot take, an --out not empty
        click.echo(f"error: {exc}", err=True)
        raise SystemExit(EXIT_USAGE) from None
    except OSError as exc:  # a folder it cannot write in
        click.echo(f"error: {exc}" if exc.errno is None else f"error: cannot write {out}: {exc.strerror}", err=True)
        raise SystemExit(EXIT_FAILURE) from None
    counts = ", ".join(f"{label} {n}" for label, n in written.per_label.items() if n)
    patients = f" of {written.patients} patients" if written.patients else ""
    click.echo(f"wrote {written.images} SYNTHETIC {task} images{patients} to {written.root} ({counts})")
