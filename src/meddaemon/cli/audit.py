"""``medcli audit``: cohort metrics of a task's model against a labels file (docs/design.md section 8).

Thin: parse the options, call ``meddaemon.audit.run.run_audit`` in one transaction that also
stores the audit row, write the PDF (``--pdf``, kept with the row in a second transaction), then
print (rich tables, ``--json``) and write the CSV (``--csv``).
The statistics stack (scipy, matplotlib) is imported only when ``audit`` runs, so the rest of
``medcli`` starts fast.
Exit codes: 0 every ``--require`` criterion holds (or none given), 5 a criterion fails,
2 bad usage, a bad labels file or an unknown model version, 3 no usable database, 1 a ``--csv`` or
``--pdf`` file that cannot be written (tried before the audit runs).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING

import click

from meddaemon.cli.common import (
    EXIT_CRITERIA_FAILED,
    EXIT_FAILURE,
    EXIT_OK,
    EXIT_USAGE,
    build_settings,
    echo_json,
    handle_errors,
    open_database,
    settings_options,
)
from meddaemon.db.engine import session_factory, transaction

if TYPE_CHECKING:
    from meddaemon.audit.run import AuditResult


def _columns(value: str | None) -> tuple[str, ...]:
    return tuple(c.strip() for c in (value or "").split(",") if c.strip())


@click.command()
@settings_options
@click.option(
    "--labels",
    "labels",
    type=click.Path(path_type=Path, dir_okay=False, exists=True),
    help="The truth: a CSV with a key column (file, sop_instance_uid or sha256) and a 'label' column "
    "or one 0/1 column per label, or NIH ChestX-ray14's Data_Entry_2017.csv as published. Other "
    "columns (sex, site, patient_id...) are kept for --by and patient clustering.",
)
@click.option(
    "--labels-from-folders",
    type=click.Path(path_type=Path, file_okay=False, exists=True),
    help="The truth as BUSI's layout: DIR/<class>/<image> (masks are skipped); key: the file name.",
)
@click.option(
    "--evaluation",
    metavar="RUN",
    help="The truth as the dataset of a medcli evaluate run carries it (its name or id): that run's scans only.",
)
@click.option("--task", help="The task audited (default: told by the labels file, e.g. NIH -> chestxray14).")
@click.option(
    "--model-version",
    help="The version audited (default: the task's active one; with none active, the newest with stored results).",
)
@click.option(
    "--by",
    help="Subgroup columns, comma-separated: sex, age_band, manufacturer, view, site, or any "
    "column of the labels file (stored DICOM metadata where the file has no such column). A column of "
    "patient data (IDs, names, birth dates, accession numbers, addresses, telephones) is refused (exit 2).",
)
@click.option(
    "--min-n",
    default=30,
    show_default=True,
    type=click.IntRange(1),
    help="Subgroups with fewer labelled scans are reported as insufficient, not as numbers.",
)
@click.option(
    "--at-sensitivity",
    default=0.9,
    show_default=True,
    type=click.FloatRange(0, 1, min_open=True),
    help="Report the operating point (threshold, specificity) that reaches this sensitivity.",
)
@click.option(
    "--bootstrap",
    "resamples",
    type=click.IntRange(0),
    help="Resamples of the patient-clustered percentile bootstrap (0: none). Default: 2000 when a "
    "patient has several scans, else none (DeLong and Wilson intervals).",
)
@click.option("--seed", default=0, show_default=True, help="Seed of the bootstrap.")
@click.option(
    "--compare",
    "compare",
    metavar="MODEL_VERSION",
    help="Also compare with another version of the task's model on the same scans (paired DeLong).",
)
@click.option("--cohort-a", metavar="FROM..TO", help="Time window A (registration days, e.g. 2026-01-01..2026-03-31).")
@click.option("--cohort-b", metavar="FROM..TO", help="Time window B: the shift of each label's metrics from A to B.")
@click.option(
    "--require",
    metavar="CRITERIA",
    help='Pass/fail criteria, e.g. "auc>=0.90,sensitivity>=0.85" or "ppv[covid]>0.5"; judged on the '
    "lower 95% bound (upper for <=); exit 5 if one fails.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the whole audit as JSON instead of tables.")
@click.option(
    "--csv",
    "csv_path",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Write the tidy CSV (one row per scope, subgroup, label and metric).",
)
@click.option(
    "--pdf",
    "pdf_path",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Write the audit PDF (ROC curves, reliability, forest plot, confusion matrices); it is also "
    "kept with the stored audit, for the web console.",
)
@handle_errors
def audit(
    config_file: Path | None,
    labels: Path | None,
    labels_from_folders: Path | None,
    evaluation: str | None,
    task: str | None,
    model_version: str | None,
    by: str | None,
    min_n: int,
    at_sensitivity: float,
    resamples: int | None,
    seed: int,
    compare: str | None,
    cohort_a: str | None,
    cohort_b: str | None,
    require: str | None,
    as_json: bool,
    csv_path: Path | None,
    pdf_path: Path | None,
    **flags: object,
) -> None:
    """How good is a task's model on a labelled cohort, and for whom is it worse.

    Joins the stored predictions to the truth and reports, per label or class: ROC AUC (DeLong
    95% CI), sensitivity, specificity, PPV and NPV at the model's threshold (Wilson CIs), AUPRC with
    its prevalence baseline, confusion matrix, balanced accuracy, macro-F1, MCC, kappa, calibration
    (ECE over 10 equal-width bins, Brier) and operating points, overall and per subgroup. The audit
    is stored in the database. An undefined metric is reported with its reason, never as 0 or nan.
    """
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from meddaemon.audit.criteria import CriteriaError
    from meddaemon.audit.labels import LabelFileError
    from meddaemon.audit.predictions import AuditInputError
    from meddaemon.audit.run import AuditRequest, run_audit
    from meddaemon.audit.store import save_audit, write_and_keep_pdf
    from meddaemon.training.datasets import DatasetError

    settings = build_settings(config_file, **flags)
    for option, path in (("--csv", csv_path), ("--pdf", pdf_path)):
        _check_writable(option, path)
    request = AuditRequest(
        labels=labels, labels_from_folders=labels_from_folders, task=task, model_version=model_version,
        by=_columns(by), min_n=min_n, at_sensitivity=at_sensitivity, bootstrap=resamples, seed=seed,
        compare=compare, cohort_a=cohort_a, cohort_b=cohort_b, require=require,
    )  # fmt: skip
    err = Console(stderr=True)
    engine = open_database(settings)
    try:
        with Progress(
            TextColumn("bootstrap"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
            console=err, transient=True, disable=as_json or not err.is_terminal,
        ) as bar:  # fmt: skip
            bar_task = bar.add_task("bootstrap", total=None, visible=False)

            def started(total: int) -> None:
                bar.update(bar_task, total=total, visible=True)

            def advance(done: int) -> None:
                bar.advance(bar_task, done)

            try:
                with transaction(session_factory(engine)) as session:
                    if evaluation is not None:
                        from meddaemon.evaluate.truth import audit_evaluation

                        if labels or labels_from_folders:
                            raise AuditInputError("--evaluation takes the truth from the dataset: no --labels")
                        result = audit_evaluation(session, evaluation, request, settings.task_specs, advance, started)
                    else:
                        result = run_audit(session, request, settings.task_specs, advance, started)
                    audit_id = save_audit(session, result).id
            except (
                LabelFileError,
                AuditInputError,
                CriteriaError,
                DatasetError,
            ) as exc:  # DatasetError: --evaluation's
                click.echo(f"error: {exc}", err=True)
                sys.exit(EXIT_USAGE)
        writing: Path | str = "standard output"  # what a write error without a file name was writing
        try:
            if pdf_path:
                writing = pdf_path
                write_and_keep_pdf(session_factory(engine), audit_id, result, pdf_path)
            if csv_path:
                from meddaemon.audit.tidy import tidy_rows, write_csv

                writing = csv_path
                write_csv(csv_path, tidy_rows(result))
            writing = "standard output"  # a full disk or a closed pipe behind it
            _outputs(result, audit_id, as_json, csv_path, pdf_path)
        except OSError as exc:
            click.echo(f"error: audit {audit_id} is stored, but {exc.filename or writing}: {exc.strerror}", err=True)
            sys.exit(EXIT_FAILURE)
    finally:
        engine.dispose()
    sys.exit(EXIT_CRITERIA_FAILED if result.passed is False else EXIT_OK)


def _check_writable(option: str, path: Path | None) -> None:
    """Its folder made and a file written there before the audit runs: found unwritable after it,
    the audit was stored without the file asked for, and a traceback hid ``--require``'s verdict."""
    if path is None:
        return
    from meddaemon.files import check_named_output

    try:
        check_named_output(path)
    except OSError as exc:
        click.echo(f"error: {option} {path} cannot be written: {exc.strerror}", err=True)
        sys.exit(EXIT_FAILURE)


def _outputs(result: AuditResult, audit_id: int, as_json: bool, csv_path: Path | None, pdf_path: Path | None) -> None:
    from meddaemon.audit.table import print_audit

    if as_json:
        echo_json({"audit_id": audit_id, **result.as_dict()})
        return
    print_audit(result)
    written = [f"{kind} {p}" for kind, p in (("CSV", csv_path), ("PDF", pdf_path)) if p]
    click.echo(f"audit {audit_id} stored" + (f"; wrote {', '.join(written)}" if written else ""))
