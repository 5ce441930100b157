"""Component configs: one dataclass per component (run, data, degradation, model, LoRA, sampler,
optimizer, DeepSpeed) and one per stage's own settings. Jobs (:mod:`.jobs`) combine them."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from .schema import ConfigError, Section, check_pair, check_probs, check_range, doc, section

KERNELS = Literal["iso", "aniso", "generalized_iso", "generalized_aniso", "plateau_iso", "plateau_aniso"]


@dataclass
class RunConfig(Section):
    name: str = doc("demo", "run name; outputs go to <output_dir>/<name>/")
    output_dir: str = doc("runs", "parent folder of run folders")
    seed: int = doc(0, "global seed (data order, crops, noise, dropout)")
    device: Literal["auto", "cpu", "cuda"] = doc("auto", "auto | cpu | cuda (auto: cuda when available)")
    resume: bool = doc(False, "continue from the newest complete checkpoint in the run folder")
    log_interval: float = doc(5.0, "seconds between training log lines on the terminal (every step still goes to "
                              "logs/<stage>.log, logs/<stage>.jsonl and TensorBoard)")

    def check(self) -> None:
        if not self.name or "/" in self.name:
            raise ConfigError(f"RunConfig.name={self.name!r} must be a non-empty folder name without '/'")
        check_range(self, "log_interval", 0.0)

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.name


@dataclass
class DataConfig(Section):
    source: Literal["demo", "hr", "paired", "lq"] = doc(
        "demo", "demo | hr | paired | lq: embedded demo photos, HR folder (LR made by degradation), paired LR/HR "
        "folders matched by file stem, LQ folder (no ground truth)")
    hr_dir: str | None = doc(None, "folder of HR images (source=hr or paired)")
    lr_dir: str | None = doc(None, "folder of LR images (source=paired)")
    lq_dir: str | None = doc(None, "folder of real low-quality inputs without ground truth (source=lq)")
    demo_cache: str = doc("~/.cache/oars-fast/demo", "where the embedded demo patches are written once")
    demo_patch: int = doc(128, "side of the HR patches cut from the bundled photos")
    crop_size: int = doc(64, "HR crop side (the LR crop is crop_size/scale)")
    scale: Literal[1, 2, 4, 8] = doc(4, "super-resolution factor")
    batch_size: int = doc(4, "global batch size (all ranks, all accumulation steps together)")
    num_workers: int = doc(0, "data-loader worker processes per rank")
    small_image: Literal["pad", "skip"] = doc("pad", "pad | skip: images smaller than the crop are reflect-padded "
                                              "or skipped")
    flip: bool = doc(True, "random horizontal/vertical flips (applied alike to LR and HR)")
    loader: Literal["torch", "dali"] = doc("torch", "torch | dali")

    def check(self) -> None:
        check_range(self, "batch_size", 1)
        check_range(self, "num_workers", 0)
        check_range(self, "crop_size", 1)
        if self.crop_size % self.scale:
            raise ConfigError(f"DataConfig.crop_size={self.crop_size} must be a multiple of scale={self.scale}")
        needs = {"hr": ["hr_dir"], "paired": ["hr_dir", "lr_dir"], "lq": ["lq_dir"]}.get(self.source, [])
        for name in needs:
            if not getattr(self, name):
                raise ConfigError(f"DataConfig.{name} is required when source={self.source!r}")


@dataclass
class DegradationPass(Section):
    """One pass of the Real-ESRGAN second-order chain: blur, resize, noise, JPEG."""

    blur_prob: float = doc(1.0, "probability of this pass's blur")
    sinc_prob: float = doc(0.1, "probability that the blur kernel is a sinc (ringing) kernel")
    blur_sigma: list[float] = doc(None, "Gaussian sigma range", factory=lambda: [0.2, 3.0])
    betag_range: list[float] = doc(None, "generalized Gaussian shape range", factory=lambda: [0.5, 4.0])
    betap_range: list[float] = doc(None, "plateau shape range", factory=lambda: [1.0, 2.0])
    resize_prob: list[float] = doc(None, "P(up, down, keep) of the resize", factory=lambda: [0.2, 0.7, 0.1])
    resize_range: list[float] = doc(None, "resize scale range", factory=lambda: [0.15, 1.5])
    gaussian_noise_prob: float = doc(0.5, "P(Gaussian noise) vs Poisson")
    noise_range: list[float] = doc(None, "Gaussian noise sigma range (on 0..255)", factory=lambda: [1.0, 30.0])
    poisson_scale_range: list[float] = doc(None, "Poisson noise scale range", factory=lambda: [0.05, 3.0])
    gray_noise_prob: float = doc(0.4, "P(gray noise: the same noise on all channels)")
    jpeg_range: list[float] = doc(None, "JPEG quality range", factory=lambda: [30.0, 95.0])

    def check(self) -> None:
        check_probs(self, "resize_prob", 3)
        for name in ("blur_prob", "sinc_prob", "gaussian_noise_prob", "gray_noise_prob"):
            check_range(self, name, 0.0, 1.0)
        for name in ("blur_sigma", "betag_range", "betap_range", "resize_range", "noise_range", "poisson_scale_range"):
            check_pair(self, name, 0.0)
        check_pair(self, "jpeg_range", 1, 100)


def _second_pass() -> DegradationPass:
    """Real-ESRGAN x4plus's second pass."""
    return DegradationPass(blur_prob=0.8, blur_sigma=[0.2, 1.5], resize_prob=[0.3, 0.4, 0.3], resize_range=[0.3, 1.2],
                           noise_range=[1.0, 25.0], poisson_scale_range=[0.05, 2.5])


