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
Mixed precision: float32 master weights, compute under autocast in ``model.dtype`` (DeepSpeed bf16:
module in bf16, float32 master weights in the optimizer).

Scale-out: with more than one process (``deepspeed`` launcher or ``torchrun``) the optimizer side is a
DeepSpeed ZeRO engine (``deepspeed.zero_stage``: 3 for full-parameter training of the 20B transformer,
2 for LoRA), see :mod:`oars_fast.runtime.engine`. Rank ``k`` of ``W`` reads global batch positions
``k, k + W, ...``; every random draw after loading (degradation, ``t``, ``eps``) is seeded per
sample, so N processes take the same steps as one process on the same global batch (the tests
check the per-step losses). Rank 0 alone writes logs, grids and the exported model; every rank
writes its DeepSpeed shards into the checkpoint. With ZeRO-3 the EMA is kept per rank on the
rank's parameter partition and gathered only for the export.

Outputs in ``runs/<name>/``: ``config.yaml``, ``logs/sft.jsonl`` + TensorBoard, ``samples/`` (LR | SR
| HR grids), ``checkpoints/step_N/`` (trainable weights as safetensors, DeepSpeed shards, training
state, written atomically), and at the end ``model/``: a diffusers-loadable folder (EMA weights when
enabled, LoRA merged in LoRA mode, the adapter alone also in ``model/lora/`` in peft's layout).
``--resume`` continues from the newest complete checkpoint with the RNG, data position, optimizer,
schedule and EMA restored (the same losses as an uninterrupted run).

Launch:

* 1 CPU (tiny model):  ``oars-fast sft --config configs/demo/sft.yaml``
* 1 GPU:               ``oars-fast sft --config configs/qwen_image_edit/sft.yaml deepspeed.enabled=on
  deepspeed.offload_optimizer=true deepspeed.offload_param=true data.batch_size=8 optim.grad_accum=1``
  (20B parameters with AdamW state do not fit one GPU without ZeRO-3 offload)
* N GPUs:              ``deepspeed --num_gpus 8 --module oars_fast.cli sft --config configs/qwen_image_edit/sft.yaml``
* N nodes:             the same with ``--hostfile HOSTS`` (the run folder must be on a shared file system)
"""
from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import torch
from diffusers import QwenImageTransformer2DModel
from safetensors.torch import load_file

from ..config import SFTJob, per_rank
from ..data.build import build_dataset, build_loader
from ..data.degrade import Degrader
from ..data.heldout import held_out
from ..data.images import make_grid, save_image
from ..data.loader import ShardedLoader
from ..errors import UserError
from ..models.backbone import DTYPES, Condition, SRBackbone, load_backbone
from ..models.flow import flow_matching_loss, sample_timesteps
from ..models.lora import add_lora, merged_state_dict, save_lora, use_lora_kernel
from ..models.sampler import per_sample_noise, sample_sr
from ..runtime import distributed
from ..runtime.checkpoint import publish_folder
from ..runtime.device import autocast, memory_gib
from ..runtime.engine import OptimizerEngine, deepspeed_bf16, use_deepspeed
from ..runtime.logger import StepLogger
from ..runtime.optim import EMA
from ..runtime.run import start_run
from ..runtime.seeding import derive_seed, derive_seeds, seed_rank
from .runner import TrainingLoop, run_stage

log = logging.getLogger(__name__)

# derive_seeds tags: each random draw of a step from its own stream
_DEGRADE, _TIME, _NOISE, _POOL = 0, 1, 2, 3


def per_sample_timesteps(seeds: list[int], job: SFTJob, seq_len: int, device: torch.device) -> torch.Tensor:
    """One training time per sample, each drawn from the sample's own seed."""
    sft = job.sft
    return torch.cat([sample_timesteps(1, sft.timestep_sampling, torch.Generator().manual_seed(int(sd)), seq_len,
                                       sft.logit_mean, sft.logit_std, job.sampler) for sd in seeds]).to(device)


class SFTStage(TrainingLoop):
    name = "sft"
    log_format = {"lr": ".3g", "samples/s": ".2f", "step_s": ".3f", "data_s": ".3f", "train_s": ".3f",
                  "mem_GiB": ".2f"}

    def __init__(self, job: SFTJob):
        self.job = job
        self.step = 0
        self.history: list[float] = []  # the loss of every step

    @property
    def losses(self) -> list[float]:
        return self.history

    @property
    def total_steps(self) -> int:
        return self.job.sft.steps

    def cadence(self) -> tuple[int, int]:
        return self.job.sft.log_every, self.job.sft.save_every

    # ------------------------------------------------------------------------------------------
    def setup(self) -> SFTStage:
        job = self.job
        self.dist, self.device, self.run_dir = start_run(job, job.deepspeed)
        self.autocast_dtype = DTYPES[job.model.dtype]
        ds = job.deepspeed
        zero3 = use_deepspeed(ds) and ds.zero_stage == 3
        self.model: SRBackbone = load_backbone(job.model, job.data.scale, self.device, job.run.seed,
                                               # float32 master weights unless DeepSpeed bf16 holds them or
                                               # the transformer is a frozen LoRA base
                                               train_dtype=job.sft.train == "full"
                                               and not deepspeed_bf16(ds, job.model.dtype, self.device),
                                               transformer_on_cpu=zero3)
        tr = self.model.transformer
        if job.sft.train == "lora":
            tr.requires_grad_(False)
            add_lora(tr, job.lora)
            use_lora_kernel(tr, job.lora.kernel)
        else:
            tr.requires_grad_(True)
        tr.train()
        self.params = {n: p for n, p in tr.named_parameters() if p.requires_grad}
        d = self.dist
        self.micro = per_rank(job.data.batch_size, d.world, job.optim.grad_accum, "data.batch_size")
        self.engine = OptimizerEngine(tr, self.params, optim=job.optim, total_steps=job.sft.steps, ds=job.deepspeed,
                                      dist=d, device=self.device, micro_batch=self.micro,
                                      grad_accum=job.optim.grad_accum, model_dtype=job.model.dtype)
        self.ema = EMA(self._local_params(), job.sft.ema_decay) if job.sft.ema_decay > 0 else None
        self.dataset = build_dataset(job.data, job.run.seed)
        self.loader = build_loader(self.dataset, job.data, self.micro, job.run.seed, d.rank, d.world,
                                   self.device)
        self.degrade = Degrader(job.degradation, job.data.scale)
        # the latent pool's draws are shared by all ranks (each takes its positions of the global batch)
        self.gen_pool = torch.Generator().manual_seed(derive_seed(job.run.seed, _POOL))
        self.logger = StepLogger(self.run_dir, "sft", enabled=d.main, interval=job.run.log_interval)
        self.probe = held_out(job.data, self.dataset, self.degrade, 4, self.device)  # the sample grids' inputs
        self.pool = self._latent_pool(job.sft.latent_pool) if job.sft.latent_pool else None
        seed_rank(job.run.seed, self.dist)  # before a resume, which restores each rank's own RNG
        if job.run.resume:
            self._resume()
        self._iter = iter(self.loader)
        n_train = sum(getattr(p, "ds_numel", p.numel()) for p in self.params.values())
        log.info("sft: %s training, %.2fM trainable parameters, micro-batch %d x accum %d x %d rank(s), device %s, "
                 "dtype %s", job.sft.train, n_train / 1e6, self.micro, job.optim.grad_accum, d.world, self.device,
                 job.model.dtype)
        return self

    def _local_params(self) -> dict[str, torch.Tensor]:
        """What this rank holds of each trainable tensor (ZeRO-3: its partition), for the EMA."""
        return {k: self.engine.local_tensor(p) for k, p in self.params.items()}

    @torch.no_grad()
    def _latent_pool(self, n: int) -> tuple[torch.Tensor, Condition]:
        """Encode `n` samples once (own loader and generator, so the pool depends on the seed alone)."""
        loader = iter(ShardedLoader(self.dataset, self.micro, derive_seed(self.job.run.seed, _POOL, 1)))
        xs, cs = [], []
        while sum(len(x) for x in xs) < n:
            batch = next(loader)
            hr = batch["hr"].to(self.device)
            lr = batch["lr"].to(self.device) if "lr" in batch else \
                self.degrade(hr, seeds=derive_seeds(batch["seed"].tolist(), _DEGRADE))
            xs.append(self.model.encode(hr))
            cs.append(self.model.condition(lr))
        log.info("sft: latent pool of %d samples encoded once", n)
        return torch.cat(xs)[:n], Condition.cat(cs)[:n]

    # ------------------------------------------------------------------------------------------
    def _micro_batch(self) -> tuple[torch.Tensor, Condition, list[int]]:
        """(x0 latents, condition) of this rank's part of one micro-batch, and one seed per sample. The
        condition (LR latents and, edit, the prompt with the image) is computed once per sample."""
        if self.pool is not None:
            d, n = self.dist, self.micro * self.dist.world
            idx = torch.randint(0, len(self.pool[0]), (n,), generator=self.gen_pool)[d.rank::d.world]
            seeds = torch.randint(0, 2**62, (n,), generator=self.gen_pool)[d.rank::d.world].tolist()
            idx = idx.to(self.device)
            return self.pool[0][idx], self.pool[1][idx], seeds
        batch = next(self._iter)
        seeds = batch["seed"].tolist()
        hr = batch["hr"].to(self.device, non_blocking=True)
        lr = batch["lr"].to(self.device) if "lr" in batch else self.degrade(hr, seeds=derive_seeds(seeds, _DEGRADE))
        with torch.no_grad():
            return self.model.encode(hr), self.model.condition(lr), seeds

    def train_step(self) -> dict:
        job = self.job
        t0 = time.perf_counter()
        t_data = t_fwd = 0.0
        total = 0.0
        accum = job.optim.grad_accum
        for a in range(accum):
            td = time.perf_counter()
            x0, cond, seeds = self._micro_batch()
            t_data += time.perf_counter() - td
            seq = (x0.shape[-2] // 2) * (x0.shape[-1] // 2)
            step_seeds = derive_seeds(seeds, self.step)  # pool samples recur: fresh draws every step
            t = per_sample_timesteps(derive_seeds(step_seeds, _TIME), job, seq, self.device)
            eps = per_sample_noise(tuple(x0.shape[1:]), derive_seeds(step_seeds, _NOISE), self.device)
            tf = time.perf_counter()
            with autocast(self.device, self.autocast_dtype):
                loss = flow_matching_loss(self.model, x0, cond, t, eps)
            self.engine.backward(loss / accum, last=a == accum - 1)
            t_fwd += time.perf_counter() - tf
            total += float(loss.detach()) / accum
        total = float(distributed.all_reduce(torch.tensor([total], dtype=torch.float64, device=self.device)))
        total /= self.dist.world
        lr_now = self.engine.lr
        grad_norm, stepped = self.engine.step()
        skipped = not (stepped and math.isfinite(total))
        if skipped:
            log.warning("sft step %d: non-finite loss %.4g / grad norm %.4g: step skipped", self.step + 1, total,
                        grad_norm)
        elif self.ema is not None:
            self.ema.update(self._local_params())
        self.step += 1
        self.history.append(total)
        dt = time.perf_counter() - t0
        return {"loss": total, "grad_norm": grad_norm, "lr": lr_now, "samples/s": job.data.batch_size / dt,
                "step_s": dt, "data_s": t_data, "train_s": t_fwd, "mem_GiB": memory_gib(self.device),
                "nonfinite": int(skipped)}

    def after_step(self, stats: dict) -> None:
        if self.job.sft.sample_every and self.step % self.job.sft.sample_every == 0:
            self.write_samples()

    # ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def write_samples(self, steps: int | None = None) -> Path:
        """LR | SR | HR of the held-out probe inputs -> samples/sft_step_N.png (rank 0 writes)."""
        lr, hr = self.probe.lr, self.probe.hr
        tr = self.model.transformer
        tr.eval()
        sr = sample_sr(self.model, lr, self.job.sampler, seeds=list(range(len(lr))),
                       autocast_dtype=self.autocast_dtype, steps=steps)
        tr.train()
        grid = make_grid([list(row) for row in zip(lr, sr, hr)])
        path = self.run_dir / "samples" / f"sft_step_{self.step:06d}.png"
        if not self.dist.main:  # every rank samples (ZeRO-3 forwards are collective); rank 0 writes
            return path
        save_image(grid, path)
        self.logger.image("lr_sr_hr", grid, self.step)
        return path

    def save_checkpoint(self) -> Path:
        """Every rank calls: DeepSpeed shards + per-rank RNG/EMA; rank 0: consolidated weights + state."""
        zero3_ema = self.ema is not None and self.engine.zero3  # the EMA is per rank (its partition)
        state = {"step": self.step, "loader": self.loader.state_dict(), "pool_generator": self.gen_pool.get_state(),
                 "losses": self.history,
                 "ema": self.ema.state_dict() if self.ema is not None and not zero3_ema else None}
        # the consolidated weights, ZeRO-3: gathered (collective), kept on rank 0
        return self.engine.save_checkpoint(self.run_dir / "checkpoints", self.step, self.engine.full_state,
                                            "trainable.safetensors",
                                            state, self.job.sft.keep_checkpoints,
                                            rank_extra={"ema": self.ema.state_dict() if zero3_ema else None})

    def _resume(self) -> None:
        opened = self.engine.open_checkpoint(self.run_dir / "checkpoints", "trainable.safetensors")
        if opened is None:
            return
        folder, state, mine = opened
        if not self.engine.deepspeed:  # DeepSpeed restored the module weights with its optimizer state
            weights = load_file(str(folder / "trainable.safetensors"))
            missing = set(self.params) - set(weights)
            if missing:
                raise UserError(f"checkpoint {folder} lacks {len(missing)} trainable tensors (e.g. "
                                   f"{sorted(missing)[:3]}); was it written with another sft.train / lora setting?")
            with torch.no_grad():
                for k, p in self.params.items():
                    p.copy_(weights[k].to(p.device, p.dtype))
        self.step = int(state["step"])
        self.loader.load_state_dict(state["loader"])
        self.gen_pool.set_state(state["pool_generator"])
        if self.ema is not None:
            ema_state = mine.get("ema") if self.engine.zero3 else state.get("ema")
            if ema_state:
                self.ema.load_state_dict(ema_state)
        self.history = list(state.get("losses", []))
        log.info("resumed from %s (step %d)", folder, self.step)

    def export(self) -> Path:
        """Write the trained model to <run>/model, a diffusers-loadable folder (EMA weights if enabled; LoRA
        merged), and a last sample grid. Every rank calls (ZeRO-3 gathers the weights one tensor at a time);
        rank 0 writes."""
        path = self.run_dir / "model"
        tr = self.model.transformer
        backup = None
        state = None  # None: the module itself holds the weights to save
        if self.engine.zero3:  # whole tensors on rank 0: EMA shadow partitions, else the parameters
            ema = self.ema.shadow if self.ema is not None else {}
            state = self.engine.full_from_partitions(ema)
            state.update(self.engine.full_state({k: p for k, p in tr.named_parameters() if k not in ema}))
            state.update({k: b.detach().float().cpu() for k, b in tr.named_buffers()})
        elif self.ema is not None:  # EMA weights into the parameters for the export, restored after
            backup = {k: p.detach().clone() for k, p in self.params.items()}
            with torch.no_grad():
                for k, p in self.params.items():
                    p.copy_(self.ema.shadow[k].to(p.device, p.dtype))
        if self.job.sft.train == "lora" and self.dist.main:
            state = merged_state_dict(tr)
        tmp = path.with_name(path.name + ".tmp")
        if self.dist.main:
            plain = None
            if state is not None:
                plain = QwenImageTransformer2DModel.from_config(tr.config)
                plain.load_state_dict(state)
            self.model.save_pretrained(tmp, transformer=plain)
            if self.job.sft.train == "lora":
                save_lora(tr, tmp / "lora")
        if backup is not None:
            with torch.no_grad():
                for k, p in self.params.items():
                    p.copy_(backup[k])
        if self.dist.main:
            publish_folder(tmp, path)
            log.info("model exported to %s", path)
        distributed.barrier()
        self.write_samples()
        return path

    def summary(self) -> str:
        return f"sft: {self.step} steps, {self.loss_summary()}model in {self.run_dir / 'model'}"


def run(job: SFTJob) -> int:
    return run_stage(SFTStage(job))
