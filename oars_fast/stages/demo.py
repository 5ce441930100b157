"""`oars-fast demo`: the embedded default, the pipeline on tiny models and bundled photos, on the CPU.

Stages run in order, each from its own YAML in ``configs/demo/`` and writing under ``runs/demo/``:

1. data:  demo patches from bundled photos; an LR | HR preview of the degradation;
2. base:  the tiny model's stand-in for a pretrained base (VAE autoencoder + bicubic-SR pre-training);
3. sft:   cold-start flow-matching SFT of the base on Real-ESRGAN-degraded patches;
4. rl fr: full-reference RL of a LoRA on the base (SSIM: classical stand-in for DISTS), NFT;
5. rl nr: no-reference RL continuing that LoRA (LR consistency: stand-in for COMPASS); its delta
   merged into the SFT model (``rl_nr/merged``);
6. infer: held-out patches degraded to LR (fixed seed) -> 40-step SR with the SFT model and with the
   merged OARS model; PSNR/SSIM of both and of bicubic vs HR, and a grid
   LR | bicubic | SFT | OARS | HR in ``runs/demo/grid.png``.

Stages not built yet are named and skipped, never faked. Overrides (``key=value``) apply to every
stage's config where the key exists (e.g. ``run.device=cuda``).
"""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import torch
import torch.nn.functional as F

from ..config import BaseJob, ConfigError, DataJob, InferJob, RLJob, SFTJob, load_config
from ..data.datasets import build_dataset
from ..data.images import load_image, make_grid, save_image, scan_images

log = logging.getLogger(__name__)

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "demo"
NOT_BUILT = [
    ("compass", "the COMPASS reward model (NR-RL uses a classical stand-in meanwhile)"),
    ("report", "metrics and report.html"),
]


def _load(cls: type, name: str, overrides: list[str]):
    """The stage's YAML plus those overrides whose section the job has."""
    sections = {f.name for f in dataclasses.fields(cls)}
    mine = [o for o in overrides if o.split("=", 1)[0].split(".")[0] in sections]
    return load_config(cls, CONFIGS / f"{name}.yaml", mine)


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(-10 * torch.log10((a.float() - b.float()).pow(2).mean().clamp_min(1e-12)))


def run(overrides: list[str] | None = None) -> int:
    from ..rewards.classical import ssim
    from . import base, data, infer, rl, sft

    overrides = list(overrides or [])
    print("oars-fast demo: the pipeline on tiny models, on the CPU (stand-ins are named as such)")
    try:
        jobs = {"data": _load(DataJob, "data", overrides), "base": _load(BaseJob, "base", overrides),
                "sft": _load(SFTJob, "sft", overrides), "rl_fr": _load(RLJob, "rl_fr", overrides),
                "rl_nr": _load(RLJob, "rl_nr", overrides), "infer": _load(InferJob, "infer", overrides)}
    except ConfigError as e:
        print(f"oars-fast demo: config error: {e}")
        return 2
    print("== 1/6 data")
    data.run(jobs["data"])
    print("== 2/6 base (stand-in for a pretrained base: tiny VAE + generic bicubic-SR pre-training)")
    base.run(jobs["base"])
    print("== 3/6 sft")
    sft.run(jobs["sft"])
    print("== 4/6 rl fr (LoRA on the base; reward: SSIM, a classical stand-in for DISTS)")
    rl.run(jobs["rl_fr"])
    print("== 5/6 rl nr (continues the LoRA; reward: LR consistency, a stand-in for COMPASS; merged into SFT)")
    rl.run(jobs["rl_nr"])
    print("== 6/6 infer (40 steps) on held-out patches: SFT model and merged OARS model")
    ij = jobs["infer"]
    lr_dir, sr_dir = Path(ij.infer.input), Path(ij.infer.output)
    merged = jobs["rl_nr"].run.run_dir / "merged"
    hr, lr, names = _held_out(jobs["sft"], lr_dir)
    infer.run(ij)
    oars_dir = sr_dir.with_name(sr_dir.name + "_oars")
    infer.run(dataclasses.replace(ij, infer=dataclasses.replace(ij.infer, checkpoint=str(merged),
                                                                output=str(oars_dir))))
    sr = torch.stack([load_image(sr_dir / f"{n}.png") for n in names])
    sr_oars = torch.stack([load_image(oars_dir / f"{n}.png") for n in names])
    bic = F.interpolate(lr, scale_factor=jobs["sft"].data.scale, mode="bicubic", align_corners=False).clamp(0, 1)
    grid = make_grid([list(row) for row in zip(lr[:6], bic[:6], sr[:6], sr_oars[:6], hr[:6])])
    save_image(grid, Path(ij.run.output_dir) / "grid.png")
    print(f"demo: held-out vs HR over {len(names)} patches (tiny CPU models; the point is the pipeline):")
    for name, img in (("bicubic", bic), ("SFT", sr), ("OARS (SFT + RL LoRA)", sr_oars)):
        print(f"demo:   {name:22s} PSNR {psnr(img, hr):6.2f} dB   SSIM {float(ssim(img, hr).mean()):.4f}")
    print(f"demo: outputs in {ij.run.output_dir}/ (base/, sft/, rl_fr/, rl_nr/, sr/, sr_oars/, "
          f"grid.png = LR | bicubic | SFT | OARS | HR)")
    for name, what in NOT_BUILT:
        print(f"demo: not built yet, skipped: {name} ({what})")
    return 0


def _held_out(job: SFTJob, lr_dir: Path) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Centre crops of the held-out demo patches and their LR (fixed-seed degradation), written to `lr_dir`."""
    from .sft import Degrader

    val = Path(build_dataset(job.data, job.run.seed).files[0]).parents[1] / "val"
    files = scan_images(val)
    c = job.data.crop_size
    hrs = []
    for f in files:
        img = load_image(f)
        y, x = (img.shape[-2] - c) // 2, (img.shape[-1] - c) // 2
        hrs.append(img[:, y:y + c, x:x + c])
    hr = torch.stack(hrs)
    lr = Degrader(job)(hr, torch.Generator().manual_seed(2024))
    names = [f.stem for f in files]
    for n, im in zip(names, lr):
        save_image(im, lr_dir / f"{n}.png")
    return hr, lr, names
