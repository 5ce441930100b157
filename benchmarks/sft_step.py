"""One SFT step of a Qwen-Image-architecture transformer at full width (3072 hidden, 24 heads of
128, text dim 3584) with fewer layers, at 512x512 output (64x64 latents: 1024 target + 1024 LR
tokens), bf16 autocast over float32 master weights (the SFT stage's mode), AdamW.

Times forward + backward + optimizer step of the transformer on random latents (the VAE encode is
excluded: it is frozen and can be cached), median of 10 after 3 warm-up steps; peak memory.

    python -m benchmarks.sft_step [--layers 4] [--batch 2] [--size 512] [--out DIR]
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from .harness import RESULTS, device_name, git_sha, write_rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("sft_step: needs a GPU; skipped")
        return
    from diffusers import QwenImageTransformer2DModel

    from oars_fast.models.backbone import PromptEmbedding, SRBackbone
    from oars_fast.models.flow import flow_matching_loss

    dev = torch.device("cuda")
    tr = QwenImageTransformer2DModel(num_layers=args.layers).to(dev)  # production width, fewer layers
    from diffusers import AutoencoderKLQwenImage

    vae = AutoencoderKLQwenImage(base_dim=16, dim_mult=[1, 1, 1, 1]).to(dev)  # stand-in: not timed
    prompt = PromptEmbedding(torch.randn(1, 64, 3584), torch.ones(1, 64, dtype=torch.long))
    model = SRBackbone(tr, vae, prompt).to(dev)
    opt = torch.optim.AdamW([p for p in tr.parameters()], lr=1e-5, fused=True)
    h = args.size // 8
    x0 = torch.randn(args.batch, 16, h, h, device=dev)
    cond = torch.randn_like(x0)

    def step():
        t = torch.rand(args.batch, device=dev)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = flow_matching_loss(model, x0, cond, t, torch.randn_like(x0))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        step()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    ms = times[len(times) // 2]
    peak = torch.cuda.max_memory_allocated() / 2**20
    n_params = sum(p.numel() for p in tr.parameters())
    tokens = 2 * (h // 2) ** 2
    print(f"sft_step: {device_name()} layers={args.layers} params={n_params / 1e9:.2f}B batch={args.batch} "
          f"{args.size}x{args.size} tokens/sample={tokens} median {ms:.1f} ms, peak {peak:.0f} MB")
    write_rows([{"device": device_name(), "git_sha": git_sha(), "torch": torch.__version__, "kernel": "sft_step",
                 "shape": f'{{"layers": {args.layers}, "batch": {args.batch}, "size": {args.size}}}',
                 "dtype": "bf16-autocast", "provider": "ours", "mode": "full", "ms": f"{ms:.2f}",
                 "p20_ms": f"{times[len(times) // 5]:.2f}", "p80_ms": f"{times[4 * len(times) // 5]:.2f}",
                 "peak_mb": f"{peak:.0f}"}], args.out / "sft_step.csv")


if __name__ == "__main__":
    main()
