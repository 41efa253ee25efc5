"""The decoding workers: processes whose results (a model input is 196 KiB) outgrow a pipe's
default 64 KiB."""

from __future__ import annotations

import fcntl
from pathlib import Path

import numpy as np
import pytest

from meddaemon.daemon.workers import RESULT_PIPE_BYTES, DecodingPool

pytestmark = pytest.mark.skipif(
    int(Path("/proc/sys/fs/pipe-max-size").read_text()) < RESULT_PIPE_BYTES,
    reason=f"/proc/sys/fs/pipe-max-size is below {RESULT_PIPE_BYTES}: the result pipe keeps its default",
)


def model_input(seed: int) -> np.ndarray:
    """A SYNTHETIC model input of a 224 x 224 scan (196 KiB of float32, as intake sends back)."""
    return np.random.default_rng(seed).standard_normal((1, 1, 224, 224), dtype=np.float32)


def result_pipe_bytes(pool: DecodingPool) -> int:
    reader = pool.executor._result_queue._reader  # type: ignore[union-attr]
    return fcntl.fcntl(reader.fileno(), fcntl.F_GETPIPE_SZ)


def test_the_result_pipe_holds_a_model_input_and_results_come_back_whole():
    pool = DecodingPool(2)
    pool.start()
    try:
        futures = [pool.submit(model_input, seed) for seed in range(12)]
        for seed, future in enumerate(futures):
            np.testing.assert_array_equal(future.result(60), model_input(seed))
        assert result_pipe_bytes(pool) == RESULT_PIPE_BYTES > model_input(0).nbytes
    finally:
        pool.shutdown()


def test_a_pool_replaced_after_a_worker_died_has_the_wide_pipe_too():
    pool = DecodingPool(1)
    pool.start()
    try:
        pool.replace()
        np.testing.assert_array_equal(pool.submit(model_input, 3).result(60), model_input(3))
        assert result_pipe_bytes(pool) == RESULT_PIPE_BYTES
    finally:
        pool.shutdown()
