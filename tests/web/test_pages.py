"""Every page of the console renders over a database a real daemon filled from SYNTHETIC scans."""

from __future__ import annotations

import io
import json
import re
from datetime import timedelta

import numpy as np
from click.testing import CliRunner
from dicom_factory import write_png
from PIL import Image
from sqlalchemy import delete, select, update

from meddaemon.cli.medcli import cli as medcli
from meddaemon.daemon import filing
from meddaemon.db.engine import create_db_engine, session_factory, transaction
from meddaemon.db.models import Audit, AuditPdf, Heatmap, ModelVersion, Report, Result, Scan, ScanEvent
from meddaemon.engine import registry
from meddaemon.engine.heatmap_grid import read_map
from meddaemon.evaluate.pipeline import EvaluationRequest, run_evaluation
from meddaemon.web.app import create_app
from model_factory import PHI_STRINGS, read_pdf, write_model
from web_factory import UNROUTABLE, signed_in, store_audit, stored_scans, web_settings, write_card


def test_the_overview_counts_states_failures_models_and_the_hourly_chart(console, filled_root):
    page = console("viewer").get("/")
    assert page.status_code == 200
    html = page.text
    states = {s.state for s in stored_scans(filled_root)}
    assert "archived" in states and "failed" in states
    assert '<table class="compact" id="states">' in html
    assert "unroutable" in html and "empty_file" in html  # failures by reason
    assert "<svg" in html and "scans registered and inferred per hour" in html
    inferred = sum(1 for s in stored_scans(filled_root) if s.state == "archived")  # each was inferred, minutes ago
    assert sum(int(n) for n in re.findall(r"<title>inferred: (\d+)</title>", html)) == inferred
    assert "busi</td><td>v1" in html and "chestxray14</td><td>v1" in html  # the active model per task
    assert 'id="no-daemon"' in html  # the --once daemon has stopped


def test_the_overview_refreshes_itself_with_htmx_from_the_vendored_script(console):
    client = console("viewer")
    html = client.get("/").text
    assert '<script src="/static/htmx.min.js"' in html and 'hx-get="/" hx-trigger="every 10s"' in html
    fragment = client.get("/", headers={"HX-Request": "true"})
    assert fragment.status_code == 200 and "<html" not in fragment.text and 'id="states"' in fragment.text
    script = client.get("/static/htmx.min.js")
    assert script.status_code == 200 and script.text.startswith("var htmx=function()")


def test_the_worklist_lists_every_scan_newest_first_with_its_top_call(console, filled_root):
    html = console("viewer").get("/worklist").text
    rows = stored_scans(filled_root)
    ids = [int(part.split('"')[0]) for part in html.split('<tr class="scan" data-id="')[1:]]
    assert ids == sorted((s.id for s in rows), reverse=True)
    archived = next(s for s in rows if s.state == "archived")
    assert f'href="/scans/{archived.id}"' in html and "/thumb.jpg" in html
    assert 'class="pos"' in html or 'class="neg"' in html


def test_the_worklist_filters_by_state_task_label_call_and_searches(console, filled_root):
    client = console("viewer")
    rows = stored_scans(filled_root)

    def listed(query: str) -> set[int]:
        page = client.get(f"/worklist?{query}")
        assert page.status_code == 200, page.text
        return {int(part.split('"')[0]) for part in page.text.split('<tr class="scan" data-id="')[1:]}

    assert listed("state=failed") == {s.id for s in rows if s.state == "failed"}
    assert listed("task=chestxray14") == {s.id for s in rows if s.task_name == "chestxray14"}
    assert listed(f"q={UNROUTABLE}") == {s.id for s in rows if s.source_name == UNROUTABLE}
    some = rows[0]
    assert listed(f"q={some.sha256[:10]}") == {some.id}
    study = next(s for s in rows if s.study_instance_uid)
    assert listed(f"q={study.study_instance_uid}") == {
        s.id for s in rows if s.study_instance_uid == study.study_instance_uid
    }
    engine = create_db_engine(web_settings(filled_root).db_url)
    with session_factory(engine)() as session:
        found = select(Result.scan_id).join(Scan, Scan.id == Result.scan_id).where(Result.positive.is_(True))
        positive = set(session.scalars(found.where(Scan.task_name != "busi")))  # busi's top class: no finding
        by_label = set(
            session.scalars(select(Result.scan_id).where(Result.label == "benign", Result.positive.is_(True)))
        )
        scored = set(session.scalars(select(Result.scan_id)))
    engine.dispose()
    assert listed("call=positive") == positive
    assert listed("call=negative") == scored - positive
    assert listed("label=benign&call=positive") == by_label
    first = min(s.registered_at.date() for s in rows)
    assert listed(f"since={first}&until={first}") == {s.id for s in rows if s.registered_at.date() == first}
    assert listed(f"until={first - timedelta(days=1)}") == set()
    assert client.get("/worklist?state=nonsense").status_code == 400
    assert client.get("/worklist?since=yesterday").status_code == 400


