"""Fused LoRA linear: ``y = x @ W^T + bias + scale * (x @ A^T) @ B^T`` with the output written once.

Shapes (peft's layout): x (..., in), weight W (out, in), bias (out,) or None, lora_a A (r, in),
lora_b B (out, r).

One Triton kernel, ``_lora_linear_kernel``, serves forward and backward. For an output tile it runs
the base GEMM over K and, in the same loop over the same loaded x tile, the rank-r product
``u = x @ A^T`` (r is one extra, narrow accumulator); after the loop it adds ``scale * u @ B^T``
to the accumulator and writes the tile once. No pass over x or y is spent on the LoRA term.

* forward:  Y = x @ W^T + s*(x @ A^T) @ B^T (+ bias), u = x @ A^T kept (M x r, fp32) for backward;
* backward: dx = dy @ W + s*(dy @ B) @ A is the same kernel with W, A, B read transposed
  (strides only), and g = dy @ B (M x r) kept; then the small weight gradients run on cuBLAS:
  dA = s * g^T @ x (r x in), dB = s * dy^T @ u (out x r), and dW = dy^T @ x, dbias = sum(dy)
  only when the base weights require grad.

Dispatch: on CUDA, shapes with fewer than ``FUSED_MIN_ROWS`` rows go to cuBLAS (addmm + two thin
GEMMs), where launch overheads dominate; the threshold is a tuning knob measured with
``benchmarks/bench_lora_linear.py`` on the target card.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

if __package__ != "oars_fast.kernels":  # see kernels/__init__.py: never register the ops twice
    raise ImportError(f"{__name__}: import it as oars_fast.kernels.{__name__.rsplit('.', 1)[-1]}")

from ._common import INTERPRET, use_triton

FUSED_MIN_ROWS = 128

_CONFIGS = [
    triton.Config({"BM": bm, "BN": bn, "BK": bk, "GROUP_M": 8}, num_warps=w, num_stages=s)
    for bm, bn, bk, w, s in [(128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (128, 64, 64, 4, 4), (64, 128, 64, 4, 4),
                             (64, 64, 64, 4, 4), (128, 128, 32, 4, 4), (64, 256, 32, 8, 3)]
]


@triton.jit
def _lora_linear_kernel(x_ptr, w_ptr, a_ptr, b_ptr, bias_ptr, y_ptr, u_ptr, M, N, K, R,
                        sxm, sxk, swn, swk, sar, sak, sbn, sbr, sym, syn, sum_, sur, scale,
                        HAS_BIAS: tl.constexpr, WRITE_U: tl.constexpr, BR: tl.constexpr, PRECISION: tl.constexpr,
                        BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr):
    # grouped tile order: consecutive programs share x rows (L2 reuse)
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BM)
    num_n = tl.cdiv(N, BN)
    group = GROUP_M * num_n
    first_m = (pid // group) * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group) % size_m
    pid_n = (pid % group) // size_m

    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_n = pid_n * BN + tl.arange(0, BN)
    offs_r = tl.arange(0, BR)
    offs_k = tl.arange(0, BK)
    m_mask = offs_m < M
    n_mask = offs_n < N
    r_mask = offs_r < R

    acc = tl.zeros((BM, BN), dtype=tl.float32)
    u = tl.zeros((BM, BR), dtype=tl.float32)
    for k0 in range(0, K, BK):
        kk = k0 + offs_k
        k_mask = kk < K
        x = tl.load(x_ptr + offs_m[:, None].to(tl.int64) * sxm + kk[None, :] * sxk,
                    mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        wt = tl.load(w_ptr + kk[:, None] * swk + offs_n[None, :].to(tl.int64) * swn,
                     mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        at = tl.load(a_ptr + kk[:, None] * sak + offs_r[None, :] * sar,
                     mask=k_mask[:, None] & r_mask[None, :], other=0.0)
        acc = tl.dot(x, wt, acc, input_precision=PRECISION)
        u = tl.dot(x, at, u, input_precision=PRECISION)
    if WRITE_U:
        if pid_n == 0:
            tl.store(u_ptr + offs_m[:, None].to(tl.int64) * sum_ + offs_r[None, :] * sur, u,
                     mask=m_mask[:, None] & r_mask[None, :])
    bt = tl.load(b_ptr + offs_r[:, None] * sbr + offs_n[None, :].to(tl.int64) * sbn,
                 mask=r_mask[:, None] & n_mask[None, :], other=0.0)
    acc = tl.dot((u * scale).to(bt.dtype), bt, acc, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + offs_m[:, None].to(tl.int64) * sym + offs_n[None, :] * syn, acc.to(y_ptr.dtype.element_ty),
             mask=m_mask[:, None] & n_mask[None, :])


_lora_linear_tuned = triton.autotune(configs=_CONFIGS, key=["M", "N", "K", "R"])(_lora_linear_kernel)


def _launch(x, w_strides, a_strides, b_strides, w, a, b, bias, M, N, K, R, scale, y, u):
    """y (M x N) = x @ W'^T + scale*(x @ A'^T) @ B'^T (+ bias); u (M x R, fp32) = x @ A'^T.
    W', A', B' are given by (tensor, strides) so transposed operands need no copy."""
    br = max(16, triton.next_power_of_2(R))
    precision = "ieee" if x.dtype == torch.float32 else "tf32"
    args = (x, w, a, b, bias if bias is not None else y, y, u, M, N, K, R, x.stride(0), x.stride(1), *w_strides,
            *a_strides, *b_strides, y.stride(0), y.stride(1), u.stride(0), u.stride(1), float(scale))
    meta = dict(HAS_BIAS=bias is not None, WRITE_U=True, BR=br, PRECISION=precision)
    if INTERPRET and not x.is_cuda:
        _lora_linear_kernel[(triton.cdiv(M, 32) * triton.cdiv(N, 32),)](*args, **meta, BM=32, BN=32, BK=32,
                                                                           GROUP_M=4)
    else:
        grid = lambda c: (triton.cdiv(M, c["BM"]) * triton.cdiv(N, c["BN"]),)  # noqa: E731
        _lora_linear_tuned[grid](*args, **meta)


