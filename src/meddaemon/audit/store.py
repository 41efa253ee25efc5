"""The audit row: inputs' hashes, parameters and results, so an audit can be found and re-checked later;
and the audit's PDF, when one was written, kept with it (``audit_pdfs``) for the web console."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from meddaemon.audit.run import AuditResult
from meddaemon.db.engine import transaction
from meddaemon.db.models import Audit, AuditPdf


def json_safe(data: Any) -> Any:
    """What the JSON column stores: plain types only (numpy scalars and the like as their str/float)."""
    return json.loads(json.dumps(data, default=_default))


def _default(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    return str(value)


def save_audit(session: Session, result: AuditResult) -> Audit:
    row = Audit(
        task_name=result.task,
        model_version_id=result.model_version_id,
        compare_model_version_id=result.compare_version_id,
        labels_path=result.labels.path,
        labels_sha256=result.labels.sha256,
        labels_format=result.labels.format,
        predictions_sha256=result.predictions_sha256,
        matched=result.join.matched,
        parameters=json_safe(result.request.parameters()),
        results=json_safe(result.as_dict()),
        passed=result.passed,
    )
    session.add(row)
    session.flush()
    return row


def save_pdf(session: Session, audit_id: int, data: bytes, pages: int) -> AuditPdf:
    """Keep the PDF of audit ``audit_id`` (drawn by ``audit.pdf.render_pdf``) with it; a second one replaces it."""
    row = session.get(AuditPdf, audit_id) or AuditPdf(audit_id=audit_id)
    row.data, row.pages = data, pages
    row.sha256, row.size_bytes = hashlib.sha256(data).hexdigest(), len(data)
    session.add(row)
    session.flush()
    return row


def write_and_keep_pdf(sessions: sessionmaker[Session], audit_id: int, result: AuditResult, path: Path) -> int:
    """Write the audit's PDF to ``path``, then keep it with audit ``audit_id`` in a transaction of its
    own (the drawing takes seconds: no transaction is held open meanwhile); returns its pages."""
    from meddaemon.audit.pdf import render_pdf
    from meddaemon.files import write_named_output

    data, pages = render_pdf(result)
    write_named_output(path, data)
    with transaction(sessions) as session:
        save_pdf(session, audit_id, data, pages)
    return pages
