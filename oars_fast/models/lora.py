"""LoRA adapters on the transformer through peft (diffusers' ``add_adapter``): the forward kernel,
saving in the layouts peft and diffusers load, reading them back, and the RL policies.

Adapters keep peft's module layout and state-dict keys (``...to_q.lora_A.<adapter>.weight``). An
exported adapter folder holds

* ``adapter_model.safetensors`` + ``adapter_config.json``: peft's own layout (keys
  ``base_model.model.<module>.lora_A.weight``), for ``peft.PeftModel.from_pretrained(transformer, dir)``;
* ``pytorch_lora_weights.safetensors``: the diffusers layout (keys ``transformer.<module>...`` and the
  LoRA config in the file's ``lora_adapter_metadata``, so alpha is known), for
  ``transformer.load_lora_adapter(dir)`` and the Qwen-Image pipelines' ``load_lora_weights(dir)``.

Either client then reproduces ``oars-fast merge`` exactly (a test fuses both and compares).
"""
from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers.loaders.lora_pipeline import QwenImageLoraLoaderMixin
from peft import LoraConfig
from peft.tuners.lora import Linear as PeftLoraLinear
from peft.tuners.lora import LoraLayer
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ..config import LoRAConfig
from ..errors import MissingFileError, UserError
from ..kernels import lora_linear, lora_linear_addmm

ADAPTER_WEIGHTS = "adapter_model.safetensors"  # peft
ADAPTER_CONFIG = "adapter_config.json"  # peft
DIFFUSERS_WEIGHTS = "pytorch_lora_weights.safetensors"  # diffusers, with the config in its metadata
PEFT_PREFIX = "base_model.model."
DIFFUSERS_PREFIX = "transformer."


def add_lora(transformer: nn.Module, cfg: LoRAConfig, adapter_name: str = "default") -> None:
    """Attach a LoRA adapter (rank, alpha, target modules, init from `cfg`); only its weights train, kept
    in float32 (a bf16 base stays bf16: compute runs under autocast)."""
    transformer.add_adapter(LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, target_modules=list(cfg.target_modules),
                                       lora_dropout=cfg.dropout, init_lora_weights=cfg.init_peft),
                            adapter_name=adapter_name)
    for _, layer in lora_layers(transformer):  # float32 master weights, whatever the base's dtype
        for weights in (layer.lora_A, layer.lora_B):
            if adapter_name in weights:
                weights[adapter_name].float()


def lora_layers(module: nn.Module):
    """(name, layer) of every peft LoRA layer in `module`."""
    return [(n, m) for n, m in module.named_modules() if isinstance(m, LoraLayer)]


