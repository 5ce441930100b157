"""`oars-fast compass-sft`: full-parameter training of the COMPASS reward model on an annotation manifest.

Per step: a batch of (LR, SR) pairs from ``compass.manifest`` (``oars-fast annotate``; pairs of one batch
share their image sizes), ``CompassModel.forward`` -> F, Q_LR, Q_SR, and the masked score loss

    f_weight * (F - F*)^2 [where F* exists: real LQ pairs have none]
    + q_weight * ((Q_LR - Q_LR*) / 4)^2 + q_weight * ((Q_SR - Q_SR*) / 4)^2,

averaged over the pairs that carry each label; AdamW, warm-up + cosine, clipping, the shared training loop
(logs, checkpoints, ``--resume``, the divergence guard). Groups are split by a hash of their id: a
``heldout_fraction`` of them is never trained on and scores the model's pairwise accuracy (its R and its
Q_SR against the annotated preferences, ``oars_fast.evaluation.pairwise_accuracy``) every ``eval_every`` steps
and at the end. Output: ``<run>/model`` (a COMPASS folder ``reward.compass`` and ``pairs.compass`` take).

Launch:

* CPU (tiny model):  ``oars-fast compass-sft --config configs/demo/compass.yaml``
* N GPUs:            ``deepspeed --num_gpus 8 --module oars_fast.cli compass-sft --config
  configs/qwen_image_edit/compass.yaml`` (ZeRO-3 for the 8B model, bf16)
"""
from __future__ import annotations

import hashlib
import logging
import math
import shutil
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file

from ..config import CompassSFTJob, per_rank
from ..data.images import load_image
from ..errors import UserError
from ..evaluation import pairwise_accuracy
from ..kernels import compass_reward
from ..models.backbone import DTYPES
from ..runtime import distributed
from ..runtime.device import autocast, memory_gib
from ..runtime.engine import OptimizerEngine, deepspeed_bf16, use_deepspeed
from ..runtime.logger import StepLogger
from ..runtime.run import start_run
from ..runtime.seeding import derive_seed, seed_rank
from .annotate import read_manifest
from .runner import TrainingLoop, run_stage

log = logging.getLogger(__name__)


def heldout(group: str, fraction: float) -> bool:
    """Whether a group is held out: a hash of its id (stable across runs and ranks), not a random draw."""
    return int(hashlib.sha1(group.encode()).hexdigest()[:8], 16) / 16**8 < fraction


def _size(path: str) -> tuple[int, int]:
    with Image.open(path) as im:
        return im.size


def score_loss(pred: dict, rows: list[dict], f_weight: float, q_weight: float) -> tuple[torch.Tensor, dict]:
    """The masked score loss of a batch (module docstring); (loss, detached parts)."""
    dev = pred["f"].device
    parts = {}
    total = torch.zeros((), device=dev)
    for key, scale, weight in (("f", 1.0, f_weight), ("q_lr", 4.0, q_weight), ("q_sr", 4.0, q_weight)):
        have = [i for i, r in enumerate(rows) if r.get(key) is not None]
        if not have or weight == 0:
            continue
        target = torch.tensor([float(rows[i][key]) for i in have], device=dev)
        err = ((pred[key][have].float() - target) / scale).pow(2).mean()
        total = total + weight * err
        parts[f"loss_{key}"] = float(err.detach())
    return total, parts


