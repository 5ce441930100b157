"""Pluggable scorers for the COMPASS annotation: global anchor scores (stage 1) and pairwise comparisons (stage 2).

Protocols
    :class:`GlobalScorer`: ``score(images) -> list[float]`` on [1, 5], one per (3, H, W) float image in [0, 1].
    :class:`PairwiseComparator`: ``compare(lr, a, b) -> "A" | "B" | "similar"``.
    Both carry a ``name`` that identifies the scorer *and its settings* (it keys the :class:`ScoreCache`).

Offline defaults (no weights; the CPU demo's stand-ins, named as such)
    :class:`ClassicalQualityScorer` and :class:`ClassicalPairwiseComparator`: a classical no-reference quality
    proxy, see :func:`quality_features` for the formula and the fixed mapping onto [1, 5].

Production (the paper: Q-Insight for the anchors, a DiffIQA-trained comparator for the ranking)
    :class:`MLLMGlobalScorer` and :class:`MLLMPairwiseComparator` ask a vision-language model (transformers,
    through its public chat-template API; see :class:`TransformersChat`) and parse its answer robustly. A malformed
    answer is retried; after the retries the rating is NaN / the choice "similar", and the raw answers are kept
    in ``failures``.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from scipy import ndimage

Outcome = Literal["A", "B", "similar"]


@runtime_checkable
class GlobalScorer(Protocol):
    name: str

    def score(self, images: Sequence[torch.Tensor]) -> list[float]:
        """One quality score on [1, 5] per (3, H, W) float image in [0, 1] (NaN where the scorer failed)."""
        ...


@runtime_checkable
class PairwiseComparator(Protocol):
    name: str

    def compare(self, lr: torch.Tensor | None, a: torch.Tensor, b: torch.Tensor) -> Outcome:
        """Which SR candidate of the LR input is better: "A", "B" or "similar"."""
        ...


# ----------------------------------------------------------------------------------------------- images

def _check_image(img: Any, what: str = "image") -> torch.Tensor:
    if not isinstance(img, torch.Tensor):
        raise TypeError(f"{what} must be a torch.Tensor (3, H, W) in [0, 1], got {type(img).__name__}")
    if img.dim() != 3 or img.shape[0] not in (1, 3):
        raise ValueError(f"{what} must have shape (3, H, W) (or (1, H, W)), got {tuple(img.shape)}")
    if not img.is_floating_point():
        raise ValueError(f"{what} must be a float tensor in [0, 1], got dtype {img.dtype}")
    return img


def _to_hwc(img: torch.Tensor, what: str = "image") -> np.ndarray:
    """(H, W, 3) float64 in [0, 1] (values outside are clamped; grey is replicated).

    Numpy from here on: small torch CPU ops are slow when the cores are shared (thread-pool contention).
    """
    t = _check_image(img, what).detach().cpu()
    a = (t if t.dtype in (torch.float32, torch.float64) else t.float()).numpy()
    if not np.isfinite(a).all():
        raise ValueError(f"{what} contains NaN or inf values")
    x = np.clip(a.astype(np.float64), 0.0, 1.0).transpose(1, 2, 0)
    return np.repeat(x, 3, axis=2) if x.shape[2] == 1 else x


def to_pil(img: torch.Tensor) -> Image.Image:
    """8-bit RGB PIL image of a (3, H, W) float tensor in [0, 1]."""
    arr = np.round(_to_hwc(img) * 255.0).astype(np.uint8)
    return Image.fromarray(arr, "RGB")


# ------------------------------------------------------------------------------------ classical proxy

_IMMERKAER = np.array([[1.0, -2.0, 1.0], [-2.0, 4.0, -2.0], [1.0, -2.0, 1.0]])
_NOISE_BLOCK = 16          # block size of the noise estimator
_NOISE_PERCENTILE = 10.0   # the estimate is this percentile of the per-block estimates ...
_NOISE_CALIBRATION = 1.12  # ... times this factor, which makes it unbiased on white Gaussian noise
_REBLUR_SIGMA = 1.0
_DETAIL_FLOOR = 2.0        # e0: gradient energy (8-bit units^2) below which an image counts as flat
_JPEG_PERIOD = 8


def _gaussian_kernel(sigma: float, truncate: float = 4.0) -> np.ndarray:
    r = int(truncate * sigma + 0.5)  # the kernel scipy.ndimage.gaussian_filter uses
    x = np.arange(-r, r + 1, dtype=np.float64)
    g = np.exp(-0.5 * (x / sigma) ** 2)
    return g / g.sum()


def _reblur_noise_share(sigma: float) -> float:
    """kappa: share of white noise's gradient energy (forward differences) that survives a Gaussian(sigma)."""
    g = _gaussian_kernel(sigma)
    dg = np.diff(np.concatenate([[0.0], g, [0.0]]))
    return float((dg**2).sum() * (g**2).sum() / 2.0)


