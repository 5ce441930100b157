"""The policy side of the NR-RL memory plan, measured at reduced depth on a GPU and extrapolated by depth.

The README's plan for one 80 GB GPU (policy transformer + COMPASS + LoRA state + VAE + activations) is computed
from parameter counts. This measures the transformer's part: the production architecture at full width (3072
hidden, 24 heads of 128, text dim 3584) with ``--layers`` blocks (two depths, e.g. 2 and 4), bf16 weights, the
RL LoRA (r32 on the 8 attention projections, float32 adapters, bf16 autocast, as training runs it) and the
chosen activation checkpointing:

* weights: ``torch.cuda.memory_allocated`` after building the model (off CUDA: the parameters' and buffers' bytes);
* rollout: the peak above the weights of one no-grad forward of ``--rollout-batch`` candidates;
* update: the peak above the weights of one update micro-batch (``--micro-batch``) forward + backward.

Tokens per sample are those of a ``--size`` x ``--size`` output: (size/16)^2 target tokens, as many LR-condition
tokens, and ``--text`` prompt tokens (the Edit-Plus prompt with the LR inside the text encoder: ~220). Each
quantity is fitted as ``a + b * layers`` through the two depths and extrapolated to the production depth (60
blocks). COMPASS's weights and scoring peak are measured by ``benchmarks.compass_scoring --arch qwen3vl-8b``.

    python -m benchmarks.memory_plan [--layers 2 4] [--micro-batch 8] [--rollout-batch 24] [--size 512]
                                     [--checkpointing full] [--out DIR]
    python -m benchmarks.memory_plan --smoke      # tiny widths on any device: a code check, no memory numbers

Rows go to ``<out>/memory_plan.csv`` (one per depth and quantity, and the extrapolated ones).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from .harness import RESULTS, device_name, git_sha, write_table

PRODUCTION_BLOCKS = 60
MiB = 2**20


def _model(layers: int, smoke: bool, dev: str, checkpointing: str):
    from diffusers import QwenImageTransformer2DModel

    from oars_fast.config import LoRAConfig
    from oars_fast.models.backbone import set_checkpointing
    from oars_fast.models.lora import add_lora, use_lora_kernel

    cfg = dict(num_layers=layers)
    if smoke:
        cfg.update(attention_head_dim=16, num_attention_heads=2, joint_attention_dim=24, axes_dims_rope=(4, 6, 6))
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    torch.manual_seed(0)
    with torch.device(dev):
        model = torch.nn.Module.to(QwenImageTransformer2DModel(**cfg), dtype)
    model.requires_grad_(False)
    add_lora(model, LoRAConfig())  # the RL LoRA: r32, alpha 64, the 8 attention projections, float32 adapters
    use_lora_kernel(model, LoRAConfig().kernel)  # the fused kernel, as RL runs it
    set_checkpointing(model, checkpointing)
    return model


def _inputs(model, batch: int, img: int, txt: int, dev: str) -> dict:
    side = int(img**0.5)
    g = torch.Generator(device=dev).manual_seed(1)
    return dict(
        hidden_states=torch.randn(batch, 2 * img, model.config.in_channels, device=dev, generator=g),
        encoder_hidden_states=torch.randn(batch, txt, model.config.joint_attention_dim, device=dev, generator=g),
        timestep=torch.rand(batch, device=dev, generator=g),
        img_shapes=[[(1, side, side)] * 2] * batch,
        return_dict=False,
    )


def measure(layers: int, args, dev: str) -> dict[str, float]:
    """weights, rollout peak and update peak above the weights (MiB) at this depth (NaN off CUDA)."""
    cuda = dev == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
    model = _model(layers, args.smoke, dev, args.checkpointing)
    img = (args.size // 16) ** 2
    counted = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers())) / MiB
    out = {"weights": (torch.cuda.memory_allocated() - base) / MiB if cuda else counted}
    for name, batch, grad in (("rollout", args.rollout_batch, False), ("update", args.micro_batch, True)):
        kw = _inputs(model, batch, img, args.text, dev)
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
        with torch.set_grad_enabled(grad), torch.autocast(dev, dtype=torch.bfloat16, enabled=cuda):
            y = model(**kw)[0]
        if grad:
            y.float().pow(2).mean().backward()
        assert torch.isfinite(y.float()).all(), f"{name}: non-finite output"
        del y, kw
        if cuda:
            torch.cuda.synchronize()
            out[name] = (torch.cuda.max_memory_allocated() - before) / MiB
        else:
            out[name] = float("nan")
        for p in model.parameters():
            p.grad = None
    del model
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, nargs=2, default=[2, 4], help="two reduced depths to fit a + b * layers")
    ap.add_argument("--micro-batch", type=int, default=8, help="update micro-batch (rl.micro_batch)")
    ap.add_argument("--rollout-batch", type=int, default=24, help="rollout forward batch (K candidates)")
    ap.add_argument("--size", type=int, default=512, help="output side in pixels (tokens = (size/16)^2 each stream)")
    ap.add_argument("--text", type=int, default=220, help="prompt tokens per sample")
    ap.add_argument("--checkpointing", default="full", choices=["none", "full", "attention", "mlp"])
    ap.add_argument("--smoke", action="store_true", help="tiny widths and shapes on any device (a code check)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    if args.smoke:
        args.layers, args.micro_batch, args.rollout_batch, args.size, args.text = [1, 2], 2, 3, 64, 7
    l1, l2 = args.layers
    if l2 <= l1:
        raise SystemExit("memory_plan: --layers takes two depths, the second larger")
    got = {n: measure(n, args, dev) for n in (l1, l2)}
    shape = (f"micro-batch {args.micro_batch}, rollout batch {args.rollout_batch}, {args.size}x{args.size} "
             f"({2 * (args.size // 16) ** 2} image + {args.text} text tokens), checkpointing {args.checkpointing}")
    rows = []
    print(f"memory_plan: {device_name()}, transformer at {l1} and {l2} blocks, {shape}")
    for q in ("weights", "rollout", "update"):
        a1, a2 = got[l1][q], got[l2][q]
        per = (a2 - a1) / (l2 - l1)
        full = a1 + per * (PRODUCTION_BLOCKS - l1)
        for layers, value, kind in ((l1, a1, "measured"), (l2, a2, "measured"), (PRODUCTION_BLOCKS, full, "fit")):
            rows.append({"device": device_name(), "git_sha": git_sha(), "torch": torch.__version__, "quantity": q,
                         "blocks": layers, "mib": f"{value:.1f}", "kind": kind,
                         "per_block_mib": f"{per:.2f}", "shape": shape + (" smoke" if args.smoke else "")})
        print(f"  {q:8s} {l1} blocks {a1:9.1f} MiB, {l2} blocks {a2:9.1f} MiB -> {per:8.2f} MiB per block, "
              f"{PRODUCTION_BLOCKS} blocks {full / 1024:7.2f} GiB")
    path = write_table(rows, args.out / "memory_plan.csv")
    print(f"memory_plan: {path}")
    return got


if __name__ == "__main__":
    main()
