"""Fused NFT loss (forward reduction + backward gradient) vs the eager reference vs
torch.compile(reference), on latent batches of Qwen-Image's RL update (24 x 16 x 128 x 128 and
larger), bf16 inputs, with the KL term (v_ref) as in the RL stage. GB/s counts the bytes the op
must move (inputs read once per pass, the gradient written once); compare with the measured copy
bandwidth printed first. The policy term is weighted by the advantage clip (policy_weight = 5) as in the RL stage.

    python -m benchmarks.bench_nft_loss [--smoke] [--out DIR]
"""
from __future__ import annotations

from pathlib import Path

import torch

from oars_fast.kernels import nft_loss, nft_loss_ref

from .harness import Case, bench_main, copy_bandwidth, device_name, git_sha, write_rows


def make_case(shape: tuple[int, ...], dtype, device) -> Case:
    b = shape[0]

    def make():
        g = torch.Generator(device=device).manual_seed(0)
        vs = [torch.randn(shape, generator=g, device=device, dtype=dtype) for _ in range(4)]
        vs[0].requires_grad_()
        t = torch.rand(b, generator=g, device=device)
        r = torch.rand(b, generator=g, device=device)
        return (*vs, t, r)

    ref = lambda th, old, tg, vr, t, r: nft_loss_ref(th, old, tg, t, r, 1.0, vr, 1e-4, True, 5.0)  # noqa: E731
    providers = {
        "ours": lambda th, old, tg, vr, t, r: nft_loss(th, old, tg, t, r, 1.0, vr, 1e-4, True, 5.0),
        "eager": ref,
        "compile": torch.compile(ref),
    }
    el = torch.empty((), dtype=dtype).element_size()
    n = 1
    for s in shape:
        n *= s
    fwd, bwd = 4 * n * el, 5 * n * el  # fwd reads 4 inputs; bwd reads 4 and writes the gradient
    return Case("nft_loss", {"shape": list(shape)}, dtype, make, providers,
                bytes={"fwd": fwd, "bwd": bwd, "full": fwd + bwd}, grad_of=(0,))


def cases(smoke: bool = False):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if smoke:
        return [make_case((3, 4, 8, 8), torch.float32, device)]
    return [make_case(s, torch.bfloat16, device) for s in ((24, 16, 128, 128), (48, 16, 128, 128), (24, 16, 256, 256))]


def _copy_ceiling(out: Path) -> None:
    bw = copy_bandwidth()
    print(f"measured copy bandwidth: {bw:.0f} GB/s")
    write_rows([{"device": device_name(), "git_sha": git_sha(), "torch": torch.__version__, "kernel": "copy",
                 "shape": "1 GiB", "provider": "torch.copy_", "mode": "copy", "gbps": f"{bw:.1f}"}],
               out / "nft_loss.csv")


def main(argv=None) -> None:
    bench_main(__doc__, cases, argv, before=_copy_ceiling)


if __name__ == "__main__":
    main()
