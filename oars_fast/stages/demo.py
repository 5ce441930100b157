"""`oars-fast demo`: the embedded default, the pipeline on tiny models and bundled photos, on the CPU.

Stages run in order, each from its own YAML in ``configs/demo/`` and writing under ``runs/demo/``:

1. data:  demo patches from bundled photos; an LR | HR preview of the degradation;
2. demo-base: the tiny model's stand-in for a pretrained base (VAE autoencoder + bicubic-SR pre-training);
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

from ..config import DataJob, DemoBaseJob, InferJob, RLJob, SFTJob, load_config, shipped_config
from ..data.build import build_dataset
from ..data.degrade import Degrader
from ..data.heldout import held_out
from ..data.images import load_image, make_grid, save_image
from ..evaluation import psnr, ssim
from . import data, demo_base, infer, rl, sft

log = logging.getLogger(__name__)

NOT_BUILT = [
    ("compass", "the COMPASS reward model (NR-RL uses a classical stand-in meanwhile)"),
    ("report", "metrics and report.html"),
]


def _load(cls: type, name: str, overrides: list[str]):
    """The stage's shipped YAML plus those overrides whose section the job has."""
    sections = {f.name for f in dataclasses.fields(cls)}
    mine = [o for o in overrides if o.split("=", 1)[0].split(".")[0] in sections]
    return load_config(cls, shipped_config(f"demo/{name}.yaml"), mine)


def run(overrides: list[str] | None = None) -> int:
    overrides = list(overrides or [])
    jobs = {"data": _load(DataJob, "data", overrides), "base": _load(DemoBaseJob, "base", overrides),
            "sft": _load(SFTJob, "sft", overrides), "rl_fr": _load(RLJob, "rl_fr", overrides),
            "rl_nr": _load(RLJob, "rl_nr", overrides), "infer": _load(InferJob, "infer", overrides)}
    log.info("oars-fast demo: the pipeline on tiny models, on the CPU (stand-ins are named as such)")
    log.info("== 1/6 data")
    data.run(jobs["data"])
    log.info("== 2/6 demo-base (stand-in for a pretrained base: tiny VAE + generic bicubic-SR pre-training)")
    demo_base.run(jobs["base"])
    log.info("== 3/6 sft")
    sft.run(jobs["sft"])
    log.info("== 4/6 rl fr (LoRA on the base; reward: SSIM, a classical stand-in for DISTS)")
    rl.run(jobs["rl_fr"])
    log.info("== 5/6 rl nr (continues the LoRA; reward: LR consistency, a stand-in for COMPASS; merged into SFT)")
    rl.run(jobs["rl_nr"])
    log.info("== 6/6 infer (40 steps) on held-out patches: SFT model and merged OARS model")
    ij = jobs["infer"]
    lr_dir, sr_dir = Path(ij.infer.input), Path(ij.infer.output)
    merged = jobs["rl_nr"].run.run_dir / "merged"
    sj = jobs["sft"]
    ho = held_out(sj.data, build_dataset(sj.data, sj.run.seed), Degrader(sj.degradation, sj.data.scale))
    for n, im in zip(ho.names, ho.lr):
        save_image(im, lr_dir / f"{n}.png")
    infer.run(ij)
    oars_dir = sr_dir.with_name(sr_dir.name + "_oars")
    infer.run(dataclasses.replace(ij, infer=dataclasses.replace(ij.infer, checkpoint=str(merged),
                                                                output=str(oars_dir))))
    hr, lr = ho.hr, ho.lr
    sr = torch.stack([load_image(sr_dir / f"{n}.png") for n in ho.names])
    sr_oars = torch.stack([load_image(oars_dir / f"{n}.png") for n in ho.names])
    bic = F.interpolate(lr, scale_factor=sj.data.scale, mode="bicubic", align_corners=False).clamp(0, 1)
    grid = make_grid([list(row) for row in zip(lr[:6], bic[:6], sr[:6], sr_oars[:6], hr[:6])])
    save_image(grid, Path(ij.run.output_dir) / "grid.png")
    lines = [f"demo: held-out vs HR over {len(ho.names)} patches (tiny CPU models; the point is the pipeline):"]
    for name, img in (("bicubic", bic), ("SFT", sr), ("OARS (SFT + RL LoRA)", sr_oars)):
        lines.append(f"demo:   {name:22s} PSNR {float(psnr(img, hr).mean()):6.2f} dB   "
                     f"SSIM {float(ssim(img, hr).mean()):.4f}")
    lines.append(f"demo: outputs in {ij.run.output_dir}/ (base/, sft/, rl_fr/, rl_nr/, sr/, sr_oars/, "
                 f"grid.png = LR | bicubic | SFT | OARS | HR)")
    lines += [f"demo: not built yet, skipped: {name} ({what})" for name, what in NOT_BUILT]
    print("\n".join(lines))
    return 0
