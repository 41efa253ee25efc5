"""The audit PDF: a summary page, ROC curves with bands, reliability diagrams, a subgroup forest
plot and the confusion matrices, drawn with matplotlib (object API, no pyplot state) into PdfPages.

Curves are thinned to at most ``CURVE_POINTS`` points so a 100,000-scan audit stays a small file;
fonts are embedded as TrueType so the text can be searched and extracted.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
from matplotlib import rc_context
from matplotlib.axes import Axes
from matplotlib.backends.backend_pdf import PdfPages
from matplotlib.figure import Figure

from meddaemon.audit.metrics import LabelMetrics
from meddaemon.audit.run import AuditResult
from meddaemon.audit.values import Estimate, Undefined, Value

A4_LANDSCAPE = (11.69, 8.27)
CURVE_POINTS = 400
FOREST_ROWS = 34
#: Up to this many labels, page 1 also shows every ROC and reliability curve (more would not fit).
OVERVIEW_LABELS = 6
#: summary lines on page 1 above the table; the rest go on to pages of ``CONTINUED_LINES``
SUMMARY_LINES = 14
CONTINUED_LINES = 29


def _fmt(value: Value) -> str:
    if isinstance(value, Undefined):
        return "undefined"
    assert isinstance(value, Estimate)
    return str(value)


def _grid(count: int) -> tuple[int, int]:
    cols = min(4, max(1, count))
    return math.ceil(count / cols), cols


def _thin(*arrays: np.ndarray) -> list[np.ndarray]:
    n = len(arrays[0])
    if n <= CURVE_POINTS:
        return list(arrays)
    idx = np.unique(np.linspace(0, n - 1, CURVE_POINTS).astype(np.int64))
    return [a[idx] for a in arrays]


def _summary_lines(result: AuditResult) -> list[str]:
    """The summary's lines: what was audited, how, notes, and every ``--require`` verdict."""
    j = result.join
    lines = [
        f"Audit: {result.task} ({result.kind}), model version {result.model_version}",
        f"model sha256 {result.model_sha256[:16]}   labels {Path(result.labels.path).name} "
        f"(sha256 {result.labels.sha256[:16]}, {result.labels.format})   predictions sha256 "
        f"{result.predictions_sha256[:16]}",
        f"join: {j.matched} matched / {j.label_rows} label rows / {j.predictions} predictions; "
        f"{len(j.labels_without_prediction)} labels without prediction, {j.predictions_without_label} "
        f"predictions without label, {len(j.conflicts)} conflicts; {result.cohort.n_clusters} patients",
        "95% intervals: AUC DeLong (logit; Clopper-Pearson on min(pos, neg) where DeLong degenerates), "
        "proportions Wilson"
        + (
            f", united with a patient-clustered bootstrap (B={result.analysis.resamples})"
            if result.analysis.resamples
            else ""
        ),
        "AUPRC, Brier and ECE (10 equal-width bins): point values, no interval",
    ]
    mc = result.analysis.multiclass
    if mc is not None:
        lines.append(
            f"all classes (argmax calls): balanced accuracy {_fmt(mc.balanced_accuracy)}, macro-F1 "
            f"{_fmt(mc.f1_macro)}, MCC {_fmt(mc.mcc)}, Cohen's kappa {_fmt(mc.kappa)}"
        )
    lines += [f"note: {n}" for n in result.analysis.notes]
    lines += [
        f"{'PASS' if v.passed else 'FAIL'} {v.criterion} [{v.label}]: "
        f"{'-' if v.judged is None else f'{v.judged:.3f}'} ({v.basis})"
        for v in result.verdicts
    ]
    return lines


def _summary(result: AuditResult, lines: list[str]) -> Figure:
    """Page 1: the summary's first lines (``SUMMARY_LINES``, the last of them saying where the rest
    are and how many criteria failed) and the overall table."""
    fig = Figure(figsize=A4_LANDSCAPE)
    if len(lines) > SUMMARY_LINES:
        rest = lines[SUMMARY_LINES - 1 :]
        failed = sum(line.startswith("FAIL ") for line in rest)
        shown = [*lines[: SUMMARY_LINES - 1], f"... {len(rest)} more lines on the next page ({failed} FAIL)"]
    else:
        shown = lines
    for i, line in enumerate(shown):
        fig.text(0.04, 0.95 - i * 0.03, line, fontsize=12 if i == 0 else 8, weight="bold" if i == 0 else "normal")
    top = 0.95 - len(shown) * 0.03 - 0.01
    overview = len(result.analysis.overall) <= OVERVIEW_LABELS
    bottom = 0.45 if overview else 0.03
    ax = fig.add_axes((0.02, bottom, 0.96, top - bottom))
    ax.axis("off")
    header = ["label", "n", "pos", "AUC", "sensitivity", "specificity", "PPV", "NPV", "AUPRC (base)", "Brier", "ECE"]
    body = []
    for m in result.analysis.overall:
        base = f"{m.prevalence.value:.3f}" if isinstance(m.prevalence, Estimate) else "undefined"
        body.append([
            m.label, str(m.n), str(m.positives), _fmt(m.auc), _fmt(m.sensitivity), _fmt(m.specificity),
            _fmt(m.ppv), _fmt(m.npv), f"{_fmt(m.auprc)} ({base})", _fmt(m.brier), _fmt(m.ece),
        ])  # fmt: skip
    table = ax.table(cellText=body, colLabels=header, loc="upper center", cellLoc="center")
    table.auto_set_font_size(False)
    table.set_fontsize(7)
    table.scale(1, 1.3)
    if overview:
        _overview(fig, result.analysis.overall)
    return fig


