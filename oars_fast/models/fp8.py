"""fp8 e4m3 row-wise GEMMs for the frozen transformer weights in RL's no-grad forwards (``rl.fp8_nograd``).

Which forwards: NFT's rollout (``rollout``) and also its reference forwards (``rollout_ref``); never ``v_old``, whose
difference to the full-precision ``v_theta`` is NFT's signal (see ``RLConfig.fp8_nograd`` and the README for the
measurement), never a grad-enabled forward.

What runs in fp8: the frozen base weight of every ``nn.Linear`` inside the transformer blocks (the ones under
a LoRA, e.g. ``attn.to_q.base_layer``, and the plain frozen ones, e.g. ``img_mlp.net.2``), except the
modulation layers (``img_mod.1`` / ``txt_mod.1``: their M is the batch, not the tokens, so fp8 saves nothing
there and their output scales every token). Embeddings (``img_in``, ``txt_in``, the timestep MLP), the output
norm and projection (``norm_out``, ``proj_out``), the VAE and the text encoder stay as they are.

How: ``y = _scaled_mm(q(x), q(W).t(), scale_a, scale_b) + bias`` with

* activations quantised per row (token): ``scale_a = amax(|x_row|) / 448`` (M, 1) float32, on CUDA in one fused
  Triton pass (``oars_fast.kernels.fp8_quantize_rows``);
* weights per output channel: ``scale_b = amax(|W_row|) / 448`` (1, N) float32;
* e4m3 (``torch.float8_e4m3fn``, max 448), values scaled in float32 and saturated to +-448; a zero row gets
  the smallest positive scale (its codes and output are 0);
* K and N padded with zeros to multiples of 16 (cuBLASLt's fp8 requirement; a no-op at production widths),
  the output sliced back; the output in the compute dtype (autocast's, else the input's); bias added after.

The weight's fp8 copy and scales are computed once and cached on the layer (an attribute, not a buffer:
state dicts and checkpoints do not see it). The cache is keyed by the weight's storage pointer, autograd
version counter, device, dtype and shape (any in-place op, ``load_state_dict``, ``.to()`` or re-assignment
re-quantises it at the next use) and, for a base layer under a peft LoRA layer, by that layer's merged
adapters (peft's ``merge``/``unmerge`` write through ``weight.data``, which bypasses the version counter).
Anything else that writes through ``.data`` must call :func:`invalidate`. Memory: 1 byte per cached weight
element + 4 bytes per output channel (for a bf16 base, +50% of those weights' bytes).

When: only while :meth:`Fp8Forwards.on` is active *and* autograd is off (``torch.is_grad_enabled()`` is
False); otherwise :class:`Fp8Linear` is ``nn.Linear``'s forward exactly, so a grad-enabled forward (the
policy update) is bit-identical with or without the option. The LoRA branch is not quantised: peft's own
forward adds it to ``base_layer(x)``; the fused LoRA layers (``lora.kernel`` triton / addmm) add
``scale * B(A(x))`` in the compute dtype to the fp8 base GEMM (:mod:`.lora`).

Support: torch._scaled_mm with row-wise scales runs on CUDA sm_89+ (Ada, Hopper, Blackwell; tested on an H200)
and on the CPU build of torch 2.13 (2.11's CPU build takes per-tensor scales only). :func:`check_support` runs
a tiny row-wise GEMM on the run's device and dtype at setup and raises a :class:`~oars_fast.config.ConfigError`
that names the device and the reason when it cannot run: the option is explicit, so it fails at setup instead
of silently falling back to the high-precision GEMM. Speed: on an H200 it made the rollout slower (the eager
activation quantisation costs more than the fp8 GEMM saves; README).
"""
from __future__ import annotations

import contextlib
import weakref

import torch
import torch.nn as nn
from peft.tuners.lora import LoraLayer

from .. import kernels
from ..config import ConfigError

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0  # torch.finfo(torch.float8_e4m3fn).max
ALIGN = 16  # cuBLASLt fp8: K and N multiples of 16
EXCLUDED = ("img_mod", "txt_mod")  # modulation Linears: M = batch, no gain, and they scale every token


