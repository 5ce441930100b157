"""The optimizer (AdamW), its learning-rate schedule and an EMA of parameters."""
from __future__ import annotations

import math

import torch

from ..config import OptimizerConfig


def lr_lambda(cfg: OptimizerConfig, total_steps: int):
    """Multiplier of cfg.lr at optimizer step `s` (0-based): linear warm-up, then the schedule."""

    def f(s: int) -> float:
        if cfg.warmup_steps and s < cfg.warmup_steps:
            return (s + 1) / cfg.warmup_steps
        if cfg.schedule == "constant":
            return 1.0
        span = max(1, total_steps - cfg.warmup_steps)
        p = min(1.0, (s - cfg.warmup_steps) / span)
        lo = cfg.min_lr_ratio
        if cfg.schedule == "cosine":
            return lo + (1 - lo) * 0.5 * (1 + math.cos(math.pi * p))
        return lo + (1 - lo) * (1 - p)

    return f


def build_optimizer(params, cfg: OptimizerConfig, total_steps: int):
    """AdamW over the trainable `params` and its LambdaLR schedule."""
    params = [p for p in params if p.requires_grad]
    if not params:
        raise ValueError("no trainable parameters: check the training mode and LoRA target modules")
    fused = all(p.is_cuda for p in params)
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay,
                            fused=fused or None)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg, total_steps))
    return opt, sched


class EMA:
    """Exponential moving average of parameters (float32 shadow copies)."""

    def __init__(self, params: dict[str, torch.Tensor], decay: float):
        self.decay = decay
        self.shadow = {k: p.detach().float().clone() for k, p in params.items()}

    @torch.no_grad()
    def update(self, params: dict[str, torch.Tensor], decay: float | None = None) -> None:
        """shadow <- d * shadow + (1 - d) * params, d = `decay` (this step's) or the fixed one."""
        d = self.decay if decay is None else decay
        for k, p in params.items():
            self.shadow[k].lerp_(p.detach().float(), 1 - d)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "shadow": self.shadow}

    def load_state_dict(self, state: dict) -> None:
        self.decay = state["decay"]
        self.shadow = {k: v.clone() for k, v in state["shadow"].items()}
