"""An evaluation's world: SYNTHETIC BUSI phantoms as published, a SYNTHETIC untrained model promoted
in a migrated database, and settings pointing at it."""

from __future__ import annotations

from pathlib import Path

import pytest

from evaluate_factory import World
from meddaemon.training.phantoms import write_phantoms
from model_factory import promote_into, write_model


@pytest.fixture(scope="session")
def busi_phantoms(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SYNTHETIC BUSI phantoms (8 images per class, 48 px) in the published layout, never written to."""
    return write_phantoms("busi", tmp_path_factory.mktemp("data") / "Dataset_BUSI_with_GT", count=8, size=48).root


@pytest.fixture
def world(tmp_path: Path, make_settings, db_url: str) -> World:  # type: ignore[no-untyped-def]
    settings = make_settings(db=db_url)
    promote_into(db_url, settings.models_dir, write_model(tmp_path / "model", version="v1"))
    return World(settings, db_url)
