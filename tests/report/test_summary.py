"""The summary of a period: the figures from the database, and the PDF they make."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest

from meddaemon.daemon.service import Daemon
from meddaemon.report.fonts import report_fonts
from meddaemon.report.summary import parse_since, render_summary, summarise
from model_factory import PHI_STRINGS, ReportedStates, promote, read_pdf, store_busi_results, write_model

NOW = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("24h", NOW - timedelta(hours=24)),
        ("7d", NOW - timedelta(days=7)),
        ("90m", NOW - timedelta(minutes=90)),
        ("2026-11-20", datetime(2026, 11, 20, tzinfo=UTC)),
        ("2026-11-20T06:30:00+01:00", datetime(2026, 11, 20, 5, 30, tzinfo=UTC)),
    ],
)
def test_since_takes_a_duration_or_an_iso_date(text: str, expected: datetime):
    assert parse_since(text, NOW) == expected


def test_since_refuses_anything_else():
    with pytest.raises(ValueError, match="neither a duration"):
        parse_since("yesterday", NOW)
    with pytest.raises(ValueError, match="too far back"):  # an OverflowError traceback, exit 1
        parse_since("1000000d", NOW)


def test_a_time_with_another_offset_selects_the_same_scans_as_its_utc_time(reported: Daemon):
    """SQLite keeps times without their zone: 10:00+02:00 was compared as 10:00 UTC, two hours late
    (no scan), and 09:00-05:00 five hours early (every scan, after --until too)."""
    an_hour_ago = datetime.now(UTC) - timedelta(hours=1)
    east = an_hour_ago.astimezone(timezone(timedelta(hours=2))).isoformat()
    with reported.sessions() as session:
        assert summarise(session, parse_since(east)).scans == summarise(session, an_hour_ago).scans == 8
    assert parse_since(east).tzinfo == UTC


def test_a_scan_run_by_two_model_versions_is_counted_once_with_the_newest_version_s_calls(
    reported_states: ReportedStates, tmp_path: Path
):
    """Every version's results were counted: 8 calls for 5 multiclass scans."""
    daemon = reported_states.copy(tmp_path / "state")
    promote(daemon, write_model(tmp_path / "busi_v2", version="v2"))
    store_busi_results(daemon, "v2")
    with daemon.sessions() as session:
        busi = summarise(session, parse_since("24h")).tasks["busi"]
    assert busi.scans == 6 and sum(busi.top_label.values()) == 6
    assert all(entry.n == 6 for entry in busi.labels.values())
    assert sum(entry.positive for entry in busi.labels.values()) == 6


def test_the_summary_counts_calls_failures_latency_and_probabilities_per_task(reported: Daemon):
    with reported.sessions() as session:
        figures = summarise(session, parse_since("24h"))
        nothing = summarise(session, parse_since("48h"), parse_since("24h"))
    assert figures.scans == 8 and figures.states == {"archived": 7, "failed": 1}
    assert figures.failures_by_reason == {"empty_file": 1}
    busi, cxr = figures.tasks["busi"], figures.tasks["chestxray14"]
    assert (busi.scans, busi.kind, cxr.scans, cxr.kind) == (6, "multiclass", 1, "multilabel")
    assert sum(busi.top_label.values()) == 6
    assert set(busi.labels) == {"benign", "malignant", "normal"}
    for entry in busi.labels.values():
        assert entry.n == 6 and sum(entry.histogram) == 6
    assert sum(e.positive for e in busi.labels.values()) == 6  # multiclass: one call per scan
    assert len(cxr.labels) == 14
    assert busi.latency_ms["n"] == 6 and 0 < busi.latency_ms["p50"] <= busi.latency_ms["max"]
    assert nothing.scans == 0 and nothing.tasks == {}


def test_the_summary_pdf_shows_the_figures_and_no_patient_data(reported: Daemon):
    with reported.sessions() as session:
        figures = summarise(session, parse_since("24h"))
    rendered = render_summary(figures, report_fonts())
    text, pages, _, metadata = read_pdf(rendered.data)
    assert pages == rendered.pages == 1
    assert "Daily summary" in text and "Task busi (multiclass): 6 scans" in text
    assert "Task chestxray14 (multilabel): 1 scans" in text and "Pleural thickening" in text
    assert "archived 7" in text and "empty_file 1" in text
    assert not any(phi in text for phi in PHI_STRINGS)
    assert metadata["/Title"] == "meddaemon summary"


def test_a_custom_task_s_labels_are_shown_as_written_not_read_as_markup():
    """'<b>big</b> &lt;5mm' came out as a bold "big <5mm": the summary put labels into paragraphs
    unescaped (a custom task's label may be any text)."""
    from meddaemon.report.summary import LabelSummary, PeriodSummary, TaskSummary

    labels = {"<b>big</b> &lt;5mm": LabelSummary(4, 1), "R&D": LabelSummary(4, 3)}
    task = TaskSummary("a_custom_task", "multilabel", 4, {"archived": 4}, labels, {}, {"n": 0})
    task.latency_ms.update({"p50": None, "p90": None, "p99": None, "max": None})
    figures = PeriodSummary(NOW - timedelta(days=1), NOW, 4, {"archived": 4}, {}, {"a_custom_task": task})
    text = read_pdf(render_summary(figures, report_fonts()).data)[0]
    assert "<b>big</b> &lt;5mm" in text and "R&D" in text
