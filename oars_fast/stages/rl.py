"""Online RL of a LoRA on the base model: full-reference (FR) or no-reference (NR) reward.

One iteration, as the loop in :meth:`RLStage.train_iteration` reads:

1. rollout: each of the iteration's LR inputs gets ``K = rl.group_size`` candidates, sampled with
   the ``rl.rollout_steps``-step sampler from the *old* policy (deterministic ODE by default; SDE for
   Flow-GRPO or ``rl.sde``), per-candidate seeds, no grad; clean latents and decoded images kept;
2. reward: a :class:`~oars_fast.rewards.RewardFn` scores every candidate on [0, 1] (FR: vs the ground
   truth; NR: from the LR and SR alone);
3. groups: ``oars_fast.kernels.group_advantages`` -> optimality probabilities r and the keep mask;
   saturated groups (mean > ``filter_mean`` and std < ``filter_std``) are dropped and counted;
4. update: NFT (default): for ``rl.timesteps_per_sample`` random times per kept candidate, fresh
   noise, ``x_t = (1-t) x0 + t eps``; ``v_old`` (old adapter, no grad), ``v_theta`` (current adapter),
   ``v_ref`` (adapters disabled = base, no grad, only when ``rl.kl_weight`` > 0);
   ``oars_fast.kernels.nft_loss``; gradients accumulated over micro-batches and times, then clipping
   and one AdamW step. Flow-GRPO: per SDE step, the ratio of the current to the rollout
   log-probability of the taken transition, the clipped surrogate with group-normalised advantages,
   plus ``kl_weight * ||v_theta - v_ref||^2``;
5. old policy: ``old <- eta * old + (1 - eta) * current``, eta from ``rl.eta_schedule``.

The policy is base weights + LoRA (rank 32, alpha 64 by default): ``model.pretrained`` names the
base, ``rl.sft_model`` the SFT model the final delta is merged into (``<run>/merged``). NR-RL
continues FR-RL's LoRA through ``rl.init_lora``.

Deviations from the paper, on purpose: r is the DiffusionNFT optimality probability computed from
group-normalised, clipped rewards with a population std over the whole iteration; Flow-GRPO's KL term
is taken as the squared velocity difference to the reference (proportional to the KL of the two
Gaussian transitions up to a per-step constant).

Launch:

* 1 CPU (tiny model):  ``oars-fast rl --config configs/demo/rl_fr.yaml``
* 1 GPU:               ``oars-fast rl --config configs/qwen_image_edit/rl_fr.yaml``
* N GPUs:              scale-out (DeepSpeed) is a separate issue; this stage runs one process.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..config import RLJob
from ..data.datasets import ShardedLoader, build_dataset
from ..data.images import load_image, make_grid, save_image, scan_images
from ..kernels import group_advantages, nft_loss_with_stats
from ..models.backbone import DTYPES, SRBackbone, load_backbone
from ..models.lora import PolicyAdapters, save_lora, use_fused_lora
from ..models.sampler import _autocast, euler_sample, per_sample_noise, sde_step, sigma_schedule
from ..rewards import build_reward
from ..runtime import checkpoint as ckpt
from ..runtime.common import build_optimizer, loop_state, memory_gib, restore_loop_state, start_run
from ..runtime.logger import StepLogger
from .sft import Degrader

log = logging.getLogger(__name__)


@dataclass
class Rollout:
    """One iteration's candidates: G groups of K, B = G * K rows, group after group."""

    lr: torch.Tensor  # (B, 3, h, w) the LR input of each candidate
    gt: torch.Tensor | None  # (G, 3, H, W) one ground truth per group (FR), else None
    group_index: torch.Tensor  # (B,) long
    cond: torch.Tensor  # (B, C, h', w') LR latents
    x0: torch.Tensor  # (B, C, h', w') clean latents of the candidates, float32
    images: torch.Tensor  # (B, 3, H, W) decoded candidates in [0, 1]
    sigmas: torch.Tensor  # (N + 1,) the rollout schedule
    trajectory: list[torch.Tensor] | None  # N + 1 states (SDE rollouts)
    log_probs: torch.Tensor | None  # (B, N - 1) transition log-probs under the old policy (SDE)


