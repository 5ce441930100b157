"""LoRA adapters on the transformer through peft (diffusers' ``add_adapter``), and merging.

Adapters keep peft's module layout and state-dict keys (``...to_q.lora_A.<adapter>.weight``), so
what we save loads with peft/diffusers and what they save loads here.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ..config import LoRAConfig


def add_lora(transformer: nn.Module, cfg: LoRAConfig, adapter_name: str = "default") -> None:
    """Attach a LoRA adapter (rank, alpha, target modules from `cfg`); only its weights train."""
    from peft import LoraConfig

    transformer.add_adapter(LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, target_modules=list(cfg.target_modules),
                                       lora_dropout=cfg.dropout, init_lora_weights=True),
                            adapter_name=adapter_name)


def lora_layers(module: nn.Module):
    """(name, layer) of every peft LoRA layer in `module`."""
    from peft.tuners.lora import LoraLayer

    return [(n, m) for n, m in module.named_modules() if isinstance(m, LoraLayer)]


def lora_state_dict(transformer: nn.Module, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """The adapter's weights under peft's saved keys (``...lora_A.weight``, no adapter name)."""
    from peft.utils import get_peft_model_state_dict

    return get_peft_model_state_dict(transformer, adapter_name=adapter_name)


def merged_state_dict(transformer: nn.Module, adapter_names: list[str] | None = None) -> dict[str, torch.Tensor]:
    """The transformer's plain state dict (no peft keys) with ``scale * B @ A`` of the given adapters
    (default: the active ones) added into each adapted weight. The model is left unchanged."""
    deltas: dict[str, torch.Tensor] = {}
    for name, layer in lora_layers(transformer):
        names = adapter_names if adapter_names is not None else list(layer.active_adapters)
        for a in names:
            if a in layer.lora_A:
                d = layer.get_delta_weight(a).detach().float()
                key = f"{name}.weight"
                deltas[key] = deltas[key] + d if key in deltas else d
    out = {}
    for key, value in transformer.state_dict().items():
        if ".lora_" in key or "lora_magnitude" in key:
            continue
        plain = key.replace(".base_layer.", ".")
        if plain in deltas:
            value = (value.float() + deltas[plain].to(value.device)).to(value.dtype)
        out[plain] = value
    return out
