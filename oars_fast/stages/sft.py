"""Cold-start flow-matching SFT: teach the backbone LR -> HR.

Algorithm, per optimizer step (``grad_accum`` micro-batches):

1. data: HR crops (LR made on device by the Real-ESRGAN degradation) or real LR/HR pairs;
2. encode: ``x0 = VAE(HR)``, ``cond = VAE(bicubic_x4(LR))`` (frozen VAE, no grad), on the fly, or
   once for a fixed pool of samples (``sft.latent_pool``: small CPU runs, where the VAE dominates);
3. noise: ``t`` from the configured sampling (uniform / logit-normal / shifted), ``eps ~ N(0, I)``,
   ``x_t = (1 - t) x0 + t eps``;
4. loss: ``|| (eps - x0) - v_theta(x_t, t | cond, prompt) ||^2``, backward;
5. step: grad clipping, AdamW, LR schedule, optional EMA; a NaN/inf loss skips the step (logged).

Full-parameter (``sft.train=full``) or LoRA (``sft.train=lora``, settings in ``lora:``) training.
Mixed precision: float32 master weights, compute under autocast in ``model.dtype``.

Outputs in ``runs/<name>/``: ``config.yaml``, ``logs/sft.jsonl`` + TensorBoard, ``samples/`` (LR | SR
| HR grids), ``checkpoints/step_N/`` (trainable weights as safetensors + training state, written
atomically), and at the end ``model/``: a diffusers-loadable folder (EMA weights when enabled,
LoRA merged in LoRA mode, the adapter alone also in ``model/lora/`` in peft's layout). ``--resume`` continues from the newest complete checkpoint with the
RNG, data position, optimizer, schedule and EMA restored (the same losses as an uninterrupted run).

Launch:

* 1 CPU (tiny model):  ``oars-fast sft --config configs/demo/sft.yaml``
* 1 GPU:               ``oars-fast sft --config configs/qwen_image_edit/sft.yaml``
* N GPUs:              DeepSpeed ZeRO is the scale-out issue; this stage runs one process.
"""
from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from ..config import SFTJob, per_rank
from ..data.datasets import ShardedLoader, build_dataset
from ..data.degrade import RealESRGANDegradation
from ..data.images import load_image, make_grid, save_image, scan_images
from ..models.backbone import DTYPES, SRBackbone, load_backbone
from ..models.flow import flow_matching_loss, sample_timesteps
from ..models.lora import add_lora, merged_state_dict, save_lora, use_fused_lora
from ..models.sampler import _autocast, sample_sr
from ..runtime import checkpoint as ckpt
from ..runtime.common import EMA, build_optimizer, loop_state, memory_gib, restore_loop_state, start_run
from ..runtime.logger import StepLogger

log = logging.getLogger(__name__)


