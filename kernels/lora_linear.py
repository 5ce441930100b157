"""LoRA linear as one augmented GEMM: ``y = [x | s*u] @ [W | B]^T + bias`` with ``u = x @ A^T``.

Shapes (peft's layout): x (..., in), weight W (out, in), bias (out,) or None, lora_a A (r, in),
lora_b B (out, r), scale s (peft's ``lora_alpha / r``).

Two Triton kernels serve forward and backward:

* ``_lora_u_kernel``, the *u pass*: ``us = s * (x @ A'^T)``, one thin pass over x (M x BR, x's dtype,
  fp32 accumulation; columns r..BR are zero; ``BR = max(16, next_pow2(r))``).
* ``_lora_mm_kernel``, the *augmented GEMM*: ``C = X @ W'^T + us @ B'^T (+ bias)``: the K loop over
  (X, W'), then the LoRA pair (us, B') as one more K step of width BR into the same fp32
  accumulator; each output tile is written once. No tile recomputes ``x @ A^T``: the rank-r work
  is ``2*M*r*(K + N)`` flops in all, as in the unfused composition.

The passes::

    forward    us = s * x @ A^T                  (u pass)
               y  = [x | us] @ [W | B]^T + bias   (augmented GEMM, W and B read as stored: (out, in), (out, r))
    backward   gs = s * dy @ B                    (u pass on dy and B)
               dx = [dy | gs] @ [W ; A]           (the same GEMM kernel, W and A read untransposed)
               dA = gs^T @ x,  dB = dy^T @ us     (r-wide outputs reduced over M: cuBLAS)
               dW = dy^T @ x, dbias = sum_M dy    only when W / bias require grad (a frozen base gets none)

us (M x BR) is the only activation the op adds to what autograd keeps (x, W, A, B).

Hopper: with bf16/fp16 operands whose rows are 16-byte aligned (``in`` and ``out`` multiples of 8 in
16-bit dtypes) on an sm_90+ card, both kernels are fed by TMA through host-side ``TensorDescriptor`` s
(``triton.tools.tensor_descriptor``, Triton >= 3.3; out-of-bounds boxes are zero-filled, so M, N, K
need not divide the tiles), and the GEMM is persistent: a grid of one program per SM walks the output
tiles in grouped order (``GROUP_M`` row panels share W in L2), with an optionally split
(``SUBTILE``) TMA-store epilogue. B is copied zero-padded to (out, BR) when r*itemsize is not a
multiple of 16 (tiny); the backward u pass on B then takes the pointer path. Elsewhere (other
cards, fp32, unaligned shapes) the same kernels run with masked pointer loads (``TMA=False``), the
tile logic shared. Triton's CPU interpreter runs both paths (``tma_mode(True)`` forces TMA there),
which is how the CPU tests check the TMA path's logic; its code generation is checked by
``python -m benchmarks.compile_report`` (sm_90: registers, spills, wgmma, TMA) without a GPU.

Configs: a pinned table per card (``PINNED``: sm_90 = H100/H200, and a generic one), by kernel and
(N, K) bucket, is the default: nothing is tuned. ``OARS_LORA_AUTOTUNE=1`` tunes instead, once per
key (kernel, (N, K), M rounded up to a power of two and capped at ``M_BUCKET_CAP``, rank block, dtype,
path, device), over ``MM_CONFIGS`` / ``U_CONFIGS``; a new micro-batch size in the same M bucket reuses
the choice (``TUNE_EVENTS`` records each tuning). ``tune_lora_linear(...)`` tunes ahead of a run.

Dispatch: CUDA inputs with fewer than ``FUSED_MIN_ROWS`` rows, or r > ``MAX_RANK`` (the LoRA step
would not fit in shared memory next to the GEMM's), go to ``lora_linear_addmm`` (two cuBLAS
addmm + one thin mm); CPU tensors without the interpreter go to ``lora_linear_ref``.
"""
from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

if __package__ != "oars_fast.kernels":  # see kernels/__init__.py: never register the ops twice
    raise ImportError(f"{__name__}: import it as oars_fast.kernels.{__name__.rsplit('.', 1)[-1]}")

from ._common import INTERPRET, use_triton

try:  # host-side TMA descriptors: Triton >= 3.3
    from triton.tools.tensor_descriptor import TensorDescriptor

    HAS_TMA_DESCRIPTOR = True
