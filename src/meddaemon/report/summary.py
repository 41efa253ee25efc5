"""The summary of a period (``medcli report summary --since 24h``): what came in, what the models
said, what failed and how fast, as a dataclass (for ``--json``) and as a PDF.

No patient data at all: counts, calls, reasons, latencies and probabilities only.
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta

import numpy as np
from reportlab.graphics.shapes import Drawing, Line, Rect
from reportlab.lib import colors
from reportlab.lib.units import mm
from reportlab.platypus import Flowable, KeepTogether, Paragraph, Spacer, Table, TableStyle
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from meddaemon.db.models import ModelVersion, Result, Scan, utcnow
from meddaemon.db.queries import newest_version_of
from meddaemon.report.fonts import Fonts
from meddaemon.report.render import BODY_WIDTH, RULE, Rendered, Styles, build, styles, when
from meddaemon.report.templates import ReportTemplate, load_template
from meddaemon.report.text import markup

BINS = 10
BAR = colors.HexColor("#3b6fb6")
_RELATIVE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([hdm])\s*$", re.IGNORECASE)


def parse_since(text: str, now: datetime | None = None) -> datetime:
    """``24h``, ``7d``, ``90m``, an ISO date (``2026-11-23``: its midnight, UTC) or an ISO time."""
    now = now or utcnow()
    match = _RELATIVE.match(text)
    if match:
        amount, unit = float(match.group(1)), match.group(2).lower()
        try:
            return now - timedelta(**{{"h": "hours", "d": "days", "m": "minutes"}[unit]: amount})
        except OverflowError:
            raise ValueError(f"{text!r} is too far back") from None
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError as exc:
        raise ValueError(f"{text!r} is neither a duration (24h, 7d, 90m) nor an ISO date or time") from exc
    # in UTC: the database keeps times without their zone (SQLite compared 10:00+02:00 as 10:00 UTC)
    return moment.astimezone(UTC) if moment.tzinfo else moment.replace(tzinfo=UTC)


@dataclass
class LabelSummary:
    n: int = 0
    positive: int = 0
    #: counts of probabilities in [0, 0.1), [0.1, 0.2) ... [0.9, 1.0]
    histogram: list[int] = field(default_factory=lambda: [0] * BINS)


@dataclass
class TaskSummary:
    task: str
    kind: str
    scans: int
    states: dict[str, int]
    labels: dict[str, LabelSummary]
    #: multiclass: how many scans each label was the most likely class of
    top_label: dict[str, int]
    latency_ms: dict[str, float | None]


@dataclass
class PeriodSummary:
    since: datetime
    until: datetime
    scans: int
    states: dict[str, int]
    failures_by_reason: dict[str, int]
    tasks: dict[str, TaskSummary]

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def _percentiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"n": 0, "p50": None, "p90": None, "p99": None, "max": None}
    array = np.asarray(values, dtype=np.float64)
    p50, p90, p99 = np.percentile(array, [50, 90, 99])
    return {"n": len(values), "p50": float(p50), "p90": float(p90), "p99": float(p99), "max": float(array.max())}


def summarise(session: Session, since: datetime, until: datetime | None = None) -> PeriodSummary:
    """Scans registered in [since, until): states, failures, and per task the calls, latency and
    probability histograms of their results."""
    until = until or utcnow()
    window = (Scan.registered_at >= since, Scan.registered_at < until)
    by_state = session.execute(
        select(Scan.task_name, Scan.state, func.count()).where(*window).group_by(Scan.task_name, Scan.state)
    ).all()
    failures = dict(
        session.execute(
            select(Scan.failure_reason, func.count())
            .where(*window, Scan.failure_reason.is_not(None))
            .group_by(Scan.failure_reason)
        ).all()
    )
    rows = session.execute(
        select(Scan.task_name, Result.scan_id, Result.label, Result.probability, Result.positive, Result.latency_ms)
        .join(Result, Result.scan_id == Scan.id)
        .where(*window, Result.model_version_id == newest_version_of(Result.scan_id))
        .order_by(Result.id)
    ).all()
    manifests: dict[str, dict[str, object]] = {
        task: manifest for task, manifest in session.execute(select(ModelVersion.task_name, ModelVersion.manifest))
    }

    states: Counter[str] = Counter()
    task_states: dict[str, Counter[str]] = defaultdict(Counter)
    for task, state, count in by_state:
        states[state] += count
        task_states[task or "(unrouted)"][state] += count

    labels: dict[str, dict[str, LabelSummary]] = defaultdict(dict)
    latency: dict[str, dict[int, float]] = defaultdict(dict)
    best: dict[int, tuple[float, str, str]] = {}
    for task_name, scan_id, label, probability, positive, latency_ms in rows:
        task = task_name or "(unrouted)"
        entry = labels[task].setdefault(label, LabelSummary())
        entry.n += 1
        entry.positive += bool(positive)
        entry.histogram[min(BINS - 1, max(0, int(probability * BINS)))] += 1
        if latency_ms is not None:
            latency[task][scan_id] = latency_ms
        if scan_id not in best or probability > best[scan_id][0]:
            best[scan_id] = (probability, label, task)
    tops: dict[str, Counter[str]] = defaultdict(Counter)
    for _, label, task in best.values():
        tops[task][label] += 1

    tasks = {}
    for task in sorted(task_states):
        manifest = manifests.get(task) or {}
        tasks[task] = TaskSummary(
            task=task,
            kind=str(manifest.get("kind", "")),
            scans=sum(task_states[task].values()),
            states=dict(task_states[task]),
            labels=labels.get(task, {}),
            top_label=dict(tops.get(task, {})),
            latency_ms=_percentiles(list(latency[task].values())),
        )
    return PeriodSummary(
        since, until, sum(states.values()), dict(states), {str(k): v for k, v in failures.items()}, tasks
    )


# -- the PDF -------------------------------------------------------------------------------------


def _histogram(counts: list[int], width: float = 60 * mm, height: float = 7 * mm) -> Drawing:
    """Ten bars, probability 0 (left) to 1 (right), scaled to the fullest bin."""
    drawing = Drawing(width, height)
    top = max(counts) or 1
    bar = width / len(counts)
    for i, count in enumerate(counts):
        h = (height - 1) * count / top
        if count:
            drawing.add(
                Rect(i * bar + 0.4, 0, bar - 0.8, max(h, 0.6), fillColor=colors.HexColor("#3b6fb6"), strokeColor=None)
            )
    drawing.add(Line(0, 0, width, 0, strokeColor=colors.grey, strokeWidth=0.4))
    return drawing


def _table(rows: list[list[object]], widths: list[float], st: Styles) -> Table:
    table = Table(rows, colWidths=widths, repeatRows=1)
    table.setStyle(
        TableStyle(
            [
                ("FONT", (0, 0), (-1, -1), st.fonts.regular, 8.5),
                ("FONT", (0, 0), (-1, 0), st.fonts.bold, 8.5),
                ("LINEBELOW", (0, 0), (-1, 0), 0.6, colors.black),
                ("LINEBELOW", (0, 1), (-1, -1), 0.25, RULE),
                ("VALIGN", (0, 0), (-1, -1), "MIDDLE"),
                ("TOPPADDING", (0, 0), (-1, -1), 1.2),
                ("BOTTOMPADDING", (0, 0), (-1, -1), 1.2),
            ]
        )
    )
    return table


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f}"


def _task_section(task: TaskSummary, template: ReportTemplate, st: Styles) -> list[Flowable]:
    states = ", ".join(f"{state} {n}" for state, n in sorted(task.states.items()))
    lat = task.latency_ms
    out: list[Flowable] = [
        Paragraph(markup(f"Task {task.task} ({task.kind or 'no model'}): {task.scans} scans", 200), st.heading),
        Paragraph(markup(f"States: {states}", 2000), st.body),
        Paragraph(
            f"Arrival to result (ms, {lat['n']} scans): p50 {_ms(lat['p50'])}, p90 {_ms(lat['p90'])}, "
            f"p99 {_ms(lat['p99'])}, max {_ms(lat['max'])}",
            st.body,
        ),
    ]
    if task.labels:
        header = ["Label", "Results", "Positive", "% positive", "Top class", "Probabilities 0 to 1"]
        shown = list(task.labels.items())
        if task.kind == "binary":
            shown = shown[-1:]  # the positive class; the other label's probability is 1 - p
        rows: list[list[object]] = [list(header)]
        for label, entry in shown:
            share = f"{100 * entry.positive / entry.n:.1f}" if entry.n else "-"
            rows.append(
                [
                    Paragraph(markup(template.label(label), 120), st.cell),  # a custom task's label: any text
                    entry.n,
                    entry.positive,
                    share,
                    task.top_label.get(label, 0) if task.kind == "multiclass" else "",
                    _histogram(entry.histogram),
                ]
            )
        out += [Spacer(1, 2 * mm), _table(rows, [45 * mm, 18 * mm, 18 * mm, 20 * mm, 18 * mm, 62 * mm], st)]
    return [KeepTogether(out[:3]), *out[3:]]


def render_summary(summary: PeriodSummary, fonts: Fonts) -> Rendered:
    st = styles(fonts)
    words = load_template("default").summary
    story: list[Flowable] = [
        Paragraph(words["title"], st.title),
        Paragraph(words["period"].format(since=when(summary.since), until=when(summary.until)), st.subtitle),
        Paragraph("Scans", st.heading),
    ]
    state_rows: list[list[object]] = [["State", "Scans"]]
    state_rows += [[state, n] for state, n in sorted(summary.states.items())]
    state_rows.append(["all", summary.scans])
    failure_rows: list[list[object]] = [["Failure reason", "Scans"]]
    failure_rows += [[reason, n] for reason, n in sorted(summary.failures_by_reason.items(), key=lambda kv: -kv[1])]
    if len(failure_rows) == 1:
        failure_rows.append(["(none)", 0])
    side = Table(
        [[_table(state_rows, [40 * mm, 20 * mm], st), _table(failure_rows, [50 * mm, 20 * mm], st)]],
        colWidths=[BODY_WIDTH / 2] * 2,
    )
    side.setStyle(TableStyle([("VALIGN", (0, 0), (-1, -1), "TOP"), ("LEFTPADDING", (0, 0), (-1, -1), 0)]))
    story.append(side)
    for task in summary.tasks.values():
        story += _task_section(task, load_template(task.task), st)
    footer = f"meddaemon summary {when(summary.since)} to {when(summary.until)} UTC"
    return build(story, "meddaemon summary", f"{summary.scans} scans", footer, st)
