"""COMPASS: the process-aware reward model (a Qwen-VL backbone with a small score head) and its RL reward.

Given an LR input and an SR output, COMPASS predicts fidelity F in [0, 1], input quality Q_LR in [1, 5] and
output quality Q_SR in [1, 5]; the reward is ``R = F*Q_LR + F**(Q_LR/gamma) * (Q_SR - Q_LR)``, gamma = 7.

Model (:class:`CompassModel`)
-----------------------------
* Backbone: ``Qwen3VLForConditionalGeneration`` (production: Qwen/Qwen3-VL-8B-Instruct, the paper's QwenVL-8B)
  or ``Qwen2_5_VLForConditionalGeneration``, used through its public API: the inner multimodal model
  (``backbone.model``: vision tower + language model, transformers >= 4.52 layout) returns the last hidden state;
  the LM head is not run. Full-parameter training goes through :meth:`CompassModel.forward`.
* One prompt per pair, assembled by the project (tokenizer + the model's special tokens; every image pad token
  expanded to ``grid.prod() // merge**2`` copies)::

      PREFIX  = "<|im_start|>system ...<|im_end|>\\n<|im_start|>user\\nLow-resolution input: "
                <|vision_start|> LR pads <|vision_end|> "\\nInput quality:"          <- Q_LR read here
      SUFFIX  = "\\nSuper-resolved output: " <|vision_start|> SR pads <|vision_end|>
                "\\nOutput fidelity and quality:<|im_end|>\\n<|im_start|>assistant\\n"  <- F, Q_SR read here

  Each text segment is tokenised on its own, so the prefix's ids never depend on what follows.
* Heads (improvement on one shared hidden->3 MLP: no unused outputs, and Q_LR cannot leak SR information):
  ``lr_head`` (hidden -> head_hidden -> 1) on the last prefix token gives Q_LR; ``pair_head``
  (hidden -> head_hidden -> 2) on the final token gives F and Q_SR. ``F = sigmoid(z)``, ``Q = 1 + 4*sigmoid(z)``.
  Causal attention: the Q_LR token sees only the LR image and the prefix text, so Q_LR is the same for every
  candidate of a group and independent of the SR by construction. Heads are float32 (the hidden state is cast);
  a fresh head (a base VL checkpoint without COMPASS weights) starts with its last layer zeroed: F = 0.5 and
  Q = 3 for every input, the middle of each range.
* Images: resized on the model's device (bicubic, antialiased; aspect kept) into [min_pixels, max_pixels] with
  sides multiples of patch*merge (the rule of Qwen-VL's ``smart_resize``), quantised to 8 bits as an image file
  would be, then rescaled, normalised and patchified in torch exactly as the checkpoint's Qwen-VL image
  processor does (its parameters drive it; tests check equality with the processor). No CPU round trip in RL.

Fast scoring (:meth:`CompassModel.score`)
-----------------------------------------
The prefix (everything up to and including the Q_LR marker) is identical for the K candidates of a group. It is
run ONCE per group (vision tower on the G LR images, language model on the prefix, its keys/values kept in a
``DynamicCache``); the cache rows are then gathered per candidate (``group_index``) and only the suffix (SR image
+ question) is run against them, in chunks of ``batch_size`` candidates that may span groups. Multimodal RoPE:
the suffix's position ids are exactly those of the full sequence, computed by the backbone's own
``get_rope_index`` on the full token sequence and sliced, so prefix-reuse scores equal full-sequence scores
(:meth:`score_full`, the reference; tests: float32 agreement to 1e-5). No text is generated.

Reward (:class:`CompassReward`, the RewardFn of ``oars_fast.rewards.base``) and its mapping to [0, 1]
-------------------------------------------------------------------------------------------------------
With F in [0, 1], q = Q_LR in [1, 5], s = Q_SR in [1, 5], a = q/gamma > 0 (``F**a`` with ``0**a = 0``):

* Maximum. R is increasing in s (its coefficient F**a >= 0), so s = 5. Where a <= 1, F <= F**a, so
  ``R <= F**a*q + F**a*(5 - q) = 5*F**a <= 5``; where a > 1, ``F**a <= F`` and ``R <= 5F <= 5``. F = 1 gives
  R = 5 for every q: **R_max = 5**.
* Minimum. s = 1: ``g(F) = F*q - F**a*(q - 1)``. g(0) = 0, g(1) = 1. Where a >= 1 (q >= gamma), F**a <= F and
  g >= F >= 0. Where a < 1 (q < gamma), g' = q - a*F**(a-1)*(q-1) = 0 at
  ``F* = (a*(q-1)/q)**(1/(1-a)) = ((q-1)/gamma)**(gamma/(gamma-q))``, and using ``F*^a*(q-1) = q*F*/a`` there,
  ``g(F*) = q*F* - q*F*/a = -(gamma - q) * ((q-1)/gamma)**(gamma/(gamma-q))``. Hence
  **R_min = min(0, min over q in [1, min(5, gamma)) of -(gamma-q)*((q-1)/gamma)**(gamma/(gamma-q)))**,
  a one-dimensional minimum computed numerically (:func:`reward_range`); gamma = 7: R_min = -0.450739 at
  Q_LR = 3.243, F = 0.120, Q_SR = 1 (a brute-force grid over (F, Q_LR, Q_SR) agrees; tests check it).
* variant ``full``: ``score = (R - R_min) / (5 - R_min)``.
* variant ``dq_only`` (the paper's "perceptual gain only" ablation): ``R = Q_SR - Q_LR`` in [-4, 4],
  ``score = (R + 4) / 8``.
* variant ``no_fidelity`` (R with F = 1): R = Q_LR + (Q_SR - Q_LR) = Q_SR in [1, 5], ``score = (R - 1) / 4``.

Scores are clamped to [0, 1] (float32); ``parts`` holds f, q_lr, q_sr and r_raw (the variant's raw R).

Checkpoint layout (one folder): the backbone in the hub layout (``config.json``, ``model*.safetensors``, the
tokenizer files, ``preprocessor_config.json``) plus ``compass_head.safetensors`` and ``compass_config.json``
(head size, pixel budget, prompt texts). A base VL checkpoint (no head files) loads with ``require_head=False``
(the start of COMPASS training). Pick the dtype when loading (``from_pretrained(dtype=...)``), not with
``.to(dtype)``, which would also cast the rotary ``inv_freq`` buffers that transformers keeps in float32. Obtain the
base: ``huggingface-cli download Qwen/Qwen3-VL-8B-Instruct
--local-dir <dir>``.
"""
from __future__ import annotations