@dataclass
class DegradationConfig(Section):
    """Real-ESRGAN x4plus second-order degradation (defaults are its published settings)."""

    kind: Literal["realesrgan", "bicubic"] = doc(
        "realesrgan", "realesrgan | bicubic: the second-order chain, or plain bicubic downsampling (a clean generic "
        "task: the demo's stand-in for a pretrained base)")
    kernel_range: list[int] = doc(None, "odd blur-kernel sizes to draw from",
                                  factory=lambda: [7, 9, 11, 13, 15, 17, 19, 21])
    kernel_list: list[KERNELS] = doc(None, "blur kernel types", factory=lambda: [
        "iso", "aniso", "generalized_iso", "generalized_aniso", "plateau_iso", "plateau_aniso"])
    kernel_prob: list[float] = doc(None, "probabilities of kernel_list",
                                   factory=lambda: [0.45, 0.25, 0.12, 0.03, 0.12, 0.03])
    first: DegradationPass = section(DegradationPass, "the first pass (Real-ESRGAN x4plus's first-order settings)")
    second: DegradationPass = section(_second_pass, "the second pass")
    final_sinc_prob: float = doc(0.8, "probability of the final sinc filter")

    def check(self) -> None:
        for k in self.kernel_range:
            if k % 2 == 0 or not 3 <= k <= 21:
                raise ConfigError(f"DegradationConfig.kernel_range={self.kernel_range!r}: sizes must be odd in [3, 21]")
        check_probs(self, "kernel_prob", len(self.kernel_list))
        check_range(self, "final_sinc_prob", 0.0, 1.0)


@dataclass
class ModelConfig(Section):
    pretrained: str | None = doc(None, "diffusers checkpoint folder or hub id (e.g. Qwen/Qwen-Image-Edit-2509); "
                                 "None builds the tiny model from `tiny`")
    tiny: dict = doc(None, "transformer config overrides for the tiny CPU model", factory=dict)
    prompt_embeds: str | None = doc(None, "safetensors file with the cached SR prompt embedding "
                                    "(None: computed with the checkpoint's text encoder, or a stored tensor for tiny)")
    prompt: str = doc("Restore this low-resolution photo into a sharp, detailed high-resolution photo.",
                      "the SR instruction")
    condition: Literal["auto", "edit", "text"] = doc(
        "auto", "edit: each LR input inside the Qwen2.5-VL prompt ('Picture 1: <image>' + instruction, the Edit-Plus "
        "template), as Qwen-Image-Edit-2509 was trained; computed once per input and reused for its candidates and "
        "timesteps (needs the checkpoint's text_encoder/, tokenizer/, processor/; a tiny model builds a tiny random "
        "one); text: one text-only prompt embedding for every input (the tiny demo); auto: what the model was "
        "trained with (an oars-fast folder's own; edit for a checkpoint with a text encoder, e.g. "
        "Qwen/Qwen-Image-Edit-2509; text for the tiny model)")
    dtype: Literal["fp32", "bf16", "fp16"] = doc("fp32", "fp32 | bf16 | fp16 (weights and compute)")
    attention_backend: Literal["auto", "sdpa", "native", "cudnn", "flash", "sage"] = doc(
        "auto", "auto | sdpa | native | cudnn | flash | sage: the transformer's attention kernel (diffusers' attention "
        "dispatch). sdpa: PyTorch scaled_dot_product_attention, PyTorch picking its kernel (native: the same, "
        "diffusers' name); cudnn: SDPA restricted to cuDNN attention (CUDA, bf16/fp16); flash: the flash-attn 2 "
        "package (CUDA, bf16/fp16; no attention mask: prompts must be unpadded, as they are with one fixed prompt or "
        "equal-length ones); sage: SageAttention (CUDA, the sageattention package). auto: cuDNN on Hopper or newer "
        "(sm_90+) with bf16/fp16, else flash-attn when installed (CUDA, bf16/fp16), else sdpa. The choice and its "
        "reason are logged once at load; an unavailable choice is a config error")
    gradient_checkpointing: bool = doc(False, "deprecated alias: true means checkpointing=full (used only while "
                                       "`checkpointing` is unset)")
    checkpointing: Literal["none", "full", "attention", "mlp"] | None = doc(
        None, "activation checkpointing of the transformer in backward: none | full (each whole block recomputed, "
        "diffusers' gradient checkpointing) | attention (only each block's joint attention module: QKV and output "
        "projections, QK norms, RoPE, SDPA) | mlp (only each block's two feed-forwards, image and text). null: from "
        "the deprecated gradient_checkpointing (true: full, false: none)")
    compile: Literal["none", "blocks"] = doc(
        "none", "none | blocks: regional torch.compile of each transformer block (diffusers' compile_repeated_blocks: "
        "block.compile(); compiled lazily at the first call, so the LoRA layers injected after loading are part of the "
        "graph). Costs a compile per block signature and adapter state (current / old / ref, grad or not) at the "
        "start; worth it on a GPU, not for the tiny CPU model")
    text_encoder_offload: bool = doc(
        False, "condition=edit: keep the prompt encoder (Qwen2.5-VL-7B, 16.6 GB in bf16) in pinned host memory and put "
        "it on the device only while it runs (RL: once per iteration for all its inputs; SFT: every micro-batch; "
        "inference and eval: once per image, across its tiles), then free its device copy. Costs one host-to-device "
        "copy of its weights each time and 16.6 GB of pinned host memory per rank (x8 ranks per node); frees its "
        "device memory for activations in between (see the README's memory plan)")

    @property
    def recompute(self) -> str:
        """The activation checkpointing in effect: `checkpointing`, else the deprecated boolean's."""
        if self.checkpointing is not None:
            return self.checkpointing
        return "full" if self.gradient_checkpointing else "none"


