"""Scan and study reports laid out with reportlab (platypus), from ``content`` data and a template.

Pure: data and JPEG bytes in, PDF bytes out. The wording comes from the per-task template; every
value that came from a file goes through ``_v`` or ``_markup`` (cleaned, truncated visibly, escaped,
and what the font cannot draw shown ``[?]``).
"""

from __future__ import annotations

import functools
import io
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from xml.sax.saxutils import escape

from reportlab import rl_config
from reportlab.lib import colors
from reportlab.lib.enums import TA_CENTER
from reportlab.lib.pagesizes import A4
from reportlab.lib.styles import ParagraphStyle
from reportlab.lib.units import mm
from reportlab.lib.utils import ImageReader
from reportlab.pdfbase import pdfdoc
from reportlab.pdfbase.pdfmetrics import stringWidth
from reportlab.pdfgen.canvas import Canvas
from reportlab.platypus import (
    CondPageBreak,
    Flowable,
    Image,
    KeepTogether,
    Paragraph,
    SimpleDocTemplate,
    Spacer,
    Table,
    TableStyle,
)

from meddaemon import __version__
from meddaemon.label_results import LabelResult, names_a_class, places_ranking_the_call
from meddaemon.report.content import PatientInfo, ScanReportData, StudyReportData
from meddaemon.report.fonts import Fonts, drawable
from meddaemon.report.templates import ReportTemplate
from meddaemon.report.text import clean, person_name, visual_order

# reportlab wraps every stream (the JPEGs included) in ASCII85 by default, in pure Python when its C
# accelerator is absent (as here): 85% of the time of a page with images. PDF is a binary format.
rl_config.useA85 = 0

#: streams at least this long have their compressed bytes kept (``_compressed``)
KEPT_STREAM_BYTES = 16 * 1024


@functools.lru_cache(maxsize=16)
def _compressed(data: bytes) -> bytes:
    return zlib.compress(data)


def _flate(_filter: pdfdoc.PDFStreamFilterZCompress, text: str | bytes) -> bytes:
    """What reportlab's Flate filter gives (``zlib.compress``), the same bytes; a long stream's kept.

    Every report embeds the subsets of its two TrueType fonts, about 35 KB each, and reportlab
    compressed them again for each report: 1.5 ms of a 9.5 ms scan report, for the same bytes in
    report after report (the same glyphs). Page contents (a few KB, new each time) are compressed as
    they come; a subset with other glyphs is new bytes, and compressed as such."""
    data = text.encode("utf8") if isinstance(text, str) else text
    return _compressed(data) if len(data) >= KEPT_STREAM_BYTES else zlib.compress(data)


pdfdoc.PDFStreamFilterZCompress.encode = _flate  # type: ignore[method-assign]

PAGE_WIDTH, PAGE_HEIGHT = A4
MARGIN = 15 * mm
BOTTOM_MARGIN = 16 * mm
BODY_WIDTH = PAGE_WIDTH - 2 * MARGIN - 12  # the frame keeps 6 pt of padding on each side
BODY_HEIGHT = PAGE_HEIGHT - MARGIN - BOTTOM_MARGIN - 12
IMAGE_SIZE = 62 * mm
HALF = BODY_WIDTH / 2 - 3 * mm
#: the study report's table: scan, task and model columns (the top finding takes the rest)
STUDY_COLUMNS = (28 * mm, 28 * mm, 30 * mm)
POSITIVE = colors.HexColor("#b3261e")
GREY = colors.HexColor("#555555")
RULE = colors.HexColor("#cccccc")


@dataclass(frozen=True)
class ScanImages:
    """JPEG bytes for one scan: the model's view (None if unreadable) and each stored overlay."""

    model_view: bytes | None
    overlays: dict[str, bytes | None] = field(default_factory=dict)
    colour_scale: bytes | None = None
    #: the labels whose map marks no part of the image (``map_is_flat``): their overlay is the bare
    #: scan, and says so
    flat_maps: set[str] = field(default_factory=set)


@dataclass(frozen=True)
class Rendered:
    data: bytes
    pages: int


