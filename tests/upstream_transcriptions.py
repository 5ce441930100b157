"""Pure-torch transcriptions of the upstream computations oars-fast is meant to reproduce.

Test support only (no test functions here). Every function re-expresses, in our own code, the
math of one upstream function; the comment above it names the repository, file, function and
commit it follows. Where the upstream variable flow matters numerically (which tensor is formed
first, which dtype a reduction runs in) the transcription follows it. See docs/upstream_notes.md
for the prose and the line numbers.

Upstream snapshots read:

* NVlabs/DiffusionNFT @ 24af5554898d85e93efa492f42b5e9cdf4156e9b
* yifan123/flow_grpo @ ac4c86e8cae021841f1fde853d340e0db67690dd (SD3 scripts), plus the later
  Qwen-Image-Edit-Plus files @ 9dcdc35b211205511f171a4f3566e40786575bc3 and
  flow_grpo/diffusers_patch/sd3_sde_with_logprob.py @ 54809b5fcf4d3930d2a17fa553928704bd0b719e
* huggingface/diffusers @ 58eb52c0803ea9af3abec60841c2a093bdf1f951
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch

# ================================================================================================
# DiffusionNFT
# ================================================================================================

# NVlabs/DiffusionNFT config/base.py get_config (train.adv_clip_max, train.timestep_fraction,
# train.beta) and config/nft.py _get_config (config.beta, config.decay_type), commit 24af555.
NFT_ADV_CLIP_MAX = 5.0
NFT_TIMESTEP_FRACTION = 0.99
NFT_KL_BETA = 1e-4  # config.train.beta: weight of the KL-to-base term
NFT_BETA = 1.0  # config.beta: mixing of the implicit positive/negative policies (0.1 for ocr / multi_reward)


def nft_num_train_timesteps(num_steps: int, timestep_fraction: float = NFT_TIMESTEP_FRACTION) -> int:
    """How many of a rollout's timesteps each sample is trained on.

    Source: NVlabs/DiffusionNFT scripts/train_nft_sd3.py, main(),
    ``num_train_timesteps = int(config.sample.num_steps * config.train.timestep_fraction)`` (commit 24af555).
    """
    return int(num_steps * timestep_fraction)


def nft_select_time_indices(num_steps: int, batch_size: int, timestep_fraction: float = NFT_TIMESTEP_FRACTION,
                            generator: torch.Generator | None = None) -> torch.Tensor:
    """(B, n_train) indices into the rollout's N timesteps (``scheduler.timesteps``: the N sigmas
    without the final 0, times 1000), one independent random permutation per sample, of which the
    first ``int(N * fraction)`` are trained, in the permuted order.

    Source: NVlabs/DiffusionNFT scripts/train_nft_sd3.py, main(), the training loop: ``perms_time``
    (one ``torch.randperm(num_timesteps)`` per sample, rows then gathered) and the inner loop over
    ``j_idx in range(num_train_timesteps)`` (commit 24af555). Upstream draws from the global RNG on the
    GPU; here a generator is taken so tests are reproducible (the distribution is the same).
    """
    n_train = nft_num_train_timesteps(num_steps, timestep_fraction)
    rows = [torch.randperm(num_steps, generator=generator) for _ in range(batch_size)]
    return torch.stack(rows)[:, :n_train] if rows else torch.empty(0, n_train, dtype=torch.long)


def nft_training_times(sigmas_with_terminal: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """t (B, n_train) at the selected indices: ``timesteps / 1000`` with ``timesteps = sigmas[:-1] * 1000``.

    Source: NVlabs/DiffusionNFT scripts/train_nft_sd3.py, main(): ``timesteps =
    pipeline.scheduler.timesteps`` at rollout and ``t = train_sample_batch["timesteps"][:, j_idx] / 1000.0``
    in training (commit 24af555). The scheduler keeps timesteps as float32 ``sigmas * 1000``.
    """
    timesteps = (sigmas_with_terminal[:-1].to(torch.float32) * 1000.0)
    return timesteps[indices] / 1000.0


def per_prompt_advantages(rewards: torch.Tensor, group_ids: Sequence, global_std: bool = True) -> torch.Tensor:
    """Advantages as PerPromptStatTracker.update (type 'grpo'): per group (same prompt) mean; std the
    population std of *all* rewards of the epoch (global_std) or of the group; ``+ 1e-4``; float64.

    Source: NVlabs/DiffusionNFT flow_grpo/stat_tracking.py, PerPromptStatTracker.update (commit 24af555);
    the same function in yifan123/flow_grpo flow_grpo/stat_tracking.py (commit ac4c86e). Groups are keyed
    by the decoded prompt over the whole epoch (all ranks gathered), not by position.
    """
    x = rewards.detach().to(torch.float64).reshape(-1)
    keys = list(group_ids)
    if len(keys) != x.numel():
        raise ValueError("one group id per reward")
    out = torch.zeros_like(x)
    all_std = x.std(unbiased=False)
    for key in dict.fromkeys(keys):
        sel = torch.tensor([k == key for k in keys])
        grp = x[sel]
        std = (all_std if global_std else grp.std(unbiased=False)) + 1e-4
        out[sel] = (grp - grp.mean()) / std
    return out


def nft_optimality_probability(advantages: torch.Tensor, adv_clip_max: float = NFT_ADV_CLIP_MAX,
                               adv_mode: str = "all") -> torch.Tensor:
    """r in [0, 1] from advantages: clip to +-adv_clip_max, optional adv_mode, then
    ``clamp(adv / adv_clip_max / 2 + 0.5, 0, 1)``.

    Source: NVlabs/DiffusionNFT scripts/train_nft_sd3.py, main(), training loop (``advantages_clip``,
    ``adv_mode`` branches, ``normalized_advantages_clip``, ``r``) (commit 24af555). The configs set
    ``adv_mode = "all"`` (no branch taken).
    """
    a = advantages.clamp(-adv_clip_max, adv_clip_max)
    if adv_mode == "positive_only":
        a = a.clamp(0, adv_clip_max)
    elif adv_mode == "negative_only":
        a = a.clamp(-adv_clip_max, 0)
    elif adv_mode == "one_only":
        a = (a > 0).to(a.dtype)
    elif adv_mode == "binary":
        a = torch.sign(a)
    return ((a / adv_clip_max) / 2.0 + 0.5).clamp(0, 1)


def nft_loss(v_theta: torch.Tensor, v_old: torch.Tensor, v_ref: torch.Tensor | None, x0: torch.Tensor,
             noise: torch.Tensor, t: torch.Tensor, r: torch.Tensor, beta: float = NFT_BETA,
             kl_beta: float = NFT_KL_BETA, adv_clip_max: float = NFT_ADV_CLIP_MAX) -> tuple[torch.Tensor, dict]:
    """The DiffusionNFT training loss of one (micro-batch, timestep), before gradient-accumulation scaling.

    Variable flow as upstream: ``xt = (1 - t) x0 + t noise``; positive policy
    ``beta v_theta + (1 - beta) v_old``; implicit negative ``(1 + beta) v_old - beta v_theta``; x0
    predictions ``xt - t v``; adaptive weights ``mean|x0_pred - x0|`` computed in float64 without
    gradient, clipped at 1e-5 (kept per sample, broadcast); per-sample losses
    ``mean((x0_pred - x0)^2 / w)`` (float64, since w is); ``(r pos + (1 - r) neg) / beta``, scaled by
    ``adv_clip_max`` and batch-averaged; plus ``kl_beta * mean_b(mean((v_theta - v_ref)^2))``.
    Upstream then divides by ``gradient_accumulation_steps * num_train_timesteps`` before backward.

    Source: NVlabs/DiffusionNFT scripts/train_nft_sd3.py, main(), training loop from ``xt = ...``
    through ``loss += config.train.beta * torch.mean(kl_div_loss)`` (commit 24af555). Returns (loss, terms).
    """
    b = x0.shape[0]
    te = t.reshape(b, *([1] * (x0.ndim - 1)))
    dims = tuple(range(1, x0.ndim))
    xt = (1 - te) * x0 + te * noise
    v_old = v_old.detach()
    pos_pred = beta * v_theta + (1 - beta) * v_old
    neg_pred = (1.0 + beta) * v_old - beta * v_theta
    x0_pos = xt - te * pos_pred
    x0_neg = xt - te * neg_pred
    with torch.no_grad():
        w_pos = (x0_pos.double() - x0.double()).abs().mean(dim=dims, keepdim=True).clip(min=1e-5)
        w_neg = (x0_neg.double() - x0.double()).abs().mean(dim=dims, keepdim=True).clip(min=1e-5)
    positive_loss = ((x0_pos - x0) ** 2 / w_pos).mean(dim=dims)
    negative_loss = ((x0_neg - x0) ** 2 / w_neg).mean(dim=dims)
    ori_policy_loss = r * positive_loss / beta + (1.0 - r) * negative_loss / beta
    policy_loss = (ori_policy_loss * adv_clip_max).mean()
    if v_ref is not None:
        kl = ((v_theta - v_ref.detach()) ** 2).mean(dim=dims)
    else:
        kl = torch.zeros(b, dtype=v_theta.dtype, device=v_theta.device)
    loss = policy_loss + kl_beta * kl.mean()
    terms = {"policy_loss": policy_loss.detach(), "unweighted_policy_loss": ori_policy_loss.mean().detach(),
             "positive_loss": positive_loss.detach(), "negative_loss": negative_loss.detach(),
             "w_pos": w_pos.flatten(), "w_neg": w_neg.flatten(), "kl_div": kl.mean().detach(), "xt": xt.detach()}
    return loss, terms


def nft_old_policy_decay(step: int, decay_type: int = 1) -> float:
    """The decay of the old-policy EMA ``old <- decay * old + (1 - decay) * current``, applied once per
    epoch after its training, with ``step`` = the global optimizer-step count at that time.

    type 0: 0; type 1 (default): min(0.001 * step, 0.5); type 2 (sd3_ocr): 0 for step < 75, then
    min(0.0075 * (step - 75), 0.999).

    Source: NVlabs/DiffusionNFT scripts/train_nft_sd3.py, return_decay() and its use at the end of each
    epoch in main() (commit 24af555); config/nft.py sets decay_type.
    """
    flat, rate, cap = {0: (0, 0.0, 0.0), 1: (0, 0.001, 0.5), 2: (75, 0.0075, 0.999)}[decay_type]
    if step < flat:
        return 0.0
    return min((step - flat) * rate, cap)


def ema_wrapper_decay(optimization_step: int, decay: float = 0.9) -> float:
    """Decay of the ``train.ema`` copy of the trained LoRA (used for evaluation and saved checkpoints):
    ``min((1 + s) / (10 + s), decay)``; update ``ema += (1 - d) (param - ema)``.

    Source: NVlabs/DiffusionNFT flow_grpo/ema.py, EMAModuleWrapper.get_current_decay / step (commit
    24af555; DiffusionNFT builds it with decay=0.9, update_step_interval=1; Flow-GRPO train_sd3.py with
    decay=0.9, update_step_interval=8).
    """
    return min((1 + optimization_step) / (10 + optimization_step), decay)


# ================================================================================================
# Flow-GRPO
# ================================================================================================

# yifan123/flow_grpo config/base.py get_config (commit ac4c86e): train.clip_range, train.adv_clip_max,
# sample.noise_level; config/grpo.py geneval_sd3 / general_ocr_sd3: train.beta 0.04, timestep_fraction 0.99.
GRPO_CLIP_RANGE = 1e-4
GRPO_ADV_CLIP_MAX = 5.0
GRPO_NOISE_LEVEL = 0.7
GRPO_KL_BETA = 0.04


def flow_grpo_sde_step(sample: torch.Tensor, model_output: torch.Tensor, sigmas: torch.Tensor,
                       step_index: torch.Tensor | int, noise_level: float = GRPO_NOISE_LEVEL,
                       prev_sample: torch.Tensor | None = None, noise: torch.Tensor | None = None):
    """One Flow-GRPO SDE step and the log-probability of the transition.

    ``sigma = sigmas[i]``, ``sigma_prev = sigmas[i + 1]``, ``dt = sigma_prev - sigma`` (negative),
    ``std_dev_t = sqrt(sigma / (1 - (sigma_max if sigma == 1 else sigma))) * noise_level`` with
    ``sigma_max = sigmas[1]`` (the *second* sigma: the first step's 1/(1-1) is avoided),
    ``mean = sample (1 + std^2 / (2 sigma) dt) + v (1 + std^2 (1 - sigma) / (2 sigma)) dt``,
    ``prev = mean + std sqrt(-dt) noise`` unless given, Gaussian log-density of ``prev`` (detached) with
    scale ``std sqrt(-dt)``, averaged over all non-batch elements. Everything in float32.
    Returns (prev_sample, log_prob (B,), prev_sample_mean, std_dev_t (B, 1, ...)).

    Source: yifan123/flow_grpo flow_grpo/diffusers_patch/sd3_sde_with_logprob.py, sde_step_with_logprob
    (commit ac4c86e; the 54809b5 version is the same for sde_type='sde' and broadcasts over any rank).
    The scheduler's sigmas are float32, so ``sigmas`` is cast to float32 here.
    """
    sample = sample.float()
    model_output = model_output.float()
    sig = sigmas.to(torch.float32)
    b = sample.shape[0]
    idx = torch.as_tensor(step_index, dtype=torch.long).reshape(-1).expand(b)
    shape = (b,) + (1,) * (sample.ndim - 1)
    sigma = sig[idx].view(shape)
    sigma_prev = sig[idx + 1].view(shape)
    sigma_max = sig[1].item()
    dt = sigma_prev - sigma
    std_dev_t = torch.sqrt(sigma / (1 - torch.where(sigma == 1, sigma_max, sigma))) * noise_level
    mean = (sample * (1 + std_dev_t ** 2 / (2 * sigma) * dt)
            + model_output * (1 + std_dev_t ** 2 * (1 - sigma) / (2 * sigma)) * dt)
    scale = std_dev_t * torch.sqrt(-1 * dt)
    if prev_sample is None:
        if noise is None:
            raise ValueError("give prev_sample or noise")
        prev_sample = mean + scale * noise.float()
    else:
        prev_sample = prev_sample.float()
    log_prob = (-((prev_sample.detach() - mean) ** 2) / (2 * scale ** 2) - torch.log(scale)
                - torch.log(torch.sqrt(2 * torch.as_tensor(math.pi))))
    log_prob = log_prob.mean(dim=tuple(range(1, log_prob.ndim)))
    return prev_sample, log_prob, mean, std_dev_t


def flow_grpo_kl(prev_sample_mean: torch.Tensor, prev_sample_mean_ref: torch.Tensor,
                 std_dev_t: torch.Tensor) -> torch.Tensor:
    """The Flow-GRPO KL loss: per sample ``mean((mean - mean_ref)^2) / (2 std_dev_t^2)`` over all non-batch
    dims (SD3: (1, 2, 3); packed Qwen latents: (1, 2)), then the batch mean. Note the denominator has
    ``std_dev_t^2`` and not the transition variance ``std_dev_t^2 * (-dt)``.

    Source: yifan123/flow_grpo scripts/train_sd3.py, main(), training loop (``kl_loss = ...``)
    (commit ac4c86e); scripts/train_qwenimage_edit_plus.py (commit 9dcdc35) uses dim=(1, 2).
    """
    dims = tuple(range(1, prev_sample_mean.ndim))
    per = ((prev_sample_mean - prev_sample_mean_ref) ** 2).mean(dim=dims, keepdim=True) / (2 * std_dev_t ** 2)
    return per.mean()


def flow_grpo_policy_loss(log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor,
                          adv_clip_max: float = GRPO_ADV_CLIP_MAX, clip_range: float = GRPO_CLIP_RANGE):
    """PPO clipped surrogate: ``mean(max(-A ratio, -A clamp(ratio, 1 - eps, 1 + eps)))``, A clipped to
    +-adv_clip_max, ``ratio = exp(log_prob - old_log_prob)``. Returns (policy_loss, ratio).

    Source: yifan123/flow_grpo scripts/train_sd3.py, main(), training loop ("grpo logic") (commit ac4c86e).
    """
    a = advantages.clamp(-adv_clip_max, adv_clip_max)
    ratio = torch.exp(log_prob - old_log_prob)
    unclipped = -a * ratio
    clipped = -a * ratio.clamp(1.0 - clip_range, 1.0 + clip_range)
    return torch.maximum(unclipped, clipped).mean(), ratio


def flow_grpo_train_step_indices(num_steps: int, timestep_fraction: float = 1.0) -> list[int]:
    """SD3 Flow-GRPO trains the first ``int(N * fraction)`` steps of each trajectory, in order (no
    permutation); with fraction 0.99 and N = 10 that is steps 0..8 (the last step, to sigma = 0, is skipped).

    Source: yifan123/flow_grpo scripts/train_sd3.py, main(): ``num_train_timesteps`` and
    ``train_timesteps = [step_index for step_index in range(num_train_timesteps)]`` (commit ac4c86e).
    """
    return list(range(int(num_steps * timestep_fraction)))


def flow_grpo_sde_window(num_steps: int, window_size: int, window_range: tuple[int, int], process_index: int):
    """Qwen-Image-Edit-Plus rollouts: which steps are stochastic (and trained). ``window_size == 0``:
    steps [0, N - 1) (all but the last, which is an ODE step); else a window of ``window_size`` steps
    whose start is ``randint(lo, hi - size)`` from Python's ``random`` seeded with the process index
    (so the same window on a given rank at every call). Returns (start, end).

    Source: yifan123/flow_grpo flow_grpo/diffusers_patch/qwenimage_edit_plus_pipeline_with_logprob.py,
    pipeline_with_logprob (``random.seed(process_index)``, ``sde_window``) (commit 9dcdc35).
    """
    import random

    if window_size > 0:
        rng = random.Random(process_index)
        start = rng.randint(window_range[0], window_range[1] - window_size)
        return start, start + window_size
    return 0, num_steps - 1


# ================================================================================================
# diffusers Qwen-Image-Edit-Plus (2509)
# ================================================================================================

# huggingface/diffusers src/diffusers/pipelines/qwenimage/pipeline_qwenimage_edit_plus.py,
# QwenImageEditPlusPipeline.__init__ / _get_qwen_prompt_embeds and module constants (commit 58eb52c).
QWEN_EDIT_PLUS_TEMPLATE = (
    "<|im_start|>system\nDescribe the key features of the input image (color, shape, size, texture, objects, "
    "background), then explain how the user's text instruction should alter or modify the image. Generate a new "
    "image that meets the user's requirements while maintaining consistency with the original input where "
    "appropriate.<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n")
QWEN_EDIT_PLUS_DROP_IDX = 64
QWEN_EDIT_PLUS_IMAGE_PROMPT = "Picture {}: <|vision_start|><|image_pad|><|vision_end|>"
QWEN_CONDITION_IMAGE_AREA = 384 * 384
QWEN_VAE_IMAGE_AREA = 1024 * 1024
# pipeline_qwenimage_edit.py QwenImageEditPipeline.__init__ (single image, no "Picture 1:" prefix).
QWEN_EDIT_TEMPLATE = (
    "<|im_start|>system\nDescribe the key features of the input image (color, shape, size, texture, objects, "
    "background), then explain how the user's text instruction should alter or modify the image. Generate a new "
    "image that meets the user's requirements while maintaining consistency with the original input where "
    "appropriate.<|im_end|>\n<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>{}<|im_end|>\n"
    "<|im_start|>assistant\n")
# pipeline_qwenimage.py QwenImagePipeline.__init__ (text-to-image; what oars-fast embeds today).
QWEN_T2I_TEMPLATE = (
    "<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, text, spatial "
    "relationships of the objects and background:<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n")
QWEN_T2I_DROP_IDX = 34


def qwen_edit_plus_prompt_text(instruction: str, n_images: int = 1) -> str:
    """The chat text fed to Qwen2.5-VL for one instruction and ``n_images`` images: the template around
    ``"Picture 1: <|vision_start|><|image_pad|><|vision_end|>" ... + instruction``; after encoding, the
    first 64 hidden states are dropped.

    Source: huggingface/diffusers pipeline_qwenimage_edit_plus.py, QwenImageEditPlusPipeline._get_qwen_prompt_embeds
    (commit 58eb52c).
    """
    prefix = "".join(QWEN_EDIT_PLUS_IMAGE_PROMPT.format(i + 1) for i in range(n_images))
    return QWEN_EDIT_PLUS_TEMPLATE.format(prefix + instruction)


def qwen_calculate_dimensions(target_area: float, ratio: float) -> tuple[int, int]:
    """(width, height) of area ~target_area and aspect ``ratio = w / h``, each rounded to a multiple of 32.

    Source: huggingface/diffusers pipeline_qwenimage_edit_plus.py, calculate_dimensions (commit 58eb52c;
    the edit pipeline's version also returns the ratio).
    """
    width = math.sqrt(target_area * ratio)
    height = width / ratio
    return round(width / 32) * 32, round(height / 32) * 32


def qwen_calculate_shift(image_seq_len: int, base_seq_len: int = 256, max_seq_len: int = 8192,
                         base_shift: float = 0.5, max_shift: float = 0.9) -> float:
    """mu, linear in the target's token count. Defaults: Qwen-Image's scheduler_config.json values (the
    function's own defaults are 256/4096/0.5/1.15; the pipeline passes the config's).

    Source: huggingface/diffusers pipeline_qwenimage_edit_plus.py, calculate_shift (commit 58eb52c).
    """
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return image_seq_len * m + (base_shift - m * base_seq_len)


def qwen_sigmas(num_steps: int, image_seq_len: int, shift_terminal: float | None = 0.02, **shift_kw) -> torch.Tensor:
    """The N + 1 sigmas the Edit-Plus pipeline integrates over: ``linspace(1, 1/N, N)``, exponential
    time shift ``e^mu / (e^mu + (1/s - 1))``, stretch so the last equals ``shift_terminal``, then a 0.
    float32 as the scheduler keeps them.

    Source: huggingface/diffusers pipeline_qwenimage_edit_plus.py, QwenImageEditPlusPipeline.__call__
    step 5, and schedulers/scheduling_flow_match_euler_discrete.py, FlowMatchEulerDiscreteScheduler
    set_timesteps / _time_shift_exponential / stretch_shift_to_terminal (commit 58eb52c).
    """
    import numpy as np

    s = np.linspace(1.0, 1 / num_steps, num_steps).astype(np.float32)
    s = torch.from_numpy(s).to(torch.float32)
    mu = qwen_calculate_shift(image_seq_len, **shift_kw)
    s = math.exp(mu) / (math.exp(mu) + (1 / s - 1) ** 1.0)
    if shift_terminal:
        one_minus = 1 - s
        s = 1 - one_minus / (one_minus[-1] / (1 - shift_terminal))
    return torch.cat([s.to(torch.float32), torch.zeros(1)])


def qwen_true_cfg(noise_pred: torch.Tensor, neg_noise_pred: torch.Tensor, true_cfg_scale: float = 4.0) -> torch.Tensor:
    """True CFG with norm rescaling, on packed predictions (B, L, C): ``comb = neg + s (cond - neg)``, then
    ``comb * ||cond|| / ||comb||`` with the norms over the last (channel) axis, per token.

    Source: huggingface/diffusers pipeline_qwenimage_edit_plus.py, QwenImageEditPlusPipeline.__call__
    denoising loop (commit 58eb52c); the same in flow_grpo's compute_log_prob for Qwen-Image-Edit-Plus.
    """
    comb = neg_noise_pred + true_cfg_scale * (noise_pred - neg_noise_pred)
    return comb * (torch.norm(noise_pred, dim=-1, keepdim=True) / torch.norm(comb, dim=-1, keepdim=True))
