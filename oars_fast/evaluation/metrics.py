"""Full-reference metrics in the SR-benchmark convention (BasicSR / the MATLAB scripts of SR papers).

All public functions take float tensors in [0, 1] of shape (B, 3, H, W) (RGB) and return a (B,) float64
tensor on the input's device. The pipeline is:

1. :func:`quantize`: clamp to [0, 1], ``round(x * 255)`` in float64 (round half to even, as numpy and
   torch do; MATLAB's ``im2uint8`` rounds halves away from zero); everything after works on the 0..255
   scale with data range 255.
2. Optional Y channel (:func:`rgb_to_y`): ITU-R BT.601 "studio swing" Y,
   ``Y = 16 + 65.481 R + 128.553 G + 24.966 B`` (R, G, B in [0, 1]), i.e. in [16, 235]. As in BasicSR,
   Y is computed in floating point from the 8-bit RGB and *not* rounded again. MATLAB's ``rgb2ycbcr`` on
   uint8 rounds Y to uint8, which adds rounding noise: measured on scikit-image photos with blur / noise /
   JPEG / bicubic distortions, Y-PSNR drops by 0.004-0.025 dB at 26-33 dB (more at higher PSNR) and SSIM
   by ~1e-3, so compare with MATLAB-computed tables at that precision. PSNR on Y keeps the data range 255
   (not 219), as BasicSR and the papers do.
3. ``crop_border`` pixels removed from each side (the usual choice is ``crop_border = scale``).
4. PSNR: ``10 log10(255^2 / MSE)`` with the MSE over all kept pixels (and channels). Identical images
   give ``+inf``.
   SSIM (Wang et al. 2004): 11x11 Gaussian window, sigma 1.5 (normalised to sum 1), K1 = 0.01,
   K2 = 0.03, population (biased) variances, *valid* filtering (no padding), mean over the SSIM map; on
   RGB the mean over the three channels. This equals BasicSR's ``calculate_ssim``, MATLAB's
   ``ssim_index`` and scikit-image's ``structural_similarity(gaussian_weights=True, sigma=1.5,
   use_sample_covariance=False, data_range=255)``: scikit-image filters with reflect padding but then
   drops (11 - 1) / 2 = 5 pixels on each side before averaging, which leaves exactly the valid region.
"""
from __future__ import annotations

import numbers

import torch

from ..models.consistency import downsample

__all__ = ["lr_consistency", "psnr", "quantize", "rgb_to_y", "ssim"]

_Y_WEIGHTS = (65.481, 128.553, 24.966)  # BT.601, R, G, B in [0, 1] -> Y in [16, 235]
_Y_OFFSET = 16.0
_SSIM_WIN = 11
_SSIM_SIGMA = 1.5
_SSIM_K1, _SSIM_K2 = 0.01, 0.03
_DATA_RANGE = 255.0


