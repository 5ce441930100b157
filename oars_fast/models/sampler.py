"""Flow-matching Euler sampler with Qwen-Image's shifted sigma schedule.

Convention: ``x_sigma = (1 - sigma) * x0 + sigma * eps`` and the model predicts ``v = eps - x0``,
so ``dx/dsigma = v`` and one Euler step is ``x <- x + (sigma_next - sigma) * v(x, sigma)``,
integrating from sigma = 1 (noise) to 0 (data). The transformer's timestep is sigma itself.

Schedule (as diffusers' ``FlowMatchEulerDiscreteScheduler`` configured like Qwen-Image):
``sigmas = linspace(1, 1/N, N)``, then the resolution-dependent exponential shift
``s -> e^mu / (e^mu + (1/s - 1))`` with ``mu`` linear in the token count between
(base_seq_len, base_shift) and (max_seq_len, max_shift), then stretched so the last sigma equals
``shift_terminal``; a final 0 is appended.

The SDE variant (as Flow-GRPO) adds exploration noise with std ``noise_level*sqrt(s/(1-s))``
and returns per-step Gaussian log-probabilities of the transitions.

The state is updated in float32 whatever the model's dtype; each sample draws its initial (and
SDE) noise from its own seed, so a sample is the same whatever batch it is run in.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch

from ..config import SamplerConfig
from ..runtime.device import autocast
from ..runtime.seeding import derive_seeds
from .backbone import pack_latents, unpack_latents

SDE_NOISE = 1  # derive_seeds tag of the SDE steps' noise
VelocityFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x (B,...), sigma (B,)) -> v


def calculate_mu(seq_len: int, cfg: SamplerConfig) -> float:
    m = (cfg.max_shift - cfg.base_shift) / (cfg.max_seq_len - cfg.base_seq_len)
    return seq_len * m + cfg.base_shift - m * cfg.base_seq_len


def shift_sigmas(s: torch.Tensor, mu: float) -> torch.Tensor:
    """Exponential time shift of sigmas in (0, 1]."""
    return math.exp(mu) / (math.exp(mu) + (1 / s - 1))


def sigma_schedule(steps: int, seq_len: int, cfg: SamplerConfig) -> torch.Tensor:
    """The N + 1 sigmas (float64, descending from 1 to 0) for an image of `seq_len` tokens."""
    s = torch.linspace(1.0, 1.0 / steps, steps, dtype=torch.float64)
    if cfg.shift == "dynamic":
        s = shift_sigmas(s, calculate_mu(seq_len, cfg))
    elif cfg.shift == "fixed":
        s = cfg.shift_value * s / (1 + (cfg.shift_value - 1) * s)
    if cfg.shift_terminal and steps > 1:  # (one step: [1, 0], nothing to stretch)
        one_minus = 1 - s
        s = 1 - one_minus / (one_minus[-1] / (1 - cfg.shift_terminal))
    return torch.cat([s, s.new_zeros(1)])


def per_sample_noise(shape: tuple[int, ...], seeds: list[int], device: torch.device | str,
                     dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Standard normal noise (len(seeds), *shape), sample i drawn from seed i alone (on the CPU, so the
    same seed gives the same noise on any device)."""
    out = [torch.randn(shape, generator=torch.Generator().manual_seed(int(s)), dtype=torch.float32) for s in seeds]
    return torch.stack(out).to(device=device, dtype=dtype)


@dataclass
class SampleResult:
    x0: torch.Tensor  # (B, ...) final clean latents, float32
    trajectory: list[torch.Tensor] | None  # the N + 1 states (x at each sigma), if kept
    log_probs: torch.Tensor | None  # (B, N) SDE transition log-probs (mean over elements), SDE only
    sigmas: torch.Tensor  # (N + 1,) float64


class SDEStep(NamedTuple):
    x_next: torch.Tensor  # (B, ...) the next state (drawn, or the given one)
    log_prob: torch.Tensor  # (B,) the transition's Gaussian log-density, averaged over elements
    mean: torch.Tensor  # (B, ...) the transition mean
    std: float  # sigma_t: the SDE's noise level at this step (the transition std is std * sqrt(-dt))


