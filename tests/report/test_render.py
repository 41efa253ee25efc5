"""Scan and study reports rendered from hand-made data and read back: text, pages, images."""

from __future__ import annotations

import io
import logging
import re
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest

from meddaemon.engine.overlay import jpeg_bytes
from meddaemon.engine.tasks import BUILTIN_TASKS, NIH_FINDINGS
from meddaemon.label_results import LabelResult
from meddaemon.report import fonts
from meddaemon.report.content import ModelInfo, PatientInfo, ScanReportData, StudyReportData
from meddaemon.report.fonts import report_fonts
from meddaemon.report.images import colour_scale_jpeg
from meddaemon.report.render import POSITIVE, ScanImages, render_scan, render_study
from meddaemon.report.templates import TemplateError, _check, load_template
from model_factory import read_pdf

_SEEDS = iter(range(10**6))


def jpeg() -> bytes:
    """A distinct JPEG each time (reportlab embeds identical images once)."""
    return jpeg_bytes(np.random.default_rng(next(_SEEDS)).integers(0, 255, (64, 64, 3), dtype=np.uint8))


AT = datetime(2026, 11, 23, 8, 30, tzinfo=UTC)


def scan_data(task: str = "busi", positives: set[str] | None = None, heatmaps: bool = True, **kw) -> ScanReportData:
    spec = BUILTIN_TASKS[task]
    labels = spec.labels
    if positives is None:
        positives = {labels[-1]}
    results = [
        LabelResult(
            label,
            0.9 if label in positives else 0.1,
            0.5,
            label in positives,
            overlay_path=Path(f"/nowhere/{label}.jpg") if heatmaps and label in positives else None,
        )
        for label in labels
    ]
    values = {
        "scan_id": 42,
        "sha256": "ab" * 32,
        "task": task,
        "description": spec.description,
        "source_name": f"{task}/synthetic.png",
        "model": ModelInfo(task, "v7", spec.architecture, "cd" * 32, spec.kind, spec.contract),
        "results": results,
        "metadata": [("Modality", "US"), ("Manufacturer", "SYNTHETIC-VENDOR"), ("Size", "64 x 64 px")],
        "discovered_at": AT,
        "registered_at": AT,
        "result_at": AT,
        "latency_ms": 120.0,
        "study_instance_uid": None,
        "stored_path": None,
    }
    values.update(kw)
    return ScanReportData(**values)


def images_for(data: ScanReportData, model_view: bool = True) -> ScanImages:
    return ScanImages(jpeg() if model_view else None, {r.label: jpeg() for r in data.heatmaps}, colour_scale_jpeg())


def render(data: ScanReportData, images: ScanImages | None = None) -> tuple[str, int, int, dict[str, str]]:
    rendered = render_scan(data, images or images_for(data), load_template(data.task), report_fonts())
    result = read_pdf(rendered.data)
    assert result[1] == rendered.pages
    return result


def test_a_scan_report_has_the_images_the_calls_the_model_and_the_disclaimer():
    text, pages, images, metadata = render(scan_data())
    assert pages == 1
    assert images == 3  # the model's view, the overlay, the colour scale
    assert "Breast ultrasound: classifier result" in text  # busi.toml's title
    assert "Normal tissue (probability 90%)" in text  # the top finding in the template's words
    assert "not a diagnosis" in text
    assert "busi/v7" in text and "cdcdcdcdcdcdcdcd" in text and "mobilenet_v2" in text
    assert "SYNTHETIC-VENDOR" in text and "2026-11-23 08:30:00" in text
    assert "De-identified report" in text and "Patient (PHI)" not in text
    assert metadata["/Title"] == "Scan report 42" and metadata["/Author"] == "meddaemon"


def test_the_pictures_are_embedded_as_the_jpeg_bytes_given_never_decoded(monkeypatch):
    from PIL import ImageFile

    decoded: list[object] = []
    load = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda image: decoded.append(image) or load(image))
    data = scan_data("chestxray14", positives=set(NIH_FINDINGS[:3]))
    images = images_for(data)

    rendered = render_scan(data, images, load_template(data.task), report_fonts())

    assert decoded == []
    pictures = [images.model_view, *images.overlays.values(), images.colour_scale]
    assert len(pictures) == 5 and all(picture in rendered.data for picture in pictures)
    assert rendered.data.count(b"/DCTDecode") == 5


