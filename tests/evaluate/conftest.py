"""An evaluation's world: SYNTHETIC BUSI phantoms as published, a SYNTHETIC untrained model promoted
in a migrated database, and settings pointing at it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from meddaemon.config import Settings
from meddaemon.db.engine import create_db_engine
from meddaemon.training.phantoms import write_phantoms
from model_factory import promote_into, write_model


@pytest.fixture(scope="session")
def busi_phantoms(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SYNTHETIC BUSI phantoms (8 images per class, 48 px) in the published layout, never written to."""
    return write_phantoms("busi", tmp_path_factory.mktemp("data") / "Dataset_BUSI_with_GT", count=8, size=48).root


@dataclass
class World:
    settings: Settings
    db_url: str

    def engine(self):  # type: ignore[no-untyped-def]
        return create_db_engine(self.db_url)


@pytest.fixture
def world(tmp_path: Path, make_settings, db_url: str) -> World:  # type: ignore[no-untyped-def]
    settings = make_settings(db=db_url)
    promote_into(db_url, settings.models_dir, write_model(tmp_path / "model", version="v1"))
    return World(settings, db_url)
