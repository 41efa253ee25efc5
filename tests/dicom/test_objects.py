"""The DICOM objects a scan's results are written as: valid IODs (dciodvfy), in the source's study,
holding exactly what the database holds, with UIDs that a rebuild gives again."""

from __future__ import annotations

import copy
import dataclasses
import errno
import io
import logging
import os
import stat
import time
from collections.abc import Iterator
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from click.testing import CliRunner
from dicom_factory import write_dicom
from PIL import Image, ImageDraw
from pydicom.charset import convert_encodings, encode_string
from sqlalchemy import select

from dicom_checks import dciodvfy_errors
from meddaemon.cli.medcli import cli as medcli
from meddaemon.daemon import bookkeeper
from meddaemon.daemon.service import Daemon
from meddaemon.db.engine import create_db_engine, session_factory, transaction
from meddaemon.db.migrate import upgrade
from meddaemon.db.models import Heatmap, ModelVersion, OutboxItem, Report, Result, Scan
from meddaemon.dicom import encoding, pdf, pmap, sc, sr, uids
from meddaemon.dicom.content import NOT_FOR_DIAGNOSIS, OutputRefused, ScanFacts, read_source, scan_facts
from meddaemon.dicom.writer import DicomOutputs, build_objects
from meddaemon.engine.heatmap_grid import grid_bytes, read_map
from meddaemon.engine.tasks import InputContract, all_tasks
from meddaemon.label_results import LabelResult
from meddaemon.overlays import ViewSource
from model_factory import STUDY_UID, drop_study, promote, reported_settings, run_then_resend_corrected, write_model

PROBABILITY_OF = "Probability of "
#: the outbox rows of a scan's own objects (the study report's rows belong to the study's first scan)
SCAN_OBJECTS = (OutboxItem.object_key.not_like(f"{pdf.STUDY_KIND}:%"),)


def written(daemon: Daemon) -> dict[int, dict[str, pydicom.Dataset]]:
    """{scan id: {object key: dataset}} for every object of a scan in the outbox (not the study report's)."""
    out: dict[int, dict[str, pydicom.Dataset]] = {}
    with daemon.sessions() as session:
        for item in session.scalars(select(OutboxItem).where(*SCAN_OBJECTS).order_by(OutboxItem.id)):
            assert item.path is not None
            out.setdefault(item.scan_id, {})[item.object_key] = pydicom.dcmread(daemon.settings.stored_file(item.path))
    return out


def source_of(daemon: Daemon, scan_id: int) -> pydicom.Dataset:
    with daemon.sessions() as session:
        scan = session.get(Scan, scan_id)
        assert scan is not None and scan.stored_path is not None
        return pydicom.dcmread(daemon.settings.stored_file(scan.stored_path), stop_before_pixels=True)


def test_every_dicom_scan_gets_an_sr_a_parametric_map_a_secondary_capture_and_its_pdf(delivered: Daemon):
    objects = written(delivered)
    with delivered.sessions() as session:
        dicom_scans = set(session.scalars(select(Scan.id).where(Scan.format == "dicom")))
    assert set(objects) == dicom_scans and len(dicom_scans) == 3  # the PNG scans get none
    with delivered.sessions() as session:  # --once: sent to the folder after the reports, then archived
        assert set(session.scalars(select(OutboxItem.status))) == {"delivered"}
        assert set(session.scalars(select(Scan.state).where(Scan.id.in_(dicom_scans)))) == {"archived"}
    share = delivered.settings.watch.parent / "share"
    study_report = 1  # the two-scan study's report, once it is complete
    assert len(list(share.rglob("*.dcm"))) == sum(len(by_key) for by_key in objects.values()) + study_report
    for by_key in objects.values():
        kinds = sorted(key.split(":")[0] for key in by_key)
        assert kinds == ["pdf", "pmap", "sc", "sr"]
        assert str(by_key["sr"].SOPClassUID) == pydicom.uid.ComprehensiveSRStorage
        assert str(by_key["pdf"].SOPClassUID) == "1.2.840.10008.5.1.4.1.1.104.1"


def test_every_object_written_passes_dciodvfy_with_no_errors(delivered: Daemon):
    with delivered.sessions() as session:
        paths = [delivered.settings.stored_file(p) for p in session.scalars(select(OutboxItem.path))]
    assert len(paths) == 13  # three DICOM scans' four kinds, and the two-scan study's report
    for path in paths:
        assert dciodvfy_errors(path) == [], path.name


def test_each_object_is_a_new_series_in_the_source_study_with_its_patient_module(delivered: Daemon):
    for scan_id, by_key in written(delivered).items():
        source = source_of(delivered, scan_id)
        series = {str(ds.SeriesInstanceUID) for ds in by_key.values()}
        kinds = {key.split(":")[0] for key in by_key}
        assert len(series) == len(kinds) and str(source.SeriesInstanceUID) not in series
        for ds in by_key.values():
            assert ds.StudyInstanceUID == source.StudyInstanceUID
            assert (ds.PatientID, str(ds.PatientName)) == (source.PatientID, str(source.PatientName))
            equipment = {
                (e.Manufacturer, e.PurposeOfReferenceCodeSequence[0].CodeValue)
                for e in ds.ContributingEquipmentSequence
            }
            assert ("meddaemon", "109102") in equipment  # the algorithm, as "Processing Equipment"


def test_the_sr_holds_the_stored_probabilities_and_calls_and_references_the_source(delivered: Daemon):
    for scan_id, by_key in written(delivered).items():
        with delivered.sessions() as session:
            stored = {r.label: r for r in session.scalars(select(Result).where(Result.scan_id == scan_id))}
        report = hd.sr.ComprehensiveSR.from_dataset(by_key["sr"])
        assert len(report.content.get_planar_roi_measurement_groups()) == 0
        probabilities, calls = {}, {}
        for item in _content_items(by_key["sr"]):
            meaning = item.ConceptNameCodeSequence[0].CodeMeaning
            if item.ValueType == "NUM" and meaning.startswith(PROBABILITY_OF):
                probabilities[meaning.removeprefix(PROBABILITY_OF)] = float(item.MeasuredValueSequence[0].NumericValue)
            if item.ValueType == "CODE" and meaning in stored:
                calls[meaning] = item.ConceptCodeSequence[0].CodeMeaning
        assert probabilities == pytest.approx({label: r.probability for label, r in stored.items()}, abs=1e-12)
        assert calls == {label: ("Present" if r.positive else "Absent") for label, r in stored.items()}
        source = source_of(delivered, scan_id)
        evidence = by_key["sr"].CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
        assert evidence.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
        algorithm = [i for i in _content_items(by_key["sr"]) if i.ConceptNameCodeSequence[0].CodeValue == "111001"]
        assert algorithm and algorithm[0].TextValue.startswith("meddaemon busi")


def code_value(code: pydicom.Dataset) -> str:
    """A code's value: Code Value up to 16 characters, Long Code Value past them."""
    return str(code.get("CodeValue") or code.LongCodeValue)


def _content_items(ds: pydicom.Dataset):  # type: ignore[no-untyped-def]
    for item in ds.get("ContentSequence", []):
        yield item
        yield from _content_items(item)


def test_the_parametric_map_equals_the_stored_heatmap_and_references_the_source(delivered: Daemon):
    for scan_id, by_key in written(delivered).items():
        with delivered.sessions() as session:
            maps = {
                label: (grid, (height, width))
                for label, grid, height, width in session.execute(
                    select(Result.label, Heatmap.grid, Heatmap.height, Heatmap.width)
                    .join(Heatmap, Heatmap.result_id == Result.id)
                    .where(Result.scan_id == scan_id)
                )
            }
        keys = [k for k in by_key if k.startswith("pmap:")]
        assert sorted(keys) == sorted(f"pmap:{label}" for label in maps)
        source = source_of(delivered, scan_id)
        for key in keys:
            ds = by_key[key]
            stored = read_map(*maps[key.removeprefix("pmap:")])
            assert stored.dtype == np.float32 and ds.pixel_array.dtype == np.float32
            assert np.array_equal(ds.pixel_array, stored)
            assert ds.SourceImageSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
            referenced = ds.ReferencedSeriesSequence[0]
            assert referenced.SeriesInstanceUID == source.SeriesInstanceUID
            assert referenced.ReferencedInstanceSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID


def test_the_secondary_capture_burns_in_the_overlay_and_a_not_for_diagnosis_caption(delivered: Daemon):
    for scan_id, by_key in written(delivered).items():
        source = source_of(delivered, scan_id)
        for key in (k for k in by_key if k.startswith("sc:")):
            ds = by_key[key]
            assert ds.BurnedInAnnotation == "YES" and ds.ImageComments == NOT_FOR_DIAGNOSIS
            assert min(ds.Rows, ds.Columns) >= sc.MIN_SIDE
            red, green, blue = np.moveaxis(ds.pixel_array[ds.Columns :].astype(int), -1, 0)  # the caption band
            assert ((red > 200) & (green > 200) & (blue < 80)).any()  # the yellow warning line is drawn
            assert ds.SourceImageSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID


def test_the_secondary_capture_is_its_picture_in_jpeg_baseline_marked_lossy(delivered: Daemon, tmp_path: Path):
    facts = three_label_facts(delivered, tmp_path)
    result = facts.heatmaps()[0]
    path = tmp_path / "sc.dcm"
    path.write_bytes(encoding.encode(sc.build(facts, result)))
    ds = pydicom.dcmread(path)
    assert ds.file_meta.TransferSyntaxUID == pydicom.uid.JPEGBaseline8Bit
    assert ds.PhotometricInterpretation == "YBR_FULL_422" and ds.SamplesPerPixel == 3
    assert (ds.LossyImageCompression, ds.LossyImageCompressionMethod) == ("01", "ISO_10918_1")
    picture = sc.picture(facts, result)
    assert float(ds.LossyImageCompressionRatio) == pytest.approx(picture.nbytes / len(ds.PixelData), rel=1e-3)
    assert float(ds.LossyImageCompressionRatio) > 4 and path.stat().st_size < picture.nbytes / 4
    decoded = ds.pixel_array  # pydicom gives RGB
    assert decoded.shape == picture.shape
    assert np.abs(decoded.astype(int) - picture).mean() < 2.0  # quality 95: what the eye cannot tell apart


def test_the_encapsulated_pdf_is_the_scan_report_without_phi_by_default(delivered: Daemon):
    for scan_id, by_key in written(delivered).items():
        with delivered.sessions() as session:
            report = session.scalars(select(Report).where(Report.scan_id == scan_id, Report.kind == "scan")).one()
        ds = by_key["pdf"]
        document = bytes(ds.EncapsulatedDocument)[: ds.EncapsulatedDocumentLength]
        assert document == delivered.settings.stored_file(report.path).read_bytes()
        assert not report.with_phi and ds.MIMETypeOfEncapsulatedDocument == "application/pdf"
        assert ds.SourceInstanceSequence[0].ReferencedSOPInstanceUID == source_of(delivered, scan_id).SOPInstanceUID