def test_a_scan_page_shows_each_map_over_the_scan_calls_history_report_and_metadata(console, filled_root):
    scan = next(s for s in stored_scans(filled_root) if s.state == "archived" and s.task_name == "busi")
    client = console("viewer")
    page = client.get(f"/scans/{scan.id}")
    assert page.status_code == 200
    html = page.text
    engine = create_db_engine(web_settings(filled_root).db_url)
    with session_factory(engine)() as session:
        maps = list(session.scalars(select(Heatmap.id).join(Result).where(Result.scan_id == scan.id)))
        report = session.scalar(select(Report.id).where(Report.scan_id == scan.id))
    engine.dispose()
    assert maps and all(f'src="/heatmaps/{m}.png"' in html for m in maps)
    assert f'src="/scans/{scan.id}/image.png?map={maps[0]}"' in html
    assert 'id="opacity"' in html and "data-opacity" in html
    assert 'id="timeline"' in html and "registered" in html and "archived" in html
    assert f'data="/reports/{report}.pdf"' in html and 'id="report-older"' not in html
    assert 'id="metadata"' in html
    layer_response = client.get(f"/heatmaps/{maps[0]}.png")
    base_response = client.get(f"/scans/{scan.id}/image.png?map={maps[0]}")
    layer = Image.open(io.BytesIO(layer_response.content))
    base = Image.open(io.BytesIO(base_response.content))
    assert layer.mode == "RGBA" and layer.size == base.size  # the layer lies exactly over the scan
    # a patient's pictures are not kept by the browser (kept 5 minutes, they opened after sign-out)
    assert layer_response.headers["cache-control"] == base_response.headers["cache-control"] == "no-store"
    pdf = client.get(f"/reports/{report}.pdf")
    assert pdf.status_code == 200 and pdf.content.startswith(b"%PDF")
    assert pdf.headers["content-disposition"].startswith("inline")

    study = next(s for s in stored_scans(filled_root) if s.study_instance_uid)
    metadata = client.get(f"/scans/{study.id}").text.split('id="metadata"')[1].split("</table>")[0]
    assert "<th>Modality</th><td>US</td>" in metadata and f"<td>{study.sop_instance_uid}</td>" in metadata


def test_a_heatmap_thumbnail_draws_the_overlay_from_the_stored_map_when_none_was_kept(fresh_root):
    """Issue 16: the daemon keeps no overlay JPEG per map; the worklist's thumbnail draws it from the
    map and the stored scan (no view kept either) and keeps it for the next reader."""
    settings = web_settings(fresh_root)
    engine = create_db_engine(settings.db_url)
    with session_factory(engine)() as session:
        heatmap_id, grid, overlay_path, version_id, sha, height, width = session.execute(
            select(
                Heatmap.id,
                Heatmap.grid,
                Heatmap.overlay_path,
                Result.model_version_id,
                Scan.sha256,
                Heatmap.height,
                Heatmap.width,
            )
            .join(Result, Result.id == Heatmap.result_id)
            .join(Scan, Scan.id == Result.scan_id)
            .where(Scan.task_name == "busi", Scan.state == "archived")
            .limit(1)
        ).one()
    engine.dispose()
    overlay_file = settings.stored_file(overlay_path)
    overlay_file.unlink(missing_ok=True)
    filing.view_path(settings.heatmaps_dir, sha, version_id).unlink(missing_ok=True)
    app = create_app(settings)
    try:
        thumb = signed_in(app, "viewer").get(f"/heatmaps/{heatmap_id}/thumb.jpg")
    finally:
        app.state.console.dispose()
    assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg"
    assert max(Image.open(io.BytesIO(thumb.content)).size) <= 96
    drawn = Image.open(overlay_file)  # kept beside the map, the map's size, in colour where the map is hot
    heatmap = read_map(grid, (height, width))
    assert drawn.format == "JPEG" and drawn.size == (heatmap.shape[1], heatmap.shape[0])
    pixels = np.asarray(drawn.convert("RGB"), dtype=np.int16)
    hot = heatmap > 0.7
    assert hot.any() and (pixels[hot][:, 0] - pixels[hot][:, 2]).mean() > 40  # red over the hot part


