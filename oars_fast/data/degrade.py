"""Real-ESRGAN second-order degradation in torch: HR batch -> synthetic LR batch, on any device.

The x4plus recipe (Wang et al., 2021), every part of it, with per-sample random parameters:

1. blur with a random kernel of odd size 7..21: isotropic / anisotropic Gaussian, generalized
   Gaussian, plateau (all with rotation), or a 2-D sinc (ringing) filter with ``first.sinc_prob``;
2. resize up / down / keep (``first.resize_prob``, ``first.resize_range``) with area, bilinear or bicubic;
3. Gaussian (``first.noise_range``) or Poisson (``first.poisson_scale_range``) noise, colour or gray;
4. JPEG compression with quality in ``first.jpeg_range``;
5. the second pass (``second.*``): blur with ``second.blur_prob``, resize, noise, with its own ranges;
6. final step in random order: [resize to HR/scale + sinc filter (``final_sinc_prob``), JPEG] or
   [JPEG, resize + sinc];
7. rounding to 8-bit (1/255 steps).

Deviations from the reference implementation, all deliberate:

* parameters are drawn per *sample* (the reference draws resize scale, interpolation mode and
  JPEG quality once per batch); because intermediate sizes then differ, each sample runs through
  the chain on its own (each op is batched over channels; kernels and JPEG are exact per sample);
* JPEG is the standard baseline codec (IJG quality tables, 4:2:0 chroma, 8x8 DCT, true rounding)
  written in torch, rather than DiffJPEG's differentiable rounding (nothing back-propagates here);
* all randomness comes from one ``torch.Generator``: same generator state, same LR, on any device.
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from ..config import DegradationConfig, DegradationPass

KERNEL_PAD = 21  # every kernel is zero-padded to this size (the largest kernel)
_MODES = ("area", "bilinear", "bicubic")


class _Draw:
    """Scalar random draws from a CPU generator (parameters are tiny; tensors use `device_gen`)."""

    def __init__(self, generator: torch.Generator | None):
        if generator is None:
            seed = int(torch.randint(0, 2**62, (1,)).item())
        elif generator.device.type != "cpu":
            seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device).item())
        else:
            self.g = generator
            return
        self.g = torch.Generator().manual_seed(seed)

    def uniform(self, lo: float, hi: float) -> float:
        return lo + (hi - lo) * float(torch.rand((), generator=self.g, dtype=torch.float64))

    def chance(self, p: float) -> bool:
        return float(torch.rand((), generator=self.g, dtype=torch.float64)) < p

    def choice(self, items: Any, p: Any = None) -> Any:
        items = list(items)
        if p is None:
            return items[int(torch.randint(0, len(items), (1,), generator=self.g))]
        idx = int(torch.multinomial(torch.tensor(p, dtype=torch.float64), 1, generator=self.g))
        return items[idx]

    def device_gen(self, device: torch.device) -> torch.Generator:
        seed = int(torch.randint(0, 2**62, (1,), generator=self.g))
        return torch.Generator(device=device).manual_seed(seed)


# ---------------------------------------------------------------------------------------------
# Kernels (float64, CPU; zero-padded to KERNEL_PAD, normalised to sum 1)
# ---------------------------------------------------------------------------------------------


def _grid(size: int) -> torch.Tensor:
    ax = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    yy, xx = torch.meshgrid(ax, ax, indexing="ij")
    return torch.stack([xx, yy], dim=-1)  # (k, k, 2)


def _pad_kernel(k: torch.Tensor, size: int = KERNEL_PAD) -> torch.Tensor:
    p = (size - k.shape[-1]) // 2
    return F.pad(k, (p, p, p, p)) if p > 0 else k


def bivariate_kernel(size: int, sigma_x: float, sigma_y: float, theta: float, beta: float = 1.0,
                     plateau: bool = False) -> torch.Tensor:
    """Gaussian (beta=1), generalized Gaussian (exp(-q^beta/2)) or plateau (1/(1+q^beta)) kernel,
    q = x^T Sigma^-1 x with Sigma = R(theta) diag(sigma_x^2, sigma_y^2) R(theta)^T; sums to 1."""
    c, s = math.cos(theta), math.sin(theta)
    rot = torch.tensor([[c, -s], [s, c]], dtype=torch.float64)
    sigma = rot @ torch.diag(torch.tensor([sigma_x**2, sigma_y**2], dtype=torch.float64)) @ rot.T
    grid = _grid(size)
    q = torch.einsum("ijk,kl,ijl->ij", grid, torch.linalg.inv(sigma), grid)
    k = 1.0 / (q.pow(beta) + 1.0) if plateau else torch.exp(-0.5 * q.pow(beta))
    return k / k.sum()


def sinc_kernel(size: int, omega_c: float) -> torch.Tensor:
    """2-D circular low-pass (sinc) filter with cut-off `omega_c`, sums to 1."""
    r = _grid(size).norm(dim=-1)
    safe = torch.where(r == 0, torch.ones_like(r), r)
    k = omega_c * torch.special.bessel_j1(omega_c * safe) / (2 * math.pi * safe)
    k = torch.where(r == 0, torch.full_like(r, omega_c**2 / (4 * math.pi)), k)
    return k / k.sum()


def _shape_param(draw: _Draw, rng: list[float]) -> float:
    # as Real-ESRGAN: half the draws below 1 (sharper than Gaussian), half above
    if draw.chance(0.5) and rng[0] < 1:
        return draw.uniform(rng[0], 1.0)
    return draw.uniform(max(1.0, rng[0]), rng[1])


def random_kernel(draw: _Draw, kind: str, size: int, sigma: list[float], betag: list[float],
                  betap: list[float]) -> torch.Tensor:
    """One random blur kernel of type `kind` (see DegradationConfig.kernel_list)."""
    iso = kind.endswith("iso") and not kind.endswith("aniso")
    sx = draw.uniform(*sigma)
    sy = sx if iso else draw.uniform(*sigma)
    theta = 0.0 if iso else draw.uniform(-math.pi, math.pi)
    if kind.startswith("generalized"):
        return bivariate_kernel(size, sx, sy, theta, _shape_param(draw, betag))
    if kind.startswith("plateau"):
        return bivariate_kernel(size, sx, sy, theta, _shape_param(draw, betap), plateau=True)
    return bivariate_kernel(size, sx, sy, theta)


def _blur_kernel(draw: _Draw, cfg: DegradationConfig, stage: DegradationPass) -> tuple[str, torch.Tensor]:
    size = draw.choice(cfg.kernel_range)
    if draw.chance(stage.sinc_prob):
        omega = draw.uniform(math.pi / 3, math.pi) if size < 13 else draw.uniform(math.pi / 5, math.pi)
        return "sinc", _pad_kernel(sinc_kernel(size, omega))
    kind = draw.choice(cfg.kernel_list, cfg.kernel_prob)
    k = random_kernel(draw, kind, size, stage.blur_sigma, stage.betag_range, stage.betap_range)
    return kind, _pad_kernel(k)


def _pulse() -> torch.Tensor:
    k = torch.zeros(KERNEL_PAD, KERNEL_PAD, dtype=torch.float64)
    k[KERNEL_PAD // 2, KERNEL_PAD // 2] = 1.0
    return k


# ---------------------------------------------------------------------------------------------
# Ops on (N, C, H, W) float tensors on any device
# ---------------------------------------------------------------------------------------------


def filter2d(img: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """Convolve every channel with `kernel` (k, k); reflect padding (replicate when too small)."""
    n, c, h, w = img.shape
    p = kernel.shape[-1] // 2
    mode = "reflect" if p < h and p < w else "replicate"
    x = F.pad(img, (p, p, p, p), mode=mode)
    weight = kernel.to(img.device, img.dtype).expand(c, 1, *kernel.shape[-2:])
    return F.conv2d(x, weight, groups=c)


def resize(img: torch.Tensor, size: tuple[int, int], mode: str) -> torch.Tensor:
    size = (max(1, int(size[0])), max(1, int(size[1])))
    if mode == "area":
        return F.interpolate(img, size=size, mode="area")
    return F.interpolate(img, size=size, mode=mode, align_corners=False)


def _gray(img: torch.Tensor) -> torch.Tensor:
    w = torch.tensor([0.299, 0.587, 0.114], device=img.device, dtype=img.dtype).view(1, 3, 1, 1)
    return (img * w).sum(1, keepdim=True)


def gaussian_noise(img: torch.Tensor, sigma: float, gray: bool, gen: torch.Generator) -> torch.Tensor:
    """Add N(0, sigma/255) noise (one plane for all channels when `gray`), clip to [0, 1]."""
    shape = (img.shape[0], 1, *img.shape[-2:]) if gray else img.shape
    noise = torch.randn(shape, generator=gen, device=img.device, dtype=img.dtype) * (sigma / 255.0)
    return (img + noise).clamp(0, 1)


def poisson_noise(img: torch.Tensor, scale: float, gray: bool, gen: torch.Generator) -> torch.Tensor:
    """Signal-dependent Poisson noise at the image's own number of levels (as Real-ESRGAN), clip."""
    src = _gray(img) if gray else img
    src = (src.clamp(0, 1) * 255).round() / 255
    levels = 2 ** math.ceil(math.log2(max(2, int(torch.unique(src).numel()))))
    noise = torch.poisson(src * levels, generator=gen) / levels - src
    return (img + noise * scale).clamp(0, 1)