@dataclass(frozen=True)
class Styles:
    title: ParagraphStyle
    subtitle: ParagraphStyle
    heading: ParagraphStyle
    body: ParagraphStyle
    small: ParagraphStyle
    finding: ParagraphStyle
    finding_positive: ParagraphStyle
    caption: ParagraphStyle
    cell: ParagraphStyle
    cell_bold: ParagraphStyle
    cell_positive: ParagraphStyle
    fonts: Fonts


@functools.lru_cache(maxsize=4)
def styles(fonts: Fonts) -> Styles:
    def style(name: str, size: float, bold: bool = False, **kw: object) -> ParagraphStyle:
        return ParagraphStyle(
            name, fontName=fonts.bold if bold else fonts.regular, fontSize=size, leading=size * 1.25, **kw
        )

    return Styles(
        title=style("title", 16, True, spaceAfter=2),
        subtitle=style("subtitle", 9.5, textColor=GREY, spaceAfter=4),
        heading=style("heading", 11, True, spaceBefore=8, spaceAfter=3),
        body=style("body", 9.5),
        small=style("small", 8, textColor=GREY),
        finding=style("finding", 12, True, spaceBefore=2, spaceAfter=2),
        finding_positive=style("finding_positive", 12, True, textColor=POSITIVE, spaceBefore=2, spaceAfter=2),
        caption=style("caption", 8, textColor=GREY, alignment=TA_CENTER),
        cell=style("cell", 9),
        cell_bold=style("cell_bold", 9, True),
        cell_positive=style("cell_positive", 9, True, textColor=POSITIVE),
        fonts=fonts,
    )


# -- words ---------------------------------------------------------------------------------------


def top_finding(data: ScanReportData, template: ReportTemplate) -> tuple[str, bool]:
    """The top finding as a sentence of the template, and whether it is a positive call to highlight
    (binary and multilabel; a multiclass reading is never highlighted)."""
    results = data.results
    best = max(results, key=lambda r: r.probability)
    kind = data.model.kind
    if kind == "binary":
        target = results[-1]  # the positive class of a binary task is its last label
        key = "binary_positive" if target.positive else "binary_negative"
        return _finding(template, key, target), target.positive
    if kind == "multilabel":
        positives = sorted((r for r in results if r.positive), key=lambda r: -r.probability)
        if positives:
            names = ", ".join(template.label(r.label) for r in positives)
            return _finding(template, "multilabel_positive", best, labels=names, count=len(positives)), True
        return _finding(template, "multilabel_negative", best), False
    return _finding(template, "multiclass", best), False  # a class, not an alarm: shown in black


def _finding(template: ReportTemplate, key: str, result: LabelResult, labels: str = "", count: int = 0) -> str:
    probability_text, threshold_text = result.shown(0, percent=True)
    return template.finding[key].format(
        label=template.label(result.label),
        probability=result.probability,
        threshold=result.threshold,
        probability_text=probability_text,
        threshold_text=threshold_text,
        labels=labels,
        count=count,
    )


def heatmap_note(data: ScanReportData, template: ReportTemplate) -> str | None:
    """Why the report has no overlay, or None when it has one."""
    if data.heatmaps:
        return None
    if not data.model.heatmaps:
        return template.word("model_without_heatmaps")
    if data.model.kind == "multilabel" and not any(r.positive for r in data.results):
        return template.word("no_positive_heatmap")
    return template.word("no_heatmap")


def when(moment: datetime | None) -> str:
    if moment is None:
        return "-"
    moment = moment if moment.tzinfo else moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")


# -- building blocks -----------------------------------------------------------------------------


def _p(text: str, style: ParagraphStyle) -> Paragraph:
    """A paragraph of template text (trusted wording, escaped; no values from files)."""
    return Paragraph(_markup(text, style, 2000), style)


def _markup(value: object, style: ParagraphStyle, limit: int) -> str:
    """``markup`` of ``value`` with what ``style``'s font cannot draw shown ``[?]`` (``drawable``)."""
    return escape(drawable(visual_order(clean(value, limit)), style.fontName))


#: Values up to this long go into table cells as plain strings: a Paragraph (markup parsing, line
#: breaking) costs about 10x more, and most values are short.
SHORT = 30


