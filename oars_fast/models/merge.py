"""Merging a LoRA delta (``scale * B @ A`` per adapted layer) into a model's weights.

OARS trains its RL LoRA on the *base* model and merges the delta into the *SFT* model for inference.
"""
from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import torch

from ..config import ModelConfig
from ..errors import UserError
from .backbone import SRBackbone, load_backbone
from .lora import lora_deltas


def merge_lora_into(model: SRBackbone, lora_folder: str | Path, weight: float = 1.0) -> int:
    """Add `weight` x the LoRA deltas into `model.transformer` in place; returns the number of layers."""
    params = dict(model.transformer.named_parameters())
    deltas = lora_deltas(lora_folder)
    missing = [k for k in deltas if k not in params]
    if missing:
        raise UserError(f"the LoRA in {lora_folder} adapts {len(missing)} weights the model lacks (e.g. "
                        f"{missing[:3]}): was it trained on another architecture?")
    with torch.no_grad():
        for k, d in deltas.items():
            p = params[k]
            p.copy_((p.float() + weight * d.to(p.device)).to(p.dtype))
    return len(deltas)


def merge_into_folder(model_dir: str | Path, lora_dir: str | Path, output: str | Path, weight: float = 1.0) -> int:
    """Model folder + LoRA folder -> a merged, diffusers-loadable model folder (written atomically), with
    the adapter copied to ``<output>/lora/``. Returns the number of merged layers."""
    model = load_backbone(dataclasses.replace(ModelConfig(), pretrained=str(model_dir), dtype="fp32"), device="cpu")
    n = merge_lora_into(model, lora_dir, weight)
    out = Path(output)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    shutil.copytree(lora_dir, tmp / "lora")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return n
