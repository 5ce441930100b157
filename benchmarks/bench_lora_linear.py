"""LoRA linear: ours (Triton: u pass + augmented GEMM) vs cuBLAS addmm vs the peft-style eager layer, with
the frozen base linear alone as the floor, and the u pass alone.

Providers (one run, side by side):

* ``base``   F.linear(x, W, bias): the frozen base GEMM alone (cuBLAS), what the LoRA term is paid on top of
* ``ours``   ``lora_linear``: u = x @ A^T once, then y = [x | s*u] @ [W | B]^T + bias (Triton; TMA on Hopper)
* ``addmm``  ``lora_linear_addmm``: C = addmm(bias, u, B^T, alpha=s), y = addmm(C, x, W^T) (cuBLAS)
* ``peft``   as RL training runs peft: fp32 adapters under bf16 autocast, base F.linear +
  lora_B(lora_A(x)) * s, no dropout (eager)
* ``u``      the u pass alone (us = s * x @ A^T; forward only, its own case ``lora_u``)

Modes fwd and full (forward + backward: dx and the adapters' gradients; the base is frozen). Shapes:
M = 16384 and 49152 tokens, in = out = 3072 (Qwen-Image's hidden size), r = 32, bf16 on a GPU; a small
fp32 shape on the CPU (``--smoke``). TFLOP/s count the LoRA layer's flops for every provider (``base``
does ~2% fewer), so ``base``'s figure is the ceiling the others are held to. Outputs and dx of every
provider are checked against an fp32 reference before anything is timed; the configs the Triton
kernels used are printed (``OARS_LORA_AUTOTUNE=1`` tunes them in the warm-up, outside the timing).

    python -m benchmarks.bench_lora_linear [--smoke] [--out DIR]
"""
from __future__ import annotations

import importlib

import torch
import torch.nn.functional as F

from oars_fast.kernels import lora_linear, lora_linear_addmm, lora_linear_ref

from .harness import Case, bench_main

L = importlib.import_module("oars_fast.kernels.lora_linear")


def _weights(n: int, k: int, r: int, dtype, device, seed: int = 0):
    g = torch.Generator(device=device).manual_seed(seed)
    w = (torch.randn(n, k, generator=g, device=device) / k ** 0.5).to(dtype)
    bias = (torch.randn(n, generator=g, device=device) * 0.1).to(dtype)
    a = (torch.randn(r, k, generator=g, device=device) / k ** 0.5).requires_grad_()  # fp32 adapters, as in RL
    b = (torch.randn(n, r, generator=g, device=device) * 0.02).requires_grad_()
    return w, bias, a, b


def make_providers(w, bias, a, b, scale: float, dtype, device: str) -> dict:
    autocast = dtype != torch.float32

    def peft(x):
        with torch.autocast(device, dtype=dtype, enabled=autocast):
            return F.linear(x, w, bias) + F.linear(F.linear(x, a), b) * scale

    return {
        "base": lambda x: F.linear(x, w, bias),
        "ours": lambda x: lora_linear(x, w, bias, a, b, scale),
        "addmm": lambda x: lora_linear_addmm(x, w, bias, a, b, scale),
        "peft": peft,
    }


def check_agree(providers: dict, x: torch.Tensor, w, bias, a, b, scale: float) -> None:
    """Every LoRA provider's output and dx against fp32 math, within 4x the peft-style provider's own error."""
    xr = x.detach().float().requires_grad_()
    ref = lora_linear_ref(xr, w.float(), bias.float(), a.detach(), b.detach(), scale)
    g = torch.randn_like(ref)
    ref.backward(g)
    errs = {}
    for name in ("peft", "ours", "addmm"):
        xi = x.detach().clone().requires_grad_()
        out = providers[name](xi)
        out.backward(g.to(out.dtype))
        errs[name] = ((out.float() - ref).abs().max().item(), (xi.grad.float() - xr.grad).abs().max().item())
    a.grad = b.grad = None
    floor = 8 * torch.finfo(x.dtype).eps * ref.abs().max().item()
    for name, (e_out, e_dx) in errs.items():
        if e_out > 4 * errs["peft"][0] + floor or e_dx > 4 * errs["peft"][1] + floor:
            raise AssertionError(f"lora_linear benchmark: provider {name} disagrees with the reference: "
                                 f"out err {e_out:.3g}, dx err {e_dx:.3g} (peft-style: {errs['peft']})")
    print("outputs agree (max abs err out / dx vs fp32): "
          + ", ".join(f"{k} {v[0]:.2g}/{v[1]:.2g}" for k, v in errs.items()))


def make_cases(tokens: int, hidden: int, rank: int, dtype, device: str) -> list[Case]:
    w, bias, a, b = _weights(hidden, hidden, rank, dtype, device)
    scale = 2.0  # alpha = 2 r (r32 / a64)
    providers = make_providers(w, bias, a, b, scale, dtype, device)

    def make():
        g = torch.Generator(device=device).manual_seed(1)
        return (torch.randn(tokens, hidden, generator=g, device=device).to(dtype).requires_grad_(),)

    check_agree(providers, make()[0], w, bias, a, b, scale)
    m, n, k, r = tokens, hidden, hidden, rank
    el = torch.empty((), dtype=dtype).element_size()
    fwd = 2 * m * n * k + 2 * m * r * (k + n)
    bwd = 2 * m * n * k + 2 * m * r * (k + n) + 2 * r * m * k + 2 * n * m * r  # dx + dA + dB
    shape = {"tokens": tokens, "in": hidden, "out": hidden, "rank": rank}
    lora = Case("lora_linear", shape, dtype, make, providers, flops={"fwd": fwd, "full": fwd + bwd}, grad_of=(0,),
                modes=("fwd", "full"))
    if device == "cpu" and not L.INTERPRET:
        print("lora_u: skipped (Triton runs on the CPU only under TRITON_INTERPRET=1)")
        return [lora]
    a_c = a.detach().to(dtype)
    u_case = Case("lora_u", shape, dtype, make, {"u": lambda x: L.lora_u_forward(x.detach(), a_c, scale)},
                  bytes={"fwd": m * k * el + m * L.rank_block(r) * el}, modes=("fwd",))  # memory-bound: GB/s
    return [lora, u_case]


def cases(smoke: bool = False):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if smoke or device == "cpu":
        return make_cases(64 if smoke else 512, 96 if smoke else 256, 8, torch.float32, device)
    out = []
    for tokens in (16384, 49152):
        out += make_cases(tokens, 3072, 32, torch.bfloat16, device)
    return out


def _print_configs() -> None:
    for key, cfg in L._CHOSEN.items():
        print(f"lora_linear config {key}: {cfg}")
    for key, cfg, times in L.TUNE_EVENTS:
        print(f"lora_linear tuned {key}: {cfg}  ({', '.join(f'{c} {t:.3f} ms' for c, t in times.items())})")


def main(argv=None) -> None:
    bench_main(__doc__, cases, argv)
    _print_configs()


if __name__ == "__main__":
    main()