import inspect
import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import MissingFileError, UserError
from ..kernels import compass_reward

PRODUCTION_CHECKPOINT = "Qwen/Qwen3-VL-8B-Instruct"
HEAD_FILE = "compass_head.safetensors"
CONFIG_FILE = "compass_config.json"
FORMAT_VERSION = 1
VARIANTS = ("full", "dq_only", "no_fidelity")
Q_MIN, Q_MAX = 1.0, 5.0

PREFIX = ("<|im_start|>system\nYou are COMPASS, a judge of image super-resolution. You rate the quality of a "
          "low-resolution input, the quality of its super-resolved output, and how faithful the output is to the "
          "input.<|im_end|>\n<|im_start|>user\nLow-resolution input: ")
LR_MARKER = "\nInput quality:"
MIDDLE = "\nSuper-resolved output: "
FINAL = "\nOutput fidelity and quality:<|im_end|>\n<|im_start|>assistant\n"
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|image_pad|>", "<|video_pad|>"]

# transformers class name per config model_type
_BACKBONES = {"qwen3_vl": "Qwen3VLForConditionalGeneration", "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration"}


@dataclass
class CompassConfig:
    """What a COMPASS checkpoint needs besides the backbone (``compass_config.json``)."""

    head_hidden: int = 1024  # hidden width of each score head's MLP
    min_pixels: int = 256 * 256  # image pixel budget (Qwen3-VL's processor minimum); the LR is upscaled to it
    max_pixels: int = 512 * 512  # larger images are downscaled (aspect kept)
    prefix: str = PREFIX
    lr_marker: str = LR_MARKER
    middle: str = MIDDLE
    final: str = FINAL

    @classmethod
    def from_dict(cls, d: dict) -> CompassConfig:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def fit_size(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """(h, w): sides multiples of `factor`, area within [min_pixels, max_pixels], aspect kept as closely as possible
    (the rule of Qwen-VL's ``smart_resize``: round; if too large scale down and floor; if too small scale up and
    ceil)."""
    if max(height, width) / min(height, width) > 200:
        raise UserError(f"COMPASS: image of {height}x{width} has an aspect ratio above 200")
    h, w = round(height / factor) * factor, round(width / factor) * factor
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * beta / factor) * factor
        w = math.ceil(width * beta / factor) * factor
    return h, w


