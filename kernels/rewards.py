"""Reward batching: the COMPASS reward (elementwise, differentiable) and group advantages (one launch).

COMPASS:  ``R = F*Q_LR + F**(Q_LR/gamma) * (Q_SR - Q_LR)``, F in [0, 1], Q in [1, 5], gamma = 7.
  dR/dF    = Q_LR + (Q_LR/gamma) * F**(Q_LR/gamma - 1) * (Q_SR - Q_LR)
  dR/dQ_LR = F - F**(Q_LR/gamma) + F**(Q_LR/gamma) * ln(F)/gamma * (Q_SR - Q_LR)
  dR/dQ_SR = F**(Q_LR/gamma)
  (at F = 0 the power terms and their limits are 0; their F-derivative is taken as 0 there.)

Group advantages: rewards (N,) laid out group after group (G groups of `group_size`).
  A = (R - mean_group) / (std + eps), std = population std over all N (global_std) or the group's;
  r = clamp(clamp(A, -clip, clip)/clip/2 + 0.5, 0, 1);
  keep = False for every sample of a group with mean > filter_mean and population std < filter_std.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

if __package__ != "oars_fast.kernels":  # see kernels/__init__.py: never register the ops twice
    raise ImportError(f"{__name__}: import it as oars_fast.kernels.{__name__.rsplit('.', 1)[-1]}")

from ._common import use_triton

_BLOCK = 1024
_MAX_GROUP_TILE = 1 << 16  # group_advantages handles up to this many (padded) rewards in one program


@triton.jit
def _compass_fwd_kernel(f_ptr, qlr_ptr, qsr_ptr, out_ptr, n, inv_gamma, BLOCK: tl.constexpr):
    idx = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = idx < n
    f = tl.load(f_ptr + idx, mask=m, other=1.0).to(tl.float32)
    ql = tl.load(qlr_ptr + idx, mask=m, other=1.0).to(tl.float32)
    qs = tl.load(qsr_ptr + idx, mask=m, other=1.0).to(tl.float32)
    pw = tl.where(f > 0, tl.exp(ql * inv_gamma * tl.log(tl.maximum(f, 1e-30))), 0.0)
    tl.store(out_ptr + idx, (f * ql + pw * (qs - ql)).to(out_ptr.dtype.element_ty), mask=m)


@triton.jit
def _compass_bwd_kernel(f_ptr, qlr_ptr, qsr_ptr, g_ptr, df_ptr, dql_ptr, dqs_ptr, n, inv_gamma,
                        BLOCK: tl.constexpr):
    idx = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = idx < n
    f = tl.load(f_ptr + idx, mask=m, other=1.0).to(tl.float32)
    ql = tl.load(qlr_ptr + idx, mask=m, other=1.0).to(tl.float32)
    qs = tl.load(qsr_ptr + idx, mask=m, other=1.0).to(tl.float32)
    g = tl.load(g_ptr + idx, mask=m, other=0.0).to(tl.float32)
    pos = f > 0
    logf = tl.log(tl.maximum(f, 1e-30))
    a = ql * inv_gamma
    pw = tl.where(pos, tl.exp(a * logf), 0.0)
    dpw_df = tl.where(pos, a * tl.exp((a - 1.0) * logf), 0.0)
    diff = qs - ql
    df = ql + dpw_df * diff
    dql = f - pw + tl.where(pos, pw * logf * inv_gamma, 0.0) * diff
    tl.store(df_ptr + idx, (g * df).to(df_ptr.dtype.element_ty), mask=m)
    tl.store(dql_ptr + idx, (g * dql).to(dql_ptr.dtype.element_ty), mask=m)
    tl.store(dqs_ptr + idx, (g * pw).to(dqs_ptr.dtype.element_ty), mask=m)


@triton.jit
def _group_adv_kernel(rew_ptr, r_ptr, keep_ptr, n_groups, group_size, n, clip, eps, filter_mean, filter_std,
                      GLOBAL_STD: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_S: tl.constexpr):
    gi = tl.arange(0, BLOCK_G)[:, None]
    si = tl.arange(0, BLOCK_S)[None, :]
    m = (gi < n_groups) & (si < group_size)
    idx = gi * group_size + si
    x = tl.load(rew_ptr + idx, mask=m, other=0.0).to(tl.float32)
    gmean = tl.sum(x, axis=1) / group_size
    dev = tl.where(m, x - gmean[:, None], 0.0)
    gstd = tl.sqrt(tl.sum(dev * dev, axis=1) / group_size)
    if GLOBAL_STD:
        mean_all = tl.sum(tl.sum(x, axis=1), axis=0) / n
        dall = tl.where(m, x - mean_all, 0.0)
        std = tl.sqrt(tl.sum(tl.sum(dall * dall, axis=1), axis=0) / n)
        adv = dev / (std + eps)
    else:
        adv = dev / (gstd[:, None] + eps)
    adv = tl.minimum(tl.maximum(adv, -clip), clip)
    r = tl.minimum(tl.maximum(adv / clip / 2.0 + 0.5, 0.0), 1.0)
    drop = (gmean > filter_mean) & (gstd < filter_std)
    keep = tl.where(drop[:, None], 0, 1) + tl.zeros([BLOCK_G, BLOCK_S], dtype=tl.int32)
    tl.store(r_ptr + idx, r, mask=m)
    tl.store(keep_ptr + idx, keep.to(tl.int8), mask=m)


# ------------------------------------------------------------------------------------------------
# Launchers
# ------------------------------------------------------------------------------------------------


def _flat3(f, q_lr, q_sr):
    f, q_lr, q_sr = torch.broadcast_tensors(f, q_lr, q_sr)
    return f.contiguous().view(-1), q_lr.contiguous().view(-1), q_sr.contiguous().view(-1)


def compass_reward_forward(f, q_lr, q_sr, gamma: float) -> torch.Tensor:
    shape = torch.broadcast_shapes(f.shape, q_lr.shape, q_sr.shape)
    ff, ql, qs = _flat3(f, q_lr, q_sr)
    out = torch.empty(ff.shape, device=ff.device, dtype=torch.promote_types(f.dtype, q_sr.dtype))
    n = ff.numel()
    _compass_fwd_kernel[(triton.cdiv(n, _BLOCK),)](ff, ql, qs, out, n, 1.0 / gamma, BLOCK=_BLOCK)
    return out.view(shape)


def compass_reward_backward(grad, f, q_lr, q_sr, gamma: float):
    shape = torch.broadcast_shapes(f.shape, q_lr.shape, q_sr.shape)
    ff, ql, qs = _flat3(f, q_lr, q_sr)
    g = grad.expand(shape).contiguous().view(-1)
    df, dql, dqs = torch.empty_like(ff), torch.empty_like(ql), torch.empty_like(qs)
    n = ff.numel()
    _compass_bwd_kernel[(triton.cdiv(n, _BLOCK),)](ff, ql, qs, g, df, dql, dqs, n, 1.0 / gamma, BLOCK=_BLOCK)
    return df.view(shape), dql.view(shape), dqs.view(shape)


def _reduce_to(g: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Sum a broadcast gradient back to an input's shape."""
    while g.ndim > len(shape):
        g = g.sum(0)
    for i, s in enumerate(shape):
        if s == 1 and g.shape[i] != 1:
            g = g.sum(i, keepdim=True)
    return g


