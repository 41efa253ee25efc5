"""The evaluator stores what the daemon stores: the same files through the daemon's inbox and
through ``medcli evaluate`` (separate databases) give the same probabilities within 1e-6."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import select

from meddaemon.daemon.service import Daemon
from meddaemon.db.engine import session_factory
from meddaemon.db.models import Result, Scan
from meddaemon.evaluate.pipeline import EvaluationRequest, run_evaluation
from model_factory import promote, write_model


def probabilities_by_sha(sessions) -> dict[str, np.ndarray]:  # type: ignore[no-untyped-def]
    with sessions() as session:
        rows = session.execute(
            select(Scan.sha256, Result.probability).join(Result, Result.scan_id == Scan.id).order_by(Result.id)
        ).all()
    out: dict[str, list[float]] = {}
    for sha, probability in rows:
        out.setdefault(sha, []).append(probability)
    return {k: np.array(v) for k, v in out.items()}


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_the_daemon_and_the_evaluator_give_the_same_probabilities(
    world, busi_phantoms: Path, make_settings, tmp_path: Path
) -> None:
    daemon = Daemon(make_settings(watch=tmp_path / "daemon" / "inbox", state_dir=tmp_path / "daemon" / "state",
                                  reports=False, max_wait_ms=10, db=None))  # fmt: skip
    daemon.prepare()
    promote(daemon, write_model(tmp_path / "daemon_model", version="v1"))
    images = sorted(p for p in busi_phantoms.rglob("*.png") if "_mask" not in p.name)
    for image in images:
        target = daemon.settings.watch / "busi" / f"{image.parent.name}_{image.name}"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(image, target)
    daemon.run(once=True)
    by_daemon = probabilities_by_sha(daemon.sessions)

    engine = world.engine()
    outcome = run_evaluation(engine, world.settings, EvaluationRequest(busi_phantoms, "busi", workers=1, batch_size=7))
    by_evaluator = probabilities_by_sha(session_factory(engine))
    engine.dispose()

    assert outcome.summary["scored"] == len(images) == len(by_daemon) == len(by_evaluator)
    assert by_daemon.keys() == by_evaluator.keys()
    worst = max(float(np.abs(by_daemon[sha] - by_evaluator[sha]).max()) for sha in by_daemon)
    assert worst <= 1e-6