@dataclass
class LoRAConfig(Section):
    rank: int = doc(32, "LoRA rank r")
    alpha: float = doc(64.0, "LoRA alpha (scale = alpha / rank)")
    target_modules: list[str] = doc(None, "module names to adapt", factory=lambda: [
        "to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"])
    dropout: float = doc(0.0, "LoRA dropout")
    init: Literal["gaussian", "kaiming"] = doc(
        "gaussian", "gaussian | kaiming: A ~ N(0, 1/r^2) (peft's 'gaussian', DiffusionNFT's choice) or peft's default "
        "Kaiming-uniform A; B = 0 either way")
    kernel: Literal["triton", "addmm", "peft"] = doc(
        "triton", "triton | addmm | peft: the LoRA layers' forward: our augmented-GEMM Triton kernel (its torch "
        "reference where Triton cannot run: CPU without TRITON_INTERPRET=1), two cuBLAS addmm, or peft's own")

    def check(self) -> None:
        check_range(self, "rank", 1)
        check_range(self, "alpha", 0.0, lo_open=True)
        check_range(self, "dropout", 0.0, 1.0)
        if not self.target_modules:
            raise ConfigError("LoRAConfig.target_modules must name at least one module")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @property
    def init_peft(self) -> str | bool:
        """peft's ``init_lora_weights`` for `init`."""
        return "gaussian" if self.init == "gaussian" else True


@dataclass
class SamplerConfig(Section):
    steps: int = doc(40, "Euler steps (RL rollouts use 6, inference 40)")
    shift: Literal["dynamic", "fixed", "none"] = doc(
        "dynamic", "dynamic | fixed | none: resolution-dependent (Qwen-Image), fixed `shift_value`, none")
    shift_value: float = doc(3.0, "the shift when shift=fixed")
    base_shift: float = doc(0.5, "dynamic shift: mu at base_seq_len")
    max_shift: float = doc(0.9, "dynamic shift: mu at max_seq_len")
    base_seq_len: int = doc(256, "dynamic shift: token count of base_shift")
    max_seq_len: int = doc(8192, "dynamic shift: token count of max_shift")
    shift_terminal: float | None = doc(0.02, "stretch sigmas so the last one equals this (None: off)")
    sde: bool = doc(False, "stochastic (SDE) steps instead of the deterministic ODE")
    noise_level: float = doc(0.7, "SDE noise level (exploration)")
    cfg_scale: float = doc(1.0, "true classifier-free guidance at inference only (Qwen-Image-Edit-Plus uses 4.0 with a "
                           "blank negative prompt and per-token norm rescaling); 1.0: off. Never in RL rollouts or "
                           "training")

    def check(self) -> None:
        check_range(self, "steps", 1)
        check_range(self, "noise_level", 0.0)
        check_range(self, "cfg_scale", 1.0)
        if self.shift_terminal is not None:
            check_range(self, "shift_terminal", 0.0, 1.0, lo_open=True)


@dataclass
class OptimizerConfig(Section):
    lr: float = doc(1e-4, "peak learning rate")
    betas: list[float] = doc(None, "AdamW betas", factory=lambda: [0.9, 0.999])
    weight_decay: float = doc(0.01, "AdamW weight decay")
    eps: float = doc(1e-8, "AdamW epsilon")
    warmup_steps: int = doc(0, "linear warm-up steps")
    schedule: Literal["constant", "cosine", "linear"] = doc("constant", "constant | cosine | linear (after warm-up)")
    min_lr_ratio: float = doc(0.0, "cosine/linear: final lr as a fraction of lr")
    grad_clip: float = doc(1.0, "clip the global grad norm to this (0: off)")
    grad_accum: int = doc(1, "gradient accumulation steps")
    max_nonfinite_steps: int = doc(20, "stop the run (exit 1, nothing exported) after this many consecutive steps "
                                   "skipped for a non-finite loss or gradient")

    def check(self) -> None:
        check_range(self, "lr", 0.0, lo_open=True)
        check_range(self, "warmup_steps", 0)
        check_range(self, "grad_accum", 1)
        check_range(self, "grad_clip", 0.0)
        check_range(self, "min_lr_ratio", 0.0, 1.0)
        check_range(self, "max_nonfinite_steps", 1)
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ConfigError(f"OptimizerConfig.betas={self.betas!r} must be two values in [0, 1)")