_KAPPA = _reblur_noise_share(_REBLUR_SIGMA)


def _luma255(x: np.ndarray) -> np.ndarray:
    return 255.0 * (0.299 * x[..., 0] + 0.587 * x[..., 1] + 0.114 * x[..., 2])


def _gradient_energy(y: np.ndarray) -> float:
    return float((np.diff(y, axis=1) ** 2).mean() + (np.diff(y, axis=0) ** 2).mean())


def noise_sigma(x: np.ndarray) -> float:
    """Noise standard deviation (8-bit luma units) of an (H, W, 3) image in [0, 1].

    Immerkaer's fast estimate (1996), ``sqrt(pi/2) / 6 * mean|Y * M|`` with the 3x3 mask
    M = [[1,-2,1],[-2,4,-2],[1,-2,1]], taken per 16x16 block; the image's estimate is the 10th percentile over the
    blocks (the flattest ones, so texture is not read as noise) times 1.12, the factor that makes it unbiased on
    white Gaussian noise. Blocks with a clipped channel (<= 4 or >= 251) are skipped (clipping hides noise)
    unless fewer than 10% of the blocks are left.
    """
    y = _luma255(x)
    res = np.abs(ndimage.convolve(y, _IMMERKAER, mode="reflect"))
    b = _NOISE_BLOCK
    hb, wb = (y.shape[0] - 2) // b, (y.shape[1] - 2) // b
    if hb == 0 or wb == 0:  # smaller than a block: one block of what there is
        per_block = np.array([res[1:-1, 1:-1].mean()])
        ok = np.ones(1, dtype=bool)
    else:
        crop = (slice(1, 1 + hb * b), slice(1, 1 + wb * b))
        per_block = res[crop].reshape(hb, b, wb, b).mean((1, 3)).ravel()
        xs = 255.0 * x[crop].reshape(hb, b, wb, b, 3)
        ok = ((xs.min((1, 3)) > 4.0) & (xs.max((1, 3)) < 251.0)).all(-1).ravel()
        if ok.sum() < max(1, 0.1 * ok.size):
            ok[:] = True
    return float(_NOISE_CALIBRATION * math.sqrt(math.pi / 2) / 6.0 * np.percentile(per_block[ok], _NOISE_PERCENTILE))


def sharpness(y: np.ndarray, sigma_noise: float) -> float:
    """Share of the (noise-corrected) luma gradient energy that a Gaussian(1 px) re-blur removes, in [0, 1].

    ``E`` = mean squared forward differences of Y (both axes), ``E_r`` the same after the re-blur. White noise of
    std s contributes ``4 s^2`` to E and ``4 kappa s^2`` to E_r (kappa from the kernel), so
    ``S = max(E - E_r - 4 (1 - kappa) s^2, 0) / (max(E - 4 s^2, 0) + e0)``, e0 = 2: sharp detail loses most of its
    energy on re-blurring, already blurred detail little; contrast cancels (scale-normalised); flat images -> 0.
    """
    e = _gradient_energy(y)
    e_r = _gradient_energy(ndimage.gaussian_filter(y, _REBLUR_SIGMA, mode="reflect"))
    n2 = 4.0 * sigma_noise**2
    detail = max(e - n2, 0.0)
    lost = max(e - e_r - (1.0 - _KAPPA) * n2, 0.0)
    return float(min(lost / (detail + _DETAIL_FLOOR), 1.0))


