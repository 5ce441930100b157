"""Devices, seeds, RNG state, learning-rate schedules, EMA, memory."""
from __future__ import annotations

import math
import random

import numpy as np
import torch

from ..config import OptimizerConfig


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("run.device=cuda but no CUDA device is visible; use run.device=cpu or auto")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def derive_seeds(seeds, *tags: int) -> list[int]:
    """Independent 62-bit seeds from per-sample seeds and integer tags (e.g. step, purpose): the
    randomness of a sample depends on the sample, never on which rank or micro-batch it landed in."""
    return [int(np.random.default_rng((int(s), *tags)).integers(2**62)) for s in seeds]


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


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

    def __init__(self, params: dict[str, torch.nn.Parameter], decay: float):
        self.decay = decay
        self.shadow = {k: p.detach().float().clone() for k, p in params.items()}

    @torch.no_grad()
    def update(self, params: dict[str, torch.nn.Parameter]) -> None:
        for k, p in params.items():
            self.shadow[k].lerp_(p.detach().float(), 1 - self.decay)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "shadow": self.shadow}

    def load_state_dict(self, state: dict) -> None:
        self.decay = state["decay"]
        self.shadow = {k: v.clone() for k, v in state["shadow"].items()}


def memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB
    except (ImportError, AttributeError):
        return float("nan")


def start_run(job, ds_cfg=None):
    """The opening of every training stage: process group, device, the shared seed (model and LoRA
    initialisation; :func:`seed_rank` gives each rank its own stream once set-up is done), run folder
    and resolved config (rank 0). Returns (Dist, device, run_dir)."""
    from ..config import save_config
    from .distributed import barrier, init
    from .engine import use_deepspeed

    dist, device = init(job.run.device, need_group=ds_cfg is not None and use_deepspeed(ds_cfg))
    seed_everything(job.run.seed)  # the same on every rank: model and LoRA initialisation agree
    run_dir = job.run.run_dir
    if dist.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(job, run_dir / "config.yaml")
    barrier()
    return dist, device, run_dir


def seed_rank(seed: int, dist) -> None:
    """After set-up: each rank its own global RNG stream (with one process the stream is left as it is).
    What must agree across ranks (data, degradation, t, noise, rollout seeds) is seeded per sample."""
    if dist.world > 1:
        seed_everything(seed + 1000 * dist.rank)