@dataclass
class DeepSpeedConfig(Section):
    """How a training stage runs on several processes. The DeepSpeed JSON is generated from the job
    (batch sizes, accumulation, clipping, precision) so ``train_batch_size = micro * accum * world``
    always holds; ``overrides`` adds or replaces raw DeepSpeed keys on top."""

    enabled: Literal["auto", "on", "off"] = doc(
        "auto", "auto | on | off: DeepSpeed engine (auto: on when launched with more than one process, by the "
        "deepspeed launcher or torchrun; off: plain PyTorch, one process)")
    zero_stage: Literal[0, 1, 2, 3] = doc(
        2, "ZeRO stage 0-3 (3: parameters sharded too, for full-parameter training of the 20B transformer; 2: "
        "optimizer state + gradients sharded, for LoRA RL)")
    offload_optimizer: bool = doc(False, "ZeRO-Offload: optimizer state and step on the CPU")
    offload_param: bool = doc(False, "ZeRO-3 only: parameters offloaded to the CPU between uses")
    bf16: Literal["auto", "on", "off"] = doc(
        "auto", "auto | on | off: DeepSpeed bf16 (module in bf16, fp32 master weights in the optimizer); auto: on "
        "when model.dtype=bf16 and the device is CUDA")
    overlap_comm: bool = doc(True, "overlap gradient reduction with backward (ZeRO 2/3)")
    bucket_size: int = doc(200_000_000, "reduce / all-gather bucket size in elements (ZeRO 2/3)")
    overrides: dict = doc(None, "raw DeepSpeed config keys merged (recursively) over the generated config; "
                          "batch keys must agree with the job's", factory=dict)
    consolidate_every: int = doc(
        1, "under DeepSpeed, the consolidated trained weights (gathered onto rank 0 and written by it: ~40 GB for "
        "the 20B transformer in bf16) go into every N-th checkpoint a process writes, its first included (0: none). "
        "DeepSpeed resumes from its own shards on the same world size; the consolidated copy is what a run on "
        "another world size starts from. Without DeepSpeed they are in every checkpoint (its resume source); the "
        "export at the end always writes the model")

    def check(self) -> None:
        check_range(self, "bucket_size", 1)
        check_range(self, "consolidate_every", 0)
        if self.offload_param and self.zero_stage != 3:
            raise ConfigError(f"DeepSpeedConfig.offload_param=true needs zero_stage=3 (got {self.zero_stage})")


@dataclass
class SFTConfig(Section):
    steps: int = doc(100, "optimizer steps")
    train: Literal["full", "lora"] = doc("full", "full | lora: train every transformer weight, or a LoRA (see `lora`)")
    timestep_sampling: Literal["uniform", "logit_normal", "shifted"] = doc("logit_normal",
                                                                          "uniform | logit_normal | shifted")
    logit_mean: float = doc(0.0, "logit-normal mean")
    logit_std: float = doc(1.0, "logit-normal std")
    ema_decay: float = doc(0.0, "EMA of the trained weights (0: off)")
    latent_pool: int = doc(0, "0: crop, degrade and VAE-encode every batch on the fly; N > 0: draw N samples once "
                           "(crops, flips, degradations), encode them once and train on random batches of this "
                           "fixed pool (for small runs where the VAE dominates the step time, e.g. the CPU demo)")
    log_every: int = doc(1, "record every N-th step in the logs (terminal lines are throttled by run.log_interval)")
    sample_every: int = doc(50, "LR | SR | HR grid every N steps (0: off)")
    save_every: int = doc(50, "checkpoint every N steps (0: only at the end)")
    keep_checkpoints: int = doc(2, "how many complete checkpoints to keep")

    def check(self) -> None:
        check_range(self, "steps", 1)
        check_range(self, "ema_decay", 0.0, 1.0)
        check_range(self, "latent_pool", 0)
        check_range(self, "logit_std", 0.0, lo_open=True)
        for name in ("log_every", "sample_every", "save_every"):
            check_range(self, name, 0)
        check_range(self, "keep_checkpoints", 1)


@dataclass
class VAEPretrainConfig(Section):
    steps: int = doc(300, "autoencoder steps of the tiny VAE")
    batch_size: int = doc(8, "HR crops per step")
    crop_size: int = doc(32, "HR crop side for the autoencoder (convolutional: small crops train faster)")
    lr: float = doc(1e-3, "AdamW learning rate")
    kl_weight: float = doc(1e-3, "weight of the posterior KL (per element)")

    def check(self) -> None:
        check_range(self, "steps", 1)
        check_range(self, "batch_size", 1)
        check_range(self, "crop_size", 8)
        check_range(self, "lr", 0.0, lo_open=True)
        check_range(self, "kl_weight", 0.0)


