"""LoRA adapters on the transformer through peft (diffusers' ``add_adapter``), and merging.

Adapters keep peft's module layout and state-dict keys (``...to_q.lora_A.<adapter>.weight``), so
what we save loads with peft/diffusers and what they save loads here.
"""
from __future__ import annotations

import functools

import torch
import torch.nn as nn

from ..config import LoRAConfig


def add_lora(transformer: nn.Module, cfg: LoRAConfig, adapter_name: str = "default") -> None:
    """Attach a LoRA adapter (rank, alpha, target modules from `cfg`); only its weights train, kept in
    float32 (a bf16 base stays bf16: compute runs under autocast)."""
    from peft import LoraConfig

    transformer.add_adapter(LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, target_modules=list(cfg.target_modules),
                                       lora_dropout=cfg.dropout, init_lora_weights=True),
                            adapter_name=adapter_name)
    for _, layer in lora_layers(transformer):  # float32 master weights, whatever the base's dtype
        for weights in (layer.lora_A, layer.lora_B):
            if adapter_name in weights:
                weights[adapter_name].float()


def lora_layers(module: nn.Module):
    """(name, layer) of every peft LoRA layer in `module`."""
    from peft.tuners.lora import LoraLayer

    return [(n, m) for n, m in module.named_modules() if isinstance(m, LoraLayer)]


def lora_state_dict(transformer: nn.Module, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """The adapter's weights under peft's saved keys (``...lora_A.weight``, no adapter name)."""
    from peft.utils import get_peft_model_state_dict

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


@functools.lru_cache(maxsize=None)
def _fused_class():
    from peft.tuners.lora import Linear as PeftLoraLinear

    from ..kernels import lora_linear

    class FusedLoraLinear(PeftLoraLinear):
        """peft's LoRA Linear, forward through the fused ``oars_fast.kernels.lora_linear`` op.

        Same parameters, buffers and state-dict keys as peft's layer (only ``forward`` differs), so
        checkpoints, adapter switching (``set_adapter``/``disable_adapters``) and merging behave as
        in peft. Cases the fused op does not cover (several active adapters, dropout > 0, DoRA and
        other variants, LoRA bias, mixed-batch adapters, merged weights) use peft's own forward.
        """

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
            return lora_linear(x, base.weight, base.bias, self.lora_A[a].weight, self.lora_B[a].weight,
                               float(self.scaling[a]))

    return PeftLoraLinear, FusedLoraLinear


def use_fused_lora(model: nn.Module, enabled: bool = True) -> int:
    """Switch every peft LoRA Linear in `model` to the fused forward (or back). Returns how many.

    Only the layers' class changes (to a subclass that overrides ``forward``); no parameter, key
    or peft class is touched."""
    base_cls, fused_cls = _fused_class()
    src, dst = (base_cls, fused_cls) if enabled else (fused_cls, base_cls)
    n = 0
    for m in model.modules():
        if type(m) is src:
            m.__class__ = dst
            n += 1
    return n


ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


def save_lora(transformer: nn.Module, folder, adapter_name: str = "default") -> None:
    """Write the adapter as peft does: adapter_model.safetensors (peft keys) + adapter_config.json."""
    import json
    from pathlib import Path

    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().contiguous().cpu() for k, v in lora_state_dict(transformer, adapter_name).items()}
    save_file(sd, str(folder / ADAPTER_WEIGHTS))
    cfg = transformer.peft_config[adapter_name].to_dict()
    cfg["target_modules"] = sorted(cfg["target_modules"]) if cfg.get("target_modules") else cfg.get("target_modules")
    (folder / ADAPTER_CONFIG).write_text(json.dumps(cfg, indent=1, default=str))


def lora_deltas(folder) -> dict[str, torch.Tensor]:
    """``{weight key: scale * B @ A}`` of a peft/diffusers LoRA folder (keys with or without a
    ``transformer.`` prefix; scale = alpha / r, or alpha / sqrt(r) with rsLoRA; float32)."""
    import json
    import math
    from pathlib import Path

    from safetensors.torch import load_file

    folder = Path(folder)
    for f in (ADAPTER_WEIGHTS, ADAPTER_CONFIG):
        if not (folder / f).is_file():
            raise FileNotFoundError(f"LoRA folder {folder} lacks {f} (expected peft's adapter layout: "
                                    f"{ADAPTER_WEIGHTS} + {ADAPTER_CONFIG})")
    cfg = json.loads((folder / ADAPTER_CONFIG).read_text())
    sd = load_file(str(folder / ADAPTER_WEIGHTS))
    r, alpha = cfg["r"], cfg["lora_alpha"]
    scale = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
    deltas = {}
    for key, a in sd.items():
        if ".lora_A." not in key:
            continue
        b = sd[key.replace(".lora_A.", ".lora_B.")]
        target = key.split(".lora_A.")[0] + ".weight"
        target = target[len("transformer."):] if target.startswith("transformer.") else target
        deltas[target] = scale * (b.float() @ a.float())
    if not deltas:
        raise ValueError(f"no lora_A/lora_B pairs in {folder / ADAPTER_WEIGHTS}")
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
        import contextlib

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

    def parameters(self) -> list[torch.nn.Parameter]:
        return [cur for _, cur in self._pairs()]

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
        from pathlib import Path

        from peft.utils import set_peft_model_state_dict
        from safetensors.torch import load_file

        set_peft_model_state_dict(self.transformer, load_file(str(Path(folder) / ADAPTER_WEIGHTS)),
                                  adapter_name=self.CURRENT)
