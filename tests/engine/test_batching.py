"""Dynamic batching: a queue per model flushed at max_batch or after max_wait."""

import numpy as np

from fake_clock import FakeClock
from meddaemon.engine.batching import BatchQueue, QueuedScan


def item(scan_id: int, clock: FakeClock, frames: int = 1) -> QueuedScan:
    return QueuedScan(scan_id, np.zeros((frames, 1, 4, 4), np.float32), None, enqueued=clock.now)


def test_a_full_batch_goes_at_once_and_the_rest_waits():
    clock = FakeClock()
    queue: BatchQueue[str] = BatchQueue(max_batch=4, max_wait=0.05, clock=clock)
    for i in range(6):
        queue.put("m", item(i, clock))
    [(key, batch)] = queue.take_ready()
    assert key == "m" and [i.scan_id for i in batch] == [0, 1, 2, 3]
    assert queue.take_ready() == []
    clock.now += 0.05
    [(_, rest)] = queue.take_ready()
    assert [i.scan_id for i in rest] == [4, 5]
    assert len(queue) == 0


def test_a_limit_takes_that_many_batches_and_the_rest_keeps_filling():
    clock = FakeClock()
    queue: BatchQueue[str] = BatchQueue(max_batch=2, max_wait=0.05, clock=clock)
    for i in range(5):
        queue.put("m", item(i, clock))
    [(_, batch)] = queue.take_ready(limit=1)
    assert [i.scan_id for i in batch] == [0, 1]
    queue.put("m", item(5, clock))
    assert [[i.scan_id for i in b] for _, b in queue.take_ready(limit=2)] == [[2, 3], [4, 5]]
    assert queue.take_ready(limit=0) == [] and len(queue) == 0


def test_a_partial_batch_goes_when_its_oldest_scan_has_waited_max_wait():
    clock = FakeClock()
    queue: BatchQueue[str] = BatchQueue(max_batch=16, max_wait=0.1, clock=clock)
    queue.put("m", item(1, clock))
    clock.now += 0.06
    queue.put("m", item(2, clock))
    assert queue.next_deadline() == 0.1
    clock.now += 0.04
    [(_, batch)] = queue.take_ready()
    assert [i.scan_id for i in batch] == [1, 2]


def test_each_model_has_its_own_queue_and_flush_takes_everything():
    clock = FakeClock()
    queue: BatchQueue[int] = BatchQueue(max_batch=8, max_wait=10, clock=clock)
    queue.put(1, item(1, clock))
    queue.put(2, item(2, clock))
    assert queue.take_ready() == []
    assert sorted(k for k, _ in queue.take_ready(flush=True)) == [1, 2]


def test_multi_frame_scans_count_their_frames_and_are_never_split():
    clock = FakeClock()
    queue: BatchQueue[str] = BatchQueue(max_batch=4, max_wait=1, clock=clock)
    queue.put("m", item(1, clock, frames=3))
    queue.put("m", item(2, clock, frames=3))
    batches = queue.take_ready()
    assert [[i.scan_id for i in b] for _, b in batches] == [[1]]
    assert queue.queued_ids() == {2}
