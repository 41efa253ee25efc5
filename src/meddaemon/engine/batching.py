"""Dynamic batching (the Triton idea): a queue per model, flushed when it holds ``max_batch``
inputs or when its oldest input has waited ``max_wait`` seconds."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Generic, TypeVar

import numpy as np

K = TypeVar("K", bound=Hashable)


@dataclass
class QueuedScan:
    scan_id: int
    #: float32 (N, C, H, W): one row per frame (N is 1 unless the frame policy is "all")
    inputs: np.ndarray
    discovered_at: datetime | None
    enqueued: float = field(default_factory=time.monotonic)
    #: the scan's content hash when the caller knows it (its outputs are named by it)
    sha256: str | None = None

    @property
    def size(self) -> int:
        return int(self.inputs.shape[0])


class BatchQueue(Generic[K]):
    def __init__(self, max_batch: int, max_wait: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.max_batch = max_batch
        self.max_wait = max_wait
        self.clock = clock
        self._queues: dict[K, deque[QueuedScan]] = {}

    def __len__(self) -> int:
        return sum(len(q) for q in self._queues.values())

    def put(self, key: K, item: QueuedScan) -> None:
        self._queues.setdefault(key, deque()).append(item)

    def take_ready(self, flush: bool = False, limit: int | None = None) -> list[tuple[K, list[QueuedScan]]]:
        """Full batches, and partial ones whose oldest scan has waited long enough (or all, with
        ``flush``); at most ``limit`` batches (the rest stay queued and keep filling)."""
        now = self.clock()
        batches: list[tuple[K, list[QueuedScan]]] = []
        for key, queue in self._queues.items():
            while (
                queue
                and (limit is None or len(batches) < limit)
                and (flush or sum(i.size for i in queue) >= self.max_batch or now - queue[0].enqueued >= self.max_wait)
            ):
                batch: list[QueuedScan] = []
                rows = 0
                while queue and (not batch or rows + queue[0].size <= self.max_batch):
                    item = queue.popleft()
                    batch.append(item)
                    rows += item.size
                batches.append((key, batch))
        return batches

    def next_deadline(self) -> float | None:
        heads = [q[0].enqueued + self.max_wait for q in self._queues.values() if q]
        return min(heads) if heads else None

    def drop(self, key: K) -> list[QueuedScan]:
        """Everything queued for a model that is no longer served (it goes back to the database sweep)."""
        return list(self._queues.pop(key, ()))

    def queued_ids(self) -> set[int]:
        return {item.scan_id for q in self._queues.values() for item in q}
