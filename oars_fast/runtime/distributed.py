"""Process group, ranks and the few collectives the stages use.

A stage calls :func:`init` once. Launched by the ``deepspeed`` launcher or ``torchrun`` (``WORLD_SIZE``,
``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT`` in the environment) it joins the process
group (NCCL on CUDA, gloo on the CPU) and takes GPU ``LOCAL_RANK``; launched plainly it is rank 0 of 1
and creates no group unless asked to (``DeepSpeedConfig.enabled=on`` in one process).

The helpers are no-ops with one process, so the stages read the same either way.
"""
from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .device import select_device

log = logging.getLogger(__name__)


def launched_world() -> int:
    """Processes started by the launcher (``WORLD_SIZE``; 1 when run plainly)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Rank 0: the only rank that writes logs, grids, reports and checkpoint metadata."""
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init(device_name: str, need_group: bool = False) -> tuple[Dist, torch.device]:
    """Join the launcher's process group (or make a one-process one when `need_group`); the device."""
    world = launched_world()
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = select_device(device_name, local)
    use_cuda = device.type == "cuda"
    if (world > 1 or need_group) and not dist.is_initialized():
        if world == 1:  # a one-process group, e.g. to run the DeepSpeed engine without a launcher
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(_free_port()))
            os.environ.setdefault("RANK", "0")
            os.environ.setdefault("LOCAL_RANK", "0")
            os.environ.setdefault("WORLD_SIZE", "1")
        import deepspeed  # optional and heavy: only when a process group is needed

        deepspeed.init_distributed(dist_backend="nccl" if use_cuda else "gloo", auto_mpi_discovery=False,
                                   verbose=False)
    if world > 1:
        log.info("rank %d of %d (local rank %d) on %s", rank, world, local, device)
        if rank != 0:  # rank 0 speaks for the job; the others only warn
            logging.getLogger("oars_fast").setLevel(logging.WARNING)
    return Dist(rank, world, local), device


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def all_reduce(x: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """In-place all-reduce (sum | max) of a tensor; returns it."""
    if active():
        dist.all_reduce(x, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op])
    return x


def all_gather(x: torch.Tensor) -> torch.Tensor:
    """(world, *x.shape): every rank's `x` (same shape on all ranks), rank-major."""
    if not active():
        return x[None]
    out = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(out, x.contiguous())
    return torch.stack(out)


def interleave(x: torch.Tensor) -> torch.Tensor:
    """Gather per-rank rows and put them in global order.

    The loaders give rank ``k`` the global positions ``k, k + world, k + 2 world, ...``; gathering
    (world, n, ...) and reading it column-major restores the order one process would have seen.
    """
    g = all_gather(x)
    return g.transpose(0, 1).reshape(-1, *x.shape[1:])


def shutdown(clean: bool = True) -> None:
    """Leave the process group (ZeRO-3 aborts at interpreter exit otherwise). `clean=False` after an
    error: no barrier (the other ranks may never reach it)."""
    if dist.is_available() and dist.is_initialized():
        if clean:
            dist.barrier()
        dist.destroy_process_group()
