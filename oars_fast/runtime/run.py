"""The opening every training stage shares: process group, device, seed, run folder."""
from __future__ import annotations

from pathlib import Path

import torch

from ..config import save_config
from .distributed import Dist, barrier, init
from .engine import use_deepspeed
from .seeding import seed_everything


def start_run(job, ds_cfg=None) -> tuple[Dist, torch.device, Path]:
    """Process group, device, the shared seed (model and LoRA initialisation; :func:`~.seeding.seed_rank`
    gives each rank its own stream once set-up is done), run folder and resolved config (rank 0)."""
    dist, device = init(job.run.device, need_group=ds_cfg is not None and use_deepspeed(ds_cfg))
    seed_everything(job.run.seed)  # the same on every rank: model and LoRA initialisation agree
    run_dir = job.run.run_dir
    if dist.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(job, run_dir / "config.yaml")
    barrier()
    return dist, device, run_dir
