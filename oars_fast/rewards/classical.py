"""Classical rewards: stand-ins for the learned ones on machines without their weights (the CPU demo).

* :class:`SSIMReward` (full reference): SSIM of SR vs GT on luma (Gaussian window 11, sigma 1.5),
  clamped to [0, 1]. Stands in for DISTS where the VGG16 weights are absent; named in logs.
* :class:`LRConsistencyReward` (no reference): how well the SR, downsampled back (area), matches
  the LR input: ``exp(-mean|down(SR) - LR| / tau)`` in (0, 1]. Stands in for COMPASS until it lands;
  it rewards fidelity only (no perceptual quality term), so it is a weak NR signal by design.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _luma(x: torch.Tensor) -> torch.Tensor:
    w = torch.tensor([0.299, 0.587, 0.114], device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x * w).sum(1, keepdim=True)


def ssim(x: torch.Tensor, y: torch.Tensor, window: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Mean SSIM per image of luma, images in [0, 1] (B, 3, H, W) -> (B,)."""
    ax = torch.arange(window, dtype=torch.float32, device=x.device) - (window - 1) / 2
    g = torch.exp(-ax**2 / (2 * sigma**2))
    g = (g / g.sum()).to(x.dtype)
    k = (g[:, None] * g[None, :])[None, None]
    a, b = _luma(x), _luma(y)
    win = min(window, a.shape[-1], a.shape[-2])
    if win < window:  # tiny images: shrink the window
        k = F.interpolate(k, size=(win, win), mode="bilinear", align_corners=False)
        k = k / k.sum()
    mu_a, mu_b = F.conv2d(a, k), F.conv2d(b, k)
    saa = F.conv2d(a * a, k) - mu_a**2
    sbb = F.conv2d(b * b, k) - mu_b**2
    sab = F.conv2d(a * b, k) - mu_a * mu_b
    c1, c2 = 0.01**2, 0.03**2
    s = ((2 * mu_a * mu_b + c1) * (2 * sab + c2)) / ((mu_a**2 + mu_b**2 + c1) * (saa + sbb + c2))
    return s.flatten(1).mean(1)


class SSIMReward:
    name = "ssim (classical stand-in for DISTS)"

    @torch.no_grad()
    def __call__(self, lr, sr, gt, group_index):
        if gt is None:
            raise ValueError("the SSIM reward is full-reference: this data set has no ground truth")
        s = ssim(sr.float(), gt[group_index].float())
        return s.clamp(0, 1), {"ssim": s}


class LRConsistencyReward:
    name = "lr_consistency (classical stand-in for COMPASS)"

    def __init__(self, tau: float = 0.05):
        self.tau = tau

    @torch.no_grad()
    def __call__(self, lr, sr, gt, group_index):
        down = F.interpolate(sr.float(), size=lr.shape[-2:], mode="area")
        err = (down - lr.float()).abs().flatten(1).mean(1)
        return torch.exp(-err / self.tau), {"lr_l1": err}