def reward_range(variant: str = "full", gamma: float = 7.0) -> tuple[float, float]:
    """(lo, hi) of the raw reward of `variant` over F in [0, 1], Q_LR and Q_SR in [1, 5] (derivation in the module
    docstring)."""
    if variant == "dq_only":
        return Q_MIN - Q_MAX, Q_MAX - Q_MIN
    if variant == "no_fidelity":
        return Q_MIN, Q_MAX
    if variant != "full":
        raise UserError(f"COMPASS reward variant {variant!r} is not one of {', '.join(VARIANTS)}")
    if gamma <= 0:
        raise UserError(f"COMPASS gamma={gamma} must be > 0")

    def r_min(q: float) -> float:  # min over F of R(F, q, s=1), for 1 <= q < gamma
        return -(gamma - q) * ((q - 1) / gamma) ** (gamma / (gamma - q))

    top = min(Q_MAX, gamma)  # q = gamma itself is excluded (the minimum there is 0, at F = 0)
    if top <= Q_MIN:
        return 0.0, Q_MAX
    n = 4000
    qs = [Q_MIN + (top - Q_MIN) * i / n for i in range(n + (top < gamma))]
    i = min(range(len(qs)), key=lambda j: r_min(qs[j]))
    lo, hi = qs[max(i - 1, 0)], qs[min(i + 1, len(qs) - 1)]
    for _ in range(100):  # golden-section refinement around the grid minimum (unimodal there)
        m1, m2 = lo + (hi - lo) * 0.381966, hi - (hi - lo) * 0.381966
        if r_min(m1) < r_min(m2):
            hi = m2
        else:
            lo = m1
    return min(0.0, r_min((lo + hi) / 2), r_min(qs[i])), Q_MAX


def _transformers():
    # transformers' VL model classes are heavy: imported only when a COMPASS model is built or loaded
    import transformers

    return transformers


def _image_processor_class():
    """Qwen2-VL's image processor (Qwen3-VL checkpoints use it too, with patch 16): the PIL-backed class where
    transformers has one (the default class wants torchvision, which this project does not depend on)."""
    t = _transformers()
    return getattr(t, "Qwen2VLImageProcessorPil", None) or t.Qwen2VLImageProcessor


def _mlp(width: int, hidden: int, out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, out))


def _scalar(v, n: int = 3) -> list[float]:
    return [float(x) for x in v] if isinstance(v, (list, tuple)) else [float(v)] * n


