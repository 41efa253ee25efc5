"""Models and scans for end-to-end daemon tests: a SYNTHETIC, untrained model written, imported and
promoted through the real registry, and a few synthetic scans for the inbox."""

from __future__ import annotations

import shutil
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import closing, contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from dicom_factory import write_dicom, write_png
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from meddaemon.config import Settings, load_settings
from meddaemon.daemon import bookkeeper
from meddaemon.daemon.service import Daemon
from meddaemon.db.engine import create_db_engine, session_factory, transaction
from meddaemon.db.migrate import upgrade
from meddaemon.db.models import ModelVersion, Result, Scan
from meddaemon.engine import registry
from meddaemon.engine.architectures import build_model
from meddaemon.engine.tasks import BUILTIN_TASKS, InputContract, all_tasks

CONTRACT = InputContract(1, 32, 32, (0.449,), (0.226,), modalities=("US",))


#: version folder -> graph name -> SHA-256: what ``model_graphs`` holds of the ONNX graphs exported
#: from a version, for the tests that serve a version folder with no database (the rows themselves,
#: and the daemon's and the evaluator's use of them: tests/engine/test_serving.py)
GRAPHS_RECORDED: dict[Path, dict[str, str]] = {}


def registered_folder(folder: Path) -> tuple[registry.Registered, Callable[[str, str], None]]:
    """``folder`` as the database would hand it to ``serve_version``: its manifest, the hashes of the
    graphs exported from it so far, and what records the next."""
    manifest = registry.read_manifest(folder).to_dict()
    recorded = GRAPHS_RECORDED.setdefault(Path(folder), {})
    return registry.Registered(manifest["sha256"], manifest, dict(recorded)), recorded.__setitem__


def write_model(
    folder: Path,
    task: str = "busi",
    version: str = "v1",
    architecture: str = "small_cnn",
    contract: InputContract = CONTRACT,
    backend: str = "auto",
    heatmaps: bool = True,
) -> Path:
    """A randomly initialised (SYNTHETIC, untrained) model in the registry's format; ``backend``
    pins the CPU backend (``auto``: the faster, measured); ``heatmaps=False``: a version that makes none."""
    spec = BUILTIN_TASKS[task]
    torch.manual_seed(0)
    model = build_model(architecture, contract.channels, spec.num_outputs)
    registry.save_version(
        model,
        task=task,
        version=version,
        labels=spec.labels,
        kind=spec.kind,
        architecture=architecture,
        input_contract=contract,
        out_dir=folder,
        training_data_fingerprint="synthetic",
        backend=backend,
        heatmaps=heatmaps,
    )
    return folder


def promote(daemon: Daemon, folder: Path) -> None:
    with transaction(daemon.sessions) as session:
        row = registry.import_version(session, folder, daemon.settings.models_dir)
        registry.promote(session, row.task_name, row.version)


def store_busi_results(daemon: Daemon, version: str, malignant: float = 0.7, scan_id: int | None = None) -> int:
    """SYNTHETIC results of busi ``version`` (benign 0.2, malignant ``malignant``, normal 0.1) for
    ``scan_id``, or the first busi scan: a scan run again by another version. Returns the scan's id."""
    with transaction(daemon.sessions) as session:
        if scan_id is None:
            scan_id = session.scalars(select(Scan.id).where(Scan.task_name == "busi").order_by(Scan.id)).first()
        version_id = session.scalars(
            select(ModelVersion.id).where(ModelVersion.task_name == "busi", ModelVersion.version == version)
        ).one()
        for label, probability in (("benign", 0.2), ("malignant", malignant), ("normal", 0.1)):
            session.add(Result(scan_id=scan_id, model_version_id=version_id, label=label, probability=probability,
                               threshold=0.5, positive=probability > 0.5))  # fmt: skip
    assert scan_id is not None
    return scan_id


@contextmanager
def prepared_database(db_url: str) -> Iterator[sessionmaker[Session]]:
    """Sessions on the database at ``db_url``, migrated and with the task presets, as before any daemon
    starts; the engine is disposed of afterwards."""
    engine = create_db_engine(db_url)
    try:
        upgrade(engine)
        sessions = session_factory(engine)
        with transaction(sessions) as session:
            bookkeeper.ensure_tasks(session, all_tasks({}))
        yield sessions
    finally:
        engine.dispose()


def promote_into(db_url: str, models_dir: Path, folder: Path) -> None:
    """Import and promote the model in ``folder`` in the database at ``db_url``, as ``medcli models
    import`` then ``promote`` do, before any daemon starts."""
    with prepared_database(db_url) as sessions, transaction(sessions) as session:
        row = registry.import_version(session, folder, models_dir)
        registry.promote(session, row.task_name, row.version)


def import_files_into(db_url: str, models_dir: Path, files: Sequence[tuple[Path, Any]]) -> dict[str, str]:
    """Convert, register and promote trained model FILES (each with its ``engine.importers.ImportOptions``)
    in the database at ``db_url``, as ``medcli models import FILE`` then ``promote`` do, before any
    daemon starts; returns each task's version folder."""
    from meddaemon.engine import importers

    folders = {}
    with prepared_database(db_url) as sessions:
        for path, options in files:
            with transaction(sessions) as session:
                row = importers.import_file(session, path, options, models_dir)
                registry.promote(session, row.task_name, row.version)
                folders[row.task_name] = row.path
    return folders


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