@dataclass
class RewardConfig(Section):
    name: Literal["dists", "ssim", "compass", "lr_consistency", "custom"] = doc(
        "dists", "dists | ssim | compass | lr_consistency | custom: DISTS (FR, needs weights), SSIM (FR, classical "
        "stand-in for DISTS), COMPASS (NR, a trained reward model: reward.compass), LR consistency (NR, classical), "
        "or any RewardFn named by `custom`")
    compass: str | None = doc(None, "name=compass: a trained COMPASS folder (oars-fast compass-sft's <run>/model)")
    compass_variant: Literal["full", "dq_only", "no_fidelity"] = doc(
        "full", "name=compass: full (R = F*Q_LR + F^(Q_LR/gamma)*(Q_SR - Q_LR)), dq_only (Q_SR - Q_LR) or no_fidelity "
        "(F = 1: Q_SR); each mapped linearly from its exact range to [0, 1] (oars_fast/rewards/compass.py)")
    compass_gamma: float = doc(7.0, "name=compass: gamma of R")
    custom: str | None = doc(None, "name=custom: 'package.module:factory'; factory(device) returns a RewardFn")
    custom_full_reference: bool = doc(False, "name=custom: whether that reward needs the ground truth")
    dists_vgg: str | None = doc(None, "VGG16 weights in torchvision's vgg16() layout (features.N.weight/bias)")
    dists_weights: str | None = doc(None, "DISTS alpha/beta weights.pt of the DISTS release")
    tau: float = doc(0.05, "lr_consistency: reward = exp(-mean|down(SR) - LR| / tau)")
    batch_size: int = doc(32, "images per reward forward")

    def check(self) -> None:
        if self.name == "custom" and (not self.custom or ":" not in self.custom):
            raise ConfigError(f"RewardConfig.custom={self.custom!r} must be 'package.module:factory' when "
                              "name='custom'")
        check_range(self, "tau", 0.0, lo_open=True)
        check_range(self, "batch_size", 1)
        check_range(self, "compass_gamma", 0.0, lo_open=True)

    @property
    def full_reference(self) -> bool:
        return self.name in ("dists", "ssim") or (self.name == "custom" and self.custom_full_reference)