def _v(value: object, style: ParagraphStyle, limit: int = 120) -> Paragraph | str:
    """A value that came from a file or the database, cleaned and cut: a plain string when short
    (drawn in the cell's font), else an escaped paragraph that wraps."""
    text = drawable(visual_order(clean(value, limit)), style.fontName) or "-"
    return text if len(text) <= SHORT else Paragraph(escape(text), style)


#: reportlab's default left and right padding of a table cell (points)
CELL_PADDING = 6


def _wrapped(cell: Paragraph | str, width: float, style: ParagraphStyle) -> Paragraph | str:
    """A plain-string cell (``_v``) that would run past its column, ``width`` points with its padding,
    as a paragraph that wraps: a short value of wide letters ("GE MEDICAL SYSTEMS ULTRASOUND", a
    scan's id and hash) ran over the rule, and on the right half of the page to its edge."""
    if isinstance(cell, str) and stringWidth(cell, style.fontName, style.fontSize) > width - 2 * CELL_PADDING:
        return Paragraph(escape(cell), style)
    return cell


def _kv_table(rows: Sequence[tuple[str, Paragraph | str]], st: Styles, width: float = HALF) -> Table:
    """Label and value per row; the label column as wide as its longest label (and the cells'
    padding), so that no label runs into its value ("Accession number" did, at 32 mm)."""
    longest = max((stringWidth(k, st.fonts.bold, 9) for k, _ in rows), default=0.0)
    label = min(max(32 * mm, longest + 2 * CELL_PADDING + 2), width / 2)
    table = Table([[k, _wrapped(v, width - label, st.cell)] for k, v in rows], colWidths=[label, width - label])
    table.setStyle(
        TableStyle(
            [
                ("FONT", (0, 0), (0, -1), st.fonts.bold, 9),
                ("FONT", (1, 0), (1, -1), st.fonts.regular, 9),
                ("VALIGN", (0, 0), (-1, -1), "TOP"),
                ("LINEBELOW", (0, 0), (-1, -1), 0.25, RULE),
                ("TOPPADDING", (0, 0), (-1, -1), 1.5),
                ("BOTTOMPADDING", (0, 0), (-1, -1), 1.5),
            ]
        )
    )
    return table


class _JpegReader(ImageReader):
    """JPEG bytes for reportlab, named by those bytes. ``Canvas.drawImage`` names each image by a
    digest of ``getRGBData()``, and reportlab embeds a JPEG as it is (DCTDecode): the picture was
    decoded only to be named, 7 % of a scan report's time (benchmarks/README.md, issue 16's eighth pass)."""

    def __init__(self, jpeg: bytes) -> None:
        super().__init__(io.BytesIO(jpeg))
        self._jpeg = jpeg

    def getRGBData(self) -> bytes:
        if self._image.format != "JPEG":
            return super().getRGBData()
        self._dataA = None
        return self._jpeg


class _JpegImage(Image):
    """A platypus ``Image`` of JPEG bytes, drawn through :class:`_JpegReader`."""

    def __init__(self, jpeg: bytes, width: float | None = None, height: float | None = None) -> None:
        self._img = _JpegReader(jpeg)
        super().__init__(io.BytesIO(jpeg), width, height)


def _image(jpeg: bytes, size: float) -> Image:
    image = _JpegImage(jpeg)
    scale = size / max(image.imageWidth, image.imageHeight)
    image.drawWidth, image.drawHeight = image.imageWidth * scale, image.imageHeight * scale
    return image


def _figure(jpeg: bytes | None, caption: str, missing: str, st: Styles, size: float = IMAGE_SIZE) -> list[Flowable]:
    if jpeg is None:
        return [_p(missing, st.small), _p(caption, st.caption)]
    return [_image(jpeg, size), Spacer(1, 1.5 * mm), _p(caption, st.caption)]


