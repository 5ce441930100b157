"""Row-wise fp8 quantisation of activations (``rl.fp8_nograd``'s A operand): the fused Triton pass against the
eager reference and torch.compile of it, bf16 activations of the policy's block linears (M = 16384 tokens, K =
3072 attention / 12288 MLP). GB/s counts what the op must move (the activation read once, the codes written,
the scales). The outputs are compared (codes bit for bit, scales exactly) before anything is timed.

    python -m benchmarks.bench_fp8_quant [--smoke] [--out DIR]
"""
from __future__ import annotations

import torch

from oars_fast.kernels import fp8_quantize_rows, fp8_quantize_rows_ref

from .harness import Case, bench_main

SHAPES = ((16384, 3072), (16384, 12288))


def make_case(m: int, k: int, dtype, device) -> Case:
    def make():
        g = torch.Generator(device=device).manual_seed(0)
        return (torch.randn(m, k, generator=g, device=device, dtype=dtype),)

    providers = {"ours": fp8_quantize_rows, "eager": fp8_quantize_rows_ref,
                 "compile": torch.compile(fp8_quantize_rows_ref)}
    x, = make()
    (codes, scales), (ref_codes, ref_scales) = fp8_quantize_rows(x), fp8_quantize_rows_ref(x)
    if not (torch.equal(codes.view(torch.uint8), ref_codes.view(torch.uint8)) and torch.equal(scales, ref_scales)):
        raise AssertionError(f"fp8_quantize_rows disagrees with the reference at {m}x{k} {dtype}")
    el = torch.empty((), dtype=dtype).element_size()
    return Case("fp8_quantize_rows", {"m": m, "k": k}, dtype, make, providers,
                bytes={"fwd": m * k * el + m * k + 4 * m}, modes=("fwd",))


def cases(smoke: bool = False):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if smoke:
        return [make_case(37, 100, torch.float32, device)]
    return [make_case(m, k, torch.bfloat16, device) for m, k in SHAPES]


if __name__ == "__main__":
    bench_main(__doc__, cases)
