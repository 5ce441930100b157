"""The device a process computes on, its precision context, its peak memory."""
from __future__ import annotations

import torch

from ..errors import UserError

try:
    import resource  # Unix only
except ImportError:  # pragma: no cover
    resource = None


def select_device(name: str, local_rank: int = 0) -> torch.device:
    """``run.device`` -> a device: auto (CUDA when visible), cpu, or cuda (GPU `local_rank`)."""
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("run.device=cuda but no CUDA device is visible; use run.device=cpu or auto")
    if name in ("auto", "cuda") and torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def autocast(device: torch.device | str, dtype: torch.dtype | None):
    """Autocast to `dtype` on `device` (None or float32: autocast off, everything in float32)."""
    kind = torch.device(device).type
    if dtype is None or dtype == torch.float32:
        return torch.autocast(device_type=kind, enabled=False)
    return torch.autocast(device_type=kind, dtype=dtype)


def memory_gib(device: torch.device) -> float:
    """Peak memory: CUDA's max allocated on a GPU, the process's max RSS on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    if resource is None:
        return float("nan")
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB
