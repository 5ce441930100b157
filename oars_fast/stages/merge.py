"""`oars-fast merge`: add a LoRA delta (scale * B @ A per adapted layer) into a model's weights.

OARS trains its RL LoRA on the *base* model and merges the delta into the *SFT* model for
inference: ``merge.model`` names the SFT folder, ``merge.lora`` the adapter folder (peft layout:
adapter_model.safetensors + adapter_config.json). The result is a diffusers-loadable model folder
(transformer/, vae/, prompt) in ``merge.output``, with the adapter copied to ``<output>/lora/``.

    oars-fast merge merge.model=runs/x/sft/model merge.lora=runs/x/rl/lora merge.output=runs/x/merged
"""
from __future__ import annotations

from ..config import MergeJob
from ..errors import UserError
from ..models.merge import merge_into_folder


def run(job: MergeJob) -> int:
    cfg = job.merge
    if not cfg.model or not cfg.lora or not cfg.output:
        raise UserError("oars-fast merge: set merge.model=<SFT model folder>, merge.lora=<adapter folder>, "
                        "merge.output=<folder>")
    n = merge_into_folder(cfg.model, cfg.lora, cfg.output, cfg.weight)
    print(f"merge: {n} LoRA layers of {cfg.lora} merged (weight {cfg.weight}) into {cfg.model} -> {cfg.output}")
    return 0