def images_section(data: ScanReportData, images: ScanImages, template: ReportTemplate, st: Styles) -> list[Flowable]:
    """The model's view beside the first overlay, further overlays two to a row, and the colour scale."""
    cells: list[list[Flowable]] = [
        _figure(images.model_view, template.word("model_view"), template.word("no_image"), st)
    ]
    for result in data.heatmaps:
        label = template.label(result.label)
        overlay = images.overlays.get(result.label)
        caption = template.word("overlay", label=label)
        if overlay is not None and result.label in images.flat_maps:  # said of the picture shown
            caption += ". " + template.word("flat_map")
        cells.append(_figure(overlay, caption, template.word("missing_overlay"), st))
    out: list[Flowable] = []
    note = heatmap_note(data, template)
    if len(cells) == 1:
        cells.append([_p(note or "", st.body)])
    rows = [cells[i : i + 2] for i in range(0, len(cells), 2)]
    if len(rows[-1]) == 1:
        rows[-1].append([])
    grid = Table(rows, colWidths=[BODY_WIDTH / 2] * 2)
    grid.setStyle(TableStyle([("VALIGN", (0, 0), (-1, -1), "MIDDLE"), ("ALIGN", (0, 0), (-1, -1), "CENTER")]))
    out.append(grid)
    if data.heatmaps and images.colour_scale is not None:
        scale = _JpegImage(images.colour_scale, width=60 * mm, height=3.5 * mm)
        legend = Table(
            [
                [_p("low", st.small), scale, _p("high", st.small)],
                ["", _p(template.word("colour_scale"), st.caption), ""],
            ],
            colWidths=[14 * mm, 62 * mm, 14 * mm],
        )
        legend.setStyle(TableStyle([("ALIGN", (0, 0), (-1, -1), "CENTER"), ("VALIGN", (0, 0), (-1, -1), "MIDDLE")]))
        out += [Spacer(1, 2 * mm), legend]
    return out


def labels_section(data: ScanReportData, template: ReportTemplate, st: Styles) -> list[Flowable]:
    multiclass = data.model.kind == "multiclass"  # the call is the top class: no threshold applies
    rows: list[list[Paragraph | str]] = [["Label", "Probability", "Call rule" if multiclass else "Threshold", "Call"]]
    commands: list[tuple[object, ...]] = [
        ("FONT", (0, 0), (-1, 0), st.fonts.bold, 9),
        ("FONT", (0, 1), (-1, -1), st.fonts.regular, 9),
        ("LINEBELOW", (0, 0), (-1, 0), 0.6, colors.black),
        ("LINEBELOW", (0, 1), (-1, -1), 0.25, RULE),
        ("VALIGN", (0, 0), (-1, -1), "MIDDLE"),
        ("TOPPADDING", (0, 0), (-1, -1), 1.2),
        ("BOTTOMPADDING", (0, 0), (-1, -1), 1.2),
    ]
    places = places_ranking_the_call(data.results, 3) if multiclass else 3
    labels = [r.label for r in data.results]
    for row, r in enumerate(data.results, start=1):
        a_class = names_a_class(data.model.kind, labels, r.label)
        if a_class:  # bold, in black, as the finding above it: "Normal tissue" or "No IDC" is no alarm
            style = st.cell_bold if r.positive else st.cell
            call = template.word("called") if r.positive else ""
        else:
            style = st.cell_positive if r.positive else st.cell
            call = template.word("positive") if r.positive else template.word("negative")
        probability, threshold = r.shown(places)
        rows.append(
            [
                _wrapped(_v(template.label(r.label), style, 60), 70 * mm, style),
                probability,
                "top class" if multiclass else threshold,
                call,
            ]
        )
        if r.positive:
            commands += [("FONT", (0, row), (-1, row), st.fonts.bold, 9)]
            if not a_class:
                commands += [("TEXTCOLOR", (0, row), (-1, row), POSITIVE)]
    table = Table(rows, colWidths=[70 * mm, 35 * mm, 35 * mm, BODY_WIDTH - 140 * mm], repeatRows=1)
    table.setStyle(TableStyle(commands))
    return [table]


def model_section(data: ScanReportData, st: Styles) -> list[Flowable]:
    m = data.model
    return [
        _kv_table(
            [
                ("Model", _v(m.name, st.cell)),
                ("Architecture", _v(m.architecture, st.cell)),
                ("Kind", _v(m.kind, st.cell)),
                ("SHA-256", _v(m.sha256[:16], st.cell)),
            ],
            st,
        )
    ]