def _continued_summary(lines: list[str]) -> Iterator[Figure]:
    """The summary's lines page 1 had no room for, ``CONTINUED_LINES`` a page."""
    for start in range(0, len(lines), CONTINUED_LINES):
        fig = Figure(figsize=A4_LANDSCAPE)
        fig.text(0.04, 0.95, "Summary (continued)", fontsize=12, weight="bold")
        for i, line in enumerate(lines[start : start + CONTINUED_LINES]):
            fig.text(0.04, 0.91 - i * 0.03, line, fontsize=8)
        yield fig


def _overview(fig: Figure, metrics: list[LabelMetrics]) -> None:
    """Page 1's two small plots: every label's ROC curve and reliability curve on one axes each."""
    roc = fig.add_axes((0.08, 0.05, 0.3, 0.34))
    rel = fig.add_axes((0.55, 0.05, 0.3, 0.34))
    for ax in (roc, rel):
        ax.plot([0, 1], [0, 1], color="grey", lw=0.6, ls="--")
    for m in metrics:
        if m.roc is not None:
            fpr, tpr, lo, hi = _thin(m.roc.fpr, m.roc.tpr, m.roc.tpr_lower, m.roc.tpr_upper)
            (line,) = roc.step(fpr, tpr, where="post", lw=1.2, label=f"{m.label} {_fmt(m.auc)}")
            roc.fill_between(fpr, lo, hi, step="post", alpha=0.15, color=line.get_color(), lw=0)
        if m.calibration is not None:
            filled = m.calibration.counts > 0
            rel.plot(m.calibration.mean_predicted[filled], m.calibration.observed[filled], "o-", ms=3, lw=1,
                     label=f"{m.label} ECE {_fmt(m.ece)}")  # fmt: skip
    roc.set_title("ROC, 95% band on sensitivity", fontsize=9)
    rel.set_title("Reliability, 10 equal-width bins", fontsize=9)
    _square(roc, "1 - specificity", "sensitivity")
    _square(rel, "mean predicted probability", "observed rate")
    for ax in (roc, rel):
        if ax.get_legend_handles_labels()[0]:  # none on a cohort of one class: matplotlib warned on stderr
            ax.legend(fontsize=6, loc="lower right")


def _label_pages(
    metrics: list[LabelMetrics], title: str, draw: Callable[[Axes, LabelMetrics], None]
) -> Iterator[Figure]:
    """Pages of up to 16 small square plots, one per label, each drawn by ``draw``."""
    for start in range(0, len(metrics), 16):
        chunk = metrics[start : start + 16]
        rows, cols = _grid(len(chunk))
        fig = Figure(figsize=A4_LANDSCAPE)
        fig.suptitle(title)
        for k, m in enumerate(chunk):
            ax = fig.add_subplot(rows, cols, k + 1)
            ax.plot([0, 1], [0, 1], color="grey", lw=0.6, ls="--")
            draw(ax, m)
        fig.tight_layout()
        yield fig


def _draw_roc(ax: Axes, m: LabelMetrics) -> None:
    if m.roc is not None:
        fpr, tpr, lo, hi = _thin(m.roc.fpr, m.roc.tpr, m.roc.tpr_lower, m.roc.tpr_upper)
        ax.fill_between(fpr, lo, hi, step="post", alpha=0.25, color="tab:blue", lw=0)
        ax.step(fpr, tpr, where="post", color="tab:blue", lw=1.2)
    ax.set_title(f"{m.label}\nAUC {_fmt(m.auc)}", fontsize=8)
    _square(ax, "1 - specificity", "sensitivity")


def _draw_reliability(ax: Axes, m: LabelMetrics) -> None:
    cal = m.calibration
    if cal is not None:
        filled = cal.counts > 0
        x, obs = cal.mean_predicted[filled], cal.observed[filled]
        err = np.clip(np.vstack([obs - cal.observed_lower[filled], cal.observed_upper[filled] - obs]), 0, None)
        ax.errorbar(x, obs, yerr=err, fmt="o-", ms=3, lw=1, capsize=2, color="tab:red")
    ax.set_title(f"{m.label}\nECE {_fmt(m.ece)}  Brier {_fmt(m.brier)}", fontsize=8)
    _square(ax, "mean predicted probability", "observed rate")


