"""The data set and the loader a config names."""
from __future__ import annotations

import logging

import torch

from ..config import DataConfig
from .dali import DALILoader, dali_unavailable
from .datasets import CropDataset, HRDataset, LQDataset, PairedDataset, match_pairs
from .demo import demo_dataset_dir
from .images import scan_images
from .loader import ShardedLoader

log = logging.getLogger(__name__)


def build_dataset(cfg: DataConfig, seed: int) -> CropDataset:
    """The data set named by `cfg.source` (the demo set is built on first use)."""
    if cfg.source == "demo":
        return HRDataset(scan_images(demo_dataset_dir(cfg.demo_cache, cfg.demo_patch) / "train"), cfg, seed)
    if cfg.source == "hr":
        return HRDataset(scan_images(cfg.hr_dir), cfg, seed)
    if cfg.source == "paired":
        return PairedDataset(match_pairs(cfg.lr_dir, cfg.hr_dir), cfg, seed)
    return LQDataset(scan_images(cfg.lq_dir), cfg, seed)


def build_loader(dataset: CropDataset, cfg: DataConfig, micro_batch: int, seed: int, rank: int = 0,
                 world: int = 1, device: torch.device | str | None = None):
    """The loader named by ``cfg.loader``: :class:`ShardedLoader` (torch) or the DALI pipeline (decoding
    on `device` when it is a GPU, on the CPU otherwise), which falls back to the torch loader, saying
    why, when DALI is not installed."""
    if cfg.loader == "dali":
        why = dali_unavailable()
        if why is None:
            device = torch.device(device) if device is not None else torch.device("cpu")
            gpu = device.index if device.index is not None else 0
            return DALILoader(dataset, micro_batch, seed, rank, world, num_threads=max(1, cfg.num_workers),
                              device_id=gpu if device.type == "cuda" else None)
        log.warning("data.loader=dali: %s; using the torch loader instead", why)
    return ShardedLoader(dataset, micro_batch, seed, rank, world, num_workers=cfg.num_workers)
