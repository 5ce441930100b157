"""`oars-fast demo`: the embedded default, the whole pipeline on tiny models and bundled photos, on the CPU.

The same as ``oars-fast pipeline --config configs/demo/pipeline.yaml`` (see :mod:`oars_fast.stages.pipeline`
for the stages); ``key=value`` overrides apply to the pipeline (``run.*``, ``pipeline.*``) or to every stage
whose job has the section (e.g. ``run.device=cuda`` is the pipeline's; ``sampler.steps=8`` every stage's).
"""
from __future__ import annotations

from ..config import load_config
from ..config.pipeline import PipelineJob, split_overrides
from ..config.schema import shipped_config
from . import pipeline


def run(overrides: list[str] | None = None) -> int:
    own, rest = split_overrides(list(overrides or []))
    return pipeline.run(load_config(PipelineJob, shipped_config("demo/pipeline.yaml"), own), rest, own)
