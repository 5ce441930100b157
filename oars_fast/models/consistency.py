"""LR consistency in image space: the downsampler the LR-consistency metric uses, and back-projection.

``downsample(sr, size)`` is ``F.interpolate(mode="bicubic", antialias=True, align_corners=False)``: a Keys
cubic (a = -0.5) widened by the scale factor, the filter of PIL's float ``Image.resize(BICUBIC)``.
:func:`oars_fast.evaluation.lr_consistency` scores an SR image with it.

``back_project(sr, lr, steps)`` is iterative back-projection (Irani & Peleg, 1991) with that downsampler
and bicubic upsampling: ``sr <- sr + up(lr - downsample(sr))``, ``steps`` times, then clamped to [0, 1].
It replaces the output's low frequencies (what the downsampler keeps) by the input's and keeps the
model's detail above them. It is an inference option (``infer.back_projection``; ``bp:<entry>`` rows in
``oars-fast eval``), not part of the OARS method: a model that drifts in colour or layout is pulled back
to its input, and the LR's own noise and compression come back with the low frequencies.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["back_project", "downsample"]


def downsample(img: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, C, H, W) -> (B, C, *size), antialiased bicubic (not clamped)."""
    return F.interpolate(img, size=tuple(size), mode="bicubic", antialias=True, align_corners=False)


def back_project(sr: torch.Tensor, lr: torch.Tensor, steps: int = 1) -> torch.Tensor:
    """SR (B, 3, H, W) and its LR (B, 3, h, w), H/h = W/w an integer, both in [0, 1] -> the back-projected SR,
    clamped to [0, 1], in the SR's dtype. ``steps = 0`` returns ``sr`` unchanged."""
    if steps < 0:
        raise ValueError(f"back_project: steps must be >= 0, got {steps}")
    if sr.dim() != 4 or lr.dim() != 4 or sr.shape[:2] != lr.shape[:2]:
        raise ValueError(f"back_project: expected (B, C, H, W) SR and LR with equal B and C, got {tuple(sr.shape)} "
                         f"and {tuple(lr.shape)}")
    (sh, sw), (lh, lw) = sr.shape[-2:], lr.shape[-2:]
    if sh % lh or sw % lw or sh // lh != sw // lw:
        raise ValueError(f"back_project: SR {sh}x{sw} is not one integer multiple of LR {lh}x{lw}")
    if steps == 0:
        return sr
    x, y = sr.float(), lr.to(device=sr.device, dtype=torch.float32)
    for _ in range(steps):
        x = x + F.interpolate(y - downsample(x, (lh, lw)), size=(sh, sw), mode="bicubic", align_corners=False)
    return x.clamp(0, 1).to(sr.dtype)