class Degrader:
    """HR batch -> LR batch on the HR's device: Real-ESRGAN chain or plain bicubic."""

    def __init__(self, job: SFTJob):
        self.kind, self.scale = job.degradation.kind, job.data.scale
        self.deg = RealESRGANDegradation(job.degradation, job.data.scale)

    def __call__(self, hr: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        if self.kind == "bicubic":
            lr = F.interpolate(hr, scale_factor=1 / self.scale, mode="bicubic", align_corners=False, antialias=True)
            return (lr.clamp(0, 1) * 255).round() / 255
        return self.deg(hr, generator=generator)


class SFTStage:
    def __init__(self, job: SFTJob):
        self.job = job
        self.step = 0
        self.losses: list[float] = []

    # ------------------------------------------------------------------------------------------
    def setup(self) -> "SFTStage":
        job = self.job
        self.device, self.run_dir = start_run(job)
        self.autocast_dtype = DTYPES[job.model.dtype]
        self.model: SRBackbone = load_backbone(job.model, job.data.scale, self.device, job.run.seed, train_dtype=True)
        tr = self.model.transformer
        if job.sft.train == "lora":
            tr.requires_grad_(False)
            add_lora(tr, job.lora)
            if job.lora.fused:
                use_fused_lora(tr)
        else:
            tr.requires_grad_(True)
        tr.train()
        self.params = {n: p for n, p in tr.named_parameters() if p.requires_grad}
        self.opt, self.sched = build_optimizer(self.params.values(), job.optim, job.sft.steps)
        self.ema = EMA(self.params, job.sft.ema_decay) if job.sft.ema_decay > 0 else None
        self.micro = per_rank(job.data.batch_size, 1, job.optim.grad_accum, "data.batch_size")
        self.dataset = build_dataset(job.data, job.run.seed)
        self.loader = ShardedLoader(self.dataset, self.micro, job.run.seed, num_workers=job.data.num_workers)
        self.degrade = Degrader(job)
        self.gen_deg = torch.Generator(self.device).manual_seed(job.run.seed + 1)
        self.gen_noise = torch.Generator(self.device).manual_seed(job.run.seed + 2)
        self.logger = StepLogger(self.run_dir, "sft")
        self.probe = self._probe_batch()
        self.pool = self._latent_pool(job.sft.latent_pool) if job.sft.latent_pool else None
        if job.run.resume:
            self._resume()
        self._iter = iter(self.loader)
        n_train = sum(p.numel() for p in self.params.values())
        log.info("sft: %s training, %.2fM trainable parameters, micro-batch %d x accum %d, device %s, dtype %s",
                 job.sft.train, n_train / 1e6, self.micro, job.optim.grad_accum, self.device, job.model.dtype)
        return self

    def _probe_batch(self) -> dict:
        """A fixed LR/HR batch for sample grids: held-out demo patches or the first images of the set."""
        job = self.job
        c = job.data.crop_size
        if job.data.source == "demo":
            files = scan_images(Path(self.dataset.files[0]).parents[1] / "val")[:4]
        elif job.data.source == "paired":
            files = [hr for _, hr in self.dataset.files[:4]]
        else:
            files = list(self.dataset.files[:4])
        hrs = []
        for f in files:
            try:
                img = load_image(f)
            except OSError:
                continue
            if img.shape[-2] >= c and img.shape[-1] >= c:
                hrs.append(img[:, :c, :c])
        if not hrs or job.data.source == "lq":
            return {}
        hr = torch.stack(hrs).to(self.device)
        lr = self.degrade(hr, torch.Generator(self.device).manual_seed(12345))
        return {"hr": hr, "lr": lr}

    @torch.no_grad()
    def _latent_pool(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode `n` samples once (own loader and generator, so the pool depends on the seed alone)."""
        seed = self.job.run.seed + 11
        loader = iter(ShardedLoader(self.dataset, self.micro, seed))
        gen = torch.Generator(self.device).manual_seed(seed)
        xs, cs = [], []
        while sum(len(x) for x in xs) < n:
            batch = next(loader)
            hr = batch["hr"].to(self.device)
            lr = batch["lr"].to(self.device) if "lr" in batch else self.degrade(hr, gen)
            xs.append(self.model.encode(hr))
            cs.append(self.model.encode_lr(lr))
        log.info("sft: latent pool of %d samples encoded once", n)
        return torch.cat(xs)[:n], torch.cat(cs)[:n]

    # ------------------------------------------------------------------------------------------
    def _micro_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(x0, cond) latents of one micro-batch."""
        if self.pool is not None:
            idx = torch.randint(0, len(self.pool[0]), (self.micro,), generator=self.gen_noise, device=self.device)
            return self.pool[0][idx], self.pool[1][idx]
        batch = next(self._iter)
        hr = batch["hr"].to(self.device, non_blocking=True)
        lr = batch["lr"].to(self.device) if "lr" in batch else self.degrade(hr, self.gen_deg)
        with torch.no_grad():
            return self.model.encode(hr), self.model.encode_lr(lr)

    def train_step(self) -> dict:
        job = self.job
        t0 = time.perf_counter()
        t_data = t_fwd = 0.0
        total = 0.0
        for _ in range(job.optim.grad_accum):
            td = time.perf_counter()
            x0, cond = self._micro_batch()
            t_data += time.perf_counter() - td
            seq = (x0.shape[-2] // 2) * (x0.shape[-1] // 2)
            t = sample_timesteps(x0.shape[0], job.sft.timestep_sampling, self.gen_noise, seq, job.sft.logit_mean,
                                 job.sft.logit_std, job.sampler)
            eps = torch.randn(x0.shape, generator=self.gen_noise, device=self.device)
            tf = time.perf_counter()
            with _autocast(self.device, self.autocast_dtype):
                loss, _ = flow_matching_loss(self.model, x0, cond, t, eps)
            (loss / job.optim.grad_accum).backward()
            t_fwd += time.perf_counter() - tf
            total += float(loss.detach()) / job.optim.grad_accum
        params = list(self.params.values())
        clip = job.optim.grad_clip if job.optim.grad_clip > 0 else float("inf")
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, clip))
        skipped = not (math.isfinite(total) and math.isfinite(grad_norm))
        if skipped:
            log.warning("sft step %d: non-finite loss %.4g / grad norm %.4g: step skipped", self.step + 1, total,
                        grad_norm)
        else:
            self.opt.step()
            if self.ema is not None:
                self.ema.update(self.params)
        self.opt.zero_grad(set_to_none=True)
        lr_now = self.sched.get_last_lr()[0]
        self.sched.step()
        self.step += 1
        dt = time.perf_counter() - t0
        return {"loss": total, "grad_norm": grad_norm, "lr": lr_now, "samples/s": job.data.batch_size / dt,
                "step_s": dt, "data_s": t_data, "train_s": t_fwd, "mem_GiB": memory_gib(self.device),
                "skipped": int(skipped)}

    def train(self, until: int | None = None) -> list[float]:
        """Run to `sft.steps` (or stop after step `until`: an interruption, for tests). Returns the losses."""
        job = self.job
        end = min(job.sft.steps, until) if until is not None else job.sft.steps
        from tqdm import tqdm

        bar = tqdm(total=end, initial=self.step, desc="sft", disable=None, leave=False)
        while self.step < end:
            stats = self.train_step()
            self.losses.append(stats["loss"])
            bar.update(1)
            if job.sft.log_every and (self.step % job.sft.log_every == 0 or self.step == 1):
                self.logger.step(self.step, stats, {"lr": ".3g", "samples/s": ".2f", "step_s": ".3f",
                                                    "data_s": ".3f", "train_s": ".3f", "mem_GiB": ".2f"})
            if job.sft.sample_every and self.step % job.sft.sample_every == 0:
                self.write_samples()
            if (job.sft.save_every and self.step % job.sft.save_every == 0) or self.step == job.sft.steps:
                self.save_checkpoint()
        bar.close()
        if self.step >= job.sft.steps:
            self.export(self.run_dir / "model")
        return self.losses

    # ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def write_samples(self, steps: int | None = None) -> Path | None:
        if not self.probe:
            return None
        tr = self.model.transformer
        tr.eval()
        sr = sample_sr(self.model, self.probe["lr"], self.job.sampler, seeds=list(range(len(self.probe["lr"]))),
                       autocast_dtype=self.autocast_dtype, steps=steps)
        tr.train()
        grid = make_grid([[lr, s, hr] for lr, s, hr in zip(self.probe["lr"], sr, self.probe["hr"])])
        path = self.run_dir / "samples" / f"sft_step_{self.step:06d}.png"
        save_image(grid, path)
        self.logger.image("lr_sr_hr", grid, self.step)
        return path

    def _generators(self) -> dict[str, torch.Generator]:
        return {"deg": self.gen_deg, "noise": self.gen_noise}

    def _trainable_state(self) -> dict[str, torch.Tensor]:
        return {k: p.detach().float().cpu().contiguous() for k, p in self.params.items()}

    def save_checkpoint(self) -> Path:
        state = loop_state(self.step, self.opt, self.sched, self.loader, self._generators(),
                           ema=self.ema.state_dict() if self.ema else None, losses=self.losses)
        return ckpt.save_checkpoint(self.run_dir / "checkpoints", self.step,
                                    lambda d: save_file(self._trainable_state(), str(d / "trainable.safetensors")),
                                    state, keep=self.job.sft.keep_checkpoints)

    def _resume(self) -> None:
        folder = ckpt.latest_checkpoint(self.run_dir / "checkpoints")
        if folder is None:
            log.warning("resume asked but no complete checkpoint in %s: starting fresh", self.run_dir / "checkpoints")
            return
        weights = load_file(str(folder / "trainable.safetensors"))
        missing = set(self.params) - set(weights)
        if missing:
            raise RuntimeError(f"checkpoint {folder} lacks {len(missing)} trainable tensors (e.g. {sorted(missing)[:3]}); "
                               f"was it written with another sft.train / lora setting?")
        with torch.no_grad():
            for k, p in self.params.items():
                p.copy_(weights[k].to(p.device, p.dtype))
        state = ckpt.load_state(folder)
        self.step = restore_loop_state(state, self.opt, self.sched, self.loader, self._generators())
        if self.ema is not None and state.get("ema"):
            self.ema.load_state_dict(state["ema"])
        self.losses = list(state.get("losses", []))
        log.info("resumed from %s (step %d)", folder, self.step)

    def export(self, path: Path) -> Path:
        """Write the trained model as a diffusers-loadable folder (EMA weights if enabled; LoRA merged)."""
        tr = self.model.transformer
        backup = None
        if self.ema is not None:
            backup = self._trainable_state()
            with torch.no_grad():
                for k, p in self.params.items():
                    p.copy_(self.ema.shadow[k].to(p.device, p.dtype))
        state = merged_state_dict(tr) if self.job.sft.train == "lora" else None
        tmp = path.with_name(path.name + ".tmp")
        if state is not None:
            from diffusers import QwenImageTransformer2DModel

            plain = QwenImageTransformer2DModel.from_config(tr.config)
            plain.load_state_dict(state)
            SRBackbone(plain, self.model.vae, self._prompt(), self.model.scale).save_pretrained(tmp)
        else:
            self.model.save_pretrained(tmp)
        if self.job.sft.train == "lora":
            save_lora(tr, tmp / "lora")
        if backup is not None:
            with torch.no_grad():
                for k, p in self.params.items():
                    p.copy_(backup[k].to(p.device, p.dtype))
        import shutil

        shutil.rmtree(path, ignore_errors=True)
        tmp.rename(path)
        log.info("model exported to %s", path)
        return path

    def _prompt(self):
        from ..models.backbone import PromptEmbedding

        return PromptEmbedding(self.model.prompt_embeds.cpu(), self.model.prompt_mask.cpu())

    def cleanup(self) -> None:
        self.logger.close()


def train_to_end(job: SFTJob) -> list[float]:
    """Set up, train to the configured steps, write a final sample grid, clean up; the losses."""
    stage = SFTStage(job).setup()
    try:
        losses = stage.train()
        stage.write_samples()
    finally:
        stage.cleanup()
    return losses


def run(job: SFTJob) -> int:
    losses = train_to_end(job)
    print(f"sft: {len(losses)} steps, loss {losses[0]:.4f} -> {losses[-1]:.4f}; model in {job.run.run_dir / 'model'}")
    return 0