def scan_section(data: ScanReportData, st: Styles) -> list[Flowable]:
    rows = [("Scan", _v(f"{data.scan_id} (sha256 {data.sha256[:16]})", st.cell))]
    rows += [(name, _v(value, st.cell)) for name, value in data.metadata]
    return [_kv_table(rows, st)]


def times_section(data: ScanReportData, st: Styles) -> list[Flowable]:
    latency = f"{data.latency_ms / 1000:.2f} s" if data.latency_ms is not None else "-"
    return [
        _kv_table(
            [
                ("Arrived", _v(when(data.discovered_at), st.cell)),
                ("Registered", _v(when(data.registered_at), st.cell)),
                ("Result", _v(when(data.result_at), st.cell)),
                ("Arrival to result", _v(latency, st.cell)),
            ],
            st,
        )
    ]


def patient_section(patient: PatientInfo, st: Styles) -> list[Flowable]:
    return [
        _kv_table(
            [
                ("Name", Paragraph(_markup(person_name(patient.name), st.cell, 200) or "-", st.cell)),
                ("Patient ID", _v(patient.patient_id, st.cell, 64)),
                ("Birth date", _v(patient.birth_date, st.cell, 16)),
                ("Sex", _v(patient.sex, st.cell, 16)),
                ("Age", _v(patient.age, st.cell, 16)),
                ("Accession number", _v(patient.accession_number, st.cell, 64)),
            ],
            st,
        )
    ]


def scan_body(
    data: ScanReportData, images: ScanImages, template: ReportTemplate, st: Styles, of_scan: str = ""
) -> list[Flowable]:
    """The sections of one scan, in the template's order (the study report reuses them, naming the
    scan, ``of_scan``, in the headings of its pictures and its probabilities, which may start a page).
    A heading starts a page only with room for its first row beneath it, and the probabilities'
    table with room for a third of a page of it (all of a short one): a study report left
    "Probabilities" alone at a page's foot, and a scan's called class overleaf from its other two.

    Consecutive key-value sections (model, scan, times, patient) share two columns: the first,
    third... on the left, the second, fourth... on the right; where the two columns would be taller
    than a page (several long header values), one after the other, as a table's row cannot be split
    across pages.
    """
    story: list[Flowable] = []
    pending: list[list[Flowable]] = []

    def flush() -> None:
        if pending:
            left = [f for block in pending[0::2] for f in block]
            right = [f for block in pending[1::2] for f in block]
            grid = Table([[left, right]], colWidths=[BODY_WIDTH / 2] * 2)
            grid.setStyle(
                TableStyle(
                    [
                        ("VALIGN", (0, 0), (-1, -1), "TOP"),
                        ("LEFTPADDING", (0, 0), (-1, -1), 0),
                        ("RIGHTPADDING", (0, 0), (-1, -1), 0),
                    ]
                )
            )
            if grid.wrap(BODY_WIDTH, BODY_HEIGHT)[1] <= BODY_HEIGHT:
                story.append(grid)
            else:
                story.extend(f for block in pending for f in block)
            pending.clear()

    blocks = {
        "model": lambda: model_section(data, st),
        "scan": lambda: scan_section(data, st),
        "times": lambda: times_section(data, st),
    }
    for section in template.sections:
        if section == "patient" and data.patient is None:
            continue
        named = f" ({of_scan})" if of_scan and section in ("images", "labels") else ""
        heading = _p(template.word(f"heading_{section}") + named, st.heading)
        if section in blocks or section == "patient":
            body = patient_section(data.patient, st) if data.patient is not None and section == "patient" else None
            pending.append([heading, *(body or blocks[section]())])
            continue
        flush()
        if section == "finding":
            sentence, positive = top_finding(data, template)
            story.append(KeepTogether([heading, _p(sentence, st.finding_positive if positive else st.finding)]))
        elif section in ("images", "labels"):
            parts = (
                images_section(data, images, template, st)
                if section == "images"
                else labels_section(data, template, st)
            )
            story += [_room_for(heading, parts[0], section == "labels"), heading, *parts]
    flush()
    return story


