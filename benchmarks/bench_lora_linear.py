"""Fused LoRA linear vs peft's eager LoRA Linear vs torch.compile(reference), plus the frozen base
linear alone (the floor: the LoRA term should cost little on top of it).

Shapes from Qwen-Image: hidden 3072 (in = out = 3072), tokens 1024..8192, rank 32 and 64, bf16,
frozen base (as in RL), gradients for x, A and B.

    python -m benchmarks.bench_lora_linear [--smoke] [--out DIR]
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from oars_fast.kernels import lora_linear, lora_linear_ref

from .harness import Case, bench_main


def _peft_layer(hidden: int, rank: int, dtype, device):
    """peft's LoRA Linear (alpha = 2 r, as r32/a64) around a frozen base, through peft's public API."""
    from peft import LoraConfig, inject_adapter_in_model

    holder = torch.nn.Module()
    holder.proj = torch.nn.Linear(hidden, hidden, bias=True)
    inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["proj"]), holder)
    layer = holder.proj.to(device, dtype)
    layer.base_layer.requires_grad_(False)
    torch.nn.init.normal_(layer.lora_B["default"].weight, std=0.02)
    return layer


def make_case(tokens: int, hidden: int, rank: int, dtype, device) -> Case:
    layer = _peft_layer(hidden, rank, dtype, device)
    w, b = layer.base_layer.weight, layer.base_layer.bias
    a, bb = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    scale = float(layer.scaling["default"])

    def make():
        x = torch.randn(tokens, hidden, device=device, dtype=dtype, requires_grad=True)
        return (x,)

    ref = lambda x: lora_linear_ref(x, w, b, a, bb, scale)  # noqa: E731
    providers = {
        "ours": lambda x: lora_linear(x, w, b, a, bb, scale),
        "eager": lambda x: layer(x),  # peft's LoRA Linear, eager
        "compile": torch.compile(ref),
        "base": lambda x: F.linear(x, w, b),  # frozen base linear alone
    }
    m, n, k, r = tokens, hidden, hidden, rank
    fwd = 2 * m * n * k + 2 * m * r * (k + n)
    bwd = 2 * m * n * k + 2 * m * r * (k + n) + 2 * r * m * k + 2 * n * m * r  # dx + dA + dB
    return Case("lora_linear", {"tokens": tokens, "in": hidden, "out": hidden, "rank": rank}, dtype, make, providers,
                flops={"fwd": fwd, "bwd": bwd, "full": fwd + bwd}, grad_of=(0,))


def cases(smoke: bool = False):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if smoke:
        return [make_case(64, 96, 8, torch.float32, device)]
    return [make_case(t, 3072, r, torch.bfloat16, device) for r in (32, 64) for t in (1024, 2048, 4096, 8192)]


def main(argv=None) -> None:
    bench_main(__doc__, cases, argv)


if __name__ == "__main__":
    main()