except ImportError:  # pragma: no cover - older Triton: the pointer path only
    TensorDescriptor = None
    HAS_TMA_DESCRIPTOR = False

FUSED_MIN_ROWS = 128
MAX_RANK = 128
M_BUCKET_CAP = 1 << 16


# ------------------------------------------------------------------------------------------------
# Kernels
# ------------------------------------------------------------------------------------------------


@triton.jit
def _tile_coords(tile, num_m, num_n, GROUP_M: tl.constexpr):
    """Grouped order: GROUP_M consecutive row panels sweep the columns together (W stays in L2)."""
    group = GROUP_M * num_n
    first_m = (tile // group) * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (tile % group) % size_m
    pid_n = (tile % group) // size_m
    return pid_m, pid_n


@triton.jit
def _lora_mm_kernel(x, w, u, b, y, bias_ptr, M, N, K, R, sxm, sxk, swr, swc, sum_, sbr, sbc, sym, syn, num_progs,
                    HAS_BIAS: tl.constexpr, TRANS_B: tl.constexpr, TMA: tl.constexpr, PRECISION: tl.constexpr,
                    BR: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
                    SUBTILE: tl.constexpr, FLATTEN: tl.constexpr):
    """C (M x N) = X (M x K) @ W' (K x N) + U (M x BR) @ B' (BR x N) (+ bias), persistent over output tiles.

    TRANS_B: W' = W^T, B' = B^T with W stored (N, K), B stored (N, R) (forward); else W stored (K, N),
    B stored (R, N) (backward dx). TMA: x, w, u, b, y are TensorDescriptors; else pointers with the
    strides given (s?r: along the stored rows, s?c: along the stored columns). u is M x BR, zero-padded.

    The LoRA pair is loaded after the K loop (not prefetched before it: live across the pipelined loop,
    it cost 68 registers and 24 KiB of shared memory at 128x256 in the compile report); both are small
    and L2-resident, so the one exposed load per tile is short next to the tile's K loop."""
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BM)
    num_n = tl.cdiv(N, BN)
    num_tiles = num_m * num_n
    k_tiles = tl.cdiv(K, BK)
    offs_r = tl.arange(0, BR)
    r_mask = offs_r < R
    for tile in tl.range(pid, num_tiles, num_progs, flatten=FLATTEN):
        pid_m, pid_n = _tile_coords(tile, num_m, num_n, GROUP_M)
        off_m = pid_m * BM
        off_n = pid_n * BN
        rows = off_m + tl.arange(0, BM)
        cols = off_n + tl.arange(0, BN)
        m_mask = rows < M
        n_mask = cols < N
        rows64 = rows.to(tl.int64)
        cols64 = cols.to(tl.int64)
        # 1. the base GEMM: K / BK steps
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for ki in range(k_tiles):
            k0 = ki * BK
            if TMA:
                xt = x.load([off_m, k0])
                if TRANS_B:
                    wt = w.load([off_n, k0]).T
                else:
                    wt = w.load([k0, off_n])
            else:
                kk = k0 + tl.arange(0, BK)
                k_mask = kk < K
                xt = tl.load(x + rows64[:, None] * sxm + kk[None, :] * sxk, mask=m_mask[:, None] & k_mask[None, :],
                             other=0.0)
                if TRANS_B:
                    wt = tl.load(w + cols64[:, None] * swr + kk[None, :] * swc,
                                 mask=n_mask[:, None] & k_mask[None, :], other=0.0).T
                else:
                    wt = tl.load(w + kk.to(tl.int64)[:, None] * swr + cols[None, :] * swc,
                                 mask=k_mask[:, None] & n_mask[None, :], other=0.0)
            acc = tl.dot(xt, wt, acc, input_precision=PRECISION)
        # 2. the LoRA pair (s*u, B') as one more K step of width BR, into the same accumulator
        if TMA:
            ut = u.load([off_m, 0])
            if TRANS_B:
                bt = b.load([off_n, 0]).T
            else:
                bt = b.load([0, off_n])
        else:
            ut = tl.load(u + rows64[:, None] * sum_ + offs_r[None, :], mask=m_mask[:, None], other=0.0)
            if TRANS_B:
                bt = tl.load(b + cols64[:, None] * sbr + offs_r[None, :] * sbc, mask=n_mask[:, None] & r_mask[None, :],
                             other=0.0).T
            else:
                bt = tl.load(b + offs_r[:, None] * sbr + cols[None, :] * sbc, mask=r_mask[:, None] & n_mask[None, :],
                             other=0.0)
        acc = tl.dot(ut, bt, acc, input_precision=PRECISION)
        # 3. epilogue: bias, one write of the tile
        if HAS_BIAS:
            acc += tl.load(bias_ptr + cols, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        if TMA:
            if SUBTILE:
                halves = tl.reshape(acc, (BM, 2, BN // 2)).permute(0, 2, 1)
                c0, c1 = tl.split(halves)
                y.store([off_m, off_n], c0.to(ut.dtype))
                y.store([off_m, off_n + BN // 2], c1.to(ut.dtype))
            else:
                y.store([off_m, off_n], acc.to(ut.dtype))
        else:
            tl.store(y + rows64[:, None] * sym + cols[None, :] * syn, acc.to(ut.dtype),
                     mask=m_mask[:, None] & n_mask[None, :])


@triton.jit
def _lora_u_kernel(x, a, u, M, K, R, sxm, sxk, sar, sac, sum_, scale, A_T: tl.constexpr, TMA: tl.constexpr,
                   PRECISION: tl.constexpr, BR: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr):
    """U (M x BR) = scale * X (M x K) @ A' (K x BR), in U's dtype; columns R..BR are written as zeros.

    A_T: A' = A^T with A stored (R, K) (forward: lora_a); else A stored (K, R) (backward: lora_b)."""
    pid = tl.program_id(0)
    off_m = pid * BM
    rows = off_m + tl.arange(0, BM)
    m_mask = rows < M
    rows64 = rows.to(tl.int64)
    offs_r = tl.arange(0, BR)
    r_mask = offs_r < R
    acc = tl.zeros((BM, BR), dtype=tl.float32)
    for k0 in range(0, K, BK):
        if TMA:
            xt = x.load([off_m, k0])
            if A_T:
                at = a.load([0, k0]).T
            else:
                at = a.load([k0, 0])
        else:
            kk = k0 + tl.arange(0, BK)
            k_mask = kk < K
            xt = tl.load(x + rows64[:, None] * sxm + kk[None, :] * sxk, mask=m_mask[:, None] & k_mask[None, :],
                         other=0.0)
            if A_T:
                at = tl.load(a + offs_r[:, None] * sar + kk[None, :] * sac, mask=r_mask[:, None] & k_mask[None, :],
                             other=0.0).T
            else:
                at = tl.load(a + kk.to(tl.int64)[:, None] * sar + offs_r[None, :] * sac,
                             mask=k_mask[:, None] & r_mask[None, :], other=0.0)
        acc = tl.dot(xt, at, acc, input_precision=PRECISION)
    acc = acc * scale
    if TMA:
        u.store([off_m, 0], acc.to(u.dtype))
    else:
        tl.store(u + rows64[:, None] * sum_ + offs_r[None, :], acc.to(u.dtype.element_ty), mask=m_mask[:, None])


# ------------------------------------------------------------------------------------------------
# Configs: the candidates, the pinned per-card table, and the tuner
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GemmConfig:
    """Tile config of ``_lora_mm_kernel``."""

    BM: int
    BN: int
    BK: int
    GROUP_M: int = 8
    SUBTILE: bool = False
    FLATTEN: bool = False
    num_warps: int = 4
    num_stages: int = 3

    def __str__(self) -> str:
        return (f"{self.BM}x{self.BN}x{self.BK} g{self.GROUP_M} w{self.num_warps} s{self.num_stages}"
                f"{' sub' if self.SUBTILE else ''}{' flat' if self.FLATTEN else ''}")


@dataclass(frozen=True)
class UConfig:
    """Tile config of ``_lora_u_kernel`` (BR follows the rank)."""

    BM: int
    BK: int
    num_warps: int = 4
    num_stages: int = 3

    def __str__(self) -> str:
        return f"{self.BM}xBRx{self.BK} w{self.num_warps} s{self.num_stages}"


# Autotune candidates (and what the compile report compiles): GPU tiles.
MM_CONFIGS = [
    GemmConfig(128, 256, 64, 8, SUBTILE=True, num_warps=8, num_stages=3),
    GemmConfig(128, 256, 64, 8, SUBTILE=True, FLATTEN=True, num_warps=8, num_stages=3),
    GemmConfig(128, 256, 64, 8, num_warps=8, num_stages=3),
    GemmConfig(256, 128, 64, 8, SUBTILE=True, num_warps=8, num_stages=3),
    GemmConfig(128, 128, 64, 8, num_warps=8, num_stages=4),
    GemmConfig(128, 128, 64, 8, num_warps=4, num_stages=4),
    GemmConfig(128, 128, 32, 8, num_warps=8, num_stages=4),
    GemmConfig(128, 128, 32, 8, num_warps=4, num_stages=4),
    GemmConfig(64, 128, 64, 8, num_warps=4, num_stages=4),
]
U_CONFIGS = [
    UConfig(64, 128, 4, 4),
    UConfig(128, 64, 4, 4),
    UConfig(128, 128, 8, 3),
    UConfig(64, 64, 4, 3),
    UConfig(32, 256, 4, 3),
]
# The interpreter (CPU tests): small tiles, and two candidates so that tuning can be tested there.
INTERP_MM_CONFIGS = [GemmConfig(32, 32, 32, 2, SUBTILE=True, num_warps=4, num_stages=1),
                     GemmConfig(16, 32, 16, 2, num_warps=4, num_stages=1)]
INTERP_U_CONFIGS = [UConfig(32, 32, 4, 1), UConfig(16, 64, 4, 1)]
_SAFE_MM, _SAFE_U = GemmConfig(64, 64, 32, 4, num_warps=4, num_stages=2), UConfig(32, 64, 4, 2)

# Defaults by card, kernel and (N, K) bucket: no tuning unless OARS_LORA_AUTOTUNE=1. "sm90" (H100 / H200:
# TMA-fed, persistent, wgmma) and "generic" (other cards, and the pointer path everywhere: 8 warps, as its
# dx GEMM at 4 warps sits at the 255-register cap; 64 KiB of shared memory fits every card since sm_80).
# Chosen from `python -m benchmarks.compile_report` (no spills, shared memory) and not yet from timings
# on the cards: re-pin from `OARS_LORA_AUTOTUNE=1 python -m benchmarks.bench_lora_linear` on an H100/H200.
PINNED = {
    "sm90": {
        "mm": {"large": MM_CONFIGS[0], "small": MM_CONFIGS[4]},
        "u": {"large": U_CONFIGS[0], "small": U_CONFIGS[3]},
    },
    "generic": {
        "mm": {"large": MM_CONFIGS[6], "small": MM_CONFIGS[6]},  # 128x128x32, 8 warps, 4 stages
        "u": {"large": U_CONFIGS[3], "small": U_CONFIGS[3]},
    },
}
_SM90_NAMES = ("H100", "H200", "H800", "H20", "GH200")

TUNE_EVENTS: list[tuple] = []  # one entry (key, config, ms per candidate) per tuning; tests count them
_CHOSEN: dict[tuple, object] = {}
_TMA_MODE: bool | None = None  # None: auto (sm_90+, 16-bit, aligned); True / False: forced (tests)


def m_bucket(m: int) -> int:
    """The M part of the tuning key: next power of two, capped (micro-batch sizes share buckets)."""
    return min(triton.next_power_of_2(max(1, int(m))), M_BUCKET_CAP)


def _nk_bucket(n: int, k: int) -> str:
    return "large" if min(n, k) >= 1024 else "small"


def rank_block(r: int) -> int:
    """BR: the LoRA step's width (the rank padded to a power of two, at least 16 for tl.dot)."""
    return max(16, triton.next_power_of_2(int(r)))


def card_key(device: torch.device) -> str:
    """The pinned table a device uses: 'sm90' for H100/H200-class cards, 'generic' otherwise."""
    if device.type != "cuda":
        return "generic"
    props = torch.cuda.get_device_properties(device)
    if (props.major, props.minor) == (9, 0) or any(n in props.name for n in _SM90_NAMES):
        return "sm90"
    return "generic"


def pinned_config(kind: str, n: int, k: int, device: torch.device, tma: bool):
    """The default config of `kind` ('mm' or 'u') for an (N, K) problem on `device` (no tuning): the
    card's table on the TMA path, the generic table on the pointer path."""
    if INTERPRET and device.type == "cpu":
        return (INTERP_MM_CONFIGS if kind == "mm" else INTERP_U_CONFIGS)[0]
    bucket = _nk_bucket(n, k) if kind == "mm" else _nk_bucket(k, k)  # the u pass: N is the rank block
    return PINNED[card_key(device) if tma else "generic"][kind][bucket]


def autotune_enabled() -> bool:
    return os.environ.get("OARS_LORA_AUTOTUNE", "0") == "1"


def _bench_ms(fn: Callable[[], None], device: torch.device) -> float:
    if device.type == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=5, rep=25))
    fn()
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def _choose(kind: str, key: tuple, n: int, k: int, device: torch.device, tma: bool, run: Callable[[object], None]):
    """The config for `key`: remembered; else tuned (OARS_LORA_AUTOTUNE=1) or pinned. Tuning runs the
    candidates on the call's own buffers (every launch rewrites its whole output), once per key."""
    cfg = _CHOSEN.get(key)
    if cfg is not None:
        return cfg
    if autotune_enabled():
        interp = INTERPRET and device.type == "cpu"
        if kind == "mm":
            cands = INTERP_MM_CONFIGS if interp else MM_CONFIGS
        else:
            cands = INTERP_U_CONFIGS if interp else U_CONFIGS
        times = {}
        for c in cands:
            try:
                times[c] = _bench_ms(lambda: run(c), device)
            except triton.runtime.errors.OutOfResources:
                continue
        cfg = min(times, key=times.get) if times else (_SAFE_MM if kind == "mm" else _SAFE_U)
        TUNE_EVENTS.append((key, cfg, {str(c): t for c, t in times.items()}))
    else:
        cfg = pinned_config(kind, n, k, device, tma)
    _CHOSEN[key] = cfg
    return cfg


def reset_tuning() -> None:
    """Forget chosen configs and tuning events (tests; or after changing OARS_LORA_AUTOTUNE)."""
    _CHOSEN.clear()
    TUNE_EVENTS.clear()


class tma_mode:
    """Context manager: ``with tma_mode(True)`` forces the TMA path where shapes allow (the interpreter
    included), ``False`` forces the pointer path, ``None`` is the default (auto)."""

    def __init__(self, mode: bool | None):
        self.mode = mode

    def __enter__(self):
        global _TMA_MODE
        self.old, _TMA_MODE = _TMA_MODE, self.mode
        return self

    def __exit__(self, *exc):
        global _TMA_MODE
        _TMA_MODE = self.old


def _aligned(t: torch.Tensor) -> bool:
    el = t.element_size()
    return (t.dim() == 2 and t.stride(-1) == 1 and t.data_ptr() % 16 == 0
            and all((s * el) % 16 == 0 for s in t.stride()[:-1]))


def _use_tma(*tensors: torch.Tensor) -> bool:
    """TMA descriptors for these (2-D, row-major) operands? Auto: sm_90+ and 16-bit dtypes."""
    x = tensors[0]
    if not HAS_TMA_DESCRIPTOR or _TMA_MODE is False:
        return False
    if _TMA_MODE is None:
        if not (x.is_cuda and x.dtype in (torch.float16, torch.bfloat16)
                and torch.cuda.get_device_capability(x.device)[0] >= 9):
            return False
    elif not (x.is_cuda or INTERPRET):
        return False
    return all(_aligned(t) for t in tensors)


_NUM_SMS: dict[int, int] = {}


def _num_programs(tiles: int, device: torch.device) -> int:
    if device.type != "cuda":
        return min(tiles, 4)
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _NUM_SMS:
        _NUM_SMS[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return max(1, min(tiles, _NUM_SMS[idx]))


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


# ------------------------------------------------------------------------------------------------
# Launchers
# ------------------------------------------------------------------------------------------------


def _launch_u(x: torch.Tensor, a: torch.Tensor, scale: float, a_t: bool, cfg: UConfig | None = None) -> torch.Tensor:
    """us (M x BR, x's dtype) = scale * x @ A'. a_t: `a` is stored (R, K) (A' = a^T); else stored (K, R)."""
    M, K = x.shape
    R = a.shape[0] if a_t else a.shape[1]
    br = rank_block(R)
    us = torch.empty(M, br, device=x.device, dtype=x.dtype)
    if M == 0:
        return us
    tma = _use_tma(x, a, us)

    def run(c: UConfig) -> None:
        if tma:
            xd = TensorDescriptor.from_tensor(x, [c.BM, c.BK])
            ad = TensorDescriptor.from_tensor(a, [br, c.BK] if a_t else [c.BK, br])
            ud = TensorDescriptor.from_tensor(us, [c.BM, br])
        else:
            xd, ad, ud = x, a, us
        _lora_u_kernel[(triton.cdiv(M, c.BM),)](
            xd, ad, ud, M, K, R, x.stride(0), x.stride(1), a.stride(0), a.stride(1), us.stride(0), float(scale),
            A_T=a_t, TMA=tma, PRECISION=_precision(x.dtype), BR=br, BM=c.BM, BK=c.BK,
            num_warps=c.num_warps, num_stages=c.num_stages)

    if cfg is None:
        key = ("u", m_bucket(M), K, br, a_t, x.dtype, tma, _device_key(x.device))
        cfg = _choose("u", key, br, K, x.device, tma, run)
    _run_or_fallback(run, cfg, _SAFE_U)
    return us


def _launch_mm(x: torch.Tensor, w: torch.Tensor, us: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None,
               trans: bool, cfg: GemmConfig | None = None) -> torch.Tensor:
    """y (M x N, x's dtype) = x @ W' + us @ B' (+ bias). trans: w stored (N, K), b stored (N, R) (W' = w^T,
    B' = b^T); else w stored (K, N), b stored (R, N)."""
    M, K = x.shape
    N = w.shape[0] if trans else w.shape[1]
    R = b.shape[1] if trans else b.shape[0]
    br = us.shape[1]
    y = torch.empty(M, N, device=x.device, dtype=x.dtype)
    if M == 0:
        return y
    tma = _use_tma(x, w, us, y)
    if tma and not _aligned(b):  # B (N, r) with r*itemsize not a multiple of 16 bytes: a zero-padded copy (tiny)
        b = F.pad(b, (0, br - R)) if trans else b.contiguous()
        tma = _aligned(b)

    def run(c: GemmConfig) -> None:
        sub = c.SUBTILE and tma
        if tma:
            xd = TensorDescriptor.from_tensor(x, [c.BM, c.BK])
            wd = TensorDescriptor.from_tensor(w, [c.BN, c.BK] if trans else [c.BK, c.BN])
            ud = TensorDescriptor.from_tensor(us, [c.BM, br])
            bd = TensorDescriptor.from_tensor(b, [c.BN, br] if trans else [br, c.BN])
            yd = TensorDescriptor.from_tensor(y, [c.BM, c.BN // 2 if sub else c.BN])
        else:
            xd, wd, ud, bd, yd = x, w, us, b, y
        tiles = triton.cdiv(M, c.BM) * triton.cdiv(N, c.BN)
        progs = _num_programs(tiles, x.device)
        _lora_mm_kernel[(progs,)](
            xd, wd, ud, bd, yd, bias if bias is not None else y, M, N, K, R, x.stride(0), x.stride(1), w.stride(0),
            w.stride(1), us.stride(0), b.stride(0), b.stride(1), y.stride(0), y.stride(1), progs,
            HAS_BIAS=bias is not None, TRANS_B=trans, TMA=tma, PRECISION=_precision(x.dtype), BR=br, BM=c.BM,
            BN=c.BN, BK=c.BK, GROUP_M=c.GROUP_M, SUBTILE=sub, FLATTEN=c.FLATTEN, num_warps=c.num_warps,
            num_stages=c.num_stages)

    if cfg is None:
        key = ("mm", m_bucket(M), N, K, br, trans, x.dtype, tma, _device_key(x.device))
        cfg = _choose("mm", key, N, K, x.device, tma, run)
    _run_or_fallback(run, cfg, _SAFE_MM)
    return y


def _run_or_fallback(run: Callable[[object], None], cfg, safe) -> None:
    try:
        run(cfg)
    except triton.runtime.errors.OutOfResources:  # a pinned tile too big for this card's shared memory
        run(safe)


def _device_key(device: torch.device) -> str:
    if device.type != "cuda":
        return device.type
    return torch.cuda.get_device_name(device)


def lora_u_forward(x2: torch.Tensor, lora_a: torch.Tensor, scale: float) -> torch.Tensor:
    """The u pass: x2 (M, in) -> us = scale * x2 @ lora_a^T, (M, BR) in x2's dtype (columns r..BR zero)."""
    return _launch_u(x2, lora_a, scale, a_t=True)


def lora_linear_forward(x2, weight, bias, lora_a, lora_b, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """x2 (M, in) -> (y (M, out), us (M, BR)): the u pass, then the augmented GEMM."""
    us = _launch_u(x2, lora_a, scale, a_t=True)
    return _launch_mm(x2, weight, us, lora_b, bias, trans=True), us


def lora_linear_backward(dy, weight, lora_a, lora_b, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """dy (M, out) -> (dx (M, in), gs = scale * dy @ lora_b (M, BR)): the u pass on (dy, B), then the
    augmented GEMM [dy | gs] @ [W ; A] with W and A read as stored."""
    gs = _launch_u(dy, lora_b, scale, a_t=False)
    return _launch_mm(dy, weight, gs, lora_a, None, trans=False), gs


def tune_lora_linear(m: int, n: int, k: int, r: int, dtype=torch.bfloat16, device="cuda", backward: bool = True):
    """Tune (OARS_LORA_AUTOTUNE=1) or pin the configs for one layer shape ahead of a run, so that no
    tuning happens inside it. Returns {kernel: config}."""
    device = torch.device(device)
    x = torch.randn(m, k, device=device, dtype=dtype)
    w, a, b = (torch.randn(n, k, device=device, dtype=dtype), torch.randn(r, k, device=device, dtype=dtype),
               torch.randn(n, r, device=device, dtype=dtype))
    lora_linear_forward(x, w, None, a, b, 1.0)
    if backward:
        lora_linear_backward(torch.randn(m, n, device=device, dtype=dtype), w, a, b, 1.0)
    return {key: cfg for key, cfg in _CHOSEN.items() if key[1] == m_bucket(m) and key[2] in (n, k)}


# ------------------------------------------------------------------------------------------------
# torch.library ops (custom op + fake + autograd)
# ------------------------------------------------------------------------------------------------


@torch.library.custom_op("oars_fast::lora_linear", mutates_args=())
def _lora_linear_op(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],  # noqa: UP045 (schema)
                    lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    return lora_linear_forward(x, weight, bias, lora_a, lora_b, scale)


@_lora_linear_op.register_fake
def _(x, weight, bias, lora_a, lora_b, scale):
    return x.new_empty(x.shape[0], weight.shape[0]), x.new_empty(x.shape[0], rank_block(lora_a.shape[0]))


@torch.library.custom_op("oars_fast::lora_linear_dx", mutates_args=())
def _lora_linear_dx_op(dy: torch.Tensor, weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
                       scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    return lora_linear_backward(dy, weight, lora_a, lora_b, scale)


@_lora_linear_dx_op.register_fake
def _(dy, weight, lora_a, lora_b, scale):
    return dy.new_empty(dy.shape[0], weight.shape[1]), dy.new_empty(dy.shape[0], rank_block(lora_a.shape[0]))


@torch.library.custom_op("oars_fast::lora_u", mutates_args=())
def _lora_u_op(x: torch.Tensor, a: torch.Tensor, scale: float, a_transposed: bool) -> torch.Tensor:
    """scale * x @ a^T (a stored (r, K), a_transposed) or scale * x @ a (a stored (K, r)), (M, BR)."""
    return _launch_u(x, a, scale, a_t=a_transposed)


@_lora_u_op.register_fake
def _(x, a, scale, a_transposed):
    return x.new_empty(x.shape[0], rank_block(a.shape[0] if a_transposed else a.shape[1]))


def _setup_context(ctx, inputs, output):
    x, weight, bias, lora_a, lora_b, scale = inputs
    ctx.save_for_backward(x, weight, lora_a, lora_b, output[1])
    ctx.scale = scale
    ctx.has_bias = bias is not None
    ctx.mark_non_differentiable(output[1])


def _backward(ctx, dy, dus):
    x, weight, lora_a, lora_b, us = ctx.saved_tensors
    s, r = ctx.scale, lora_a.shape[0]
    need_x, need_w, need_b, need_a, need_lb = (ctx.needs_input_grad[i] for i in range(5))
    dy = dy.contiguous()
    dx = dw = db = da = dlb = None
    if need_x:
        dx, gs = _lora_linear_dx_op(dy, weight, lora_a, lora_b, s)
    elif need_a:
        gs = _lora_u_op(dy, lora_b, s, False)
    if need_a:
        da = (gs[:, :r].t() @ x).to(lora_a.dtype)
    if need_lb:
        dlb = (dy.t() @ us[:, :r]).to(lora_b.dtype)
    if need_w:
        dw = (dy.t() @ x).to(weight.dtype)
    if need_b and ctx.has_bias:
        db = dy.sum(0, dtype=torch.float32).to(weight.dtype)
    return dx, dw, db, da, dlb, None


_lora_linear_op.register_autograd(_backward, setup_context=_setup_context)


# ------------------------------------------------------------------------------------------------
# Public functions and the reference
# ------------------------------------------------------------------------------------------------


def _check_shapes(name, x, weight, lora_a, lora_b) -> None:
    if x.shape[-1] != weight.shape[1] or lora_a.shape[1] != weight.shape[1] or lora_b.shape[0] != weight.shape[0] \
            or lora_b.shape[1] != lora_a.shape[0]:
        raise ValueError(f"{name}: shapes do not fit: x {tuple(x.shape)}, weight {tuple(weight.shape)}, "
                         f"lora_a {tuple(lora_a.shape)}, lora_b {tuple(lora_b.shape)} (expected x (..., in), "
                         "weight (out, in), lora_a (r, in), lora_b (out, r))")


def lora_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_a: torch.Tensor,
                lora_b: torch.Tensor, scale: float) -> torch.Tensor:
    """``x @ weight.T + bias + scale * (x @ lora_a.T) @ lora_b.T`` for x (..., in); differentiable in all.

    Triton (u pass + augmented GEMM) where it runs; cuBLAS addmm for small row counts on CUDA and
    ranks above MAX_RANK; the eager reference elsewhere. Weights are cast to x's dtype."""
    _check_shapes("lora_linear", x, weight, lora_a, lora_b)
    x2 = x.reshape(-1, x.shape[-1])
    if x2.shape[0] > 0 and use_triton(x2, weight, lora_a, lora_b):
        if (x2.is_cuda and x2.shape[0] < FUSED_MIN_ROWS) or lora_a.shape[0] > MAX_RANK:
            return lora_linear_addmm(x, weight, bias, lora_a, lora_b, scale)
        dtype = x.dtype
        y, _ = _lora_linear_op(x2.contiguous(), weight.to(dtype).contiguous(),
                               None if bias is None else bias.to(dtype).contiguous(),
                               lora_a.to(dtype).contiguous(), lora_b.to(dtype).contiguous(), float(scale))
        return y.view(*x.shape[:-1], weight.shape[0])
    return lora_linear_ref(x, weight, bias, lora_a, lora_b, scale)


def lora_linear_addmm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_a: torch.Tensor,
                      lora_b: torch.Tensor, scale: float) -> torch.Tensor:
    """The same function on cuBLAS, plain torch (autograd as usual): ``u = x @ A^T``,
    ``C = addmm(bias, u, B^T, alpha=s)``, ``y = addmm(C, x, W^T)`` (without bias: ``C = u @ B^T``,
    ``y = addmm(C, x, W^T, beta=s)``). The LoRA product lands in the GEMM's C operand: y is written
    once by the base GEMM, with no extra elementwise pass. Weights are cast to x's dtype."""
    _check_shapes("lora_linear_addmm", x, weight, lora_a, lora_b)
    dtype = x.dtype
    x2 = x.reshape(-1, x.shape[-1])
    w, a, b = weight.to(dtype), lora_a.to(dtype), lora_b.to(dtype)
    u = torch.mm(x2, a.t())
    if bias is not None:
        c = torch.addmm(bias.to(dtype), u, b.t(), alpha=scale)
        y = torch.addmm(c, x2, w.t())
    else:
        y = torch.addmm(torch.mm(u, b.t()), x2, w.t(), beta=scale)
    return y.view(*x.shape[:-1], weight.shape[0])


def lora_linear_ref(x, weight, bias, lora_a, lora_b, scale: float) -> torch.Tensor:
    """The eager composition (what peft computes): base linear + scale * B(A(x))."""
    return F.linear(x, weight, bias) + scale * F.linear(F.linear(x, lora_a), lora_b)