def blockiness(y: np.ndarray, period: int = _JPEG_PERIOD) -> float:
    """JPEG-style blocking: excess of the mean |luma step| on one phase of an 8-px grid over the median phase.

    Per axis, the mean absolute difference between neighbouring columns (rows) is averaged per phase
    ``c mod 8``; ``b = max_phase / median_phase - 1`` (phase-agnostic, so a crop need not keep the grid at the
    origin); the result is the mean over both axes, >= 0 (about 0-0.3 on clean photos, > 1 at JPEG quality <= 10).
    """
    out = []
    for axis in (1, 0):
        if y.shape[axis] < 2 * period + 1:
            continue
        prof = np.abs(np.diff(y, axis=axis)).mean(1 - axis)
        phase = np.array([prof[k::period].mean() for k in range(period)])
        med = float(np.median(phase))
        out.append(phase.max() / med - 1.0 if med > 1e-6 else 0.0)
    return float(np.mean(out)) if out else 0.0


@dataclass(frozen=True)
class QualityFeatures:
    """The classical proxy's parts for one image (see :func:`quality_features`)."""

    sharpness: float
    noise_sigma: float
    blockiness: float
    quality: float


def quality_features(img: torch.Tensor, noise_scale: float = 6.0, block_scale: float = 0.5) -> QualityFeatures:
    """Classical no-reference quality proxy of one (3, H, W) image in [0, 1]; ``quality`` on [1, 5].

    ``z = S / (1 + (sigma / noise_scale)^2) / (1 + B / block_scale)`` and ``quality = 1 + 4 z``, with S the
    re-blur sharpness (:func:`sharpness`, in [0, 1]), sigma the noise std in 8-bit luma units (:func:`noise_sigma`)
    and B the blockiness (:func:`blockiness`). Each artefact multiplies quality down; the mapping is fixed (no
    per-batch normalisation), so scores compare across groups. Measured on 256x256 crops of scikit-image photos:
    clean 2.8-3.9, Gaussian blur sigma 3.2 px ~1.2, noise std 30 ~1.3, JPEG quality 7 ~1.6. Sharpness is
    measured at the image's own pixel scale: an LR input scored at its native size is judged as a small image,
    not as its upscaled version (clean 64x64 LR crops of those photos: 2.1-3.1).
    """
    return _features(_to_hwc(img), noise_scale, block_scale)


def _features(x: np.ndarray, noise_scale: float, block_scale: float) -> QualityFeatures:
    if min(x.shape[:2]) < 24:
        raise ValueError(f"the classical quality proxy needs images of at least 24x24 pixels, got {x.shape[:2]}")
    y = _luma255(x)
    s = noise_sigma(x)
    sh = sharpness(y, s)
    bl = blockiness(y)
    z = sh / (1.0 + (s / noise_scale) ** 2) / (1.0 + bl / block_scale)
    return QualityFeatures(sharpness=sh, noise_sigma=s, blockiness=bl, quality=1.0 + 4.0 * z)


def _tensor_array(t: torch.Tensor) -> np.ndarray:
    """A numpy view/copy of a tensor's exact values (bfloat16 and other non-numpy dtypes as raw integers)."""
    t = t.detach().cpu()
    try:
        return t.numpy()
    except TypeError:
        return t.contiguous().view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[
            t.element_size()]).numpy()


def _content_key(img: torch.Tensor) -> str:
    a = np.ascontiguousarray(_tensor_array(img))
    h = hashlib.sha1(f"{img.dtype}{tuple(img.shape)}".encode())
    h.update(a.tobytes())
    return h.hexdigest()