class CompassSFTStage(TrainingLoop):
    name = "compass-sft"
    log_format = {"lr": ".3g", "pairs/s": ".2f", "step_s": ".3f", "mem_GiB": ".2f"}

    def __init__(self, job: CompassSFTJob):
        self.job = job
        self.step = 0
        self.history: list[float] = []  # the loss of every step
        self.heldout_acc = float("nan")

    @property
    def total_steps(self) -> int:
        return self.job.compass.steps

    def cadence(self) -> tuple[int, int]:
        return self.job.compass.log_every, self.job.compass.save_every

    # ------------------------------------------------------------------------------------------
    def setup(self) -> CompassSFTStage:
        from ..rewards.compass import CompassModel  # heavy (transformers VL model): loaded by this stage only

        job, cfg = self.job, self.job.compass
        self.dist, self.device, self.run_dir = start_run(job, job.deepspeed)
        ds = job.deepspeed
        self.autocast_dtype = DTYPES[cfg.dtype]
        master = torch.bfloat16 if deepspeed_bf16(ds, cfg.dtype, self.device) else torch.float32
        if cfg.model is None:
            self.model = CompassModel.tiny(cfg.tiny_arch, seed=job.run.seed)
        else:
            self.model = CompassModel.from_pretrained(cfg.model, dtype=master, require_head=False)
        if not (use_deepspeed(ds) and ds.zero_stage == 3):
            self.model.to(self.device)
        self.model.train()
        self.params = {n: p for n, p in self.model.named_parameters() if p.requires_grad}
        d = self.dist
        self.micro = per_rank(cfg.batch_size, d.world, job.optim.grad_accum, "compass.batch_size")
        self.engine = OptimizerEngine(self.model, self.params, optim=job.optim, total_steps=cfg.steps, ds=ds, dist=d,
                                      device=self.device, micro_batch=self.micro, grad_accum=job.optim.grad_accum,
                                      model_dtype=cfg.dtype)
        rows = read_manifest(cfg.manifest)
        self.train_rows = [r for r in rows if not heldout(r["group"], cfg.heldout_fraction)]
        self.heldout_groups = defaultdict(list)
        for r in rows:
            if heldout(r["group"], cfg.heldout_fraction):
                self.heldout_groups[r["group"]].append(r)
        if not self.train_rows:
            raise UserError(f"compass-sft: no training pairs in {cfg.manifest} (all {len(rows)} held out?)")
        # pairs of one batch share their image sizes (one batched forward): buckets by (LR size, SR size)
        self.buckets = defaultdict(list)
        for r in self.train_rows:
            self.buckets[(_size(r["lr"]), _size(r["sr"]))].append(r)
        self.bucket_keys = sorted(self.buckets)
        self.logger = StepLogger(self.run_dir, "compass", enabled=d.main, interval=job.run.log_interval)
        seed_rank(job.run.seed, d)
        if job.run.resume:
            self._resume()
        log.info("compass-sft: %s, %.1fM parameters, %d training pairs in %d size bucket(s), %d held-out groups, "
                 "micro-batch %d x accum %d x %d rank(s)", cfg.model or f"tiny {cfg.tiny_arch}",
                 sum(p.numel() for p in self.params.values()) / 1e6, len(self.train_rows), len(self.buckets),
                 len(self.heldout_groups), self.micro, job.optim.grad_accum, d.world)
        return self

    # ------------------------------------------------------------------------------------------
    def _batch(self, accum_index: int) -> list[dict]:
        """This rank's rows of one micro-batch: a bucket and global positions drawn from the step's seed (the
        same draws on every rank; rank k takes positions k, k + W, ...)."""
        d, n = self.dist, self.micro * self.dist.world
        g = torch.Generator().manual_seed(derive_seed(self.job.run.seed, self.step, accum_index))
        sizes = torch.tensor([len(self.buckets[k]) for k in self.bucket_keys], dtype=torch.float64)
        rows = self.buckets[self.bucket_keys[int(torch.multinomial(sizes, 1, generator=g))]]
        idx = torch.randint(0, len(rows), (n,), generator=g)[d.rank::d.world]
        return [rows[int(i)] for i in idx]

    def train_step(self) -> dict:
        job, cfg = self.job, self.job.compass
        t0 = time.perf_counter()
        accum = job.optim.grad_accum
        total, parts_sum = 0.0, defaultdict(float)
        for a in range(accum):
            rows = self._batch(a)
            lr = torch.stack([load_image(r["lr"]) for r in rows]).to(self.device)
            sr = torch.stack([load_image(r["sr"]) for r in rows]).to(self.device)
            with autocast(self.device, self.autocast_dtype):
                pred = self.model(lr, sr)
            loss, parts = score_loss(pred, rows, cfg.f_weight, cfg.q_weight)
            self.engine.backward(loss / accum, last=a == accum - 1)
            total += float(loss.detach()) / accum
            for k, v in parts.items():
                parts_sum[k] += v / accum
        total = float(distributed.all_reduce(torch.tensor([total], dtype=torch.float64, device=self.device)))
        total /= self.dist.world
        lr_now = self.engine.lr
        grad_norm, stepped = self.engine.step()
        nonfinite = not (stepped and math.isfinite(total))
        if nonfinite:
            log.warning("compass-sft step %d: non-finite loss %.4g: step skipped", self.step + 1, total)
        self.step += 1
        self.history.append(total)
        dt = time.perf_counter() - t0
        return {"loss": total, **parts_sum, "grad_norm": grad_norm, "lr": lr_now, "pairs/s": cfg.batch_size / dt,
                "step_s": dt, "mem_GiB": memory_gib(self.device), "nonfinite": int(nonfinite)}

    def after_step(self, stats: dict) -> None:
        every = self.job.compass.eval_every
        if every and self.step % every == 0:
            stats.update(self.evaluate())

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Pairwise accuracy of R and of Q_SR on the held-out groups against the annotated preferences (the
        calibrated Q_SR order; equal values a tie)."""
        if not self.heldout_groups:
            return {}
        self.model.eval()
        scores_r, scores_q, prefs = [], [], []
        for rows in self.heldout_groups.values():
            if len(rows) < 2:
                continue
            lr = load_image(rows[0]["lr"])[None].to(self.device)
            sr = torch.stack([load_image(r["sr"]) for r in rows]).to(self.device)
            with autocast(self.device, self.autocast_dtype):
                f, q_lr, q_sr = self.model.score(lr, sr, torch.zeros(len(rows), dtype=torch.long, device=self.device))
            scores_r.append(compass_reward(f.float(), q_lr.float(), q_sr.float()).cpu().numpy())
            scores_q.append(q_sr.float().cpu().numpy())
            t = np.array([r["q_sr"] for r in rows])
            prefs.append((t[:, None] > t[None, :]) + 0.5 * (t[:, None] == t[None, :]))
        self.model.train()
        if not prefs:
            return {}
        self.heldout_acc = pairwise_accuracy(scores_r, prefs)
        return {"heldout_pair_acc": self.heldout_acc, "heldout_pair_acc_qsr": pairwise_accuracy(scores_q, prefs)}

    # ------------------------------------------------------------------------------------------
    def save_checkpoint(self) -> Path:
        weights = self.engine.full_state()
        state = {"step": self.step, "losses": self.history}
        return self.engine.save_checkpoint(self.run_dir / "checkpoints", self.step, weights, "compass.safetensors",
                                           state, self.job.compass.keep_checkpoints)

    def _resume(self) -> None:
        opened = self.engine.open_checkpoint(self.run_dir / "checkpoints", "compass.safetensors")
        if opened is None:
            return
        folder, state, _ = opened
        if not self.engine.deepspeed:
            weights = load_file(str(folder / "compass.safetensors"))
            with torch.no_grad():
                for k, p in self.params.items():
                    p.copy_(weights[k].to(p.device, p.dtype))
        self.step = int(state["step"])
        self.history = list(state.get("losses", []))
        log.info("resumed from %s (step %d)", folder, self.step)

    def export(self) -> Path:
        """The trained model -> <run>/model (rank 0 writes; ZeRO-3 gathers the weights first)."""
        stats = self.evaluate()
        if stats:
            self.logger.step(self.step, stats, show=True)
        path = self.run_dir / "model"
        state = self.engine.full_state() if self.engine.zero3 else None  # ZeRO-3: gathered onto rank 0
        if self.dist.main:
            model = self.model
            if state is not None:  # the partitioned module cannot be saved as is: a host copy with the weights
                from ..rewards.compass import CompassModel  # heavy: see setup

                cfg = self.job.compass
                model = CompassModel.tiny(cfg.tiny_arch) if cfg.model is None else \
                    CompassModel.from_pretrained(cfg.model, require_head=False)
                model.load_state_dict(state, strict=False)
            tmp = path.with_name("model.tmp")
            model.save_pretrained(tmp)
            shutil.rmtree(path, ignore_errors=True)
            tmp.rename(path)
            log.info("COMPASS exported to %s", path)
        distributed.barrier()
        return path

    def cleanup(self) -> None:
        if hasattr(self, "logger"):
            self.logger.close()

    def summary(self) -> str:
        losses = self.history
        first = f"loss {losses[0]:.4f} -> {losses[-1]:.4f}; " if losses else ""
        acc = f"held-out pairwise accuracy {self.heldout_acc:.3f}; " if math.isfinite(self.heldout_acc) else ""
        return f"compass-sft: {self.step} steps, {first}{acc}model in {self.run_dir / 'model'}"


def run(job: CompassSFTJob) -> int:
    return run_stage(CompassSFTStage(job))
