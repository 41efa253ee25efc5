"""The collector kept off the long-lived heap: frozen once it has taken its shape, and on the way out."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator

import pytest

from meddaemon import heap


class Node:
    """A container in a reference cycle: only the cyclic collector frees it."""

    def __init__(self) -> None:
        self.me = self


@pytest.fixture(autouse=True)
def collector_restored() -> Iterator[None]:
    yield
    gc.unfreeze()


def test_settle_frees_the_garbage_there_is_and_moves_what_is_alive_out_of_the_collectors_sight():
    garbage = weakref.ref(Node())
    alive = Node()
    kept = weakref.ref(alive)
    gc.unfreeze()
    heap.settle()
    assert garbage() is None
    assert gc.get_freeze_count() > 0
    del alive
    gc.collect()
    assert kept() is not None, "frozen: never freed by the collector, as long-lived module data wants"


def test_freeze_for_exit_freezes_the_whole_heap():
    gc.unfreeze()
    assert gc.get_freeze_count() == 0
    heap.freeze_for_exit()
    assert gc.get_freeze_count() > 0