def lora_state_dict(transformer: nn.Module, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """The adapter's weights under peft's saved keys (``<module>.lora_A.weight``, no adapter name)."""
    return get_peft_model_state_dict(transformer, adapter_name=adapter_name)


def merged_state_dict(transformer: nn.Module, adapter_names: list[str] | None = None) -> dict[str, torch.Tensor]:
    """The transformer's plain state dict (no peft keys) with ``scale * B @ A`` of the given adapters
    (default: the active ones) added into each adapted weight. The model is left unchanged."""
    deltas: dict[str, torch.Tensor] = {}
    for name, layer in lora_layers(transformer):
        names = adapter_names if adapter_names is not None else list(layer.active_adapters)
        for a in names:
            if a in layer.lora_A:
                d = layer.get_delta_weight(a).detach().float()
                key = f"{name}.weight"
                deltas[key] = deltas[key] + d if key in deltas else d
    out = {}
    for key, value in transformer.state_dict().items():
        if ".lora_" in key or "lora_magnitude" in key:
            continue
        plain = key.replace(".base_layer.", ".")
        if plain in deltas:
            value = (value.float() + deltas[plain].to(value.device)).to(value.dtype)
        out[plain] = value
    return out


# ------------------------------------------------------------------------------------------------
# The forward kernel of a LoRA layer (lora.kernel)
# ------------------------------------------------------------------------------------------------


class _KernelLoraLinear(PeftLoraLinear):
    """peft's LoRA Linear with the forward of one of our ops (``op``): same parameters, buffers and
    state-dict keys as peft's layer (only ``forward`` differs), so checkpoints, adapter switching
    (``set_adapter``/``disable_adapters``) and merging behave as in peft. Cases the op does not cover
    (several active adapters, dropout > 0, DoRA and other variants, LoRA bias, mixed-batch adapters,
    merged weights) use peft's own forward."""

    op = staticmethod(lora_linear)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        active = [a for a in self.active_adapters if a in self.lora_A]
        if (self.disable_adapters or self.merged or args or kwargs or len(active) != 1
                or active[0] in self.lora_variant
                or not isinstance(self.lora_dropout[active[0]], nn.Identity)
                or self.lora_A[active[0]].bias is not None or self.lora_B[active[0]].bias is not None):
            return super().forward(x, *args, **kwargs)
        a = active[0]
        base = self.get_base_layer()
        if torch.is_autocast_enabled(x.device.type):  # custom ops are outside autocast: cast as F.linear would
            x = x.to(torch.get_autocast_dtype(x.device.type))
        if getattr(base, "fp8_on", False) and not torch.is_grad_enabled():  # rl.fp8_nograd (models/fp8.py):
            la, lb = self.lora_A[a].weight, self.lora_B[a].weight  # the base GEMM in fp8, the LoRA branch in x's dtype
            return base(x) + F.linear(F.linear(x, la.to(x.dtype)), lb.to(x.dtype)) * float(self.scaling[a])
        return self.op(x, base.weight, base.bias, self.lora_A[a].weight, self.lora_B[a].weight,
                       float(self.scaling[a]))


class TritonLoraLinear(_KernelLoraLinear):
    """Forward through ``oars_fast.kernels.lora_linear`` (the augmented-GEMM Triton kernel; its pure-torch
    reference where Triton cannot run)."""

    op = staticmethod(lora_linear)


class AddmmLoraLinear(_KernelLoraLinear):
    """Forward through ``oars_fast.kernels.lora_linear_addmm`` (two cuBLAS addmm calls)."""

    op = staticmethod(lora_linear_addmm)


_KERNEL_CLASSES = {"peft": PeftLoraLinear, "triton": TritonLoraLinear, "addmm": AddmmLoraLinear}


def use_lora_kernel(model: nn.Module, kernel: str = "triton") -> int:
    """Give every LoRA Linear of `model` the forward of `kernel` (triton | addmm | peft). Returns how many.

    Only the layers' class changes (between peft's Linear and its subclasses above); no parameter, key
    or peft class is touched."""
    if kernel not in _KERNEL_CLASSES:
        raise ValueError(f"LoRA kernel {kernel!r} is not one of {sorted(_KERNEL_CLASSES)}")
    n = 0
    for m in model.modules():
        if type(m) in _KERNEL_CLASSES.values():
            m.__class__ = _KERNEL_CLASSES[kernel]
            n += 1
    return n


# ------------------------------------------------------------------------------------------------
# Export and import
# ------------------------------------------------------------------------------------------------


def save_lora(transformer: nn.Module, folder, adapter_name: str = "default") -> None:
    """Write the adapter in peft's layout and in diffusers' (see the module docstring)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().contiguous().cpu() for k, v in lora_state_dict(transformer, adapter_name).items()}
    cfg = transformer.peft_config[adapter_name].to_dict()
    cfg["target_modules"] = sorted(cfg["target_modules"]) if cfg.get("target_modules") else cfg.get("target_modules")
    cfg = json.loads(json.dumps(cfg, default=str))  # plain JSON types (sets and enums written as peft writes them)
    save_file({PEFT_PREFIX + k: v for k, v in sd.items()}, str(folder / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    (folder / ADAPTER_CONFIG).write_text(json.dumps(cfg, indent=1))
    QwenImageLoraLoaderMixin.save_lora_weights(folder, transformer_lora_layers=sd,
                                               transformer_lora_adapter_metadata=cfg,
                                               weight_name=DIFFUSERS_WEIGHTS)


def _plain_key(key: str) -> str:
    for prefix in (PEFT_PREFIX, DIFFUSERS_PREFIX):
        if key.startswith(prefix):
            return key[len(prefix):]
    return key


def read_lora(folder) -> tuple[dict[str, torch.Tensor], dict]:
    """(state dict with plain keys ``<module>.lora_A.weight``, LoRA config dict) of an adapter folder in
    peft's layout (preferred) or diffusers' (the config from the file's metadata)."""
    folder = Path(folder)
    if (folder / ADAPTER_WEIGHTS).is_file():
        if not (folder / ADAPTER_CONFIG).is_file():
            raise MissingFileError(f"LoRA folder {folder} has {ADAPTER_WEIGHTS} but no {ADAPTER_CONFIG}")
        cfg = json.loads((folder / ADAPTER_CONFIG).read_text())
        sd = load_file(str(folder / ADAPTER_WEIGHTS))
    elif (folder / DIFFUSERS_WEIGHTS).is_file():
        with safe_open(str(folder / DIFFUSERS_WEIGHTS), "pt") as f:
            meta = json.loads((f.metadata() or {}).get("lora_adapter_metadata", "{}"))
        cfg = {k[len(DIFFUSERS_PREFIX):]: v for k, v in meta.items() if k.startswith(DIFFUSERS_PREFIX)}
        if "r" not in cfg or "lora_alpha" not in cfg:
            raise UserError(f"{folder / DIFFUSERS_WEIGHTS} carries no LoRA metadata (r, lora_alpha): its scale "
                            f"is unknown; export it with its config ({ADAPTER_CONFIG})")
        sd = load_file(str(folder / DIFFUSERS_WEIGHTS))
    else:
        raise MissingFileError(f"LoRA folder {folder} holds neither {ADAPTER_WEIGHTS} + {ADAPTER_CONFIG} (peft) nor "
                               f"{DIFFUSERS_WEIGHTS} (diffusers)")
    return {_plain_key(k): v for k, v in sd.items()}, cfg


def lora_deltas(folder) -> dict[str, torch.Tensor]:
    """``{weight key: scale * B @ A}`` of a LoRA folder (scale = alpha / r, or alpha / sqrt(r) with
    rsLoRA; float32)."""
    sd, cfg = read_lora(folder)
    r, alpha = cfg["r"], cfg["lora_alpha"]
    scale = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
    deltas = {}
    for key, a in sd.items():
        if ".lora_A." not in key:
            continue
        b = sd[key.replace(".lora_A.", ".lora_B.")]
        deltas[key.split(".lora_A.")[0] + ".weight"] = scale * (b.float() @ a.float())
    if not deltas:
        raise UserError(f"no lora_A/lora_B pairs in the LoRA folder {folder}")
    return deltas


class PolicyAdapters:
    """The three policies of online RL on one transformer, switched without copying weights.

    * ``current``: adapter ``default``, trainable;
    * ``old``: adapter ``old``, frozen, an EMA of ``current`` (rollouts and ``v_old`` use it);
    * ``ref``: adapters disabled, i.e. the base model (the KL anchor).

    ``with policy.use("old"): ...`` switches every LoRA layer and always returns to ``current``
    with its parameters trainable and ``old``'s frozen.
    """

    CURRENT, OLD = "default", "old"

    def __init__(self, transformer: nn.Module, cfg: LoRAConfig, init_from=None):
        self.transformer = transformer
        transformer.requires_grad_(False)
        add_lora(transformer, cfg, self.CURRENT)
        add_lora(transformer, cfg, self.OLD)
        if init_from is not None:  # continue a LoRA (NR-RL continues FR-RL's)
            self.load_current(init_from)
        self.layers = [m for _, m in lora_layers(transformer)]
        self.copy_current_to_old()
        self._activate(self.CURRENT)

    def _pairs(self):
        for layer in self.layers:
            for kind in ("lora_A", "lora_B"):
                d = getattr(layer, kind)
                yield d[self.OLD].weight, d[self.CURRENT].weight

    def _activate(self, name: str, enabled: bool = True) -> None:
        for layer in self.layers:
            layer.set_adapter(name)
            layer.enable_adapters(enabled)
        for old, cur in self._pairs():
            old.requires_grad_(False)
            cur.requires_grad_(True)

    def use(self, which: str):
        if which not in ("current", "old", "ref"):
            raise ValueError(f"policy {which!r} is not one of ['current', 'old', 'ref']")

        @contextlib.contextmanager
        def ctx():
            if which == "old":
                self._activate(self.OLD)
            elif which == "ref":
                self._activate(self.CURRENT, enabled=False)
            try:
                yield
            finally:
                self._activate(self.CURRENT)

        return ctx()

    def named_parameters(self) -> dict[str, torch.nn.Parameter]:
        return {n: p for n, p in self.transformer.named_parameters() if f".{self.CURRENT}." in n and "lora_" in n}

    @torch.no_grad()
    def copy_current_to_old(self) -> None:
        for old, cur in self._pairs():
            old.copy_(cur)

    @torch.no_grad()
    def ema_update(self, eta: float) -> None:
        """old <- eta * old + (1 - eta) * current."""
        for old, cur in self._pairs():
            old.mul_(eta).add_(cur.to(old.dtype), alpha=1 - eta)

    def load_current(self, folder) -> None:
        """Load a saved LoRA (our export, peft's or diffusers' layout) into the current adapter."""
        state, _ = read_lora(folder)
        set_peft_model_state_dict(self.transformer, state, adapter_name=self.CURRENT)
