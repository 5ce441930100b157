"""Evaluation metrics for 4x super-resolution, in the conventions of SR benchmarks.

Image metrics (:mod:`.metrics`) take float tensors in [0, 1], shape (B, 3, H, W), RGB, and return (B,)
float64 tensors:

* images are clamped and rounded to 8 bits first (``round(x * 255)``); data range 255;
* ``y_channel=True`` uses the ITU-R BT.601 studio-swing luma ``Y = 16 + 65.481 R + 128.553 G + 24.966 B``
  (R, G, B in [0, 1], Y in [16, 235]), computed in float from the 8-bit RGB, not re-rounded (BasicSR;
  MATLAB's ``rgb2ycbcr`` rounds Y);
* ``crop_border`` pixels are removed from each side (use the scale factor, e.g. 4, to match papers);
* :func:`psnr` (RGB by default) returns ``+inf`` for identical images;
* :func:`ssim` (Y by default): Gaussian 11x11 window, sigma 1.5, K1 = 0.01, K2 = 0.03, valid filtering,
  mean over the map (and over channels on RGB), as BasicSR / MATLAB ``ssim_index`` / scikit-image with
  ``gaussian_weights=True, use_sample_covariance=False``;
* :func:`lr_consistency`: RGB PSNR of the SR, downsampled to the LR size by antialiased bicubic
  (``F.interpolate(..., mode="bicubic", antialias=True)``), against the LR.

Preference metrics (:mod:`.pairs`): :func:`pairwise_accuracy` / :func:`pairwise_report` score a quality
predictor against within-group human pairwise preferences (1 / 0 / 0.5 = win / loss / tie), predicting a
tie when two scores differ by at most ``delta``; accuracy is pooled over all pairs of all groups.
"""
from .metrics import lr_consistency, psnr, quantize, rgb_to_y, ssim
from .pairs import LABELS, PairwiseReport, pairwise_accuracy, pairwise_report

__all__ = [
    "LABELS",
    "PairwiseReport",
    "lr_consistency",
    "pairwise_accuracy",
    "pairwise_report",
    "psnr",
    "quantize",
    "rgb_to_y",
    "ssim",
]