@dataclass
class RLConfig(Section):
    mode: Literal["fr", "nr"] = doc("fr", "fr | nr: full-reference (ground truth, FR reward) or no-reference "
                                    "(NR reward)")
    objective: Literal["nft", "flow_grpo"] = doc(
        "nft", "nft | flow_grpo: DiffusionNFT negative-aware loss on ODE rollouts, or Flow-GRPO (SDE rollouts, "
        "per-step log-probabilities, clipped ratio)")
    iterations: int = doc(100, "RL iterations (rollout + reward + update + old-policy update)")
    inputs_per_iter: int = doc(4, "LR inputs per iteration (global); each gets group_size candidates")
    group_size: int = doc(24, "K: candidates per LR input")
    rollout_steps: int = doc(6, "sampler steps of a rollout")
    sde: bool = doc(False, "NFT: SDE rollouts instead of the deterministic ODE (Flow-GRPO always uses the SDE)")
    noise_level: float = doc(0.7, "SDE noise level")
    train_timesteps: Literal["rollout", "uniform"] = doc(
        "rollout", "NFT update times: rollout: the rollout sampler's own sigmas (without the final 0), a fresh random "
        "permutation per candidate, the first int(rollout_steps * timestep_fraction) of them (DiffusionNFT); "
        "uniform: timesteps_per_sample draws of U(0, 1) per candidate")
    timestep_fraction: float = doc(0.99, "rollout times: the fraction of the rollout's sigmas trained per candidate "
                                   "(DiffusionNFT's train.timestep_fraction)")
    timesteps_per_sample: int = doc(2, "uniform times: draws per candidate")
    micro_batch: int = doc(16, "candidates per forward in the update")
    beta: float = doc(1.0, "NFT: mixing of the implicit positive/negative policies")
    kl_weight: float | None = doc(
        None, "KL weight to the base model (adapters off); 0: no reference pass. null: the objective's reference "
        "default: NFT 1e-4 on ||v_theta - v_ref||^2 (DiffusionNFT), Flow-GRPO 0.04 on ||mu - mu_ref||^2 / "
        "(2 sigma_t^2) of the SDE transition means (flow_grpo)")
    ref_every: int = doc(
        1, "N: how often the update runs the reference forward (base, adapters off) for the KL term. 1: for every "
        "(candidate, time) term, as the reference code. N > 1: for about 1/N of them: per candidate and iteration a "
        "random offset o in [0, N) from the candidate's own seed selects the update passes p with (p + o) mod N = 0; "
        "a selected term's KL is weighted by N, the others have none (no forward; v_ref = v_theta there, so zero KL "
        "and zero KL gradient). Each term is selected with probability exactly 1/N, so E[N * 1{selected} * KL] = KL: "
        "an unbiased estimator of the full KL term, with more variance (small beside the policy term at kl_weight "
        "1e-4). Saves (1 - 1/N) of the reference forwards: per term (2 + 1/N) forwards + 1 backward instead of 3 + 1. "
        "nft and flow_grpo alike (flow_grpo: per SDE step); the log line counts ref_forwards and ref_rows")
    fp8_nograd: Literal["none", "rollout", "rollout_ref"] = doc(
        "none", "NFT only: which no-grad forwards run the frozen base weights of the transformer blocks' Linear layers "
        "(under the LoRA and the plain ones; not the modulation, embedding, output or VAE layers) as fp8 e4m3 GEMMs "
        "(torch._scaled_mm) with row-wise scales (activations per token, weights per output channel); the LoRA branch "
        "stays in model.dtype. none: no fp8. rollout: the rollout sampler's forwards. rollout_ref: those and the "
        "reference forwards (v_ref, KL term). v_old is never fp8: NFT's gradient holds (1 - r)(v_theta - v_old), whose "
        "true size (~1e-4) is ~170x below fp8's error on v_old (~2e-2), and a demo run with fp8 v_old collapsed "
        "(README). Each weight is quantised once and cached (+1 byte per weight element; re-quantised if it "
        "changes). The policy update (v_theta, with grad), the held-out evaluation and the export are untouched. Needs "
        "fp8 GEMMs: a CUDA sm_89+ GPU with model.dtype bf16, or the CPU; setup refuses otherwise. Refused with "
        "flow_grpo: its ratio compares the rollout's log-probabilities with the update's, which must come from the "
        "same numerics (oars_fast/models/fp8.py)")
    adv_clip: float = doc(5.0, "advantage clip before mapping to r in [0, 1]; NFT also scales the policy term by it "
                          "(DiffusionNFT's adv_clip_max)")
    global_std: bool = doc(True, "normalise advantages by the std of all the iteration's rewards (DiffusionNFT) "
                           "instead of each group's own")
    filter_mean: float = doc(0.9, "drop groups whose reward mean is above this ...")
    filter_std: float = doc(0.05, "... and whose reward std is below this")
    grpo_clip: float = doc(1e-4, "Flow-GRPO: ratio clip range")
    eta_schedule: Literal["linear", "constant"] = doc(
        "linear", "old-policy EMA: linear: eta = min(eta_rate * iteration, eta_max) (DiffusionNFT's default); "
        "constant: eta = eta_max")
    eta_rate: float = doc(0.001, "linear eta schedule: slope per iteration")
    eta_max: float = doc(0.5, "eta ceiling (linear) or value (constant)")
    ema: bool = doc(True, "an EMA of the trained LoRA (DiffusionNFT train.ema: decay min((1 + s) / (10 + s), "
                    "ema_max_decay) after optimizer step s), used for the held-out evaluation and the export")
    ema_max_decay: float = doc(0.9, "ceiling of that EMA's decay")
    init_lora: str | None = doc(None, "adapter folder to continue (NR-RL continues FR-RL's LoRA)")
    sft_model: str | None = doc(None, "SFT model folder: at the end the LoRA delta is merged into it -> <run>/merged")
    eval_inputs: int = doc(8, "held-out LR inputs whose mean reward is measured at the start and end")
    eval_every: int = doc(0, "also measure it every N iterations (logged as eval_reward; 0: off)")
    log_every: int = doc(1, "record every N-th iteration in the logs (terminal lines are throttled by "
                         "run.log_interval)")
    probe_every: int = doc(10, "candidate grid of a fixed probe input every N iterations (0: off)")
    save_every: int = doc(20, "checkpoint every N iterations (0: only at the end)")
    keep_checkpoints: int = doc(2, "how many complete checkpoints to keep")

    def check(self) -> None:
        for name in ("iterations", "inputs_per_iter", "group_size", "rollout_steps", "timesteps_per_sample",
                     "micro_batch", "keep_checkpoints"):
            check_range(self, name, 1)
        check_range(self, "timestep_fraction", 0.0, 1.0, lo_open=True)
        check_range(self, "ema_max_decay", 0.0, 1.0)
        if self.objective == "flow_grpo" and self.rollout_steps < 2:
            raise ConfigError("RLConfig.rollout_steps must be >= 2 for flow_grpo (the last step is deterministic)")
        check_range(self, "beta", 0.0, lo_open=True)
        if self.kl_weight is not None:
            check_range(self, "kl_weight", 0.0)
        check_range(self, "adv_clip", 0.0, lo_open=True)
        check_range(self, "grpo_clip", 0.0, lo_open=True)
        check_range(self, "ref_every", 1)
        if self.fp8_nograd != "none" and self.objective == "flow_grpo":
            raise ConfigError(f"RLConfig.fp8_nograd={self.fp8_nograd} is NFT only, not valid with objective=flow_grpo: "
                              "Flow-GRPO's ratio divides the update's log-probability of each SDE transition by the "
                              "rollout's, so both must come from the same numerics (an fp8 rollout would bias the "
                              "ratio away from 1); set rl.fp8_nograd=none or rl.objective=nft")
        check_range(self, "eta_rate", 0.0)
        check_range(self, "eta_max", 0.0, 1.0)
        for name in ("eval_inputs", "eval_every", "log_every", "probe_every", "save_every"):
            check_range(self, name, 0)

    @property
    def kl(self) -> float:
        """The KL weight in effect (`kl_weight`, or the objective's reference default)."""
        if self.kl_weight is not None:
            return self.kl_weight
        return 0.04 if self.objective == "flow_grpo" else 1e-4

    @property
    def update_times(self) -> int:
        """Update passes per kept candidate (NFT): times on the rollout grid, or uniform draws."""
        if self.train_timesteps == "rollout":
            return max(1, int(self.rollout_steps * self.timestep_fraction))
        return self.timesteps_per_sample

    def eta(self, iteration: int) -> float:
        """The old-policy EMA coefficient after `iteration` (1-based)."""
        if self.eta_schedule == "constant":
            return self.eta_max
        return min(self.eta_rate * iteration, self.eta_max)