def test_a_multilabel_scan_shows_one_map_per_positive_label_and_none_for_the_others(console, filled_root):
    cxr = next(s for s in stored_scans(filled_root) if s.task_name == "chestxray14" and s.state == "archived")
    engine = create_db_engine(web_settings(filled_root).db_url)
    with session_factory(engine)() as session:
        positive = set(session.scalars(select(Result.label).where(Result.scan_id == cxr.id, Result.positive.is_(True))))
    engine.dispose()
    html = console("viewer").get(f"/scans/{cxr.id}").text
    shown = {part.split('"')[0] for part in html.split('<figure class="overlay" id="map-')[1:]}
    assert len(positive) > 1 and shown == positive


def test_a_stored_scan_over_the_daemon_s_limits_is_no_picture_rather_than_the_console_s_memory(fresh_root):
    """The console reads and decodes a scan's picture under the daemon's own limits: a file kept in
    failed/ as too large (it read it whole) or too many pixels is a 404 saying why."""
    scan = next(s for s in stored_scans(fresh_root) if s.state == "archived" and s.task_name == "busi")
    size = web_settings(fresh_root).stored_file(scan.stored_path).stat().st_size
    for flags, why in (({"max_file_bytes": size - 1}, "too_large"), ({"max_pixels": 100}, "too_many_pixels")):
        app = create_app(web_settings(fresh_root, **flags))
        try:
            client = signed_in(app, "viewer")
            for url in (f"/scans/{scan.id}/image.png", f"/scans/{scan.id}/thumb.jpg"):
                page = client.get(url)
                assert page.status_code == 404 and why in page.text, (url, page.text[:200])
        finally:
            app.state.console.dispose()
    app = create_app(web_settings(fresh_root))  # within the limits: the picture
    try:
        assert signed_in(app, "viewer").get(f"/scans/{scan.id}/image.png").status_code == 200
    finally:
        app.state.console.dispose()


def test_a_scan_the_daemon_could_not_decode_shows_why_not_a_broken_image(console, filled_root):
    """An empty or corrupt file failed at decoding showed a broken image (a 404 the page asked for)
    captioned "no result yet", and the worklist asked for its thumbnail at every load."""
    empty = next(s for s in stored_scans(filled_root) if s.failure_reason == "empty_file")
    client = console("viewer")
    page = client.get(f"/scans/{empty.id}").text
    assert 'id="no-picture">No picture: the daemon could not decode this file (empty_file)' in page
    assert f"/scans/{empty.id}/image.png" not in page and "no result yet" not in page
    image = client.get(f"/scans/{empty.id}/image.png")
    assert image.status_code == 404 and "could not decode its file" in image.text
    worklist = client.get("/worklist").text
    assert f'data-id="{empty.id}"' in worklist and f"/scans/{empty.id}/thumb.jpg" not in worklist


def synthetic_jpeg(side: int = 64) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(5).integers(0, 255, (side, side), dtype=np.uint8)).save(buffer, "JPEG")
    return buffer.getvalue()


def with_size(jpeg: bytes, rows: int, columns: int) -> bytes:
    """The JPEG with its frame header (SOF0) claiming another size: what a bomb's header says."""
    at = jpeg.index(b"\xff\xc0") + 5
    return jpeg[:at] + rows.to_bytes(2, "big") + columns.to_bytes(2, "big") + jpeg[at + 4 :]


