"""Online RL of a LoRA on the base model: full-reference (FR) or no-reference (NR) reward.

One iteration, as the loop in :meth:`RLStage.train_iteration` reads:

1. rollout: each of the iteration's LR inputs gets ``K = rl.group_size`` candidates, sampled with
   the ``rl.rollout_steps``-step sampler, per-candidate seeds, no grad; clean latents and decoded images
   kept. NFT samples from the *old* policy with the deterministic ODE (``rl.sde``: SDE); Flow-GRPO is
   on-policy: the *current* policy with the SDE, so its ratio starts at 1. The condition of each LR
   input (LR latents; with ``model.condition=edit`` the prompt with the image inside the text encoder)
   is computed once and reused for its K candidates, every rollout step and every update pass;
2. reward: a :class:`~oars_fast.rewards.RewardFn` scores every candidate on [0, 1] (FR: vs the ground
   truth; NR: from the LR and SR alone);
3. groups: ``oars_fast.kernels.group_advantages`` -> optimality probabilities r and the keep mask;
   saturated groups (mean > ``filter_mean`` and std < ``filter_std``) are dropped and counted;
4. update: NFT (default): per kept candidate, the rollout sampler's own sigmas (without the final 0)
   in a fresh random order, the first ``int(rollout_steps * timestep_fraction)`` of them (DiffusionNFT;
   ``rl.train_timesteps=uniform``: ``timesteps_per_sample`` draws of U(0, 1)); fresh noise,
   ``x_t = (1-t) x0 + t eps``; ``v_old`` (old adapter, no grad), ``v_theta`` (current adapter), ``v_ref``
   (adapters disabled = base, no grad, only when the KL weight > 0); ``oars_fast.kernels.nft_loss`` with
   the policy term scaled by ``rl.adv_clip`` (DiffusionNFT's ``adv_clip_max``) and ``kl * ||v_theta -
   v_ref||^2``; gradients accumulated over micro-batches and times, then clipping and one AdamW step.
   An iteration's update costs ``3 x update_times`` transformer forwards (old, ref, current) and
   ``update_times`` backwards per kept candidate (``update_times`` in the log line). Flow-GRPO: per SDE
   step, the ratio of the current to the rollout log-probability of the taken transition, the clipped
   surrogate with the clipped advantages, plus ``kl * ||mu - mu_ref||^2 / (2 sigma_t^2)`` on the
   transition means (flow_grpo). ``rl.ref_every = N > 1`` (both objectives): the reference forward runs
   for about 1/N of the (candidate, time) terms (:func:`ref_terms`), their KL weighted by N (an unbiased
   estimate of the full KL term): ``(2 + 1/N)`` forwards per term instead of 3 (``ref_forwards`` and
   ``ref_rows`` in the log line). ``rl.fp8_nograd`` (NFT only): the rollout's forwards (``rollout``) and also
   ``v_ref``'s (``rollout_ref``) run the frozen block Linears as fp8 row-wise GEMMs (:mod:`oars_fast.models.fp8`);
   ``v_old`` never (its difference to ``v_theta`` is the NFT signal), nor ``v_theta``, the evaluation or the export;
5. NFT: old policy ``old <- eta * old + (1 - eta) * current``, eta from ``rl.eta_schedule``; both
   objectives: the EMA of the trained LoRA (``rl.ema``, DiffusionNFT's ``train.ema``) that the held-out
   evaluation and the export use.

The policy is base weights + LoRA (rank 32, alpha 64 by default): ``model.pretrained`` names the
base, ``rl.sft_model`` the SFT model the final delta is merged into (``<run>/merged``). NR-RL
continues FR-RL's LoRA through ``rl.init_lora``.

r is the DiffusionNFT optimality probability from group-normalised, clipped rewards with a population
std over the whole iteration. Deliberate deviations from the reference code (Euler rollouts, the group
filter, ...) are listed in the README's deviation table.

Launch:

* 1 CPU (tiny model):  ``oars-fast rl --config configs/demo/rl_fr.yaml``
* 1 GPU:               ``oars-fast rl --config configs/qwen_image_edit/rl_fr.yaml rl.inputs_per_iter=1``
  (the frozen base in bf16, the LoRA in float32)
* N GPUs:              ``deepspeed --num_gpus 8 --module oars_fast.cli rl --config configs/qwen_image_edit/rl_fr.yaml``

Scale-out (DeepSpeed ZeRO-2; ZeRO-3 is refused: the LoRA, its EMA and the adapter switching need whole
parameters): the iteration's ``inputs_per_iter`` groups are split over the ranks, rank ``k`` taking
global groups ``k, k + W, ...``; a group stays on its rank for rollout and reward. The rewards are
then all-gathered (B floats) so that every rank computes ``group_advantages`` over the whole
iteration (the global std and the filter see every group) and takes its own rows. The update loss
is normalised by the global number of kept (candidate, time) terms, and ranks with fewer kept
micro-batches run zero-weight passes so every rank takes part in every gradient reduction. All
randomness is seeded per global group / candidate, so W processes take the same steps as one.
Only the LoRA is in the optimizer; base, VAE and reward model stay frozen outside it. Rank 0 alone
evaluates, writes logs, probe grids and the exported LoRA.
"""
from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from ..config import RLJob, per_rank
from ..data.build import build_dataset, build_loader
from ..data.degrade import Degrader
from ..data.heldout import held_out
from ..data.images import make_grid, save_image
from ..errors import UserError
from ..kernels import group_advantages, nft_loss_with_stats
from ..models import fp8
from ..models.backbone import DTYPES, Condition, SRBackbone, load_backbone
from ..models.lora import PolicyAdapters, save_lora, use_lora_kernel
from ..models.merge import merge_into_folder
from ..models.sampler import SDEStep, euler_sample, per_sample_noise, sde_step, sigma_schedule
from ..rewards import build_reward
from ..runtime import distributed
from ..runtime.device import autocast, memory_gib
from ..runtime.engine import OptimizerEngine
from ..runtime.logger import StepLogger
from ..runtime.optim import EMA
from ..runtime.run import start_run
from ..runtime.seeding import derive_seed, derive_seeds, seed_rank
from .runner import TrainingLoop, run_stage