@dataclass
class MergeConfig(Section):
    model: str = doc("", "model folder to merge into (OARS: the SFT model)")
    lora: str = doc("", "LoRA adapter folder (adapter_model.safetensors + adapter_config.json)")
    output: str = doc("", "output model folder")
    weight: float = doc(1.0, "multiplier of the LoRA delta")


@dataclass
class InferConfig(Section):
    input: str = doc("", "an LR image file or a folder of them")
    output: str = doc("", "output folder (default: <run_dir>/sr)")
    checkpoint: str | None = doc(None, "model folder to load (default: model.pretrained)")
    batch_size: int = doc(4, "tiles per forward pass")
    tile: int = doc(0, "LR tile side; 0: whole image when it fits max_pixels, else 64")
    tile_overlap: int = doc(8, "LR pixels of overlap between tiles (blended linearly)")
    max_pixels: int = doc(512 * 512, "LR images with more pixels than this are tiled")
    back_projection: int = doc(0, "iterative back-projection steps on the whole output, sr += up(lr - down(sr)) "
                               "(oars_fast/models/consistency.py; not part of OARS); 0: the sampler's output")

    def check(self) -> None:
        check_range(self, "batch_size", 1)
        check_range(self, "back_projection", 0)
        check_range(self, "tile", 0)
        check_range(self, "tile_overlap", 0)


@dataclass
class AnnotateConfig(Section):
    """The COMPASS annotation (oars_fast/stages/annotate.py has the algorithm and the folder layout)."""

    lr_dir: str = doc("", "LR inputs, one per group (file stem = group id)")
    sr_root: str = doc("", "SR outputs: <sr_root>/<method>/<stem>.<ext>, two or more methods per LR")
    gt_dir: str | None = doc(None, "ground truth of the synthetic subset, matched by stem (real LQ groups: none)")
    output: str = doc("", "manifest folder (default: the run folder)")
    fidelity: Literal["dists", "ssim", "psnr"] = doc(
        "dists", "F_raw = 1 - DISTS(SR, GT) (the paper's), or a classical stand-in where the DISTS weights are absent: "
        "ssim (luminance SSIM: blind to colour and brightness shifts) or psnr (PSNR over RGB, capped at 60 dB)")
    fidelity_percentiles: list[float] = doc(None, "F = clip((F_raw - lo) / (hi - lo), 0, 1), lo/hi these percentiles "
                                            "of F_raw over the synthetic subset", factory=lambda: [1.0, 99.0])
    dists_vgg: str | None = doc(None, "fidelity=dists: VGG16 weights in torchvision's layout")
    dists_weights: str | None = doc(None, "fidelity=dists: DISTS alpha/beta weights.pt")
    global_scorer: Literal["classical", "mllm"] = doc(
        "classical", "stage 1 anchors on [1, 5]: classical (the documented no-reference proxy; offline) or mllm "
        "(Q-Insight-style rating by annotate.mllm)")
    comparator: Literal["classical", "mllm"] = doc("classical", "stage 2 pairwise judge: classical or mllm")
    mllm: str | None = doc(None, "mllm scorers: a transformers vision-language model folder or hub id")
    both_orders: bool = doc(True, "show every pair in both orders and average (cancels a judge's position bias)")
    ranking: Literal["win_rate", "bradley_terry"] = doc("win_rate", "stage 2 aggregation to r in [0, 1]")
    trim_fraction: float = doc(0.05, "fraction of pairs dropped where stage 1 and stage 3 disagree most")

    def check(self) -> None:
        check_range(self, "trim_fraction", 0.0, 1.0)
        check_pair(self, "fidelity_percentiles", 0.0, 100.0)


@dataclass
class PairsConfig(Section):
    """Pairwise accuracy of a scorer (oars_fast/stages/eval_pairs.py has the folder layout)."""

    root: str = doc("", "folder of groups: <root>/<group>/lr.<ext>, [gt.<ext>], sr/<name>.<ext>, prefs.json")
    scorer: Literal["compass", "compass_qsr", "dists", "ssim", "classical_nr", "lr_consistency"] = doc(
        "compass", "compass (R), compass_qsr (Q_SR alone), dists / ssim (to gt), classical_nr (the annotation's "
        "no-reference proxy), lr_consistency")
    compass: str | None = doc(None, "COMPASS checkpoint folder (scorer=compass, compass_qsr)")
    gamma: float = doc(7.0, "COMPASS R's gamma")
    dists_vgg: str | None = doc(None, "scorer=dists: VGG16 weights in torchvision's layout")
    dists_weights: str | None = doc(None, "scorer=dists: DISTS alpha/beta weights.pt")
    delta: float = doc(0.0, "a pair is predicted a tie when |s_i - s_j| <= delta")

    def check(self) -> None:
        check_range(self, "delta", 0.0)
        check_range(self, "gamma", 0.0, lo_open=True)