def sde_step(x: torch.Tensor, v: torch.Tensor, sigma: float, sigma_next: float, sigma_max: float,
             noise_level: float, noise: torch.Tensor | None = None, x_next: torch.Tensor | None = None) -> SDEStep:
    """One SDE step of the flow ODE's marginal-preserving SDE (Flow-GRPO form). Give `x_next` to score a
    known transition (the log-prob under the current model) instead of drawing one."""
    dt = sigma_next - sigma
    # sigma/(1 - sigma) diverges at sigma = 1 (the first step, which float64 may give as 1 - 1e-16):
    # the first step takes sigma_max = sigmas[1] in the denominator, as Flow-GRPO does
    denom = 1 - min(sigma, sigma_max)
    std = math.sqrt(sigma / denom) * noise_level
    mean = x * (1 + std**2 / (2 * sigma) * dt) + v * (1 + std**2 * (1 - sigma) / (2 * sigma)) * dt
    scale = std * math.sqrt(-dt)
    if x_next is None:
        x_next = mean + scale * noise
    lp = -((x_next.detach() - mean) ** 2) / (2 * scale**2) - math.log(scale) - 0.5 * math.log(2 * math.pi)
    return SDEStep(x_next, lp.flatten(1).mean(1), mean, std)


@torch.no_grad()
def euler_sample(velocity: VelocityFn, noise: torch.Tensor, sigmas: torch.Tensor, sde: bool = False,
                 noise_level: float = 0.7, seeds: list[int] | None = None,
                 keep_trajectory: bool = False) -> SampleResult:
    """Integrate from `noise` (sigma = 1) to data with the given sigmas (N + 1 values ending at 0).

    SDE step ``i`` draws sample ``b``'s noise from ``derive_seeds([seeds[b]], SDE_NOISE, i)``; the last
    step (to sigma = 0) is always deterministic.
    """
    x = noise.float()
    b = x.shape[0]
    traj = [x.clone()] if keep_trajectory else None
    log_probs = []
    n = len(sigmas) - 1
    sigma_max = float(sigmas[1]) if n > 1 else 1.0
    for i in range(n):
        s, s_next = float(sigmas[i]), float(sigmas[i + 1])
        v = velocity(x, torch.full((b,), s, device=x.device)).float()
        if sde and s_next > 0:
            if seeds is None:
                raise ValueError("SDE sampling needs per-sample seeds")
            eps = per_sample_noise(tuple(x.shape[1:]), derive_seeds(seeds, SDE_NOISE, i), x.device)
            x, lp, _, _ = sde_step(x, v, s, s_next, sigma_max, noise_level, eps)
            log_probs.append(lp)
        else:
            x = x + (s_next - s) * v
        if keep_trajectory:
            traj.append(x.clone())
    lps = torch.stack(log_probs, 1) if log_probs else None
    return SampleResult(x, traj, lps, sigmas)


def guided(velocity: VelocityFn, negative: VelocityFn, scale: float) -> VelocityFn:
    """True CFG as Qwen-Image's pipelines combine it: ``comb = neg + scale * (cond - neg)``, rescaled per
    token to the conditional prediction's norm (norms over each 2x2 packed token's channels)."""
    def v(x, s):
        cond, neg = velocity(x, s).float(), negative(x, s).float()
        comb = neg + scale * (cond - neg)
        pc, pb = pack_latents(cond), pack_latents(comb)
        pb = pb * (pc.norm(dim=-1, keepdim=True) / pb.norm(dim=-1, keepdim=True).clamp_min(1e-12))
        return unpack_latents(pb, *cond.shape[-2:])

    return v


def sample_sr(model, lr: torch.Tensor, cfg: SamplerConfig, seeds: list[int], autocast_dtype=None,
              steps: int | None = None) -> torch.Tensor:
    """LR images (B, 3, h, w) in [0, 1] -> SR images (B, 3, h*scale, w*scale) in [0, 1]. The condition
    (LR latents, and with edit conditioning the prompt) is computed once for all steps."""
    steps = steps or cfg.steps
    with torch.no_grad():
        cond = model.condition(lr)
        c, h, w = cond.latents.shape[1:]
        sigmas = sigma_schedule(steps, (h // 2) * (w // 2), cfg)
        noise = per_sample_noise((c, h, w), seeds, lr.device)
        velocity = lambda x, s: model.velocity(x, s, cond)  # noqa: E731
        if cfg.cfg_scale > 1:
            neg = model.condition(lr, negative=True)
            velocity = guided(velocity, lambda x, s: model.velocity(x, s, neg), cfg.cfg_scale)
        with autocast(lr.device, autocast_dtype):
            res = euler_sample(velocity, noise, sigmas, sde=cfg.sde, noise_level=cfg.noise_level, seeds=seeds)
        return model.decode(res.x0)
