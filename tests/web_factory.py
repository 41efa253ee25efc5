"""The web console tests' helpers: settings with a user per role, signed-in clients, SYNTHETIC states."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from dicom_factory import write_dicom
from sqlalchemy import select
from starlette.testclient import TestClient

from meddaemon.config import Settings, load_settings
from meddaemon.daemon.service import Daemon
from meddaemon.db.engine import create_db_engine, session_factory
from meddaemon.db.models import Scan
from meddaemon.web.auth import hash_password

#: a breast-ultrasound DICOM of the ABDOMEN at the inbox root: no task folder, no rule: unroutable
UNROUTABLE = "synthetic_us_abdomen.dcm"
PASSWORD = "synthetic-password"
ROLES = ("viewer", "clinician", "admin")
#: the figures of a card ``medcli retrain`` writes (``training.figures.FIGURES``, without importing matplotlib)
CARD_FIGURES = {
    "curves.png": "training curves",
    "roc.png": "ROC curves (test)",
    "confusion.png": "confusion matrix (test)",
    "test_grid.png": "test images with their calls and heatmaps",
}
#: one password hash for every test user (scrypt is slow on purpose)
_HASH = hash_password(PASSWORD)


def drop_unroutable(inbox: Path) -> None:
    rng = np.random.default_rng(5)
    write_dicom(
        inbox / UNROUTABLE,
        pixels=rng.integers(0, 255, (40, 40), dtype=np.uint8),
        modality="US",
        body_part="ABDOMEN",
    )


def web_settings(root: Path, **flags: Any) -> Settings:
    """The settings of the state under ``root``, with a user per role (named after it)."""
    config = root / "web.toml"
    config.write_text(
        "".join(f'[web_users.{role}]\nrole = "{role}"\npassword_hash = "{_HASH}"\n' for role in ROLES), "utf-8"
    )
    base = {"watch": root / "inbox", "state_dir": root / "state", "stable_seconds": 0.0, "workers": 0}
    return load_settings(config, env={}, flags={**base, **flags})


def stored_scans(root: Path) -> list[Scan]:
    """The scans of the state under ``root``, in id order, as the database holds them."""
    engine = create_db_engine(web_settings(root).db_url)
    try:
        with session_factory(engine)() as session:
            return list(session.scalars(select(Scan).order_by(Scan.id)))
    finally:
        engine.dispose()


def signed_in(app: Any, role: str) -> TestClient:
    client = TestClient(app, base_url="http://127.0.0.1", raise_server_exceptions=False)
    page = client.get("/login")
    assert page.status_code == 200
    response = client.post(
        "/login", data={"user": role, "password": PASSWORD, "csrf": csrf_of(page.text)}, follow_redirects=False
    )
    assert response.status_code == 303, response.text
    return client


def csrf_of(html: str) -> str:
    marker = 'name="csrf" value="'
    start = html.index(marker) + len(marker)
    return html[start : html.index('"', start)]


def rerun(root: Path, **flags: Any) -> None:
    """The daemon once more over the same inbox and state."""
    Daemon(web_settings(root, max_wait_ms=10, **flags)).run(once=True)


def store_audit(root: Path, pdf: str | None = None, compare: str | None = None) -> int:
    """A real ``medcli audit`` of the busi scans of the state, stored; the truth is SYNTHETIC (by name).

    ``pdf``: none kept with it (None), a one-page SYNTHETIC stand-in kept as ``--pdf`` keeps the real
    one ("plain"), or the real audit PDF (``write_and_keep_pdf``, "drawn": seconds more, for screenshots);
    ``compare``: the version it is compared with (``--compare``)."""
    from sqlalchemy import select

    from meddaemon.audit.run import AuditRequest, run_audit
    from meddaemon.audit.store import save_audit, save_pdf, write_and_keep_pdf
    from meddaemon.db.engine import create_db_engine, session_factory, transaction
    from meddaemon.db.models import Scan
    from meddaemon.engine.tasks import all_tasks

    engine = create_db_engine(web_settings(root).db_url)
    try:
        sessions = session_factory(engine)
        with sessions() as session:
            names = list(
                session.scalars(select(Scan.source_name).where(Scan.task_name == "busi", Scan.state != "failed"))
            )
        labels = root / "synthetic_labels.csv"
        classes = ("benign", "malignant", "normal")
        labels.write_text("file,label\n" + "".join(f"{n},{classes[i % 3]}\n" for i, n in enumerate(names)), "utf-8")
        with transaction(sessions) as session:
            result = run_audit(
                session,
                AuditRequest(labels=labels, task="busi", model_version="v1", bootstrap=0, compare=compare),
                all_tasks({}),
            )
            audit_id = save_audit(session, result).id
        if pdf == "drawn":
            write_and_keep_pdf(sessions, audit_id, result, root / f"audit-{audit_id}.pdf")
        elif pdf == "plain":
            with transaction(sessions) as session:
                save_pdf(session, audit_id, synthetic_pdf(f"SYNTHETIC stand-in for the PDF of audit {audit_id}"), 1)
        return audit_id
    finally:
        engine.dispose()


def write_card(folder: Path, drawn: bool = False) -> dict[str, str]:
    """A model card beside the busi version in ``folder``, as ``medcli retrain`` leaves one, linking
    its four figures; returns {figure: caption}. The figures are plain SYNTHETIC pictures, or with
    ``drawn`` (for the screenshots: seconds more) the real figure code's (``training/figures.py``)
    drawn from SYNTHETIC test-set numbers."""
    from PIL import Image, ImageDraw

    from meddaemon.engine.card import CARD_FILE

    if drawn:
        figures = _drawn_figures(folder)
    else:
        figures = dict(CARD_FIGURES)
        for name, caption in figures.items():
            picture = Image.new("RGB", (320, 160), "white")
            ImageDraw.Draw(picture).text((10, 70), f"SYNTHETIC figure: {caption}", fill="black")
            picture.save(folder / name)
    links = "".join(f"![{caption}]({name})\n\n" for name, caption in figures.items())
    version = json.loads((folder / "manifest.json").read_text("utf-8"))["version"]
    (folder / CARD_FILE).write_text(
        f"# busi {version}\n\nSYNTHETIC: a card for the console's tests; the model learnt nothing.\n\n"
        "## Metrics (test set)\n\n| label | ROC-AUC |\n|---|---|\n| benign | 0.81 |\n\n## Figures\n\n" + links,
        encoding="utf-8",
    )
    return figures


def _drawn_figures(folder: Path) -> dict[str, str]:
    import torch

    from meddaemon.engine.architectures import build_model
    from meddaemon.engine.tasks import BUILTIN_TASKS
    from meddaemon.training.figures import write_figures
    from model_factory import CONTRACT

    spec = BUILTIN_TASKS["busi"]
    rng = np.random.default_rng(3)
    truth = np.eye(3)[np.arange(12) % 3]
    probabilities = np.clip(truth * 0.5 + rng.random((12, 3)) * 0.6, 0, 1)
    probabilities /= probabilities.sum(1, keepdims=True)
    history = [
        {"epoch": e, "train_loss": 1.1 / e, "val_loss": 1.2 / e**0.5, "val_auc": 0.5 + 0.1 * e} for e in (1, 2, 3)
    ]
    torch.manual_seed(0)
    return write_figures(
        folder, kind=spec.kind, labels=spec.labels, history=history, probabilities=probabilities, truth=truth,
        thresholds=None, model=build_model("small_cnn", 1, 3), images=list(torch.rand(4, 1, 32, 32)), contract=CONTRACT,
    )  # fmt: skip


def synthetic_pdf(text: str) -> bytes:
    """A one-page PDF that says ``text`` (reportlab)."""
    import io

    from reportlab.pdfgen.canvas import Canvas

    buffer = io.BytesIO()
    canvas = Canvas(buffer)
    canvas.drawString(72, 720, text)
    canvas.showPage()
    canvas.save()
    return buffer.getvalue()