class CompassModel(nn.Module):
    """Qwen-VL backbone + score heads: (LR, SR) -> F in [0, 1], Q_LR and Q_SR in [1, 5].

    ``forward(lr, sr)`` (training, with gradients), ``score(lr, sr, group_index)`` (RL: the LR prefix once per
    group, no gradients), ``score_full(...)`` (each pair as one full sequence: the reference)."""

    def __init__(self, backbone: nn.Module, tokenizer, image_processor, config: CompassConfig | None = None,
                 source: str | None = None):
        super().__init__()
        self.config = config or CompassConfig()
        self.source = source
        inner = getattr(backbone, "model", None)
        if inner is None or not hasattr(inner, "visual") or not hasattr(inner, "language_model"):
            raise UserError("COMPASS needs a Qwen-VL model with the transformers >= 4.52 layout (backbone.model with "
                            "visual and language_model; Qwen3-VL needs transformers >= 4.57), got "
                            f"{type(backbone).__name__}")
        self.backbone = backbone
        self.tokenizer, self.image_processor = tokenizer, image_processor
        cfg = backbone.config
        self.image_token_id = int(cfg.image_token_id)
        self.vision_start_id, self.vision_end_id = int(cfg.vision_start_token_id), int(cfg.vision_end_token_id)
        # the image processor's parameters drive the torch preprocessing; they must match the vision tower
        ip = image_processor
        self.patch, self.merge = int(ip.patch_size), int(ip.merge_size)
        self.temporal = int(ip.temporal_patch_size)
        vis = cfg.vision_config
        if (self.patch, self.merge, self.temporal) != (vis.patch_size, vis.spatial_merge_size, vis.temporal_patch_size):
            raise UserError(f"COMPASS: the image processor (patch {self.patch}, merge {self.merge}, temporal "
                            f"{self.temporal}) does not match the vision tower (patch {vis.patch_size}, merge "
                            f"{vis.spatial_merge_size}, temporal {vis.temporal_patch_size})")
        self.rescale = float(getattr(ip, "rescale_factor", 1 / 255))
        self.register_buffer("pixel_mean", torch.tensor(_scalar(ip.image_mean)).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(_scalar(ip.image_std)).view(1, 3, 1, 1), persistent=False)
        c = self.config
        self.segments = {name: self._tokens(getattr(c, name)) for name in ("prefix", "lr_marker", "middle", "final")}
        width = self.hidden_size
        self.lr_head = _mlp(width, c.head_hidden, 1).float()  # Q_LR at the LR marker
        self.pair_head = _mlp(width, c.head_hidden, 2).float()  # F, Q_SR at the final token
        inner_forward = inspect.signature(type(inner).forward).parameters
        self._cache_kw = "cache" if "cache" in inner_forward else "past_key_values"  # renamed in transformers 5
        self._rope_takes_types = "mm_token_type_ids" in inspect.signature(inner.get_rope_index).parameters
        self._positions_memo: dict = {}

    # -- small helpers ------------------------------------------------------------------------------------------
    @property
    def hidden_size(self) -> int:
        cfg = self.backbone.config
        return getattr(cfg, "text_config", cfg).hidden_size

    @property
    def device(self) -> torch.device:
        return next(self.backbone.parameters()).device

    def _tokens(self, text: str) -> list[int]:
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if not ids:
            raise UserError(f"COMPASS: the prompt segment {text!r} tokenises to nothing")
        return list(ids)

    def zero_head_outputs(self) -> None:
        """Zero the last layer of both heads: F = 0.5, Q = 3 for every input (the start of training)."""
        for head in (self.lr_head, self.pair_head):
            nn.init.zeros_(head[-1].weight)
            nn.init.zeros_(head[-1].bias)

    # -- images -------------------------------------------------------------------------------------------------
    def image_size(self, height: int, width: int) -> tuple[int, int]:
        """The (h, w) an image of height x width is resized to."""
        c = self.config
        return fit_size(height, width, self.patch * self.merge, c.min_pixels, c.max_pixels)

    def pixels(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images (N, 3, h, w) in [0, 1] -> (pixel_values (N*gh*gw, 3*T*p*p) float32, image_grid_thw (N, 3) long),
        on the model's device: resized to the pixel budget, quantised to 8 bits, rescaled, normalised and
        patchified in the layout of the Qwen-VL image processor (per image: patches ordered by merge window, each
        patch channel-major, the frame repeated `temporal` times)."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise UserError(f"COMPASS: images must be (N, 3, H, W), got {tuple(images.shape)}")
        x = images.detach().to(self.device, torch.float32).clamp(0, 1)
        n = x.shape[0]
        h, w = self.image_size(x.shape[-2], x.shape[-1])
        if (h, w) != tuple(x.shape[-2:]):
            x = F.interpolate(x, size=(h, w), mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
        # an 8-bit image, rescaled and normalised as the processor does: (v * rescale - mean) / std, in one pass
        x = torch.addcmul(-self.pixel_mean / self.pixel_std, (x * 255).round_(), self.rescale / self.pixel_std)
        p, m, t = self.patch, self.merge, self.temporal
        gh, gw = h // p, w // p
        x = x.view(n, 3, gh // m, m, p, gw // m, m, p).permute(0, 2, 5, 3, 6, 1, 4, 7)  # (n, gh/m, gw/m, m, m, 3, p, p)
        x = x.unsqueeze(-3).expand(*x.shape[:6], t, p, p)
        pv = x.reshape(n * gh * gw, 3 * t * p * p)
        grid = torch.tensor([[1, gh, gw]], dtype=torch.long, device=self.device).repeat(n, 1)
        return pv, grid

    def _image_tokens(self, grid: torch.Tensor) -> int:
        return int(grid[0].prod()) // self.merge**2

    # -- tokens and positions -----------------------------------------------------------------------------------
    def _layout(self, n_lr: int, n_sr: int) -> tuple[list[int], list[int]]:
        """Token ids of the prefix (up to and including the Q_LR marker) and of the suffix."""
        s = self.segments
        pre = s["prefix"] + [self.vision_start_id] + [self.image_token_id] * n_lr + [self.vision_end_id] \
            + s["lr_marker"]
        suf = s["middle"] + [self.vision_start_id] + [self.image_token_id] * n_sr + [self.vision_end_id] + s["final"]
        return pre, suf

    def _positions(self, ids: list[int], grid_lr: torch.Tensor, grid_sr: torch.Tensor) -> torch.Tensor:
        """Multimodal RoPE position ids (3, 1, L) of one full sequence, from the backbone's own get_rope_index."""
        key = (len(ids), tuple(grid_lr.tolist()), tuple(grid_sr.tolist()), str(self.device))
        if key not in self._positions_memo:
            dev = self.device
            t = torch.tensor([ids], dtype=torch.long, device=dev)
            kw = dict(input_ids=t, image_grid_thw=torch.stack([grid_lr, grid_sr]).to(dev),
                      attention_mask=torch.ones_like(t))
            if self._rope_takes_types:  # transformers 5: the token types (0 text, 1 image) drive it
                kw["mm_token_type_ids"] = (t == self.image_token_id).int()
            pos, _ = self.backbone.model.get_rope_index(**kw)
            self._positions_memo[key] = pos
        return self._positions_memo[key]

    # -- the backbone -------------------------------------------------------------------------------------------
    def _run(self, ids: list[int], n: int, pixel_values: torch.Tensor, grid: torch.Tensor, positions: torch.Tensor,
             cache=None) -> torch.Tensor:
        """Last hidden state (n, L, D) of n copies of `ids` (their images in pixel_values/grid), after `cache`
        (whose keys/values precede them) when given."""
        dev = self.device
        input_ids = torch.tensor([ids], dtype=torch.long, device=dev).expand(n, -1)
        past = _cache_length(cache)
        mask = torch.ones(n, past + len(ids), dtype=torch.long, device=dev)
        out = self.backbone.model(input_ids=input_ids, attention_mask=mask, position_ids=positions.expand(3, n, -1),
                                  pixel_values=pixel_values, image_grid_thw=grid, use_cache=cache is not None,
                                  **{self._cache_kw: cache})
        return out.last_hidden_state

    def _q_lr(self, h: torch.Tensor) -> torch.Tensor:
        z = self.lr_head(h.to(self.lr_head[0].weight.dtype))[:, 0].float()
        return Q_MIN + (Q_MAX - Q_MIN) * torch.sigmoid(z)

    def _f_q_sr(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = self.pair_head(h.to(self.pair_head[0].weight.dtype)).float()
        return torch.sigmoid(z[:, 0]), Q_MIN + (Q_MAX - Q_MIN) * torch.sigmoid(z[:, 1])

    # -- training forward ---------------------------------------------------------------------------------------
    def forward(self, lr: torch.Tensor, sr: torch.Tensor) -> dict[str, torch.Tensor]:
        """lr (B, 3, h, w), sr (B, 3, H, W) in [0, 1] -> {f, q_lr, q_sr}, each (B,) float32, differentiable in the
        backbone and heads (one full sequence per pair)."""
        if lr.shape[0] != sr.shape[0]:
            raise UserError(f"COMPASS.forward: {lr.shape[0]} LR images but {sr.shape[0]} SR images")
        b = lr.shape[0]
        pv_lr, g_lr = self.pixels(lr)
        pv_sr, g_sr = self.pixels(sr)
        pre, suf = self._layout(self._image_tokens(g_lr), self._image_tokens(g_sr))
        # images in sequence order: LR_0, SR_0, LR_1, SR_1, ...
        pv = torch.cat([pv_lr.view(b, -1, pv_lr.shape[-1]), pv_sr.view(b, -1, pv_sr.shape[-1])], 1)
        grid = torch.stack([g_lr, g_sr], 1).reshape(2 * b, 3)
        pos = self._positions(pre + suf, g_lr[0], g_sr[0])
        h = self._run(pre + suf, b, pv.view(-1, pv.shape[-1]), grid, pos)
        f, q_sr = self._f_q_sr(h[:, -1])
        return {"f": f, "q_lr": self._q_lr(h[:, len(pre) - 1]), "q_sr": q_sr}

    # -- scoring ------------------------------------------------------------------------------------------------
    def _check_groups(self, lr: torch.Tensor, sr: torch.Tensor, group_index: torch.Tensor) -> torch.Tensor:
        gi = torch.as_tensor(group_index, dtype=torch.long).to(self.device)
        if gi.shape != (sr.shape[0],):
            raise UserError(f"COMPASS.score: group_index must be ({sr.shape[0]},), got {tuple(gi.shape)}")
        if gi.numel() and (int(gi.min()) < 0 or int(gi.max()) >= lr.shape[0]):
            raise UserError(f"COMPASS.score: group_index must lie in [0, {lr.shape[0]})")
        return gi

    @torch.no_grad()
    def score(self, lr: torch.Tensor, sr: torch.Tensor, group_index: torch.Tensor,
              batch_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """lr (G, 3, h, w) one input per group, sr (B, 3, H, W), group_index (B,) -> (F, Q_LR, Q_SR), each (B,)
        float32 on the model's device. The prefix runs once per group; the suffix in chunks of `batch_size`
        candidates (all at once when None) against the gathered prefix keys/values."""
        gi = self._check_groups(lr, sr, group_index)
        g, b = lr.shape[0], sr.shape[0]
        bs = batch_size or max(g, b, 1)
        pv_lr, g_lr = self.pixels(lr)
        pv_sr, g_sr = self.pixels(sr)
        n_lr, n_sr = self._image_tokens(g_lr), self._image_tokens(g_sr)
        pre, suf = self._layout(n_lr, n_sr)
        pos = self._positions(pre + suf, g_lr[0], g_sr[0])
        cut = len(pre)
        pv_lr, pv_sr = pv_lr.view(g, -1, pv_lr.shape[-1]), pv_sr.view(b, -1, pv_sr.shape[-1])
        # 1. the prefix, once per group: Q_LR and the keys/values of every layer
        q_lr, chunks = [], []
        for i in range(0, g, bs):
            n = min(bs, g - i)
            cache = _new_cache()
            h = self._run(pre, n, pv_lr[i:i + n].flatten(0, 1), g_lr[i:i + n], pos[..., :cut], cache=cache)
            q_lr.append(self._q_lr(h[:, -1]))
            chunks.append(_cache_tensors(cache))
        q_lr = torch.cat(q_lr)
        kv = [tuple(torch.cat(t) for t in zip(*layer)) for layer in zip(*chunks)]  # per layer: (keys, values) (G, ...)
        # 2. the suffix of every candidate against its group's prefix
        fs, qs = [], []
        for i in range(0, b, bs):
            n = min(bs, b - i)
            rows = gi[i:i + n]
            cache = _new_cache([(k[rows], v[rows]) for k, v in kv])
            h = self._run(suf, n, pv_sr[i:i + n].flatten(0, 1), g_sr[i:i + n], pos[..., cut:], cache=cache)
            f, q = self._f_q_sr(h[:, -1])
            fs.append(f)
            qs.append(q)
        return torch.cat(fs), q_lr[gi], torch.cat(qs)

    @torch.no_grad()
    def score_full(self, lr: torch.Tensor, sr: torch.Tensor, group_index: torch.Tensor,
                   batch_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """As :meth:`score`, each pair run as one full sequence (the reference for prefix reuse)."""
        gi = self._check_groups(lr, sr, group_index)
        b = sr.shape[0]
        bs = batch_size or max(b, 1)
        out = [self.forward(lr.to(self.device)[gi[i:i + bs]], sr[i:i + bs]) for i in range(0, b, bs)]
        return tuple(torch.cat([o[k] for o in out]) for k in ("f", "q_lr", "q_sr"))

    # -- persistence --------------------------------------------------------------------------------------------
    def save_pretrained(self, folder: str | Path) -> None:
        """The backbone in the hub layout (config, weights, tokenizer, preprocessor config) plus the head weights
        (compass_head.safetensors) and compass_config.json, in one folder."""
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.backbone.save_pretrained(folder)
        self.tokenizer.save_pretrained(folder)
        self.image_processor.save_pretrained(folder)
        heads = {f"lr_head.{k}": v for k, v in self.lr_head.state_dict().items()}
        heads.update({f"pair_head.{k}": v for k, v in self.pair_head.state_dict().items()})
        tmp = folder / (HEAD_FILE + ".tmp")
        save_file({k: v.detach().float().contiguous().cpu() for k, v in heads.items()}, str(tmp))
        tmp.replace(folder / HEAD_FILE)
        meta = {"format": FORMAT_VERSION, "backbone": type(self.backbone).__name__, **asdict(self.config)}
        (folder / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")

    @classmethod
    def from_pretrained(cls, src: str | Path, dtype: torch.dtype = torch.float32, require_head: bool = True,
                        config: CompassConfig | None = None) -> CompassModel:
        """A COMPASS checkpoint folder (or, with ``require_head=False``, a base Qwen-VL checkpoint: folder or hub id,
        whose heads start zeroed). `config` overrides the pixel budget etc. of a base checkpoint."""
        t = _transformers()
        src = str(src)
        folder = Path(src).expanduser()
        how = (f"Expected a folder with config.json, the model weights, the tokenizer files and "
               f"preprocessor_config.json (+ {HEAD_FILE} and {CONFIG_FILE} for a trained COMPASS). Obtain the base "
               f"model with `huggingface-cli download {PRODUCTION_CHECKPOINT} --local-dir <dir>` and train COMPASS "
               f"on it (oars-fast compass-sft); a trained COMPASS folder is what reward.name=compass needs.")
        if folder.exists() and not (folder / "config.json").is_file():
            raise MissingFileError(f"COMPASS checkpoint {folder} has no config.json. {how}")
        if not folder.exists() and (require_head or src.startswith((".", "/", "~")) or src.count("/") != 1):
            raise MissingFileError(f"COMPASS checkpoint {folder} not found. {how}")
        if require_head and not (folder / HEAD_FILE).is_file():
            raise MissingFileError(f"COMPASS checkpoint {folder} has no {HEAD_FILE}: it is a base VL model, not a "
                                   f"trained COMPASS. {how}")
        try:
            vl_cfg = t.AutoConfig.from_pretrained(src)
            name = _BACKBONES.get(vl_cfg.model_type)
            if name is None or not hasattr(t, name):
                raise UserError(f"COMPASS checkpoint {src} is a {vl_cfg.model_type!r} model; supported: "
                                f"{', '.join(_BACKBONES)} (Qwen3-VL needs transformers >= 4.57, installed "
                                f"{t.__version__})")
            backbone = getattr(t, name).from_pretrained(src, **_dtype_kw(t, dtype))
            tok = t.AutoTokenizer.from_pretrained(src)
            ip = _image_processor_class().from_pretrained(src)
        except OSError as e:
            raise MissingFileError(f"cannot load the COMPASS checkpoint {src}: {str(e).splitlines()[0]} {how}") \
                from None
        meta_file = folder / CONFIG_FILE
        meta = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
        model = cls(backbone, tok, ip, config or CompassConfig.from_dict(meta), source=src)
        if (folder / HEAD_FILE).is_file():
            from safetensors.torch import load_file

            state = load_file(str(folder / HEAD_FILE))
            for name, head in (("lr_head", model.lr_head), ("pair_head", model.pair_head)):
                head.load_state_dict({k.split(".", 1)[1]: v for k, v in state.items() if k.startswith(name + ".")})
        else:
            model.zero_head_outputs()
        return model.eval()

    # -- random models (tests, demo, benchmarks) ----------------------------------------------------------------
    @classmethod
    def tiny(cls, arch: Literal["qwen3vl", "qwen2.5vl"] = "qwen3vl", seed: int = 0,
             config: CompassConfig | None = None) -> CompassModel:
        """A random tiny model of the production class (2 text layers of width 64, a 2-layer vision tower, deepstack
        on Qwen3-VL) with a tokenizer built offline: for tests and the CPU demo. Heads are random (not zeroed) so
        that outputs depend on the input."""
        arch_name = {"qwen3vl": "tiny-qwen3vl", "qwen2.5vl": "tiny-qwen2.5vl"}.get(arch)
        if arch_name is None:
            raise UserError(f"CompassModel.tiny: arch {arch!r} is not one of qwen3vl, qwen2.5vl")
        return cls.random(arch_name, seed=seed, config=config or CompassConfig(head_hidden=32, min_pixels=32 * 32,
                                                                               max_pixels=64 * 64))

    @classmethod
    def random(cls, arch: str = "tiny-qwen3vl", text_layers: int | None = None, vision_layers: int | None = None,
               dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu", seed: int = 0,
               config: CompassConfig | None = None) -> CompassModel:
        """A random-weight model of a named architecture: ``tiny-qwen3vl``, ``tiny-qwen2.5vl`` or ``qwen3vl-8b``
        (the Qwen3-VL-8B shapes: text 36 x 4096, vision 27 x 1152; `text_layers`/`vision_layers` reduce the depth
        at full width), with the offline tokenizer (its special-token ids are written into the config)."""
        t = _transformers()
        tok = offline_tokenizer()
        ids = {s: tok.convert_tokens_to_ids(s) for s in SPECIAL_TOKENS}
        cfg_cls, model_cls, vl_cfg, ip_kw = _arch(t, arch, len(tok), text_layers, vision_layers)
        vl_cfg["text_config"].update(bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
                                     pad_token_id=ids["<|endoftext|>"])
        cfg = cfg_cls(**vl_cfg, image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                      vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
        torch.manual_seed(seed)
        with torch.device(device):  # built (and initialised) in place, in `dtype`, as from_pretrained would load it
            backbone = model_cls._from_config(cfg, **_dtype_kw(t, dtype))
        backbone = backbone.to(device).eval()  # (not .to(dtype): the rotary inv_freq buffers stay float32)
        model = cls(backbone, tok, _image_processor_class()(**ip_kw), config)
        torch.manual_seed(seed + 1)
        for head in (model.lr_head, model.pair_head):
            for layer in head:
                if isinstance(layer, nn.Linear):
                    layer.reset_parameters()
        return model.to(device).eval()


# -- transformers compatibility (4.52 ... 5.x) ----------------------------------------------------------------------
def _dtype_kw(t, dtype: torch.dtype) -> dict:
    major, minor = (int(x) for x in t.__version__.split(".")[:2])
    return {"dtype": dtype} if (major, minor) >= (4, 56) else {"torch_dtype": dtype}


def _new_cache(kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None):
    """A DynamicCache, filled with per-layer (keys, values) when given."""
    cache = _transformers().DynamicCache()
    for layer, (k, v) in enumerate(kv or []):
        cache.update(k, v, layer)
    return cache


def _cache_tensors(cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per-layer (keys, values) of a DynamicCache (``layers`` since transformers 4.56, key_cache/value_cache before)."""
    layers = getattr(cache, "layers", None)
    if layers is not None:
        return [(layer.keys, layer.values) for layer in layers]
    return list(zip(cache.key_cache, cache.value_cache))


def _cache_length(cache) -> int:
    return 0 if cache is None else int(cache.get_seq_length())


def offline_tokenizer():
    """A byte-level BPE tokenizer built offline over the COMPASS prompts, with Qwen's special tokens."""
    # the tokenizers trainer and transformers are heavy: imported only when a random model is built
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    t = _transformers()
    bpe = Tokenizer(models.BPE(unk_token=None))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator([PREFIX, LR_MARKER, MIDDLE, FINAL], trainer)
    return t.PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                     additional_special_tokens=SPECIAL_TOKENS[1:])


def _arch(t, arch: str, vocab: int, text_layers: int | None, vision_layers: int | None):
    """(config class, model class, config kwargs, image processor kwargs) of a named architecture."""
    if arch == "tiny-qwen2.5vl":
        text = dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=text_layers or 2,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                    rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]})
        vision = dict(depth=vision_layers or 2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                      patch_size=14, spatial_merge_size=2, temporal_patch_size=2, fullatt_block_indexes=[1],
                      window_size=56)
        ip = dict(patch_size=14, merge_size=2, temporal_patch_size=2)  # CLIP mean/std: the class defaults
        return t.Qwen2_5_VLConfig, t.Qwen2_5_VLForConditionalGeneration, dict(text_config=text,
                                                                                vision_config=vision), ip
    if arch == "tiny-qwen3vl":
        text = dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=text_layers or 2,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=4096,
                    rope_theta=5e6, rope_scaling={"rope_type": "default", "mrope_section": [4, 2, 2],
                                                  "mrope_interleaved": True})
        depth = vision_layers or 2
        vision = dict(depth=depth, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                      patch_size=16, spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=64,
                      deepstack_visual_indexes=list(range(min(depth, 2))))
    elif arch == "qwen3vl-8b":  # the shapes of Qwen/Qwen3-VL-8B-Instruct's config.json
        text = dict(vocab_size=max(vocab, 151936), hidden_size=4096, intermediate_size=12288,
                    num_hidden_layers=text_layers or 36, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                    max_position_embeddings=262144, rope_theta=5e6, rms_norm_eps=1e-6,
                    rope_scaling={"rope_type": "default", "mrope_section": [24, 20, 20], "mrope_interleaved": True})
        depth = vision_layers or 27
        vision = dict(depth=depth, hidden_size=1152, intermediate_size=4304, num_heads=16, out_hidden_size=4096,
                      patch_size=16, spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=2304,
                      deepstack_visual_indexes=[i for i in (8, 16, 24) if i < depth] or [depth - 1])
    else:
        raise UserError(f"COMPASS architecture {arch!r} is not one of tiny-qwen3vl, tiny-qwen2.5vl, qwen3vl-8b")
    if not hasattr(t, "Qwen3VLForConditionalGeneration"):
        raise UserError(f"Qwen3-VL needs transformers >= 4.57 (installed {t.__version__})")
    ip = dict(patch_size=16, merge_size=2, temporal_patch_size=2, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    return t.Qwen3VLConfig, t.Qwen3VLForConditionalGeneration, dict(text_config=text, vision_config=vision,
                                                                    tie_word_embeddings=False), ip


class CompassReward:
    """The no-reference RL reward (RewardFn): COMPASS R of each candidate, mapped linearly to [0, 1].

    ``variant``: ``full`` (R), ``dq_only`` (Q_SR - Q_LR) or ``no_fidelity`` (R with F = 1, i.e. Q_SR); the ranges
    and their derivation are in the module docstring. `lr` arrives per candidate (B rows, repeated within a
    group): the first row of each group is its LR, run once as the prompt prefix."""

    def __init__(self, model: CompassModel, variant: str = "full", gamma: float = 7.0, batch_size: int = 24):
        self.lo, self.hi = reward_range(variant, gamma)
        if batch_size < 1:
            raise UserError(f"COMPASS reward batch_size={batch_size} must be >= 1")
        self.model, self.variant, self.gamma, self.batch_size = model.eval(), variant, float(gamma), batch_size
        self.name = "compass" if variant == "full" else f"compass_{variant}"

    @classmethod
    def from_pretrained(cls, src: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                        variant: str = "full", gamma: float = 7.0, batch_size: int = 24) -> CompassReward:
        """A trained COMPASS checkpoint folder as the reward; `dtype` defaults to bf16 on a GPU, float32 elsewhere."""
        device = torch.device(device)
        dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
        return cls(CompassModel.from_pretrained(src, dtype=dtype).to(device), variant, gamma, batch_size)

    def raw(self, f: torch.Tensor, q_lr: torch.Tensor, q_sr: torch.Tensor) -> torch.Tensor:
        """The variant's raw reward from F, Q_LR, Q_SR."""
        if self.variant == "dq_only":
            return q_sr - q_lr
        if self.variant == "no_fidelity":
            return compass_reward(torch.ones_like(f), q_lr, q_sr, self.gamma)
        return compass_reward(f, q_lr, q_sr, self.gamma)

    def normalise(self, r: torch.Tensor) -> torch.Tensor:
        """Raw reward -> [0, 1]: (r - lo) / (hi - lo), clamped."""
        return ((r - self.lo) / (self.hi - self.lo)).clamp(0, 1).float()

    @torch.no_grad()
    def __call__(self, lr: torch.Tensor, sr: torch.Tensor, gt: torch.Tensor | None,
                 group_index: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        gi = torch.as_tensor(group_index, dtype=torch.long, device=sr.device)
        groups, inverse = torch.unique(gi, return_inverse=True)
        first = torch.full((len(groups),), len(gi), dtype=torch.long, device=gi.device)
        first = first.scatter_reduce(0, inverse, torch.arange(len(gi), device=gi.device), reduce="amin")
        f, q_lr, q_sr = self.model.score(lr[first], sr, inverse, batch_size=self.batch_size)
        f, q_lr, q_sr = (x.float().to(sr.device) for x in (f, q_lr, q_sr))
        r = self.raw(f, q_lr, q_sr)
        return self.normalise(r), {"f": f, "q_lr": q_lr, "q_sr": q_sr, "r_raw": r.float()}
