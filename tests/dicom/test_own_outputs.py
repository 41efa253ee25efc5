"""meddaemon's own results, come back: a PACS that forwards whole studies (Orthanc's
``OnStableStudy``, a routing rule on the study) sends the SR, Parametric Maps, Secondary Captures and
PDFs meddaemon delivered into a study back to it with the scans.

Specified here: each fails as ``own_output``, kept in ``failed/`` with its reason, and nothing is
inferred on it (a capture of a heatmap, inferred again, would give captures of itself without end);
the daemon's failure rate leaves them out. The objects are the package's SYNTHETIC ``delivered`` ones.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

from pydicom import dcmread
from sqlalchemy import func, select

from meddaemon.daemon.health import HealthLimits, check_health
from meddaemon.daemon.service import Daemon
from meddaemon.db.engine import create_db_engine, session_factory
from meddaemon.db.models import Result, Scan
from meddaemon.engine.tasks import IMAGENET_MEAN, IMAGENET_STD, InputContract
from model_factory import promote, write_model

ANY_MODALITY = InputContract(3, 32, 32, IMAGENET_MEAN, IMAGENET_STD)

KINDS = {
    "Comprehensive SR Storage",
    "Parametric Map Storage",
    "Secondary Capture Image Storage",
    "Encapsulated PDF Storage",
}


def test_its_own_objects_sent_back_with_their_study_fail_as_own_output_and_nothing_is_inferred_on_them(
    delivered: Daemon, reported_states, tmp_path: Path
) -> None:
    objects = sorted((delivered.settings.state_dir.parent / "share").rglob("*.dcm"))
    assert {dcmread(o, stop_before_pixels=True).SOPClassUID.name for o in objects} == KINDS
    copy = reported_states.copy(tmp_path / "site")
    # every scan the receiver takes goes to a task whose model takes any modality (histopathology
    # patches): a capture or a parametric map would be inferred as one
    settings = dataclasses.replace(copy.settings, default_task="histopathology")
    promote(copy, write_model(tmp_path / "histo_model", task="histopathology", contract=ANY_MODALITY))
    copy.engine.dispose()
    received = settings.watch / "dicom"
    received.mkdir()
    for i, path in enumerate(objects):
        shutil.copyfile(path, received / f"ORTHANC_{i:03}.dcm")

    Daemon(settings).run(once=True)

    engine = create_db_engine(settings.db_url)
    try:
        with session_factory(engine)() as session:
            scans = session.execute(
                select(Scan.id, Scan.state, Scan.failure_reason, Scan.failure_message).where(
                    Scan.source_name.like("dicom/ORTHANC_%")
                )
            ).all()
            all_scans = session.scalar(select(func.count()).select_from(Scan))
            results = session.scalar(
                select(func.count()).select_from(Result).where(Result.scan_id.in_([s.id for s in scans]))
            )
        health = check_health(engine, settings, HealthLimits(min_free_bytes=0, min_scans_for_failure_rate=1))
    finally:
        engine.dispose()
    assert len(scans) == len(objects) and results == 0
    assert {(s.state, s.failure_reason) for s in scans} == {("failed", "own_output")}
    assert {s.failure_message.split(")")[0] + ")" for s in scans} == {f"the object ({kind})" for kind in KINDS}
    assert list(received.iterdir()) == []
    kept = sorted(p for p in (settings.state_dir / "failed").rglob("ORTHANC_*") if p.suffix == ".dcm")
    assert [p.read_bytes() for p in kept] == [p.read_bytes() for p in objects]
    for path in kept:
        reason = json.loads(path.with_name(path.name + ".reason.json").read_text())
        assert reason["reason"] == "own_output"
    failures = health.check("failures").details  # the copied state's own: its empty file failed
    assert (failures["registered"], failures["failed"]) == (all_scans - len(objects), 1)