log = logging.getLogger(__name__)

# derive_seeds tags: each random draw from its own stream
_DEGRADE, _ROLLOUT, _UPDATE, _NOISE, _REF = 0, 1, 2, 3, 5
_EVAL_SEED, _PROBE_SEED = 4242, 31337  # fixed candidates for the held-out evaluation and the probe grid


@dataclass
class Rollout:
    """One iteration's candidates: G groups of K, B = G * K rows, group after group."""

    lr: torch.Tensor  # (B, 3, h, w) the LR input of each candidate
    gt: torch.Tensor | None  # (G, 3, H, W) one ground truth per group (FR), else None
    group_index: torch.Tensor  # (B,) long
    cond: Condition  # (B, ...) LR latents and (edit) prompts, computed once per group and repeated
    x0: torch.Tensor  # (B, C, h', w') clean latents of the candidates, float32
    images: torch.Tensor  # (B, 3, H, W) decoded candidates in [0, 1]
    sigmas: torch.Tensor  # (N + 1,) the rollout schedule
    trajectory: list[torch.Tensor] | None  # N + 1 states (SDE rollouts)
    log_probs: torch.Tensor | None  # (B, N - 1) transition log-probs under the old policy (SDE)


def update_times(seeds: list[int], sigmas: torch.Tensor, mode: str, n: int) -> torch.Tensor:
    """(len(seeds), n) NFT update times, each candidate's drawn from its own seed. rollout: the rollout's
    sigmas without the final 0, in a random order, the first n (DiffusionNFT: one permutation per sample,
    the first int(N * timestep_fraction)); uniform: n draws of U(0, 1), clamped away from 0 and 1."""
    grid = sigmas[:-1].float()
    rows = []
    for sd in seeds:
        g = torch.Generator().manual_seed(int(sd))
        if mode == "rollout":
            rows.append(grid[torch.randperm(len(grid), generator=g)[:n]])
        else:
            rows.append(torch.rand(n, generator=g).clamp(1e-3, 1 - 1e-3))
    return torch.stack(rows) if rows else torch.zeros(0, n)


def ref_terms(seeds: list[int], passes: int, every: int) -> torch.Tensor:
    """(len(seeds), passes) bool: the (candidate, pass) terms whose KL the update estimates (``rl.ref_every`` = N).
    N = 1: all. Otherwise systematic sampling per candidate: an offset o in [0, N) drawn from the candidate's
    own seed, the passes p with (p + o) % N == 0; each term is selected with probability exactly 1/N, so
    weighting a selected term's KL by N leaves the KL's expectation unchanged."""
    if every == 1:
        return torch.ones(len(seeds), passes, dtype=torch.bool)
    p = torch.arange(passes)
    rows = [(p + int(torch.randint(every, (1,), generator=torch.Generator().manual_seed(int(sd))))) % every == 0
            for sd in seeds]
    return torch.stack(rows) if rows else torch.zeros(0, passes, dtype=torch.bool)


