"""Typed configuration: one dataclass per component, YAML files, dotted overrides.

A job (what one CLI command runs) is a dataclass whose fields are component configs::

    cfg = load_config(SFTJob, "configs/demo/sft.yaml", ["optim.lr=1e-4", "data.batch_size=8"])

Every field carries a docstring in ``metadata["doc"]`` (shown by ``oars-fast <cmd> --help``).
Validation lives in ``__post_init__`` and raises :class:`ConfigError` naming the field, the bad
value and the valid values. Batch sizes are *global*; :func:`per_rank` derives the per-rank
micro-batch with a divisibility check. No config holds a world size.
"""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field and the valid values."""


def doc(default: Any = dataclasses.MISSING, text: str = "", *, factory: Any = None) -> Any:
    """A dataclass field with a docstring (``metadata['doc']``)."""
    if factory is not None:
        return field(default_factory=factory, metadata={"doc": text})
    return field(default=default, metadata={"doc": text})


def _check_choice(obj: Any, name: str, valid: typing.Iterable[Any]) -> None:
    value = getattr(obj, name)
    valid = list(valid)
    if value not in valid:
        raise ConfigError(f"{type(obj).__name__}.{name}={value!r} is not valid; choose one of {valid}")


def _check_range(obj: Any, name: str, lo: float | None = None, hi: float | None = None,
                 lo_open: bool = False) -> None:
    value = getattr(obj, name)
    bad = (lo is not None and (value <= lo if lo_open else value < lo)) or (hi is not None and value > hi)
    if bad:
        lo_s = "-inf" if lo is None else f"{lo}"
        hi_s = "inf" if hi is None else f"{hi}"
        bracket = "(" if lo_open else "["
        raise ConfigError(f"{type(obj).__name__}.{name}={value!r} is out of range; valid: {bracket}{lo_s}, {hi_s}]")


def _check_pair(obj: Any, name: str, lo: float | None = None, hi: float | None = None) -> None:
    value = getattr(obj, name)
    if len(value) != 2 or value[0] > value[1]:
        raise ConfigError(f"{type(obj).__name__}.{name}={value!r} must be a [low, high] pair with low <= high")
    for v in value:
        if (lo is not None and v < lo) or (hi is not None and v > hi):
            raise ConfigError(f"{type(obj).__name__}.{name}={value!r}: values must lie in [{lo}, {hi}]")


def _check_probs(obj: Any, name: str, n: int) -> None:
    value = getattr(obj, name)
    if len(value) != n or any(p < 0 for p in value) or not math.isclose(sum(value), 1.0, abs_tol=1e-6):
        raise ConfigError(f"{type(obj).__name__}.{name}={value!r} must be {n} non-negative probabilities summing to 1")


def launched_world() -> int:
    """Processes started by the launcher (``WORLD_SIZE``; 1 when run plainly): batch sizes are checked
    against it when a job is loaded, so a bad split is a config error before anything starts."""
    import os

    return int(os.environ.get("WORLD_SIZE", "1"))


def per_rank(global_size: int, world_size: int, grad_accum: int = 1, name: str = "batch_size") -> int:
    """Per-rank micro-batch from a global batch: ``global = micro * grad_accum * world_size``."""
    denom = world_size * grad_accum
    if global_size % denom != 0:
        raise ConfigError(
            f"{name}={global_size} (global) is not divisible by world_size*grad_accum={world_size}*{grad_accum}"
            f"={denom}; choose a multiple of {denom}"
        )
    return global_size // denom


# --------------------------------------------------------------------------------------------
# Components
# --------------------------------------------------------------------------------------------


@dataclass
class RunConfig:
    name: str = doc("demo", "run name; outputs go to <output_dir>/<name>/")
    output_dir: str = doc("runs", "parent folder of run folders")
    seed: int = doc(0, "global seed (data order, crops, noise, dropout)")
    device: str = doc("auto", "auto | cpu | cuda (auto: cuda when available)")
    resume: bool = doc(False, "continue from the newest complete checkpoint in the run folder")

    def __post_init__(self) -> None:
        _check_choice(self, "device", ["auto", "cpu", "cuda"])
        if not self.name or "/" in self.name:
            raise ConfigError(f"RunConfig.name={self.name!r} must be a non-empty folder name without '/'")

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.name


@dataclass
class DataConfig:
    source: str = doc("demo", "demo | hr | paired | lq: embedded demo photos, HR folder (LR made by "
                      "degradation), paired LR/HR folders matched by file stem, LQ folder (no ground truth)")
    hr_dir: str | None = doc(None, "folder of HR images (source=hr or paired)")
    lr_dir: str | None = doc(None, "folder of LR images (source=paired)")
    lq_dir: str | None = doc(None, "folder of real low-quality inputs without ground truth (source=lq)")
    demo_cache: str = doc("~/.cache/oars-fast/demo", "where the embedded demo patches are written once")
    demo_patch: int = doc(128, "side of the HR patches cut from the bundled photos")
    crop_size: int = doc(64, "HR crop side (the LR crop is crop_size/scale)")
    scale: int = doc(4, "super-resolution factor")
    batch_size: int = doc(4, "global batch size (all ranks, all accumulation steps together)")
    num_workers: int = doc(0, "data-loader worker processes per rank")
    small_image: str = doc("pad", "pad | skip: images smaller than the crop are reflect-padded or skipped")
    flip: bool = doc(True, "random horizontal/vertical flips (applied alike to LR and HR)")
    loader: str = doc("torch", "torch | dali")

    def __post_init__(self) -> None:
        _check_choice(self, "source", ["demo", "hr", "paired", "lq"])
        _check_choice(self, "small_image", ["pad", "skip"])
        _check_choice(self, "loader", ["torch", "dali"])
        _check_choice(self, "scale", [1, 2, 4, 8])
        _check_range(self, "batch_size", 1)
        _check_range(self, "num_workers", 0)
        _check_range(self, "crop_size", 1)
        if self.crop_size % self.scale:
            raise ConfigError(f"DataConfig.crop_size={self.crop_size} must be a multiple of scale={self.scale}")
        needs = {"hr": ["hr_dir"], "paired": ["hr_dir", "lr_dir"], "lq": ["lq_dir"]}.get(self.source, [])
        for name in needs:
            if not getattr(self, name):
                raise ConfigError(f"DataConfig.{name} is required when source={self.source!r}")


@dataclass
class DegradationConfig:
    """Real-ESRGAN x4plus second-order degradation (defaults are its published settings)."""

    kind: str = doc("realesrgan", "realesrgan | bicubic: the second-order chain, or plain bicubic downsampling "
                    "(a clean generic task: the demo's stand-in for a pretrained base)")
    kernel_range: list[int] = doc(None, "odd blur-kernel sizes to draw from", factory=lambda: [7, 9, 11, 13, 15, 17, 19, 21])
    kernel_list: list[str] = doc(None, "blur kernel types", factory=lambda: [
        "iso", "aniso", "generalized_iso", "generalized_aniso", "plateau_iso", "plateau_aniso"])
    kernel_prob: list[float] = doc(None, "probabilities of kernel_list", factory=lambda: [0.45, 0.25, 0.12, 0.03, 0.12, 0.03])
    sinc_prob: float = doc(0.1, "probability of a sinc (ringing) kernel in the first blur")
    blur_sigma: list[float] = doc(None, "Gaussian sigma range, first blur", factory=lambda: [0.2, 3.0])
    betag_range: list[float] = doc(None, "generalized Gaussian shape range, first blur", factory=lambda: [0.5, 4.0])
    betap_range: list[float] = doc(None, "plateau shape range, first blur", factory=lambda: [1.0, 2.0])
    resize_prob: list[float] = doc(None, "P(up, down, keep), first resize", factory=lambda: [0.2, 0.7, 0.1])
    resize_range: list[float] = doc(None, "scale range, first resize", factory=lambda: [0.15, 1.5])
    gaussian_noise_prob: float = doc(0.5, "P(Gaussian noise) vs Poisson, first pass")
    noise_range: list[float] = doc(None, "Gaussian noise sigma range (on 0..255), first pass", factory=lambda: [1.0, 30.0])
    poisson_scale_range: list[float] = doc(None, "Poisson noise scale range, first pass", factory=lambda: [0.05, 3.0])
    gray_noise_prob: float = doc(0.4, "P(gray noise: same noise on all channels), first pass")
    jpeg_range: list[float] = doc(None, "JPEG quality range, first pass", factory=lambda: [30.0, 95.0])

    second_blur_prob: float = doc(0.8, "probability of the second blur")
    sinc_prob2: float = doc(0.1, "probability of a sinc kernel in the second blur")
    blur_sigma2: list[float] = doc(None, "Gaussian sigma range, second blur", factory=lambda: [0.2, 1.5])
    betag_range2: list[float] = doc(None, "generalized Gaussian shape range, second blur", factory=lambda: [0.5, 4.0])
    betap_range2: list[float] = doc(None, "plateau shape range, second blur", factory=lambda: [1.0, 2.0])
    resize_prob2: list[float] = doc(None, "P(up, down, keep), second resize", factory=lambda: [0.3, 0.4, 0.3])
    resize_range2: list[float] = doc(None, "scale range, second resize", factory=lambda: [0.3, 1.2])
    gaussian_noise_prob2: float = doc(0.5, "P(Gaussian noise) vs Poisson, second pass")
    noise_range2: list[float] = doc(None, "Gaussian noise sigma range, second pass", factory=lambda: [1.0, 25.0])
    poisson_scale_range2: list[float] = doc(None, "Poisson noise scale range, second pass", factory=lambda: [0.05, 2.5])
    gray_noise_prob2: float = doc(0.4, "P(gray noise), second pass")
    jpeg_range2: list[float] = doc(None, "JPEG quality range, second pass", factory=lambda: [30.0, 95.0])
    final_sinc_prob: float = doc(0.8, "probability of the final sinc filter")

    def __post_init__(self) -> None:
        _check_choice(self, "kind", ["realesrgan", "bicubic"])
        for k in self.kernel_range:
            if k % 2 == 0 or not 3 <= k <= 21:
                raise ConfigError(f"DegradationConfig.kernel_range={self.kernel_range!r}: sizes must be odd in [3, 21]")
        valid_kernels = ["iso", "aniso", "generalized_iso", "generalized_aniso", "plateau_iso", "plateau_aniso"]
        for k in self.kernel_list:
            if k not in valid_kernels:
                raise ConfigError(f"DegradationConfig.kernel_list has {k!r}; valid kernels: {valid_kernels}")
        _check_probs(self, "kernel_prob", len(self.kernel_list))
        _check_probs(self, "resize_prob", 3)
        _check_probs(self, "resize_prob2", 3)
        for name in ("sinc_prob", "sinc_prob2", "gaussian_noise_prob", "gaussian_noise_prob2", "gray_noise_prob",
                     "gray_noise_prob2", "second_blur_prob", "final_sinc_prob"):
            _check_range(self, name, 0.0, 1.0)
        for name in ("blur_sigma", "blur_sigma2", "betag_range", "betag_range2", "betap_range", "betap_range2",
                     "resize_range", "resize_range2", "noise_range", "noise_range2", "poisson_scale_range",
                     "poisson_scale_range2"):
            _check_pair(self, name, 0.0)
        _check_pair(self, "jpeg_range", 1, 100)
        _check_pair(self, "jpeg_range2", 1, 100)


@dataclass
class ModelConfig:
    pretrained: str | None = doc(None, "diffusers checkpoint folder or hub id (e.g. Qwen/Qwen-Image-Edit-2509); "
                                 "None builds the tiny model from `tiny`")
    tiny: dict = doc(None, "transformer config overrides for the tiny CPU model", factory=dict)
    prompt_embeds: str | None = doc(None, "safetensors file with the cached SR prompt embedding "
                                    "(None: computed with the checkpoint's text encoder, or a stored tensor for tiny)")
    prompt: str = doc("Restore this low-resolution photo into a sharp, detailed high-resolution photo.",
                      "the fixed SR instruction")
    dtype: str = doc("fp32", "fp32 | bf16 | fp16 (weights and compute)")
    attention_backend: str = doc("auto", "auto | native | flash | sage: diffusers attention backend "
                                 "(auto: flash when installed, else PyTorch SDPA)")
    gradient_checkpointing: bool = doc(False, "recompute transformer blocks in backward")

    def __post_init__(self) -> None:
        _check_choice(self, "dtype", ["fp32", "bf16", "fp16"])
        _check_choice(self, "attention_backend", ["auto", "native", "flash", "sage"])


@dataclass
class LoRAConfig:
    rank: int = doc(32, "LoRA rank r")
    alpha: float = doc(64.0, "LoRA alpha (scale = alpha / rank)")
    target_modules: list[str] = doc(None, "module names to adapt", factory=lambda: [
        "to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"])
    dropout: float = doc(0.0, "LoRA dropout")
    fused: bool = doc(True, "use the fused Triton LoRA linear where it runs (GPU, or TRITON_INTERPRET=1)")

    def __post_init__(self) -> None:
        _check_range(self, "rank", 1)
        _check_range(self, "alpha", 0.0, lo_open=True)
        _check_range(self, "dropout", 0.0, 1.0)
        if not self.target_modules:
            raise ConfigError("LoRAConfig.target_modules must name at least one module")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


@dataclass
class SamplerConfig:
    steps: int = doc(40, "Euler steps (RL rollouts use 6, inference 40)")
    shift: str = doc("dynamic", "dynamic | fixed | none: resolution-dependent (Qwen-Image), fixed `shift_value`, none")
    shift_value: float = doc(3.0, "the shift when shift=fixed")
    base_shift: float = doc(0.5, "dynamic shift: mu at base_seq_len")
    max_shift: float = doc(0.9, "dynamic shift: mu at max_seq_len")
    base_seq_len: int = doc(256, "dynamic shift: token count of base_shift")
    max_seq_len: int = doc(8192, "dynamic shift: token count of max_shift")
    shift_terminal: float | None = doc(0.02, "stretch sigmas so the last one equals this (None: off)")
    sde: bool = doc(False, "stochastic (SDE) steps instead of the deterministic ODE")
    noise_level: float = doc(0.7, "SDE noise level (exploration)")

    def __post_init__(self) -> None:
        _check_range(self, "steps", 1)
        _check_choice(self, "shift", ["dynamic", "fixed", "none"])
        _check_range(self, "noise_level", 0.0)
        if self.shift_terminal is not None:
            _check_range(self, "shift_terminal", 0.0, 1.0, lo_open=True)


@dataclass
class OptimizerConfig:
    lr: float = doc(1e-4, "peak learning rate")
    betas: list[float] = doc(None, "AdamW betas", factory=lambda: [0.9, 0.999])
    weight_decay: float = doc(0.01, "AdamW weight decay")
    eps: float = doc(1e-8, "AdamW epsilon")
    warmup_steps: int = doc(0, "linear warm-up steps")
    schedule: str = doc("constant", "constant | cosine | linear (after warm-up)")
    min_lr_ratio: float = doc(0.0, "cosine/linear: final lr as a fraction of lr")
    grad_clip: float = doc(1.0, "clip the global grad norm to this (0: off)")
    grad_accum: int = doc(1, "gradient accumulation steps")

    def __post_init__(self) -> None:
        _check_range(self, "lr", 0.0, lo_open=True)
        _check_choice(self, "schedule", ["constant", "cosine", "linear"])
        _check_range(self, "warmup_steps", 0)
        _check_range(self, "grad_accum", 1)
        _check_range(self, "grad_clip", 0.0)
        _check_range(self, "min_lr_ratio", 0.0, 1.0)
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ConfigError(f"OptimizerConfig.betas={self.betas!r} must be two values in [0, 1)")


@dataclass
class DeepSpeedConfig:
    """How a training stage runs on several processes. The DeepSpeed JSON is generated from the job
    (batch sizes, accumulation, clipping, precision) so ``train_batch_size = micro * accum * world``
    always holds; ``overrides`` adds or replaces raw DeepSpeed keys on top."""

    enabled: str = doc("auto", "auto | on | off: DeepSpeed engine (auto: on when launched with more than one "
                       "process, by the deepspeed launcher or torchrun; off: plain PyTorch, one process)")
    zero_stage: int = doc(2, "ZeRO stage 0-3 (3: parameters sharded too, for full-parameter training of the 20B "
                          "transformer; 2: optimizer state + gradients sharded, for LoRA RL)")
    offload_optimizer: bool = doc(False, "ZeRO-Offload: optimizer state and step on the CPU")
    offload_param: bool = doc(False, "ZeRO-3 only: parameters offloaded to the CPU between uses")
    bf16: str = doc("auto", "auto | on | off: DeepSpeed bf16 (module in bf16, fp32 master weights in the "
                    "optimizer); auto: on when model.dtype=bf16 and the device is CUDA")
    overlap_comm: bool = doc(True, "overlap gradient reduction with backward (ZeRO 2/3)")
    bucket_size: int = doc(200_000_000, "reduce / all-gather bucket size in elements (ZeRO 2/3)")
    overrides: dict = doc(None, "raw DeepSpeed config keys merged (recursively) over the generated config; "
                          "batch keys must agree with the job's", factory=dict)

    def __post_init__(self) -> None:
        for name in ("enabled", "bf16"):  # YAML reads a bare on/off as a boolean
            value = getattr(self, name)
            if value in (True, False, "True", "False", "true", "false"):
                setattr(self, name, "on" if value in (True, "True", "true") else "off")
        _check_choice(self, "enabled", ["auto", "on", "off"])
        _check_choice(self, "zero_stage", [0, 1, 2, 3])
        _check_choice(self, "bf16", ["auto", "on", "off"])
        _check_range(self, "bucket_size", 1)
        if self.offload_param and self.zero_stage != 3:
            raise ConfigError(f"DeepSpeedConfig.offload_param=true needs zero_stage=3 (got {self.zero_stage})")


@dataclass
class SFTConfig:
    steps: int = doc(100, "optimizer steps")
    train: str = doc("full", "full | lora: train every transformer weight, or a LoRA (see `lora`)")
    timestep_sampling: str = doc("logit_normal", "uniform | logit_normal | shifted")
    logit_mean: float = doc(0.0, "logit-normal mean")
    logit_std: float = doc(1.0, "logit-normal std")
    ema_decay: float = doc(0.0, "EMA of the trained weights (0: off)")
    latent_pool: int = doc(0, "0: crop, degrade and VAE-encode every batch on the fly; N > 0: draw N samples once "
                           "(crops, flips, degradations), encode them once and train on random batches of this "
                           "fixed pool (for small runs where the VAE dominates the step time, e.g. the CPU demo)")
    log_every: int = doc(1, "log line every N steps")
    sample_every: int = doc(50, "LR | SR | HR grid every N steps (0: off)")
    save_every: int = doc(50, "checkpoint every N steps (0: only at the end)")
    keep_checkpoints: int = doc(2, "how many complete checkpoints to keep")

    def __post_init__(self) -> None:
        _check_range(self, "steps", 1)
        _check_choice(self, "train", ["full", "lora"])
        _check_choice(self, "timestep_sampling", ["uniform", "logit_normal", "shifted"])
        _check_range(self, "ema_decay", 0.0, 1.0)
        _check_range(self, "latent_pool", 0)
        _check_range(self, "logit_std", 0.0, lo_open=True)
        for name in ("log_every", "sample_every", "save_every"):
            _check_range(self, name, 0)
        _check_range(self, "keep_checkpoints", 1)


@dataclass
class VAEPretrainConfig:
    steps: int = doc(300, "autoencoder steps of the tiny VAE")
    batch_size: int = doc(8, "HR crops per step")
    crop_size: int = doc(32, "HR crop side for the autoencoder (convolutional: small crops train faster)")
    lr: float = doc(1e-3, "AdamW learning rate")
    kl_weight: float = doc(1e-3, "weight of the posterior KL (per element)")

    def __post_init__(self) -> None:
        _check_range(self, "steps", 1)
        _check_range(self, "batch_size", 1)
        _check_range(self, "crop_size", 8)
        _check_range(self, "lr", 0.0, lo_open=True)
        _check_range(self, "kl_weight", 0.0)


@dataclass
class RewardConfig:
    name: str = doc("dists", "dists | ssim | lr_consistency | custom: DISTS (FR, needs weights), SSIM (FR, classical "
                    "stand-in for DISTS), LR consistency (NR, classical stand-in until COMPASS lands), or any "
                    "RewardFn named by `custom`")
    custom: str | None = doc(None, "name=custom: 'package.module:factory'; factory(device) returns a RewardFn")
    custom_full_reference: bool = doc(False, "name=custom: whether that reward needs the ground truth")
    dists_vgg: str | None = doc(None, "VGG16 weights in torchvision's vgg16() layout (features.N.weight/bias)")
    dists_weights: str | None = doc(None, "DISTS alpha/beta weights.pt of the DISTS release")
    tau: float = doc(0.05, "lr_consistency: reward = exp(-mean|down(SR) - LR| / tau)")
    batch_size: int = doc(32, "images per reward forward")

    def __post_init__(self) -> None:
        _check_choice(self, "name", ["dists", "ssim", "lr_consistency", "custom"])
        if self.name == "custom" and (not self.custom or ":" not in self.custom):
            raise ConfigError(f"RewardConfig.custom={self.custom!r} must be 'package.module:factory' when name='custom'")
        _check_range(self, "tau", 0.0, lo_open=True)
        _check_range(self, "batch_size", 1)

    @property
    def full_reference(self) -> bool:
        return self.name in ("dists", "ssim") or (self.name == "custom" and self.custom_full_reference)


@dataclass
class RLConfig:
    mode: str = doc("fr", "fr | nr: full-reference (ground truth, FR reward) or no-reference (NR reward)")
    objective: str = doc("nft", "nft | flow_grpo: DiffusionNFT negative-aware loss on ODE rollouts, or Flow-GRPO "
                         "(SDE rollouts, per-step log-probabilities, clipped ratio)")
    iterations: int = doc(100, "RL iterations (rollout + reward + update + old-policy update)")
    inputs_per_iter: int = doc(4, "LR inputs per iteration (global); each gets group_size candidates")
    group_size: int = doc(24, "K: candidates per LR input")
    rollout_steps: int = doc(6, "sampler steps of a rollout")
    sde: bool = doc(False, "NFT: SDE rollouts instead of the deterministic ODE (Flow-GRPO always uses the SDE)")
    noise_level: float = doc(0.7, "SDE noise level")
    timesteps_per_sample: int = doc(2, "NFT: random times per candidate in the update")
    micro_batch: int = doc(16, "candidates per forward in the update")
    beta: float = doc(1.0, "NFT: mixing of the implicit positive/negative policies")
    kl_weight: float = doc(1e-4, "weight of ||v_theta - v_ref||^2 to the base model (adapters off); 0: no ref pass")
    adv_clip: float = doc(5.0, "advantage clip before mapping to r in [0, 1]")
    global_std: bool = doc(True, "normalise advantages by the std of all the iteration's rewards (DiffusionNFT) "
                           "instead of each group's own")
    filter_mean: float = doc(0.9, "drop groups whose reward mean is above this ...")
    filter_std: float = doc(0.05, "... and whose reward std is below this")
    grpo_clip: float = doc(1e-4, "Flow-GRPO: ratio clip range")
    eta_schedule: str = doc("linear", "old-policy EMA: linear: eta = min(eta_rate * iteration, eta_max) "
                            "(DiffusionNFT's default); constant: eta = eta_max")
    eta_rate: float = doc(0.001, "linear eta schedule: slope per iteration")
    eta_max: float = doc(0.5, "eta ceiling (linear) or value (constant)")
    init_lora: str | None = doc(None, "adapter folder to continue (NR-RL continues FR-RL's LoRA)")
    sft_model: str | None = doc(None, "SFT model folder: at the end the LoRA delta is merged into it -> <run>/merged")
    eval_inputs: int = doc(8, "held-out LR inputs whose mean reward is measured at the start and end")
    eval_every: int = doc(0, "also measure it every N iterations (logged as eval_reward; 0: off)")
    log_every: int = doc(1, "log line every N iterations")
    probe_every: int = doc(10, "candidate grid of a fixed probe input every N iterations (0: off)")
    save_every: int = doc(20, "checkpoint every N iterations (0: only at the end)")
    keep_checkpoints: int = doc(2, "how many complete checkpoints to keep")

    def __post_init__(self) -> None:
        _check_choice(self, "mode", ["fr", "nr"])
        _check_choice(self, "objective", ["nft", "flow_grpo"])
        _check_choice(self, "eta_schedule", ["linear", "constant"])
        for name in ("iterations", "inputs_per_iter", "group_size", "rollout_steps", "timesteps_per_sample",
                     "micro_batch", "keep_checkpoints"):
            _check_range(self, name, 1)
        if self.objective == "flow_grpo" and self.rollout_steps < 2:
            raise ConfigError("RLConfig.rollout_steps must be >= 2 for flow_grpo (the last step is deterministic)")
        _check_range(self, "beta", 0.0, lo_open=True)
        _check_range(self, "kl_weight", 0.0)
        _check_range(self, "adv_clip", 0.0, lo_open=True)
        _check_range(self, "grpo_clip", 0.0, lo_open=True)
        _check_range(self, "eta_rate", 0.0)
        _check_range(self, "eta_max", 0.0, 1.0)
        for name in ("eval_inputs", "eval_every", "log_every", "probe_every", "save_every"):
            _check_range(self, name, 0)

    def eta(self, iteration: int) -> float:
        """The old-policy EMA coefficient after `iteration` (1-based)."""
        if self.eta_schedule == "constant":
            return self.eta_max
        return min(self.eta_rate * iteration, self.eta_max)


@dataclass
class MergeConfig:
    model: str = doc("", "model folder to merge into (OARS: the SFT model)")
    lora: str = doc("", "LoRA adapter folder (adapter_model.safetensors + adapter_config.json)")
    output: str = doc("", "output model folder")
    weight: float = doc(1.0, "multiplier of the LoRA delta")


@dataclass
class InferConfig:
    input: str = doc("", "an LR image file or a folder of them")
    output: str = doc("", "output folder (default: <run_dir>/sr)")
    checkpoint: str | None = doc(None, "model folder to load (default: model.pretrained)")
    batch_size: int = doc(4, "tiles per forward pass")
    tile: int = doc(0, "LR tile side; 0: whole image when it fits max_pixels, else 64")
    tile_overlap: int = doc(8, "LR pixels of overlap between tiles (blended linearly)")
    max_pixels: int = doc(512 * 512, "LR images with more pixels than this are tiled")

    def __post_init__(self) -> None:
        _check_range(self, "batch_size", 1)
        _check_range(self, "tile", 0)
        _check_range(self, "tile_overlap", 0)


# --------------------------------------------------------------------------------------------
# Jobs (one per CLI command)
# --------------------------------------------------------------------------------------------


@dataclass
class DataJob:
    """`oars-fast data`: prepare the data sets and report what was found."""

    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    degradation: DegradationConfig = field(default_factory=DegradationConfig)


@dataclass
class SFTJob:
    """`oars-fast sft`: cold-start flow-matching SFT (LR -> HR)."""

    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    degradation: DegradationConfig = field(default_factory=DegradationConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    optim: OptimizerConfig = field(default_factory=OptimizerConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)

    def __post_init__(self) -> None:
        if self.data.source == "lq":
            raise ConfigError("SFT needs ground truth: data.source='lq' is not valid here; choose one of "
                              "['demo', 'hr', 'paired']")
        per_rank(self.data.batch_size, launched_world(), self.optim.grad_accum, "data.batch_size")
        if self.deepspeed.zero_stage == 3 and self.sft.train == "lora" and self.deepspeed.enabled != "off":
            raise ConfigError("sft.train=lora with deepspeed.zero_stage=3 is not supported (the frozen base would be "
                              "sharded too and LoRA merging needs it whole); choose one of [0, 1, 2]")


@dataclass
class BaseJob(SFTJob):
    """`oars-fast base`: the demo's small pretrained base (tiny VAE + generic bicubic-SR pre-training)."""

    vae: VAEPretrainConfig = field(default_factory=VAEPretrainConfig)


