"""`oars-fast demo-base`: the demo's stand-in for a pretrained base checkpoint (tiny model only).

A randomly initialised model cannot stand in for a *pretrained* base: RL explores from the base,
and merging the RL delta into the SFT weights only means what it means at scale when SFT itself
started from that base. So the demo makes a small base first:

1. VAE: the tiny ``AutoencoderKLQwenImage`` learns to reconstruct HR crops (L1 + MSE, plus
   ``vae.kl_weight`` x the posterior KL, which the demo config sets to 1e-3; AdamW, warm-up then cosine
   decay) on many small random crops of the patches, which are decoded once and held in memory; its
   latent statistics are then measured and written to its config (``latents_mean`` /
   ``latents_std``), as the production VAE ships them.
2. Transformer: generic flow-matching pre-training on a clean task, 4x *bicubic* downsampling
   (``degradation.kind=bicubic``), through the same SFT loop.

Both parts run the VAE on :func:`~oars_fast.models.vae_fast.single_frame_convs`, the exact 2-D path of its
causal 3-D convolutions on single images (same weights, outputs and gradients; a third of the convolution work).

The result, ``runs/<name>/model/``, is what ``model.pretrained`` of the demo's SFT and RL configs
names. Production runs start from Qwen-Image-Edit-2509 instead and never run this stage.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time

import torch

from ..config import DemoBaseJob
from ..data.build import build_dataset
from ..data.datasets import CropDataset, reflect_pad_to
from ..data.images import ImageReadError, load_image
from ..errors import UserError
from ..models.backbone import SRBackbone, build_tiny
from ..models.vae_fast import single_frame_convs
from ..runtime.device import select_device
from ..runtime.seeding import derive_seed, seed_everything
from .runner import run_stage
from .sft import SFTStage

log = logging.getLogger(__name__)


class CropSampler:
    """Random HR crops (with flips) of a small image set held in memory: the demo's patches are decoded
    once instead of once per crop (PNG decoding was ~30% of a VAE step on the CPU)."""

    def __init__(self, dataset: CropDataset, crop: int, seed: int):
        self.images = []
        for i in range(len(dataset)):
            try:
                self.images.append(reflect_pad_to(load_image(dataset.paths(i)[-1]), crop, crop))
            except ImageReadError as e:
                log.warning("skipping unusable image: %s", e)
        if not self.images:
            raise UserError(f"demo-base: no usable image among the {len(dataset)} files of the data set")
        self.crop = crop
        self.gen = torch.Generator().manual_seed(seed)

    def __call__(self, n: int) -> torch.Tensor:
        c, g, out = self.crop, self.gen, []
        for i in torch.randint(0, len(self.images), (n,), generator=g).tolist():
            img = self.images[i]
            y = int(torch.randint(0, img.shape[-2] - c + 1, (1,), generator=g))
            x = int(torch.randint(0, img.shape[-1] - c + 1, (1,), generator=g))
            crop = img[:, y : y + c, x : x + c]
            flip = torch.rand(2, generator=g) < 0.5
            if flip[0]:
                crop = crop.flip(-1)
            if flip[1]:
                crop = crop.flip(-2)
            out.append(crop)
        return torch.stack(out)


def pretrain_vae(model: SRBackbone, job: DemoBaseJob, device: torch.device) -> list[float]:
    """Train the tiny VAE as an autoencoder; then set its latent normalisation from data."""
    vae = model.vae
    with single_frame_convs(vae):
        return _pretrain_vae(model, job, device)


def _pretrain_vae(model: SRBackbone, job: DemoBaseJob, device: torch.device) -> list[float]:
    cfg = job.vae
    vae = model.vae
    vae.requires_grad_(True).train()
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.lr, weight_decay=0.0)
    warm = max(1, cfg.steps // 40)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * s / cfg.steps))
    )
    data = dataclasses.replace(job.data, crop_size=cfg.crop_size)
    seed = derive_seed(job.run.seed, 7)
    crops = CropSampler(build_dataset(data, seed), cfg.crop_size, seed)
    losses = []
    t0 = time.perf_counter()
    for step in range(1, cfg.steps + 1):
        hr = crops(cfg.batch_size).to(device)
        x = (hr * 2 - 1).unsqueeze(2)
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample()).sample
        kl = 0.5 * (post.mean.pow(2) + post.var - 1.0 - post.logvar).mean()
        loss = (rec - x).abs().mean() + (rec - x).pow(2).mean() + cfg.kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        if step % max(1, cfg.steps // 10) == 0 or step == 1:
            log.info("base vae step %d loss %.4f (%.1f steps/s)", step, losses[-1], step / (time.perf_counter() - t0))
    vae.requires_grad_(False).eval()
    # latent statistics of the data set, as the production VAE's config carries them
    with torch.no_grad():
        zs = []
        for _ in range(8):
            hr = crops(cfg.batch_size).to(device)
            zs.append(vae.encode((hr * 2 - 1).unsqueeze(2)).latent_dist.mode()[:, :, 0])
        z = torch.cat(zs).transpose(0, 1).flatten(1)
        mean, std = z.mean(1), z.std(1).clamp_min(1e-3)
    vae.register_to_config(latents_mean=mean.tolist(), latents_std=std.tolist())
    model.latents_mean.copy_(mean.view(1, -1, 1, 1))
    model.latents_std.copy_(std.view(1, -1, 1, 1))
    return losses


class _PretrainSFT(SFTStage):
    """The SFT loop, with the VAE on its exact single-frame path for the latent pool and the sample grids."""

    def _latent_pool(self, n: int):
        with single_frame_convs(self.model.vae):
            return super()._latent_pool(n)

    def write_samples(self, steps: int | None = None):
        with single_frame_convs(self.model.vae):
            return super().write_samples(steps)


class DemoBaseStage:
    """1. the tiny VAE (in ``setup``, written to <run>/init), 2. generic pre-training of the transformer
    through the SFT loop (``train``), which exports <run>/model."""

    def __init__(self, job: DemoBaseJob):
        if job.model.pretrained is not None:
            raise UserError(
                "oars-fast demo-base builds the tiny demo base; model.pretrained must be null "
                "(production runs start from the real checkpoint and skip this stage)"
            )
        self.job = job
        self.sft: SFTStage | None = None
        self.vae_losses: list[float] = []

    def setup(self) -> DemoBaseStage:
        job = self.job
        device = select_device(job.run.device)
        seed_everything(job.run.seed)
        model = build_tiny(job.model, job.run.seed, job.data.scale).to(device)
        self.vae_losses = pretrain_vae(model, job, device)
        init_dir = job.run.run_dir / "init"
        model.save_pretrained(init_dir)
        log.info("demo-base: VAE reconstruction loss %.4f -> %.4f", self.vae_losses[0], self.vae_losses[-1])
        # generic transformer pre-training through the SFT loop, starting from the folder just written
        sft_job = dataclasses.replace(job, model=dataclasses.replace(job.model, pretrained=str(init_dir)))
        self.sft = _PretrainSFT(sft_job).setup()
        return self

    def train(self) -> list[float]:
        return self.sft.train()

    def save_checkpoint(self):
        return self.sft.save_checkpoint()

    def cleanup(self) -> None:
        if self.sft is not None:
            self.sft.cleanup()

    def summary(self) -> str:
        losses = self.sft.history
        return (
            f"demo-base: VAE reconstruction loss {self.vae_losses[0]:.4f} -> {self.vae_losses[-1]:.4f}; generic "
            f"pre-training loss {losses[0]:.4f} -> {losses[-1]:.4f}; base model in "
            f"{self.job.run.run_dir / 'model'}"
        )


def run(job: DemoBaseJob) -> int:
    return run_stage(DemoBaseStage(job))
