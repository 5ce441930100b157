"""Config of `oars-fast pipeline` (:class:`PipelineJob`): which stages, from which stage YAMLs, with which
overrides. The hand-over between stages (which folder a stage reads) is the pipeline's own wiring
(oars_fast/stages/pipeline.py), not configuration."""
from __future__ import annotations

from dataclasses import dataclass

from .components import RunConfig
from .schema import ConfigError, Section, doc, section

STAGES = ["data", "base", "sft", "methods", "annotate", "compass", "rl_fr", "rl_nr", "eval", "report"]
DEMO_ONLY = ("base", "methods")  # the demo's stand-in base and its annotation set


def split_overrides(overrides: list[str]) -> tuple[list[str], list[str]]:
    """(the pipeline job's own overrides: run.* and pipeline.*; those for the stages: everything but pipeline.*).

    run.* goes to both (run.device, run.seed, run.log_interval apply to every stage; the pipeline itself places
    each stage's run.output_dir / run.name)."""
    section = [o.split("=", 1)[0].split(".")[0] for o in overrides]
    own = [o for o, s in zip(overrides, section) if s in ("run", "pipeline")]
    return own, [o for o, s in zip(overrides, section) if s != "pipeline"]


def _pipeline_run() -> RunConfig:
    return RunConfig(name="demo", output_dir="runs")


@dataclass
class PipelineConfig(Section):
    configs: str = doc("demo", "the stage YAMLs: a folder of shipped configs (demo, qwen_image_edit) or a path; "
                       "each stage reads <configs>/<stage>.yaml")
    stages: list[str] = doc(None, "stages in order (a subset of " + ", ".join(STAGES) + ")",
                            factory=lambda: list(STAGES))
    base_model: str | None = doc(None, "the pretrained base (e.g. Qwen/Qwen-Image-Edit-2509); null: the demo's "
                                 "stand-in base built by the `base` stage")
    methods: list[str] = doc(None, "demo annotation set: the SR methods written for each group (bicubic, base, "
                             "sft_early, sft_<N>steps, blur<s>, noise<s>; the fidelity negatives shift<px>, "
                             "color<g>, bright<b>: sharp edits of the ground truth that are not the input's)",
                             factory=lambda: ["bicubic", "base", "sft_early", "sft_2steps", "sft_8steps", "blur1.0",
                                              "noise0.03"])
    method_groups: int = doc(24, "demo annotation set: groups (training patches) per method")
    heldout: int = doc(0, "held-out patches evaluated and shown (0: all of the demo's val patches)")
    overrides: list[str] = doc(None, "per-stage overrides 'stage:key=value' (e.g. 'sft:sft.steps=100'); overrides "
                               "given on the command line without a stage apply to every stage whose job has the "
                               "section", factory=list)
    redo: list[str] = doc(None, "stages to run again from scratch even when complete (their folder is removed first)",
                          factory=list)
    print_commands: bool = doc(False, "print one launch line per unfinished stage (the training stages under the "
                               "deepspeed launcher on `gpus` GPUs) and run nothing: production runs every stage as "
                               "its own launch of this pipeline, restricted to that stage")
    gpus: int = doc(8, "print_commands: GPUs per training stage (deepspeed --num_gpus)")

    def check(self) -> None:
        bad = [s for s in self.stages + self.redo if s not in STAGES]
        if bad:
            raise ConfigError(f"PipelineConfig.stages/redo has {bad}; valid stages: {STAGES}")
        demo_only = [s for s in self.stages if s in DEMO_ONLY]
        if self.base_model and demo_only:
            raise ConfigError(f"PipelineConfig.stages has {demo_only}, which only the demo runs (they build its "
                              f"stand-in base and annotation set); with base_model={self.base_model} leave them out")
        if self.gpus < 1:
            raise ConfigError(f"PipelineConfig.gpus={self.gpus} must be >= 1")
        for o in self.overrides:
            if ":" not in o.split("=", 1)[0] or o.split(":", 1)[0] not in STAGES:
                raise ConfigError(f"PipelineConfig.overrides entry {o!r} must look like '<stage>:key=value' with a "
                                  f"stage of {STAGES}")


@dataclass
class PipelineJob(Section):
    """`oars-fast pipeline`: every stage in order (demo: data -> base -> sft -> annotation set -> annotate ->
    COMPASS -> FR-RL -> NR-RL (COMPASS) + merge -> eval -> report), resumable."""

    run: RunConfig = section(_pipeline_run)
    pipeline: PipelineConfig = section(PipelineConfig)