@dataclass
class RLJob:
    """`oars-fast rl`: online RL of a LoRA on the base model (FR or NR reward; NFT or Flow-GRPO)."""

    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    degradation: DegradationConfig = field(default_factory=DegradationConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    optim: OptimizerConfig = field(default_factory=lambda: OptimizerConfig(lr=3e-4, weight_decay=0.0))
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    rl: RLConfig = field(default_factory=RLConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)

    def __post_init__(self) -> None:
        per_rank(self.rl.inputs_per_iter, launched_world(), 1, "rl.inputs_per_iter")
        if self.deepspeed.zero_stage == 3:
            raise ConfigError("deepspeed.zero_stage=3 is not valid for RL: the LoRA, its EMA (old policy) and the "
                              "adapter switching need whole parameters on every rank; choose one of [0, 1, 2]")
        if self.rl.mode == "fr" and self.data.source == "lq":
            raise ConfigError("rl.mode=fr needs ground truth: data.source='lq' is not valid; choose one of "
                              "['demo', 'hr', 'paired'] (or rl.mode=nr)")
        if self.rl.mode == "fr" and not self.reward.full_reference:
            raise ConfigError(f"rl.mode=fr needs a full-reference reward; reward.name={self.reward.name!r} is "
                              "no-reference; choose one of ['dists', 'ssim']")
        if self.rl.mode == "nr" and self.reward.full_reference:
            raise ConfigError(f"rl.mode=nr needs a no-reference reward; reward.name={self.reward.name!r} is "
                              "full-reference; choose one of ['lr_consistency']")


@dataclass
class MergeJob:
    """`oars-fast merge`: LoRA delta into a model's weights."""

    run: RunConfig = field(default_factory=RunConfig)
    merge: MergeConfig = field(default_factory=MergeConfig)


@dataclass
class InferJob:
    """`oars-fast infer`: LR images -> SR images."""

    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    infer: InferConfig = field(default_factory=InferConfig)
    scale: int = doc(4, "super-resolution factor")


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _strip_optional(tp: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _coerce(value: Any, tp: Any, where: str) -> Any:
    tp, optional = _strip_optional(tp)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{where} may not be null")
    origin = typing.get_origin(tp)
    try:
        if tp is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
                return value.lower() in ("true", "1", "yes")
            raise ValueError
        if tp is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if tp is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if tp is str:
            if isinstance(value, (dict, list)):
                raise ValueError
            return str(value)
        if origin is list:
            (inner,) = typing.get_args(tp) or (Any,)
            if not isinstance(value, (list, tuple)):
                raise ValueError
            return [_coerce(v, inner, f"{where}[{i}]") for i, v in enumerate(value)]
        if tp is dict or origin is dict:
            if not isinstance(value, dict):
                raise ValueError
            return dict(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{where}={value!r} is not a valid {getattr(tp, '__name__', tp)}") from None
    return value


def from_dict(cls: type, data: dict | None, where: str = "") -> Any:
    """Build dataclass `cls` from a nested dict, rejecting unknown keys (listing the valid ones)."""
    data = dict(data or {})
    hints = _hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(names))
    if unknown:
        prefix = f"{where}." if where else ""
        raise ConfigError(f"unknown config key(s) {[prefix + u for u in unknown]}; valid keys under "
                          f"{where or 'the top level'}: {names}")
    kwargs = {}
    for name in names:
        if name not in data:
            continue
        tp = hints[name]
        key = f"{where}.{name}" if where else name
        if dataclasses.is_dataclass(tp):
            if not isinstance(data[name], dict):
                raise ConfigError(f"{key} must be a mapping, got {data[name]!r}")
            kwargs[name] = from_dict(tp, data[name], key)
        else:
            kwargs[name] = _coerce(data[name], tp, key)
    return cls(**kwargs)


def to_dict(obj: Any) -> dict:
    return dataclasses.asdict(obj)


def apply_overrides(data: dict, overrides: typing.Iterable[str]) -> dict:
    """Apply ``a.b.c=value`` overrides (values parsed as YAML) to a nested dict, in order."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key.sub=value")
        key, raw = item.split("=", 1)
        value = yaml.safe_load(raw) if raw.strip() else ""
        node = data
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {p!r} is not a section")
        node[parts[-1]] = value
    return data


def load_config(cls: type, path: str | Path | None = None, overrides: typing.Iterable[str] = ()) -> Any:
    """Load job dataclass `cls` from a YAML file (optional) plus dotted overrides."""
    data: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file {path} must hold a mapping at the top level")
    data = apply_overrides(data, overrides)
    try:
        return from_dict(cls, data)
    except ConfigError as e:
        where = f" (in {path})" if path is not None else ""
        raise ConfigError(f"{e}{where}") from None


def save_config(cfg: Any, path: str | Path) -> None:
    """Write the resolved config as YAML."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def describe(cls: type, prefix: str = "") -> list[str]:
    """One line per leaf field: dotted name, default and docstring (for --help)."""
    lines = []
    defaults = cls()
    for f in dataclasses.fields(cls):
        value = getattr(defaults, f.name)
        name = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            lines.extend(describe(type(value), f"{name}."))
        else:
            lines.append(f"  {name} = {value!r}\n      {f.metadata.get('doc', '')}")
    return lines