def lora_linear_forward(x2, weight, bias, lora_a, lora_b, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """x2 (M, in) -> (y (M, out), u (M, r) fp32)."""
    M, K = x2.shape
    N, R = weight.shape[0], lora_a.shape[0]
    y = torch.empty(M, N, device=x2.device, dtype=x2.dtype)
    u = torch.empty(M, R, device=x2.device, dtype=torch.float32)
    _launch(x2, (weight.stride(0), weight.stride(1)), (lora_a.stride(0), lora_a.stride(1)),
            (lora_b.stride(0), lora_b.stride(1)), weight, lora_a, lora_b, bias, M, N, K, R, scale, y, u)
    return y, u


def lora_linear_backward(dy, weight, lora_a, lora_b, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """dy (M, out) -> (dx (M, in), g = dy @ B (M, r) fp32), the forward kernel on transposed operands."""
    M, N = dy.shape
    K, R = weight.shape[1], lora_a.shape[0]
    dx = torch.empty(M, K, device=dy.device, dtype=dy.dtype)
    g = torch.empty(M, R, device=dy.device, dtype=torch.float32)
    # W'[n', k'] = W[k', n'],  A'[r, k'] = B[k', r],  B'[n', r] = A[r, n']
    _launch(dy, (weight.stride(1), weight.stride(0)), (lora_b.stride(1), lora_b.stride(0)),
            (lora_a.stride(1), lora_a.stride(0)), weight, lora_b, lora_a, None, M, K, N, R, scale, dx, g)
    return dx, g


# ------------------------------------------------------------------------------------------------
# torch.library ops
# ------------------------------------------------------------------------------------------------


@torch.library.custom_op("oars_fast::lora_linear", mutates_args=())
def _lora_linear_op(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], lora_a: torch.Tensor,
                    lora_b: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    return lora_linear_forward(x, weight, bias, lora_a, lora_b, scale)


@_lora_linear_op.register_fake
def _(x, weight, bias, lora_a, lora_b, scale):
    return x.new_empty(x.shape[0], weight.shape[0]), x.new_empty(x.shape[0], lora_a.shape[0], dtype=torch.float32)


@torch.library.custom_op("oars_fast::lora_linear_dx", mutates_args=())
def _lora_linear_dx_op(dy: torch.Tensor, weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
                       scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    return lora_linear_backward(dy, weight, lora_a, lora_b, scale)


@_lora_linear_dx_op.register_fake
def _(dy, weight, lora_a, lora_b, scale):
    return dy.new_empty(dy.shape[0], weight.shape[1]), dy.new_empty(dy.shape[0], lora_a.shape[0],
                                                                      dtype=torch.float32)


def _setup_context(ctx, inputs, output):
    x, weight, bias, lora_a, lora_b, scale = inputs
    ctx.save_for_backward(x, weight, lora_a, lora_b, output[1])
    ctx.scale = scale
    ctx.has_bias = bias is not None


def _backward(ctx, dy, du):
    x, weight, lora_a, lora_b, u = ctx.saved_tensors
    s = ctx.scale
    need_x, need_w, need_b, need_a, need_lb = (ctx.needs_input_grad[i] for i in range(5))
    dy = dy.contiguous()
    dx = da = dlb = dw = db = None
    if need_x:
        dx, g = _lora_linear_dx_op(dy, weight, lora_a, lora_b, s)
    elif need_a:
        g = (dy @ lora_b).float()
    if need_a:
        da = (s * (g.to(x.dtype).t() @ x)).to(lora_a.dtype)
    if need_lb:
        dlb = (s * (dy.t() @ u.to(dy.dtype))).to(lora_b.dtype)
    if need_w:
        dw = (dy.t() @ x).to(weight.dtype)
    if need_b and ctx.has_bias:
        db = dy.sum(0).to(weight.dtype)
    return dx, dw, db, da, dlb, None


_lora_linear_op.register_autograd(_backward, setup_context=_setup_context)


# ------------------------------------------------------------------------------------------------
# Public function and reference
# ------------------------------------------------------------------------------------------------


def _fused_pays_off(x2: torch.Tensor) -> bool:
    return not x2.is_cuda or x2.shape[0] >= FUSED_MIN_ROWS


def lora_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], lora_a: torch.Tensor,
                lora_b: torch.Tensor, scale: float) -> torch.Tensor:
    """``x @ weight.T + bias + scale * (x @ lora_a.T) @ lora_b.T`` for x (..., in); differentiable in all."""
    if x.shape[-1] != weight.shape[1] or lora_a.shape[1] != weight.shape[1] or lora_b.shape[0] != weight.shape[0] \
            or lora_b.shape[1] != lora_a.shape[0]:
        raise ValueError(f"lora_linear: shapes do not fit: x {tuple(x.shape)}, weight {tuple(weight.shape)}, "
                         f"lora_a {tuple(lora_a.shape)}, lora_b {tuple(lora_b.shape)}")
    x2 = x.reshape(-1, x.shape[-1])
    if x2.shape[0] > 0 and use_triton(x2, weight, lora_a, lora_b) and _fused_pays_off(x2):
        dtype = x.dtype
        y, _ = _lora_linear_op(x2.contiguous(), weight.to(dtype), None if bias is None else bias.to(dtype),
                               lora_a.to(dtype), lora_b.to(dtype), float(scale))
        return y.view(*x.shape[:-1], weight.shape[0])
    return lora_linear_ref(x, weight, bias, lora_a, lora_b, scale)


def lora_linear_ref(x, weight, bias, lora_a, lora_b, scale: float) -> torch.Tensor:
    """The eager composition (what peft computes): base linear + scale * B(A(x))."""
    return F.linear(x, weight, bias) + scale * F.linear(F.linear(x, lora_a), lora_b)
