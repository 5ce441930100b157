"""Typed configuration: one dataclass per component, jobs that combine them, YAML + dotted overrides.

    job = load_config(SFTJob, "configs/demo/sft.yaml", ["optim.lr=1e-4", "data.batch_size=8"], world=1)

* :mod:`.schema`: the machinery (documented fields, ``Literal`` choices validated in one place,
  loading, overrides, renamed keys, ``--help`` text);
* :mod:`.components`: run, data, degradation, model, LoRA, sampler, optimizer, DeepSpeed and the
  stages' own sections;
* :mod:`.jobs`: one job per CLI command, with the cross-component rules.

Batch sizes are global; :func:`per_rank` derives the per-rank micro-batch with a divisibility check.
No config holds a world size: the launcher's is passed to :func:`load_config`.
"""
from .components import (
    AnnotateConfig,
    CompassConfig,
    DataConfig,
    DeepSpeedConfig,
    DegradationConfig,
    DegradationPass,
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
from .evaluation import EvalConfig, EvalJob, ReportConfig, ReportJob
from .jobs import (
    AnnotateJob,
    CompassSFTJob,
    DataJob,
    DemoBaseJob,
    EvalPairsJob,
    InferJob,
    MergeJob,
    RLJob,
    SFTJob,
)
from .pipeline import PipelineConfig, PipelineJob
from .schema import (
    ConfigError,
    Section,
    apply_overrides,
    describe,
    doc,
    from_dict,
    load_config,
    per_rank,
    resolve_config_path,
    save_config,
    shipped_config,
    to_dict,
)

__all__ = [
    "PipelineConfig", "PipelineJob",
    "EvalConfig", "EvalJob", "ReportConfig", "ReportJob",
    "ConfigError", "Section", "apply_overrides", "describe", "doc", "from_dict", "load_config", "per_rank",
    "resolve_config_path", "save_config", "shipped_config", "to_dict", "AnnotateConfig", "CompassConfig",
    "DataConfig", "DeepSpeedConfig", "DegradationConfig", "DegradationPass", "InferConfig", "LoRAConfig",
    "MergeConfig", "ModelConfig", "OptimizerConfig", "PairsConfig", "RewardConfig", "RLConfig", "RunConfig",
    "SamplerConfig", "SFTConfig", "VAEPretrainConfig", "AnnotateJob", "CompassSFTJob", "DataJob", "DemoBaseJob",
    "EvalPairsJob", "InferJob", "MergeJob", "RLJob", "SFTJob",
]
