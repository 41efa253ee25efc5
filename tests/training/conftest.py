"""SYNTHETIC phantom datasets written once per session, small (64x64) so the tests stay fast."""

from __future__ import annotations

import pytest

from meddaemon.training.phantoms import PhantomSet, write_phantoms

SIZES = {"busi": (12, 64), "chestxray14": (60, 64), "covid": (12, 64), "histopathology": (16, 50)}


@pytest.fixture(scope="session")
def phantoms(tmp_path_factory: pytest.TempPathFactory) -> dict[str, PhantomSet]:
    root = tmp_path_factory.mktemp("phantoms")
    return {
        task: write_phantoms(task, root / task, count=count, size=size, seed=7) for task, (count, size) in SIZES.items()
    }