@torch.library.custom_op("oars_fast::compass_reward", mutates_args=())
def _compass_op(f: torch.Tensor, q_lr: torch.Tensor, q_sr: torch.Tensor, gamma: float) -> torch.Tensor:
    return compass_reward_forward(f, q_lr, q_sr, gamma)


@_compass_op.register_fake
def _(f, q_lr, q_sr, gamma):
    shape = torch.broadcast_shapes(f.shape, q_lr.shape, q_sr.shape)
    return f.new_empty(shape, dtype=torch.promote_types(f.dtype, q_sr.dtype))


@torch.library.custom_op("oars_fast::compass_reward_backward", mutates_args=())
def _compass_bwd_op(grad: torch.Tensor, f: torch.Tensor, q_lr: torch.Tensor, q_sr: torch.Tensor,
                    gamma: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    df, dql, dqs = compass_reward_backward(grad, f, q_lr, q_sr, gamma)
    return _reduce_to(df, f.shape), _reduce_to(dql, q_lr.shape), _reduce_to(dqs, q_sr.shape)


@_compass_bwd_op.register_fake
def _(grad, f, q_lr, q_sr, gamma):
    return torch.empty_like(f), torch.empty_like(q_lr), torch.empty_like(q_sr)


def _compass_setup(ctx, inputs, output):
    f, q_lr, q_sr, gamma = inputs
    ctx.save_for_backward(f, q_lr, q_sr)
    ctx.gamma = gamma


def _compass_backward(ctx, grad):
    f, q_lr, q_sr = ctx.saved_tensors
    df, dql, dqs = _compass_bwd_op(grad, f, q_lr, q_sr, ctx.gamma)
    return df, dql, dqs, None


_compass_op.register_autograd(_compass_backward, setup_context=_compass_setup)


@torch.library.custom_op("oars_fast::group_advantages", mutates_args=())
def _group_adv_op(rewards: torch.Tensor, group_size: int, clip: float, eps: float, global_std: bool,
                  filter_mean: float, filter_std: float) -> tuple[torch.Tensor, torch.Tensor]:
    n = rewards.numel()
    n_groups = n // group_size
    bg, bs = triton.next_power_of_2(n_groups), triton.next_power_of_2(group_size)
    x = rewards.contiguous().view(-1)
    r = torch.empty(n, device=x.device, dtype=torch.float32)
    keep = torch.empty(n, device=x.device, dtype=torch.int8)
    _group_adv_kernel[(1,)](x, r, keep, n_groups, group_size, n, clip, eps, filter_mean, filter_std,
                            GLOBAL_STD=global_std, BLOCK_G=bg, BLOCK_S=bs)
    return r, keep.bool()


@_group_adv_op.register_fake
def _(rewards, group_size, clip, eps, global_std, filter_mean, filter_std):
    n = rewards.numel()
    return rewards.new_empty(n, dtype=torch.float32), rewards.new_empty(n, dtype=torch.bool)


# ------------------------------------------------------------------------------------------------
# Public functions and references
# ------------------------------------------------------------------------------------------------


def compass_reward(fidelity: torch.Tensor, q_lr: torch.Tensor, q_sr: torch.Tensor, gamma: float = 7.0) -> torch.Tensor:
    """COMPASS reward, elementwise with broadcasting; differentiable in all three inputs."""
    if gamma <= 0:
        raise ValueError(f"compass_reward: gamma={gamma} must be > 0")
    if use_triton(fidelity, q_lr, q_sr):
        return _compass_op(fidelity, q_lr, q_sr, float(gamma))
    return compass_reward_ref(fidelity, q_lr, q_sr, gamma)


def compass_reward_ref(fidelity, q_lr, q_sr, gamma: float = 7.0) -> torch.Tensor:
    return fidelity * q_lr + fidelity ** (q_lr / gamma) * (q_sr - q_lr)


def _check_groups(rewards: torch.Tensor, group_size: int, clip: float) -> None:
    if rewards.ndim != 1:
        raise ValueError(f"group_advantages: rewards must be 1-D (N,), got shape {tuple(rewards.shape)}")
    if group_size < 1 or rewards.numel() % group_size:
        raise ValueError(f"group_advantages: N={rewards.numel()} is not a multiple of group_size={group_size}")
    if clip <= 0:
        raise ValueError(f"group_advantages: clip={clip} must be > 0")


def group_advantages(rewards: torch.Tensor, group_size: int, clip: float = 5.0, eps: float = 1e-4,
                     global_std: bool = True, filter_mean: float = 0.9,
                     filter_std: float = 0.05) -> tuple[torch.Tensor, torch.Tensor]:
    """(r, keep): optimality probabilities in [0, 1] (fp32) and the keep mask (bool), both (N,)."""
    _check_groups(rewards, group_size, clip)
    n_groups = rewards.numel() // group_size
    padded = triton.next_power_of_2(n_groups) * triton.next_power_of_2(group_size)
    if use_triton(rewards) and padded <= _MAX_GROUP_TILE:
        return _group_adv_op(rewards.detach(), int(group_size), float(clip), float(eps), bool(global_std),
                             float(filter_mean), float(filter_std))
    return group_advantages_ref(rewards, group_size, clip, eps, global_std, filter_mean, filter_std)


def group_advantages_ref(rewards, group_size: int, clip: float = 5.0, eps: float = 1e-4, global_std: bool = True,
                         filter_mean: float = 0.9, filter_std: float = 0.05):
    _check_groups(rewards, group_size, clip)
    x = rewards.detach().float().view(-1, group_size)
    mean = x.mean(1, keepdim=True)
    gstd = x.std(1, unbiased=False, keepdim=True)
    std = x.std(unbiased=False) if global_std else gstd
    adv = ((x - mean) / (std + eps)).clamp(-clip, clip)
    r = (adv / clip / 2 + 0.5).clamp(0, 1)
    keep = ~((mean > filter_mean) & (gstd < filter_std)).expand_as(x)
    return r.reshape(-1), keep.reshape(-1)
