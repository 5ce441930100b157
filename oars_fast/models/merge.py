"""Merging a LoRA delta (``scale * B @ A`` per adapted layer) into a model's weights.

OARS trains its RL LoRA on the *base* model and merges the delta into the *SFT* model for inference.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import torch
import torch.nn as nn
from diffusers import QwenImageTransformer2DModel

from ..errors import MissingFileError, UserError
from ..runtime.checkpoint import publish_folder
from .lora import lora_deltas


def merge_lora_into(transformer: nn.Module, lora_folder: str | Path, weight: float = 1.0) -> int:
    """Add `weight` x the LoRA deltas into `transformer`'s weights in place; returns the number of layers."""
    params = dict(transformer.named_parameters())
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
    """Model folder + LoRA folder -> the same folder with the LoRA delta added into its transformer (every
    other part copied as it is: VAE, prompt side, metadata), written atomically, the adapter copied to
    ``<output>/lora/``. The transformer is loaded in its stored dtype; each delta is added in float32.
    Returns the number of merged layers."""
    src, out = Path(model_dir), Path(output)
    if not (src / "transformer").is_dir():
        raise MissingFileError(f"merge.model={src} is not a model folder (no transformer/)")
    transformer = QwenImageTransformer2DModel.from_pretrained(str(src), subfolder="transformer")
    n = merge_lora_into(transformer, lora_dir, weight)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp, ignore=lambda d, names: ["transformer", "lora"] if Path(d) == src else [])
    transformer.save_pretrained(tmp / "transformer")
    shutil.copytree(lora_dir, tmp / "lora")
    publish_folder(tmp, out)
    return n