class ClassicalQualityScorer:
    """Global anchor scorer of the CPU demo: the classical proxy of :func:`quality_features`, on [1, 5]."""

    def __init__(self, noise_scale: float = 6.0, block_scale: float = 0.5):
        if noise_scale <= 0 or block_scale <= 0:
            raise ValueError(f"noise_scale and block_scale must be > 0, got {noise_scale}, {block_scale}")
        self.noise_scale = float(noise_scale)
        self.block_scale = float(block_scale)
        self.name = f"classical_nr_proxy_v1(noise_scale={self.noise_scale:g},block_scale={self.block_scale:g})"

    def features(self, img: torch.Tensor) -> QualityFeatures:
        return quality_features(img, self.noise_scale, self.block_scale)

    def score(self, images: Sequence[torch.Tensor]) -> list[float]:
        return [_features(_to_hwc(img, f"images[{i}]"), self.noise_scale, self.block_scale).quality
                for i, img in enumerate(images)]


class ClassicalPairwiseComparator:
    """Pairwise comparator of the CPU demo: the classical proxy, plus consistency with the LR input.

    ``pref = (q_A - q_B) + lr_weight * (min(PSNR_A, psnr_cap) - min(PSNR_B, psnr_cap))`` where q is the proxy
    quality on [1, 5] and PSNR (dB, on [0, 1] RGB) compares the candidate, area-downsampled to the LR size, with
    the LR (skipped when ``lr`` is None). "A" if ``pref >= margin``, "B" if ``pref <= -margin``, else "similar".
    Defaults: margin 0.02 quality points (1/200 of the scale), lr_weight 0.01 per dB (10 dB = 0.1 points).
    Symmetric by construction (swapping A and B swaps the answer), so one presentation order suffices.
    Proxy qualities are memoised by content hash (``memo_size`` images), so an exhaustive comparison of K
    candidates computes K proxies, not K(K-1).
    """

    def __init__(self, scorer: ClassicalQualityScorer | None = None, margin: float = 0.02, lr_weight: float = 0.01,
                 psnr_cap: float = 50.0, memo_size: int = 256):
        if margin < 0 or lr_weight < 0 or psnr_cap <= 0:
            raise ValueError(f"need margin >= 0, lr_weight >= 0, psnr_cap > 0; got {margin}, {lr_weight}, {psnr_cap}")
        self.scorer = scorer or ClassicalQualityScorer()
        self.margin, self.lr_weight, self.psnr_cap = float(margin), float(lr_weight), float(psnr_cap)
        self.name = (f"classical_pairwise_v1({self.scorer.name},margin={self.margin:g},lr_weight={self.lr_weight:g},"
                     f"psnr_cap={self.psnr_cap:g})")
        self._memo: OrderedDict[str, float] = OrderedDict()
        self._memo_size = memo_size

    def _quality(self, img: torch.Tensor) -> float:
        key = _content_key(img)
        if key in self._memo:
            self._memo.move_to_end(key)
            return self._memo[key]
        q = self.scorer.features(img).quality
        self._memo[key] = q
        if len(self._memo) > self._memo_size:
            self._memo.popitem(last=False)
        return q

    def lr_psnr(self, lr: torch.Tensor, sr: torch.Tensor) -> float:
        """PSNR (dB) of the SR candidate area-downsampled to the LR size against the LR, capped at psnr_cap."""
        ref, x = _to_hwc(lr, "lr"), _to_hwc(sr, "sr")
        (h, w), (hh, ww) = ref.shape[:2], x.shape[:2]
        if hh % h == 0 and ww % w == 0:
            down = x.reshape(h, hh // h, w, ww // w, 3).mean((1, 3))
        else:  # non-integer factor: torch's area resampling
            t = torch.from_numpy(x.transpose(2, 0, 1).copy())[None]
            down = F.adaptive_avg_pool2d(t, (h, w))[0].numpy().transpose(1, 2, 0)
        mse = float(((down - ref) ** 2).mean())
        return self.psnr_cap if mse <= 0 else min(10.0 * math.log10(1.0 / mse), self.psnr_cap)

    def preference(self, lr: torch.Tensor | None, a: torch.Tensor, b: torch.Tensor) -> float:
        """Signed preference for A over B in quality points (see the class docstring)."""
        _check_image(a, "a")
        _check_image(b, "b")
        pref = self._quality(a) - self._quality(b)
        if lr is not None and self.lr_weight > 0:
            _check_image(lr, "lr")
            pref += self.lr_weight * (self.lr_psnr(lr, a) - self.lr_psnr(lr, b))
        return pref

    def compare(self, lr: torch.Tensor | None, a: torch.Tensor, b: torch.Tensor) -> Outcome:
        pref = self.preference(lr, a, b)
        if pref >= self.margin:
            return "A"
        if pref <= -self.margin:
            return "B"
        return "similar"


# ------------------------------------------------------------------------------------- MLLM answers

_NUM = r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)"
_THINK = re.compile(r"<think>.*?(?:</think>|$)", re.S | re.I)  # an unclosed <think> runs to the end
_ANSWER = re.compile(r"<answer>(.*?)(?:</answer>|$)", re.S | re.I)
_RATING_KEYS = ("rating", "score", "quality")
_CHOICE_KEYS = ("choice", "answer", "better", "preference", "winner", "result")
_SIMILAR_WORDS = ("similar", "tie", "same", "equal", "equivalent", "both", "neither", "indistinguishable")