def _square(ax: Axes, xlabel: str, ylabel: str) -> None:
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_aspect("equal")
    ax.set_xlabel(xlabel, fontsize=7)
    ax.set_ylabel(ylabel, fontsize=7)
    ax.tick_params(labelsize=6)


def _forest_pages(result: AuditResult) -> Iterator[Figure]:
    entries: list[tuple[str, Value, int]] = []
    for m in result.analysis.overall:
        entries.append((f"{m.label}: all", m.auc, m.n))
    for g in result.analysis.subgroups:
        value: Value = g.metrics.auc if g.metrics is not None else (g.insufficient or Undefined("insufficient"))
        entries.append((f"{g.label}: {g.by}={g.level}", value, g.n))
    for start in range(0, len(entries), FOREST_ROWS):
        chunk = entries[start : start + FOREST_ROWS]
        fig = Figure(figsize=A4_LANDSCAPE)
        ax = fig.add_axes((0.33, 0.07, 0.55, 0.86))
        ys = np.arange(len(chunk))[::-1]
        for y, (_name, value, n) in zip(ys, chunk, strict=True):
            if isinstance(value, Estimate) and value.has_interval:
                assert value.lower is not None and value.upper is not None
                ax.plot([value.lower, value.upper], [y, y], color="black", lw=1)
                ax.plot([value.value], [y], "s", color="tab:blue", ms=4)
            else:
                ax.text(0.5, y, "insufficient / undefined", fontsize=7, va="center", ha="center", color="tab:orange")
            ax.text(1.02, y, f"n={n}", fontsize=7, va="center", transform=ax.get_yaxis_transform())
        ax.set_yticks(ys, [c[0] for c in chunk], fontsize=7)
        ax.set_xlim(0, 1)
        ax.set_ylim(-1, len(chunk))
        ax.axvline(0.5, color="grey", lw=0.6, ls="--")
        ax.set_xlabel("ROC AUC with 95% interval")
        fig.suptitle("Subgroup forest plot (AUC)")
        yield fig


def _confusion_page(result: AuditResult) -> Figure:
    fig = Figure(figsize=A4_LANDSCAPE)
    mc = result.analysis.multiclass
    if mc is not None:
        ax = fig.add_subplot(1, 1, 1)
        _matrix(ax, mc.confusion, list(mc.classes))
        fig.suptitle(f"Confusion matrix (argmax calls); balanced accuracy {_fmt(mc.balanced_accuracy)}, "
                     f"macro-F1 {_fmt(mc.f1_macro)}, MCC {_fmt(mc.mcc)}, kappa {_fmt(mc.kappa)}")  # fmt: skip
        return fig
    metrics = result.analysis.overall[:16]
    rows, cols = _grid(len(metrics))
    fig.suptitle("Confusion matrices at the model's thresholds (rows: truth, columns: call)")
    for k, m in enumerate(metrics):
        ax = fig.add_subplot(rows, cols, k + 1)
        c = m.confusion
        _matrix(ax, np.array([[c["tn"], c["fp"]], [c["fn"], c["tp"]]]), ["neg", "pos"])
        ax.set_title(f"{m.label} (threshold {m.threshold:.2f})" if m.threshold is not None else m.label, fontsize=8)
    fig.tight_layout()
    return fig


def _matrix(ax: Axes, matrix: np.ndarray, names: list[str]) -> None:
    ax.imshow(matrix, cmap="Blues")
    peak = matrix.max() if matrix.size else 0
    for (i, j), v in np.ndenumerate(matrix):
        ax.text(j, i, str(int(v)), ha="center", va="center", fontsize=8, color="white" if v > peak / 2 else "black")
    ax.set_xticks(range(len(names)), names, fontsize=7)
    ax.set_yticks(range(len(names)), names, fontsize=7)
    ax.set_xlabel("call", fontsize=7)
    ax.set_ylabel("truth", fontsize=7)


def render_pdf(result: AuditResult) -> tuple[bytes, int]:
    """The audit PDF's bytes and its number of pages."""
    out = io.BytesIO()
    pages = 0
    # labels, file names and subgroup levels are data: a pair of ``$`` in them is not mathematics
    with rc_context({"pdf.fonttype": 42, "font.size": 8, "text.parse_math": False}), PdfPages(out) as pdf:
        metadata = pdf.infodict()
        metadata["Title"] = f"meddaemon audit: {result.task} {result.model_version}"
        lines = _summary_lines(result)
        figures: list[Figure] = [_summary(result, lines)]
        if len(lines) > SUMMARY_LINES:
            figures += _continued_summary(lines[SUMMARY_LINES - 1 :])
        overall = result.analysis.overall
        figures += _label_pages(overall, "ROC curves (band: pointwise 95% Wilson interval of sensitivity)", _draw_roc)
        figures += _label_pages(
            overall,
            "Reliability diagrams (10 equal-width bins; bars: 95% Wilson interval of the observed rate)",
            _draw_reliability,
        )
        figures += list(_forest_pages(result))
        figures.append(_confusion_page(result))
        for fig in figures:
            pdf.savefig(fig)
            pages += 1
    return out.getvalue(), pages