def _room_for(heading: Paragraph, table: Flowable, whole_if_short: bool) -> CondPageBreak:
    """A page break unless the page has room for ``heading`` and the first row of ``table`` (a grid
    of pictures), or, ``whole_if_short``, as much of it as a third of a page holds. Not KeepTogether:
    a grid taller than what is left was moved whole to the next page, half a page left blank above."""
    _, heading_height = heading.wrap(BODY_WIDTH, BODY_HEIGHT)
    _, height = table.wrap(BODY_WIDTH, BODY_HEIGHT)
    rows = getattr(table, "_rowHeights", None) or [height]
    needed = min(height, BODY_HEIGHT / 3) if whole_if_short else rows[0]
    return CondPageBreak(heading_height + needed + 2 * mm)


def _disclaimer(template: ReportTemplate, st: Styles) -> Table:
    box = Table([[_p(template.disclaimer, st.body)]], colWidths=[BODY_WIDTH])
    box.setStyle(
        TableStyle(
            [
                ("BOX", (0, 0), (-1, -1), 0.8, POSITIVE),
                ("BACKGROUND", (0, 0), (-1, -1), colors.HexColor("#fdf3f2")),
                ("TOPPADDING", (0, 0), (-1, -1), 3),
                ("BOTTOMPADDING", (0, 0), (-1, -1), 3),
            ]
        )
    )
    return box


def _footer(text: str, st: Styles) -> Callable[[Canvas, SimpleDocTemplate], None]:
    line = clean(text, 150)

    def draw(canvas: Canvas, doc: SimpleDocTemplate) -> None:
        canvas.setDateFormatter(_pdf_date_in_utc(canvas))
        canvas.saveState()
        canvas.setFont(st.fonts.regular, 7.5)
        canvas.setFillColor(GREY)
        canvas.drawString(MARGIN, 9 * mm, line)
        canvas.drawRightString(PAGE_WIDTH - MARGIN, 9 * mm, f"page {doc.page}")
        canvas.restoreState()

    return draw


def _pdf_date_in_utc(canvas: Canvas) -> Callable[..., str]:
    """The formatter of the PDF's CreationDate and ModDate: reportlab's own moment (its document's
    time stamp, ``SOURCE_DATE_EPOCH`` where set) in UTC. reportlab writes the local time with its
    zone's offset cut to whole hours (``+05'00'`` in India, whose offset is +05:30), and the local
    parts it hands a formatter cannot tell the two 01:30s of a night the clocks go back."""
    moment = float(canvas._doc._timeStamp.t)
    text = datetime.fromtimestamp(moment, UTC).strftime("D:%Y%m%d%H%M%S+00'00'")
    return lambda *_: text


def build(story: list[Flowable], title: str, subject: str, footer: str, st: Styles) -> Rendered:
    """Lay out ``story`` on A4; the PDF metadata hold only ``title`` and ``subject`` (never PHI)."""
    buffer = io.BytesIO()
    doc = SimpleDocTemplate(
        buffer,
        pagesize=A4,
        leftMargin=MARGIN,
        rightMargin=MARGIN,
        topMargin=MARGIN,
        bottomMargin=BOTTOM_MARGIN,
        title=title,
        subject=subject,
        author="meddaemon",
        creator=f"meddaemon {__version__}",
        keywords="",
    )
    on_page = _footer(footer, st)
    doc.build(story, onFirstPage=on_page, onLaterPages=on_page)
    return Rendered(buffer.getvalue(), doc.page)


# -- the reports ---------------------------------------------------------------------------------


def render_scan(data: ScanReportData, images: ScanImages, template: ReportTemplate, fonts: Fonts) -> Rendered:
    st = styles(fonts)
    story: list[Flowable] = [
        _p(template.title, st.title),
        _p(template.subtitle.format(task=data.task, description=data.description), st.subtitle),
        _disclaimer(template, st),
    ]
    if not data.with_phi:
        story.append(_p(template.word("deidentified"), st.small))
    story += scan_body(data, images, template, st)
    footer = template.word("footer", scan_id=data.scan_id, sha=data.sha256[:16])
    return build(story, f"Scan report {data.scan_id}", f"{data.model.name} result for scan {data.scan_id}", footer, st)