def _visible(text: str) -> str:
    """The part of an answer to parse: reasoning in <think> removed, the <answer> block when there is one."""
    text = _THINK.sub(" ", text)
    m = _ANSWER.search(text)
    return m.group(1) if m else text


def _json_objects(text: str) -> Iterator[dict]:
    """JSON objects in a text, in order (``{...}`` spans that parse; code fences and prose around are fine)."""
    dec = json.JSONDecoder()
    i = text.find("{")
    while i != -1:
        try:
            obj, end = dec.raw_decode(text, i)
        except ValueError:
            i = text.find("{", i + 1)
            continue
        if isinstance(obj, dict):
            yield obj
        i = text.find("{", end)


def _lookup(obj: dict, keys: Sequence[str]) -> tuple[bool, Any]:
    lower = {str(k).strip().lower(): v for k, v in obj.items()}
    for k in keys:
        if k in lower:
            return True, lower[k]
    return False, None


def parse_rating(text: str, lo: float = 1.0, hi: float = 5.0) -> float | None:
    """A rating on [lo, hi] from a model's answer, or None when the answer is malformed.

    In order: the first JSON object with a "rating" (or "score", "quality") key decides; else ``rating: x``
    in the text; else ``x/5`` or ``x out of 5``; else the text's only number (several different numbers are
    ambiguous). Reasoning inside <think>...</think> is ignored and an <answer>...</answer> block is preferred.
    A value outside [lo, hi] is malformed.
    """
    t = _visible(text)
    value: Any = None
    for obj in _json_objects(t):
        found, value = _lookup(obj, _RATING_KEYS)
        if found:
            break
    else:
        m = re.search(rf"(?:{'|'.join(_RATING_KEYS)})\W{{0,4}}({_NUM})", t, re.I)
        if m is None:
            m = re.search(rf"({_NUM})\s*(?:/|out\s+of)\s*{hi:g}\b", t, re.I)
        if m is not None:
            value = m.group(1)
        else:
            nums = {float(n) for n in re.findall(_NUM, t)}
            value = nums.pop() if len(nums) == 1 else None
    if isinstance(value, bool):
        return None
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) and lo <= v <= hi else None


