"""The SR backbone: a Qwen-Image-Edit-style flow-matching model, from diffusers' public classes.

``QwenImageTransformer2DModel`` + ``AutoencoderKLQwenImage`` + the prompt side.

LR conditioning as in Qwen-Image-Edit: the LR image is upsampled x`scale` (bicubic) to the output
size, VAE-encoded, packed into 2x2 tokens and concatenated with the noisy target tokens on the
sequence axis (``img_shapes`` lists both grids, so RoPE sees two frames); the prediction is sliced
back to the target tokens. The prompt (``model.condition``):

* ``edit`` (production default): per LR input, the Edit-Plus prompt with the image inside the
  Qwen2.5-VL text encoder (:mod:`.text_encoder`); computed once per input (:meth:`SRBackbone.condition`)
  and reused for every timestep and candidate of that input;
* ``text``: one stored text-only embedding for every input (the tiny demo).

A :class:`Condition` carries both halves per sample (LR latents, prompt embeddings).

Latent conventions (as the Qwen-Image pipelines): images in [-1, 1] enter the VAE as a one-frame
video (B, 3, 1, H, W); latents are normalised ``(z - latents_mean) / latents_std``; the VAE
downsamples 8x, the transformer packs 2x2 latent patches, so output sides must be multiples of 16.

Speed options, applied by :func:`load_backbone`: ``model.attention_backend`` (:func:`choose_attention`, logged
once with its reason), ``model.checkpointing`` (:func:`set_checkpointing`: whole blocks or only their attention /
feed-forward sub-modules) and ``model.compile=blocks`` (:func:`compile_blocks`, regional torch.compile).
"""
from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers import AutoencoderKLQwenImage, QwenImageTransformer2DModel
from diffusers.hooks import HookRegistry, ModelHook
from safetensors.torch import load_file, save_file
from torch.utils.checkpoint import checkpoint

from ..config import ConfigError, ModelConfig
from ..errors import MissingFileError, UserError
from .text_encoder import EditPromptEncoder, encode_text_prompt, tiny_edit_encoder
from .vae_fast import single_frame_convs

log = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

# A transformer small enough to train on 2 CPU cores in minutes; the architecture is Qwen-Image's.
TINY_TRANSFORMER = dict(patch_size=2, in_channels=64, out_channels=16, num_layers=2, attention_head_dim=32,
                        num_attention_heads=2, joint_attention_dim=32, axes_dims_rope=(8, 12, 12))
# The tiny VAE downsamples 4x (production: 8x) so that a few hundred CPU steps make a usable autoencoder.
TINY_VAE = dict(base_dim=16, z_dim=16, dim_mult=[1, 2, 2], num_res_blocks=1, attn_scales=[],
                temperal_downsample=[False, True])
TINY_PROMPT_TOKENS = 8
PROMPT_FILE = "prompt_embeds.safetensors"
META_FILE = "oars_fast.json"