def render_study(
    data: StudyReportData,
    images: Sequence[ScanImages],
    templates: Callable[[str], ReportTemplate],
    fonts: Fonts,
) -> Rendered:
    """A summary table of every scan of the study, then each scan's own sections."""
    st = styles(fonts)
    first = templates(data.scans[0].task)
    words = first.study
    name = data.study_instance_uid if data.with_phi else f"study {data.study_key}"
    story: list[Flowable] = [
        _p(words["title"], st.title),
        Paragraph(_markup(name, st.subtitle, 90), st.subtitle),
        _disclaimer(first, st),
    ]
    if not data.with_phi:
        story.append(_p(words["deidentified"], st.small))
    story += [Spacer(1, 2 * mm), _p(words["intro"].format(count=len(data.scans)), st.body)]
    if data.without_result:  # a scan the model never read must not vanish from the study's summary
        scans = ", ".join(f"{scan_id} ({why})" for scan_id, why in data.without_result)
        story.append(_p(words["without_result"].format(count=len(data.without_result), scans=scans), st.cell_bold))
    if data.replaced:  # a version left out must be findable: its own report still stands
        scans = ", ".join(words["replaced_by"].format(scan=old, later=new) for old, new in data.replaced)
        story.append(_p(words["replaced"].format(count=len(data.replaced), scans=scans), st.cell))
    rows: list[list[Flowable]] = [[_p(h, st.cell_bold) for h in ("Scan", "Task", "Model", "Top finding")]]
    for scan in data.scans:
        sentence, positive = top_finding(scan, templates(scan.task))
        style = st.cell_bold if positive else st.cell
        values = (f"{scan.scan_id} ({scan.sha256[:8]})", scan.task, scan.model.name)
        rows.append(
            [
                *(_wrapped(_v(v, st.cell), w, st.cell) for v, w in zip(values, STUDY_COLUMNS, strict=True)),
                _p(sentence, style),
            ]
        )
    table = Table(rows, colWidths=[*STUDY_COLUMNS, BODY_WIDTH - sum(STUDY_COLUMNS)], repeatRows=1)
    table.setStyle(
        TableStyle(
            [
                ("FONT", (0, 0), (-1, -1), st.fonts.regular, 9),
                ("LINEBELOW", (0, 0), (-1, 0), 0.6, colors.black),
                ("LINEBELOW", (0, 1), (-1, -1), 0.25, RULE),
                ("VALIGN", (0, 0), (-1, -1), "TOP"),
            ]
        )
    )
    story += [Spacer(1, 3 * mm), table]
    patients, each_own = data.patients, len(data.patient_details) > 1
    if each_own:  # each scan's section names its own, as each scan's report does
        story += [_p(first.word("heading_patient"), st.heading)]
        differ = words["patients_differ"].format(count=len(patients)) if len(patients) > 1 else words["details_differ"]
        story.append(_p(differ, st.cell_bold))
    elif data.patient is not None:
        story += [_p(first.word("heading_patient"), st.heading), *patient_section(data.patient, st)]
    elif data.patients_named > 1:  # de-identified: who they are is left out, that they differ is not
        story.append(_p(words["patients_differ_deidentified"].format(count=data.patients_named), st.cell_bold))
    for scan, scan_images in zip(data.scans, images, strict=True):
        template = templates(scan.task)
        if each_own:
            shown, body = scan, list(template.sections)
        else:
            shown, body = _without_patient(scan), [s for s in template.sections if s != "patient"]
        story += [CondPageBreak(90 * mm), _p(f"Scan {scan.scan_id}: {template.title}", st.heading)]
        story += scan_body(shown, scan_images, _with_sections(template, body), st, f"scan {scan.scan_id}")
    footer = f"meddaemon study report - {name}"[:150] if data.with_phi else f"meddaemon study {data.study_key}"
    return build(story, f"Study report {data.study_key}", f"{len(data.scans)} scans", footer, st)


def _without_patient(scan: ScanReportData) -> ScanReportData:
    return replace(scan, patient=None)


def _with_sections(template: ReportTemplate, sections: list[str]) -> ReportTemplate:
    return replace(template, sections=tuple(sections))