def test_streams_are_compressed_as_reportlab_does_and_the_fonts_once_for_report_after_report(monkeypatch):
    import zlib

    from meddaemon.report import render as module

    compressed: list[int] = []
    compress = zlib.compress
    monkeypatch.setattr(zlib, "compress", lambda data, *a: compressed.append(len(data)) or compress(data, *a))
    module._compressed.cache_clear()
    data = scan_data()
    text, pages, _, _ = render(data)
    first = sorted(compressed)
    compressed.clear()

    again = render(data)

    assert again[:2] == (text, pages)
    fonts = [n for n in first if n >= module.KEPT_STREAM_BYTES]
    assert len(fonts) == 2  # the regular and the bold subset
    assert sorted(compressed) == [n for n in first if n < module.KEPT_STREAM_BYTES]
    for length in (100, module.KEPT_STREAM_BYTES + 1):
        stream = bytes(range(256)) * (length // 256 + 1)
        assert module._flate(None, stream) == compress(stream) == module._flate(None, stream)
    assert module._flate(None, "text") == compress(b"text")


def test_the_call_rule_is_the_top_class_for_multiclass_and_the_threshold_otherwise():
    multiclass, *_ = render(scan_data("busi"))
    binary, *_ = render(scan_data("covid", positives={"covid"}))
    assert "Call rule" in multiclass and "top class" in multiclass and "Threshold" not in multiclass
    assert "Threshold" in binary and "0.50" in binary and "top class" not in binary


def text_drawn_in(pdf: bytes, colour: tuple[float, float, float]) -> list[str]:
    """The text runs of ``pdf`` drawn with the fill colour ``colour`` (RGB, 0 to 1)."""
    from pypdf import PdfReader

    fill: list[tuple[float, ...]] = [()]
    found: list[str] = []

    def before(operator: bytes, operands: list, *_: object) -> None:  # type: ignore[type-arg]
        if operator == b"rg":
            fill[0] = tuple(round(float(v), 3) for v in operands)

    def text(run: str, *_: object) -> None:
        if fill[0] == colour and run.strip():
            found.append(run.strip())

    for page in PdfReader(io.BytesIO(pdf)).pages:
        page.extract_text(visitor_operand_before=before, visitor_text=text)
    return found


def test_a_multiclass_top_class_is_called_in_black_not_highlighted_as_a_positive_finding():
    """The table showed the top class in red as "positive" though it was "Normal tissue", under a
    finding sentence in black: a normal reading styled as an alarm."""
    alarm = tuple(round(c, 3) for c in POSITIVE.rgb())
    busi = scan_data("busi")  # its top class: normal
    pdf = render_scan(busi, images_for(busi), load_template("busi"), report_fonts()).data
    assert text_drawn_in(pdf, alarm) == []
    assert "Normal tissue 0.900 top class called" in read_pdf(pdf)[0]
    covid = scan_data("covid", positives={"covid"})
    pdf = render_scan(covid, images_for(covid), load_template("covid"), report_fonts()).data
    assert "positive" in text_drawn_in(pdf, alarm)


def test_a_binary_model_s_negative_class_is_called_in_black_never_a_red_positive():
    """A negative histopathology scan's table read "No IDC 0.502 0.500 positive" in red, under the
    finding "Invasive ductal carcinoma: negative": the engine calls the negative class when the
    finding is not, and the table styled that call as an alarm. Only the finding is one."""
    alarm = tuple(round(c, 3) for c in POSITIVE.rgb())
    negative = scan_data("histopathology", positives={"idc_negative"})
    pdf = render_scan(negative, images_for(negative), load_template("histopathology"), report_fonts()).data
    text = " ".join(read_pdf(pdf)[0].split())
    assert text_drawn_in(pdf, alarm) == []
    assert "No IDC 0.900 0.500 called IDC 0.100 0.500 negative" in text
    positive = scan_data("covid", positives={"covid"})
    pdf = render_scan(positive, images_for(positive), load_template("covid"), report_fonts()).data
    text = " ".join(read_pdf(pdf)[0].split())
    assert "Normal 0.100 0.500 COVID-19 0.900 0.500 positive" in text
    assert text_drawn_in(pdf, alarm).count("positive") == 1


def test_multilabel_has_one_overlay_per_positive_label():
    positives = {"Effusion", "Mass", "Hernia"}
    text, _, images, _ = render(scan_data("chestxray14", positives))
    assert images == 1 + len(positives) + 1
    for label in positives:
        assert f"Where the model looked for {label}" in text
    assert "3 of 14 findings over threshold" in text
    assert len(NIH_FINDINGS) == 14


def test_a_map_that_marks_nothing_says_so_under_its_overlay():
    """Its overlay is the bare scan, which read as "where the model looked" without a word."""
    data = scan_data("chestxray14", {"Effusion", "Mass"})
    images = images_for(data)
    images.flat_maps.add("Mass")
    text = " ".join(render(data, images)[0].split())
    assert "Where the model looked for Mass. The map is flat: it marks no part of the image over another" in text
    assert text.count("The map is flat") == 1  # Effusion's map marks something
    images.overlays["Mass"] = None  # no picture: nothing shows through
    text = " ".join(render(data, images)[0].split())
    assert "The map is flat" not in text and "The heatmap overlay file is missing" in text


def test_the_builder_finds_the_flat_maps_among_the_stored_grids(make_settings, tmp_path):
    from meddaemon.engine.heatmap_grid import grid_bytes
    from meddaemon.report.builder import ReportBuilder

    marked = np.zeros((7, 7), np.float32)
    marked[2, 2] = 1.0
    data = scan_data("chestxray14", {"Effusion", "Mass"})
    grids = {"Effusion": grid_bytes(marked), "Mass": grid_bytes(np.zeros((7, 7), np.float32))}
    results = [replace(r, grid=grids.get(r.label), map_size=(64, 64)) for r in data.results]
    images = ReportBuilder(make_settings(), sessions=None).images(replace(data, results=results))
    assert images.flat_maps == {"Mass"}


def test_a_result_without_a_heatmap_says_so_and_has_no_overlay():
    text, _, images, _ = render(scan_data(heatmaps=False))
    assert images == 1  # the model's view only: no overlay, no colour scale
    assert "No heatmap: none was stored for this result" in text


def test_a_model_that_makes_no_heatmaps_is_named_as_the_reason():
    """An imported ONNX graph without a CAM feature map: the report says the model makes none."""
    data = scan_data(heatmaps=False)
    text, _, images, _ = render(replace(data, model=replace(data.model, heatmaps=False)))
    assert images == 1
    assert "No heatmap: this model makes none (it exposes no feature map for CAM" in text


def test_multilabel_without_positive_labels_explains_the_missing_heatmap():
    text, _, images, _ = render(scan_data("chestxray14", positives=set()))
    assert images == 1
    assert "no label is over its threshold" in text and "None of the 14 findings" in text


def test_a_missing_overlay_file_or_unreadable_scan_is_stated_not_fatal():
    data = scan_data("covid")
    text, _, images, _ = render(data, ScanImages(None, {"covid": None}, colour_scale_jpeg()))
    assert images == 1  # the colour scale
    assert "could not be read again" in text and "overlay file is missing" in text
    assert "COVID-19 pattern: POSITIVE" in text


NAMES = {
    "unicode": "SYNTHETIC^Ωμέγα^Ковалёва",
    "rtl": "SYNTHETIC^שלום^مريم",
    "long": "SYNTHETIC^" + "X" * 500,
    "control": "SYNTHETIC\x00^EVIL\x1b[31m\u202eNAME\x07",
}


@pytest.mark.parametrize("kind", sorted(NAMES))
def test_hostile_patient_names_render_or_are_cut_visibly(kind: str):
    patient = PatientInfo(NAMES[kind], "PID\x00\x01" + "9" * 300, "19700101", "O", "054Y", "ACC\n1")
    text, pages, _, metadata = render(scan_data(patient=patient))
    assert pages >= 1 and "Patient (PHI)" in text
    assert not any(ord(c) < 32 for c in text)
    assert all(NAMES[kind] not in value for value in metadata.values())
    if kind == "long":
        packed = text.replace(" ", "")
        assert "X" * 40 in packed and "X\u2026" in packed and "X" * 80 not in packed
    if kind == "unicode":
        assert "Ωμέγα" in text and "Ковалёва" in text
    if kind == "rtl":
        assert "SYNTHETIC" in text and ("שלום" in text or "םולש" in text)
    if kind == "control":
        assert "EVIL" in text and "NAME" in text and "\u202e" not in text


def test_several_long_header_values_at_once_are_laid_out_one_section_after_another():
    """Each value is cut to fit, but side by side the model, scan, times and patient sections made
    one table row taller than a page, which reportlab cannot split: 'LayoutError', the scan left
    ``inferred``, every retry and ``medcli report`` failing the same way (the study report too)."""
    words = " ".join(["WWWWWWWW"] * 40)  # SYNTHETIC values of wide letters: the tallest wrapped
    patient = PatientInfo(words, words, "19700101", "O", "054Y", words)
    metadata = [("Modality", "US"), ("Manufacturer", words), ("Body part", words), ("View", words), ("Size", "64 x 64")]
    data = scan_data(patient=patient, metadata=metadata, scan_id=1, study_instance_uid="1.2.3")

    text, pages, _, _ = render(data)
    study = render_study(StudyReportData("1.2.3", [data]), [images_for(data)], load_template, report_fonts())

    assert pages >= 2 and read_pdf(study.data)[1] == study.pages >= 2
    for heading in ("Model", "Patient (PHI)", "Manufacturer", "Body part", "View", "Accession number"):
        assert heading in text
    assert text.count("WWWWWWWW") > 40 and text.count("\u2026") == 6  # each long value there, cut visibly


def test_characters_the_report_font_cannot_draw_are_marked_and_the_log_names_the_setting(caplog):
    """DejaVu Sans has no CJK: a Japanese name on a report with PHI was drawn as empty boxes around
    "=", without a word. The log names reports_font, never the characters (they are the name)."""
    name = "山田^太郎=ヤマダ^タロウ"  # SYNTHETIC
    patient = PatientInfo(name, "SYNTH-ID-1", "19700101", "M", "054Y", "SYNTHACC1")
    data = replace(scan_data(patient=patient), metadata=[("Manufacturer", "SYNTHETIC 日本 Medical")])
    fonts._say_characters_are_missing.cache_clear()  # said once per process and font
    with caplog.at_level(logging.WARNING, logger="meddaemon.report"):
        text, *_ = render(data)
    assert "Name [?] [?] = [?] [?]" in text and "SYNTHETIC [?] Medical" in text
    assert "山" not in text and "ヤ" not in text
    (warning,) = [r.getMessage() for r in caplog.records if "no glyph" in r.getMessage()]
    assert "set reports_font" in warning and "山" not in warning and "ヤ" not in warning


def test_a_study_report_lists_every_scan_then_each_scans_sections():
    first = scan_data(scan_id=1, study_instance_uid="1.2.3")
    second = scan_data("busi", {"malignant"}, scan_id=2, sha256="ef" * 32, study_instance_uid="1.2.3")
    study = StudyReportData("1.2.3", [first, second])
    rendered = render_study(study, [images_for(first), images_for(second)], load_template, report_fonts())
    text, pages, images, metadata = read_pdf(rendered.data)
    assert pages == rendered.pages >= 2
    assert images == 6
    assert "Study summary" in text and "2 scans of this study" in text
    assert "Malignant lesion" in text and "Normal tissue" in text
    assert "1.2.3" not in text.replace(study.study_key, "")  # de-identified: named by a hash of its UID
    assert study.study_key in metadata["/Title"]


def test_a_study_report_keeps_each_heading_with_what_it_heads_and_names_the_scan_on_every_page_it_spans():
    """A heading was left alone at a page's foot ("Probabilities", its table overleaf), a scan's
    table was cut between its rows (the called class alone on the next page), and pages of overlays
    and tables named no scan. Three chestxray14 scans of 14 findings, several called (SYNTHETIC)."""
    from io import BytesIO

    from pypdf import PdfReader

    called = [set(NIH_FINDINGS[n : n + 6]) for n in range(3)]
    scans = [
        scan_data("chestxray14", called[n], scan_id=n + 1, sha256=f"{n:02}" * 32, study_instance_uid="1.2.3")
        for n in range(3)
    ]
    study = StudyReportData("1.2.3", scans)
    rendered = render_study(study, [images_for(s) for s in scans], load_template, report_fonts())
    pages = [" ".join((page.extract_text() or "").split()) for page in PdfReader(BytesIO(rendered.data)).pages]

    assert len(pages) > 3
    for n, page in enumerate(pages, 1):
        for heading in ("Image and heatmap", "Probabilities"):
            for found in re.finditer(rf"{heading} \(scan (\d+)\)", page):
                rest = page[found.end() :].replace("meddaemon study", "").strip()
                assert len(rest) > 40, f"page {n} ends with the heading {found.group(0)!r}"
    for scan in scans:
        tables = [page for page in pages if f"Probabilities (scan {scan.scan_id})" in page]
        assert len(tables) == 1, scan.scan_id
        labels = [page for page in pages if "Pneumothorax" in page and f"(scan {scan.scan_id})" in page]
        assert tables[0] in labels  # the last finding on the page of its table's heading


def test_a_study_report_with_phi_whose_scans_name_different_patients_shows_each_and_says_so():
    """The first scan's patient stood for every scan of the study (a merged or mislabelled study)."""
    one = PatientInfo("SYNTHETIC^FIRST", "SYNTH-ID-1", "19700101", "F", "056Y", "SYNTHACC1")
    other = PatientInfo("SYNTHETIC^SECOND", "SYNTH-ID-2", "19800101", "M", "046Y", "SYNTHACC2")
    scans = [
        scan_data(scan_id=1, study_instance_uid="1.2.3", patient=one),
        scan_data(scan_id=2, sha256="ef" * 32, study_instance_uid="1.2.3", patient=other),
    ]
    study = StudyReportData("1.2.3", scans, one)
    text = " ".join(
        read_pdf(render_study(study, [images_for(s) for s in scans], load_template, report_fonts()).data)[0].split()
    )
    assert "The scans of this study name 2 different patients" in text
    assert "SYNTH-ID-1" in text and "SYNTH-ID-2" in text
    same_person = replace(one, age=None, accession_number="SYNTHACC9")  # a derived image, another order
    same = StudyReportData("1.2.3", [replace(scans[1], patient=same_person), scans[0]], one)
    text = " ".join(
        read_pdf(render_study(same, [images_for(s) for s in scans], load_template, report_fonts()).data)[0].split()
    )
    assert "different patients" not in text and "differ in their patient details" in text
    assert "SYNTHACC9" in text and "SYNTHACC1" in text  # each order's accession number, in its scan's section
    alike = StudyReportData("1.2.3", [replace(scans[1], patient=one), scans[0]], one)
    text = " ".join(
        read_pdf(render_study(alike, [images_for(s) for s in scans], load_template, report_fonts()).data)[0].split()
    )
    assert "differ" not in text and text.count("SYNTH-ID-1") == 1


@pytest.mark.parametrize("task", [*sorted(BUILTIN_TASKS), "a_custom_task"])
def test_every_template_loads_and_words_every_finding(task: str):
    template = load_template(task)
    for key in template.finding:
        assert template.finding[key].format(
            label="L", probability=0.5, threshold=0.5, probability_text="50%", threshold_text="50%", labels="L", count=1
        )
    assert template.disclaimer and template.sections[0] == "finding"


def test_a_template_with_an_unknown_field_is_refused_with_its_key():
    with pytest.raises(TemplateError, match=r"finding\.multiclass"):
        _check("broken", {"finding": {"multiclass": "{no_such_field}"}})


def test_the_report_of_a_custom_task_uses_the_default_template():
    data = replace(scan_data(), task="a_custom_task")
    text, *_ = render(data)
    assert "Classifier result" in text


def test_every_label_of_a_key_value_table_fits_its_column_in_the_report_s_own_bold_font():
    """'Accession number' in bold 9 pt is wider than the 32 mm the column had with its padding: in
    every report with PHI it ran into its value ('Accession numberSYNTHACC01' read back)."""
    from reportlab.pdfbase.pdfmetrics import stringWidth

    from meddaemon.report.render import _kv_table, styles

    fonts = report_fonts()
    rows = [("Accession number", "SYNTHACC01"), ("Patient birth date", "19700101"), ("Sex", "O")]
    table = _kv_table(rows, styles(fonts))
    widest = max(stringWidth(label, fonts.bold, 9) for label, _ in rows)
    assert table._colWidths[0] >= widest + 2 * 6  # reportlab's padding, left and right


def word_boxes(pdf: bytes, tmp_path: Path) -> list[tuple[str, float]]:
    """Every word of the PDF and where it ends on its page (points from the left), by poppler's pdftotext."""
    import html
    import os
    import re
    import shutil
    import subprocess

    if shutil.which("pdftotext") is None:
        if os.environ.get("CI"):
            pytest.fail("pdftotext (Debian poppler-utils, scripts/system-packages.sh) is required in CI")
        pytest.skip("pdftotext (poppler-utils) is not installed")
    (tmp_path / "report.pdf").write_bytes(pdf)
    boxes = subprocess.run(
        ["pdftotext", "-bbox", str(tmp_path / "report.pdf"), "-"], capture_output=True, text=True, check=True
    ).stdout
    return [
        (html.unescape(w), float(x))
        for x, w in re.findall(r'<word xMin="[^"]+" yMin="[^"]+" xMax="([^"]+)"[^>]*>([^<]*)</word>', boxes)
    ]


def test_a_short_value_of_wide_letters_wraps_inside_its_column(tmp_path: Path):
    """Values of 30 characters or fewer went into cells as plain strings, which never wrap: "GE MEDICAL
    SYSTEMS ULTRASOUND" and a scan's id with its hash ran over the table's right rule, on the right
    half of the page nearly to the paper's edge, and a model's name into the next column."""
    from meddaemon.report.render import MARGIN, PAGE_WIDTH, STUDY_COLUMNS

    wide = "GE MEDICAL SYSTEMS ULTRASOUND"
    data = scan_data(
        scan_id=123456,
        metadata=[("Modality", "US"), ("Manufacturer", wide)],
        model=ModelInfo(
            "busi", "v20260115-retrained-final", "mobilenet_v2", "cd" * 32, "multiclass", BUILTIN_TASKS["busi"].contract
        ),
        patient=PatientInfo("SYNTHETIC^WIDE", "MRN-ABCDEFGHIJKLMNOPQRSTUVWXYZ", "19700101", "O", "056Y", "ACC1"),
    )
    rendered = render_scan(data, images_for(data), load_template("busi"), report_fonts())
    words = word_boxes(rendered.data, tmp_path)
    assert "ULTRASOUND" in {w for w, _ in words} and any("v20260115" in w for w, _ in words)
    assert [w for w, end in words if end > PAGE_WIDTH - MARGIN + 1] == []  # the footer's page number ends there
    scans = [replace(data, patient=None), replace(data, scan_id=123457, patient=None)]
    study = render_study(StudyReportData("1.2.3", scans), [images_for(s) for s in scans], load_template, report_fonts())
    model_column_end = MARGIN + 6 + sum(STUDY_COLUMNS) - 6  # less the cell's right padding
    in_model_column = [(w, end) for w, end in word_boxes(study.data, tmp_path) if "v2026" in w or "retrained" in w]
    assert in_model_column and all(end <= model_column_end for _, end in in_model_column)


@pytest.mark.parametrize(
    ("task", "probability", "threshold", "positive", "table", "finding"),
    [
        ("covid", 0.4996, 0.5, False, "0.4996 0.5000", "probability 49.96% (threshold 50.00%)"),
        ("covid", 0.348, 0.3468, True, "0.348 0.347", "probability 34.8% (threshold 34.7%)"),
        ("covid", 0.9, 0.5, True, "0.900 0.500", "probability 90% (threshold 50%)"),
    ],
    ids=["just under", "a tuned threshold just under", "far over"],
)
def test_a_probability_and_its_threshold_are_shown_to_the_digits_that_compare_as_the_call(
    task: str, probability: float, threshold: float, positive: bool, table: str, finding: str
):
    """0.4996 against 0.5, negative, read "0.500 0.50 negative" and "probability 50% (threshold 0.50)";
    0.348 against a Youden threshold of 0.3468, positive, "probability 35% (threshold 0.35)"."""
    data = scan_data(task, positives=set())
    data = replace(
        data, results=[replace(data.results[-1], probability=probability, threshold=threshold, positive=positive)]
    )
    text, *_ = render(data)
    flat = " ".join(text.split())
    assert table in flat, flat
    assert finding in flat, flat


def test_a_multiclass_top_class_is_shown_to_the_digits_that_rank_it_above_the_runner_up():
    """At 3 decimals the called class and the next read "0.450" and "0.450": two equal numbers, one called."""
    data = scan_data("busi")
    probabilities = {"benign": 0.45041, "malignant": 0.45049, "normal": 0.0991}
    data = replace(
        data,
        results=[replace(r, probability=probabilities[r.label], positive=r.label == "malignant") for r in data.results],
    )
    flat = " ".join(render(data)[0].split())
    assert "Benign lesion 0.4504 top class" in flat, flat
    assert "Malignant lesion 0.4505 top class called" in flat, flat
    assert "Normal tissue 0.0991 top class" in flat, flat


def rendered_in_india(monkeypatch: pytest.MonkeyPatch, **env: str) -> bytes:
    """A scan report's PDF rendered with TZ=Asia/Kolkata (UTC+05:30) and ``env`` set, then both unset."""
    import time

    monkeypatch.setenv("TZ", "Asia/Kolkata")
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    time.tzset()
    try:
        data = scan_data()
        return render_scan(data, images_for(data), load_template("busi"), report_fonts()).data
    finally:
        monkeypatch.undo()
        time.tzset()


def test_the_pdf_dates_are_the_moment_it_was_made_in_a_half_hour_time_zone(monkeypatch: pytest.MonkeyPatch):
    """reportlab writes the local time with its zone's offset cut to whole hours: made in India
    (UTC+05:30), a report said it was made half an hour after it was."""
    import re
    import time

    pdf = rendered_in_india(monkeypatch)
    for key in (b"CreationDate", b"ModDate"):
        found = re.search(rb"/" + key + rb" \(D:(\d{14})([+-]\d\d)'(\d\d)'\)", pdf)
        assert found is not None, key
        stamp, hours, minutes = found.group(1).decode(), int(found.group(2)), int(found.group(3))
        offset = hours * 3600 + (minutes * 60 if hours >= 0 else -minutes * 60)
        made = datetime.strptime(stamp, "%Y%m%d%H%M%S").replace(tzinfo=UTC).timestamp() - offset
        assert abs(made - time.time()) < 120, (key, found.group(0))


def test_the_pdf_dates_follow_source_date_epoch_where_it_is_set(monkeypatch: pytest.MonkeyPatch):
    """reportlab then hands the formatter UTC parts, not local ones: taken for local time, the date
    moved by the zone's offset."""
    pdf = rendered_in_india(monkeypatch, SOURCE_DATE_EPOCH="946684800")  # 2000-01-01T00:00:00Z
    assert pdf.count(b"(D:20000101000000+00'00')") == 2  # CreationDate and ModDate
