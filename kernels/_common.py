"""Dispatch between the Triton kernels and their pure-torch references.

Triton runs on CUDA tensors, and on CPU tensors when ``TRITON_INTERPRET=1`` was set before
Triton was imported (its interpreter; float32/float16 only). Anywhere else the public ops fall
back to the ``*_ref`` functions, so training runs on any machine. ``set_backend("torch")``
forces the references (the fused-vs-unfused regression tests use it); ``"auto"`` is the default.
"""
from __future__ import annotations

import contextlib
import os

import torch

_BACKEND = "auto"
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

try:
    import triton  # noqa: F401

    HAS_TRITON = True
except ImportError:  # pragma: no cover - triton ships with torch on Linux
    HAS_TRITON = False


def set_backend(name: str) -> None:
    """'auto' (Triton where it runs), 'torch' (references only) or 'triton' (error where it cannot run)."""
    global _BACKEND
    if name not in ("auto", "torch", "triton"):
        raise ValueError(f"kernel backend {name!r} is not valid; choose one of ['auto', 'torch', 'triton']")
    _BACKEND = name


def get_backend() -> str:
    return _BACKEND


@contextlib.contextmanager
def backend(name: str):
    old = _BACKEND
    set_backend(name)
    try:
        yield
    finally:
        set_backend(old)


def use_triton(*tensors: torch.Tensor) -> bool:
    """Whether the Triton path runs for these tensors under the current backend."""
    if _BACKEND == "torch" or not HAS_TRITON:
        return False
    runs = all(t.is_cuda for t in tensors) or (INTERPRET and all(t.device.type == "cpu" for t in tensors))
    if _BACKEND == "triton" and not runs:
        raise RuntimeError("kernel backend 'triton' was forced but these tensors are on "
                           f"{tensors[0].device} without TRITON_INTERPRET=1")
    return runs