def test_the_complete_study_gets_its_study_report_as_an_encapsulated_pdf(delivered: Daemon):
    with delivered.sessions() as session:
        items = list(session.scalars(select(OutboxItem).where(OutboxItem.object_key.like(f"{pdf.STUDY_KIND}:%"))))
        study = session.scalars(select(Report).where(Report.kind == "study")).one()
        scans = list(
            session.scalars(
                select(Scan.id).where(Scan.study_instance_uid == study.study_instance_uid).order_by(Scan.id)
            )
        )
    assert len(items) == 1 and len(scans) == 2 and items[0].scan_id == scans[0] and items[0].status == "delivered"
    path = delivered.settings.stored_file(items[0].path or "")
    assert dciodvfy_errors(path) == []
    ds = pydicom.dcmread(path)
    document = delivered.settings.stored_file(study.path).read_bytes()
    assert bytes(ds.EncapsulatedDocument)[: ds.EncapsulatedDocumentLength] == document
    assert ds.StudyInstanceUID == study.study_instance_uid and ds.BurnedInAnnotation == "NO" and not study.with_phi
    assert (
        ds.SOPInstanceUID
        == items[0].sop_instance_uid
        == uids.study_object_uid(
            delivered.settings.dicom_uid_root, study.study_instance_uid, pdf.content_digest(document), pdf.STUDY_KIND
        )
    )
    sources = [source_of(delivered, scan_id) for scan_id in scans]
    assert [r.ReferencedSOPInstanceUID for r in ds.SourceInstanceSequence] == [s.SOPInstanceUID for s in sources]
    assert (ds.PatientID, str(ds.PatientName)) == (sources[0].PatientID, str(sources[0].PatientName))
    scan_series = {s.SeriesInstanceUID for by_key in written(delivered).values() for s in by_key.values()}
    assert ds.SeriesInstanceUID not in scan_series
    share = delivered.settings.watch.parent / "share"
    assert any(p.read_bytes() == path.read_bytes() for p in share.rglob("*.dcm"))


def test_the_study_s_encapsulated_pdf_names_the_patient_of_the_corrected_versions_its_pages_show(tmp_path: Path):
    """A study sent again with its patient's name corrected: the study report's pages show the latest
    versions and the corrected name, but its Encapsulated PDF took its patient module and references
    from the replaced versions: the PACS filed a report whose header named the old name."""
    share = tmp_path / "share"
    share.mkdir()
    settings = reported_settings(tmp_path, destination=[{"name": "share", "kind": "folder", "path": str(share)}])
    daemon = Daemon(settings)
    daemon.prepare()
    promote(daemon, write_model(tmp_path / "busi_model"))
    drop_study(settings.watch)

    again, instances = run_then_resend_corrected(daemon)

    with again.sessions() as session:
        study = session.scalars(select(OutboxItem).where(OutboxItem.object_key.like(f"{pdf.STUDY_KIND}:%"))).all()
        latest = session.scalars(select(Scan.id).where(Scan.study_instance_uid == STUDY_UID).order_by(Scan.id)).all()
    ds = pydicom.dcmread(settings.stored_file(max(study, key=lambda item: item.id).path or ""))
    assert str(ds.PatientName) == "SYNTHETIC^Corrected^Name" and len(latest) == 4
    assert [r.ReferencedSOPInstanceUID for r in ds.SourceInstanceSequence] == [i.SOPInstanceUID for i in instances]


def study_report_and_facts(delivered: Daemon) -> tuple[Report, list[ScanFacts]]:
    """The study report's row, and the facts of its study's first scan."""
    settings = delivered.settings
    with delivered.sessions() as session:
        study = session.scalars(select(Report).where(Report.kind == "study")).one()
        first = session.scalars(
            select(Scan.id).where(Scan.study_instance_uid == study.study_instance_uid).order_by(Scan.id)
        ).first()
        assert first is not None
        return study, [scan_facts(session, first, settings.state_dir, settings.dicom_uid_root)]


def test_a_newer_study_report_is_a_new_instance_of_the_same_series_and_a_resend_the_same(delivered: Daemon):
    _, facts = study_report_and_facts(delivered)
    old, same, newer = (pdf.build_study(facts, data, False) for data in (b"%PDF-1 a", b"%PDF-1 a", b"%PDF-1 b"))
    assert old.SOPInstanceUID == same.SOPInstanceUID != newer.SOPInstanceUID
    assert old.SeriesInstanceUID == newer.SeriesInstanceUID
    assert pdf.build_study(facts, b"%PDF-1 a", True).BurnedInAnnotation == "YES"


def test_a_study_report_rendered_again_with_nothing_new_is_the_same_instance(delivered: Daemon, tmp_path: Path):
    """reportlab writes its dates and a new /ID into each rendering: the instance was named by the
    PDF's bytes, so each rebuild (a scan's report rebuilt by medcli report marks its study stale)
    sent the PACS another copy of the same report under a new UID."""
    settings = delivered.settings
    study, facts = study_report_and_facts(delivered)
    document = settings.stored_file(study.path).read_bytes()
    time.sleep(1.1)  # the PDF's dates are to the second
    again = tmp_path / "again.pdf"
    flags = ["--state-dir", str(settings.state_dir), "--out", str(again)]
    result = CliRunner().invoke(medcli, ["report", "study", study.study_instance_uid, *flags])
    assert result.exit_code == 0, result.output
    assert again.read_bytes() != document  # rendered anew: other dates, another /ID
    assert pdf.content_digest(again.read_bytes()) == pdf.content_digest(document)
    assert (
        pdf.build_study(facts, again.read_bytes(), False).SOPInstanceUID
        == pdf.build_study(facts, document, False).SOPInstanceUID
    )


#: set when the object is built: differ between two builds of the same object
BUILD_TIMES = {"ContentDate", "ContentTime", "InstanceCreationDate", "InstanceCreationTime", "ContributionDateTime"}


def _elements(ds: pydicom.Dataset) -> list[str]:
    """Every element but the build times, a sequence by its tag and length (which Python class holds
    its items is no part of the object)."""
    return [
        f"{e.tag} SQ {len(e.value)}" if e.VR == "SQ" else str(e) for e in ds.iterall() if e.keyword not in BUILD_TIMES
    ]


def test_the_sr_is_the_document_highdicom_builds_from_the_whole_content_tree(delivered: Daemon):
    settings = delivered.settings
    for scan_id in written(delivered):
        with delivered.sessions() as session:
            facts = scan_facts(session, scan_id, settings.state_dir, settings.dicom_uid_root)
        plain = hd.sr.ComprehensiveSR(
            evidence=[facts.source], content=sr.measurement_report(facts), **sr.document_attributes(facts)
        )
        built = sr.build(facts)
        assert len(built.ContentSequence) > 0 and _elements(built) == _elements(plain)


def chest_facts(source: pydicom.Dataset, sha256: str, model_version: str, seed: int) -> ScanFacts:
    """A scan of the chestxray14 preset (14 labels), SYNTHETIC probabilities, about half called."""
    rng = np.random.default_rng(seed)
    results = tuple(
        LabelResult(label, float(p), 0.5, bool(p >= 0.5), None, None)
        for label, p in zip(all_tasks()["chestxray14"].labels, rng.random(14), strict=True)
    )
    return ScanFacts(1, sha256, "chestxray14", model_version, "densenet121", results, source, "1.2.826.0.1.3680043.10.")


def test_an_sr_filled_in_from_its_model_s_pattern_is_the_one_highdicom_builds(tmp_path: Path):
    paths = [write_dicom(tmp_path / f"{n}.dcm", modality="DX", patient_id=f"P{n}") for n in range(3)]
    scans = [
        chest_facts(read_source(paths[0]), "a" * 64, "v1", 0),
        chest_facts(read_source(paths[1]), "b" * 64, "v1", 1),  # the same model: filled from the first's pattern
        chest_facts(read_source(paths[2]), "c" * 64, "v2", 2),  # another version: a pattern of its own
    ]
    assert {r.positive for r in scans[0].results} == {True, False}
    first = sr.content_tree(scans[0])
    first_before = _elements(first)
    for facts in scans:
        plain = hd.sr.ComprehensiveSR(
            evidence=[facts.source], content=sr.measurement_report(facts), **sr.document_attributes(facts)
        )
        built = sr.build(facts)
        assert _elements(built) == _elements(plain)
        path = tmp_path / f"sr_{facts.sha256[0]}.dcm"
        path.write_bytes(encoding.encode(built))
        assert dciodvfy_errors(path) == [], path.name
        back = pydicom.dcmread(path)
        probabilities = {
            item.ConceptNameCodeSequence[0].CodeMeaning.removeprefix(PROBABILITY_OF): item.MeasuredValueSequence[0]
            for item in _content_items(back)
            if item.ValueType == "NUM"
        }
        calls = {
            item.ConceptNameCodeSequence[0].CodeMeaning: item.ConceptCodeSequence[0].CodeMeaning
            for item in _content_items(back)
            if item.ValueType == "CODE" and item.ConceptNameCodeSequence[0].CodeMeaning in probabilities
        }
        images = [item for item in _content_items(back) if item.ValueType == "IMAGE"]
        assert {label: value.FloatingPointValue for label, value in probabilities.items()} == {
            r.label: r.probability for r in facts.results
        }
        assert calls == {r.label: ("Present" if r.positive else "Absent") for r in facts.results}
        assert len(images) == 14
        assert {i.ReferencedSOPSequence[0].ReferencedSOPInstanceUID for i in images} == {facts.source.SOPInstanceUID}
    assert _elements(first) == first_before  # filling in other scans left the pattern and its first tree alone


#: what highdicom draws anew at each build: the times, and a UID of the map's dimension organisation
DRAWN_PER_BUILD = BUILD_TIMES | {"DateOfSecondaryCapture", "TimeOfSecondaryCapture", "DimensionOrganizationUID"}


def with_other_labels(facts: ScanFacts, folder: Path, labels: tuple[str, ...]) -> ScanFacts:
    """``facts`` with more called labels, each with a heatmap of its own (the first one's, flipped)
    and an overlay not drawn yet: what a multilabel scan (the chestxray14 preset) has."""
    first = facts.heatmaps()[0]
    assert first.grid is not None
    extra = []
    for axis, label in enumerate(labels):
        grid = grid_bytes(np.flip(np.load(io.BytesIO(first.grid)), axis % 2))
        extra.append(dataclasses.replace(first, label=label, grid=grid, overlay_path=folder / f"{label}.jpg"))
    return dataclasses.replace(facts, results=(*facts.results, *extra))


def three_label_facts(daemon: Daemon, folder: Path) -> ScanFacts:
    """The facts of the daemon's first scan with objects, given two more labels (see ``with_other_labels``)."""
    settings = daemon.settings
    scan_id = next(iter(written(daemon)))
    with daemon.sessions() as session:
        facts = scan_facts(session, scan_id, settings.state_dir, settings.dicom_uid_root)
    return with_other_labels(facts, folder, ("Second", "Third"))


def test_a_multilabel_scan_s_maps_and_captures_after_the_first_are_the_ones_highdicom_builds(
    delivered: Daemon, tmp_path: Path
):
    facts = three_label_facts(delivered, tmp_path)
    labels = [r.label for r in facts.heatmaps()]
    built = dict(build_objects(facts, ("pmap", "sc"), None, False))
    assert sorted(built) == sorted(f"{kind}:{label}" for kind in ("pmap", "sc") for label in labels)

    def elements(ds: pydicom.Dataset) -> list[str]:
        return [str(e) for e in ds.iterall() if e.keyword not in DRAWN_PER_BUILD]

    for number, result in enumerate(facts.heatmaps(), 1):
        for kind, module in (("pmap", pmap), ("sc", sc)):
            ours = built[f"{kind}:{result.label}"]
            assert elements(ours) == elements(module.build(facts, result, number)), (kind, result.label)
            assert ours.file_meta.MediaStorageSOPInstanceUID == ours.SOPInstanceUID
            path = tmp_path / f"{kind}_{result.label}.dcm"
            path.write_bytes(encoding.encode(ours))
            assert path.read_bytes() == pydicom_bytes(ours)  # the first's items, encoded once, in each
            assert dciodvfy_errors(path) == [], path.name
        assert result.grid is not None and result.map_size is not None
        stored = read_map(result.grid, result.map_size)
        assert np.array_equal(pydicom.dcmread(tmp_path / f"pmap_{result.label}.dcm").pixel_array, stored)
    assert len({str(ds.SOPInstanceUID) for ds in built.values()}) == len(built)


