"""FLOPs and bytes of one RL iteration on one GPU, phase by phase, for the production configs.

    python -m benchmarks.rl_cost                                          # FR and NR (configs/qwen_image_edit)
    python -m benchmarks.rl_cost --config configs/qwen_image_edit/rl_fr.yaml rl.group_size=16 data.crop_size=768
    python -m benchmarks.rl_cost --gpu h100                               # + time at the H100 ceilings
    python -m benchmarks.rl_cost --gpu h200 --ceilings benchmarks/results/gpu/ceilings.csv  # measured ceilings

One rank's share of an iteration: ``G = rl.inputs_per_iter / --world`` groups (the configs: 8 inputs on
8 GPUs, one group per rank) of ``K = rl.group_size`` candidates, ``B = G*K``:

* condition: the Qwen2.5-VL text encoder once per group (the Edit-Plus prompt with the LR inside, resized to
  a 384^2 area: image tokens + the template's text tokens) and the VAE encode of the LR upsampled to the
  output size (once per group);
* rollout: ``rl.rollout_steps`` transformer forwards of all B candidates (old adapter, no grad) at
  target + condition + text tokens;
* decode: the VAE decode of the B candidates;
* reward: FR DISTS (VGG16 with L2 pooling) on the B candidates and the G ground truths at the output size;
  NR COMPASS (Qwen3-VL-8B, ``oars_fast.rewards.compass``, ``CompassModel.score``): per group the prefix (prompt +
  LR image, upscaled to the 256^2 pixel minimum, + the Q_LR marker) once, per candidate the suffix (SR image at
  512^2 + question) against the prefix's keys/values (gathered per candidate, in chunks of
  ``reward.batch_size``); score heads on one token each, no LM head, nothing generated. The notes give the cost
  without prefix reuse (``score_full``) for comparison;
* update (NFT): per kept candidate ``rl.update_times`` passes, each with the old-adapter forward (no grad),
  the reference forward (adapters off, no grad; only when the KL weight > 0), the current forward, its
  backward and, with activation checkpointing (``model.checkpointing``: full, attention or mlp; the deprecated
  ``model.gradient_checkpointing: true`` is full), the recompute of every block or of those sub-modules; then
  the loss, AdamW on the LoRA and both EMAs. Flow-GRPO: per SDE step the current forward + backward (+ reference).

Each phase is split into LoRA, attention (QK^T and AV), the base linears (and convolutions) and the rest
(norms, modulation, activations, RoPE, residuals, casts, copies).

Method (how each number is obtained):

* transformer, VAE, DISTS: the real module classes (diffusers' ``QwenImageTransformer2DModel`` and
  ``AutoencoderKLQwenImage`` with the config of ``model.pretrained`` when that is a local folder, else the
  class defaults, which are Qwen-Image's; this project's ``DISTS``) are built on the meta device and run
  forward on meta tensors under a dispatch-level counter: GEMMs and convolutions with PyTorch's own FLOP
  formulas (``torch.utils.flop_counter``), every other op as one FLOP per element; bytes as every op
  reading its inputs and writing its outputs once (eager, unfused), ``F.scaled_dot_product_attention`` as
  one fused (flash) op reading Q, K, V and writing O. The transformer is run with one block at batch 1 and 2
  (blocks are identical; the difference of the two batches separates the per-sample cost from the once
  per call cost: weight reads);
* LoRA: per adapted linear (``lora.target_modules``), ``2 M r (in + out)`` FLOPs forward, twice that in
  backward (dx through the adapter, dA, dB), with the bytes of ``lora.kernel`` (triton: one thin u pass
  over x, u folded into the base GEMM; addmm / peft: the extra reads and writes of their unfused sums);
* backward: the frozen base linears only need dx (1x their forward; none for the modulation linears, whose
  input is the timestep embedding, nor for block 0's Q/K/V projections, whose input needs no grad);
  attention 2.5x forward (a flash backward recomputes QK^T: 5 GEMMs of the forward's 2); the rest 2x;
* the Qwen2.5-VL text encoder and COMPASS: the models are built on the meta device (the text encoder from its
  published config; COMPASS from ``reward.compass``'s config.json when that is a local folder, else the
  Qwen3-VL-8B shapes ``oars_fast.rewards.compass`` builds); the linears' shapes are read from the built modules,
  the image token counts from transformers' Qwen2-VL image processor (text encoder) and COMPASS's own resize
  rule and pixel budget (``fit_size``); attention (window attention in Qwen2.5-VL's vision tower, causal in the
  language models, the suffix against the cached prefix) and the rest are counted analytically (tests compare the
  linear and attention FLOPs with a counted ``CompassModel.score`` of the tiny model). Text tokens of the prompts
  are estimated (no tokenizer is available offline: one token per word, punctuation mark or special token), a few
  % of each sequence.

Ceilings for ``--gpu``: the dense bf16 spec (989 TFLOP/s; TF32 494 for DISTS's fp32 convs) and the HBM
spec (H100 SXM 3.35 TB/s, H200 4.8 TB/s), or measured ones from ``ceilings.csv`` of
``benchmarks/gpu_measure.sh`` for the same card. A phase's time is the sum over its categories of
``max(FLOPs / compute ceiling, bytes / bandwidth)``: a lower bound (no launch overhead, no overlap loss).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import functools
import json
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import flop_registry

from oars_fast.config import RLJob, load_config

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = [ROOT / "configs/qwen_image_edit/rl_fr.yaml", ROOT / "configs/qwen_image_edit/rl_nr.yaml"]
DEFAULT_CEILINGS = ROOT / "benchmarks/results/gpu/ceilings.csv"  # gpu_measure.sh's default output
CATS = ("lora", "attention", "linear", "rest")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

# Published configs of the two VL models (their config.json; transformers' class defaults are other sizes).
# Qwen-Image-Edit-2509's text_encoder/ is Qwen2.5-VL-7B-Instruct.
QWEN25_VL_7B = dict(
    text_config=dict(
        vocab_size=152064,
        hidden_size=3584,
        intermediate_size=18944,
        num_hidden_layers=28,
        num_attention_heads=28,
        num_key_value_heads=4,
        rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]},
    ),
    vision_config=dict(
        depth=32,
        hidden_size=1280,
        intermediate_size=3420,
        num_heads=16,
        out_hidden_size=3584,
        patch_size=14,
        spatial_merge_size=2,
        temporal_patch_size=2,
        window_size=112,
        fullatt_block_indexes=[7, 15, 23, 31],
    ),
)
QWEN3_VL_8B_VOCAB = 151936  # COMPASS builds Qwen3-VL-8B's other shapes itself (oars_fast.rewards.compass._arch)

SPEC = {  # dense (no sparsity) spec sheets, SXM parts
    "h100": {"card": "H100 SXM", "bf16": 989.4e12, "tf32": 494.7e12, "bw": 3.35e12},
    "h200": {"card": "H200 SXM", "bf16": 989.4e12, "tf32": 494.7e12, "bw": 4.8e12},
}


# --------------------------------------------------------------------------------------------- costs
@dataclass
class Cost:
    """FLOPs and bytes per category (lora, attention, linear, rest)."""

    flops: dict = field(default_factory=lambda: dict.fromkeys(CATS, 0.0))
    bytes: dict = field(default_factory=lambda: dict.fromkeys(CATS, 0.0))

    @classmethod
    def of(cls, cat: str, flops: float, nbytes: float) -> Cost:
        c = cls()
        c.flops[cat], c.bytes[cat] = float(flops), float(nbytes)
        return c

    def __add__(self, other: Cost) -> Cost:
        return Cost(
            {k: self.flops[k] + other.flops[k] for k in CATS}, {k: self.bytes[k] + other.bytes[k] for k in CATS}
        )

    def __mul__(self, s: float) -> Cost:
        return Cost({k: v * s for k, v in self.flops.items()}, {k: v * s for k, v in self.bytes.items()})

    __rmul__ = __mul__

    def scaled(self, flops: float, nbytes: float) -> Cost:
        return Cost({k: v * flops for k, v in self.flops.items()}, {k: v * nbytes for k, v in self.bytes.items()})

    @property
    def total_flops(self) -> float:
        return sum(self.flops.values())

    @property
    def total_bytes(self) -> float:
        return sum(self.bytes.values())


def total(costs) -> Cost:
    out = Cost()
    for c in costs:
        out = out + c
    return out


@dataclass
class Affine:
    """A cost linear in the batch: ``fixed + batch * per`` (fixed: what one call pays once, weight reads)."""

    fixed: Cost
    per: Cost

    def at(self, batch: float) -> Cost:
        return self.fixed + self.per * batch if batch > 0 else Cost()


# ------------------------------------------------------------------------------------ the op counter
@dataclass
class Op:
    module: str  # qualified name of the innermost module (its class name outside the counted root)
    cat: str
    flops: float
    bytes: float


def _nbytes(t: torch.Tensor) -> float:
    """Bytes a kernel touches for `t`: its elements, or its storage when it is an expanded (broadcast) view."""
    n = t.numel() * t.element_size()
    with contextlib.suppress(Exception):
        n = min(n, t.untyped_storage().nbytes())
    return float(n)


_FREE = {
    "empty",
    "empty_strided",
    "new_empty",
    "new_empty_strided",
    "empty_like",
    "detach",
    "lift_fresh",
    "alias",
    "_unsafe_view",
    "_reshape_alias",
    "_local_scalar_dense",
    "sym_size",
    "sym_stride",
    "sym_numel",
    "sym_storage_offset",
    "is_same_size",
    "_has_compatible_shallow_copy_type",
    "record_stream",
    "set_",
}


def _is_free(func) -> bool:
    """Views and metadata: no FLOPs, no bytes."""
    if func.overloadpacket.__name__ in _FREE:
        return True
    rets = func._schema.returns
    return bool(rets) and all(r.alias_info is not None and not r.alias_info.is_write for r in rets)


class _Dispatch(TorchDispatchMode):
    def __init__(self, counter: OpCounter):
        super().__init__()
        self.counter = counter

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if _is_free(func):
            return out
        ts = [t for t in tree_flatten((args, kwargs))[0] + tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        nbytes = sum(_nbytes(t) for t in ts)
        packet = func.overloadpacket
        if packet in flop_registry:
            flops, cat = flop_registry[packet](*args, **kwargs, out_val=out), "linear"
        else:
            flops, cat = max((t.numel() for t in ts), default=0), "rest"
        self.counter.record(cat, flops, nbytes)
        return out


class _Attention(TorchFunctionMode):
    """``F.scaled_dot_product_attention`` as one fused op: QK^T and AV FLOPs, Q, K, V (and mask) read, O written."""

    def __init__(self, counter: OpCounter):
        super().__init__()
        self.counter = counter

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not F.scaled_dot_product_attention:
            return func(*args, **kwargs)
        names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal")
        a = dict(zip(names, args))
        a.update(kwargs)
        q, k, v = a["query"], a["key"], a["value"]
        lq, lk = q.shape[-2], k.shape[-2]
        rows = math.prod(q.shape[:-2])  # batch x query heads (GQA: K/V heads are shared)
        flops = 2.0 * rows * lq * lk * (q.shape[-1] + v.shape[-1]) * (0.5 if a.get("is_causal") else 1.0)
        out = q.new_empty((*q.shape[:-1], v.shape[-1]))
        mask = a.get("attn_mask")
        nbytes = sum(_nbytes(t) for t in (q, k, v, out) + ((mask,) if isinstance(mask, torch.Tensor) else ()))
        self.counter.record("attention", flops, nbytes)
        return out


class OpCounter:
    """Counts the ops a module's forward dispatches (best on meta tensors: nothing is computed), each filed
    under the innermost module it ran in. ``with OpCounter(root) as c: root(...)``; then ``c.ops``."""

    def __init__(self, root: nn.Module | None = None):
        self.names = {id(m): n for n, m in root.named_modules()} if root is not None else {}
        self.stack: list[str] = []
        self.ops: list[Op] = []

    def record(self, cat: str, flops: float, nbytes: float) -> None:
        self.ops.append(Op(self.stack[-1] if self.stack else "", cat, float(flops), float(nbytes)))

    def __enter__(self) -> OpCounter:
        def pre(mod, args):
            self.stack.append(self.names.get(id(mod), type(mod).__name__))

        def post(mod, args, out):
            self.stack.pop()

        self._hooks = [
            nn.modules.module.register_module_forward_pre_hook(pre),
            nn.modules.module.register_module_forward_hook(post),
        ]
        self._modes = contextlib.ExitStack()
        self._modes.enter_context(torch.no_grad())
        self._modes.enter_context(_Attention(self))
        self._modes.enter_context(_Dispatch(self))
        return self

    def __exit__(self, *exc) -> None:
        self._modes.close()
        for h in self._hooks:
            h.remove()

    def cost(self, keep=lambda op: True) -> Cost:
        out = Cost()
        for op in self.ops:
            if keep(op):
                out.flops[op.cat] += op.flops
                out.bytes[op.cat] += op.bytes
        return out


def count(root: nn.Module, fn) -> OpCounter:
    with OpCounter(root) as c:
        fn()
    return c


def params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# ----------------------------------------------------------------------------------------- geometry
@dataclass(frozen=True)
class Geometry:
    """Token counts of one candidate (the transformer's sequence: text + target + condition)."""

    out_size: int  # output (HR) side in pixels
    lr_size: int
    latent: int  # latent side
    img_tokens: int  # target tokens (2x2 latent patches)
    cond_tokens: int  # the LR condition's tokens (same grid)
    vl_patches: tuple  # (t, h, w) patch grid of the LR in the Qwen2.5-VL encoder
    vl_image_tokens: int
    txt_tokens: int  # prompt tokens the transformer sees (after the dropped system part)
    vl_tokens: int  # tokens through the text encoder (incl. the dropped system part)

    @property
    def seq(self) -> int:
        return self.img_tokens + self.cond_tokens + self.txt_tokens


def geometry(job: RLJob, tcfg: dict, vae_factor: int) -> Geometry:
    from oars_fast.models.text_encoder import EDIT_DROP_TOKENS, EDIT_TEMPLATE, IMAGE_PROMPT, condition_size

    hr = job.data.crop_size
    lr = hr // job.data.scale
    lat = hr // vae_factor
    tokens = (lat // tcfg["patch_size"]) ** 2
    w, h = condition_size(lr, lr)
    gh, gw = _image_grid(None, h, w)
    img_tok = gh * gw // 4
    # the Edit-Plus prompt (one image pad expanded to the image's tokens); its first 64 hidden states are dropped
    vl = estimate_tokens(EDIT_TEMPLATE.format(IMAGE_PROMPT + job.model.prompt)) - 1 + img_tok
    return Geometry(hr, lr, lat, tokens, tokens, (1, gh, gw), img_tok, vl - EDIT_DROP_TOKENS, vl)


# -------------------------------------------------------------------------------------- transformer
def _local_config(cls, pretrained: str | None, subfolder: str) -> dict | None:
    if pretrained and (Path(pretrained) / subfolder / "config.json").is_file():
        return {k: v for k, v in cls.load_config(pretrained, subfolder=subfolder).items() if not k.startswith("_")}
    return None


def transformer_config(job: RLJob) -> tuple[dict, str]:
    from diffusers import QwenImageTransformer2DModel

    cfg = _local_config(QwenImageTransformer2DModel, job.model.pretrained, "transformer")
    if cfg is not None:
        return cfg, f"{job.model.pretrained}/transformer/config.json"
    with torch.device("meta"):
        cfg = dict(QwenImageTransformer2DModel().config)
    return {k: v for k, v in cfg.items() if not k.startswith("_")}, "QwenImageTransformer2DModel defaults"


def _suffix_match(name: str, targets) -> bool:
    return any(name == t or name.endswith("." + t) for t in targets)


_QKV = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")
# the text stream after attention: in the last block its output is unused (only the image stream goes on)
_TXT_TAIL = ("attn.to_add_out", "txt_norm2", "txt_mlp")
ATTN_BWD = 2.5  # flash backward / forward FLOPs: dQ, dK, dV, dP and the recomputed QK^T (5 GEMMs vs 2)


@dataclass
class TransformerCost:
    """Cost of the transformer at a geometry, from one block counted on meta tensors."""

    cfg: dict
    source: str
    params: int
    layers: int
    parts: dict  # (where, bwd) -> Affine; where: outer | block; bwd: none | dx | qkv | txt_tail (see _bwd_class)
    lora_layers: list  # (name in the block, in, out, tokens per sample)
    rank: int
    kernel: str
    el: int  # activation element size
    segments: dict = field(default_factory=dict)  # attention | mlp -> Affine: one block's ops in those sub-modules

    def fwd(self, batch: float, lora: bool = True) -> Cost:
        c = total(p.at(batch) * (self.layers if where == "block" else 1) for (where, _), p in self.parts.items())
        return c + self.lora_fwd(batch) * self.layers if lora else c

    def lora_fwd(self, batch: float, only=None) -> Cost:
        """One block's LoRA forward (`only`: the adapted layers whose name passes it)."""
        r, el = self.rank, self.el
        f = b = 0.0
        for name, k, n, m in self.lora_layers:
            if only is not None and not only(name):
                continue
            mm = m * batch
            f += 2 * mm * r * (k + n)
            w = r * (k + n) * 4  # fp32 adapters
            if self.kernel == "triton":  # u = s x A^T (reads x), [x|su] @ [W|B]^T: u and B as an extra K block
                b += mm * k * el + 2 * mm * r * el + w
            elif self.kernel == "addmm":  # u; C = bias + s u B^T; y = C + x W^T (C read again)
                b += mm * k * el + 2 * mm * r * el + 2 * mm * n * el + w
            else:  # peft: u, u B^T, * s, + base: three extra passes over the output
                f += 2 * mm * n
                b += mm * k * el + 2 * mm * r * el + 6 * mm * n * el + 2 * w
        return Cost.of("lora", f, b)

    def bwd(self, batch: float) -> Cost:
        """Backward of the current forward, only the LoRA trained: the frozen linears' dx (1x their forward;
        none where the input needs no grad), attention ATTN_BWD x, the rest 2x, the adapters 2x (dx, dA, dB)."""
        c = Cost()
        for (where, bwd), p in self.parts.items():
            x = p.at(batch)
            n = {
                "dx": self.layers if where == "block" else 1,
                "qkv": self.layers - 1,
                "txt_tail": self.layers - 1,
                "none": 0,
            }[bwd]
            c = (
                c
                + Cost(
                    {
                        "lora": 0,
                        "attention": ATTN_BWD * x.flops["attention"],
                        "linear": x.flops["linear"],
                        "rest": 2 * x.flops["rest"],
                    },
                    {
                        "lora": 0,
                        "attention": 2 * x.bytes["attention"],
                        "linear": x.bytes["linear"],
                        "rest": 2 * x.bytes["rest"],
                    },
                )
                * n
            )
        lora = self.lora_fwd(batch) * (2 * self.layers)
        # block 0: no dx through the Q/K/V adapters (their input needs no grad); last block: no text tail at all
        qkv = [(k, m) for name, k, _, m in self.lora_layers if name.endswith(_QKV)]
        lora.flops["lora"] -= sum(2 * m * batch * self.rank * k for k, m in qkv)
        tail = self.lora_fwd(batch, only=lambda name: name.endswith(_TXT_TAIL)) * 2
        return c + lora + tail * -1

    def recompute(self, batch: float, mode: str = "full") -> Cost:
        """Activation checkpointing (``model.checkpointing``): in backward, every block's forward again (full) or
        only its checkpointed sub-modules (attention: the joint attention module, QKV/output projections with their
        adapters, QK norms, RoPE, SDPA; mlp: the two feed-forwards), with the adapters inside them."""
        if mode == "none":
            return Cost()
        if mode == "full":
            blocks = total(p.at(batch) for (where, _), p in self.parts.items() if where == "block")
            return (blocks + self.lora_fwd(batch)) * self.layers
        inside = RECOMPUTE_MODULES[mode]
        lora = self.lora_fwd(batch, only=lambda name: name.split(".")[2] in inside)
        return (self.segments[mode].at(batch) + lora) * self.layers

    @property
    def lora_params(self) -> int:
        return self.layers * sum(self.rank * (k + n) for _, k, n, _ in self.lora_layers)


# model.checkpointing -> the sub-modules of each block it recomputes (oars_fast.models.backbone's selection)
RECOMPUTE_MODULES = {"attention": ("attn",), "mlp": ("img_mlp", "txt_mlp")}


def recompute_mode(job: RLJob) -> str:
    """none | full | attention | mlp: ``model.recompute`` (``model.checkpointing``, else the deprecated
    ``model.gradient_checkpointing``); configs from before ``checkpointing`` existed: the boolean."""
    mode = getattr(job.model, "recompute", None)
    if mode is None:
        mode = "full" if job.model.gradient_checkpointing else "none"
    return mode


def _segment(name: str) -> str | None:
    """The selectively checkpointed sub-module (attention | mlp) a block op runs in, if any."""
    parts = name.split(".")
    if len(parts) < 3 or parts[0] != "transformer_blocks":
        return None
    return next((mode for mode, subs in RECOMPUTE_MODULES.items() if parts[2] in subs), None)


def _bwd_class(name: str) -> tuple[str, str]:
    """Where an op sits (outer | block) and what its backward is: none (input needs no grad: the modulation
    linears on the timestep embedding, the embeddings), qkv (none in block 0), txt_tail (none in the last
    block), dx (every block / the output head)."""
    if name.startswith("transformer_blocks."):
        sub = name.split(".", 2)[2] if name.count(".") >= 2 else ""
        if sub.startswith(("img_mod", "txt_mod")):
            return "block", "none"
        if sub in _QKV:
            return "block", "qkv"
        if sub.startswith(_TXT_TAIL):
            return "block", "txt_tail"
        return "block", "dx"
    if name.startswith("proj_out") or (
        name.startswith("norm_out") and name not in ("norm_out.linear", "norm_out.silu")
    ):
        return "outer", "dx"
    return "outer", "none"


@functools.lru_cache(maxsize=8)
def _transformer_cached(
    cfg_json: str, img: int, cond: int, txt: int, dtype: str, targets: tuple, rank: int, kernel: str, source: str
) -> TransformerCost:
    from diffusers import QwenImageTransformer2DModel

    cfg = json.loads(cfg_json)
    cfg["axes_dims_rope"] = tuple(cfg["axes_dims_rope"])
    with torch.device("meta"):
        n_params = params(QwenImageTransformer2DModel(**cfg))
        one = nn.Module.to(QwenImageTransformer2DModel(**{**cfg, "num_layers": 1}), DTYPES[dtype])
    side = int(round(math.sqrt(img)))
    runs = []
    for b in (1, 2, 3):  # 1: a warm-up (diffusers caches the RoPE tables per shape, as in a run)
        hs = torch.empty(b, img + cond, cfg["in_channels"], device="meta", dtype=DTYPES[dtype])
        ehs = torch.empty(b, txt, cfg["joint_attention_dim"], device="meta", dtype=DTYPES[dtype])
        mask = torch.ones(b, txt, device="meta", dtype=torch.long)
        t = torch.empty(b, device="meta", dtype=DTYPES[dtype])
        shapes = [[(1, side, side), (1, side, side)]] * b

        def call(hs=hs, ehs=ehs, mask=mask, t=t, shapes=shapes):
            return one(
                hidden_states=hs,
                encoder_hidden_states=ehs,
                encoder_hidden_states_mask=mask,
                timestep=t,
                img_shapes=shapes,
                return_dict=False,
            )

        runs.append(count(one, call))
    runs = runs[1:]  # batch 2 and 3: cost(b) = fixed + b * per (batch 1 skips a copy that any larger batch makes)
    parts = {}
    for key in {_bwd_class(op.module) for op in runs[0].ops}:
        c2, c3 = (r.cost(lambda op: _bwd_class(op.module) == key) for r in runs)  # noqa: B023
        per = c3 + c2 * -1
        parts[key] = Affine(c2 + per * -2, per)
    segments = {}  # one block's ops inside each selectively checkpointed sub-module
    for mode in RECOMPUTE_MODULES:
        c2, c3 = (r.cost(lambda op: _segment(op.module) == mode) for r in runs)  # noqa: B023
        per = c3 + c2 * -1
        segments[mode] = Affine(c2 + per * -2, per)
    lora = []
    mods = dict(one.named_modules())
    for name, mod in mods.items():
        if isinstance(mod, nn.Linear) and name.startswith("transformer_blocks.0.") and _suffix_match(name, targets):
            f = sum(op.flops for op in runs[0].ops if op.module == name)
            lora.append((name, mod.in_features, mod.out_features, f / (4 * mod.in_features * mod.out_features)))
    el = torch.empty((), dtype=DTYPES[dtype]).element_size()
    return TransformerCost(cfg, source, n_params, cfg["num_layers"], parts, lora, rank, kernel, el, segments)


def transformer_cost(job: RLJob, geo: Geometry) -> TransformerCost:
    cfg, source = transformer_config(job)
    return _transformer_cached(
        json.dumps(cfg, sort_keys=True, default=list),
        geo.img_tokens,
        geo.cond_tokens,
        geo.txt_tokens,
        job.model.dtype,
        tuple(job.lora.target_modules),
        job.lora.rank,
        job.lora.kernel,
        source,
    )


# ----------------------------------------------------------------------------------------------- VAE
@functools.lru_cache(maxsize=8)
def _vae(pretrained: str | None):
    from diffusers import AutoencoderKLQwenImage

    cfg = _local_config(AutoencoderKLQwenImage, pretrained, "vae")
    with torch.device("meta"):
        vae = AutoencoderKLQwenImage(**(cfg or {}))
    return vae, (f"{pretrained}/vae/config.json" if cfg else "AutoencoderKLQwenImage defaults")


def vae_factor(job: RLJob) -> int:
    return 2 ** len(_vae(job.model.pretrained)[0].config.temperal_downsample)


@functools.lru_cache(maxsize=32)
def _vae_cost(pretrained: str | None, dtype: str, what: str, batch: int, size: int) -> Cost:
    vae = nn.Module.to(_vae(pretrained)[0], DTYPES[dtype])  # (ModelMixin.to warns about fp32 modules)
    f = 2 ** len(vae.config.temperal_downsample)
    if what == "encode":
        x = torch.empty(batch, 3, 1, size, size, device="meta", dtype=DTYPES[dtype])
        return count(vae, lambda: vae.encode(x).latent_dist.mode()).cost()
    z = torch.empty(batch, vae.config.z_dim, 1, size // f, size // f, device="meta", dtype=DTYPES[dtype])
    return count(vae, lambda: vae.decode(z).sample).cost()


def vae_cost(job: RLJob, what: str, n: int, chunk: int = 32) -> Cost:
    """VAE encode / decode of `n` images at the output size, in the chunks the RL stage uses."""
    full, rest = divmod(n, chunk)
    c = _vae_cost(job.model.pretrained, job.model.dtype, what, chunk, job.data.crop_size) * full if full else Cost()
    return c + _vae_cost(job.model.pretrained, job.model.dtype, what, rest, job.data.crop_size) if rest else c


# --------------------------------------------------------------------------------------------- DISTS
@functools.lru_cache(maxsize=8)
def dists_cost(batch: int, groups: int, size: int, chunk: int) -> Cost:
    """DISTSReward on `batch` candidates of `groups` ground truths (float32, as the RL stage runs it)."""
    from oars_fast.rewards.dists import _CONVS, CHANNELS, DISTS, DISTSReward

    with torch.device("meta"):
        vgg = {}
        for idx, cin, cout in _CONVS:
            vgg[f"features.{idx}.weight"] = torch.empty(cout, cin, 3, 3)
            vgg[f"features.{idx}.bias"] = torch.empty(cout)
        n = sum(CHANNELS)
        d = DISTS(vgg, {"alpha": torch.empty(1, n, 1, 1), "beta": torch.empty(1, n, 1, 1)})
    k = max(1, batch // groups)
    sr = torch.empty(batch, 3, size, size, device="meta")
    gt = torch.empty(groups, 3, size, size, device="meta")
    gi = torch.arange(groups).repeat_interleave(k).to("meta")
    return count(d, lambda: DISTSReward(d, chunk)(None, sr, gt, gi)).cost()


# -------------------------------------------------------------------------------------- VL models
@dataclass
class VLModel:
    """A Qwen VL model's shapes, read from the module built on the meta device."""

    name: str
    params: int
    vision: dict  # hidden, heads, depth, full (indices of full-attention blocks or None: all), window (patches)
    text: dict  # hidden, heads, kv_heads, head_dim, layers, intermediate, vocab
    patch_linear: float  # weights per patch (patch embedding + every block's linears)
    merge_linear: float  # weights per merged token (merger + deepstack mergers)
    layer_linear: float  # weights per text token per layer
    lm_head: float  # weights of the LM head (per logit row)
    linear_params: int  # all linear/conv weights counted above (to check against params)


def vl_shapes(model: nn.Module, name: str) -> VLModel:
    """The shapes of a built Qwen VL ``...ForConditionalGeneration`` model (any device, meta included)."""
    cfg = model.config
    n = params(model)
    vc, tc = cfg.vision_config, cfg.text_config
    patch = merge = layer = head = 0.0
    linear = 0
    for mname, mod in model.named_modules():
        if not isinstance(mod, (nn.Linear, nn.Conv3d, nn.Conv2d)):
            continue
        w = mod.weight.numel()
        linear += w + (mod.bias.numel() if mod.bias is not None else 0)
        if ".visual.blocks." in mname or ".visual.patch_embed" in mname:
            patch += w
        elif ".visual." in mname:
            merge += w
        elif ".language_model.layers.0." in mname:
            layer += w
        elif mname == "lm_head":
            head += w
    layers = tc.num_hidden_layers
    lm_layer_all = sum(
        m.weight.numel()
        for nm, m in model.named_modules()
        if isinstance(m, nn.Linear) and ".language_model.layers." in nm
    )
    vision = dict(
        hidden=vc.hidden_size,
        heads=vc.num_heads,
        depth=vc.depth,
        merge=vc.spatial_merge_size,
        patch=vc.patch_size,
        full=list(getattr(vc, "fullatt_block_indexes", []) or []) or None,
        window=getattr(vc, "window_size", 0) or 0,
        intermediate=vc.intermediate_size,
    )
    head_dim = getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads
    text = dict(
        hidden=tc.hidden_size,
        heads=tc.num_attention_heads,
        kv_heads=tc.num_key_value_heads,
        head_dim=head_dim,
        layers=layers,
        intermediate=tc.intermediate_size,
        vocab=tc.vocab_size,
    )
    assert abs(lm_layer_all - layers * layer) / lm_layer_all < 0.01, "language-model layers differ"
    return VLModel(name, n, vision, text, patch, merge, layer, head, linear)


@functools.lru_cache(maxsize=4)
def vl_model(which: str, folder: str | None = None) -> VLModel:
    """``qwen2.5-vl-7b`` (the text encoder, its published config) or ``qwen3-vl-8b`` (COMPASS: the config.json of
    `folder` when given, else the Qwen3-VL-8B shapes COMPASS builds, ``oars_fast.rewards.compass._arch``), built on
    the meta device."""
    import transformers as tf

    if which == "qwen2.5-vl-7b":
        cfg, cls = tf.Qwen2_5_VLConfig(**QWEN25_VL_7B), tf.Qwen2_5_VLForConditionalGeneration
    elif folder is not None:
        cfg = tf.AutoConfig.from_pretrained(folder)
        cls = getattr(tf, _compass_backbones()[cfg.model_type])
    else:
        from oars_fast.rewards.compass import _arch

        cfg_cls, cls, kw, _ = _arch(tf, "qwen3vl-8b", QWEN3_VL_8B_VOCAB, None, None)
        cfg = cfg_cls(**kw)
    with torch.device("meta"):
        model = cls(cfg)
    return vl_shapes(model, which)


def _compass_backbones() -> dict:
    from oars_fast.rewards.compass import _BACKBONES

    return _BACKBONES


def _image_grid(processor_kw: dict | None, h: int, w: int) -> tuple[int, int]:
    """(patches per side h, w) of an image after the Qwen2-VL image processor's resize."""
    from oars_fast.models.text_encoder import _image_processor_class

    ip = _image_processor_class()(**(processor_kw or {}))
    grid = ip(images=[torch.zeros(h, w, 3, dtype=torch.uint8).numpy()], return_tensors="pt")["image_grid_thw"][0]
    return int(grid[1]), int(grid[2])


def vision_cost(m: VLModel, gh: int, gw: int, n_images: int, el: int = 2) -> Cost:
    """The vision tower on `n_images` images of gh x gw patches (batched: weights read once)."""
    v = m.vision
    p = gh * gw
    hidden = v["hidden"]
    lin_f = 2 * n_images * (p * m.patch_linear + p / v["merge"] ** 2 * m.merge_linear)
    lin_b = (m.patch_linear + m.merge_linear) * el + n_images * p * el * (8 * hidden + 3 * v["intermediate"]) * v[
        "depth"
    ]
    # attention per block: full blocks over all patches; Qwen2.5-VL's others in windows of window_size pixels
    if v["full"] is None:
        keys_full, n_full, keys_win, n_win = p * p, v["depth"], 0, 0
    else:
        cells = v["window"] // v["patch"] // v["merge"]  # window side in merged tokens

        def sides(n):
            return [min(cells, n - i) * v["merge"] for i in range(0, n, cells)]

        keys_win = sum(a * a * b * b for a in sides(gh // v["merge"]) for b in sides(gw // v["merge"]))
        keys_full, n_full, n_win = p * p, len(v["full"]), v["depth"] - len(v["full"])
    att_f = 4 * hidden * n_images * (keys_full * n_full + keys_win * n_win)
    att_b = 4 * n_images * p * hidden * el * v["depth"]
    rest = n_images * p * v["depth"] * (12 * hidden + 3 * v["intermediate"])
    return Cost(
        {"lora": 0, "attention": att_f, "linear": lin_f, "rest": rest},
        {"lora": 0, "attention": att_b, "linear": lin_b, "rest": rest * el * 2},
    )


def text_cost(m: VLModel, rows: int, new: int, past: int, logits: int = 0, el: int = 2) -> Cost:
    """`rows` sequences of `new` tokens each after `past` cached ones (causal), one forward; `logits` rows of
    the LM head per sequence. Weights read once per call; the KV cache of `past` read once."""
    t = m.text
    layers, h = t["layers"], t["hidden"]
    tokens = rows * new
    keys = rows * (new * past + new * (new + 1) / 2)
    lin_f = 2 * tokens * m.layer_linear * layers + 2 * rows * logits * m.lm_head
    lin_b = (m.layer_linear * layers + (m.lm_head if logits else 0)) * el + tokens * layers * el * (
        6 * h + 3 * t["intermediate"] + 4 * t["kv_heads"] * t["head_dim"]
    )
    att_f = 4 * t["heads"] * t["head_dim"] * keys * layers
    kv = 2 * t["kv_heads"] * t["head_dim"] * el * layers
    att_b = rows * (past + new) * kv + tokens * 2 * t["heads"] * t["head_dim"] * el * layers
    rest = tokens * layers * (14 * h + 3 * t["intermediate"])
    return Cost(
        {"lora": 0, "attention": att_f, "linear": lin_f, "rest": rest},
        {"lora": 0, "attention": att_b, "linear": lin_b, "rest": rest * el * 2},
    )


def condition_cost(job: RLJob, geo: Geometry, groups: int) -> Cost:
    """The Qwen2.5-VL text encoder on the Edit-Plus prompt of each group's LR (one batched call). The project
    calls the ForConditionalGeneration model, so the LM head runs on every position though only hidden
    states are used."""
    m = vl_model("qwen2.5-vl-7b")
    _, gh, gw = geo.vl_patches
    return vision_cost(m, gh, gw, groups) + text_cost(m, groups, geo.vl_tokens, 0, logits=geo.vl_tokens)


def estimate_tokens(text: str) -> int:
    """BPE tokens of an English prompt, estimated without the tokenizer: each special token, word and punctuation
    mark as one token (Qwen's byte-level BPE keeps common English words whole)."""
    special = re.findall(r"<\|[^|]+\|>", text)
    rest = re.sub(r"<\|[^|]+\|>", " ", text)
    return len(special) + len(re.findall(r"\w+|[^\w\s]", rest))


def _compass_folder(job: RLJob) -> Path | None:
    folder = getattr(job.reward, "compass", None)
    return Path(folder) if folder and Path(folder).is_dir() else None


def compass_vl(job: RLJob) -> VLModel:
    """COMPASS's backbone: the config.json of reward.compass when that is a local folder, else Qwen3-VL-8B."""
    folder = _compass_folder(job)
    if folder is not None and (folder / "config.json").is_file():
        return vl_model("qwen3-vl-8b", str(folder))
    return vl_model("qwen3-vl-8b")


def compass_layout(job: RLJob, geo: Geometry) -> dict:
    """COMPASS's sequence (``CompassModel._layout``): prefix = prompt + <|vision_start|> LR pads <|vision_end|> + the
    Q_LR marker, once per group; suffix = question + <|vision_start|> SR pads <|vision_end|> + the final text, per
    candidate. Image sides from ``fit_size`` (the pixel budget: the 128^2 LR is upscaled to 256^2, a 512^2 SR kept);
    pixel budget, head width and texts of the checkpoint's compass_config.json when reward.compass is a local
    folder, else CompassConfig's defaults; text tokens estimated (no tokenizer offline)."""
    from oars_fast.rewards.compass import CONFIG_FILE, CompassConfig, fit_size

    cc = CompassConfig()
    src = "CompassConfig defaults"
    folder = _compass_folder(job)
    if folder is not None and (folder / CONFIG_FILE).is_file():
        cc = CompassConfig.from_dict(json.loads((folder / CONFIG_FILE).read_text()))
        src = str(folder / CONFIG_FILE)
    m = compass_vl(job)
    p, mm = m.vision["patch"], m.vision["merge"]
    lh, lw = (x // p for x in fit_size(geo.lr_size, geo.lr_size, p * mm, cc.min_pixels, cc.max_pixels))
    sh, sw = (x // p for x in fit_size(geo.out_size, geo.out_size, p * mm, cc.min_pixels, cc.max_pixels))
    prefix = estimate_tokens(cc.prefix + cc.lr_marker) + 2 + lh * lw // mm**2
    suffix = estimate_tokens(cc.middle + cc.final) + 2 + sh * sw // mm**2
    return dict(lr_grid=(lh, lw), sr_grid=(sh, sw), prefix=prefix, suffix=suffix, head=cc.head_hidden, source=src)


def compass_cost(m: VLModel, lay: dict, groups: int, k: int, batch_size: int, el: int = 2, reuse: bool = True) -> Cost:
    """``CompassModel.score`` on `groups` LR inputs and their ``groups * k`` candidates (the backbone's inner model:
    no LM head, nothing generated), as the landed code runs it:

    1. the prefix once per group (vision tower on the LR, language model on the prefix; keys/values kept), in
       chunks of `batch_size` groups; ``lr_head`` on its last token (Q_LR);
    2. the suffix of every candidate (vision tower on the SR, language model on the suffix against its group's
       prefix keys/values) in chunks of `batch_size` candidates; per chunk the prefix keys/values are gathered per
       candidate (``k[rows]``: read + write) and the eager DynamicCache concatenates the suffix's to them in every
       layer (read + write of prefix + suffix); ``pair_head`` on the last token (F, Q_SR).

    ``reuse=False``: ``CompassModel.score_full`` instead (each pair one full sequence: every candidate pays the LR
    image and the prefix tokens again)."""
    t = m.text
    b = groups * k
    c = Cost()
    h, hh = t["hidden"], lay["head"]  # two float32 MLPs: hidden -> head_hidden -> 1 (Q_LR) or 2 (F, Q_SR)
    heads = Cost.of(
        "linear", 2 * groups * (h * hh + hh) + 2 * b * (h * hh + 2 * hh), 4 * ((groups + b) * h + 2 * h * hh + 3 * hh)
    )
    if not reuse:
        for i in range(0, b, batch_size):
            n = min(batch_size, b - i)
            c = (
                c
                + vision_cost(m, *lay["lr_grid"], n, el)
                + vision_cost(m, *lay["sr_grid"], n, el)
                + text_cost(m, n, lay["prefix"] + lay["suffix"], 0, el=el)
            )
        return c + heads
    for i in range(0, groups, batch_size):
        n = min(batch_size, groups - i)
        c = c + vision_cost(m, *lay["lr_grid"], n, el) + text_cost(m, n, lay["prefix"], 0, el=el)
    kv = 2 * t["kv_heads"] * t["head_dim"] * el * t["layers"]  # keys + values of one token, every layer
    for i in range(0, b, batch_size):
        n = min(batch_size, b - i)
        cache = Cost.of("rest", 0.0, n * kv * (2 * lay["prefix"] + 2 * (lay["prefix"] + lay["suffix"])))
        c = c + vision_cost(m, *lay["sr_grid"], n, el) + text_cost(m, n, lay["suffix"], lay["prefix"], el=el) + cache
    return c + heads


# ----------------------------------------------------------------------------------------- the table
@dataclass
class Row:
    phase: str
    calls: str
    cost: Cost
    tf32: bool = False  # float32 GEMMs/convs (TF32 tensor cores on Hopper)
    sub: bool = False  # part of the update


@dataclass
class Estimate:
    job: RLJob
    name: str
    geo: Geometry
    tr: TransformerCost
    groups: int
    kept: int
    rows: list
    notes: list

    @property
    def total(self) -> Cost:
        return total(r.cost for r in self.rows)

    def phase(self, name: str) -> Cost:
        return total(r.cost for r in self.rows if r.phase == name or (name == "update" and r.sub))


def estimate(job: RLJob, world: int = 8, kept: float = 1.0, name: str = "") -> Estimate:
    rl = job.rl
    if rl.inputs_per_iter % world:
        raise SystemExit(f"rl.inputs_per_iter={rl.inputs_per_iter} is not divisible by --world {world}")
    groups = rl.inputs_per_iter // world
    k = rl.group_size
    b = groups * k
    geo = geometry(job, transformer_config(job)[0], vae_factor(job))
    tr = transformer_cost(job, geo)
    el = tr.el
    rows = [
        Row("condition (text encoder)", f"{groups} prompt(s) x {geo.vl_tokens} tok", condition_cost(job, geo, groups)),
        Row("vae encode (LR cond.)", f"{groups} x {geo.out_size}^2", vae_cost(job, "encode", groups)),
        Row("rollout", f"{rl.rollout_steps} steps x {b}", tr.fwd(b) * rl.rollout_steps),
        Row("vae decode", f"{b} x {geo.out_size}^2", vae_cost(job, "decode", b)),
    ]
    lay = compass_layout(job, geo) if job.rl.mode == "nr" and job.reward.name != "dists" else None
    if job.reward.name == "dists":
        rows.append(
            Row(
                "reward (DISTS)",
                f"{b} + {groups} GT",
                dists_cost(b, groups, geo.out_size, job.reward.batch_size),
                tf32=True,
            )
        )
    elif lay is not None:
        cm = compass_vl(job)
        reward = compass_cost(cm, lay, groups, k, job.reward.batch_size)
        full = compass_cost(cm, lay, groups, k, job.reward.batch_size, reuse=False)
        rows.append(Row("reward (COMPASS 8B)", f"{groups} prefix + {b} suffix", reward))
    else:
        rows.append(Row(f"reward ({job.reward.name})", f"{b}", Cost()))
    n_kept = max(0, round(b * kept))
    mb = rl.micro_batch
    if rl.objective == "nft":
        passes = rl.update_times
        chunks = [min(mb, n_kept - s) for s in range(0, n_kept, mb)] * passes
        calls = f"{passes} x {n_kept}"
        fwd_rows = [("old fwd", True)] + ([("ref fwd", False)] if rl.kl > 0 else [])
    else:  # flow_grpo: per SDE step the current (grad) and the reference forward
        passes = rl.rollout_steps - 1
        chunks = [min(mb, n_kept - s) for s in range(0, n_kept, mb)] * passes
        calls = f"{passes} x {n_kept}"
        fwd_rows = [("ref fwd", False)] if rl.kl > 0 else []
    for label, lora in fwd_rows:
        rows.append(Row(f"update: {label}", calls, total(tr.fwd(c, lora) for c in chunks), sub=True))
    rows.append(Row("update: current fwd", calls, total(tr.fwd(c) for c in chunks), sub=True))
    rows.append(Row("update: backward", calls, total(tr.bwd(c) for c in chunks), sub=True))
    recompute = recompute_mode(job)
    if recompute != "none":
        rows.append(
            Row(f"update: recompute ({recompute})", calls, total(tr.recompute(c, recompute) for c in chunks), sub=True)
        )
    lat = tr.cfg["out_channels"] * geo.latent**2  # latent elements of one candidate
    nl = tr.lora_params
    loss = Cost.of("rest", 30 * lat * n_kept * passes, 10 * lat * el * n_kept * passes)
    optim = Cost.of("rest", 20 * nl, 52 * nl)  # AdamW (fp32 p, g, m, v) + the old-policy and LoRA EMAs
    rows.append(Row("update: loss + AdamW + EMAs", f"{nl / 1e6:.1f}M params", loss + optim, sub=True))
    notes = [
        f"transformer {tr.params / 1e9:.2f}B params ({tr.source}); LoRA r{job.lora.rank} on "
        f"{len(tr.lora_layers)} projections x {tr.layers} blocks = {nl / 1e6:.1f}M params; "
        f"lora.kernel={job.lora.kernel}",
        f"tokens per candidate: {geo.img_tokens} target + {geo.cond_tokens} condition + {geo.txt_tokens} text "
        f"(~{geo.vl_image_tokens} LR image tokens at a 384^2 area + ~{geo.txt_tokens - geo.vl_image_tokens} "
        f"template/instruction, estimated) = {geo.seq}",
        f"VAE {params(_vae(job.model.pretrained)[0]) / 1e6:.1f}M params ({_vae(job.model.pretrained)[1]}); "
        f"text encoder Qwen2.5-VL-7B {vl_model('qwen2.5-vl-7b').params / 1e9:.2f}B"
        + (
            f"; COMPASS {cm.params / 1e9:.2f}B ({cm.text['layers']} x {cm.text['hidden']} text, "
            f"{cm.vision['depth']} x {cm.vision['hidden']} vision): prefix {lay['prefix']} tokens once per "
            f"group, suffix {lay['suffix']} per candidate (LR {lay['lr_grid'][0]}x{lay['lr_grid'][1]}, SR "
            f"{lay['sr_grid'][0]}x{lay['sr_grid'][1]} patches; {lay['source']}; text tokens estimated); prefix "
            f"reuse: {reward.total_flops / 1e12:.1f} TFLOP vs {full.total_flops / 1e12:.1f} for full sequences "
            f"(score_full)"
            if lay
            else ""
        ),
        f"per rank: {groups} group(s) of K={k} (rl.inputs_per_iter={rl.inputs_per_iter} / world {world}); "
        f"kept {n_kept}/{b} ({kept:.0%}); {rl.objective}: {passes} update passes per kept candidate, "
        f"micro-batch {mb}; activation checkpointing {recompute}; "
        f"KL reference pass {'on' if rl.kl > 0 else 'off'}",
    ]
    if job.rl.mode == "nr" and job.reward.name != "compass":
        notes.append(
            f"reward.name={job.reward.name}: the reward row counts COMPASS all the same (the production NR reward)"
        )
    return Estimate(job, name, geo, tr, groups, n_kept, rows, notes)


# ------------------------------------------------------------------------------------------ ceilings
def ceilings(gpu: str, path: Path | None) -> tuple[dict, str]:
    """{'linear', 'attention', 'tf32' (FLOP/s), 'bw' (B/s)} for `gpu` and a line saying where they come from."""
    spec = SPEC[gpu]
    c = {"linear": spec["bf16"], "attention": spec["bf16"], "tf32": spec["tf32"], "bw": spec["bw"]}
    src = {k: "spec" for k in c}
    measured = {}
    if path is not None and Path(path).is_file():
        with open(path) as f:
            for row in csv.DictReader(f):
                if gpu in row.get("device", "").lower().replace(" ", ""):
                    measured[row["name"]] = float(row["value"])
    pick = {
        "bw": ("copy_gbps", 1e9),
        "linear": ("linear_16384x3072x3072_tflops", 1e12),
        "attention": ("sdpa_rl_tflops", 1e12),
    }
    for key, (name, unit) in pick.items():
        if name in measured:
            c[key], src[key] = measured[name] * unit, f"measured {name}"
        elif key == "linear" and "gemm_bf16_8192_tflops" in measured:
            c[key], src[key] = measured["gemm_bf16_8192_tflops"] * 1e12, "measured gemm_bf16_8192_tflops"
    if "tf32" not in src or src["tf32"] == "spec":
        c["tf32"] = min(c["tf32"], c["linear"] / 2)
    desc = (
        f"{spec['card']}: GEMM {c['linear'] / 1e12:.0f} TFLOP/s ({src['linear']}), attention "
        f"{c['attention'] / 1e12:.0f} TFLOP/s ({src['attention']}), TF32 {c['tf32'] / 1e12:.0f} TFLOP/s, "
        f"HBM {c['bw'] / 1e12:.2f} TB/s ({src['bw']})"
    )
    return c, desc


def seconds(row: Row, ceil: dict, cats=CATS) -> float:
    t = 0.0
    for cat in cats:
        f, b = row.cost.flops[cat], row.cost.bytes[cat]
        peak = (
            ceil["tf32"]
            if row.tf32 and cat in ("linear", "lora")
            else ceil["attention" if cat == "attention" else "linear"]
        )
        t += max(f / peak if cat != "rest" else 0.0, b / ceil["bw"])
    return t


# ------------------------------------------------------------------------------------------- output
def render(est: Estimate, ceil: dict | None = None, ceil_desc: str = "") -> str:
    tot = est.total
    lines = [f"== {est.name}: one RL iteration per GPU"] + [f"   {n}" for n in est.notes]
    head = (
        f"{'phase':<30s} {'work':>22s} {'TFLOP':>9s} {'share':>6s} {'LoRA':>5s} {'attn':>5s} {'linear':>6s} "
        f"{'rest':>5s} {'GB':>8s} {'FLOP/B':>7s}"
    )
    if ceil:
        head += f" {'ms':>9s} {'time':>5s}"
    lines += [head, "-" * len(head)]
    t_all = sum(seconds(r, ceil) for r in est.rows) if ceil else 0.0
    upd = Row("update (all passes)", "", est.phase("update"))

    def line(r: Row, indent: str = "") -> str:
        f, b = r.cost.total_flops, r.cost.total_bytes
        share = {k: (r.cost.flops[k] / f if f else 0.0) for k in CATS}
        s = (
            f"{indent + r.phase:<30s} {r.calls:>22s} {f / 1e12:9.1f} {f / tot.total_flops:6.1%} "
            f"{share['lora']:5.1%} {share['attention']:5.1%} {share['linear']:6.1%} {share['rest']:5.1%} "
            f"{b / 1e9:8.1f} {f / b if b else 0:7.0f}"
        )
        if ceil:
            sec = seconds(r, ceil) if r is not upd else sum(seconds(x, ceil) for x in est.rows if x.sub)
            s += f" {sec * 1e3:9.1f} {sec / t_all:5.1%}"
        return s

    for r in est.rows:
        if r.sub and r is next(x for x in est.rows if x.sub):
            lines.append(line(upd))
        lines.append(line(r, "  " if r.sub else ""))
    lines.append("-" * len(head))
    lines.append(line(Row("total", "", tot)))
    share = {k: tot.flops[k] / tot.total_flops for k in CATS}
    lines.append(
        f"   FLOP shares of the iteration: LoRA {share['lora']:.1%}, attention {share['attention']:.1%}, "
        f"base linears/convs {share['linear']:.1%}, rest {share['rest']:.1%}; arithmetic intensity "
        f"{tot.total_flops / tot.total_bytes:.0f} FLOP/B (eager bytes)"
    )
    bshare = {k: tot.bytes[k] / tot.total_bytes for k in CATS}
    lines.append(
        f"   byte shares: LoRA {bshare['lora']:.1%}, attention {bshare['attention']:.1%}, base linears/convs "
        f"{bshare['linear']:.1%}, rest {bshare['rest']:.1%} (eager elementwise traffic: norms in fp32, RoPE, "
        "modulation, residuals)"
    )
    top = sorted(
        [(r.cost.total_flops, r.phase) for r in est.rows if not r.sub] + [(upd.cost.total_flops, upd.phase)],
        reverse=True,
    )[:3]
    lines.append("   largest phases: " + ", ".join(f"{p} {f / tot.total_flops:.0%}" for f, p in top))
    if ceil:
        lines.append(
            f"   time at the ceilings: {t_all:.2f} s per iteration ({ceil_desc}); a lower bound: "
            "max(FLOPs/peak, bytes/bandwidth) per category, no overheads"
        )
        by = {k: sum(seconds(r, ceil, (k,)) for r in est.rows) for k in CATS}
        lines.append(
            "   of which "
            + ", ".join(f"{k} {v:.2f} s" for k, v in by.items())
            + f"; with the rest fused away: {t_all - by['rest']:.2f} s; MFU at that lower bound "
            f"{tot.total_flops / t_all / ceil['linear']:.0%}"
        )
    return "\n".join(lines)


def to_dict(est: Estimate, ceil: dict | None = None) -> dict:
    return {
        "name": est.name,
        "rows": [
            {
                "phase": r.phase,
                "work": r.calls,
                "flops": r.cost.flops,
                "bytes": r.cost.bytes,
                "update": r.sub,
                **({"seconds": seconds(r, ceil)} if ceil else {}),
            }
            for r in est.rows
        ],
        "total_flops": est.total.total_flops,
        "total_bytes": est.total.total_bytes,
        "tokens": {"target": est.geo.img_tokens, "condition": est.geo.cond_tokens, "text": est.geo.txt_tokens},
        "transformer_params": est.tr.params,
        "lora_params": est.tr.lora_params,
    }


def main(argv=None) -> list[Estimate]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--config", action="append", help="RL config YAML (repeatable; default: the production FR and NR configs)"
    )
    ap.add_argument("overrides", nargs="*", help="key=value overrides applied to every config")
    ap.add_argument("--world", type=int, default=8, help="GPUs the iteration's groups are split over (default 8)")
    ap.add_argument(
        "--kept",
        type=float,
        default=1.0,
        help="fraction of candidates kept by the group filter (default 1: no group dropped, the most work)",
    )
    ap.add_argument("--gpu", choices=sorted(SPEC), help="also estimate the time at this card's ceilings")
    ap.add_argument(
        "--ceilings",
        type=Path,
        default=DEFAULT_CEILINGS,
        help="ceilings.csv from benchmarks/gpu_measure.sh (used for --gpu when it has that card)",
    )
    ap.add_argument("--json", type=Path, help="also write the numbers as JSON")
    args = ap.parse_args(argv)
    ceil, desc = ceilings(args.gpu, args.ceilings) if args.gpu else (None, "")
    out = []
    for path in args.config or CONFIGS:
        job = load_config(RLJob, path, args.overrides, world=args.world)
        est = estimate(job, args.world, args.kept, name=f"{Path(path).name} {' '.join(args.overrides)}".strip())
        print(render(est, ceil, desc), end="\n\n")
        out.append(est)
    if args.json:
        args.json.write_text(json.dumps([to_dict(e, ceil) for e in out], indent=1))
    sys.stdout.flush()
    return out


if __name__ == "__main__":
    main()