def _choice_word(value: str) -> Outcome | None:
    w = re.sub(r"[^a-z ]", " ", str(value).lower())
    w = re.sub(r"\b(image|candidate|option|output|picture|the|is|better)\b", " ", w).split()
    if w == ["a"]:
        return "A"
    if w == ["b"]:
        return "B"
    if w and all(x in _SIMILAR_WORDS or x in ("no", "preference", "are", "equally", "good") for x in w) \
            and any(x in _SIMILAR_WORDS for x in w):
        return "similar"
    return None


def parse_choice(text: str) -> Outcome | None:
    """"A", "B" or "similar" from a model's answer, or None when the answer is malformed.

    In order: the first JSON object with a "choice" (or "answer", "better", ...) key decides; else the whole
    answer is one word ("A", "Image B", "similar", "tie", ...); else ``answer/choice: X`` or ``X is better``;
    else exactly one of {standalone capital A, standalone capital B, a similarity word} occurs in the text.
    """
    t = _visible(text)
    for obj in _json_objects(t):
        found, value = _lookup(obj, _CHOICE_KEYS)
        if found:
            return _choice_word(value)
    whole = _choice_word(t.strip())
    if whole is not None:
        return whole
    m = re.search(r"(?i:\b(?:answer|choice|prefer(?:ence|red)?|better|winner)\b\W{0,5}(?:is\s+)?"
                  r"(?:image\s+|candidate\s+|option\s+)?)([AB])\b", t)
    if m is None:
        m = re.search(r"\b([AB])\b(?:\s+image|\s+candidate)?\s+is\s+(?:clearly\s+|slightly\s+|much\s+)?"
                      r"(?:better|superior|preferred)", t)
    if m is not None:
        return "A" if m.group(1).upper() == "A" else "B"
    found: set[str] = set(re.findall(r"\b([AB])\b", t))
    if re.search(rf"\b(?:{'|'.join(_SIMILAR_WORDS)})\b", t, re.I):
        found.add("similar")
    return found.pop() if len(found) == 1 else None  # type: ignore[return-value]


# ---------------------------------------------------------------------------------- the VLM backend

ChatFn = Callable[..., str]
"""``chat(images: list[PIL.Image], prompt: str, sample: bool) -> str``: one user turn, the decoded reply."""


