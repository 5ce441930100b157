"""Flow-matching training pieces: timestep sampling and the SFT loss.

``x_t = (1 - t) x0 + t eps``, target velocity ``v = eps - x0``, loss ``mean ||v - v_theta(x_t, t)||^2``.
"""
from __future__ import annotations

import torch

from ..config import SamplerConfig
from .sampler import calculate_mu, shift_sigmas

T_EPS = 1e-4  # keep t away from exactly 0 and 1


def sample_timesteps(n: int, mode: str, generator: torch.Generator, seq_len: int = 1024, mean: float = 0.0,
                     std: float = 1.0, sampler: SamplerConfig | None = None) -> torch.Tensor:
    """`n` training times in (0, 1), float32 on the generator's device.

    uniform: U(0, 1); logit_normal: sigmoid(N(mean, std)); shifted: logit-normal times pushed
    through the sampler's resolution-dependent exponential shift (Qwen-Image's shift for this
    token count), so training spends its steps where sampling does.
    """
    dev = generator.device
    if mode == "uniform":
        t = torch.rand(n, generator=generator, device=dev)
    else:
        t = torch.sigmoid(mean + std * torch.randn(n, generator=generator, device=dev))
        if mode == "shifted":
            t = shift_sigmas(t.double().clamp(T_EPS, 1 - T_EPS), calculate_mu(seq_len, sampler or SamplerConfig()))
            t = t.float()
    return t.clamp(T_EPS, 1 - T_EPS)


def flow_matching_loss(model, x0: torch.Tensor, cond, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """Mean squared velocity error (a float32 scalar); `cond`: a Condition (or LR latents)."""
    tb = t.view(-1, *([1] * (x0.ndim - 1)))
    x_t = (1 - tb) * x0 + tb * eps
    v = eps - x0
    pred = model.velocity(x_t, t, cond).float()
    return (pred - v).pow(2).mean()
