"""Data-parallel training across processes started by ``torchrun`` (DistributedDataParallel).

``torchrun --nproc-per-node N`` sets ``WORLD_SIZE``, ``RANK`` and ``LOCAL_RANK`` in each process;
:func:`setup` joins the process group (nccl on CUDA, one GPU per process; gloo on the CPU). Without
those variables (or with ``WORLD_SIZE=1``) every function here is a no-op on one process, so the
single-process loop is unchanged. Rank 0 is the main process: it alone evaluates, checkpoints,
writes the version and registers it; the others train their shard and wait at :func:`barrier`.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence

import torch
import torch.distributed as dist
from torch import nn


def requested() -> bool:
    """Whether torchrun asked for more than one process."""
    return requested_size() > 1


def requested_size() -> int:
    """How many processes torchrun started (1 without it), known before the process group is joined."""
    return max(1, int(os.environ.get("WORLD_SIZE", "1")))


def relaunch_options() -> list[str]:
    """The torchrun options that launch this run again, as far as torchrun's environment tells them:
    the processes per node, the nodes, and a master address or port other than torchrun's defaults
    (``--master-port N`` on a machine whose default port is taken)."""
    env = os.environ
    options = ["--nproc-per-node", env.get("LOCAL_WORLD_SIZE", env.get("WORLD_SIZE", "1"))]
    if env.get("GROUP_WORLD_SIZE", "1") != "1":
        options += ["--nnodes", env["GROUP_WORLD_SIZE"]]
    if env.get("MASTER_ADDR", "127.0.0.1") not in ("127.0.0.1", "localhost"):
        options += ["--master-addr", env["MASTER_ADDR"]]
    if env.get("MASTER_PORT", "29500") != "29500":
        options += ["--master-port", env["MASTER_PORT"]]
    return options


def active() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0")) if active() else 0


def is_main() -> bool:
    return rank() == 0


def setup(device: str) -> str:
    """Join torchrun's process group when it started several processes; the device this process
    trains on (``cuda`` becomes ``cuda:<LOCAL_RANK>``)."""
    if not requested() or active():
        return _local_device(device)
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend="nccl" if cuda else "gloo")
    return _local_device(device)


def _local_device(device: str) -> str:
    if active() and device == "cuda":
        return f"cuda:{local_rank()}"
    return device


def teardown() -> None:
    """Leave the process group, all processes together: a last barrier, then ``destroy_process_group``.

    Without the barrier a rank that finished first tore its gloo group down while rank 0 was still
    running. Once, in CI, such a rank aborted on its way out ("terminate called without an active
    exception") after the version was registered, and the whole ``torchrun`` failed. A peer already
    gone (rank 0 failed) makes the barrier raise at once; the group is destroyed all the same."""
    if not active():
        return
    with contextlib.suppress(RuntimeError):  # torch.distributed.DistError included
        dist.barrier()
    dist.destroy_process_group()


@contextlib.contextmanager
def joined(device: str) -> Iterator[str]:
    """The process group joined for the block (``setup``: the device this process trains on), and
    left at its end: all processes together when it ends well (``teardown``), at once when it
    raises (a ``SystemExit`` of a failure too). A failing rank's last barrier waited for peers
    blocked in another collective (the gradients' all-reduce, DDP's start): none ever returned, and
    torchrun never learnt of the failure (gloo's timeout is 30 minutes). A rank that leaves at once
    exits, and torchrun stops the others."""
    local = setup(device)
    try:
        yield local
    except SystemExit as exc:
        if exc.code in (None, 0):
            teardown()
        else:
            _leave()
        raise
    except BaseException:
        _leave()
        raise
    teardown()


def _leave() -> None:
    if active():
        dist.destroy_process_group()


def barrier() -> None:
    if active():
        dist.barrier()


def wrap(model: nn.Module, device: torch.device) -> nn.Module:
    """The model in DistributedDataParallel (gradients averaged across processes), or itself."""
    if not active():
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def broadcast_floats(values: Sequence[float], device: torch.device) -> list[float]:
    """Rank 0's ``values`` on every process (the others pass placeholders of the same length)."""
    if not active():
        return list(values)
    tensor = torch.tensor(list(values), dtype=torch.float64, device=device)
    dist.broadcast(tensor, src=0)
    return [float(v) for v in tensor.cpu()]


def mean(value: float, device: torch.device) -> float:
    """The mean of ``value`` over the processes."""
    if not active():
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return float(tensor) / world_size()


def broadcast_buffers(model: nn.Module) -> None:
    """Rank 0's buffers (BatchNorm running statistics) on every process."""
    if not active():
        return
    for buffer in model.buffers():
        dist.broadcast(buffer.data, src=0)
