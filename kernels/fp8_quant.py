"""Row-wise fp8 e4m3 quantisation of activations in one pass over the input (``rl.fp8_nograd``'s A operand).

    codes (M, cols) float8_e4m3fn, scales (M, 1) float32  with  x ~ codes.float() * scales

* ``scale = max(amax(|x_row|) / 448, tiny)`` (float32; a zero row gets the smallest positive scale, codes 0);
* ``codes = cast_e4m3(clamp(x / scale, -448, 448))`` with round-to-nearest-even, columns K..cols zero (cuBLASLt
  wants K a multiple of 16);
* codes row-major whatever x's strides (cuBLASLt's fp8 GEMM takes a row-major A only).

The eager version (:func:`fp8_quantize_rows_ref`, what ``oars_fast.models.fp8`` did before) makes a float32 copy of
the activation and runs abs, amax, divide, clamp and cast over it: about 30 bytes of traffic per element and
three float32 temporaries of the activation's size. On an H200 that made the fp8 rollout 1.5x slower than bf16
and its peak 4 GB higher (``benchmarks/results/gpu/2026-11-27-h200/``). The kernel reads each row twice (the
amax, then the codes; a row of 3072-12288 bf16 values is 6-24 KiB, still in L1/L2 the second time) and writes
1 byte per element: ~5 bytes per element and no temporaries. Division is IEEE-rounded (``div_rn``) so the codes
equal the reference's bit for bit, and the rounding to e4m3 is done explicitly in float32 (``_round_e4m3``) before
the cast, so that Triton's CPU interpreter, whose fp8 cast mis-rounds, gives the hardware's codes too.

One program per row, the row in BLOCK-wide chunks. Not differentiable (no-grad forwards only).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import use_triton

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
_TINY = torch.finfo(torch.float32).tiny


@triton.jit
def _quantize_rows_kernel(x, codes, scales, K, COLS, sxm, sxk, scm, FP8_MAX: tl.constexpr, TINY: tl.constexpr,
                          BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    xrow = x + row * sxm
    amax = tl.zeros([BLOCK], dtype=tl.float32)
    for k0 in range(0, K, BLOCK):
        k = k0 + tl.arange(0, BLOCK)
        v = tl.load(xrow + k * sxk, mask=k < K, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.abs(v))
    scale = tl.maximum(tl.math.div_rn(tl.max(amax, axis=0), FP8_MAX), TINY)
    tl.store(scales + row, scale)
    crow = codes + row * scm
    for k0 in range(0, COLS, BLOCK):
        k = k0 + tl.arange(0, BLOCK)
        v = tl.load(xrow + k * sxk, mask=k < K, other=0.0).to(tl.float32)  # columns K..COLS: zeros
        q = tl.minimum(tl.maximum(tl.math.div_rn(v, scale), -FP8_MAX), FP8_MAX)
        tl.store(crow + k, _round_e4m3(q).to(tl.float8e4nv), mask=k < COLS)


@triton.jit
def _round_e4m3(q):
    """Round float32 |q| <= 448 to the nearest e4m3 value (ties to even), still as float32, so that the cast to fp8
    that follows is exact. (The hardware cast rounds the same way; Triton's CPU interpreter does not: it turned
    124.2 into 64 instead of 128, a rounding carry into the exponent lost.) Normal range (|q| >= 2^-6): round the
    23-bit mantissa to 3 bits on the integer bits (carries move into the exponent as they should); subnormal range:
    round |q| to a multiple of 2^-9 by adding and subtracting 2^14 (float32's own round-to-nearest-even),
    the sign put back after."""
    bits = q.to(tl.int32, bitcast=True)
    bits = (bits + 0x7FFFF + ((bits >> 20) & 1)) & -0x100000  # -0x100000: the mask 0xFFF00000
    normal = bits.to(tl.float32, bitcast=True)
    mag = tl.abs(q)
    sub = (mag + 16384.0) - 16384.0  # |q| + 2^14 lies in [2^14, 2^15): float32 spacing 2^-9 there
    return tl.where(mag >= 0.015625, normal, tl.where(q < 0, -sub, sub))


def fp8_quantize_rows_ref(x: torch.Tensor, cols: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The pure-torch version: x (M, K) -> (codes (M, cols) fp8 row-major, scales (M, 1) float32)."""
    xf = x.float().contiguous()
    if cols is not None and cols > xf.shape[1]:
        xf = torch.nn.functional.pad(xf, (0, cols - xf.shape[1]))
    scale = (xf.abs().amax(dim=1, keepdim=True) / FP8_MAX).clamp_min(_TINY)
    return (xf / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


def fp8_quantize_rows(x: torch.Tensor, cols: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x (M, K), any float dtype and strides -> (codes (M, cols) fp8 row-major, scales (M, 1) float32); `cols` >= K
    pads each row with zero codes (default K). The Triton kernel where it runs, else :func:`fp8_quantize_rows_ref`."""
    if x.dim() != 2:
        raise ValueError(f"fp8_quantize_rows: x must be 2-D (M, K), got shape {tuple(x.shape)}")
    m, k = x.shape
    cols = k if cols is None else int(cols)
    if cols < k:
        raise ValueError(f"fp8_quantize_rows: cols={cols} is less than K={k}")
    if m == 0 or k == 0 or not use_triton(x):
        return fp8_quantize_rows_ref(x, cols)
    codes = torch.empty(m, cols, device=x.device, dtype=FP8)
    scales = torch.empty(m, 1, device=x.device, dtype=torch.float32)
    block = min(triton.next_power_of_2(cols), 2048)
    _quantize_rows_kernel[(m,)](x, codes, scales, k, cols, x.stride(0), x.stride(1), codes.stride(0),
                                FP8_MAX=FP8_MAX, TINY=_TINY, BLOCK=block, num_warps=4 if block <= 1024 else 8)
    return codes, scales