def pack_latents(z: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) -> (B, h/2 * w/2, 4C): 2x2 patches as tokens (Qwen-Image's layout)."""
    b, c, h, w = z.shape
    return z.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """(B, h/2 * w/2, 4C) -> (B, C, h, w); the inverse of :func:`pack_latents`."""
    b, _, d = tokens.shape
    c = d // 4
    return tokens.view(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)


@dataclass
class PromptEmbedding:
    embeds: torch.Tensor  # (1, L, joint_attention_dim)
    mask: torch.Tensor  # (1, L), 1 for real tokens

    def save(self, path: Path) -> None:
        save_file({"prompt_embeds": self.embeds.contiguous().cpu(), "prompt_mask": self.mask.contiguous().cpu()},
                  str(path))

    @classmethod
    def load(cls, path: Path) -> PromptEmbedding:
        t = load_file(str(path))
        return cls(t["prompt_embeds"], t["prompt_mask"])


@dataclass
class Condition:
    """What the transformer is conditioned on, per sample (rows index, repeat and concatenate together)."""

    latents: torch.Tensor  # (B, C, h, w) LR latents (upsampled x scale, VAE-encoded)
    prompt: torch.Tensor | None = None  # (B, L, D) per-input prompt embeddings (edit); None: the fixed prompt
    prompt_mask: torch.Tensor | None = None  # (B, L)

    def __len__(self) -> int:
        return self.latents.shape[0]

    def _map(self, fn) -> Condition:
        return Condition(fn(self.latents), *(fn(t) if t is not None else None for t in (self.prompt, self.prompt_mask)))

    def __getitem__(self, idx) -> Condition:
        return self._map(lambda t: t[idx])

    def repeat_interleave(self, k: int) -> Condition:
        return self._map(lambda t: t.repeat_interleave(k, 0))

    def to(self, device) -> Condition:
        return self._map(lambda t: t.to(device))

    @staticmethod
    def cat(parts: list[Condition]) -> Condition:
        def cat(name):
            items = [getattr(p, name) for p in parts]
            return None if items[0] is None else torch.cat(items)

        return Condition(cat("latents"), cat("prompt"), cat("prompt_mask"))


class SRBackbone(nn.Module):
    """Transformer + VAE + prompt side: ``condition(lr)``, ``velocity(x_t, t, cond)`` and the latent/image
    conversions. `prompt`: the fixed text embedding (``condition=text``); `prompt_encoder`: the edit
    encoder (``condition=edit``); `negative`: the fixed negative embedding for true CFG (text mode)."""

    attention_backend = "sdpa"  # set by load_backbone (model.attention_backend): sdpa | cudnn | flash | sage

    def __init__(self, transformer: nn.Module, vae: nn.Module, prompt: PromptEmbedding | None, scale: int = 4,
                 prompt_encoder: EditPromptEncoder | None = None, instruction: str = "",
                 negative: PromptEmbedding | None = None):
        super().__init__()
        if prompt is None and prompt_encoder is None:
            raise ValueError("SRBackbone needs a prompt embedding (condition=text) or a prompt encoder (edit)")
        self.transformer = transformer
        self.vae = vae
        self.scale = scale
        self.prompt_encoder = prompt_encoder
        self.instruction = instruction
        self.register_buffer("prompt_embeds", prompt.embeds if prompt else None, persistent=False)
        self.register_buffer("prompt_mask", prompt.mask if prompt else None, persistent=False)
        self.register_buffer("negative_embeds", negative.embeds if negative else None, persistent=False)
        self.register_buffer("negative_mask", negative.mask if negative else None, persistent=False)
        self.vae.requires_grad_(False)
        zc = vae.config.z_dim
        self.register_buffer("latents_mean", torch.tensor(vae.config.latents_mean).view(1, zc, 1, 1), persistent=False)
        self.register_buffer("latents_std", torch.tensor(vae.config.latents_std).view(1, zc, 1, 1), persistent=False)

    # -- prompt-encoder offload (model.text_encoder_offload) ----------------------------------------
    def offload_prompt_encoder(self) -> None:
        """Keep the prompt encoder's weights in host memory (pinned when CUDA is present) from now on; each
        ``condition`` call puts device copies in their place and restores the host tensors afterwards."""
        if self.prompt_encoder is None:
            return
        pin = torch.cuda.is_available()
        self._offload_slots = []  # (the module's _parameters or _buffers dict, name, host tensor)
        seen: dict[int, torch.Tensor] = {}
        for mod in self.prompt_encoder.modules():
            for slots in (mod._parameters, mod._buffers):
                for name, t in slots.items():
                    if t is None:
                        continue
                    if id(t) not in seen:  # tied weights: one host copy
                        host = t.detach().cpu()
                        host = host.pin_memory() if pin else host
                        seen[id(t)] = nn.Parameter(host, requires_grad=False) if isinstance(t, nn.Parameter) else host
                    slots[name] = seen[id(t)]
                    self._offload_slots.append((slots, name, seen[id(t)]))

    @contextlib.contextmanager
    def prompt_encoder_on(self, device: torch.device):
        """While the block runs, the offloaded prompt encoder's weights are device copies; afterwards the host
        tensors are back in place and the copies are freed (nothing is copied back: the weights are frozen). A
        no-op without offload, on the CPU, or inside another such block (e.g. inference holds it for a whole
        image, across its tile batches and CFG's two conditions)."""
        slots = getattr(self, "_offload_slots", None)
        if not slots or torch.device(device).type == "cpu" or getattr(self, "_encoder_on_device", False):
            yield
            return
        self._encoder_on_device = True
        moved: dict[int, torch.Tensor] = {}
        try:
            for d, name, host in slots:
                if id(host) not in moved:
                    dev = host.detach().to(device, non_blocking=True)
                    moved[id(host)] = nn.Parameter(dev, requires_grad=False) if isinstance(host, nn.Parameter) else dev
                d[name] = moved[id(host)]
            yield
        finally:
            for d, name, host in slots:
                d[name] = host
            self._encoder_on_device = False

    # -- geometry ---------------------------------------------------------------------------------
    @property
    def vae_factor(self) -> int:
        return 2 ** len(self.vae.config.temperal_downsample)

    @property
    def multiple(self) -> int:
        """Output sides must be multiples of this (VAE factor x patch size)."""
        return self.vae_factor * self.transformer.config.patch_size

    @property
    def latent_channels(self) -> int:
        return self.vae.config.z_dim

    def latent_shape(self, hr_h: int, hr_w: int) -> tuple[int, int, int]:
        if hr_h % self.multiple or hr_w % self.multiple:
            raise ValueError(f"output size {hr_h}x{hr_w} must be a multiple of {self.multiple}")
        return self.latent_channels, hr_h // self.vae_factor, hr_w // self.vae_factor

    # -- VAE ----------------------------------------------------------------------------------------
    def encode(self, img: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> normalised latents (B, C, H/8, W/8), float32 (posterior mode)."""
        vdtype = next(self.vae.parameters()).dtype
        x = (img.to(vdtype) * 2 - 1).unsqueeze(2)
        with single_frame_convs(self.vae):  # exact: one frame, so each causal 3-D conv is a 2-D conv
            z = self.vae.encode(x).latent_dist.mode()[:, :, 0].float()
        return (z - self.latents_mean) / self.latents_std

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Normalised latents (B, C, h, w) -> images (B, 3, 8h, 8w) in [0, 1], float32."""
        vdtype = next(self.vae.parameters()).dtype
        z = (z.float() * self.latents_std + self.latents_mean).to(vdtype).unsqueeze(2)
        with single_frame_convs(self.vae):
            return (self.vae.decode(z).sample[:, :, 0].float() + 1).mul(0.5).clamp(0, 1)

    def upsample_lr(self, lr: torch.Tensor) -> torch.Tensor:
        return F.interpolate(lr.float(), scale_factor=self.scale, mode="bicubic", align_corners=False).clamp(0, 1)

    def encode_lr(self, lr: torch.Tensor) -> torch.Tensor:
        """The conditioning latents: LR upsampled x scale (bicubic), then VAE-encoded."""
        return self.encode(self.upsample_lr(lr))

    @property
    def condition_kind(self) -> str:
        return "edit" if self.prompt_encoder is not None else "text"

    @torch.no_grad()
    def condition(self, lr: torch.Tensor, negative: bool = False) -> Condition:
        """Everything the transformer needs about LR inputs (B, 3, h, w), computed once per input: the LR
        latents and (edit) the prompt with the image inside the text encoder. `negative`: the negative
        prompt's (true CFG)."""
        latents = self.encode_lr(lr)
        if self.prompt_encoder is not None:
            with self.prompt_encoder_on(lr.device):
                return Condition(latents, *self.prompt_encoder(lr, " " if negative else self.instruction))
        if negative:
            if self.negative_embeds is None:
                raise UserError("sampler.cfg_scale > 1 needs a negative prompt: model.condition=edit, or a model "
                                "folder whose prompt file holds negative_embeds")
            b = lr.shape[0]
            return Condition(latents, self.negative_embeds.expand(b, -1, -1), self.negative_mask.expand(b, -1))
        return Condition(latents)

    # -- transformer --------------------------------------------------------------------------------
    def velocity(self, x_t: torch.Tensor, t: torch.Tensor, cond: Condition | torch.Tensor) -> torch.Tensor:
        """Predicted velocity (eps - x0) for noisy latents `x_t` at times `t` (B,) given `cond` (a
        :class:`Condition`, or LR latents alone with the fixed text prompt).

        Shapes: x_t and the LR latents (B, C, h, w) with h, w even; returns (B, C, h, w) in the
        transformer's dtype.
        """
        cond = cond if isinstance(cond, Condition) else Condition(cond)
        b, _, h, w = x_t.shape
        tdtype = self.transformer.dtype
        target = pack_latents(x_t.to(tdtype))
        tokens = torch.cat([target, pack_latents(cond.latents.to(tdtype))], dim=1)
        grid = (1, h // 2, w // 2)
        if cond.prompt is not None:
            embeds, mask = cond.prompt, cond.prompt_mask
        elif self.prompt_embeds is not None:
            embeds, mask = self.prompt_embeds.expand(b, -1, -1), self.prompt_mask.expand(b, -1)
        else:
            raise ValueError("condition=edit: velocity needs a Condition with the prompt (SRBackbone.condition(lr))")
        if mask is not None and bool(mask.all()):
            mask = None  # no padding: the same result, and attention kernels without mask support can run
        elif mask is not None and self.attention_backend == "flash":
            raise UserError("model.attention_backend=flash: flash-attn 2 takes no attention mask and these prompts "
                            "are padded (different lengths in one batch): use sdpa or cudnn")
        out = self.transformer(
            hidden_states=tokens,
            encoder_hidden_states=embeds.to(tdtype),
            encoder_hidden_states_mask=mask,
            timestep=t.to(tdtype).expand(b) if t.numel() == 1 else t.to(tdtype),
            img_shapes=[[grid, grid]] * b,
            return_dict=False,
        )[0]
        return unpack_latents(out[:, : target.shape[1]], h, w)

    # -- persistence --------------------------------------------------------------------------------
    def save_pretrained(self, path: str | Path, transformer: nn.Module | None = None) -> None:
        """A diffusers-style folder: transformer/, vae/, oars_fast.json, the prompt side: prompt_embeds.safetensors
        (text) and the edit encoder (text_encoder/, tokenizer/, processor/ for one built here; for one loaded
        from a checkpoint, a reference to it in oars_fast.json, so the 7B encoder is not copied).
        `transformer`: save this one instead of ``self.transformer`` (same config)."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        (transformer or self.transformer).save_pretrained(path / "transformer")
        self.vae.save_pretrained(path / "vae")
        meta = {"scale": self.scale, "condition": self.condition_kind}
        if self.prompt_embeds is not None:
            PromptEmbedding(self.prompt_embeds, self.prompt_mask).save(path / PROMPT_FILE)
        if self.prompt_encoder is not None:
            if self.prompt_encoder.source is None:
                self.prompt_encoder.save_pretrained(path)
            else:
                meta["text_encoder"] = self.prompt_encoder.source
        (path / META_FILE).write_text(json.dumps(meta))


# model.attention_backend -> diffusers' attention backend name
_DIFFUSERS_ATTENTION = {"sdpa": "native", "cudnn": "_native_cudnn", "flash": "flash", "sage": "sage"}


def _flash_attn_installed() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


def choose_attention(choice: str, device: torch.device | str, dtype: str) -> tuple[str, str]:
    """``model.attention_backend`` -> (backend: sdpa | cudnn | flash | sage, the reason). auto: cuDNN SDPA on
    Hopper or newer with bf16/fp16 (PyTorch 2.5's release notes report it well ahead of flash-attn 2 on H100; not
    measured here), else flash-attn 2 when installed (CUDA, bf16/fp16), else PyTorch SDPA. An explicit choice that
    cannot run on `device` / `dtype` raises a :class:`ConfigError` saying why."""
    cuda = torch.device(device).type == "cuda"
    half = dtype in ("bf16", "fp16")
    if choice == "native":
        choice = "sdpa"
    if choice == "auto":
        if not cuda:
            return "sdpa", f"auto: no CUDA device ({torch.device(device).type}): PyTorch SDPA"
        if not half:
            return "sdpa", f"auto: model.dtype={dtype}: cuDNN and flash-attn need bf16/fp16, PyTorch SDPA"
        major, minor = torch.cuda.get_device_capability(torch.device(device))
        if major >= 9 and torch.backends.cudnn.is_available():
            return "cudnn", f"auto: sm_{major}{minor} (Hopper or newer) with {dtype}: cuDNN SDPA"
        if _flash_attn_installed():
            return "flash", f"auto: sm_{major}{minor}, flash-attn installed, {dtype}: flash-attn 2"
        return "sdpa", f"auto: sm_{major}{minor} without flash-attn: PyTorch SDPA (it picks its own kernel)"
    if choice == "sdpa":
        return "sdpa", "model.attention_backend=sdpa: PyTorch SDPA (it picks its own kernel)"
    needs = {"cudnn": "cuDNN attention", "flash": "the flash-attn package", "sage": "the sageattention package"}[choice]
    if not cuda:
        raise ConfigError(f"model.attention_backend={choice} needs a CUDA device ({needs}); this run is on "
                          f"{torch.device(device).type}: use sdpa or auto")
    if choice in ("cudnn", "flash") and not half:
        raise ConfigError(f"model.attention_backend={choice} needs model.dtype bf16 or fp16, not {dtype}: use sdpa")
    if choice == "cudnn" and not torch.backends.cudnn.is_available():
        raise ConfigError("model.attention_backend=cudnn: this PyTorch build has no cuDNN: use sdpa")
    if choice == "flash" and not _flash_attn_installed():
        raise ConfigError("model.attention_backend=flash: the flash-attn package is not installed (pip install "
                          "flash-attn): use sdpa, cudnn or auto")
    return choice, f"model.attention_backend={choice}"


def _set_attention_backend(model: SRBackbone, choice: str, device, dtype: str) -> None:
    backend, reason = choose_attention(choice, device, dtype)
    if backend != "sdpa":
        try:
            model.transformer.set_attention_backend(_DIFFUSERS_ATTENTION[backend])
        except (RuntimeError, ValueError) as e:  # diffusers' own requirement checks (package versions)
            raise ConfigError(f"model.attention_backend={choice}: {str(e).splitlines()[0]}") from None
    model.attention_backend = backend
    log.info("attention backend: %s (%s)", backend, reason)


class _Recompute(ModelHook):
    """A diffusers model hook: the module's forward runs under non-reentrant ``torch.utils.checkpoint`` when
    gradients are on (its activations are dropped after the forward and recomputed in backward)."""

    NAME = "oars_fast_checkpoint"

    def new_forward(self, module: nn.Module, *args, **kwargs):
        if not torch.is_grad_enabled():
            return self.fn_ref.original_forward(*args, **kwargs)
        return checkpoint(self.fn_ref.original_forward, *args, use_reentrant=False, **kwargs)


# model.checkpointing -> the sub-modules of each transformer block whose forward is recomputed
_SELECTIVE = {"attention": ("attn",), "mlp": ("img_mlp", "txt_mlp")}


def set_checkpointing(transformer: nn.Module, mode: str) -> int:
    """Activation checkpointing (``model.checkpointing``): full = each whole block (diffusers' gradient
    checkpointing); attention / mlp = only that sub-module of each block (through diffusers' hook registry,
    so module names and state-dict keys stay as they are). Returns the number of checkpointed modules."""
    if mode == "none":
        return 0
    if mode == "full":
        transformer.enable_gradient_checkpointing()
        log.info("model.checkpointing=full: %d blocks recomputed in backward", len(transformer.transformer_blocks))
        return len(transformer.transformer_blocks)
    n = 0
    for block in transformer.transformer_blocks:
        for name in _SELECTIVE[mode]:
            HookRegistry.check_if_exists_or_initialize(getattr(block, name)).register_hook(_Recompute(),
                                                                                            _Recompute.NAME)
            n += 1
    log.info("model.checkpointing=%s: %d sub-modules recomputed in backward", mode, n)
    return n


def compile_blocks(transformer: nn.Module) -> int:
    """Regional torch.compile (``model.compile=blocks``): each transformer block compiled on its own
    (diffusers' ``compile_repeated_blocks``, i.e. ``block.compile()``); the blocks share one compiled code.
    Compilation is lazy (the first call traces), so LoRA layers injected after this (peft, then
    :func:`~oars_fast.models.lora.use_lora_kernel`) are in the graph; a change after the first call
    recompiles (dynamo's guards). Returns the number of blocks."""
    transformer.compile_repeated_blocks()
    n = len(transformer.transformer_blocks)
    log.info("model.compile=blocks: %d transformer blocks compiled with torch.compile (regional; on first use)", n)
    return n


def build_tiny(cfg: ModelConfig, seed: int = 0, scale: int = 4) -> SRBackbone:
    """A tiny random-weight model of the production architecture (CPU demo and tests); with
    ``condition=edit`` a tiny random Qwen2.5-VL prompt encoder too."""
    torch.manual_seed(seed)
    tcfg = {**TINY_TRANSFORMER, **cfg.tiny}
    transformer = QwenImageTransformer2DModel(**tcfg)
    vae = AutoencoderKLQwenImage(**TINY_VAE)
    g = torch.Generator().manual_seed(seed + 1)
    prompt = PromptEmbedding(torch.randn(1, TINY_PROMPT_TOKENS, tcfg["joint_attention_dim"], generator=g),
                             torch.ones(1, TINY_PROMPT_TOKENS, dtype=torch.long))
    if cfg.condition == "edit":  # auto: text (the tiny demo's)
        encoder = tiny_edit_encoder(tcfg["joint_attention_dim"], seed + 2)
        return SRBackbone(transformer, vae, None, scale, encoder, cfg.prompt)
    return SRBackbone(transformer, vae, prompt, scale)


def load_backbone(cfg: ModelConfig, scale: int = 4, device: torch.device | str = "cpu", seed: int = 0,
                  train_dtype: bool = False, transformer_on_cpu: bool = False) -> SRBackbone:
    """The model of `cfg`: a diffusers checkpoint folder or hub id, or the tiny model.

    `train_dtype=True` keeps the transformer in float32 (master weights; compute runs under
    autocast in `cfg.dtype`); otherwise the transformer is loaded in `cfg.dtype` (so is it when
    DeepSpeed bf16 holds the float32 master copy in its optimizer). The VAE runs in `cfg.dtype`
    except float16 (its activations overflow there; it then runs in float32).
    `transformer_on_cpu=True` leaves the transformer in host memory (ZeRO-3 partitions it and places
    each rank's partition on its device; the whole 20B model never lands on one GPU).
    """
    dtype = DTYPES[cfg.dtype]
    if cfg.pretrained is None:
        model = build_tiny(cfg, seed, scale)
    else:
        src = cfg.pretrained
        local = Path(src).expanduser()
        hub_id = not local.is_absolute() and not src.startswith((".", "~")) and src.count("/") == 1
        if not local.exists() and not hub_id:
            raise MissingFileError(f"model folder {local} does not exist (model.pretrained / infer.checkpoint: a "
                                   f"diffusers folder with transformer/ and vae/, or a hub id like "
                                   f"Qwen/Qwen-Image-Edit-2509)")
        if local.exists() and not (local / "transformer").is_dir():
            raise MissingFileError(f"{local} is not a diffusers checkpoint folder: expected {local}/transformer/ "
                                    f"and {local}/vae/ (as written by save_pretrained or the hub layout)")
        src = str(local) if local.exists() else src
        try:
            transformer = QwenImageTransformer2DModel.from_pretrained(
                src, subfolder="transformer", torch_dtype=torch.float32 if train_dtype else dtype)
            vae = AutoencoderKLQwenImage.from_pretrained(src, subfolder="vae")
        except OSError as e:
            raise MissingFileError(
                f"cannot load the model weights of {src!r}: {str(e).splitlines()[0]} Expected a diffusers folder "
                f"with transformer/ and vae/ (e.g. `huggingface-cli download Qwen/Qwen-Image-Edit-2509 --local-dir "
                f"DIR`, then model.pretrained=DIR).") from None
        meta = json.loads((local / META_FILE).read_text()) if (local / META_FILE).is_file() else {}
        scale = meta.get("scale", scale)
        has_encoder = not local.exists() or (local / "text_encoder").is_dir() or "text_encoder" in meta
        kind = cfg.condition if cfg.condition != "auto" else meta.get("condition", "edit" if has_encoder else "text")
        if kind == "edit":
            source = meta["text_encoder"] if local.exists() and "text_encoder" in meta and \
                not (local / "text_encoder").is_dir() else src
            encoder = EditPromptEncoder.from_pretrained(source, dtype=DTYPES[cfg.dtype])
            model = SRBackbone(transformer, vae, None, scale, encoder, cfg.prompt)
        else:
            model = SRBackbone(transformer, vae, _text_prompt(cfg, src, local, device), scale)
    _set_attention_backend(model, cfg.attention_backend, device, cfg.dtype)
    set_checkpointing(model.transformer, cfg.recompute)
    if cfg.compile == "blocks":
        compile_blocks(model.transformer)
    offload = cfg.text_encoder_offload and model.prompt_encoder is not None  # stays in host memory
    if transformer_on_cpu or offload:
        stay = {"transformer"} if transformer_on_cpu else set()
        for name, child in model.named_children():
            if name not in stay and not (offload and name == "prompt_encoder"):
                child.to(device)
        for name, buf in list(model.named_buffers(recurse=False)):
            setattr(model, name, buf.to(device))
    else:
        model.to(device)
    _cast(model.transformer, torch.float32 if train_dtype else dtype)
    _cast(model.vae, torch.float32 if dtype == torch.float16 else dtype)
    if model.prompt_encoder is not None:
        _cast(model.prompt_encoder, torch.float32 if dtype == torch.float16 else dtype)
    if offload:
        model.offload_prompt_encoder()
    return model


def _text_prompt(cfg: ModelConfig, src: str, local: Path, device) -> PromptEmbedding:
    """The fixed prompt of condition=text: model.prompt_embeds, the folder's stored one, or embedded now."""
    if cfg.prompt_embeds:
        return PromptEmbedding.load(Path(cfg.prompt_embeds).expanduser())
    if local.exists() and (local / PROMPT_FILE).is_file():
        return PromptEmbedding.load(local / PROMPT_FILE)
    return PromptEmbedding(*encode_text_prompt(src, cfg.prompt, torch.device(device)))


def _cast(module: nn.Module, dtype: torch.dtype) -> None:
    if next(module.parameters()).dtype != dtype:
        module.to(dtype)
