"""`oars-fast compass-sft`: full-parameter training of the COMPASS reward model on an annotation manifest.

Per step: a batch of (LR, SR) pairs from ``compass.manifest`` (``oars-fast annotate``; pairs of one batch
share their image sizes), ``CompassModel.forward`` -> F, Q_LR, Q_SR, and the masked score loss

    f_weight * (F - F*)^2 [where F* exists: real LQ pairs have none]
    + q_weight * ((Q_LR - Q_LR*) / 4)^2 + q_weight * ((Q_SR - Q_SR*) / 4)^2,

averaged over the pairs that carry each label, plus (``rank_weight`` > 0) a within-group pairwise ranking loss

    rank_weight * mean over keys in rank_on of
        mean over pairs (i, j) of one group with s_i* - s_j* > rank_margin * range of
            softplus(-rank_sharpness * (s_i - s_j) / range)

(s = Q_SR, F or R; range 4 for Q and R, 1 for F; a pair enters only where both labels exist). It needs batches
of whole groups: ``candidates_per_group`` = k >= 2 draws batch_size/k groups of k candidates each (0: pairs at
random across groups, the plain SFT of the paper). ``augment`` flips / turns each pair (LR and SR alike). Every
rank draws the whole global micro-batch from the step's seed and takes its share (whole groups); each loss term is
divided by its count over the whole micro-batch, so N ranks take the same steps as one process (2 ranks under
ZeRO-2 against one: losses equal to 3e-7 relative).

Why the ranking loss: what the RL reward must get right is the order of the SR outputs of ONE input, and those
differences (blur, artefacts) are small next to the differences between inputs (content, input quality). A
squared error on random pairs is minimised first by what tells images apart; on the tiny model that feature
ordered the SR outputs of one image backwards (held-out pairwise accuracy 0.3-0.45 after 500 steps at lr 1e-4:
below chance; at lr 1e-5 the model hardly moves from its random start). A pairwise loss on pairs of one group sees
only the within-group order; the score losses, down-weighted, keep the absolute scale.

AdamW, warm-up + cosine, clipping, the shared training loop (logs, checkpoints, ``--resume``, the divergence
guard). Groups are split by a hash of their id: a ``heldout_fraction`` of them is never trained on and scores the
model's pairwise accuracy (its R and its Q_SR against the annotated preferences,
``oars_fast.evaluation.pairwise_accuracy``) every ``eval_every`` steps and at the end. Output: ``<run>/model`` (a
COMPASS folder ``reward.compass`` and ``pairs.compass`` take; it records the pixel budget it was trained at).

The tiny CPU model (``model: null``; configs/demo/compass.yaml, measured on a ladder of known blur + noise
severities in tests/test_compass_sft.py: held-out accuracy of R 0.82-0.83 over three seeds) needs: lr 1e-4 (1e-5
is the 8B model's; 2e-4 already fails on some seeds); a pixel budget of 128*128 (at its own 64*64 a 64x64 SR
image is 4 tokens and the random vision tower barely tells the blur levels apart: 0.55-0.73); groups of 4
candidates with the ranking loss on Q_SR and F, the score losses at 1/8 of it (at equal weight the squared error
still wins: 0.58-0.66); 500 steps. The 8B defaults stay plain SFT (configs/qwen_image_edit/compass.yaml).

Launch:

* CPU (tiny model):  ``oars-fast compass-sft --config configs/demo/compass.yaml``
* N GPUs:            ``deepspeed --num_gpus 8 --module oars_fast.cli compass-sft --config
  configs/qwen_image_edit/compass.yaml`` (ZeRO-3 for the 8B model, bf16)
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file

from ..config import CompassSFTJob, per_rank
from ..data.images import load_image
from ..errors import UserError
from ..evaluation import pairwise_accuracy
from ..kernels import compass_reward
from ..models.backbone import DTYPES
from ..runtime import distributed
from ..runtime.checkpoint import publish_folder
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


def dihedral(x: torch.Tensor, t: int) -> torch.Tensor:
    """One of the 8 flips/quarter turns of an image (..., H, W): t % 4 quarter turns, then a mirror if t >= 4
    (t = 0: unchanged; even t keep the size)."""
    x = torch.rot90(x, t % 4, (-2, -1)) if t % 4 else x
    return x.flip(-1) if t >= 4 else x


def _size(path: str) -> tuple[int, int]:
    with Image.open(path) as im:
        return im.size


SCORE_TERMS = (("f", 1.0), ("q_lr", 4.0), ("q_sr", 4.0))  # (label, range)
RANGES = {"f": 1.0, "q_lr": 4.0, "q_sr": 4.0, "r": 4.0}


def score_counts(rows: list[dict]) -> dict[str, int]:
    """How many rows carry each score label."""
    return {key: sum(r.get(key) is not None for r in rows) for key, _ in SCORE_TERMS}


def score_loss(
    pred: dict, rows: list[dict], f_weight: float, q_weight: float, totals: dict | None = None, world: int = 1
) -> tuple[torch.Tensor, dict]:
    """The masked score loss of a batch (module docstring); (loss, detached parts: each term's mean here).

    `totals` (:func:`score_counts` of the global micro-batch, every rank's rows) and `world`: each term is summed
    here and divided by its global count / world, so that the ranks' losses, averaged as DeepSpeed averages
    gradients, are one process's loss on the whole batch; None: this batch's own counts (its mean)."""
    dev = pred["f"].device
    parts = {}
    total = torch.zeros((), device=dev)
    for key, scale in SCORE_TERMS:
        weight = f_weight if key == "f" else q_weight
        have = [i for i, r in enumerate(rows) if r.get(key) is not None]
        count = totals[key] if totals is not None else len(have)
        if not have or not count or weight == 0:
            continue
        target = torch.tensor([float(rows[i][key]) for i in have], device=dev)
        err = ((pred[key][have].float() - target) / scale).pow(2)
        total = total + weight * err.sum() * (world / count)
        parts[f"loss_{key}"] = float(err.detach().mean())
    return total, parts


def _reward_labels(rows: list[dict]) -> list[float | None]:
    """R of each row's labels (None where F or a Q is absent)."""
    out = []
    for r in rows:
        if any(r.get(k) is None for k in ("f", "q_lr", "q_sr")):
            out.append(None)
        else:
            t = torch.tensor([[float(r["f"])], [float(r["q_lr"])], [float(r["q_sr"])]], dtype=torch.float64)
            out.append(float(compass_reward(*t)))
    return out


def rank_pairs(rows: list[dict], key: str, margin: float) -> torch.Tensor:
    """(B, B) bool: pairs (i, j) of one group whose `key` labels both exist and differ by more than
    ``margin * range`` with i the better one (``key`` r: R of the labels)."""
    if key == "r":
        labels = _reward_labels(rows)
    else:
        labels = [None if r.get(key) is None else float(r[key]) for r in rows]
    groups = [r["group"] for r in rows]
    same = torch.tensor([[a == b for b in groups] for a in groups], dtype=torch.bool).view(len(rows), len(rows))
    have = torch.tensor([v is not None for v in labels], dtype=torch.bool)
    t = torch.tensor([0.0 if v is None else v for v in labels], dtype=torch.float64)
    return same & have[:, None] & have[None, :] & (t[:, None] - t[None, :] > margin * RANGES[key])


def rank_counts(rows: list[dict], keys: list[str], margin: float) -> dict[str, int]:
    """How many ranking pairs each key has among `rows` (pairs never span ranks: ranks take whole groups)."""
    return {key: int(rank_pairs(rows, key, margin).sum()) for key in keys}


def rank_loss(
    pred: dict,
    rows: list[dict],
    keys: list[str],
    sharpness: float,
    margin: float,
    totals: dict | None = None,
    world: int = 1,
) -> tuple[torch.Tensor, dict]:
    """The within-group pairwise ranking loss of a batch (module docstring); (loss, detached parts: each key's
    mean loss and pairwise accuracy here). A key without pairs in the whole micro-batch adds nothing (and is not
    counted in the mean over keys); `totals` (:func:`rank_counts` of the global micro-batch) and `world` as in
    :func:`score_loss`."""
    dev = pred["f"].device
    totals = totals if totals is not None else rank_counts(rows, keys, margin)
    active = [k for k in keys if totals[k]]
    total, parts = torch.zeros((), device=dev), {}
    for key in active:
        pairs = rank_pairs(rows, key, margin).to(dev)
        if not bool(pairs.any()):  # pairs on other ranks only
            continue
        if key == "r":
            score = compass_reward(pred["f"].float(), pred["q_lr"].float(), pred["q_sr"].float())
        else:
            score = pred[key].float()
        diff = (score[:, None] - score[None, :])[pairs] / RANGES[key]  # s_i - s_j where label i > label j
        loss = F.softplus(-sharpness * diff)
        total = total + loss.sum() * (world / (totals[key] * len(active)))
        parts[f"loss_rank_{key}"] = float(loss.detach().mean())
        parts[f"batch_acc_{key}"] = float((diff.detach() > 0).float().mean())
    return total, parts


def build_model(cfg, seed: int = 0, dtype: torch.dtype = torch.float32):
    """The model to train: the tiny random one (``model: null``) or a checkpoint (its heads zeroed where it has
    none), with the configured pixel budget (which its saved config then records)."""
    from ..rewards.compass import CompassModel  # heavy (transformers VL model): loaded by this stage only

    if cfg.model is None:
        model = CompassModel.tiny(cfg.tiny_arch, seed=seed)
    else:
        model = CompassModel.from_pretrained(cfg.model, dtype=dtype, require_head=False)
    mc = model.config
    mc.min_pixels = mc.min_pixels if cfg.min_pixels is None else cfg.min_pixels
    mc.max_pixels = mc.max_pixels if cfg.max_pixels is None else cfg.max_pixels
    if mc.min_pixels > mc.max_pixels:
        raise UserError(
            f"compass-sft: pixel budget min_pixels={mc.min_pixels} > max_pixels={mc.max_pixels} (one of "
            f"them is the model's own)"
        )
    return model


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
        job, cfg = self.job, self.job.compass
        self.dist, self.device, self.run_dir = start_run(job, job.deepspeed)
        ds = job.deepspeed
        self.autocast_dtype = DTYPES[cfg.dtype]
        master = torch.bfloat16 if deepspeed_bf16(ds, cfg.dtype, self.device) else torch.float32
        self.model = build_model(cfg, seed=job.run.seed, dtype=master)
        if not (use_deepspeed(ds) and ds.zero_stage == 3):
            self.model.to(self.device)
        self.model.train()
        self.params = {n: p for n, p in self.model.named_parameters() if p.requires_grad}
        d = self.dist
        self.micro = per_rank(cfg.batch_size, d.world, job.optim.grad_accum, "compass.batch_size")
        self.engine = OptimizerEngine(
            self.model,
            self.params,
            optim=job.optim,
            total_steps=cfg.steps,
            ds=ds,
            dist=d,
            device=self.device,
            micro_batch=self.micro,
            grad_accum=job.optim.grad_accum,
            model_dtype=cfg.dtype,
        )
        rows = read_manifest(cfg.manifest)
        self.train_rows = [r for r in rows if not heldout(r["group"], cfg.heldout_fraction)]
        self.heldout_groups = defaultdict(list)
        for r in rows:
            if heldout(r["group"], cfg.heldout_fraction):
                self.heldout_groups[r["group"]].append(r)
        if not self.train_rows:
            raise UserError(f"compass-sft: no training pairs in {cfg.manifest} (all {len(rows)} held out?)")
        # pairs of one batch share their image sizes (one batched forward): buckets by (LR size, SR size), and
        # within a bucket the groups (candidates_per_group: batches of whole groups)
        self.buckets = defaultdict(list)
        groups = defaultdict(lambda: defaultdict(list))
        for r in self.train_rows:
            key = (_size(r["lr"]), _size(r["sr"]))
            self.buckets[key].append(r)
            groups[key][r["group"]].append(r)
        self.bucket_keys = sorted(self.buckets)
        self.bucket_groups = {k: [groups[k][g] for g in sorted(groups[k])] for k in self.bucket_keys}
        k = cfg.candidates_per_group
        if k and self.micro % k:
            raise UserError(
                f"compass-sft: the per-rank micro-batch {self.micro} (compass.batch_size="
                f"{cfg.batch_size} / ({d.world} rank(s) x optim.grad_accum={job.optim.grad_accum})) is "
                f"not a multiple of compass.candidates_per_group={k}: each rank takes whole groups"
            )
        self.logger = StepLogger(self.run_dir, "compass", enabled=d.main, interval=job.run.log_interval)
        seed_rank(job.run.seed, d)
        if job.run.resume:
            self._resume()
        mc = self.model.config
        log.info(
            "compass-sft: %s, %.1fM parameters, pixel budget %d..%d, %d training pairs in %d size bucket(s), "
            "%d held-out groups, micro-batch %d x accum %d x %d rank(s)%s%s",
            cfg.model or f"tiny {cfg.tiny_arch}",
            sum(p.numel() for p in self.params.values()) / 1e6,
            mc.min_pixels,
            mc.max_pixels,
            len(self.train_rows),
            len(self.buckets),
            len(self.heldout_groups),
            self.micro,
            job.optim.grad_accum,
            d.world,
            f", {k} candidates per group" if k else "",
            f", ranking loss x {cfg.rank_weight} on {'/'.join(cfg.rank_on)}" if cfg.rank_weight else "",
        )
        return self

    # ------------------------------------------------------------------------------------------
    def _batch(self, accum_index: int) -> tuple[list[dict], list[int], list[dict]]:
        """This rank's rows of one micro-batch, their dihedral transforms (0 = none; see :func:`dihedral`) and the
        rows of the whole global micro-batch (every rank's: the losses' normalisers): a bucket and global
        positions drawn from the step's seed (the same draws on every rank; rank k takes positions k, k + W, ...).
        With candidates_per_group = c: the positions are groups (distinct while the bucket has enough), each with c
        distinct candidates (repeated only where a group has fewer), and rank k takes groups k, k + W, ... The
        transforms (``augment``) are drawn last, one per global position."""
        d, n, cfg = self.dist, self.micro * self.dist.world, self.job.compass
        g = torch.Generator().manual_seed(derive_seed(self.job.run.seed, self.step, accum_index))
        sizes = torch.tensor([len(self.buckets[k]) for k in self.bucket_keys], dtype=torch.float64)
        key = self.bucket_keys[int(torch.multinomial(sizes, 1, generator=g))]
        c = cfg.candidates_per_group
        if not c:
            rows = self.buckets[key]
            drawn = [[rows[int(i)]] for i in torch.randint(0, len(rows), (n,), generator=g)]
        else:
            groups, n_groups = self.bucket_groups[key], n // c
            if len(groups) >= n_groups:
                picked = torch.randperm(len(groups), generator=g)[:n_groups]
            else:
                picked = torch.randint(0, len(groups), (n_groups,), generator=g)
            drawn = []  # every group's candidates drawn on every rank (the generator stays in step)
            for i in picked.tolist():
                rows = groups[i]
                idx = torch.randperm(len(rows), generator=g)[:c]
                if len(idx) < c:
                    idx = torch.cat([idx, torch.randint(0, len(rows), (c - len(idx),), generator=g)])
                drawn.append([rows[int(j)] for j in idx])
        if cfg.augment:
            square = key[0][0] == key[0][1] and key[1][0] == key[1][1]  # (w, h) of LR and SR
            tf = torch.randint(0, 8, (n,), generator=g).tolist()
            tf = tf if square else [t - t % 2 for t in tf]  # not square: no quarter turns (the sizes would change)
        else:
            tf = [0] * n
        tf = [tf[i : i + len(x)] for i, x in zip(np.cumsum([0] + [len(x) for x in drawn]), drawn)]
        mine = range(d.rank, len(drawn), d.world)
        return [r for i in mine for r in drawn[i]], [t for i in mine for t in tf[i]], [r for x in drawn for r in x]

    def train_step(self) -> dict:
        job, cfg = self.job, self.job.compass
        t0 = time.perf_counter()
        accum = job.optim.grad_accum
        total, parts_sum = 0.0, defaultdict(float)
        for a in range(accum):
            rows, tf, everyone = self._batch(a)
            lr = torch.stack([dihedral(load_image(r["lr"]), t) for r, t in zip(rows, tf)]).to(self.device)
            sr = torch.stack([dihedral(load_image(r["sr"]), t) for r, t in zip(rows, tf)]).to(self.device)
            with autocast(self.device, self.autocast_dtype):
                pred = self.model(lr, sr)
            world = self.dist.world
            loss, parts = score_loss(pred, rows, cfg.f_weight, cfg.q_weight, score_counts(everyone), world)
            if cfg.rank_weight > 0:
                totals = rank_counts(everyone, cfg.rank_on, cfg.rank_margin)
                ranking, rank_parts = rank_loss(
                    pred, rows, cfg.rank_on, cfg.rank_sharpness, cfg.rank_margin, totals, world
                )
                loss = loss + cfg.rank_weight * ranking
                parts.update(rank_parts)
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
        return {
            "loss": total,
            **parts_sum,
            "grad_norm": grad_norm,
            "lr": lr_now,
            "pairs/s": cfg.batch_size / dt,
            "step_s": dt,
            "mem_GiB": memory_gib(self.device),
            "nonfinite": int(nonfinite),
        }

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
        state = {"step": self.step, "losses": self.history}
        return self.engine.save_checkpoint(
            self.run_dir / "checkpoints",
            self.step,
            self.engine.full_state,
            "compass.safetensors",
            state,
            self.job.compass.keep_checkpoints,
        )

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
                model = build_model(self.job.compass)
                model.load_state_dict(state, strict=False)
            tmp = path.with_name("model.tmp")
            model.save_pretrained(tmp)
            publish_folder(tmp, path)
            log.info("COMPASS exported to %s", path)
        distributed.barrier()
        return path

    def summary(self) -> str:
        acc = f"held-out pairwise accuracy {self.heldout_acc:.3f}; " if math.isfinite(self.heldout_acc) else ""
        return f"compass-sft: {self.step} steps, {self.loss_summary()}{acc}model in {self.run_dir / 'model'}"


def run(job: CompassSFTJob) -> int:
    return run_stage(CompassSFTStage(job))