_JPEG_LUMA = torch.tensor([
    [16, 11, 10, 16, 24, 40, 51, 61], [12, 12, 14, 19, 26, 58, 60, 55],
    [14, 13, 16, 24, 40, 57, 69, 56], [14, 17, 22, 29, 51, 87, 80, 62],
    [18, 22, 37, 56, 68, 109, 103, 77], [24, 35, 55, 64, 81, 104, 113, 92],
    [49, 64, 78, 87, 103, 121, 120, 101], [72, 92, 95, 98, 112, 100, 103, 99]], dtype=torch.float64)
_JPEG_CHROMA = torch.full((8, 8), 99.0, dtype=torch.float64)
_JPEG_CHROMA[:4, :4] = torch.tensor([[17, 18, 24, 47], [18, 21, 26, 66], [24, 26, 56, 99], [47, 66, 99, 99]],
                                    dtype=torch.float64)


def jpeg_table(base: torch.Tensor, quality: float) -> torch.Tensor:
    """IJG quality scaling of a base quantisation table."""
    q = min(max(int(round(quality)), 1), 100)
    s = 5000 / q if q < 50 else 200 - 2 * q
    return torch.floor((base * s + 50) / 100).clamp(1, 255)


def _dct_matrix(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    i = torch.arange(8, dtype=torch.float64)
    m = torch.cos((2 * i[None, :] + 1) * i[:, None] * math.pi / 16) * math.sqrt(2 / 8)
    m[0] /= math.sqrt(2)
    return m.to(device, dtype)


def _jpeg_plane(x: torch.Tensor, table: torch.Tensor, dct: torch.Tensor) -> torch.Tensor:
    """Quantise one (N, H, W) plane (H, W multiples of 8; values centred on 0) through the DCT."""
    n, h, w = x.shape
    blocks = x.reshape(n, h // 8, 8, w // 8, 8).transpose(2, 3)  # (n, bh, bw, 8, 8)
    coef = dct @ blocks @ dct.T
    coef = torch.round(coef / table) * table
    out = dct.T @ coef @ dct
    return out.transpose(2, 3).reshape(n, h, w)


def jpeg(img: torch.Tensor, quality: float) -> torch.Tensor:
    """Baseline JPEG round trip of (N, 3, H, W) in [0, 1]: YCbCr, 4:2:0, 8x8 DCT, IJG tables."""
    n, _, h, w = img.shape
    ph, pw = (-h) % 16, (-w) % 16
    x = F.pad(img.clamp(0, 1) * 255, (0, pw, 0, ph), mode="replicate")
    r, g, b = x.unbind(1)
    y = 0.299 * r + 0.587 * g + 0.114 * b
    cb = -0.168736 * r - 0.331264 * g + 0.5 * b + 128
    cr = 0.5 * r - 0.418688 * g - 0.081312 * b + 128
    cbcr = F.avg_pool2d(torch.stack([cb, cr], 1), 2)
    dct = _dct_matrix(img.device, img.dtype)
    luma = jpeg_table(_JPEG_LUMA, quality).to(img.device, img.dtype)
    chroma = jpeg_table(_JPEG_CHROMA, quality).to(img.device, img.dtype)
    y = _jpeg_plane(y - 128, luma, dct) + 128
    hc, wc = cbcr.shape[-2:]
    c = _jpeg_plane(cbcr.reshape(n * 2, hc, wc) - 128, chroma, dct).reshape(n, 2, hc, wc) + 128
    c = F.interpolate(c, scale_factor=2, mode="bilinear", align_corners=False)
    cb, cr = c[:, 0] - 128, c[:, 1] - 128
    rgb = torch.stack([y + 1.402 * cr, y - 0.344136 * cb - 0.714136 * cr, y + 1.772 * cb], 1)
    return (rgb[..., :h, :w] / 255).clamp(0, 1)


# ---------------------------------------------------------------------------------------------
# The chain
# ---------------------------------------------------------------------------------------------


class RealESRGANDegradation:
    """Second-order Real-ESRGAN degradation: ``deg(hr, generator=g)`` -> LR.

    ``hr``: (B, 3, H, W) float in [0, 1] on any device, H and W divisible by `scale`.
    Returns (B, 3, H/scale, W/scale) in [0, 1] on 1/255 steps, same device and dtype.
    """

    def __init__(self, cfg: DegradationConfig | None = None, scale: int = 4):
        self.cfg = cfg or DegradationConfig()
        self.scale = scale

    def sample_params(self, draw: _Draw) -> dict:
        """All random choices of one sample (kernels as float64 (21, 21) tensors)."""
        cfg = self.cfg
        p: dict[str, Any] = {}
        one, two = cfg.first, cfg.second
        p["blur1"] = one.blur_prob >= 1 or draw.chance(one.blur_prob)  # certain: no draw (x4plus always blurs)
        p["kind1"], p["kernel1"] = _blur_kernel(draw, cfg, one)
        p["resize1"] = self._resize_choice(draw, one)
        p["noise1"] = self._noise_choice(draw, one)
        p["jpeg1"] = draw.uniform(*one.jpeg_range)
        p["blur2"] = draw.chance(two.blur_prob)
        p["kind2"], p["kernel2"] = _blur_kernel(draw, cfg, two)
        p["resize2"] = self._resize_choice(draw, two)
        p["noise2"] = self._noise_choice(draw, two)
        p["jpeg2"] = draw.uniform(*two.jpeg_range)
        if draw.chance(cfg.final_sinc_prob):
            size = draw.choice(cfg.kernel_range)
            p["kind3"], p["kernel3"] = "sinc", _pad_kernel(sinc_kernel(size, draw.uniform(math.pi / 3, math.pi)))
        else:
            p["kind3"], p["kernel3"] = "pulse", _pulse()
        p["final_mode"] = draw.choice(_MODES)
        p["resize_then_jpeg"] = draw.chance(0.5)
        return p

    @staticmethod
    def _resize_choice(draw: _Draw, stage: DegradationPass) -> tuple[float, str]:
        rng = stage.resize_range
        kind = draw.choice(["up", "down", "keep"], stage.resize_prob)
        scale = {"up": lambda: draw.uniform(1.0, rng[1]), "down": lambda: draw.uniform(rng[0], 1.0),
                 "keep": lambda: 1.0}[kind]()
        return scale, draw.choice(_MODES)

    @staticmethod
    def _noise_choice(draw: _Draw, stage: DegradationPass) -> tuple[str, float, bool]:
        if draw.chance(stage.gaussian_noise_prob):
            return "gaussian", draw.uniform(*stage.noise_range), draw.chance(stage.gray_noise_prob)
        return "poisson", draw.uniform(*stage.poisson_scale_range), draw.chance(stage.gray_noise_prob)

    @staticmethod
    def _noise(img: torch.Tensor, choice: tuple[str, float, bool], gen: torch.Generator) -> torch.Tensor:
        kind, amount, gray = choice
        if kind == "gaussian":
            return gaussian_noise(img, amount, gray, gen)
        return poisson_noise(img, amount, gray, gen)

    def degrade_one(self, hr: torch.Tensor, p: dict, gen: torch.Generator) -> torch.Tensor:
        """Run the chain on one (1, 3, H, W) image with parameters `p`."""
        h, w = hr.shape[-2:]
        s = self.scale
        # first order
        out = filter2d(hr, p["kernel1"]) if p.get("blur1", True) else hr
        scale, mode = p["resize1"]
        out = resize(out, (h * scale, w * scale), mode)
        out = self._noise(out, p["noise1"], gen)
        out = jpeg(out, p["jpeg1"])
        # second order
        if p["blur2"]:
            out = filter2d(out, p["kernel2"])
        scale, mode = p["resize2"]
        out = resize(out, (h / s * scale, w / s * scale), mode)
        out = self._noise(out, p["noise2"], gen)
        # final: [resize back + sinc] and JPEG, in random order
        if p["resize_then_jpeg"]:
            out = filter2d(resize(out, (h // s, w // s), p["final_mode"]), p["kernel3"])
            out = jpeg(out, p["jpeg2"])
        else:
            out = jpeg(out, p["jpeg2"])
            out = filter2d(resize(out, (h // s, w // s), p["final_mode"]), p["kernel3"])
        return (out.clamp(0, 1) * 255).round() / 255

    @torch.no_grad()
    def __call__(self, hr: torch.Tensor, generator: torch.Generator | None = None,
                 return_params: bool = False) -> torch.Tensor | tuple[torch.Tensor, list[dict]]:
        if hr.ndim != 4 or hr.shape[1] != 3:
            raise ValueError(f"RealESRGANDegradation expects (B, 3, H, W), got {tuple(hr.shape)}")
        if hr.shape[-2] % self.scale or hr.shape[-1] % self.scale:
            raise ValueError(f"HR size {tuple(hr.shape[-2:])} is not divisible by scale={self.scale}")
        draw = _Draw(generator)
        dtype = hr.dtype
        x = hr.float()
        params = [self.sample_params(draw) for _ in range(x.shape[0])]
        gen = draw.device_gen(x.device)
        lr = torch.cat([self.degrade_one(x[i:i + 1], p, gen) for i, p in enumerate(params)]).to(dtype)
        return (lr, params) if return_params else lr


class Degrader:
    """HR batch -> LR batch on the HR's device, as a stage configures it: the Real-ESRGAN chain
    (``degradation.kind=realesrgan``) or plain bicubic downsampling with 8-bit rounding (``bicubic``)."""

    def __init__(self, cfg: DegradationConfig, scale: int):
        self.kind, self.scale = cfg.kind, scale
        self.chain = RealESRGANDegradation(cfg, scale)

    def __call__(self, hr: torch.Tensor, generator: torch.Generator | None = None,
                 seeds: list[int] | None = None) -> torch.Tensor:
        """`seeds`: one per image, each image degraded from its own seed (rank-independent); else the
        draws come from `generator`."""
        if self.kind == "bicubic":
            lr = F.interpolate(hr, scale_factor=1 / self.scale, mode="bicubic", align_corners=False, antialias=True)
            return (lr.clamp(0, 1) * 255).round() / 255
        if seeds is None:
            return self.chain(hr, generator=generator)
        return torch.cat([self.chain(hr[i:i + 1], generator=torch.Generator().manual_seed(int(sd)))
                          for i, sd in enumerate(seeds)])