class TransformersChat:
    """One question about some images to a transformers vision-language model (e.g. Qwen2.5-VL, Q-Insight).

    Uses the public API only: ``processor.apply_chat_template(messages, add_generation_prompt=True,
    tokenize=True, return_dict=True, return_tensors="pt")`` -> ``model.generate`` -> ``processor.batch_decode`` of
    the new tokens. Greedy decoding, except where ``sample`` is set (retries of a malformed answer).
    ``name`` (it ends up in the scorers' cache keys) defaults to the model's ``config._name_or_path``, i.e. the
    folder or hub id it was loaded from; give one explicitly for a model built in memory.
    """

    def __init__(self, model: Any, processor: Any, max_new_tokens: int = 512, temperature: float = 0.7,
                 name: str | None = None):
        self.model, self.processor = model, processor
        self.max_new_tokens, self.temperature = max_new_tokens, temperature
        config = getattr(model, "config", None)
        self.name = name or str(getattr(config, "_name_or_path", "") or type(model).__name__)

    @classmethod
    def from_pretrained(cls, path: str, device: str | torch.device | None = None, dtype: Any = "auto",
                        max_new_tokens: int = 512, **kwargs: Any) -> TransformersChat:
        """Load processor and model from a local folder (or a hub id already in the local cache).

        ``kwargs`` go to the model's ``from_pretrained`` (e.g. ``device_map``, ``attn_implementation``).
        """
        local = os.path.expanduser(path)
        if not os.path.isdir(local) and not re.fullmatch(r"[\w.-]+/[\w.-]+", path):  # neither a folder nor a hub id
            raise FileNotFoundError(
                f"MLLM weights not found: expected a transformers model folder (config.json, *.safetensors, "
                f"processor files) at {path!r}. Download it on a machine with network access, e.g. "
                f"`huggingface-cli download <repo-id> --local-dir {path}`, and copy it there.")
        # transformers is imported here, not at module level: it keeps the heavy dependency off the import path.
        import transformers
        from transformers import AutoModelForImageTextToText, AutoProcessor

        major = int(transformers.__version__.split(".")[0])
        minor = int(re.match(r"\d+", transformers.__version__.split(".")[1]).group())  # type: ignore[union-attr]
        dtype_kw = "dtype" if (major, minor) >= (4, 56) else "torch_dtype"
        processor = AutoProcessor.from_pretrained(local if os.path.isdir(local) else path)
        model = AutoModelForImageTextToText.from_pretrained(local if os.path.isdir(local) else path,
                                                            **{dtype_kw: dtype}, **kwargs)
        if "device_map" not in kwargs:  # a dispatched model stays where accelerate put it
            model = model.to(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
        model.eval()
        return cls(model, processor, max_new_tokens=max_new_tokens, name=path)

    @torch.inference_mode()
    def __call__(self, images: Sequence[Image.Image], prompt: str, sample: bool = False) -> str:
        content: list[dict[str, Any]] = [{"type": "image", "image": im} for im in images]
        content.append({"type": "text", "text": prompt})
        messages = [{"role": "user", "content": content}]
        inputs = self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                    return_dict=True, return_tensors="pt")
        device = getattr(self.model, "device", None)
        if device is not None:
            inputs = inputs.to(device) if hasattr(inputs, "to") else {
                k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
        gen: dict[str, Any] = {"max_new_tokens": self.max_new_tokens, "do_sample": bool(sample)}
        if sample:
            gen["temperature"] = self.temperature
        out = self.model.generate(**inputs, **gen)
        new_tokens = out[:, inputs["input_ids"].shape[1]:]
        return self.processor.batch_decode(new_tokens, skip_special_tokens=True)[0]


def _as_chat(chat: ChatFn | str) -> ChatFn:
    return TransformersChat.from_pretrained(chat) if isinstance(chat, str) else chat


def _prompt_tag(*prompts: str) -> str:
    return hashlib.sha1("\x00".join(prompts).encode()).hexdigest()[:8]


@dataclass
class MalformedAnswer:
    """Answers that could not be parsed after all retries (kept for inspection; the sample is marked)."""

    scorer: str
    kind: Literal["rating", "choice"]
    answers: list[str] = field(default_factory=list)


RATING_PROMPT = (
    "Rate the overall visual quality of this image, considering sharpness, noise, compression artefacts, "
    "texture realism and any distortions. Use a continuous scale from 1 (very poor) to 5 (excellent), with two "
    "decimals. Answer with a JSON object only, for example {\"rating\": 3.25}."
)
RATING_RETRY = "Your previous reply could not be read. Reply with only a JSON object such as {\"rating\": 3.25}."

CHOICE_PROMPT = (
    "The first image is a low-resolution input. The second image (A) and the third image (B) are two "
    "super-resolved versions of it. Which of A and B has the better perceptual quality while staying faithful "
    "to the input? If they are of about the same quality, say similar. Answer with a JSON object only: "
    "{\"choice\": \"A\"}, {\"choice\": \"B\"} or {\"choice\": \"similar\"}."
)
CHOICE_RETRY = "Your previous reply could not be read. Reply with only {\"choice\": \"A\"}, \"B\" or \"similar\"."


class MLLMGlobalScorer:
    """Global anchor scorer backed by a vision-language model (Q-Insight style rating on [1, 5]).

    ``chat``: a :class:`TransformersChat` (or any ``chat(images, prompt, sample) -> str``), or a model path to
    load one from; :meth:`from_model` wraps an already loaded model and processor. Each image is asked
    separately; a malformed answer (see :func:`parse_rating`) is asked again up to ``max_retries`` times with a
    stricter prompt and sampling; then the score is NaN and the answers go to ``failures``.
    """

    def __init__(self, chat: ChatFn | str, *, name: str | None = None, prompt: str = RATING_PROMPT,
                 retry_prompt: str = RATING_RETRY, max_retries: int = 2):
        if max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {max_retries}")
        self.chat = _as_chat(chat)
        self.prompt, self.retry_prompt, self.max_retries = prompt, retry_prompt, max_retries
        model = getattr(self.chat, "name", type(self.chat).__name__)
        self.name = name or f"mllm_rating({model},prompt={_prompt_tag(prompt, retry_prompt)})"
        self.failures: list[MalformedAnswer] = []

    @classmethod
    def from_model(cls, model: Any, processor: Any, **kwargs: Any) -> MLLMGlobalScorer:
        return cls(TransformersChat(model, processor), **kwargs)

    def score_one(self, img: torch.Tensor) -> float:
        pil = to_pil(img)
        answers = []
        for attempt in range(self.max_retries + 1):
            prompt = self.prompt if attempt == 0 else f"{self.prompt}\n{self.retry_prompt}"
            answers.append(self.chat([pil], prompt, sample=attempt > 0))
            value = parse_rating(answers[-1])
            if value is not None:
                return value
        self.failures.append(MalformedAnswer(self.name, "rating", answers))
        return float("nan")

    def score(self, images: Sequence[torch.Tensor]) -> list[float]:
        return [self.score_one(_check_image(img, f"images[{i}]")) for i, img in enumerate(images)]


class MLLMPairwiseComparator:
    """Pairwise comparator backed by a vision-language model: images (LR, A, B), answer "A" / "B" / "similar".

    Same construction and retry rule as :class:`MLLMGlobalScorer`; after the retries the outcome is "similar"
    (the neutral outcome for :func:`~oars_fast.annotation.ranking.win_rate`) and the answers go to ``failures``.
    Without an LR the prompt's first image is left out (``prompt_no_lr``). Position bias is the caller's to
    cancel (``preference_matrix(..., both_orders=True)``).
    """

    def __init__(self, chat: ChatFn | str, *, name: str | None = None, prompt: str = CHOICE_PROMPT,
                 retry_prompt: str = CHOICE_RETRY, max_retries: int = 2, prompt_no_lr: str | None = None):
        if max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {max_retries}")
        self.chat = _as_chat(chat)
        self.prompt, self.retry_prompt, self.max_retries = prompt, retry_prompt, max_retries
        self.prompt_no_lr = prompt_no_lr or (
            "Images A (first) and B (second) are two super-resolved versions of the same input. Which has the "
            "better perceptual quality? If about the same, say similar. Answer with a JSON object only: "
            "{\"choice\": \"A\"}, {\"choice\": \"B\"} or {\"choice\": \"similar\"}.")
        model = getattr(self.chat, "name", type(self.chat).__name__)
        tag = _prompt_tag(prompt, retry_prompt, self.prompt_no_lr)
        self.name = name or f"mllm_pairwise({model},prompt={tag})"
        self.failures: list[MalformedAnswer] = []

    @classmethod
    def from_model(cls, model: Any, processor: Any, **kwargs: Any) -> MLLMPairwiseComparator:
        return cls(TransformersChat(model, processor), **kwargs)

    def compare(self, lr: torch.Tensor | None, a: torch.Tensor, b: torch.Tensor) -> Outcome:
        images = [to_pil(_check_image(a, "a")), to_pil(_check_image(b, "b"))]
        base = self.prompt_no_lr
        if lr is not None:
            images.insert(0, to_pil(_check_image(lr, "lr")))
            base = self.prompt
        answers = []
        for attempt in range(self.max_retries + 1):
            prompt = base if attempt == 0 else f"{base}\n{self.retry_prompt}"
            answers.append(self.chat(images, prompt, sample=attempt > 0))
            choice = parse_choice(answers[-1])
            if choice is not None:
                return choice
        self.failures.append(MalformedAnswer(self.name, "choice", answers))
        return "similar"
