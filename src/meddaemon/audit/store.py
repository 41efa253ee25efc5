"""The audit row: inputs' hashes, parameters and results, so an audit can be found and re-checked later."""

from __future__ import annotations

import json
from typing import Any

from sqlalchemy.orm import Session

from meddaemon.audit.run import AuditResult
from meddaemon.db.models import Audit


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