def _check_image(x: torch.Tensor, name: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4 or x.shape[1] != 3:
        raise ValueError(f"{name} must have shape (B, 3, H, W), got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a float tensor in [0, 1], got dtype {x.dtype}")


def _check_pair(sr: torch.Tensor, hr: torch.Tensor, crop_border: int, min_size: int = 1) -> None:
    _check_image(sr, "sr")
    _check_image(hr, "hr")
    if sr.shape != hr.shape:
        raise ValueError(f"sr and hr shapes differ: {tuple(sr.shape)} vs {tuple(hr.shape)}")
    if isinstance(crop_border, bool) or not isinstance(crop_border, numbers.Integral) or crop_border < 0:
        raise ValueError(f"crop_border must be a non-negative int, got {crop_border!r}")
    h, w = sr.shape[-2:]
    if min(h, w) - 2 * crop_border < min_size:
        raise ValueError(
            f"crop_border={crop_border} too large for a {h}x{w} image "
            f"(need at least {min_size} pixel(s) left in each dimension after cropping both sides)"
        )


def quantize(x: torch.Tensor) -> torch.Tensor:
    """Clamp to [0, 1] and round to 8-bit levels: returns float64 values in {0, 1, ..., 255}."""
    return torch.round(x.detach().to(torch.float64).clamp(0.0, 1.0) * 255.0)


def rgb_to_y(x: torch.Tensor) -> torch.Tensor:
    """BT.601 studio-swing luma of RGB in [0, 1], (B, 3, H, W) -> (B, 1, H, W) in [16/255, 235/255].

    ``Y = (16 + 65.481 R + 128.553 G + 24.966 B) / 255``; no rounding, dtype kept (use float64 for metrics).
    """
    _check_image(x, "x")
    w = torch.tensor(_Y_WEIGHTS, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (_Y_OFFSET + (x * w).sum(dim=1, keepdim=True)) / 255.0


def _prepare(x: torch.Tensor, crop_border: int, y_channel: bool) -> torch.Tensor:
    """8-bit quantisation, optional Y, border crop; float64 on the 0..255 scale."""
    q = quantize(x)
    if y_channel:
        q = rgb_to_y(q / 255.0) * 255.0
    if crop_border:
        q = q[..., crop_border:-crop_border, crop_border:-crop_border]
    return q


def psnr(sr: torch.Tensor, hr: torch.Tensor, crop_border: int = 0, y_channel: bool = False) -> torch.Tensor:
    """PSNR in dB per image, (B, 3, H, W) pairs in [0, 1] -> (B,) float64; ``+inf`` where the 8-bit images
    are identical, NaN where an input holds NaN.

    8-bit rounding, data range 255, ``crop_border`` pixels cut from each side, RGB (MSE over all three
    channels) or the BT.601 Y channel (``y_channel=True``). See the module docstring.
    """
    _check_pair(sr, hr, crop_border)
    crop_border = int(crop_border)
    a = _prepare(sr, crop_border, y_channel)
    b = _prepare(hr, crop_border, y_channel)
    mse = (a - b).pow(2).flatten(1).mean(dim=1)
    # Identical 8-bit images: MSE is exactly 0 and torch gives 10 log10(255^2 / 0) = +inf (no warning).
    # NaN inputs propagate to NaN.
    return 10.0 * torch.log10(_DATA_RANGE**2 / mse)


def _gaussian_1d(size: int, sigma: float, device: torch.device) -> torch.Tensor:
    ax = torch.arange(size, dtype=torch.float64, device=device) - (size - 1) / 2.0
    g = torch.exp(-(ax**2) / (2.0 * sigma**2))
    return g / g.sum()


def ssim(sr: torch.Tensor, hr: torch.Tensor, crop_border: int = 0, y_channel: bool = True) -> torch.Tensor:
    """Mean SSIM per image, (B, 3, H, W) pairs in [0, 1] -> (B,) float64 (1.0 for identical images).

    8-bit rounding, data range 255, ``crop_border`` pixels cut from each side, then Gaussian 11x11 /
    sigma 1.5 SSIM with valid filtering on the Y channel (default) or per RGB channel, averaged. The
    cropped image must be at least 11x11. See the module docstring.
    """
    _check_pair(sr, hr, crop_border, min_size=_SSIM_WIN)
    crop_border = int(crop_border)
    a = _prepare(sr, crop_border, y_channel)
    b = _prepare(hr, crop_border, y_channel)
    # Filter the five moment maps of every channel at once: separable, valid (sliding windows @ kernel,
    # ~2x faster on CPU than a grouped float64 conv2d).
    maps = torch.stack([a, b, a * a, b * b, a * b], dim=2)  # (B, C, 5, H, W)
    g = _gaussian_1d(_SSIM_WIN, _SSIM_SIGMA, a.device)
    maps = maps.unfold(-1, _SSIM_WIN, 1) @ g  # rows:    (B, C, 5, H, W - 10)
    maps = maps.unfold(-2, _SSIM_WIN, 1) @ g  # columns: (B, C, 5, H - 10, W - 10)
    mu_a, mu_b, e_aa, e_bb, e_ab = maps.unbind(dim=2)
    var_a = e_aa - mu_a**2
    var_b = e_bb - mu_b**2
    cov = e_ab - mu_a * mu_b
    c1 = (_SSIM_K1 * _DATA_RANGE) ** 2
    c2 = (_SSIM_K2 * _DATA_RANGE) ** 2
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return s.flatten(1).mean(dim=1)  # equal-size maps: mean over all = mean of per-channel means


def lr_consistency(sr: torch.Tensor, lr: torch.Tensor, scale: int | None = None) -> torch.Tensor:
    """PSNR (dB, RGB, 8-bit, no crop) of the SR downsampled to the LR size against the LR -> (B,) float64.

    Downsampling: :func:`oars_fast.models.consistency.downsample`, i.e.
    ``F.interpolate(mode="bicubic", antialias=True, align_corners=False)`` to the LR size,
    i.e. a Keys cubic (a = -0.5) widened by the scale factor: the same filter as PIL's float ("F" mode)
    ``Image.resize(BICUBIC)`` and close to (not bit-identical with) MATLAB's ``imresize``; the result is
    clamped to [0, 1] before the 8-bit rounding. ``scale`` (if given) must match the SR / LR sizes; if
    None, the SR size must be the same integer multiple of the LR size in both dimensions.
    """
    _check_image(sr, "sr")
    _check_image(lr, "lr")
    if sr.shape[0] != lr.shape[0]:
        raise ValueError(f"sr and lr batch sizes differ: {sr.shape[0]} vs {lr.shape[0]}")
    (sh, sw), (lh, lw) = sr.shape[-2:], lr.shape[-2:]
    if scale is None:
        if sh % lh or sw % lw or sh // lh != sw // lw:
            raise ValueError(f"sr size {sh}x{sw} is not one integer multiple of lr size {lh}x{lw}")
    elif isinstance(scale, bool) or not isinstance(scale, numbers.Integral) or scale < 1:
        raise ValueError(f"scale must be a positive int or None, got {scale!r}")
    elif (sh, sw) != (lh * scale, lw * scale):
        raise ValueError(f"sr size {sh}x{sw} is not scale={scale} times lr size {lh}x{lw}")
    return psnr(downsample(sr.detach().to(torch.float64), (lh, lw)).clamp(0.0, 1.0), lr)
