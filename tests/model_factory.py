"""Models and scans for end-to-end daemon tests: a SYNTHETIC, untrained model written, imported and
promoted through the real registry, and a few synthetic scans for the inbox."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from dicom_factory import write_dicom, write_png

from meddaemon.config import load_settings
from meddaemon.daemon import bookkeeper
from meddaemon.daemon.service import Daemon
from meddaemon.db.engine import create_db_engine, session_factory, transaction
from meddaemon.db.migrate import upgrade
from meddaemon.engine import registry
from meddaemon.engine.architectures import build_model
from meddaemon.engine.tasks import BUILTIN_TASKS, InputContract, all_tasks

CONTRACT = InputContract(1, 32, 32, (0.449,), (0.226,), modalities=("US",))


def write_model(folder: Path, task: str = "busi", version: str = "v1", architecture: str = "small_cnn") -> Path:
    """A randomly initialised (SYNTHETIC, untrained) model in the registry's format."""
    spec = BUILTIN_TASKS[task]
    torch.manual_seed(0)
    model = build_model(architecture, 1, spec.num_outputs)
    registry.save_version(
        model,
        task=task,
        version=version,
        labels=spec.labels,
        kind=spec.kind,
        architecture=architecture,
        input_contract=CONTRACT,
        out_dir=folder,
        training_data_fingerprint="synthetic",
    )
    return folder


def promote(daemon: Daemon, folder: Path) -> None:
    with transaction(daemon.sessions) as session:
        row = registry.import_version(session, folder, daemon.settings.models_dir)
        registry.promote(session, row.task_name, row.version)


def promote_into(db_url: str, models_dir: Path, folder: Path) -> None:
    """Import and promote the model in ``folder`` in the database at ``db_url`` (migrated, with the
    task presets), as ``medcli models import`` then ``promote`` do, before any daemon starts."""
    engine = create_db_engine(db_url)
    try:
        upgrade(engine)
        sessions = session_factory(engine)
        with transaction(sessions) as session:
            bookkeeper.ensure_tasks(session, all_tasks({}))
        with transaction(sessions) as session:
            row = registry.import_version(session, folder, models_dir)
            registry.promote(session, row.task_name, row.version)
    finally:
        engine.dispose()


def drop_scans(inbox: Path) -> None:
    rng = np.random.default_rng(0)
    for i in range(3):
        write_png(inbox / "busi" / f"synthetic_{i}.png", rng.integers(0, 255, (48, 64), dtype=np.uint8))
    write_dicom(
        inbox / "synthetic_us.dcm",
        pixels=rng.integers(0, 255, (40, 40), dtype=np.uint8),
        modality="US",
        body_part="BREAST",
    )


#: Patient fields of the synthetic study: distinctive strings a de-identified report must not contain.
PHI = {
    "PatientName": "SYNTHETIC^PHIFAMILY^PHIGIVEN",
    "PatientID": "PHI-ID-98765",
    "PatientBirthDate": "19551231",
    "AccessionNumber": "PHIACC5555",
}
#: What each field looks like in a PDF (a PN is shown with spaces for its ^ separators).
PHI_STRINGS = ("PHIFAMILY", "PHIGIVEN", "PHI-ID-98765", "19551231", "PHIACC5555")
STUDY_UID = "1.2.826.0.1.3680043.8.498.777001"


def drop_study(inbox: Path, count: int = 2, study_uid: str = STUDY_UID) -> None:
    """``count`` breast ultrasound DICOMs of one study, with the patient fields of ``PHI``."""
    rng = np.random.default_rng(7)
    for i in range(count):
        write_dicom(
            inbox / f"synthetic_study_{i}.dcm",
            pixels=rng.integers(0, 255, (48, 48), dtype=np.uint8),
            modality="US",
            body_part="BREAST",
            patient_name=PHI["PatientName"],
            patient_id=PHI["PatientID"],
            extra={
                "StudyInstanceUID": study_uid,
                "PatientBirthDate": PHI["PatientBirthDate"],
                "AccessionNumber": PHI["AccessionNumber"],
                "Manufacturer": "SYNTHETIC-VENDOR",
            },
        )


def reported_state(root: Path, **flags: object) -> Daemon:
    """A model per task, a two-scan DICOM study with patient fields, busi PNGs and DICOM, a chestxray14
    PNG and an empty file, run through the real daemon once (``--once``: every scan but the empty file is
    reported, then archived)."""
    settings = load_settings(
        env={},
        flags={
            "watch": root / "inbox",
            "state_dir": root / "state",
            "stable_seconds": 0.0,
            "workers": 0,
            "max_wait_ms": 10,
            **flags,
        },
    )
    daemon = Daemon(settings)
    daemon.prepare()
    promote(daemon, write_model(root / "busi_model"))
    promote(daemon, write_model(root / "cxr_model", task="chestxray14", architecture="resnet18"))
    drop_scans(settings.watch)
    drop_study(settings.watch)
    rng = np.random.default_rng(11)
    write_png(settings.watch / "chestxray14" / "synthetic_cxr.png", rng.integers(0, 255, (40, 40), np.uint8))
    (settings.watch / "synthetic_empty.png").write_bytes(b"")  # fails as empty_file
    daemon.run(once=True)
    return daemon


def read_pdf(data: bytes | Path) -> tuple[str, int, int, dict[str, str]]:
    """A PDF read back with pypdf: (all its text, pages, embedded images, metadata values); the text
    with every run of whitespace (line breaks of wrapped cells included) made one space."""
    import io

    from pypdf import PdfReader

    reader = PdfReader(io.BytesIO(data if isinstance(data, bytes) else data.read_bytes()))
    text = " ".join(" ".join(page.extract_text() or "" for page in reader.pages).split())
    images = sum(len(page.images) for page in reader.pages)
    metadata = {str(k): str(v) for k, v in (reader.metadata or {}).items()}
    return text, len(reader.pages), images, metadata