def run_then_resend_corrected(daemon: Daemon, count: int = 2) -> tuple[Daemon, list[Any]]:
    """Run ``daemon`` once over the study ``drop_study`` dropped, then send its ``count`` instances
    again with the patient's name corrected (the same SOP Instance UIDs, other bytes), run by a new
    daemon: that daemon, and the instances as corrected."""
    from pydicom import dcmread

    watch = daemon.settings.watch
    instances = [dcmread(watch / f"synthetic_study_{i}.dcm") for i in range(count)]
    daemon.run(once=True)
    for i, corrected in enumerate(instances):
        corrected.PatientName = "SYNTHETIC^Corrected^Name"
        corrected.save_as(watch / f"synthetic_study_{i}_corrected.dcm")
    again = Daemon(daemon.settings)
    again.prepare()
    again.run(once=True)
    return again, instances


def reported_settings(root: Path, **flags: object) -> Settings:
    """The settings ``reported_state`` runs its daemon with: inbox and state dir under ``root``."""
    return load_settings(
        env={},
        flags={
            "watch": root / "inbox",
            "state_dir": root / "state",
            "create_watch": True,
            "stable_seconds": 0.0,
            "workers": 0,
            "max_wait_ms": 10,
            **flags,
        },
    )


def reported_state(root: Path, **flags: object) -> Daemon:
    """A model per task, a two-scan DICOM study with patient fields, busi PNGs and DICOM, a chestxray14
    PNG and an empty file, run through the real daemon once (``--once``: every scan but the empty file is
    reported, then archived)."""
    settings = reported_settings(root, **flags)
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


class ReportedStates:
    """``reported_state`` run once per session for each kind of state, then copied for each test that
    asks for one: a daemon run takes seconds (two models written, imported, promoted and loaded, seven
    scans inferred and reported); a copy takes milliseconds.

    A copy is the template's folder tree (files, mtimes), its SQLite database copied with SQLite's backup
    API, and, in that database, every absolute path under the template's root (inbox claims, model
    folders) moved under the copy's root: what the same run under the copy's root would have written.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.templates: dict[tuple[object, ...], Path] = {}

    def copy(self, root: Path, inbox: Callable[[Path], None] | None = None, **flags: object) -> Daemon:
        """The state ``reported_state(root, **flags)`` leaves, with ``inbox(root / "inbox")`` called
        first (files of its own for the run); returns a daemon (not started) on the copy's settings."""
        key = (inbox, *sorted((name, repr(value)) for name, value in flags.items()))
        template = self.templates.get(key)
        if template is None:
            template = self.folder / f"reported{len(self.templates)}"
            if inbox is not None:
                inbox(template / "inbox")
            reported_state(template, **flags).engine.dispose()
            self.templates[key] = template
        copy_state(template, root)
        return Daemon(reported_settings(root, **flags))


def copy_state(template: Path, root: Path) -> None:
    """``template``'s tree under ``root`` (made if missing), its database moved there (see ``ReportedStates``)."""
    database = Path("state") / "meddaemon.db"
    sqlite_files = {database, database.with_name("meddaemon.db-wal"), database.with_name("meddaemon.db-shm")}

    def ignore(folder: str, names: list[str]) -> set[str]:
        return {n for n in names if (Path(folder) / n).relative_to(template) in sqlite_files}

    shutil.copytree(template, root, ignore=ignore, dirs_exist_ok=True)
    with closing(sqlite3.connect(template / database)) as source, closing(sqlite3.connect(root / database)) as target:
        source.backup(target)
        move_paths(target, str(template), str(root))
        target.commit()


def move_paths(conn: sqlite3.Connection, old: str, new: str) -> None:
    """Every text value that is ``old`` or starts with ``old/``, in every table, made ``new``'s."""
    tables = [name for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
    for table in tables:
        for _cid, column, kind, *_ in conn.execute(f'PRAGMA table_info("{table}")').fetchall():
            if not any(t in kind.upper() for t in ("CHAR", "TEXT", "CLOB", "JSON")):
                continue
            conn.execute(
                f'UPDATE "{table}" SET "{column}" = ? || substr("{column}", ?)'
                f' WHERE "{column}" = ? OR substr("{column}", 1, ?) = ?',
                (new, len(old) + 1, old, len(old) + 1, old + "/"),
            )
            left = conn.execute(f'SELECT count(*) FROM "{table}" WHERE instr("{column}", ?) > 0', (old,)).fetchone()
            assert left[0] == 0, f"{table}.{column} holds {old} inside a value: teach move_paths to move it"


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


def import_and_promote(daemon: Daemon, path: Path, options: Any) -> str:
    """Convert a trained model FILE (``engine.importers.ImportOptions``) into a version, register and
    promote it, as ``medcli models import FILE`` then ``promote`` do; returns the version's folder."""
    from meddaemon.engine import importers

    with transaction(daemon.sessions) as session:
        row = importers.import_file(session, path, options, daemon.settings.models_dir, daemon.settings.task_specs)
        registry.promote(session, row.task_name, row.version)
        return row.path


class MostAtOnce:
    """``function`` with each call held ``hold`` seconds: ``most`` is the most calls seen running together."""

    def __init__(self, function: Callable[..., Any], hold: float) -> None:
        self.function, self.hold = function, hold
        self.running = self.most = 0
        self.lock = threading.Lock()

    def __call__(self, *args: Any) -> Any:
        with self.lock:
            self.running += 1
            self.most = max(self.most, self.running)
        time.sleep(self.hold)
        try:
            return self.function(*args)
        finally:
            with self.lock:
                self.running -= 1