def grpo_surrogate(log_prob: torch.Tensor, old_log_prob: torch.Tensor, adv: torch.Tensor,
                   clip: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Flow-GRPO's clipped surrogate ``mean(max(-A ratio, -A clamp(ratio, 1 - clip, 1 + clip)))``; (loss, ratio)."""
    ratio = torch.exp(log_prob - old_log_prob)
    return torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - clip, 1 + clip)).mean(), ratio


def grpo_kl(step: SDEStep, ref: SDEStep) -> torch.Tensor:
    """Flow-GRPO's KL term of one SDE step: ``mean((mu - mu_ref)^2) / (2 sigma_t^2)`` per sample (the
    transition means under the policy and the base), batch-averaged."""
    return grpo_kl_rows(step.mean, ref.mean, step.std).mean()


def grpo_kl_rows(mean: torch.Tensor, ref_mean: torch.Tensor, std: float) -> torch.Tensor:
    """:func:`grpo_kl` per sample, (B,)."""
    return ((mean - ref_mean) ** 2).flatten(1).mean(1) / (2 * std**2)


class RLStage(TrainingLoop):
    log_format = {"eta": ".3g"}

    def __init__(self, job: RLJob):
        self.job = job
        self.name = f"rl {job.rl.mode}"
        self.step = 0
        self.history: list[dict] = []  # the stats of every iteration
        self.eval_before = self.eval_after = float("nan")

    @property
    def total_steps(self) -> int:
        return self.job.rl.iterations

    def cadence(self) -> tuple[int, int]:
        return self.job.rl.log_every, self.job.rl.save_every

    # ------------------------------------------------------------------------------------------
    def setup(self) -> RLStage:
        job, rl = self.job, self.job.rl
        self.dist, self.device, self.run_dir = start_run(job, job.deepspeed)
        d = self.dist
        self.autocast_dtype = DTYPES[job.model.dtype]
        # the base is frozen: kept in model.dtype; the LoRA weights are float32 (add_lora)
        self.model: SRBackbone = load_backbone(job.model, job.data.scale, self.device, job.run.seed)
        self.policy = PolicyAdapters(self.model.transformer, job.lora, init_from=rl.init_lora)
        use_lora_kernel(self.model.transformer, job.lora.kernel)
        self.fp8_forwards = None
        if rl.fp8_nograd != "none":  # the frozen block Linears as fp8 GEMMs in some no-grad forwards (models/fp8.py)
            fp8.check_support(self.device, self.autocast_dtype)
            self.fp8_forwards = fp8.enable(self.model.transformer)
        self.params = self.policy.named_parameters()
        self.lora_ema = EMA(self.params, rl.ema_max_decay) if rl.ema else None  # eval/export weights
        self.ema_steps, self.cond_s = 0, 0.0
        self.groups = per_rank(rl.inputs_per_iter, d.world, 1, "rl.inputs_per_iter")  # groups on this rank
        self.engine = OptimizerEngine(self.model.transformer, self.params, optim=job.optim, total_steps=rl.iterations,
                                      ds=job.deepspeed, dist=d, device=self.device,
                                      micro_batch=self.groups * rl.group_size, model_dtype=job.model.dtype)
        self.reward_fn = build_reward(job.reward, self.device)
        # the held-out score: the full COMPASS R whatever variant trains (dq_only / no_fidelity runs then compare with
        # full ones), from the same loaded model; any other reward scores itself
        self.eval_reward_fn = self.reward_fn
        if getattr(self.reward_fn, "variant", "full") != "full":
            rf = self.reward_fn
            self.eval_reward_fn = type(rf)(rf.model, "full", rf.gamma, rf.batch_size)
        if self.fp8_forwards is not None:
            f8 = self.fp8_forwards
            f8.warm()  # after the engine (it may move or cast the model): each weight quantised once
            log.info("rl.fp8_nograd=%s: %d Linear layers of the transformer blocks (%.1fM weights, lora.kernel=%s) as "
                     "fp8 e4m3 row-wise GEMMs in the %s forwards; fp8 weight cache %.1f MiB", rl.fp8_nograd,
                     len(f8.layers), f8.params / 1e6, job.lora.kernel,
                     "rollout" if rl.fp8_nograd == "rollout" else "rollout and v_ref", f8.cache_bytes() / 2**20)
        times = f", {rl.update_times} {rl.train_timesteps} update times per candidate" if rl.objective == "nft" else ""
        if rl.ref_every > 1 and rl.kl > 0:
            times += f", reference forward on ~1/{rl.ref_every} of the update terms (KL weighted x{rl.ref_every})"
        log.info("rl: mode %s, objective %s, reward %s, K=%d, %d-step rollouts, %d group(s) x %d rank(s), KL weight "
                 "%g, condition %s%s", rl.mode, rl.objective, self.reward_fn.name, rl.group_size, rl.rollout_steps,
                 self.groups, d.world, rl.kl, self.model.condition_kind, times)
        self.dataset = build_dataset(job.data, job.run.seed)
        self.loader = build_loader(self.dataset, job.data, self.groups, job.run.seed, d.rank, d.world,
                                   self.device)
        self.degrade = Degrader(job.degradation, job.data.scale)
        self.logger = StepLogger(self.run_dir, "rl", enabled=d.main, interval=job.run.log_interval)
        # held-out inputs: the evaluation's and the probe grid's
        self.eval_set = held_out(job.data, self.dataset, self.degrade, rl.eval_inputs, self.device) \
            if rl.eval_inputs else None
        seed_rank(job.run.seed, self.dist)  # before a resume, which restores each rank's own RNG
        if job.run.resume:
            self._resume()
        if self.step == 0:
            self.eval_before = self.evaluate()
        self._iter = iter(self.loader)
        return self

    # ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def rollout(self, lr: torch.Tensor, gt: torch.Tensor | None, seed: int, policy: str = "old",
                k: int | None = None, sde: bool | None = None, groups: list[int] | None = None) -> Rollout:
        """K candidates per LR input from `policy` (training: old for NFT, current for Flow-GRPO; evaluation:
        current). `groups`: the global position of each input (candidate seeds follow it; default 0, 1, ...)."""
        rl = self.job.rl
        k = k or rl.group_size
        if sde is None:
            sde = rl.sde or rl.objective == "flow_grpo"
        g = lr.shape[0]
        tc = time.perf_counter()
        cond = self.model.condition(lr).repeat_interleave(k)  # once per input, for its K candidates
        self.cond_s += time.perf_counter() - tc
        c, h, w = cond.latents.shape[1:]
        sigmas = sigma_schedule(rl.rollout_steps, (h // 2) * (w // 2), self.job.sampler)
        groups = list(range(g)) if groups is None else groups
        seeds = derive_seeds([gi * k + c for gi in groups for c in range(k)], seed)
        noise = per_sample_noise((c, h, w), seeds, self.device)
        with self.policy.use(policy), autocast(self.device, self.autocast_dtype):
            res = euler_sample(lambda x, s: self.model.velocity(x, s, cond), noise, sigmas, sde=sde,
                               noise_level=rl.noise_level, seeds=seeds, keep_trajectory=sde)
        images = torch.cat([self.model.decode(res.x0[i:i + 32]) for i in range(0, g * k, 32)])
        return Rollout(lr.repeat_interleave(k, 0), gt, torch.arange(g, device=self.device).repeat_interleave(k),
                       cond, res.x0, images, sigmas, res.trajectory, res.log_probs)

    def score(self, ro: Rollout) -> tuple[torch.Tensor, dict]:
        return self.reward_fn(ro.lr, ro.images, ro.gt, ro.group_index)

    @torch.no_grad()
    def evaluate(self, seed: int = _EVAL_SEED) -> float:
        """Mean reward of the current policy on the held-out inputs: 4 candidates each, fixed seeds,
        deterministic ODE (the same sampler for every objective, so runs compare); a COMPASS variant is scored with
        the full R (``eval_reward_fn``)."""
        if self.eval_set is None or not self.dist.main:
            return float("nan")
        with self.eval_weights():
            ro = self.rollout(self.eval_set.lr, self.eval_set.hr, seed, policy="current", k=4, sde=False)
        return float(self.eval_reward_fn(ro.lr, ro.images, ro.gt, ro.group_index)[0].mean())

    @contextlib.contextmanager
    def eval_weights(self):
        """The LoRA that evaluation and export use: the EMA of the trained one (rl.ema), else the trained one."""
        if self.lora_ema is None:
            yield
            return
        backup = {k: p.detach().clone() for k, p in self.params.items()}
        with torch.no_grad():
            for k, p in self.params.items():
                p.copy_(self.lora_ema.shadow[k].to(p.dtype))
        try:
            yield
        finally:
            with torch.no_grad():
                for k, p in self.params.items():
                    p.copy_(backup[k])

    # ------------------------------------------------------------------------------------------
    def _v(self, x_t, t, cond, policy: str | None) -> torch.Tensor:
        with autocast(self.device, self.autocast_dtype):
            if policy is None:
                return self.model.velocity(x_t, t, cond)
            with torch.no_grad(), self.policy.use(policy), self._fp8(policy):
                return self.model.velocity(x_t, t, cond)

    def _fp8(self, forward: str):
        """rl.fp8_nograd: the context of one of the iteration's no-grad forwards (`forward`: rollout | old | ref): fp8
        GEMMs for the frozen block Linears when the option covers it (rollout: the rollout; rollout_ref: and ref;
        never old), only while autograd is off (models/fp8.py); else a no-op."""
        covered = {"none": (), "rollout": ("rollout",), "rollout_ref": ("rollout", "ref")}[self.job.rl.fp8_nograd]
        if self.fp8_forwards is None or forward not in covered:
            return contextlib.nullcontext()
        return self.fp8_forwards.on()

    def _work(self, n_local: int, passes: int) -> tuple[list[tuple[int, slice]], int]:
        """(pass, micro-batch rows) of this rank's update, padded with empty slices to the largest count
        of any rank (every rank must join every gradient reduction); and the global row count."""
        mb = self.job.rl.micro_batch
        items = [(i, slice(s, min(s + mb, n_local))) for i in range(passes) for s in range(0, n_local, mb)]
        counts = distributed.all_reduce(torch.tensor([len(items), n_local], dtype=torch.int64, device=self.device),
                                        "max")
        n_global = int(distributed.all_reduce(torch.tensor([n_local], dtype=torch.int64, device=self.device)))
        items += [(0, slice(0, 0))] * (int(counts[0]) - len(items))
        return items, n_global

    def _rows(self, idx: torch.Tensor, sl: slice) -> tuple[torch.Tensor, bool]:
        """Rows of a work item; an empty item (padding) runs one row with weight 0."""
        j = idx[sl]
        return (j, True) if len(j) else (torch.zeros(1, dtype=torch.long, device=self.device), False)

    def update_nft(self, ro: Rollout, r: torch.Tensor, idx: torch.Tensor, ids: torch.Tensor) -> dict:
        """`idx`: kept rows of this rank; `ids`: the global candidate id of every row (seeds t and eps)."""
        rl = self.job.rl
        passes = rl.update_times
        items, n_global = self._work(len(idx), passes)
        n_terms = n_global * passes
        seeds_t = derive_seeds(ids[idx].tolist(), self.job.run.seed, _UPDATE, self.step)
        times = update_times(seeds_t, ro.sigmas, rl.train_timesteps, passes).to(self.device)  # (kept rows, passes)
        ref_sel = self._ref_terms(ids[idx], passes)  # (kept rows, passes) bool; None: no KL
        sums = {"loss": 0.0, "pos": 0.0, "neg": 0.0, "kl": 0.0, "dv": 0.0, "ref_forwards": 0, "ref_rows": 0}
        for n, (tau, sl) in enumerate(items):
            j, real = self._rows(idx, sl)
            x0, cond, rr = ro.x0[j], ro.cond[j], r[j]
            t = times[sl, tau] if real else torch.full((1,), 0.5, device=self.device)
            seeds = derive_seeds(ids[j].tolist(), self.job.run.seed, _UPDATE, self.step, tau)
            eps = per_sample_noise(tuple(x0.shape[1:]), derive_seeds(seeds, _NOISE), self.device)
            tb = t.view(-1, 1, 1, 1)
            x_t, v_target = (1 - tb) * x0 + tb * eps, eps - x0
            v_old = self._v(x_t, t, cond, "old")
            sel = self._item_ref(ref_sel, sl, tau, real, len(j))
            v_ref = part = None
            if sel is not None and bool(sel.all()):  # rl.ref_every = 1: every term (the reference code)
                v_ref = self._v(x_t, t, cond, "ref")
            elif sel is not None and bool(sel.any()):  # only the selected rows run the reference
                part = self._v(x_t[sel], t[sel], cond[sel], "ref")
            v_theta = self._v(x_t, t, cond, None)
            if part is not None:  # the others: v_ref = v_theta (no KL, no KL gradient)
                v_ref = v_theta.detach().clone()
                v_ref[sel] = part.to(v_ref.dtype)
            if v_ref is not None:
                sums["ref_forwards"] += 1
                sums["ref_rows"] += int(sel.sum()) if real else 0
            loss, st = nft_loss_with_stats(v_theta, v_old, v_target, t, rr, rl.beta, v_ref,
                                           rl.kl * rl.ref_every if v_ref is not None else 0.0,
                                           policy_weight=rl.adv_clip)
            w = len(j) / n_terms if real else 0.0
            self.engine.backward(loss * (w * self.dist.world), last=n == len(items) - 1)
            sums["loss"] += float(loss.detach()) * w
            for key in ("pos", "neg"):
                sums[key] += float(st[key]) * w
            sums["kl"] += float(st["kl"]) * (rl.ref_every * w)  # the unbiased estimate of the full KL
            sums["dv"] += float((v_theta.detach().float() - v_old.float()).abs().mean()) * w
        return self._reduce(sums)

    def _ref_terms(self, ids: torch.Tensor, passes: int) -> torch.Tensor | None:
        """Which (kept row, pass) terms run the reference forward (:func:`ref_terms`, seeded per candidate and
        iteration: independent of ranks and micro-batches); None when the KL weight is 0."""
        rl = self.job.rl
        if rl.kl <= 0:
            return None
        seeds = derive_seeds(ids.tolist(), self.job.run.seed, _REF, self.step)
        return ref_terms(seeds, passes, rl.ref_every).to(self.device)

    def _item_ref(self, ref_sel: torch.Tensor | None, sl: slice, tau: int, real: bool, rows: int):
        """The rows of a work item that run the reference (bool (rows,)); None: none (KL weight 0). A padding
        item runs it only with ref_every = 1 (as before; its weight is 0 either way)."""
        if ref_sel is None:
            return None
        if not real:
            return torch.full((rows,), self.job.rl.ref_every == 1, dtype=torch.bool, device=self.device)
        return ref_sel[sl, tau]

    def _reduce(self, sums: dict) -> dict:
        """Per-rank weighted sums -> global means (weights already divide by the global count)."""
        keys = list(sums)
        tot = distributed.all_reduce(torch.tensor([sums[k] for k in keys], dtype=torch.float64, device=self.device))
        return {k: int(v) if isinstance(sums[k], int) else float(v) for k, v in zip(keys, tot)}

    def update_flow_grpo(self, ro: Rollout, r: torch.Tensor, idx: torch.Tensor, ids: torch.Tensor) -> dict:
        """Per SDE step of the (on-policy) rollout: the clipped surrogate of the transition's probability
        ratio with the clipped advantages, plus flow_grpo's KL to the base on the transition means."""
        rl = self.job.rl
        adv = (r - 0.5) * 2 * rl.adv_clip  # back from r in [0, 1] to the clipped advantage
        sig = ro.sigmas
        steps = ro.log_probs.shape[1]  # SDE steps (the last, to sigma = 0, is deterministic)
        items, n_global = self._work(len(idx), steps)
        n_terms = n_global * steps
        ref_sel = self._ref_terms(ids[idx], steps)  # (kept rows, SDE steps) bool; None: no KL
        sums = {"loss": 0.0, "kl": 0.0, "ratio": 0.0, "clipfrac": 0.0, "ref_forwards": 0, "ref_rows": 0}
        for n, (i, sl) in enumerate(items):
            j, real = self._rows(idx, sl)
            s, s_next = float(sig[i]), float(sig[i + 1])
            x, x_next, cond = ro.trajectory[i][j], ro.trajectory[i + 1][j], ro.cond[j]
            t = torch.full((len(j),), s, device=self.device)
            step = sde_step(x, self._v(x, t, cond, None).float(), s, s_next, float(sig[1]), rl.noise_level,
                            x_next=x_next)
            loss, ratio = grpo_surrogate(step.log_prob, ro.log_probs[j, i], adv[j], rl.grpo_clip)
            kl = torch.zeros((), device=self.device)
            sel = self._item_ref(ref_sel, sl, i, real, len(j))
            if sel is not None and bool(sel.all()) and rl.ref_every == 1:  # every term (the reference code)
                ref = sde_step(x, self._v(x, t, cond, "ref").float(), s, s_next, float(sig[1]), rl.noise_level,
                               x_next=x_next)
                kl = grpo_kl(step, ref)
                loss = loss + rl.kl * kl
            elif sel is not None and bool(sel.any()):  # the selected rows, their KL weighted by N (rl.ref_every)
                ref = sde_step(x[sel], self._v(x[sel], t[sel], cond[sel], "ref").float(), s, s_next, float(sig[1]),
                               rl.noise_level, x_next=x_next[sel])
                kl = grpo_kl_rows(step.mean[sel], ref.mean, step.std).sum() * rl.ref_every / len(j)
                loss = loss + rl.kl * kl
            if sel is not None and bool(sel.any()):
                sums["ref_forwards"] += 1
                sums["ref_rows"] += int(sel.sum()) if real else 0
            w = len(j) / n_terms if real else 0.0
            self.engine.backward(loss * (w * self.dist.world), last=n == len(items) - 1)
            sums["loss"] += float(loss.detach()) * w
            sums["kl"] += float(kl.detach()) * w
            sums["ratio"] += float(ratio.detach().mean()) * w
            sums["clipfrac"] += float(((ratio - 1).abs() > rl.grpo_clip).float().mean()) * w
        return self._reduce(sums)

    def train_iteration(self) -> dict:
        job, rl, d = self.job, self.job.rl, self.dist
        k = rl.group_size
        t0 = time.perf_counter()
        batch = next(self._iter)
        if "lr" in batch:
            lr = batch["lr"].to(self.device)
        else:
            lr = self.degrade(batch["hr"].to(self.device), seeds=derive_seeds(batch["seed"].tolist(), _DEGRADE))
        gt = batch["hr"].to(self.device) if (rl.mode == "fr" and "hr" in batch) else None
        groups = [d.rank + d.world * j for j in range(len(lr))]  # global group positions of this rank
        ids = torch.tensor([g * k + c for g in groups for c in range(k)], device=self.device)
        # 1. rollout (NFT: old policy; Flow-GRPO: current, on-policy; no grad); each group stays on its rank
        t1 = time.perf_counter()
        self.cond_s = 0.0
        with self._fp8("rollout"):
            ro = self.rollout(lr, gt, seed=derive_seed(job.run.seed, _ROLLOUT, self.step), groups=groups,
                              policy="old" if rl.objective == "nft" else "current")
        # 2. reward
        t2 = time.perf_counter()
        local_scores, parts = self.score(ro)
        # 3. groups: rewards of every rank (global order), r and the keep mask; this rank's rows
        t3 = time.perf_counter()
        scores = distributed.interleave(local_scores.float().view(-1, k)).flatten()
        r_all, keep_all = group_advantages(scores, k, rl.adv_clip, 1e-4, rl.global_std, rl.filter_mean,
                                           rl.filter_std)
        r, keep = (x.view(-1, d.world, k)[:, d.rank].flatten() for x in (r_all, keep_all))  # this rank's groups
        idx = keep.nonzero().flatten()
        # 4. update (current adapter)
        stats: dict = {"lr": self.engine.lr}
        finite = bool(torch.isfinite(scores).all())
        nonfinite = not finite
        if bool(keep_all.any()) and finite:
            stats.update(self.update_nft(ro, r, idx, ids) if rl.objective == "nft" else
                         self.update_flow_grpo(ro, r, idx, ids))
            stats["grad_norm"], stepped = self.engine.step()
            nonfinite = not (stepped and math.isfinite(stats["loss"]))
            if nonfinite:
                log.warning("rl iteration %d: non-finite loss/grad: update skipped", self.step + 1)
            elif self.lora_ema is not None:
                self.ema_steps += 1
                s = self.ema_steps
                self.lora_ema.update(self.params, min((1 + s) / (10 + s), rl.ema_max_decay))
        else:
            if not finite:
                log.warning("rl iteration %d: non-finite rewards: update skipped", self.step + 1)
            self.engine.skip()
        self.step += 1
        # 5. NFT: old policy <- EMA of the current one (whole LoRA on every rank: the same result everywhere)
        eta = rl.eta(self.step) if rl.objective == "nft" else 0.0
        if rl.objective == "nft":
            self.policy.ema_update(eta)
        t4 = time.perf_counter()
        n = len(scores)
        out = {"reward": float(scores.mean()), "reward_std": float(scores.std(unbiased=False)),
               "reward_min": float(scores.min()), "reward_max": float(scores.max()),
               "kept": float(keep_all.float().mean()), "groups_dropped": int((~keep_all).sum()) // k,
               "r_mean": float(r_all.mean()), "r_std": float(r_all.std(unbiased=False)), **stats, "eta": eta,
               "update_times": rl.update_times if rl.objective == "nft" else ro.log_probs.shape[1],
               "rollout_img/s": n / (t2 - t1), "train_samples/s": int(keep_all.sum()) / max(t4 - t3, 1e-9),
               "data_s": t1 - t0, "cond_s": self.cond_s, "rollout_s": t2 - t1, "reward_s": t3 - t2,
               "train_s": t4 - t3,
               "mem_GiB": memory_gib(self.device), "samples": n * self.step, "nonfinite": int(nonfinite)}
        out.update({f"reward_part/{key}": float(distributed.all_reduce(v.float().mean().reshape(1)) / d.world)
                    for key, v in parts.items()})
        self.history.append(out)
        return out

    train_step = train_iteration

    def after_step(self, stats: dict) -> None:
        rl = self.job.rl
        if rl.eval_every and self.step % rl.eval_every == 0:
            stats["eval_reward"] = self.evaluate()
        if rl.probe_every and self.step % rl.probe_every == 0:
            self.write_probe()

    # ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def write_probe(self) -> Path | None:
        """Candidates of the current policy for the first held-out input: LR | K candidates | GT."""
        if self.eval_set is None or not self.dist.main:
            return None
        lr, gt = self.eval_set.lr[:1], self.eval_set.hr
        ro = self.rollout(lr, gt[:1] if gt is not None else None, seed=_PROBE_SEED, policy="current",
                          k=min(8, self.job.rl.group_size), sde=False)
        row = [lr[0], *ro.images] + ([gt[0]] if gt is not None else [])
        grid = make_grid([row])
        path = self.run_dir / "samples" / f"rl_step_{self.step:06d}.png"
        save_image(grid, path)
        self.logger.image("probe_candidates", grid, self.step)
        return path

    def save_checkpoint(self) -> Path:
        """Every rank calls: DeepSpeed shards + per-rank RNG; rank 0: both adapters (current and old)."""
        tr = self.model.transformer
        lora_state = {k: v.detach().float().cpu().contiguous() for k, v in tr.state_dict().items() if "lora_" in k}
        state = {"step": self.step, "loader": self.loader.state_dict(), "history": self.history,
                 "eval_before": self.eval_before, "ema_steps": self.ema_steps,
                 "lora_ema": self.lora_ema.state_dict() if self.lora_ema is not None else None}
        return self.engine.save_checkpoint(self.run_dir / "checkpoints", self.step, lora_state,
                                            "adapters.safetensors", state, self.job.rl.keep_checkpoints)

    def _resume(self) -> None:
        opened = self.engine.open_checkpoint(self.run_dir / "checkpoints", "adapters.safetensors")
        if opened is None:
            return
        folder, state, _ = opened
        weights = load_file(str(folder / "adapters.safetensors"))  # current and old adapter
        own = {k: v for k, v in self.model.transformer.state_dict(keep_vars=True).items() if "lora_" in k}
        if set(own) != set(weights):
            raise UserError(f"checkpoint {folder} holds other LoRA tensors than this model (another lora config?)")
        with torch.no_grad():
            for k, p in own.items():
                p.copy_(weights[k].to(p.device, p.dtype))
        self.step = int(state["step"])
        self.loader.load_state_dict(state["loader"])
        self.history = list(state.get("history", []))
        self.eval_before = float(state.get("eval_before", float("nan")))
        self.ema_steps = int(state.get("ema_steps", 0))
        if self.lora_ema is not None and state.get("lora_ema"):
            self.lora_ema.load_state_dict(state["lora_ema"])
        log.info("resumed from %s (iteration %d)", folder, self.step)

    def export(self) -> None:
        """At the end (rank 0): the held-out evaluation and probe of the trained policy; the trained (current)
        LoRA in peft layout -> <run>/lora; merged into rl.sft_model -> <run>/merged."""
        if not self.dist.main:
            return
        self.eval_after = self.evaluate()
        self.write_probe()
        with self.eval_weights():  # rl.ema: the EMA of the trained LoRA is what is exported
            save_lora(self.model.transformer, self.run_dir / "lora", PolicyAdapters.CURRENT)
        if self.job.rl.sft_model:
            n = merge_into_folder(self.job.rl.sft_model, self.run_dir / "lora", self.run_dir / "merged")
            log.info("%d LoRA layers merged into %s -> %s", n, self.job.rl.sft_model, self.run_dir / "merged")

    def summary(self) -> str:
        job = self.job
        return (f"rl ({job.rl.mode}, {job.rl.objective}, reward {self.reward_fn.name}): {self.step} iterations; "
                f"held-out mean {self.eval_reward_fn.name} reward {self.eval_before:.4f} -> {self.eval_after:.4f}; "
                f"LoRA in {self.run_dir / 'lora'}")


def run(job: RLJob) -> int:
    return run_stage(RLStage(job))