def _pad_to(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def quantize_rows(x: torch.Tensor, cols: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-wise e4m3 quantisation of a 2-D tensor: (codes (M, cols) fp8 row-major, scales (M, 1) float32) with
    ``x ~ codes.float() * scales``; `cols` >= K pads each row with zeros (default: K itself). The codes are
    row-major whatever `x`'s strides (cuBLASLt's fp8 GEMM takes a row-major A only: a transposed activation
    kept its column-major strides through the elementwise ops and failed on the H200). On CUDA one fused Triton
    pass (:func:`oars_fast.kernels.fp8_quantize_rows`: the eager version's float32 temporaries made the H200's fp8
    rollout slower than bf16); elsewhere the eager reference, which gives the same codes bit for bit."""
    if x.is_cuda:
        return kernels.fp8_quantize_rows(x, cols)
    return kernels.fp8_quantize_rows_ref(x, cols)


def quantize_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A Linear weight (N, K) -> (codes (Np, Kp) fp8 row-major, scales (1, Np) float32): per output channel,
    N and K padded with zeros to multiples of 16 (padded channels: code 0, scale 1)."""
    n, k = w.shape
    q, s = quantize_rows(w.detach(), _pad_to(k))
    npad = _pad_to(n) - n
    if npad:
        q = torch.cat([q, torch.zeros(npad, q.shape[1], dtype=FP8, device=q.device)])
        s = torch.cat([s, torch.ones(npad, 1, device=s.device)])
    return q.contiguous(), s.view(1, -1).contiguous()


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype ``F.linear`` would return for `x` here (autocast's, else the input's)."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def fp8_linear(x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor, n: int,
               bias: torch.Tensor | None = None, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """``x @ W.t() + bias`` from the quantised weight (:func:`quantize_weight`; `n` = W's real rows) as one
    row-wise fp8 ``torch._scaled_mm``; x (..., K) -> (..., n) in `out_dtype` (default: the compute dtype)."""
    out_dtype = out_dtype or _compute_dtype(x)
    lead, k = x.shape[:-1], x.shape[-1]
    a_q, a_scale = quantize_rows(x.reshape(-1, k), w_q.shape[1])
    y = torch._scaled_mm(a_q, w_q.t(), scale_a=a_scale, scale_b=w_scale, out_dtype=out_dtype)
    if y.shape[1] != n:
        y = y[:, :n]
    if bias is not None:
        y = y + bias.to(out_dtype)
    return y.reshape(*lead, n)


def fp8_linear_ref(x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor, n: int,
                   bias: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`fp8_linear` in pure torch: the same quantisation, dequantised and multiplied in float32."""
    k = x.shape[-1]
    a_q, a_scale = quantize_rows(x.reshape(-1, k), w_q.shape[1])
    y = (a_q.float() * a_scale) @ (w_q.float() * w_scale.view(-1, 1)).t()
    y = y[:, :n]
    if bias is not None:
        y = y + bias.float()
    return y.reshape(*x.shape[:-1], n)


class Fp8Linear(nn.Linear):
    """``nn.Linear`` whose forward, while ``fp8_on`` and autograd is off, is :func:`fp8_linear` on a cached
    fp8 copy of its (frozen) weight; otherwise ``nn.Linear.forward`` itself. Same parameters and state-dict
    keys (only the instance's class changes: :func:`enable`)."""

    fp8_on = False
    _fp8_owner = None  # weakref to the peft LoRA layer above it (its merges change the weight via .data)
    _fp8_cache = None  # (key, codes, scales)
    fp8_quantizations = 0  # how many times this layer's weight was quantised (tests, logs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fp8_on and not torch.is_grad_enabled():
            w_q, w_scale = self.fp8_weight()
            return fp8_linear(x, w_q, w_scale, self.out_features, self.bias)
        return super().forward(x)

    def _cache_key(self) -> tuple:
        w = self.weight
        owner = self._fp8_owner() if self._fp8_owner is not None else None
        merged = tuple(owner.merged_adapters) if owner is not None else ()
        return w.data_ptr(), w._version, w.device, w.dtype, tuple(w.shape), merged

    def fp8_weight(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(codes (Np, Kp) fp8, scales (1, Np) float32) of the weight as it is now; quantised once, re-quantised
        only when the weight changed (see the module docstring)."""
        key = self._cache_key()
        if self._fp8_cache is None or self._fp8_cache[0] != key:
            self._fp8_cache = (key, *quantize_weight(self.weight))
            self.fp8_quantizations += 1
        return self._fp8_cache[1], self._fp8_cache[2]


def targets(transformer: nn.Module) -> list[tuple[str, nn.Linear]]:
    """(name, layer) of the Linears that run in fp8: inside ``transformer_blocks``, not the modulation ones, not
    the LoRA's own ``lora_A`` / ``lora_B`` (peft's base layers ``...base_layer`` are in)."""
    out = []
    for name, m in transformer.named_modules():
        if type(m) not in (nn.Linear, Fp8Linear) or not name.startswith("transformer_blocks."):
            continue
        parts = name.split(".")
        if any(e in parts for e in EXCLUDED) or any(p.startswith("lora_") for p in parts):
            continue  # the modulation Linears; the LoRA's own A and B (trainable, high precision)
        out.append((name, m))
    return out


def invalidate(module: nn.Module) -> None:
    """Drop every cached fp8 weight under `module` (after writes through ``weight.data`` that bypass the
    version counter); they are re-quantised at their next use."""
    for m in module.modules():
        if isinstance(m, Fp8Linear):
            m._fp8_cache = None


class Fp8Forwards:
    """The fp8 layers of one transformer; ``with fp8.on(): ...`` runs their no-grad forwards in fp8."""

    def __init__(self, layers: list[tuple[str, Fp8Linear]]):
        self.names = [n for n, _ in layers]
        self.layers = [m for _, m in layers]

    @property
    def params(self) -> int:
        return sum(m.weight.numel() for m in self.layers)

    def cache_bytes(self) -> int:
        return sum(m._fp8_cache[1].numel() + 4 * m._fp8_cache[2].numel() for m in self.layers
                   if m._fp8_cache is not None)

    def warm(self) -> None:
        """Quantise every weight now (setup), so the first rollout is not the one that pays for it."""
        with torch.no_grad():
            for m in self.layers:
                m.fp8_weight()

    @contextlib.contextmanager
    def on(self, enabled: bool = True):
        prev = [m.fp8_on for m in self.layers]
        for m in self.layers:
            m.fp8_on = enabled
        try:
            yield
        finally:
            for m, p in zip(self.layers, prev):
                m.fp8_on = p


def enable(transformer: nn.Module) -> Fp8Forwards:
    """Turn the fp8 targets of `transformer` (:func:`targets`) into :class:`Fp8Linear` (class change only; off
    until :meth:`Fp8Forwards.on`). Call after the LoRA adapters are added: the LoRA layers' base layers are
    linked to them so that a peft merge invalidates the cache."""
    layers = targets(transformer)
    for _, m in layers:
        m.__class__ = Fp8Linear
    for m in transformer.modules():
        if isinstance(m, LoraLayer) and isinstance(m.get_base_layer(), Fp8Linear):
            m.get_base_layer()._fp8_owner = weakref.ref(m)
    return Fp8Forwards(layers)


def check_support(device: torch.device | str, dtype: torch.dtype) -> None:
    """Raise a ConfigError when row-wise fp8 GEMMs (``torch._scaled_mm``) cannot run on `device` with output
    `dtype` (the run's compute dtype): CUDA before sm_89, a build without fp8 GEMMs, or an unsupported output
    dtype (CUDA's row-wise scaling wants bfloat16)."""
    device = torch.device(device)
    what = "rl.fp8_nograd (rollout, rollout_ref) needs row-wise fp8 GEMMs (torch._scaled_mm)"
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        if (major, minor) < (8, 9):
            raise ConfigError(f"{what}: CUDA sm_89 or newer (Ada, Hopper); this GPU is sm_{major}{minor}: set "
                              f"rl.fp8_nograd=none")
    try:
        with torch.no_grad():  # fixed inputs: no draw from the global RNG
            t = torch.linspace(-1, 1, 256, device=device).view(16, 16)
            w_q, w_s = quantize_weight(t)
            y = fp8_linear(t.t().to(dtype), w_q, w_s, 16, out_dtype=dtype)
        if not bool(torch.isfinite(y).all()):
            raise RuntimeError("non-finite result")
    except (RuntimeError, NotImplementedError, TypeError) as e:
        raise ConfigError(f"{what}; on {device} with {dtype} it fails: {str(e).splitlines()[0]}. Set "
                          f"rl.fp8_nograd=none (or model.dtype=bf16 on an sm_89+ GPU)") from None