class RLStage:
    def __init__(self, job: RLJob):
        self.job = job
        self.step = 0
        self.history: list[dict] = []

    # ------------------------------------------------------------------------------------------
    def setup(self) -> "RLStage":
        job, rl = self.job, self.job.rl
        self.device, self.run_dir = start_run(job)
        self.autocast_dtype = DTYPES[job.model.dtype]
        self.model: SRBackbone = load_backbone(job.model, job.data.scale, self.device, job.run.seed, train_dtype=True)
        self.policy = PolicyAdapters(self.model.transformer, job.lora, init_from=rl.init_lora)
        if job.lora.fused:
            use_fused_lora(self.model.transformer)
        self.params = self.policy.named_parameters()
        self.opt, self.sched = build_optimizer(self.params.values(), job.optim, rl.iterations)
        self.reward_fn = build_reward(job.reward, self.device)
        log.info("rl: mode %s, objective %s, reward %s, K=%d, %d-step rollouts", rl.mode, rl.objective,
                 self.reward_fn.name, rl.group_size, rl.rollout_steps)
        self.dataset = build_dataset(job.data, job.run.seed)
        self.loader = ShardedLoader(self.dataset, rl.inputs_per_iter, job.run.seed, num_workers=job.data.num_workers)
        self.degrade = Degrader(job)
        self.gen_deg = torch.Generator(self.device).manual_seed(job.run.seed + 1)
        self.gen_noise = torch.Generator(self.device).manual_seed(job.run.seed + 2)
        self.logger = StepLogger(self.run_dir, "rl")
        self.eval_set = self._eval_set()
        if job.run.resume:
            self._resume()
        self._iter = iter(self.loader)
        return self

    def _eval_set(self) -> dict:
        """Held-out inputs (demo: val patches; else the first files), LR made with a fixed seed."""
        job = self.job
        n, c = job.rl.eval_inputs, job.data.crop_size
        if n == 0:
            return {}
        if job.data.source == "demo":
            files = scan_images(Path(self.dataset.files[0]).parents[1] / "val")[:n]
            hr = torch.stack([load_image(f)[:, :c, :c] for f in files]).to(self.device)
            return {"lr": self.degrade(hr, torch.Generator(self.device).manual_seed(777)), "gt": hr}
        batch = next(iter(ShardedLoader(self.dataset, n, job.run.seed + 99)))
        if "hr" in batch and "lr" not in batch:
            hr = batch["hr"].to(self.device)
            return {"lr": self.degrade(hr, torch.Generator(self.device).manual_seed(777)), "gt": hr}
        return {"lr": batch["lr"].to(self.device), "gt": batch["hr"].to(self.device) if "hr" in batch else None}

    # ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def rollout(self, lr: torch.Tensor, gt: torch.Tensor | None, seed: int, policy: str = "old",
                k: int | None = None, sde: bool | None = None) -> Rollout:
        """K candidates per LR input from `policy` (old: training rollouts; current: evaluation)."""
        rl = self.job.rl
        k = k or rl.group_size
        if sde is None:
            sde = rl.sde or rl.objective == "flow_grpo"
        g = lr.shape[0]
        cond_g = self.model.encode_lr(lr)
        cond = cond_g.repeat_interleave(k, 0)
        c, h, w = cond.shape[1:]
        sigmas = sigma_schedule(rl.rollout_steps, (h // 2) * (w // 2), self.job.sampler)
        seeds = [seed * 100003 + i for i in range(g * k)]
        noise = per_sample_noise((c, h, w), seeds, self.device)
        with self.policy.use(policy), _autocast(self.device, self.autocast_dtype):
            res = euler_sample(lambda x, s: self.model.velocity(x, s, cond), noise, sigmas, sde=sde,
                               noise_level=rl.noise_level, seeds=seeds, keep_trajectory=sde)
        images = torch.cat([self.model.decode(res.x0[i:i + 32]) for i in range(0, g * k, 32)])
        return Rollout(lr.repeat_interleave(k, 0), gt, torch.arange(g, device=self.device).repeat_interleave(k),
                       cond, res.x0, images, sigmas, res.trajectory, res.log_probs)

    def score(self, ro: Rollout) -> tuple[torch.Tensor, dict]:
        return self.reward_fn(ro.lr, ro.images, ro.gt, ro.group_index)

    @torch.no_grad()
    def evaluate(self, seed: int = 4242) -> float:
        """Mean reward of the current policy on the held-out inputs: 4 candidates each, fixed seeds,
        deterministic ODE (the same sampler for every objective, so runs compare)."""
        if not self.eval_set:
            return float("nan")
        ro = self.rollout(self.eval_set["lr"], self.eval_set["gt"], seed, policy="current", k=4, sde=False)
        return float(self.score(ro)[0].mean())

    # ------------------------------------------------------------------------------------------
    def _v(self, x_t, t, cond, policy: str | None) -> torch.Tensor:
        with _autocast(self.device, self.autocast_dtype):
            if policy is None:
                return self.model.velocity(x_t, t, cond)
            with torch.no_grad(), self.policy.use(policy):
                return self.model.velocity(x_t, t, cond)

    def update_nft(self, ro: Rollout, r: torch.Tensor, idx: torch.Tensor) -> dict:
        rl = self.job.rl
        n_terms = len(idx) * rl.timesteps_per_sample
        sums = {"loss": 0.0, "pos": 0.0, "neg": 0.0, "kl": 0.0, "dv": 0.0}
        for _ in range(rl.timesteps_per_sample):
            for s in range(0, len(idx), rl.micro_batch):
                j = idx[s:s + rl.micro_batch]
                x0, cond, rr = ro.x0[j], ro.cond[j], r[j]
                t = torch.rand(len(j), generator=self.gen_noise, device=self.device).clamp(1e-3, 1 - 1e-3)
                eps = torch.randn(x0.shape, generator=self.gen_noise, device=self.device)
                tb = t.view(-1, 1, 1, 1)
                x_t, v_target = (1 - tb) * x0 + tb * eps, eps - x0
                v_old = self._v(x_t, t, cond, "old")
                v_ref = self._v(x_t, t, cond, "ref") if rl.kl_weight > 0 else None
                v_theta = self._v(x_t, t, cond, None)
                loss, st = nft_loss_with_stats(v_theta, v_old, v_target, t, rr, rl.beta, v_ref, rl.kl_weight)
                w = len(j) / n_terms
                (loss * w).backward()
                sums["loss"] += float(loss.detach()) * w
                for key in ("pos", "neg", "kl"):
                    sums[key] += float(st[key]) * w
                sums["dv"] += float((v_theta.detach().float() - v_old.float()).abs().mean()) * w
        return sums

    def update_flow_grpo(self, ro: Rollout, r: torch.Tensor, idx: torch.Tensor) -> dict:
        rl = self.job.rl
        adv = (r - 0.5) * 2 * rl.adv_clip  # back from r in [0, 1] to the clipped advantage
        sig = ro.sigmas
        steps = ro.log_probs.shape[1]  # SDE steps (the last, to sigma = 0, is deterministic)
        n_terms = len(idx) * steps
        sums = {"loss": 0.0, "kl": 0.0, "ratio": 0.0, "clipfrac": 0.0}
        for i in range(steps):
            s, s_next = float(sig[i]), float(sig[i + 1])
            for b in range(0, len(idx), rl.micro_batch):
                j = idx[b:b + rl.micro_batch]
                x, x_next, cond = ro.trajectory[i][j], ro.trajectory[i + 1][j], ro.cond[j]
                t = torch.full((len(j),), s, device=self.device)
                v = self._v(x, t, cond, None).float()
                _, lp = sde_step(x, v, s, s_next, float(sig[1]), rl.noise_level, x_next=x_next)
                ratio = torch.exp(lp - ro.log_probs[j, i])
                a = adv[j]
                surrogate = torch.maximum(-a * ratio, -a * ratio.clamp(1 - rl.grpo_clip, 1 + rl.grpo_clip))
                loss = surrogate.mean()
                kl = torch.zeros((), device=self.device)
                if rl.kl_weight > 0:
                    v_ref = self._v(x, t, cond, "ref").float()
                    kl = (v - v_ref).pow(2).mean()
                    loss = loss + rl.kl_weight * kl
                w = len(j) / n_terms
                (loss * w).backward()
                sums["loss"] += float(loss.detach()) * w
                sums["kl"] += float(kl.detach()) * w
                sums["ratio"] += float(ratio.detach().mean()) * w
                sums["clipfrac"] += float(((ratio - 1).abs() > rl.grpo_clip).float().mean()) * w
        return sums

    def train_iteration(self) -> dict:
        job, rl = self.job, self.job.rl
        t0 = time.perf_counter()
        batch = next(self._iter)
        if "lr" in batch:
            lr = batch["lr"].to(self.device)
        else:
            lr = self.degrade(batch["hr"].to(self.device), self.gen_deg)
        gt = batch["hr"].to(self.device) if (rl.mode == "fr" and "hr" in batch) else None
        # 1. rollout (old policy, no grad)
        t1 = time.perf_counter()
        ro = self.rollout(lr, gt, seed=job.run.seed * 1000003 + self.step + 1)
        # 2. reward
        t2 = time.perf_counter()
        scores, parts = self.score(ro)
        # 3. groups: r and the keep mask
        t3 = time.perf_counter()
        r, keep = group_advantages(scores, rl.group_size, rl.adv_clip, 1e-4, rl.global_std, rl.filter_mean,
                                   rl.filter_std)
        idx = keep.nonzero().flatten()
        # 4. update (current adapter)
        stats: dict = {}
        if len(idx) and bool(torch.isfinite(scores).all()):
            stats = self.update_nft(ro, r, idx) if rl.objective == "nft" else self.update_flow_grpo(ro, r, idx)
            clip = job.optim.grad_clip if job.optim.grad_clip > 0 else float("inf")
            grad_norm = float(torch.nn.utils.clip_grad_norm_(list(self.params.values()), clip))
            if math.isfinite(stats["loss"]) and math.isfinite(grad_norm):
                self.opt.step()
            else:
                log.warning("rl iteration %d: non-finite loss/grad: update skipped", self.step + 1)
            stats["grad_norm"] = grad_norm
        elif not bool(torch.isfinite(scores).all()):
            log.warning("rl iteration %d: non-finite rewards: update skipped", self.step + 1)
        self.opt.zero_grad(set_to_none=True)
        self.sched.step()
        self.step += 1
        # 5. old policy <- EMA of the current one
        eta = rl.eta(self.step)
        self.policy.ema_update(eta)
        t4 = time.perf_counter()
        n = len(scores)
        out = {"reward": float(scores.mean()), "reward_std": float(scores.std(unbiased=False)),
               "reward_min": float(scores.min()), "reward_max": float(scores.max()),
               "kept": float(keep.float().mean()), "groups_dropped": int((~keep).sum()) // rl.group_size,
               "r_mean": float(r.mean()), "r_std": float(r.std(unbiased=False)), **stats, "eta": eta,
               "rollout_img/s": n / (t2 - t1), "train_samples/s": len(idx) / max(t4 - t3, 1e-9),
               "data_s": t1 - t0, "rollout_s": t2 - t1, "reward_s": t3 - t2, "train_s": t4 - t3,
               "mem_GiB": memory_gib(self.device), "samples": n * self.step}
        out.update({f"reward_part/{k}": float(v.mean()) for k, v in parts.items()})
        return out

    def train(self, until: int | None = None) -> list[dict]:
        rl = self.job.rl
        end = min(rl.iterations, until) if until is not None else rl.iterations
        from tqdm import tqdm

        bar = tqdm(total=end, initial=self.step, desc=f"rl {rl.mode}", disable=None, leave=False)
        while self.step < end:
            stats = self.train_iteration()
            self.history.append(stats)
            bar.update(1)
            if rl.eval_every and self.step % rl.eval_every == 0:
                stats["eval_reward"] = self.evaluate()
            if rl.log_every and (self.step % rl.log_every == 0 or self.step == 1):
                self.logger.step(self.step, stats, {"eta": ".3g"})
            if rl.probe_every and self.step % rl.probe_every == 0:
                self.write_probe()
            if (rl.save_every and self.step % rl.save_every == 0) or self.step == rl.iterations:
                self.save_checkpoint()
        bar.close()
        if self.step >= rl.iterations:
            self.export()
        return self.history

    # ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def write_probe(self) -> Path | None:
        """Candidates of the current policy for the first held-out input: LR | K candidates | GT."""
        if not self.eval_set:
            return None
        lr, gt = self.eval_set["lr"][:1], self.eval_set["gt"]
        ro = self.rollout(lr, gt[:1] if gt is not None else None, seed=31337, policy="current",
                          k=min(8, self.job.rl.group_size), sde=False)
        row = [lr[0], *ro.images] + ([gt[0]] if gt is not None else [])
        grid = make_grid([row])
        path = self.run_dir / "samples" / f"rl_step_{self.step:06d}.png"
        save_image(grid, path)
        self.logger.image("probe_candidates", grid, self.step)
        return path

    def save_checkpoint(self) -> Path:
        tr = self.model.transformer
        lora_state = {k: v.detach().float().cpu().contiguous() for k, v in tr.state_dict().items() if "lora_" in k}
        state = loop_state(self.step, self.opt, self.sched, self.loader,
                           {"deg": self.gen_deg, "noise": self.gen_noise}, history=self.history)
        return ckpt.save_checkpoint(self.run_dir / "checkpoints", self.step,
                                    lambda d: save_file(lora_state, str(d / "adapters.safetensors")), state,
                                    keep=self.job.rl.keep_checkpoints)

    def _resume(self) -> None:
        folder = ckpt.latest_checkpoint(self.run_dir / "checkpoints")
        if folder is None:
            log.warning("resume asked but no complete checkpoint in %s: starting fresh", self.run_dir / "checkpoints")
            return
        weights = load_file(str(folder / "adapters.safetensors"))
        own = {k: v for k, v in self.model.transformer.state_dict(keep_vars=True).items() if "lora_" in k}
        if set(own) != set(weights):
            raise RuntimeError(f"checkpoint {folder} holds other LoRA tensors than this model (another lora config?)")
        with torch.no_grad():
            for k, p in own.items():
                p.copy_(weights[k].to(p.device, p.dtype))
        state = ckpt.load_state(folder)
        self.step = restore_loop_state(state, self.opt, self.sched, self.loader,
                                       {"deg": self.gen_deg, "noise": self.gen_noise})
        self.history = list(state.get("history", []))
        log.info("resumed from %s (iteration %d)", folder, self.step)

    def export(self) -> None:
        """The trained (current) LoRA in peft layout -> <run>/lora; merged into rl.sft_model -> <run>/merged."""
        save_lora(self.model.transformer, self.run_dir / "lora", PolicyAdapters.CURRENT)
        if self.job.rl.sft_model:
            from ..config import MergeConfig, MergeJob
            from .merge import run as merge_run

            merge_run(MergeJob(run=self.job.run, merge=MergeConfig(model=self.job.rl.sft_model,
                                                                   lora=str(self.run_dir / "lora"),
                                                                   output=str(self.run_dir / "merged"))))

    def cleanup(self) -> None:
        self.logger.close()


def run(job: RLJob) -> int:
    stage = RLStage(job).setup()
    try:
        before = stage.evaluate()
        history = stage.train()
        after = stage.evaluate()
        stage.write_probe()
    finally:
        stage.cleanup()
    print(f"rl ({job.rl.mode}, {job.rl.objective}, reward {stage.reward_fn.name}): {len(history)} iterations; "
          f"held-out mean reward {before:.4f} -> {after:.4f}; LoRA in {job.run.run_dir / 'lora'}")
    return 0