def test_a_stored_jpeg_thumbnail_is_read_under_the_daemon_s_limits_and_a_broken_one_is_no_picture(fresh_root):
    """The worklist asks a thumbnail of every scan, failed ones too. A JPEG went to PIL unguarded:
    a broken one was a 500, and one over max_pixels was decoded."""
    scan = next(s for s in stored_scans(fresh_root) if s.state == "archived" and s.task_name == "busi")
    stored = web_settings(fresh_root).stored_file(scan.stored_path)
    good = synthetic_jpeg()
    cases = {
        "truncated": (good[: len(good) // 2], {}),
        "a bomb's header": (with_size(good, 20000, 20000), {}),
        "no image after its marker": (b"\xff\xd8" + bytes(64), {}),
        "over max_pixels": (good, {"max_pixels": 64 * 64 - 1}),
    }
    for case, (data, flags) in cases.items():
        stored.write_bytes(data)
        app = create_app(web_settings(fresh_root, **flags))
        try:
            assert signed_in(app, "viewer").get(f"/scans/{scan.id}/thumb.jpg").status_code == 404, case
        finally:
            app.state.console.dispose()
    stored.write_bytes(good)
    app = create_app(web_settings(fresh_root))
    try:
        thumb = signed_in(app, "viewer").get(f"/scans/{scan.id}/thumb.jpg")
        assert thumb.status_code == 200 and Image.open(io.BytesIO(thumb.content)).size == (64, 64)
    finally:
        app.state.console.dispose()


def test_a_scan_that_does_not_exist_is_a_404_page_not_a_traceback(console):
    client = console("viewer")
    for url in ("/scans/999999", "/scans/999999/image.png", "/heatmaps/999999.png", "/reports/999999.pdf", "/nowhere"):
        page = client.get(url)
        assert page.status_code == 404, url
        assert "Traceback" not in page.text
    page = client.get("/scans/999999")
    assert "There is no scan 999999." in page.text and "<html" in page.text


def test_the_failures_page_groups_by_reason_with_the_sentence(console, filled_root):
    html = console("viewer").get("/failures").text
    failed = [s for s in stored_scans(filled_root) if s.state == "failed"]
    for scan in failed:
        assert f'id="{scan.failure_reason}"' in html and scan.failure_message in html
    assert "Retry" not in html.split("<main>")[1].split("Retry sends")[1]  # a viewer gets no buttons


def test_the_models_page_shows_each_version_with_its_card_and_the_card_s_figures(console, filled_root):
    settings = web_settings(filled_root)
    source = write_model(filled_root / "model_v2", version="v2")
    figures = write_card(source)
    engine = create_db_engine(settings.db_url)
    with transaction(session_factory(engine)) as session:
        registry.import_version(session, source, settings.models_dir)  # the card comes with it
    engine.dispose()
    client = console("viewer")
    html = client.get("/models").text
    assert 'id="model-busi-v1"' in html and 'id="model-chestxray14-v1"' in html and 'id="model-busi-v2"' in html
    assert "active" in html and "small_cnn" in html and "resnet18" in html
    assert "Promote" not in html and "Retire" not in html  # not for viewers
    card = html.split('id="card-busi-v2"')[1].split("</section>")[0]
    assert "<h3>busi v2</h3>" in card and "SYNTHETIC: a card" in card and "<table>" in card
    for name, caption in figures.items():
        assert f'<img src="/models/busi/v2/card/{name}" alt="{caption}" loading="lazy"' in card
        figure = client.get(f"/models/busi/v2/card/{name}")
        assert figure.status_code == 200 and figure.headers["content-type"] == "image/png"
        assert figure.content == (settings.models_dir / "busi" / "v2" / name).read_bytes()
    assert 'id="card-busi-v1"' not in html  # v1 was imported without a card: the page says so
    for name in ("manifest.json", "model.safetensors", "MODEL_CARD.md", "nothing.png"):
        assert client.get(f"/models/busi/v2/card/{name}").status_code == 404
    assert client.get("/models/busi/v9/card/roc.png").status_code == 404


def test_an_audit_run_with_compare_shows_the_comparison_it_says_it_made(console, filled_root):
    """The page said "compared with v1" and showed none of it: AUCs, their difference, its CI, p."""
    audit_id = store_audit(filled_root, compare="v1")
    stored = json.loads(console("viewer").get(f"/audits/{audit_id}.json").text)["results"]["comparison"]
    page = console("viewer").get(f"/audits/{audit_id}").text
    assert "compared with v1" in page and 'id="comparison"' in page
    table = page.split('id="comparison"', 1)[1].split("</table>", 1)[0]
    for entry in stored:
        assert f"<td>{entry['label']}</td>" in table and f'<td class="n">{entry["n"]}</td>' in table
        if entry["auc_a"] is not None:
            assert f"{entry['auc_a']:.3f}" in table
    # an undefined difference shows no interval, and a small p its digits, not "0.000"
    engine = create_db_engine(web_settings(filled_root).db_url)
    with transaction(session_factory(engine)) as session:
        audit = session.get(Audit, audit_id)
        results = json.loads(json.dumps(audit.results))
        results["comparison"][0]["difference"] = {"value": None, "undefined": "one class only", "counts": {}}
        results["comparison"][0]["p_value"] = 0.00012
        audit.results = results
    engine.dispose()
    page = console("viewer").get(f"/audits/{audit_id}").text
    first = page.split('id="comparison"', 1)[1].split("</tr>", 2)[1]
    assert "undefined" in first and "–" not in first and "0.00012" in first, first


def test_the_audits_page_lists_stored_audits_with_tables_figures_and_downloads(console, filled_root):
    audit_id = store_audit(filled_root, pdf="plain")
    client = console("viewer")
    listing = client.get("/audits").text
    assert f'href="/audits/{audit_id}"' in listing and f'href="/audits/{audit_id}.pdf"' in listing
    page = client.get(f"/audits/{audit_id}")
    assert page.status_code == 200 and 'id="overall"' in page.text and "auc" in page.text
    assert f'data="/audits/{audit_id}.pdf"' in page.text  # its figures: the PDF kept with it, inline
    assert f'href="/audits/{audit_id}.pdf" download="audit-{audit_id}.pdf"' in page.text
    pdf = client.get(f"/audits/{audit_id}.pdf")
    assert pdf.status_code == 200 and pdf.headers["content-type"] == "application/pdf"
    assert pdf.headers["content-disposition"] == f'inline; filename="audit-{audit_id}.pdf"'
    text, pages, _, _ = read_pdf(pdf.content)
    assert pages == 1 and f"SYNTHETIC stand-in for the PDF of audit {audit_id}" in text
    data = json.loads(client.get(f"/audits/{audit_id}.json").text)
    assert data["id"] == audit_id and data["results"]["labels"]
    csv_text = client.get(f"/audits/{audit_id}.csv").text
    header, *lines = csv_text.splitlines()
    assert header.startswith("scope,by,level,label,metric,value,lower,upper") and any(",auc," in x for x in lines)
    assert client.get("/audits/999999").status_code == 404
    assert client.get("/audits/999999.pdf").status_code == 404

    engine = create_db_engine(web_settings(filled_root).db_url)
    with transaction(session_factory(engine)) as session:
        session.execute(delete(AuditPdf).where(AuditPdf.audit_id == audit_id))  # as an audit run without --pdf
    engine.dispose()
    assert 'id="no-pdf"' in client.get(f"/audits/{audit_id}").text
    missing = client.get(f"/audits/{audit_id}.pdf")
    assert missing.status_code == 404 and "--pdf" in missing.text


def test_a_viewer_never_sees_patient_data_a_clinician_does(console, filled_root):
    study_scan = next(s for s in stored_scans(filled_root) if s.patient_name)
    viewer, clinician = console("viewer"), console("clinician")
    for url in ("/", "/worklist", f"/scans/{study_scan.id}", "/failures", "/models"):
        html = viewer.get(url).text
        assert not any(phi in html for phi in PHI_STRINGS), url
    assert "PHIFAMILY" in clinician.get(f"/scans/{study_scan.id}").text
    assert "PHIFAMILY" in clinician.get("/worklist").text


def test_a_scan_whose_file_was_not_kept_says_so_for_its_thumbnail_as_for_its_picture(fresh_root):
    """The thumbnail said "There is no scan N." of a scan that is there, its file not kept."""
    scan = next(s for s in stored_scans(fresh_root) if s.state == "archived" and s.task_name == "busi")
    engine = create_db_engine(web_settings(fresh_root).db_url)
    with transaction(session_factory(engine)) as session:
        session.execute(update(Scan).where(Scan.id == scan.id).values(stored_path=None, source_path=None))
    engine.dispose()
    app = create_app(web_settings(fresh_root))
    try:
        client = signed_in(app, "viewer")
        for url in (f"/scans/{scan.id}/image.png", f"/scans/{scan.id}/thumb.jpg"):
            page = client.get(url)
            assert page.status_code == 404 and f"No file of scan {scan.id} was kept." in page.text, url
    finally:
        app.state.console.dispose()


def test_a_probability_and_its_threshold_are_shown_to_the_digits_that_compare_as_the_call(fresh_root):
    """0.4996 against 0.5, negative, read "50.0%" beside "0.500" and "negative"."""
    scan = next(s for s in stored_scans(fresh_root) if s.state == "archived" and s.task_name == "chestxray14")
    engine = create_db_engine(web_settings(fresh_root).db_url)
    with transaction(session_factory(engine)) as session:
        under, over = session.scalars(select(Result).where(Result.scan_id == scan.id).order_by(Result.id).limit(2))
        under.probability, under.threshold, under.positive = 0.4996, 0.5, False
        over.probability, over.threshold, over.positive = 0.348, 0.3468, True
        labels = under.label, over.label
    engine.dispose()
    rows = call_rows(fresh_root, scan.id, labels)
    assert rows[labels[0]] == ["49.96%", "50.00%", "negative"]
    assert rows[labels[1]] == ["34.8%", "34.7%", "positive"]


def test_a_multiclass_call_is_shown_to_the_digits_that_rank_it_above_the_runner_up(fresh_root):
    """At one decimal the called class and the next read "45.0%" and "45.0%": two equal numbers, one called."""
    probabilities = {"benign": 0.45041, "malignant": 0.45049, "normal": 0.0991}
    scan = busi_scan_called(fresh_root, probabilities, "malignant")
    shown = {label: row[0] for label, row in call_rows(fresh_root, scan.id, probabilities).items()}
    assert shown == {"benign": "45.04%", "malignant": "45.05%", "normal": "9.91%"}


def test_a_multiclass_top_class_is_called_as_in_the_report_never_positive_against_a_threshold(fresh_root):
    """A busi scan's top class at 34% read "34.0% 50.0% positive" in red, and "normal" was red in the
    worklist: an alarm below its own threshold, where the PDF says "top class" and "called" in black."""
    probabilities = {"benign": 0.33, "malignant": 0.33, "normal": 0.34}
    scan = busi_scan_called(fresh_root, probabilities, "normal")
    rows = call_rows(fresh_root, scan.id, probabilities)
    assert rows == {
        "benign": ["33.0%", "top", "class"],
        "malignant": ["33.0%", "top", "class"],
        "normal": ["34.0%", "top", "class", "called"],
    }
    page, row = scan_page_and_worklist_row(fresh_root, scan.id)
    assert "<th>call rule</th>" in page and 'class="pos"' not in page
    assert '<span class="called">normal</span> 34.0%' in row


def test_a_file_name_s_bidirectional_override_is_shown_escaped_never_obeyed(fresh_root):
    """A file dropped as "rtl\u202egnp.exe.png" drew the rest of the scan page's line backwards: its
    task "isub ksat" and its SHA-256 reversed, the hash a user compares with the PDF's and medcli's."""
    scans = stored_scans(fresh_root)
    archived = next(s for s in scans if s.state == "archived")
    failed = next(s for s in scans if s.state == "failed")
    engine = create_db_engine(web_settings(fresh_root).db_url)
    with transaction(session_factory(engine)) as session:
        for scan in (archived, failed):
            session.get(Scan, scan.id).source_name = f"busi/rtl\u202egnp{scan.id}.exe.png"
        # where its name is quoted: its history (a retry's "copied back ... as NAME") and why it failed
        session.add(ScanEvent(scan_id=archived.id, state="failed", detail=f"busi/rtl\u202egnp{archived.id}.exe.png"))
        session.get(Scan, failed.id).failure_message = f"busi/rtl\u202egnp{failed.id}.exe.png"
    engine.dispose()
    app = create_app(web_settings(fresh_root))
    try:
        client = signed_in(app, "admin")
        pages = [client.get(f"/scans/{archived.id}").text, client.get("/worklist").text, client.get("/failures").text]
    finally:
        app.state.console.dispose()
    for page, scan in zip(pages, (archived, archived, failed), strict=True):
        assert "\u202e" not in page and f"busi/rtl\\u202egnp{scan.id}.exe.png" in page
    assert pages[0].count(f"busi/rtl\\u202egnp{archived.id}.exe.png") == 2  # the name, and the step quoting it
    assert pages[2].count(f"busi/rtl\\u202egnp{failed.id}.exe.png") == 3  # its name, why it failed, its reason's


def test_a_binary_model_s_negative_class_is_called_in_black_never_a_red_positive(fresh_root):
    """A negative histopathology scan read "No IDC 50.2% 50.0% positive" in red on its page, and red
    in the worklist: the engine calls the negative class when the finding is not, and the console
    showed that call as an alarm. As in the PDF: "called", in black; the finding alone is red."""
    scan = next(s for s in stored_scans(fresh_root) if s.state == "archived" and s.task_name == "busi")
    engine = create_db_engine(web_settings(fresh_root).db_url)
    with transaction(session_factory(engine)) as session:
        binary = ModelVersion(task_name="busi_binary", version="v1", architecture="small_cnn", sha256="ef" * 32,
                              path="models/busi_binary/v1", status="registered",
                              manifest={"kind": "binary", "labels": ["benign", "malignant"]})  # fmt: skip
        session.add(binary)
        session.flush()
        for label, probability, positive in (("benign", 0.502, True), ("malignant", 0.498, False)):
            session.add(Result(scan_id=scan.id, model_version_id=binary.id, label=label, probability=probability,
                               threshold=0.5, positive=positive))  # fmt: skip
    engine.dispose()
    assert call_rows(fresh_root, scan.id, ["benign", "malignant"]) == {
        "benign": ["50.2%", "50.0%", "called"],
        "malignant": ["49.8%", "50.0%", "negative"],
    }
    page, row = scan_page_and_worklist_row(fresh_root, scan.id)
    assert 'class="pos"' not in page
    assert '<span class="called">benign</span> 50.2%' in row


def test_a_map_that_marks_no_part_of_the_image_is_said_flat_under_its_overlay(fresh_root):
    """As the PDF says it: the overlay of a map zero everywhere is the bare scan."""
    from meddaemon.engine.heatmap_grid import grid_bytes

    scan = next(s for s in stored_scans(fresh_root) if s.state == "archived" and s.task_name == "busi")
    engine = create_db_engine(web_settings(fresh_root).db_url)
    with transaction(session_factory(engine)) as session:
        maps = session.scalars(select(Heatmap).join(Result).where(Result.scan_id == scan.id)).all()
        assert maps, "the scan has a heatmap"
        maps[0].grid = grid_bytes(np.zeros((7, 7), np.float32))
    engine.dispose()
    app = create_app(web_settings(fresh_root))
    try:
        page = signed_in(app, "viewer").get(f"/scans/{scan.id}").text
    finally:
        app.state.console.dispose()
    assert page.count("the map is flat: it marks no part of the image over another") == 1


def busi_scan_called(root, probabilities: dict[str, float], called: str):  # type: ignore[no-untyped-def]
    """A reported busi scan of the state, its results set to these probabilities, ``called`` its call."""
    scan = next(s for s in stored_scans(root) if s.state == "archived" and s.task_name == "busi")
    engine = create_db_engine(web_settings(root).db_url)
    with transaction(session_factory(engine)) as session:
        for result in session.scalars(select(Result).where(Result.scan_id == scan.id)):
            result.probability, result.positive = probabilities[result.label], result.label == called
    engine.dispose()
    return scan


def scan_page_and_worklist_row(root, scan_id: int) -> tuple[str, str]:  # type: ignore[no-untyped-def]
    """The scan's page and its row of the worklist, as a viewer sees them."""
    app = create_app(web_settings(root))
    try:
        client = signed_in(app, "viewer")
        page = client.get(f"/scans/{scan_id}").text
        worklist = client.get("/worklist").text
    finally:
        app.state.console.dispose()
    return page, worklist.split(f'<tr class="scan" data-id="{scan_id}">', 1)[1].split("</tr>", 1)[0]


def call_rows(root, scan_id: int, labels) -> dict[str, list[str]]:  # type: ignore[no-untyped-def]
    """The words of each label's row of the calls table on the scan's page, as a viewer sees it."""
    app = create_app(web_settings(root))
    try:
        html = signed_in(app, "viewer").get(f"/scans/{scan_id}").text
    finally:
        app.state.console.dispose()
    return {
        label: re.sub(r"<[^>]+>", " ", html.split(f"<tr><td>{label}</td>", 1)[1].split("</tr>", 1)[0]).split()
        for label in labels
    }


def test_a_report_written_before_the_newest_version_s_results_says_so_beside_them(fresh_root):
    """The page showed busi/v2's calls beside the daemon's PDF of v1's, without a word."""
    scan = next(s for s in stored_scans(fresh_root) if s.state == "archived" and s.task_name == "busi")
    settings = web_settings(fresh_root)
    engine = create_db_engine(settings.db_url)
    with transaction(session_factory(engine)) as session:
        current = session.scalars(select(Result).where(Result.scan_id == scan.id)).first()
        newer = ModelVersion(task_name="busi", version="v2", architecture="small_cnn", sha256="ef" * 32,
                             path="models/busi/v2", status="registered", manifest={})  # fmt: skip
        session.add(newer)
        session.flush()
        session.add(Result(scan_id=scan.id, model_version_id=newer.id, label=current.label, probability=0.25,
                           threshold=0.5, positive=False))  # fmt: skip
    engine.dispose()
    app = create_app(settings)
    try:
        html = signed_in(app, "viewer").get(f"/scans/{scan.id}").text
    finally:
        app.state.console.dispose()
    assert 'id="report-older"' in html and "before the results of busi/v2" in html


def test_a_scan_evaluated_in_place_is_shown_from_its_file_where_it_lies_until_the_file_changes(fresh_root):
    """``medcli evaluate`` keeps nothing of a scan (its file lies in the dataset): every worklist row
    of an evaluation was a broken thumbnail (404), and a scan page's heatmaps lay over a missing picture."""
    cohort = fresh_root / "cohort"
    rng = np.random.default_rng(11)
    files = [write_png(cohort / f"synthetic_{i}.png", rng.integers(0, 255, (48, 48), dtype=np.uint8)) for i in range(3)]
    settings = web_settings(fresh_root)
    engine = create_db_engine(settings.db_url)
    try:
        run_evaluation(engine, settings, EvaluationRequest(cohort, "busi", workers=0, heatmaps=True))
    finally:
        engine.dispose()
    evaluated = [s for s in stored_scans(fresh_root) if s.state == "evaluated"]
    assert len(evaluated) == 3 and all(s.stored_path is None for s in evaluated)
    app = create_app(settings)
    try:
        client = signed_in(app, "viewer")
        rows = client.get("/worklist?state=evaluated").text
        for scan in evaluated:
            assert client.get(f"/scans/{scan.id}/thumb.jpg").status_code == 200
            page = client.get(f"/scans/{scan.id}").text
            base = re.search(rf'src="(/scans/{scan.id}/image\.png[^"]*)"', page)
            assert base is not None and client.get(base.group(1).replace("&amp;", "&")).status_code == 200
        assert "no-picture" not in rows
        changed = next(s for s in evaluated if s.source_name == "synthetic_0.png")
        files[0].write_bytes(files[1].read_bytes())
        picture = client.get(f"/scans/{changed.id}/image.png")
        assert picture.status_code == 404 and "changed since it was scored" in picture.text
    finally:
        app.state.console.dispose()


def test_the_overview_links_a_failure_reason_only_while_scans_still_fail_with_it(fresh_root):
    """Once a reason's scans were sent for retry, the overview still counted and linked it, to an
    anchor the failures page (failed scans not yet retried) no longer has."""
    failed = [s for s in stored_scans(fresh_root) if s.state == "failed"]
    reason = failed[0].failure_reason
    settings = web_settings(fresh_root)
    flags = ["--state-dir", str(settings.state_dir), "--watch", str(settings.watch)]
    retried = CliRunner().invoke(medcli, ["retry", "--reason", reason, *flags])
    assert retried.exit_code == 0, retried.output
    app = create_app(settings)
    try:
        client = signed_in(app, "viewer")
        overview = client.get("/").text
        failures = client.get("/failures").text
    finally:
        app.state.console.dispose()
    count = sum(s.failure_reason == reason for s in failed)
    assert f'<tr><td>{reason}</td><td class="n">{count}</td><td class="n">0</td></tr>' in overview
    assert f'href="/failures#{reason}"' not in overview and f'id="{reason}"' not in failures
    for other in {s.failure_reason for s in failed} - {reason}:
        assert f'href="/failures#{other}"' in overview and f'id="{other}"' in failures


def test_a_file_that_crashed_a_decoding_worker_is_never_decoded_by_the_console(fresh_root):
    """The console decodes in its own process (the daemon's, when the daemon serves it): showing a
    ``decoder_crashed`` file from failed/ took the daemon down with the console."""
    (unroutable,) = [s for s in stored_scans(fresh_root) if s.source_name == UNROUTABLE]
    settings = web_settings(fresh_root)
    assert settings.stored_file(unroutable.stored_path).exists()  # a file that decodes, kept in failed/
    engine = create_db_engine(settings.db_url)
    with transaction(session_factory(engine)) as session:
        session.execute(update(Scan).where(Scan.id == unroutable.id).values(failure_reason="decoder_crashed"))
    engine.dispose()
    app = create_app(settings)
    try:
        client = signed_in(app, "viewer")
        picture = client.get(f"/scans/{unroutable.id}/image.png")
        thumbnail = client.get(f"/scans/{unroutable.id}/thumb.jpg")
        page = client.get(f"/scans/{unroutable.id}").text
        worklist = client.get("/worklist").text
    finally:
        app.state.console.dispose()
    assert picture.status_code == 404 and "crashed a decoding worker" in picture.text
    assert thumbnail.status_code == 404
    assert "this file crashed a decoding worker" in page and f"/scans/{unroutable.id}/image.png" not in page
    assert "/thumb.jpg" in worklist and f"/scans/{unroutable.id}/thumb.jpg" not in worklist
