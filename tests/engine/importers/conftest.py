"""Fixtures of the importer tests: one PyTorch thread while a module runs, and seed 003's Keras ``.h5``,
written once per session (SYNTHETIC weights)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from seed_models import write_seed003_h5


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """The seeds' full-size architectures run hundreds of small operators, and on a machine shared with
    other work an OpenMP team of one thread per core waits at every one of them for a thread that is
    not running (seed 002's EfficientNetV2-S: 20 s for three passes at 64 px with two threads at load
    average 10, 0.35 s with one). One thread gives the same results, within the tests' tolerances."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def seed003_h5(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Seed 003's ``pretrained_model.h5``, as Keras 3 (torch backend) writes Keras's HDF5 weights layout."""
    return write_seed003_h5(tmp_path_factory.mktemp("keras") / "pretrained_model.h5")