def drawn_in_full(facts: ScanFacts, result: LabelResult) -> np.ndarray:
    """A capture's picture as its description reads, every line drawn on it: the overlay the report
    shows, enlarged (bilinear) to ``MIN_SIDE`` on its shorter side, and below it a band of three
    caption lines, 1.4 font sizes apart, the warning in yellow."""
    assert result.overlay_path is not None
    with Image.open(result.overlay_path) as image:
        overlay = image.convert("RGB")
    scale = max(1.0, sc.MIN_SIDE / min(overlay.size))
    overlay = overlay.resize((round(overlay.width * scale), round(overlay.height * scale)), Image.Resampling.BILINEAR)
    font = sc._font(max(12, overlay.width // 40))
    step = int(font.size * 1.4)
    canvas = Image.new("RGB", (overlay.width, overlay.height + step * 3 + step // 2))
    canvas.paste(overlay)
    draw = ImageDraw.Draw(canvas)
    for i, line in enumerate(sc.caption(facts, result)):
        colour = (255, 255, 0) if i == 0 else (255, 255, 255)
        draw.text((step // 4, overlay.height + step // 4 + i * step), line, fill=colour, font=font)
    return np.asarray(canvas)


def test_every_label_s_picture_is_its_overlay_and_its_three_caption_lines_the_shared_ones_drawn_once(
    delivered: Daemon, tmp_path: Path
):
    facts = three_label_facts(delivered, tmp_path)
    results = facts.heatmaps()
    drawn_before = sc._caption_band.cache_info().misses
    for result in [*results, *reversed(results)]:
        assert np.array_equal(sc.picture(facts, result), drawn_in_full(facts, result)), result.label
    assert sc._caption_band.cache_info().misses - drawn_before <= 1  # one band for all the labels


def test_a_code_hashes_as_highdicom_hashes_it():
    from meddaemon.dicom import hot_paths

    concept = hd.sr.CodedConcept
    assert concept.__hash__ is hot_paths._code_hash  # writer.py applied it
    codes = [
        concept("52101004", "SCT", "Present"),
        concept("x" * 20, "99MEDDAEMON", "a long code value"),
        concept("urn:oid:1.2.840.10008.1.2.3", "99MEDDAEMON", "a URN code value"),
        concept("1", "UCUM", "no units", scheme_version="1.4"),
    ]
    assert [c.value for c in codes[1:3]] == ["x" * 20, "urn:oid:1.2.840.10008.1.2.3"]
    assert "LongCodeValue" in codes[1] and "URNCodeValue" in codes[2]
    for code in codes:
        assert hash(code) == hot_paths._code_hash.original(code)
    assert len({codes[0], concept("52101004", "SCT", "Present, again")}) == 1  # meaning is not part of it


def test_the_remembered_iod_lookups_answer_as_highdicom_does():
    import highdicom._standard_utils
    import highdicom.base
    import highdicom.base_content
    import highdicom.image
    import highdicom.sr.content

    lookup, pixel_data = highdicom.base.is_attribute_in_iod, highdicom.base_content.does_iod_have_pixel_data
    assert hasattr(lookup, "uncached") and hasattr(pixel_data, "cache_info")  # hot_paths.py replaced them
    assert highdicom._standard_utils.is_attribute_in_iod is lookup is highdicom.sr.content.is_attribute_in_iod
    parametric_map = "1.2.840.10008.5.1.4.1.1.30"
    for sop_class in (pydicom.uid.ComprehensiveSRStorage, parametric_map, pydicom.uid.UltrasoundImageStorage):
        for attribute in ("ContentDate", "PixelData", "FloatPixelData", "NumberOfFrames", "NoSuchAttribute"):
            assert lookup(attribute, sop_class) == lookup.uncached(attribute, sop_class)
            assert lookup(attribute, sop_class) == lookup(attribute, sop_class)
        assert pixel_data(sop_class) == pixel_data.__wrapped__(sop_class)
    multiframe = [pydicom.Dataset(), pydicom.Dataset()]
    multiframe[0].SOPClassUID, multiframe[1].SOPClassUID = parametric_map, pydicom.uid.CTImageStorage
    assert [highdicom._standard_utils.is_multiframe_image(ds) for ds in multiframe] == [True, False]


def test_the_remembered_module_tree_is_the_one_highdicom_builds():
    import highdicom._standard_utils
    import highdicom.image

    remembered = highdicom.image.construct_module_tree
    assert hasattr(remembered, "cache_info")  # hot_paths.py replaced it
    module = "multi-frame-functional-groups"
    assert remembered(module) == highdicom._standard_utils.construct_module_tree(module)
    assert remembered(module) is remembered(module)


def test_building_the_objects_again_gives_the_same_uids(delivered: Daemon):
    settings = delivered.settings
    for scan_id, by_key in written(delivered).items():
        with delivered.sessions() as session:
            facts = scan_facts(session, scan_id, settings.state_dir, settings.dicom_uid_root)
        again = dict(build_objects(facts, ("sr", "pmap", "sc", "pdf"), b"%PDF-1.4\n%%EOF\n", False))
        assert sorted(again) == sorted(by_key)
        for key, ds in again.items():
            assert (ds.SOPInstanceUID, ds.SeriesInstanceUID) == (
                by_key[key].SOPInstanceUID,
                by_key[key].SeriesInstanceUID,
            )


def pydicom_bytes(ds: pydicom.Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def test_each_object_is_encoded_to_the_bytes_pydicom_writes(delivered: Daemon):
    settings = delivered.settings
    kinds = set()
    for scan_id in written(delivered):
        with delivered.sessions() as session:
            facts = scan_facts(session, scan_id, settings.state_dir, settings.dicom_uid_root)
        source = copy.deepcopy(facts.source)
        for key, ds in build_objects(facts, ("sr", "pmap", "sc", "pdf"), b"%PDF-1.4\n%%EOF\n", False):
            ours = encoding.encode(copy.deepcopy(ds))  # before pydicom corrects ambiguous VRs in place
            assert ours == pydicom_bytes(ds), key
            kinds.add(key.split(":")[0])
        assert facts.source == source  # the objects share its elements, never change them
    assert kinds == {"sr", "pmap", "sc", "pdf"}


def test_a_file_read_back_is_encoded_as_pydicom_writes_it_its_file_meta_left_as_it_was(tmp_path: Path):
    explicit = pydicom.dcmread(write_dicom(tmp_path / "explicit.dcm", modality="DX"))
    meta = [str(e) for e in explicit.file_meta]
    assert "FileMetaInformationGroupLength" in explicit.file_meta
    explicit.SOPInstanceUID = pydicom.uid.generate_uid()  # the file meta's instance UID follows, as in dcmwrite
    ours = encoding.encode(explicit)
    assert [str(e) for e in explicit.file_meta] == meta
    assert ours == pydicom_bytes(explicit)
    assert pydicom.dcmread(io.BytesIO(ours)).file_meta.MediaStorageSOPInstanceUID == explicit.SOPInstanceUID
    implicit = pydicom.dcmread(
        write_dicom(tmp_path / "implicit.dcm", transfer_syntax=pydicom.uid.ImplicitVRLittleEndian)
    )
    assert encoding.encode(implicit) == pydicom_bytes(implicit)  # another transfer syntax: dcmwrite's own


def test_a_frozen_item_is_written_as_pydicom_writes_it_in_every_object_and_forgotten_once_gone():
    item = pydicom.Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = "52101004", "SCT", "Present"
    encoding.freeze(item)
    for number in range(2):
        ds = pydicom.Dataset()
        ds.SOPClassUID, ds.SOPInstanceUID = pydicom.uid.ComprehensiveSRStorage, pydicom.uid.generate_uid()
        ds.InstanceNumber = number
        ds.ConceptCodeSequence = [item]
        ds.file_meta = pydicom.dataset.FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
        assert encoding.encode(ds) == pydicom_bytes(ds)
    assert id(item) in encoding._FROZEN
    key = id(item)
    del item, ds
    assert key not in encoding._FROZEN


def test_text_in_a_sequence_is_encoded_in_the_character_set_of_its_object(tmp_path: Path):
    source = tmp_path / "latin.dcm"
    write_dicom(source, pixels=np.zeros((8, 8), np.uint8), extra={"SpecificCharacterSet": "ISO_IR 100"})
    item = pydicom.Dataset()
    item.PatientName = "Müller^Zoë"
    item.CodeMeaning = "Größe"
    item.CodeValue = "odd"  # ASCII, padded with a space
    item.ReferencedSOPInstanceUID = "1.2.345"  # padded with a NUL
    inner = pydicom.Dataset()
    inner.TextValue = "é" * 3
    inner.is_undefined_length_sequence_item = True
    item.ContentSequence = [inner]
    ds = pydicom.dcmread(source)
    ds.SourceImageSequence = [item]
    ds.ContentSequence = []
    ours = encoding.encode(copy.deepcopy(ds))
    assert ours == pydicom_bytes(ds)
    back = pydicom.dcmread(io.BytesIO(ours))
    assert back.SourceImageSequence[0].PatientName == "Müller^Zoë"
    assert back.SourceImageSequence[0].ContentSequence[0].TextValue == "ééé"


# -- sources that lack what a study needs ----------------------------------------------------------


def centre_of_map_pixel(ds: pydicom.Dataset, row: int, column: int) -> np.ndarray:
    """Where the centre of the map's pixel (row, column) lies, in patient coordinates (mm)."""
    frame = ds.PerFrameFunctionalGroupsSequence[0]
    shared = ds.SharedFunctionalGroupsSequence[0]
    position = np.array([float(v) for v in frame.PlanePositionSequence[0].ImagePositionPatient])
    orientation = [float(v) for v in shared.PlaneOrientationSequence[0].ImageOrientationPatient]
    spacing = [float(v) for v in shared.PixelMeasuresSequence[0].PixelSpacing]
    return position + np.array(orientation[:3]) * column * spacing[1] + np.array(orientation[3:]) * row * spacing[0]


@pytest.mark.parametrize(
    ("resize", "first_column", "source_columns_per_map_column"),
    [("stretch", 0.0, 120 / 32), ("resize_then_crop", 16 * 120 / 64, 120 / 64)],
)
def test_the_parametric_map_lies_over_the_part_of_the_source_the_model_saw(
    tmp_path: Path, resize: str, first_column: float, source_columns_per_map_column: float
):
    """A 60 x 120 source (0.5 mm rows, 0.25 mm columns) into a 32 x 32 input: stretched, the map
    spans the whole source; resized then centre-cropped, only its middle 60 x 60 pixels, which the
    map was spread over the whole width of (a hot spot drawn 30 mm from where the model saw it)."""
    placed = {
        "PixelSpacing": [0.5, 0.25],
        "ImagePositionPatient": [10.0, 20.0, 30.0],
        "ImageOrientationPatient": [1.0, 0.0, 0.0, 0.0, 1.0, 0.0],
        "FrameOfReferenceUID": "1.2.3.4.5",
    }
    source_path = write_dicom(
        tmp_path / "wide.dcm", pixels=np.zeros((60, 120), np.uint8), modality="US", body_part="BREAST", extra=placed
    )
    contract = InputContract(1, 32, 32, (0.5,), (0.25,), resize=resize)
    facts = ScanFacts(1, "ab" * 32, "busi", "v1", "small_cnn", (), pydicom.dcmread(source_path),
                      "1.2.826.0.1.3680043.8.498", ViewSource(contract=contract))  # fmt: skip
    grid = np.random.default_rng(5).random((32, 32)).astype(np.float32)
    result = LabelResult("malignant", 0.9, 0.5, True, overlay_path=tmp_path / "o.jpg", map_size=(32, 32),
                         grid=grid_bytes(grid))  # fmt: skip

    built = pmap.build(facts, result)

    for row, column in ((0, 0), (31, 31), (10, 20)):
        # the centre of the input's pixel, in source pixel indices (a source pixel's centre is its index)
        source_row = (row + 0.5) * 60 / 32 - 0.5
        source_column = first_column + (column + 0.5) * source_columns_per_map_column - 0.5
        expected = [10.0 + source_column * 0.25, 20.0 + source_row * 0.5, 30.0]
        assert np.allclose(centre_of_map_pixel(built, row, column), expected, atol=1e-6), (row, column)


@pytest.fixture
def label_files(tmp_path: Path) -> LabelResult:
    rng = np.random.default_rng(3)
    np.save(tmp_path / "map.npy", rng.random((32, 32)).astype(np.float32))
    Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(tmp_path / "overlay.jpg")
    return LabelResult("malignant", 0.75, 0.5, True, tmp_path / "map.npy", tmp_path / "overlay.jpg", (32, 32))


def test_a_source_without_patient_and_study_modules_gives_valid_objects_with_empty_type_2_values(
    tmp_path: Path, label_files: LabelResult
):
    bare = tmp_path / "bare.dcm"
    write_dicom(bare, pixels=np.zeros((40, 40), np.uint8), modality="US", body_part="BREAST")
    ds = pydicom.dcmread(bare)
    for keyword in (
        "PatientName",
        "PatientID",
        "PatientBirthDate",
        "PatientSex",
        "PatientAge",
        "StudyDate",
        "StudyTime",
        "StudyID",
        "AccessionNumber",
    ):
        delattr(ds, keyword)
    ds.save_as(bare)
    facts = ScanFacts(1, "ab" * 32, "busi", "v1", "small_cnn", (label_files,), read_source(bare), "1.2.3.")
    for key, built in build_objects(facts, ("sr", "pmap", "sc", "pdf"), b"%PDF-1.4\n%%EOF\n", False):
        path = tmp_path / f"{key.replace(':', '_')}.dcm"
        built.save_as(path, enforce_file_format=True)
        assert dciodvfy_errors(path) == [], key
        back = pydicom.dcmread(path)
        assert back.PatientName == "" and back.PatientID == "" and back.StudyInstanceUID == ds.StudyInstanceUID


@pytest.mark.parametrize(
    ("charset", "name", "sex", "written_charset", "written_sex"),
    [
        ("ISO_IR 192", "Wang^XiaoMing=\u738b^\u5c0f\u660e", "F", "ISO_IR 192", "F"),
        ("ISO_IR 100", "M\u00fcller^J\u00fcrgen", "M", "ISO_IR 100", "M"),
        (
            ["", "ISO 2022 IR 87"],
            "Yamada^Tarou=\u5c71\u7530^\u592a\u90ce",
            "O",
            ["ISO 2022 IR 6", "ISO 2022 IR 87"],
            "O",
        ),
        ("GB18030", "Wang^XiaoDong=\u738b^\u5c0f\u4e1c", "m", "GB18030", "M"),
        ("ISO_IR 6", "DOE^JANE", "U", None, ""),
    ],
    ids=["utf-8", "latin-1", "japanese with code extensions", "gb18030, sex in lower case", "ISO_IR 6, sex U"],
)
def test_every_object_keeps_the_patient_s_name_in_its_character_set_and_a_sex_only_as_the_standard_spells_it(
    tmp_path: Path, label_files: LabelResult, charset, name: str, sex: str, written_charset, written_sex: str
):
    """The Secondary Capture had no Specific Character Set (王^小明 went to the PACS as ?^??, Müller
    undeclared Latin-1); a Japanese source's code extensions (an empty first value) and a lone
    ISO_IR 6, or a Patient's Sex of U or m, made highdicom refuse the SR and the map (and the capture)."""
    path = write_dicom(tmp_path / "source.dcm", pixels=np.zeros((40, 40), np.uint8), modality="US", body_part="BREAST")
    ds = pydicom.dcmread(path)
    ds.SpecificCharacterSet, ds.PatientName, ds.PatientSex = charset, name, sex
    ds.save_as(path)
    facts = ScanFacts(1, "ab" * 32, "busi", "v1", "small_cnn", (label_files,), read_source(path), "1.2.3.")
    built = dict(build_objects(facts, ("sr", "pmap", "sc", "pdf"), b"%PDF-1.4\n%%EOF\n", False))
    assert {key.split(":")[0] for key in built} == {"sr", "pmap", "sc", "pdf"}
    for key, dataset in built.items():
        written = tmp_path / f"{key.replace(':', '_')}.dcm"
        dataset.save_as(written, enforce_file_format=True)
        assert dciodvfy_errors(written) == [], key
        back = pydicom.dcmread(written)
        # the PDF declared ISO_IR 192 for a source declaring nothing, unlike its sibling objects
        assert (back.get("SpecificCharacterSet"), str(back.PatientName), back.PatientSex) == (
            written_charset,
            name,
            written_sex,
        ), key


def test_the_pdf_of_a_source_with_an_undeclared_accented_name_declares_utf_8_and_stays_valid(
    tmp_path: Path, label_files: LabelResult
):
    """Declaring its source's set, none here, the PDF wrote the name's bytes undeclared (a name is
    no ``str`` to a check of its text) and dciodvfy refused the name's characters."""
    path = write_dicom(tmp_path / "source.dcm", pixels=np.zeros((40, 40), np.uint8), modality="US", body_part="BREAST")
    ds = pydicom.dcmread(path)
    ds.pop("SpecificCharacterSet", None)
    ds.PatientName = "SYNTHETIC M\u00fcller^J\u00fcrgen"
    ds.save_as(path)
    facts = ScanFacts(1, "ab" * 32, "busi", "v1", "small_cnn", (label_files,), read_source(path), "1.2.3.")
    [(_, built)] = build_objects(facts, ("pdf",), b"%PDF-1.4\n%%EOF\n", False)
    written = tmp_path / "pdf.dcm"
    built.save_as(written, enforce_file_format=True)
    back = pydicom.dcmread(written)
    assert (back.SpecificCharacterSet, str(back.PatientName)) == ("ISO_IR 192", "SYNTHETIC M\u00fcller^J\u00fcrgen")
    assert dciodvfy_errors(written) == []


@pytest.mark.parametrize(
    ("charset", "labels"),
    [
        (None, ("ductal_carcinoma_in_situ", "ductal_carcinoma_invasive")),
        (None, ("l\u00e9sion_b\u00e9nigne", "l\u00e9sion_maligne")),
        ("ISO_IR 100", ("\u826f\u6027", "\u60aa\u6027")),
    ],
    ids=["labels sharing their first 16 characters", "labels outside ASCII", "labels outside the source's Latin-1"],
)
def test_each_label_of_a_custom_task_is_its_own_code_in_objects_that_say_their_character_set(
    tmp_path: Path, label_files: LabelResult, charset, labels: tuple[str, ...]
):
    """Two labels sharing their first 16 characters were one SR code value (a reader could not tell
    which group was which), and a label outside the source's character set went out undeclared."""
    path = write_dicom(tmp_path / "source.dcm", pixels=np.zeros((40, 40), np.uint8), modality="US", body_part="BREAST")
    ds = pydicom.dcmread(path)
    if charset:
        ds.SpecificCharacterSet, ds.PatientName = charset, "M\u00fcller^J\u00fcrgen"
        ds.save_as(path)
    results = tuple(
        dataclasses.replace(label_files, label=label, probability=p, positive=p >= 0.5)
        for label, p in zip(labels, (0.25, 0.75), strict=True)
    )
    facts = ScanFacts(1, "ab" * 32, "custom", "v1", "small_cnn", results, read_source(path), "1.2.3.")
    built = dict(build_objects(facts, ("sr", "pmap", "sc"), None, False))
    assert {key.split(":")[0] for key in built} == {"sr", "pmap", "sc"}
    for key, dataset in built.items():
        written = tmp_path / f"{key.replace(':', '_')}.dcm"
        dataset.save_as(written, enforce_file_format=True)
        assert dciodvfy_errors(written) == [], key
        if charset:
            assert str(pydicom.dcmread(written).PatientName) == "M\u00fcller^J\u00fcrgen", key
    back = pydicom.dcmread(tmp_path / "sr.dcm")
    findings = [
        i
        for i in _content_items(back)
        if i.ValueType == "CODE" and i.ConceptCodeSequence[0].CodeMeaning in ("Present", "Absent")
    ]
    measured = [i for i in _content_items(back) if i.ValueType == "NUM"]
    assert len({code_value(i.ConceptNameCodeSequence[0]) for i in findings}) == 2
    assert len({code_value(i.ConceptNameCodeSequence[0]) for i in measured}) == 2
    assert {i.ConceptNameCodeSequence[0].CodeMeaning: i.ConceptCodeSequence[0].CodeMeaning for i in findings} == {
        labels[0]: "Absent",
        labels[1]: "Present",
    }
    assert {
        i.ConceptNameCodeSequence[0].CodeMeaning.removeprefix(PROBABILITY_OF): i.MeasuredValueSequence[
            0
        ].FloatingPointValue
        for i in measured
    } == {labels[0]: 0.25, labels[1]: 0.75}


def test_a_source_without_a_study_instance_uid_is_refused_by_name(tmp_path: Path):
    path = write_dicom(tmp_path / "nostudy.dcm", modality="US", body_part="BREAST")
    ds = pydicom.dcmread(path)
    del ds.StudyInstanceUID
    ds.save_as(path)
    with pytest.raises(OutputRefused) as refused:
        read_source(path)
    assert refused.value.reason == "source_without_study" and "StudyInstanceUID" in str(refused.value)


@pytest.mark.parametrize("study", ["../../synthetic_escape", "1.2.826/0.1", "..", "1.2..3", "1." + "2" * 64])
def test_a_source_whose_study_instance_uid_is_not_a_uid_is_refused_by_name(tmp_path: Path, study: str):
    """A UID copied from the source ends up in folder names (a folder destination files by study
    and series): one that is not digits and dots never joins a study."""
    path = write_dicom(tmp_path / "malformed.dcm", modality="US", body_part="BREAST")
    ds = pydicom.dcmread(path)
    ds.StudyInstanceUID = study
    ds.save_as(path)
    with pytest.raises(OutputRefused) as refused:
        read_source(path)
    assert refused.value.reason == "source_malformed_uid"
    message = str(refused.value)
    assert message.startswith("the source's StudyInstanceUID is not a UID") and study not in message


def test_a_source_uid_with_a_leading_zero_in_a_component_still_joins_its_study(tmp_path: Path):
    """PS3.5 forbids it, old devices write it, and a PACS files the study under it all the same."""
    path = write_dicom(tmp_path / "old_device.dcm", modality="US", body_part="BREAST")
    ds = pydicom.dcmread(path)
    ds.StudyInstanceUID = "1.2.840.10008.05.1"
    ds.save_as(path)
    assert read_source(path).StudyInstanceUID == "1.2.840.10008.05.1"


def test_building_the_objects_logs_nothing_naming_the_source(delivered: Daemon, tmp_path: Path, caplog):  # type: ignore[no-untyped-def]
    facts = three_label_facts(delivered, tmp_path)
    caplog.set_level(logging.DEBUG)
    built = build_objects(facts, ("sr", "pmap", "sc", "pdf"), b"%PDF-1.4\n%%EOF\n", False)
    assert len(built) == 8  # an SR, a map and a capture for each of three labels, the PDF
    assert str(facts.source.SOPInstanceUID) not in caplog.text and str(facts.source.PatientID) not in caplog.text
    assert not [r for r in caplog.records if r.name.startswith("highdicom") and r.levelno < logging.WARNING]


def test_the_kinds_have_distinct_series_numbers():
    numbers = {sr.SERIES_NUMBER, pmap.SERIES_NUMBER, sc.SERIES_NUMBER, pdf.SERIES_NUMBER, pdf.STUDY_SERIES_NUMBER}
    assert len(numbers) == 5


def inferred_dicom_scan(settings, source: Path):  # type: ignore[no-untyped-def]
    """A database holding ``source`` as an inferred busi scan with one result (no heatmap):
    (engine, sessions, scan id)."""
    engine = create_db_engine(settings.db_url)
    upgrade(engine)
    sessions = session_factory(engine)
    with transaction(sessions) as session:
        bookkeeper.ensure_tasks(session, all_tasks({}))
    with transaction(sessions) as session:
        model = ModelVersion(task_name="busi", version="v1", architecture="small_cnn", sha256="0" * 64, path="/m")
        scan = Scan(sha256="ab" * 32, state="inferred", task_name="busi", source_name=source.name, format="dicom")
        scan.stored_path = settings.stored_name(source)
        session.add_all([model, scan])
        session.flush()
        session.add(
            Result(
                scan_id=scan.id,
                model_version_id=model.id,
                label="benign",
                probability=0.7,
                threshold=0.5,
                positive=True,
            )
        )
        scan_id = scan.id
    return engine, sessions, scan_id


def test_objects_whose_folder_fsync_fails_raise_for_the_report_stage_to_try_again(
    make_settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """Each object is fsynced as written and the scan's folder once after the last; the outbox rows
    are committed only after that. A folder fsync the disk fails (EIO, injected: no real disk here
    fails on demand) raises, so nothing is queued for objects whose renames might not last."""
    folder = [{"name": "share", "kind": "folder", "path": str(tmp_path / "share")}]
    settings = make_settings(destination=folder, dicom_outputs=["sr"])
    source = write_dicom(settings.work_dir / "scan.dcm", modality="US", body_part="BREAST")
    engine, sessions, scan_id = inferred_dicom_scan(settings, source)
    outputs = DicomOutputs(settings)
    real = os.fsync

    def folders_failing(fd: int) -> None:
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            raise OSError(errno.EIO, "Input/output error (injected)")
        real(fd)

    monkeypatch.setattr(os, "fsync", folders_failing)
    with pytest.raises(OSError, match="Input/output error"):
        outputs.prepare(sessions, scan_id, None)
    monkeypatch.setattr(os, "fsync", real)
    prepared = outputs.prepare(sessions, scan_id, None)
    engine.dispose()
    assert [o.kind for o in prepared.objects] == ["sr"] and prepared.objects[0].path.is_file()


def test_a_scan_whose_source_lacks_a_study_gets_dead_outbox_rows_naming_why_and_keeps_its_result(
    make_settings, tmp_path: Path
):
    settings = make_settings(destination=[{"name": "share", "kind": "folder", "path": str(tmp_path / "share")}])
    source = write_dicom(settings.work_dir / "nostudy.dcm", modality="US", body_part="BREAST")
    ds = pydicom.dcmread(source)
    del ds.StudyInstanceUID
    ds.save_as(source)
    engine, sessions, scan_id = inferred_dicom_scan(settings, source)
    outputs = DicomOutputs(settings)
    prepared = outputs.prepare(sessions, scan_id, None)
    with transaction(sessions) as session:
        outputs.enqueue(session, prepared)
    with sessions() as session:
        rows = {r.object_key: (r.status, r.last_error) for r in session.scalars(select(OutboxItem))}
        result = session.scalars(select(Result).where(Result.scan_id == scan_id)).one()
    engine.dispose()
    assert prepared.objects == [] and set(prepared.refused) == {"sr", "pmap", "sc", "pdf"}
    assert set(rows) == {"sr", "pmap", "sc", "pdf"}
    assert all(status == "dead" and error.startswith("source_without_study:") for status, error in rows.values())
    assert (result.probability, result.positive) == (0.7, True)


def test_a_multi_frame_source_gets_its_other_objects_and_a_dead_parametric_map_naming_why(
    tmp_path: Path, label_files: LabelResult
):
    source = read_source(write_dicom(tmp_path / "frames.dcm", frames=4, modality="US", body_part="BREAST"))
    facts = ScanFacts(1, "ab" * 32, "busi", "v1", "small_cnn", (label_files,), source, "1.2.3.")
    with pytest.raises(OutputRefused) as refused:
        build_objects(facts, ("pmap",), None, False)
    assert refused.value.reason == "multiframe_source"
    for key, built in build_objects(facts, ("sr", "sc", "pdf"), b"%PDF-1.4\n%%EOF\n", False):
        path = tmp_path / f"{key.replace(':', '_')}.dcm"
        built.save_as(path, enforce_file_format=True)
        assert dciodvfy_errors(path) == [], key


def objects_of(source: Path, label_files: LabelResult, kinds: tuple[str, ...], tmp_path: Path) -> dict[str, Path]:
    """The objects of ``kinds`` built for a SYNTHETIC scan of ``source``, written and passing dciodvfy."""
    facts = ScanFacts(1, "cd" * 32, "busi", "v1", "small_cnn", (label_files,), read_source(source), "1.2.3.")
    written = {}
    for key, dataset in build_objects(facts, kinds, b"%PDF-1.4\n%%EOF\n", False):
        path = tmp_path / f"{key.replace(':', '_')}.dcm"
        dataset.save_as(path, enforce_file_format=True)
        assert dciodvfy_errors(path) == [], key
        written[key.split(":")[0]] = path
    return written


def test_the_capture_of_a_multi_frame_source_names_the_frame_it_shows(tmp_path: Path, label_files: LabelResult):
    """Drawn over the key frame, it referenced the whole instance: derived from every frame (PS3.3
    table 10-3 requires Referenced Frame Number when the reference is not to all frames)."""
    source = write_dicom(tmp_path / "cine.dcm", frames=4, modality="US", body_part="BREAST")
    reference = pydicom.dcmread(objects_of(source, label_files, ("sc",), tmp_path)["sc"]).SourceImageSequence[0]
    assert reference.ReferencedFrameNumber == 3  # the middle one of four, as the engine keeps it (4 // 2, 1-based)
    single = write_dicom(tmp_path / "one.dcm", modality="US", body_part="BREAST")
    assert (
        "ReferencedFrameNumber"
        not in pydicom.dcmread(objects_of(single, label_files, ("sc",), tmp_path)["sc"]).SourceImageSequence[0]
    )


def test_every_object_copies_the_source_s_patient_and_study_attributes_and_clips_an_over_long_one(
    tmp_path: Path, label_files: LabelResult
):
    """The capture and the PDF kept the type-2 attributes alone (no issuer of the patient's ID, no
    study description, no age) where the SR and the map copied them all; a 70-character Study
    Description (vendors write them) made every object fail dciodvfy."""
    source = write_dicom(tmp_path / "source.dcm", modality="US", body_part="BREAST")
    ds = pydicom.dcmread(source)
    ds.IssuerOfPatientID, ds.PatientAge, ds.StudyDescription = "SYNTHETIC HOSPITAL", "054Y", "D" * 70
    other = pydicom.Dataset()
    other.PatientID, other.IssuerOfPatientID, other.TypeOfPatientID = "SYNTHETIC-2", "OTHER HOSPITAL", "TEXT"
    ds.OtherPatientIDsSequence = [other]
    ds.save_as(source)
    for kind, path in objects_of(source, label_files, ("sr", "pmap", "sc", "pdf"), tmp_path).items():
        back = pydicom.dcmread(path)
        assert (back.IssuerOfPatientID, back.PatientAge, back.StudyDescription) == (
            "SYNTHETIC HOSPITAL",
            "054Y",
            "D" * 64,
        ), kind
        assert back.OtherPatientIDsSequence[0].PatientID == "SYNTHETIC-2", kind


def test_a_map_of_an_enhanced_single_frame_source_keeps_its_spacing_and_frame_of_reference(
    tmp_path: Path, label_files: LabelResult
):
    """Its spacing, position and orientation lie in its functional groups: the map said 1 mm pixels
    in a frame of reference of its own, and did not lie over its source."""
    source = write_dicom(tmp_path / "emr.dcm", pixels=np.zeros((40, 50), np.uint16), modality="MR", body_part="HEAD")
    ds = pydicom.dcmread(source)
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.4.1"  # Enhanced MR
    ds.NumberOfFrames, ds.FrameOfReferenceUID = 1, "1.2.826.0.1.3680043.8.498.999"
    shared, measures, orientation, frame, position = (pydicom.Dataset() for _ in range(5))
    measures.PixelSpacing, measures.SliceThickness = [0.7, 0.9], 3.0
    orientation.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    shared.PixelMeasuresSequence, shared.PlaneOrientationSequence = [measures], [orientation]
    position.ImagePositionPatient = [5, 6, 7]
    frame.PlanePositionSequence = [position]
    ds.SharedFunctionalGroupsSequence, ds.PerFrameFunctionalGroupsSequence = [shared], [frame]
    ds.save_as(source)
    facts = ScanFacts(1, "cd" * 32, "busi", "v1", "small_cnn", (label_files,), read_source(source), "1.2.3.")
    [(_, built)] = build_objects(facts, ("pmap",), None, False)
    measured = built.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing
    assert built.FrameOfReferenceUID == "1.2.826.0.1.3680043.8.498.999"
    assert [float(v) for v in measured] == pytest.approx([0.7 * 40 / 32, 0.9 * 50 / 32])


def test_a_map_of_a_source_with_non_square_pixels_keeps_their_proportion(tmp_path: Path, label_files: LabelResult):
    """Without a spacing, the map took 1 mm square source pixels: a Pixel Aspect Ratio of 2:1 drew
    the map half as tall as its source."""
    source = write_dicom(
        tmp_path / "par.dcm", pixels=np.zeros((60, 120), np.uint16), modality="US", body_part="BREAST",
        extra={"PixelAspectRatio": [2, 1]},
    )  # fmt: skip
    facts = ScanFacts(1, "cd" * 32, "busi", "v1", "small_cnn", (label_files,), read_source(source), "1.2.3.")
    [(_, built)] = build_objects(facts, ("pmap",), None, False)
    rows_mm, columns_mm = (
        float(v) for v in built.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing
    )
    assert (rows_mm * int(built.Rows), columns_mm * int(built.Columns)) == pytest.approx((120.0, 120.0))


@pytest.mark.parametrize(
    ("source_laterality", "series_laterality"),
    [
        ({"ImageLaterality": "U"}, ""),
        ({"ImageLaterality": "B"}, ""),
        ({"ImageLaterality": "R"}, "R"),
        ({"Laterality": "L", "ImageLaterality": "L"}, "L"),
    ],
    ids=["image unpaired", "image both", "image right", "series left"],
)
def test_only_right_or_left_becomes_the_series_laterality(
    tmp_path: Path, label_files: LabelResult, source_laterality: dict[str, str], series_laterality: str
):
    """Image Laterality may be U (unpaired) or B (both); a series' Laterality is R or L only
    (PS3.3 C.7.3.1): U and B were copied into it, leaving it empty (unknown) is what the standard allows."""
    source = write_dicom(
        tmp_path / "lat.dcm", pixels=np.zeros((40, 40), np.uint8), modality="US", body_part="BREAST",
        extra=source_laterality,
    )  # fmt: skip
    for kind, path in objects_of(source, label_files, ("pmap", "sc"), tmp_path).items():
        assert pydicom.dcmread(path).Laterality == series_laterality, kind


@pytest.mark.parametrize("keyword", ["PixelSpacing", "ImagerPixelSpacing"])
def test_a_spacing_with_one_value_is_not_used_and_the_map_is_still_written(
    tmp_path: Path, label_files: LabelResult, keyword: str
):
    """A spacing needs two values; one (a vendor's wrong VM, read as a number, not a list) made the
    map's build fail with a TypeError, and the map was never written. Without a usable spacing the
    map's pixels are 1 mm source pixels, as for a source without one."""
    source = write_dicom(
        tmp_path / "one.dcm", pixels=np.zeros((64, 64), np.uint16), modality="CR", extra={keyword: "0.5"}
    )
    back = pydicom.dcmread(objects_of(source, label_files, ("pmap",), tmp_path)["pmap"])
    spacing = back.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing
    assert [float(v) * int(n) for v, n in zip(spacing, (back.Rows, back.Columns), strict=True)] == pytest.approx(
        [64.0, 64.0]
    )


def test_the_sr_of_a_multi_frame_source_references_the_frame_its_result_was_computed_from(
    tmp_path: Path, label_files: LabelResult
):
    """The engine classifies the key frame alone; the SR said the result came from the whole
    instance, as the capture beside it no longer did (PS3.3 table 10-3)."""
    source = write_dicom(tmp_path / "cine.dcm", frames=5, modality="US", body_part="BREAST")
    ds = pydicom.dcmread(source)
    ds.RepresentativeFrameNumber = 2
    ds.save_as(source)
    objects = objects_of(source, label_files, ("sr", "sc"), tmp_path)
    images = [item for item in _content_items(pydicom.dcmread(objects["sr"])) if item.ValueType == "IMAGE"]
    assert images and {item.ReferencedSOPSequence[0].ReferencedFrameNumber for item in images} == {2}
    assert pydicom.dcmread(objects["sc"]).SourceImageSequence[0].ReferencedFrameNumber == 2
    single = write_dicom(tmp_path / "one.dcm", modality="US", body_part="BREAST")
    one = [item for item in _content_items(pydicom.dcmread(objects_of(single, label_files, ("sr",), tmp_path)["sr"]))]
    assert all(
        "ReferencedFrameNumber" not in item.ReferencedSOPSequence[0] for item in one if item.ValueType == "IMAGE"
    )


def test_an_over_long_patient_name_is_cut_to_64_characters_a_component_group(tmp_path: Path, label_files: LabelResult):
    """Copied as it came (91 characters), it made every object fail dciodvfy."""
    source = write_dicom(
        tmp_path / "source.dcm", modality="US", body_part="BREAST", patient_name="SYNTHETIC" * 6 + "^" + "B" * 40
    )
    ds = pydicom.dcmread(source)
    ds.OtherPatientNames = ["A" * 70, "SYNTHETIC^OTHER"]
    ds.save_as(source)
    for kind, path in objects_of(source, label_files, ("sr", "pmap", "sc", "pdf"), tmp_path).items():
        back = pydicom.dcmread(path)
        assert str(back.PatientName) == ("SYNTHETIC" * 6 + "^" + "B" * 40)[:64], kind
        assert [str(name) for name in back.OtherPatientNames] == ["A" * 64, "SYNTHETIC^OTHER"], kind


def test_a_value_in_a_japanese_source_is_cut_to_its_length_in_the_source_s_own_encoding(
    tmp_path: Path, label_files: LabelResult
):
    """ISO 2022 spends escape sequences at each switch between ASCII and kanji: a value fitting in
    UTF-8 bytes was written 71 bytes long in the source's set, and the objects failed dciodvfy."""
    source = write_dicom(tmp_path / "source.dcm", modality="US", body_part="BREAST")
    ds = pydicom.dcmread(source)
    ds.SpecificCharacterSet = ["", "ISO 2022 IR 87"]
    ds.StudyDescription = "胸部 造影 Chest with contrast 経過観察 follow-up 乳腺 breast 超音波"  # SYNTHETIC
    ds.save_as(source)
    for kind, path in objects_of(source, label_files, ("sr", "sc", "pdf"), tmp_path).items():
        back = pydicom.dcmread(path)
        assert ds.StudyDescription.startswith(back.StudyDescription) and len(back.StudyDescription) > 20, kind
        written = encode_string(back.StudyDescription, convert_encodings(back.SpecificCharacterSet))
        assert len(written) <= 64 and dciodvfy_errors(path) == [], kind


@pytest.fixture
def in_tokyo(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    import time

    monkeypatch.setenv("TZ", "Asia/Tokyo")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


def test_the_encapsulated_pdf_is_dated_in_the_same_local_time_as_the_other_objects(
    tmp_path: Path, label_files: LabelResult, in_tokyo: None
):
    """It was dated in UTC without saying so: nine hours, and a day, before its SR in Tokyo."""
    from datetime import datetime

    source = write_dicom(tmp_path / "source.dcm", modality="US", body_part="BREAST")
    objects = objects_of(source, label_files, ("sr", "pdf"), tmp_path)
    when = {}
    for kind, path in objects.items():
        back = pydicom.dcmread(path)
        when[kind] = datetime.strptime(back.ContentDate + back.ContentTime[:6], "%Y%m%d%H%M%S")
        assert back.get("TimezoneOffsetFromUTC") in (None, "+0900"), kind
    assert abs((when["pdf"] - when["sr"]).total_seconds()) < 120


def test_the_encapsulated_pdf_of_a_source_with_burned_in_annotation_says_it_has_some(
    tmp_path: Path, label_files: LabelResult
):
    """The report shows the source's pixels, and the text burned into them (a name, an ID) with them:
    without PHI in its text it still said NO."""
    plain = write_dicom(tmp_path / "plain.dcm", modality="US", body_part="BREAST")
    burned = write_dicom(
        tmp_path / "burned.dcm", modality="US", body_part="BREAST", extra={"BurnedInAnnotation": "YES"}
    )
    assert pydicom.dcmread(objects_of(plain, label_files, ("pdf",), tmp_path)["pdf"]).BurnedInAnnotation == "NO"
    assert pydicom.dcmread(objects_of(burned, label_files, ("pdf",), tmp_path)["pdf"]).BurnedInAnnotation == "YES"


def test_a_latin_1_value_that_fits_its_vr_in_latin_1_is_kept_whole_and_cut_where_the_objects_take_utf_8(
    tmp_path: Path, label_files: LabelResult
):
    """Values were cut to their UTF-8 length whatever the set they are written back in: a
    60-letter French description, 60 bytes in Latin-1, lost two letters."""
    description = "Échographie sénologique bilatérale, contrôle évolutif après"  # SYNTHETIC, 59 letters
    assert len(description.encode("latin-1")) <= 64 < len(description.encode())
    source = write_dicom(tmp_path / "source.dcm", modality="US", body_part="BREAST")
    ds = pydicom.dcmread(source)
    ds.SpecificCharacterSet, ds.StudyDescription = "ISO_IR 100", description
    ds.save_as(source)
    for kind, path in objects_of(source, label_files, ("sr", "sc", "pdf"), tmp_path).items():
        assert pydicom.dcmread(path).StudyDescription == description, kind

    kanji = dataclasses.replace(label_files, label="結節")  # not in Latin-1: the objects are written in UTF-8
    facts = ScanFacts(1, "cd" * 32, "busi", "v1", "small_cnn", (kanji,), read_source(source), "1.2.3.")
    for key, built in build_objects(facts, ("sr", "sc", "pdf"), b"%PDF-1.4\n%%EOF\n", False):
        path = tmp_path / f"utf8_{key.replace(':', '_')}.dcm"
        built.save_as(path, enforce_file_format=True)
        back = pydicom.dcmread(path)
        assert back.SpecificCharacterSet == "ISO_IR 192" and description.startswith(back.StudyDescription), key
        assert 60 <= len(back.StudyDescription.encode()) <= 64 and dciodvfy_errors(path) == [], key


def built_and_checked(facts: ScanFacts, folder: Path, kinds: tuple[str, ...]) -> dict[str, pydicom.Dataset]:
    """``build_objects`` of ``facts``, each written under ``folder`` and passing dciodvfy; read back."""
    built = dict(build_objects(facts, kinds, b"%PDF-1.4\n%%EOF\n" if "pdf" in kinds else None, False))
    assert {key.split(":")[0] for key in built} == set(kinds)
    back = {}
    for key, dataset in built.items():
        written = folder / f"{key.replace(':', '_')}.dcm"
        dataset.save_as(written, enforce_file_format=True)
        assert dciodvfy_errors(written) == [], key
        back[key.split(":")[0]] = pydicom.dcmread(written)
    return back


def test_text_too_long_inside_copied_sequences_and_decimals_too_long_are_cut_to_fit(
    tmp_path: Path, label_files: LabelResult
):
    """Only the top-level values were cut: a vendor's 77-character Code Meaning in the Procedure
    Code Sequence, or a 70-character ID among the Other Patient IDs, made all four objects fail
    dciodvfy; so did a Patient's Weight written in 20 characters. (SYNTHETIC values.)"""
    path = write_dicom(tmp_path / "source.dcm", pixels=np.zeros((40, 40), np.uint8), modality="US", body_part="BREAST")
    ds = pydicom.dcmread(path)
    procedure = pydicom.Dataset()
    procedure.CodeValue, procedure.CodingSchemeDesignator = "SYN1", "99SYNTHETIC"
    procedure.CodeMeaning = "SYNTHETIC ultrasound of the breast, bilateral, with a very long vendor meaning"
    other_id = pydicom.Dataset()
    other_id.PatientID, other_id.TypeOfPatientID = "SYNTHETIC-" + "9" * 60, "TEXT"
    ds.ProcedureCodeSequence, ds.OtherPatientIDsSequence = [procedure], [other_id]
    ds.PatientWeight = "70.12345678901234567"
    ds.save_as(path)
    facts = ScanFacts(1, "ab" * 32, "busi", "v1", "small_cnn", (label_files,), read_source(path), "1.2.3.")

    back = built_and_checked(facts, tmp_path, ("sr", "pmap", "sc", "pdf"))

    for key, written in back.items():
        assert written.ProcedureCodeSequence[0].CodeMeaning == procedure.CodeMeaning[:64].rstrip(), key
        assert written.OtherPatientIDsSequence[0].PatientID == other_id.PatientID[:64], key
        assert abs(float(written.PatientWeight) - 70.12345678901234567) < 1e-9, key


@pytest.mark.parametrize(
    "charset",
    [["", "ISO 2022 IR 149"], "ISO-IR 100", "UTF-8"],
    ids=["korean (not in highdicom's list)", "a misspelt latin-1", "a misspelt utf-8"],
)
def test_a_character_set_highdicom_does_not_take_is_written_as_utf_8_and_every_object_is_made(
    tmp_path: Path, label_files: LabelResult, charset
):
    """The SR, the map and the capture failed to build (their outbox rows dead as build_failed) and
    the PDF carried the misspelt term dciodvfy refuses. (A SYNTHETIC name.)"""
    name = "Kim^Minsu=\uae40^\ubbfc\uc218" if "149" in str(charset) else "M\u00fcller^J\u00fcrgen"
    path = write_dicom(tmp_path / "source.dcm", pixels=np.zeros((40, 40), np.uint8), modality="US", body_part="BREAST")
    ds = pydicom.dcmread(path)
    ds.SpecificCharacterSet, ds.PatientName = charset, name
    ds.save_as(path)
    facts = ScanFacts(1, "ab" * 32, "busi", "v1", "small_cnn", (label_files,), read_source(path), "1.2.3.")

    back = built_and_checked(facts, tmp_path, ("sr", "pmap", "sc", "pdf"))

    for key, written in back.items():
        assert (written.SpecificCharacterSet, str(written.PatientName)) == ("ISO_IR 192", name), key


def test_frames_under_a_single_frame_sop_class_are_referenced_as_the_whole_instance(
    tmp_path: Path, label_files: LabelResult
):
    """pydicom's SC_rgb_rle_2frame.dcm: two frames under Secondary Capture, a single-frame class.
    The SR refused to build (a frame number for a dataset that is not multi-frame) and the capture
    named a frame dciodvfy says shall not be named."""
    from pydicom.data import get_testdata_file

    facts = ScanFacts(1, "ab" * 32, "busi", "v1", "small_cnn", (label_files,),
                      read_source(Path(get_testdata_file("SC_rgb_rle_2frame.dcm"))), "1.2.3.")  # fmt: skip

    back = built_and_checked(facts, tmp_path, ("sr", "sc"))

    assert "ReferencedFrameNumber" not in back["sc"].SourceImageSequence[0]
    assert (
        back["sr"]
        .CurrentRequestedProcedureEvidenceSequence[0]
        .ReferencedSeriesSequence[0]
        .ReferencedSOPSequence[0]
        .ReferencedSOPInstanceUID
        == facts.source.SOPInstanceUID
    )


def test_a_map_over_a_source_whose_orientation_is_no_orientation_takes_a_frame_of_its_own(
    tmp_path: Path, label_files: LabelResult
):
    """A device's 0\\0\\0\\0\\0\\0 was copied into the map, which failed dciodvfy ("not unit vector")."""
    path = write_dicom(tmp_path / "source.dcm", pixels=np.zeros((40, 40), np.uint8), modality="US", body_part="BREAST")
    ds = pydicom.dcmread(path)
    ds.FrameOfReferenceUID = "1.2.826.0.1.3680043.8.498.77"
    ds.ImagePositionPatient, ds.ImageOrientationPatient = [0, 0, 0], [0, 0, 0, 0, 0, 0]
    ds.save_as(path)
    facts = ScanFacts(1, "ab" * 32, "busi", "v1", "small_cnn", (label_files,), read_source(path), "1.2.3.")

    back = built_and_checked(facts, tmp_path, ("pmap",))

    assert back["pmap"].FrameOfReferenceUID != ds.FrameOfReferenceUID


def test_a_code_too_long_for_its_vr_in_a_copied_sequence_is_never_cut_into_another_code(
    tmp_path: Path, label_files: LabelResult
):
    """Cut to 16 characters, two SYNTHETIC codes became one code of two meanings, and a dotted code
    another valid-looking one, without a word from dciodvfy. A long Code Value is the item's Long
    Code Value (PS3.3 8.8); an item whose coding scheme's name does not fit is left out."""
    path = write_dicom(tmp_path / "source.dcm", pixels=np.zeros((40, 40), np.uint8), modality="US", body_part="BREAST")
    ds = pydicom.dcmread(path)
    items = []
    for value, scheme, meaning in (("SYN-BREAST-US-BIL-A", "99SYN", "SYNTHETIC left"),
                                   ("SYN-BREAST-US-BIL-B", "99SYN", "SYNTHETIC right"),
                                   ("SYN1", "99SYNTHETICLOCAL1", "SYNTHETIC unfit scheme")):  # fmt: skip
        item = pydicom.Dataset()
        item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, scheme, meaning
        items.append(item)
    ds.ProcedureCodeSequence = items
    ds.WindowCenter = ["40.000000000000001", "", "400"]  # an empty value among them stays
    ds.save_as(path)
    facts = ScanFacts(1, "ab" * 32, "busi", "v1", "small_cnn", (label_files,), read_source(path), "1.2.3.")

    back = built_and_checked(facts, tmp_path, ("sr", "sc", "pdf"))

    for key, written in back.items():
        codes = [(i.get("CodeValue"), i.get("LongCodeValue"), i.CodeMeaning) for i in written.ProcedureCodeSequence]
        assert codes == [
            (None, "SYN-BREAST-US-BIL-A", "SYNTHETIC left"),
            (None, "SYN-BREAST-US-BIL-B", "SYNTHETIC right"),
        ], key
    assert [str(v) for v in facts.source.WindowCenter] == ["40.0", "", "400.0"]


def test_a_map_over_an_orientation_written_with_three_decimals_keeps_its_frame_exactly_orthonormal(
    tmp_path: Path, label_files: LabelResult
):
    """0.999\\0.035\\0 is a unit vector to three decimals, not to dciodvfy's 5e-5: copied, the map
    failed; a new frame would lose its registration with the source."""
    path = write_dicom(tmp_path / "source.dcm", pixels=np.zeros((40, 40), np.uint8), modality="US", body_part="BREAST")
    ds = pydicom.dcmread(path)
    ds.FrameOfReferenceUID = "1.2.826.0.1.3680043.8.498.78"
    ds.ImagePositionPatient, ds.ImageOrientationPatient = [0, 0, 0], [0.999, 0.035, 0, -0.035, 0.999, 0]
    ds.save_as(path)
    facts = ScanFacts(1, "ab" * 32, "busi", "v1", "small_cnn", (label_files,), read_source(path), "1.2.3.")

    back = built_and_checked(facts, tmp_path, ("pmap",))

    assert back["pmap"].FrameOfReferenceUID == ds.FrameOfReferenceUID
    row, column = np.asarray([float(v) for v in _orientation_of(back["pmap"])]).reshape(2, 3)
    assert abs(np.linalg.norm(row) - 1) < 1e-9 and abs(row @ column) < 1e-9
    assert np.allclose(row, [0.999, 0.035, 0], atol=1e-3)


def _orientation_of(ds: pydicom.Dataset) -> list[float]:
    groups = ds.SharedFunctionalGroupsSequence[0]
    return list(groups.PlaneOrientationSequence[0].ImageOrientationPatient)


def test_frames_under_a_private_sop_class_are_referenced_as_the_whole_instance(
    tmp_path: Path, label_files: LabelResult
):
    """A SOP class highdicom does not know was taken for a multi-frame one: the capture named a
    frame dciodvfy says shall not be named."""
    from pydicom.data import get_testdata_file

    source = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    source.SOPClassUID, source.NumberOfFrames = "1.2.826.0.1.3680043.8.498.999.1", 2
    path = tmp_path / "private.dcm"
    source.save_as(path)
    facts = ScanFacts(1, "ab" * 32, "busi", "v1", "small_cnn", (label_files,), read_source(path), "1.2.3.")

    back = built_and_checked(facts, tmp_path, ("sc",))

    assert "ReferencedFrameNumber" not in back["sc"].SourceImageSequence[0]


def _item(**values: str) -> pydicom.Dataset:
    item = pydicom.Dataset()
    for keyword, value in values.items():
        setattr(item, keyword, value)
    return item


@pytest.mark.parametrize(
    ("keyword", "item"),
    [
        (
            "IssuerOfAccessionNumberSequence",
            _item(LocalNamespaceEntityID="SYN", UniversalEntityIDType="ISO_OID_SYNTHETIC"),
        ),
        ("ProcedureCodeSequence", _item(CodeValue="SYN1", CodingSchemeDesignator="99SYNTHETICLOCAL1", CodeMeaning="x")),
        ("OtherPatientIDsSequence", _item(PatientID="SYN-2", TypeOfPatientID="RFID_SYNTHETIC_LONG")),
    ],
    ids=["issuer of accession number", "procedure code", "other patient ids"],
)
def test_a_copied_sequence_whose_every_item_is_left_out_is_left_out_too(
    tmp_path: Path, label_files: LabelResult, keyword: str, item: pydicom.Dataset
):
    """Its only item left out (a code or term too long for its VR), the sequence went out empty,
    where its module wants one item at least: all four objects failed dciodvfy."""
    path = write_dicom(tmp_path / "source.dcm", pixels=np.zeros((40, 40), np.uint8), modality="US", body_part="BREAST")
    ds = pydicom.dcmread(path)
    setattr(ds, keyword, [item])
    ds.save_as(path)
    facts = ScanFacts(1, "ab" * 32, "busi", "v1", "small_cnn", (label_files,), read_source(path), "1.2.3.")

    back = built_and_checked(facts, tmp_path, ("sr", "pmap", "sc", "pdf"))

    assert all(keyword not in written for written in back.values())


@pytest.mark.parametrize(
    ("values", "written"),
    [
        ({"StudyDate": "2024.01.05", "StudyTime": "12:30:00"}, {"StudyDate": "20240105", "StudyTime": "123000"}),
        ({"StudyTime": "123000.123456789"}, {"StudyTime": "123000.123456"}),
        ({"PatientBirthDate": "19801301"}, {"PatientBirthDate": ""}),
        ({"StudyTime": "25:61"}, {"StudyTime": ""}),
        ({"PatientAge": "45"}, {"PatientAge": None}),
        ({"ReferringPhysicianName": "A^B^C^D^E^F"}, {"ReferringPhysicianName": "A^B^C^D^E F"}),
    ],
    ids=[
        "acr-nema date and time",
        "time fraction of nine digits",
        "no such month",
        "no such time",
        "age without unit",
        "six name components",
    ],
)
def test_a_date_time_age_or_name_written_as_no_reader_takes_it_gives_all_four_objects_valid(
    tmp_path: Path, label_files: LabelResult, values: dict[str, str], written: dict[str, str | None]
):
    """Values vendors write (SYNTHETIC ones here): the ACR-NEMA forms PS3.5 asks readers to accept
    (``2024.01.05``, ``12:30:00``), a fraction of more than six digits, a month 13, an age without its
    unit, a name of six components. highdicom refused the first four, and the SR, the map and the
    capture were dead for good (``build_failed``, a row with no object to send again); the other two
    made every object fail dciodvfy. A value that means something is written in the form the standard
    takes; one that means nothing is left empty (type 2) or out."""
    path = write_dicom(tmp_path / "source.dcm", pixels=np.zeros((40, 40), np.uint8), modality="US", body_part="BREAST")
    ds = pydicom.dcmread(path)
    for keyword, value in values.items():
        setattr(ds, keyword, value)
    ds.save_as(path)
    facts = ScanFacts(1, "ab" * 32, "busi", "v1", "small_cnn", (label_files,), read_source(path), "1.2.3.")

    back = built_and_checked(facts, tmp_path, ("sr", "pmap", "sc", "pdf"))

    for kind, obj in back.items():
        for keyword, value in written.items():
            assert (obj[keyword].value if keyword in obj else None) == value, (kind, keyword)


@pytest.mark.parametrize(
    ("keyword", "given", "written"),
    [
        ("PatientName", "SYNTHETIC^ONE\\SYNTHETIC^TWO", "SYNTHETIC^ONE"),
        ("ReferringPhysicianName", "SYNTH^DOC\\SYNTH^OTHER", "SYNTH^DOC"),
        ("StudyDescription", "US BREAST\\LEFT", "US BREAST LEFT"),
        ("StudyDate", "20240105\\20240106", "20240105"),
        ("PatientName", "\\SYNTHETIC^TWO", "SYNTHETIC^TWO"),  # the first given: an empty first was written
    ],
)
def test_an_attribute_of_one_value_the_source_gives_several_is_written_as_one_in_all_four_objects(
    tmp_path: Path, label_files: LabelResult, keyword: str, given: str, written: str
):
    """A backslash where the standard allows one value (a modality's SYNTHETIC names here): highdicom
    refused a name of two values, the SR, the map and the capture dead as ``build_failed``, and every
    object that was built failed dciodvfy on the attribute's value multiplicity."""
    path = write_dicom(tmp_path / "source.dcm", pixels=np.zeros((40, 40), np.uint8), modality="US", body_part="BREAST")
    ds = pydicom.dcmread(path)
    setattr(ds, keyword, given)
    ds.save_as(path)
    facts = ScanFacts(1, "ab" * 32, "busi", "v1", "small_cnn", (label_files,), read_source(path), "1.2.3.")

    back = built_and_checked(facts, tmp_path, ("sr", "pmap", "sc", "pdf"))

    assert {kind: str(obj[keyword].value) for kind, obj in back.items()} == dict.fromkeys(back, written)


def test_an_identifier_the_study_is_filed_under_is_copied_as_the_source_wrote_it_even_of_two_values(
    tmp_path: Path, label_files: LabelResult
):
    """A PACS files the results under the source's Patient ID (Orthanc's study is its Patient ID and
    Study Instance UID): one of two values cut to one would put them in a study of their own. The
    value multiplicity is the only fault dciodvfy finds, as it finds it in the source."""
    path = write_dicom(tmp_path / "source.dcm", pixels=np.zeros((40, 40), np.uint8), modality="US", body_part="BREAST")
    ds = pydicom.dcmread(path)
    ds.PatientID = "SYNTH-1\\SYNTH-2"
    ds.save_as(path)
    facts = ScanFacts(1, "ab" * 32, "busi", "v1", "small_cnn", (label_files,), read_source(path), "1.2.3.")

    built = dict(build_objects(facts, ("sr", "pmap", "sc", "pdf"), b"%PDF-1.4\n%%EOF\n", False))

    assert {key.split(":")[0] for key in built} == {"sr", "pmap", "sc", "pdf"}
    for key, dataset in built.items():
        assert list(dataset.PatientID) == ["SYNTH-1", "SYNTH-2"], key
        written = tmp_path / f"{key.replace(':', '_')}.dcm"
        dataset.save_as(written, enforce_file_format=True)
        errors = dciodvfy_errors(written)
        assert errors and all("Value Multiplicity" in e and "PatientID" in e for e in errors), (key, errors)


@pytest.mark.parametrize(
    "sop_class",
    ["1.3.6.1.4.1.9590.100.1.2.1", "1.2.840.10008.5.1.4.1.1.77.1.5.1"],
    ids=["private class", "ophthalmic photography 8 bit"],
)
def test_a_source_of_a_class_highdicom_cannot_copy_from_gets_all_four_objects_referencing_its_own_class(
    tmp_path: Path, label_files: LabelResult, sop_class: str
):
    """highdicom copies the patient and study modules by the source's IOD: a private SOP class
    (a vendor's) stopped the SR and the map with a ``KeyError``, and Ophthalmic Photography, a
    multi-frame IOD without functional groups, the map with an ``AttributeError``: dead for good as
    ``build_failed``. Their references still name the source's own class."""
    path = write_dicom(tmp_path / "source.dcm", pixels=np.zeros((40, 40), np.uint8), modality="US", body_part="BREAST")
    ds = pydicom.dcmread(path)
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.save_as(path)
    facts = ScanFacts(1, "ab" * 32, "busi", "v1", "small_cnn", (label_files,), read_source(path), "1.2.3.")

    back = built_and_checked(facts, tmp_path, ("sr", "pmap", "sc", "pdf"))

    references = [
        (str(item.ReferencedSOPClassUID), str(item.ReferencedSOPInstanceUID))
        for kind in ("sr", "pmap")
        for item in _items_with(back[kind], "ReferencedSOPClassUID")
    ]
    assert references and set(references) == {(sop_class, str(ds.SOPInstanceUID))}
    assert back["sr"].PatientID == ds.PatientID and back["pmap"].StudyInstanceUID == ds.StudyInstanceUID


def _items_with(ds: pydicom.Dataset, keyword: str) -> Iterator[pydicom.Dataset]:
    """Every dataset at any depth of ``ds`` holding ``keyword``."""
    if keyword in ds:
        yield ds
    for element in ds:
        if element.VR == "SQ":
            for item in element.value:
                yield from _items_with(item, keyword)


def test_a_study_report_references_an_instance_received_in_two_versions_once(tmp_path: Path, label_files: LabelResult):
    """A corrected instance (the same SOP Instance UID, other bytes) is a second scan of the study:
    the study's Encapsulated PDF listed the instance twice among its sources."""
    first = write_dicom(tmp_path / "first.dcm", pixels=np.zeros((40, 40), np.uint8), modality="US", body_part="BREAST")
    corrected = pydicom.dcmread(first)
    corrected.PixelData = np.full((40, 40), 9, np.uint8).tobytes()
    corrected.save_as(tmp_path / "corrected.dcm")
    other = write_dicom(tmp_path / "other.dcm", pixels=np.zeros((40, 40), np.uint8), modality="US",
                        body_part="BREAST", extra={"StudyInstanceUID": corrected.StudyInstanceUID})  # fmt: skip
    scans = [
        ScanFacts(n, f"{n:02}" * 32, "busi", "v1", "small_cnn", (label_files,), read_source(path), "1.2.3.")
        for n, path in enumerate((first, tmp_path / "corrected.dcm", other), 1)
    ]

    study = pdf.build_study(scans, b"%PDF-1.4\n%%EOF\n", False)

    referenced = [str(item.ReferencedSOPInstanceUID) for item in study.SourceInstanceSequence]
    assert referenced == [str(corrected.SOPInstanceUID), str(pydicom.dcmread(other).SOPInstanceUID)]
