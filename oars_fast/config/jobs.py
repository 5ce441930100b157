"""Jobs: what one CLI command runs, as a dataclass of component configs.

Cross-component rules live here (``check``); so does the batch split against the number of
processes the launcher started (``check_world``, called by :func:`~.schema.load_config`).
"""
from __future__ import annotations

from dataclasses import dataclass

from .components import (
    AnnotateConfig,
    CompassConfig,
    DataConfig,
    DeepSpeedConfig,
    DegradationConfig,
    InferConfig,
    LoRAConfig,
    MergeConfig,
    ModelConfig,
    OptimizerConfig,
    PairsConfig,
    RewardConfig,
    RLConfig,
    RunConfig,
    SamplerConfig,
    SFTConfig,
    VAEPretrainConfig,
)
from .schema import ConfigError, Section, doc, per_rank, section


@dataclass
class DataJob(Section):
    """`oars-fast data`: prepare the data sets and report what was found."""

    run: RunConfig = section(RunConfig)
    data: DataConfig = section(DataConfig)
    degradation: DegradationConfig = section(DegradationConfig)


@dataclass
class SFTJob(Section):
    """`oars-fast sft`: cold-start flow-matching SFT (LR -> HR)."""

    run: RunConfig = section(RunConfig)
    data: DataConfig = section(DataConfig)
    degradation: DegradationConfig = section(DegradationConfig)
    model: ModelConfig = section(ModelConfig)
    lora: LoRAConfig = section(LoRAConfig)
    optim: OptimizerConfig = section(OptimizerConfig)
    sampler: SamplerConfig = section(SamplerConfig)
    sft: SFTConfig = section(SFTConfig)
    deepspeed: DeepSpeedConfig = section(DeepSpeedConfig)

    def check(self) -> None:
        if self.data.source == "lq":
            raise ConfigError("SFT needs ground truth: data.source='lq' is not valid here; choose one of "
                              "['demo', 'hr', 'paired']")
        if self.deepspeed.zero_stage == 3 and self.sft.train == "lora" and self.deepspeed.enabled != "off":
            raise ConfigError("sft.train=lora with deepspeed.zero_stage=3 is not supported (the frozen base would be "
                              "sharded too and LoRA merging needs it whole); choose one of [0, 1, 2]")

    def check_world(self, world: int) -> None:
        per_rank(self.data.batch_size, world, self.optim.grad_accum, "data.batch_size")


@dataclass
class DemoBaseJob(SFTJob):
    """`oars-fast demo-base`: the demo's stand-in for a pretrained base (tiny VAE + generic bicubic-SR
    pre-training); production runs start from the real checkpoint instead."""

    vae: VAEPretrainConfig = section(VAEPretrainConfig)


def _rl_optimizer() -> OptimizerConfig:
    """DiffusionNFT's AdamW: lr 3e-4, betas (0.9, 0.999), weight decay 1e-4, eps 1e-8; clip 1.0."""
    return OptimizerConfig(lr=3e-4, weight_decay=1e-4)


@dataclass
class RLJob(Section):
    """`oars-fast rl`: online RL of a LoRA on the base model (FR or NR reward; NFT or Flow-GRPO)."""

    run: RunConfig = section(RunConfig)
    data: DataConfig = section(DataConfig)
    degradation: DegradationConfig = section(DegradationConfig)
    model: ModelConfig = section(ModelConfig)
    lora: LoRAConfig = section(LoRAConfig)
    optim: OptimizerConfig = section(_rl_optimizer)
    sampler: SamplerConfig = section(SamplerConfig)
    rl: RLConfig = section(RLConfig)
    reward: RewardConfig = section(RewardConfig)
    deepspeed: DeepSpeedConfig = section(DeepSpeedConfig)

    def check(self) -> None:
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
                              "full-reference; choose one of ['compass', 'lr_consistency']")

    def check_world(self, world: int) -> None:
        per_rank(self.rl.inputs_per_iter, world, 1, "rl.inputs_per_iter")


@dataclass
class MergeJob(Section):
    """`oars-fast merge`: LoRA delta into a model's weights."""

    run: RunConfig = section(RunConfig)
    merge: MergeConfig = section(MergeConfig)


@dataclass
class InferJob(Section):
    """`oars-fast infer`: LR images -> SR images."""

    run: RunConfig = section(RunConfig)
    model: ModelConfig = section(ModelConfig)
    sampler: SamplerConfig = section(SamplerConfig)
    infer: InferConfig = section(InferConfig)
    scale: int = doc(4, "super-resolution factor")


@dataclass
class AnnotateJob(Section):
    """`oars-fast annotate`: the COMPASS three-stage annotation of SR outputs -> a training manifest."""

    run: RunConfig = section(RunConfig)
    annotate: AnnotateConfig = section(AnnotateConfig)


@dataclass
class EvalPairsJob(Section):
    """`oars-fast eval-pairs`: pairwise accuracy of a quality scorer on groups with preferences."""

    run: RunConfig = section(RunConfig)
    pairs: PairsConfig = section(PairsConfig)


def _compass_optimizer() -> OptimizerConfig:
    """Full-parameter fine-tuning of an 8B VL model: lr 1e-5, cosine after a short warm-up."""
    return OptimizerConfig(lr=1e-5, weight_decay=0.01, warmup_steps=50, schedule="cosine")


@dataclass
class CompassSFTJob(Section):
    """`oars-fast compass-sft`: full-parameter training of the COMPASS reward model on an annotation manifest."""

    run: RunConfig = section(RunConfig)
    compass: CompassConfig = section(CompassConfig)
    optim: OptimizerConfig = section(_compass_optimizer)
    deepspeed: DeepSpeedConfig = section(DeepSpeedConfig)

    def check_world(self, world: int) -> None:
        per_rank(self.compass.batch_size, world, self.optim.grad_accum, "compass.batch_size")
