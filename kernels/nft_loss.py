"""Fused DiffusionNFT (negative-aware) loss: one reduction pass forward, one gradient pass backward.

Per sample b over its D elements (``v_*`` (B, ...) any trailing shape; ``t``, ``r`` (B,)):

    v+ = beta*v_theta + (1-beta)*v_old          v- = (1+beta)*v_old - beta*v_theta
    e+ = t*(v+ - v_target)                      e- = t*(v- - v_target)   (x0-prediction errors)
    w+ = max(mean|e+|, 1e-5), w- likewise (adaptive; else 1; no gradient through w)
    pos = mean(e+^2)/w+    neg = mean(e-^2)/w-    kl = mean((v_theta - v_ref)^2)  (0 without v_ref)
    loss = mean_b( policy_weight*(r*pos + (1-r)*neg)/beta + kl_weight*kl )

policy_weight scales the policy term before the KL is added (DiffusionNFT multiplies it by the advantage
clip, adv_clip_max = 5); the default 1.0 is the unscaled loss.

Gradient (v_theta only):
    dL/dv_theta = 2/(B*D) * ( policy_weight*(r*t*e+/w+ - (1-r)*t*e-/w-) + kl_weight*(v_theta - v_ref) ).

Forward: ``_nft_loss_fwd_kernel`` reads every input once and writes 5 fp32 partial sums per
(sample, chunk); the loss is assembled from those (B x 5 numbers). Backward:
``_nft_loss_bwd_kernel`` reads the inputs once more and writes the gradient. No other tensor of
the inputs' size is made. Inputs may be bf16/fp16/fp32; accumulation is fp32.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

if __package__ != "oars_fast.kernels":  # see kernels/__init__.py: never register the ops twice
    raise ImportError(f"{__name__}: import it as oars_fast.kernels.{__name__.rsplit('.', 1)[-1]}")

from ._common import use_triton

W_MIN = 1e-5
_BLOCK = 1024
_CHUNK_BLOCKS = 16  # elements per program = _BLOCK * _CHUNK_BLOCKS (fewer, larger programs when D is big)


@triton.jit
def _nft_errors(vth_ptr, vold_ptr, vtgt_ptr, row, idx, m, t, beta):
    """Load one block of a sample; return (v_theta, e+, e-) in fp32 (masked lanes: zeros)."""
    th = tl.load(vth_ptr + row + idx, mask=m, other=0.0).to(tl.float32)
    old = tl.load(vold_ptr + row + idx, mask=m, other=0.0).to(tl.float32)
    tg = tl.load(vtgt_ptr + row + idx, mask=m, other=0.0).to(tl.float32)
    ep = t * (beta * th + (1.0 - beta) * old - tg)
    en = t * ((1.0 + beta) * old - beta * th - tg)
    return th, ep, en


@triton.jit
def _nft_loss_fwd_kernel(vth_ptr, vold_ptr, vtgt_ptr, vref_ptr, t_ptr, part_ptr, D, CHUNK, n_chunks, beta,
                         HAS_REF: tl.constexpr, BLOCK: tl.constexpr):
    b = tl.program_id(0)
    c = tl.program_id(1)
    t = tl.load(t_ptr + b).to(tl.float32)
    row = b.to(tl.int64) * D
    start = c * CHUNK
    abs_p = tl.zeros([BLOCK], dtype=tl.float32)
    abs_n = tl.zeros([BLOCK], dtype=tl.float32)
    sq_p = tl.zeros([BLOCK], dtype=tl.float32)
    sq_n = tl.zeros([BLOCK], dtype=tl.float32)
    sq_kl = tl.zeros([BLOCK], dtype=tl.float32)
    for off in range(0, CHUNK, BLOCK):
        idx = start + off + tl.arange(0, BLOCK)
        m = idx < D
        th, ep, en = _nft_errors(vth_ptr, vold_ptr, vtgt_ptr, row, idx, m, t, beta)
        abs_p += tl.abs(ep)
        abs_n += tl.abs(en)
        sq_p += ep * ep
        sq_n += en * en
        if HAS_REF:
            ref = tl.load(vref_ptr + row + idx, mask=m, other=0.0).to(tl.float32)
            d = th - ref
            sq_kl += d * d
    out = part_ptr + (b * n_chunks + c) * 5
    tl.store(out + 0, tl.sum(abs_p, axis=0))
    tl.store(out + 1, tl.sum(abs_n, axis=0))
    tl.store(out + 2, tl.sum(sq_p, axis=0))
    tl.store(out + 3, tl.sum(sq_n, axis=0))
    tl.store(out + 4, tl.sum(sq_kl, axis=0))


@triton.jit
def _nft_loss_bwd_kernel(vth_ptr, vold_ptr, vtgt_ptr, vref_ptr, t_ptr, coef_ptr, grad_ptr, D, CHUNK, beta,
                         HAS_REF: tl.constexpr, BLOCK: tl.constexpr):
    b = tl.program_id(0)
    c = tl.program_id(1)
    t = tl.load(t_ptr + b).to(tl.float32)
    cp = tl.load(coef_ptr + b * 3 + 0)
    cn = tl.load(coef_ptr + b * 3 + 1)
    ck = tl.load(coef_ptr + b * 3 + 2)
    row = b.to(tl.int64) * D
    start = c * CHUNK
    for off in range(0, CHUNK, BLOCK):
        idx = start + off + tl.arange(0, BLOCK)
        m = idx < D
        th, ep, en = _nft_errors(vth_ptr, vold_ptr, vtgt_ptr, row, idx, m, t, beta)
        g = cp * ep + cn * en
        if HAS_REF:
            ref = tl.load(vref_ptr + row + idx, mask=m, other=0.0).to(tl.float32)
            g += ck * (th - ref)
        tl.store(grad_ptr + row + idx, g.to(grad_ptr.dtype.element_ty), mask=m)


# ------------------------------------------------------------------------------------------------
# Launchers
# ------------------------------------------------------------------------------------------------


def _flat(x: torch.Tensor, b: int) -> torch.Tensor:
    return x.reshape(b, -1).contiguous()


def _grid(d: int) -> tuple[int, int]:
    chunk = _BLOCK * min(_CHUNK_BLOCKS, triton.cdiv(d, _BLOCK))
    return chunk, triton.cdiv(d, chunk)


def nft_loss_forward(v_theta, v_old, v_target, t, v_ref, beta: float) -> torch.Tensor:
    """Per-sample sums (B, 5) fp32: sum|e+|, sum|e-|, sum e+^2, sum e-^2, sum (v_theta - v_ref)^2."""
    b = v_theta.shape[0]
    vth, vold, vtgt = _flat(v_theta, b), _flat(v_old, b), _flat(v_target, b)
    vref = _flat(v_ref, b) if v_ref is not None else vth
    d = vth.shape[1]
    chunk, n_chunks = _grid(d)
    part = torch.empty(b, n_chunks, 5, device=vth.device, dtype=torch.float32)
    _nft_loss_fwd_kernel[(b, n_chunks)](vth, vold, vtgt, vref, t.float().contiguous(), part, d, chunk, n_chunks,
                                        float(beta), HAS_REF=v_ref is not None, BLOCK=_BLOCK)
    return part.sum(1)


def nft_loss_backward(grad_loss, v_theta, v_old, v_target, t, r, v_ref, sums, beta: float, kl_weight: float,
                      adaptive: bool, policy_weight: float = 1.0) -> torch.Tensor:
    b = v_theta.shape[0]
    vth, vold, vtgt = _flat(v_theta, b), _flat(v_old, b), _flat(v_target, b)
    vref = _flat(v_ref, b) if v_ref is not None else vth
    d = vth.shape[1]
    w_p, w_n = _weights(sums, d, adaptive)
    g = grad_loss.float() * 2.0 / (b * d)
    t32, r32 = t.float(), r.float()
    gp = g * policy_weight
    coef = torch.stack([gp * r32 * t32 / w_p, -gp * (1 - r32) * t32 / w_n, (g * kl_weight).expand(b)], 1).contiguous()
    grad = torch.empty_like(vth)
    chunk, n_chunks = _grid(d)
    _nft_loss_bwd_kernel[(b, n_chunks)](vth, vold, vtgt, vref, t32.contiguous(), coef, grad, d, chunk, float(beta),
                                        HAS_REF=v_ref is not None, BLOCK=_BLOCK)
    return grad.view_as(v_theta)


def _weights(sums: torch.Tensor, d: int, adaptive: bool) -> tuple[torch.Tensor, torch.Tensor]:
    if not adaptive:
        one = torch.ones_like(sums[:, 0])
        return one, one
    return (sums[:, 0] / d).clamp_min(W_MIN), (sums[:, 1] / d).clamp_min(W_MIN)


def _loss_from_sums(sums, r, d: int, beta: float, kl_weight: float, adaptive: bool,
                    policy_weight: float = 1.0) -> torch.Tensor:
    w_p, w_n = _weights(sums, d, adaptive)
    pos, neg, kl = sums[:, 2] / d / w_p, sums[:, 3] / d / w_n, sums[:, 4] / d
    r = r.float()
    return (policy_weight * (r * pos + (1 - r) * neg) / beta + kl_weight * kl).mean()


# ------------------------------------------------------------------------------------------------
# torch.library ops (custom op + fake + autograd) and the autograd wiring
# ------------------------------------------------------------------------------------------------


@torch.library.custom_op("oars_fast::nft_loss", mutates_args=())
def _nft_loss_op(v_theta: torch.Tensor, v_old: torch.Tensor, v_target: torch.Tensor, t: torch.Tensor,
                 r: torch.Tensor, v_ref: Optional[torch.Tensor], beta: float,  # noqa: UP045 (op schema)
                 kl_weight: float, adaptive: bool, policy_weight: float) -> tuple[torch.Tensor, torch.Tensor]:
    sums = nft_loss_forward(v_theta, v_old, v_target, t, v_ref, beta)
    d = v_theta[0].numel()
    return _loss_from_sums(sums, r, d, beta, kl_weight, adaptive, policy_weight), sums


@_nft_loss_op.register_fake
def _(v_theta, v_old, v_target, t, r, v_ref, beta, kl_weight, adaptive, policy_weight):
    return v_theta.new_empty((), dtype=torch.float32), v_theta.new_empty((v_theta.shape[0], 5), dtype=torch.float32)


@torch.library.custom_op("oars_fast::nft_loss_backward", mutates_args=())
def _nft_loss_bwd_op(grad_loss: torch.Tensor, v_theta: torch.Tensor, v_old: torch.Tensor, v_target: torch.Tensor,
                     t: torch.Tensor, r: torch.Tensor, v_ref: Optional[torch.Tensor],  # noqa: UP045 (op schema)
                     sums: torch.Tensor, beta: float, kl_weight: float, adaptive: bool,
                     policy_weight: float) -> torch.Tensor:
    return nft_loss_backward(grad_loss, v_theta, v_old, v_target, t, r, v_ref, sums, beta, kl_weight, adaptive,
                             policy_weight)


@_nft_loss_bwd_op.register_fake
def _(grad_loss, v_theta, v_old, v_target, t, r, v_ref, sums, beta, kl_weight, adaptive, policy_weight):
    return torch.empty_like(v_theta)


def _setup_context(ctx, inputs, output):
    v_theta, v_old, v_target, t, r, v_ref, beta, kl_weight, adaptive, policy_weight = inputs
    ctx.save_for_backward(v_theta, v_old, v_target, t, r, v_ref, output[1])
    ctx.cfg = (beta, kl_weight, adaptive, policy_weight)


def _backward(ctx, grad_loss, grad_sums):
    v_theta, v_old, v_target, t, r, v_ref, sums = ctx.saved_tensors
    grad = None
    if ctx.needs_input_grad[0]:
        grad = _nft_loss_bwd_op(grad_loss, v_theta, v_old, v_target, t, r, v_ref, sums, *ctx.cfg)
    return grad, None, None, None, None, None, None, None, None, None


_nft_loss_op.register_autograd(_backward, setup_context=_setup_context)


# ------------------------------------------------------------------------------------------------
# Public functions and the reference
# ------------------------------------------------------------------------------------------------


def _check(v_theta, v_old, v_target, t, r, v_ref):
    b = v_theta.shape[0]
    for name, v in (("v_old", v_old), ("v_target", v_target), ("v_ref", v_ref)):
        if v is not None and v.shape != v_theta.shape:
            raise ValueError(f"nft_loss: {name} has shape {tuple(v.shape)}, v_theta {tuple(v_theta.shape)}")
    for name, v in (("t", t), ("r", r)):
        if v.shape != (b,):
            raise ValueError(f"nft_loss: {name} must have shape ({b},), got {tuple(v.shape)}")


def nft_loss_with_stats(v_theta, v_old, v_target, t, r, beta: float = 1.0, v_ref=None, kl_weight: float = 0.0,
                        adaptive: bool = True, policy_weight: float = 1.0) -> tuple[torch.Tensor, dict]:
    """The loss and detached stats: pos, neg, kl (batch means, unweighted), w_pos, w_neg (batch means)."""
    _check(v_theta, v_old, v_target, t, r, v_ref)
    if beta <= 0:
        raise ValueError(f"nft_loss: beta={beta} must be > 0")
    v_old, v_target = v_old.detach(), v_target.detach()
    v_ref = v_ref.detach() if v_ref is not None else None
    if use_triton(v_theta, v_old, v_target):
        loss, sums = _nft_loss_op(v_theta, v_old, v_target, t.detach(), r.detach(), v_ref, float(beta),
                                  float(kl_weight), bool(adaptive), float(policy_weight))
        d = v_theta[0].numel()
        with torch.no_grad():
            w_p, w_n = _weights(sums, d, adaptive)
            stats = {"pos": (sums[:, 2] / d / w_p).mean(), "neg": (sums[:, 3] / d / w_n).mean(),
                     "kl": (sums[:, 4] / d).mean(), "w_pos": w_p.mean(), "w_neg": w_n.mean()}
        return loss, stats
    return nft_loss_ref(v_theta, v_old, v_target, t, r, beta, v_ref, kl_weight, adaptive, policy_weight,
                        return_stats=True)


def nft_loss(v_theta, v_old, v_target, t, r, beta: float = 1.0, v_ref=None, kl_weight: float = 0.0,
             adaptive: bool = True, policy_weight: float = 1.0) -> torch.Tensor:
    """DiffusionNFT loss (scalar, fp32). Gradient flows to `v_theta` only. See the module docstring."""
    return nft_loss_with_stats(v_theta, v_old, v_target, t, r, beta, v_ref, kl_weight, adaptive, policy_weight)[0]


def nft_loss_ref(v_theta, v_old, v_target, t, r, beta: float = 1.0, v_ref=None, kl_weight: float = 0.0,
                 adaptive: bool = True, policy_weight: float = 1.0, return_stats: bool = False):
    """Pure-torch reference (fp32 math; autograd gives the gradient)."""
    b = v_theta.shape[0]
    th = v_theta.float().reshape(b, -1)
    old, tg = v_old.detach().float().reshape(b, -1), v_target.detach().float().reshape(b, -1)
    tt = t.detach().float().view(b, 1)
    ep = tt * (beta * th + (1 - beta) * old - tg)
    en = tt * ((1 + beta) * old - beta * th - tg)
    if adaptive:
        w_p = ep.detach().abs().mean(1).clamp_min(W_MIN)
        w_n = en.detach().abs().mean(1).clamp_min(W_MIN)
    else:
        w_p = w_n = torch.ones(b, device=th.device)
    pos, neg = ep.pow(2).mean(1) / w_p, en.pow(2).mean(1) / w_n
    kl = (th - v_ref.detach().float().reshape(b, -1)).pow(2).mean(1) if v_ref is not None else th.new_zeros(b)
    rr = r.detach().float()
    loss = (policy_weight * (rr * pos + (1 - rr) * neg) / beta + kl_weight * kl).mean()
    if not return_stats:
        return loss
    stats = {"pos": pos.detach().mean(), "neg": neg.detach().mean(), "kl": kl.detach().mean(),
             "w_pos": w_p.mean(), "w_neg": w_n.mean()}
    return loss, stats
