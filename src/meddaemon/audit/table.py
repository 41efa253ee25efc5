"""The terminal view of an audit (rich tables): the join, each label's metrics, subgroups, verdicts."""

from __future__ import annotations

from rich.console import Console, Group
from rich.table import Table
from rich.text import Text

from meddaemon.audit.run import AuditResult
from meddaemon.audit.values import Estimate, Undefined, Value

HEADLINE = ("auc", "auprc", "sensitivity", "specificity", "ppv", "npv", "brier", "ece")
INTERVALS = "95% intervals; AUPRC, Brier and ECE: point values, no interval"


def cell(value: Value) -> Text:
    if isinstance(value, Undefined):
        return Text(f"undefined: {value.reason}", style="yellow")
    assert isinstance(value, Estimate)
    return Text(str(value))


def _row(table: Table, *cells: str | Text) -> None:
    """A row of data: labels, levels and names are shown as written, never read as rich's markup."""
    table.add_row(*(cell if isinstance(cell, Text) else Text(cell) for cell in cells))


def render(result: AuditResult) -> Group:
    j = result.join
    parts: list[Table | Text] = [
        Text(
            f"{result.task} ({result.kind}), model {result.model_version} (sha256 {result.model_sha256[:12]}); "
            f"labels {result.labels.path} ({result.labels.format}, key {result.labels.key_kind})",
            style="bold",
        ),
        Text(
            f"join: {j.matched} matched of {j.label_rows} label rows and {j.predictions} predictions; "
            f"{len(j.labels_without_prediction)} labels without a prediction, {j.predictions_without_label} "
            f"predictions without a label, {len(j.conflicts)} conflicts, {j.identical_duplicates} identical "
            f"duplicates, {len(j.ambiguous)} ambiguous keys; {result.cohort.n_clusters} patients"
        ),
    ]
    metrics = Table(title=f"Metrics ({INTERVALS})", show_lines=False)
    for name in ("label", "n", "pos", "thr", *HEADLINE):
        metrics.add_column(name, overflow="fold")
    for m in result.analysis.overall:
        thr = (
            f"{m.threshold:.2f}"
            if m.threshold is not None
            else ("argmax" if result.cohort.kind == "multiclass" else "-")
        )
        _row(metrics, m.label, str(m.n), str(m.positives), thr, *(cell(m.scalar(k)) for k in HEADLINE))
    parts.append(metrics)
    if result.analysis.multiclass is not None:
        a = result.analysis.multiclass
        mc = Table(title="Multiclass (argmax calls)")
        for name in ("balanced accuracy", "macro-F1", "MCC", "kappa", "confusion (rows: truth)"):
            mc.add_column(name)
        confusion = "\n".join(
            f"{c:>10} " + " ".join(f"{v:>6}" for v in row) for c, row in zip(a.classes, a.confusion, strict=True)
        )
        _row(mc, cell(a.balanced_accuracy), cell(a.f1_macro), cell(a.mcc), cell(a.kappa), confusion)
        parts.append(mc)
    if result.analysis.subgroups:
        sg = Table(title="Subgroups")
        for name in ("by", "level", "label", "n", "pos", "auc", "sensitivity", "specificity"):
            sg.add_column(name, overflow="fold")
        for g in result.analysis.subgroups:
            if g.metrics is None:
                assert g.insufficient is not None
                _row(
                    sg, g.by, g.level, g.label, str(g.n), str(g.positives), Text("insufficient", style="yellow"), "", ""
                )
            else:
                m = g.metrics
                _row(sg, g.by, g.level, g.label, str(g.n), str(g.positives), cell(m.auc), cell(m.sensitivity),
                     cell(m.specificity))  # fmt: skip
        parts.append(sg)
    if result.comparison:
        cmp = Table(title=Text(f"{result.model_version} vs {result.request.compare} (paired DeLong)"))
        for name in ("label", "n", "AUC a", "AUC b", "difference", "p"):
            cmp.add_column(name)
        for c in result.comparison:
            _row(cmp, c.label, str(c.n), f"{c.auc_a:.3f}" if c.auc_a is not None else "-",
                 f"{c.auc_b:.3f}" if c.auc_b is not None else "-", cell(c.difference),
                 f"{c.p_value:.3g}" if c.p_value is not None else "-")  # fmt: skip
        parts.append(cmp)
    if result.shift and result.windows:
        sh = Table(title=Text(f"Shift: {result.windows[0]} (a) -> {result.windows[1]} (b)"))
        for name in ("label", "n a", "n b", "AUC a", "AUC b", "change", "p"):
            sh.add_column(name)
        for s in result.shift:
            _row(sh, s.label, str(s.a.n), str(s.b.n), cell(s.a.auc), cell(s.b.auc), cell(s.auc_change),
                 f"{s.p_value:.3g}" if s.p_value is not None else "-")  # fmt: skip
        parts.append(sh)
    for note in result.analysis.notes:
        parts.append(Text(f"note: {note}", style="dim"))
    for v in result.verdicts:
        mark = "PASS" if v.passed else "FAIL"
        judged = f"{v.judged:.3f}" if v.judged is not None else "-"
        parts.append(
            Text(f"{mark} {v.criterion} [{v.label}]: {judged} ({v.basis})", style="green" if v.passed else "red")
        )
    return Group(*parts)


def print_audit(result: AuditResult, console: Console | None = None) -> None:
    """Print to the terminal at its width; into a pipe or file at 200 columns (rich's 80 would fold every cell)."""
    if console is None:
        console = Console()
        if not console.is_terminal:
            console = Console(width=200)
    console.print(render(result))
