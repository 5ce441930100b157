"""`oars-fast merge`: add a LoRA delta (scale * B @ A per adapted layer) into a model's weights.

OARS trains its RL LoRA on the *base* model and merges the delta into the *SFT* model for
inference: ``merge.model`` names the SFT folder, ``merge.lora`` the adapter folder (peft layout:
adapter_model.safetensors + adapter_config.json). The result is a diffusers-loadable model folder
(transformer/, vae/, prompt) in ``merge.output``, with the adapter copied to ``<output>/lora/``.

    oars-fast merge merge.model=runs/x/sft/model merge.lora=runs/x/rl/lora merge.output=runs/x/merged
"""
from __future__ import annotations

import dataclasses
import logging
import shutil
from pathlib import Path

import torch

from ..config import MergeJob, ModelConfig
from ..models.backbone import load_backbone
from ..models.lora import lora_deltas

log = logging.getLogger(__name__)


def merge_lora_into(model, lora_folder, weight: float = 1.0) -> int:
    """Add `weight` x the LoRA deltas into `model.transformer` in place; returns the number of layers."""
    params = dict(model.transformer.named_parameters())
    deltas = lora_deltas(lora_folder)
    missing = [k for k in deltas if k not in params]
    if missing:
        raise KeyError(f"the LoRA adapts {len(missing)} weights the model lacks (e.g. {missing[:3]}): "
                       "was it trained on another architecture?")
    with torch.no_grad():
        for k, d in deltas.items():
            p = params[k]
            p.copy_((p.float() + weight * d.to(p.device)).to(p.dtype))
    return len(deltas)


def run(job: MergeJob) -> int:
    cfg = job.merge
    if not cfg.model or not cfg.lora or not cfg.output:
        raise SystemExit("oars-fast merge: set merge.model=<SFT model folder>, merge.lora=<adapter folder>, "
                         "merge.output=<folder>")
    model = load_backbone(dataclasses.replace(ModelConfig(), pretrained=cfg.model, dtype="fp32"), device="cpu")
    n = merge_lora_into(model, cfg.lora, cfg.weight)
    out = Path(cfg.output)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    shutil.copytree(cfg.lora, tmp / "lora")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    print(f"merge: {n} LoRA layers of {cfg.lora} merged (weight {cfg.weight}) into {cfg.model} -> {out}")
    return 0