@dataclass
class CompassConfig(Section):
    """The COMPASS reward model and its training (oars_fast/rewards/compass.py, oars_fast/stages/compass_sft.py)."""

    model: str | None = doc(
        None,
        "base checkpoint: a Qwen3-VL (production: Qwen/Qwen3-VL-8B-Instruct) or Qwen2.5-VL "
        "folder or hub id, or a COMPASS folder to continue; null: the tiny random model (CPU)",
    )
    tiny_arch: Literal["qwen3vl", "qwen2.5vl"] = doc("qwen3vl", "model=null: the tiny model's architecture class")
    min_pixels: int | None = doc(
        None,
        "image pixel budget, lower end: smaller images are upscaled to it (null: the "
        "model's own: 256*256 for a Qwen-VL checkpoint, 32*32 for the tiny model); saved "
        "with the trained model, so RL and eval score at the same size",
    )
    max_pixels: int | None = doc(
        None, "image pixel budget, upper end: larger images are downscaled (null: the model's own: 512*512, tiny 64*64)"
    )
    dtype: Literal["fp32", "bf16"] = doc("fp32", "compute dtype (float32 master weights; bf16 under autocast)")
    manifest: str = doc("", "annotation manifest (oars-fast annotate's manifest.jsonl)")
    steps: int = doc(1000, "optimizer steps")
    batch_size: int = doc(8, "pairs per step (global)")
    candidates_per_group: int = doc(
        0,
        "batch structure: 0 = pairs drawn at random across groups; k >= 2 = batches "
        "of batch_size/k groups with k candidates (SR outputs of one LR) each, whole "
        "groups per rank (the ranking loss needs k >= 2; the per-rank micro-batch must be "
        "a multiple of k)",
    )
    augment: bool = doc(
        False,
        "flip / quarter-turn each training pair (LR and SR alike; one of 8 at random, flips "
        "only for non-square images): quality and fidelity do not depend on orientation",
    )
    f_weight: float = doc(1.0, "weight of the fidelity loss (F on [0, 1], masked where the label is absent)")
    q_weight: float = doc(1.0, "weight of the quality losses ((Q - Q*) / 4, Q_LR and Q_SR on [1, 5])")
    rank_weight: float = doc(
        0.0,
        "weight of the within-group pairwise ranking loss (logistic, on the pairs of one "
        "group whose labels differ; needs candidates_per_group >= 2); 0: score losses only",
    )
    rank_on: list[Literal["q_sr", "f", "r"]] = doc(
        None,
        "what the ranking loss orders: q_sr (Q_SR by its label), f (F, where both labels exist), r (the reward "
        "R by R of the labels, where F exists)",
        factory=lambda: ["q_sr", "f"],
    )
    rank_sharpness: float = doc(
        10.0,
        "ranking loss: softplus(-sharpness * (s_i - s_j) / range) for label s_i* > s_j* (range 4 for Q and R, 1 for F)",
    )
    rank_margin: float = doc(
        0.02, "ranking loss: pairs whose labels differ by less than this fraction of the range are ties and left out"
    )
    heldout_fraction: float = doc(0.1, "groups held out for the pairwise accuracy (by a hash of the group id)")
    eval_every: int = doc(100, "pairwise accuracy on the held-out groups every N steps (0: only at the end)")
    log_every: int = doc(1, "record every N-th step in the logs")
    save_every: int = doc(200, "checkpoint every N steps (0: only at the end)")
    keep_checkpoints: int = doc(2, "how many complete checkpoints to keep")

    def check(self) -> None:
        for name in ("steps", "batch_size", "keep_checkpoints"):
            check_range(self, name, 1)
        for name in ("eval_every", "log_every", "save_every", "candidates_per_group"):
            check_range(self, name, 0)
        check_range(self, "heldout_fraction", 0.0, 0.9)
        check_range(self, "f_weight", 0.0)
        check_range(self, "q_weight", 0.0)
        check_range(self, "rank_weight", 0.0)
        check_range(self, "rank_sharpness", 0.0, lo_open=True)
        check_range(self, "rank_margin", 0.0, 1.0)
        for name in ("min_pixels", "max_pixels"):
            if getattr(self, name) is not None:
                check_range(self, name, 1)
        if self.min_pixels is not None and self.max_pixels is not None and self.min_pixels > self.max_pixels:
            raise ConfigError(f"CompassConfig.min_pixels={self.min_pixels} exceeds max_pixels={self.max_pixels}")
        if self.candidates_per_group == 1:
            raise ConfigError("CompassConfig.candidates_per_group=1: use 0 (random pairs) or >= 2 (groups of k)")
        if self.candidates_per_group and self.batch_size % self.candidates_per_group:
            raise ConfigError(
                f"CompassConfig.batch_size={self.batch_size} is not a multiple of "
                f"candidates_per_group={self.candidates_per_group}"
            )
        if self.rank_weight > 0 and self.candidates_per_group < 2:
            raise ConfigError(
                "CompassConfig.rank_weight > 0 needs candidates_per_group >= 2 (pairs of one group in a batch)"
            )
        if self.rank_weight > 0 and not self.rank_on:
            raise ConfigError("CompassConfig.rank_weight > 0 needs at least one of q_sr, f, r in rank_on")
