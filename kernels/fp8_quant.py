"""Row-wise fp8 e4m3 quantisation of activations in one pass over the input (``rl.fp8_nograd``'s A operand).

    codes (M, cols) float8_e4m3fn, scales (M, 1) float32  with  x ~ codes.float() * scales

* ``scale = max(amax(|x_row|) / 448, tiny)`` (float32; a zero row gets the smallest positive scale, codes 0);
* ``codes = cast_e4m3(clamp(x / scale, -448, 448))`` with round-to-nearest-even, columns K..cols zero (cuBLASLt
  wants K a multiple of 16);
* codes row-major whatever x's strides (cuBLASLt's fp8 GEMM takes a row-major A only);
* non-finite values as the reference: a row holding NaN gets a NaN scale and NaN codes, one holding inf an inf
  scale (its finite values code 0, the infs NaN); -0.0 codes as -0.0.

The eager version (:func:`fp8_quantize_rows_ref`, what ``oars_fast.models.fp8`` did before) makes a float32 copy of
the activation and runs abs, amax, divide, clamp and cast over it: about 30 bytes of traffic per element and
three float32 temporaries of the activation's size. On an H200 that made the fp8 rollout 1.5x slower than bf16
and its peak 4 GB higher (``benchmarks/results/gpu/2026-11-27-h200/``). The kernel reads each row twice (the
amax, then the codes; a row of 3072-12288 bf16 values is 6-24 KiB, still in L1/L2 the second time) and writes
1 byte per element: ~5 bytes per element and no temporaries. Division is IEEE-rounded (``div_rn``) and the e4m3
bits are built explicitly (``_e4m3_code``, stored as uint8) instead of by Triton's fp8 cast, so the codes equal the
reference's bit for bit on the GPU and in Triton's CPU interpreter alike (whose fp8 cast mis-rounds).

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
        v = tl.load(xrow + k.to(tl.int64) * sxk, mask=k < K, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.abs(v), propagate_nan=tl.PropagateNan.ALL)  # a NaN row stays NaN
    row_max = tl.max(tl.where(amax != amax, float("inf"), amax), axis=0)  # tl.max drops NaN: carry it as inf...
    row_max = tl.where(tl.max((amax != amax).to(tl.int32), axis=0) > 0, float("nan"), row_max)  # ...then NaN
    scale = tl.maximum(tl.math.div_rn(row_max, FP8_MAX), TINY, propagate_nan=tl.PropagateNan.ALL)
    tl.store(scales + row, scale)
    crow = codes + row * scm
    for k0 in range(0, COLS, BLOCK):
        k = k0 + tl.arange(0, BLOCK)
        v = tl.load(xrow + k.to(tl.int64) * sxk, mask=k < K, other=0.0).to(tl.float32)  # columns K..COLS: zeros
        q = tl.minimum(tl.maximum(tl.math.div_rn(v, scale), -FP8_MAX, propagate_nan=tl.PropagateNan.ALL), FP8_MAX,
                       propagate_nan=tl.PropagateNan.ALL)
        tl.store(crow + k, _e4m3_code(q).to(tl.uint8), mask=k < COLS)


@triton.jit
def _e4m3_code(q):
    """The e4m3fn bit pattern (int32, 0..255) of float32 q, |q| <= 448 or NaN, rounded to nearest, ties to even:
    the same bits as torch's cast, built with integer and float32 arithmetic (Triton's CPU interpreter casts to
    fp8 wrongly: 124.2 became 64, a rounding carry into the exponent lost, and NaN became 384).

    Normal range (|q| >= 2^-6): the 23-bit mantissa rounded to 3 bits on the integer bits (a carry moves into the
    exponent as it should), then exponent - 120 (float32's bias 127, e4m3's 7) and the 3 mantissa bits. Subnormal
    range: |q| rounded to a multiple of 2^-9 by adding and subtracting 2^14 (float32's own round-to-nearest-even),
    the code being that multiple (8, i.e. 2^-6 after rounding up, is also the smallest normal's code). The sign bit
    is q's own (-0.0 stays -0.0: tanh-GELU outputs give it); NaN codes as 0x7F with its sign."""
    bits = q.to(tl.int32, bitcast=True)
    sign = (bits >> 24) & 0x80
    rounded = (bits + 0x7FFFF + ((bits >> 20) & 1)) & 0x7FF00000  # the magnitude's rounded exponent and 3 bits
    normal = ((rounded >> 23) - 120) * 8 + ((rounded >> 20) & 7)
    mag = tl.abs(q)
    sub = (((mag + 16384.0) - 16384.0) * 512.0).to(tl.int32)  # |q| + 2^14 in [2^14, 2^15): float32 spacing 2^-9
    code = tl.where(mag >= 0.015625, normal, sub)
    return tl.where(q != q, 0x7F, code) | sign


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
    _quantize_rows_kernel[(m,)](x, codes.view(torch.uint8), scales, k, cols, x.stride(0), x.stride(1), codes.stride(0),
                                FP8_MAX=FP8_MAX, TINY=_TINY, BLOCK=block, num_warps=4 if block <= 1024 else 8)
    return codes, scales
