"""The held-out inputs every stage shows and measures: the same LR/HR pairs for SFT sample grids, the
RL evaluation, the demo's final table and the report.

* ``demo``: the demo set's ``val/`` patches (every 8th patch, never trained on);
* ``hr`` / ``paired`` / ``lq``: the first files of the data set.

Each image is centre-cropped to ``data.crop_size`` (HR side; LR side for LQ) and, when the data set
has no LR, degraded with per-image seeds that depend on the image's position alone (not on the run
seed), so stages with different seeds see identical held-out LR.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import DataConfig
from ..runtime.seeding import derive_seeds
from .datasets import CropDataset, reflect_pad_to
from .degrade import Degrader
from .demo import demo_dataset_dir
from .images import ImageReadError, load_image, scan_images

HELD_OUT_SEED = 20250101  # the degradation of held-out image i is seeded by derive_seeds([i], HELD_OUT_SEED)


@dataclass
class HeldOut:
    lr: torch.Tensor  # (N, 3, c/scale, c/scale)
    hr: torch.Tensor | None  # (N, 3, c, c), None for LQ inputs
    names: list[str]  # file stems


def held_out_files(cfg: DataConfig, dataset: CropDataset) -> list[tuple[Path, ...]]:
    """The held-out files, in the data set's key order (``demo``: its val/ patches)."""
    if cfg.source == "demo":
        return [(p,) for p in scan_images(demo_dataset_dir(cfg.demo_cache, cfg.demo_patch) / "val")]
    return [dataset.paths(i) for i in range(len(dataset))]


def centre_crop(img: torch.Tensor, side: int) -> torch.Tensor:
    img = reflect_pad_to(img, side, side)
    y, x = (img.shape[-2] - side) // 2, (img.shape[-1] - side) // 2
    return img[:, y:y + side, x:x + side]


def held_out(cfg: DataConfig, dataset: CropDataset, degrade: Degrader, n: int | None = None,
             device: torch.device | str = "cpu") -> HeldOut:
    """Up to `n` held-out LR (and HR) crops on `device` (unreadable files skipped)."""
    keys = ("hr",) if cfg.source == "demo" else dataset.keys
    c, s = cfg.crop_size, cfg.scale
    lrs, hrs, names = [], [], []
    for paths in held_out_files(cfg, dataset):
        if n is not None and len(names) >= n:
            break
        try:
            imgs = dict(zip(keys, (load_image(p) for p in paths)))
        except ImageReadError:
            continue
        if "lr" in imgs:  # LR crop at the centre; the HR crop aligned with it
            side = c // s
            lr = reflect_pad_to(imgs["lr"], side, side)
            y, x = (lr.shape[-2] - side) // 2, (lr.shape[-1] - side) // 2
            lrs.append(lr[:, y:y + side, x:x + side])
            if "hr" in imgs:
                hr = reflect_pad_to(imgs["hr"], lr.shape[-2] * s, lr.shape[-1] * s)
                hrs.append(hr[:, y * s:(y + side) * s, x * s:(x + side) * s])
        else:
            hrs.append(centre_crop(imgs["hr"], c))
        names.append(paths[-1].stem)
    if not names:
        raise ImageReadError(f"no readable held-out image for data.source={cfg.source!r}")
    hr = torch.stack(hrs).to(device) if hrs else None
    if lrs:
        lr = torch.stack(lrs).to(device)
    else:
        lr = degrade(hr, seeds=derive_seeds(range(len(names)), HELD_OUT_SEED))
    return HeldOut(lr, hr, names)
