"""DISTS (Ding et al., 2020), computed exactly as published, without torchvision.

* input in [0, 1], ImageNet-normalised for the network;
* VGG16 ``features`` with every max-pool replaced by L2 pooling: per channel,
  ``sqrt(conv(x^2, g) + 1e-12)`` with ``g`` the normalised outer product of the Hanning window
  [0.5, 1, 0.5], stride 2, padding 1;
* six levels: the raw RGB input, relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 (1475 channels);
* per channel, structure ``S1 = (2 mx my + c1)/(mx^2 + my^2 + c1)`` and texture
  ``S2 = (2 cov + c2)/(vx + vy + c2)`` over the spatial axes, c1 = c2 = 1e-6;
* ``D = 1 - sum(alpha*S1 + beta*S2)`` with alpha, beta (1, 1475, 1, 1) divided by their joint sum.

Weights: the VGG16 ``features`` in torchvision's ``vgg16()`` state-dict layout (``features.N.weight``
/ ``features.N.bias``; a file or a dict) and the published alpha/beta (``{'alpha', 'beta'}``,
``weights.pt`` of the DISTS release). :meth:`DISTS.features` computes one image's levels so a
ground truth is run through VGG once and compared with all K candidates of its group.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file

from ..errors import MissingFileError

CHANNELS = (3, 64, 128, 256, 512, 512)
# (features index, in, out) of every VGG16 conv; stages end at relu1_2, relu2_2, relu3_3, relu4_3, relu5_3
_CONVS = [(0, 3, 64), (2, 64, 64), (5, 64, 128), (7, 128, 128), (10, 128, 256), (12, 256, 256), (14, 256, 256),
          (17, 256, 512), (19, 512, 512), (21, 512, 512), (24, 512, 512), (26, 512, 512), (28, 512, 512)]
_STAGES = [(0, 2), (5, 7), (10, 12, 14), (17, 19, 21), (24, 26, 28)]
_MEAN = (0.485, 0.456, 0.406)
_STD = (0.229, 0.224, 0.225)
_HOW_TO_GET = ("VGG16 ImageNet weights in torchvision's layout (e.g. the file torchvision downloads for "
               "vgg16(weights='IMAGENET1K_V1'), vgg16-397923af.pth) and DISTS' weights.pt from its release "
               "(github.com/dingkeyan93/DISTS, DISTS_pytorch/weights.pt)")


def _load(src: str | Path | dict, what: str) -> dict:
    if isinstance(src, dict):
        return src
    path = Path(src).expanduser()
    if not path.is_file():
        raise MissingFileError(f"DISTS {what} file {path} not found: expected {_HOW_TO_GET}")
    if path.suffix == ".safetensors":
        return load_file(str(path))
    return torch.load(path, map_location="cpu", weights_only=True)


class L2Pool(nn.Module):
    """sqrt(depthwise conv(x^2, normalised Hanning [.5, 1, .5] outer product) + 1e-12), stride 2, padding 1."""

    def __init__(self, channels: int):
        super().__init__()
        a = torch.tensor([0.5, 1.0, 0.5])
        g = a[:, None] * a[None, :]
        self.register_buffer("filter", (g / g.sum()).expand(channels, 1, 3, 3).contiguous(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (F.conv2d(x * x, self.filter.to(x.dtype), stride=2, padding=1, groups=x.shape[1]) + 1e-12).sqrt()


class DISTS(nn.Module):
    """``DISTS(vgg, alphabeta)(x, y)`` -> distance (B,) in [0, 1] for images in [0, 1]."""

    def __init__(self, vgg: str | Path | dict, alphabeta: str | Path | dict):
        super().__init__()
        vgg_sd, ab = _load(vgg, "VGG16 weights"), _load(alphabeta, "alpha/beta weights")
        convs = {}
        for idx, cin, cout in _CONVS:
            conv = nn.Conv2d(cin, cout, 3, padding=1)
            try:
                w, b = vgg_sd[f"features.{idx}.weight"], vgg_sd[f"features.{idx}.bias"]
            except KeyError:
                raise KeyError(f"DISTS: the VGG16 weights lack features.{idx}.weight/bias; expected {_HOW_TO_GET}") \
                    from None
            if tuple(w.shape) != (cout, cin, 3, 3):
                raise ValueError(f"DISTS: features.{idx}.weight has shape {tuple(w.shape)}, "
                                 f"expected {(cout, cin, 3, 3)}")
            conv.weight.data.copy_(w)
            conv.bias.data.copy_(b)
            convs[idx] = conv
        self.stages = nn.ModuleList()
        for s, idxs in enumerate(_STAGES):
            layers: list[nn.Module] = [] if s == 0 else [L2Pool(CHANNELS[s])]
            for i in idxs:
                layers += [convs[i], nn.ReLU()]
            self.stages.append(nn.Sequential(*layers))
        n = sum(CHANNELS)
        for key in ("alpha", "beta"):
            if key not in ab or ab[key].numel() != n:
                raise ValueError(f"DISTS: alpha/beta weights must hold '{key}' with {n} values (shape (1, {n}, 1, 1))")
        self.register_buffer("alpha", ab["alpha"].reshape(1, n).float())
        self.register_buffer("beta", ab["beta"].reshape(1, n).float())
        self.register_buffer("mean", torch.tensor(_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(_STD).view(1, 3, 1, 1))
        self.requires_grad_(False)
        self.eval()

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The six levels of `x` (B, 3, H, W) in [0, 1]."""
        h = (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)
        feats = [x]
        for stage in self.stages:
            h = stage(h)
            feats.append(h)
        return feats

    def distance(self, fx: list[torch.Tensor], fy: list[torch.Tensor], c1: float = 1e-6,
                 c2: float = 1e-6) -> torch.Tensor:
        """D from precomputed levels; `fy` may have batch 1 (a ground truth shared by a group)."""
        w_sum = self.alpha.sum() + self.beta.sum()
        alphas = torch.split(self.alpha / w_sum, CHANNELS, dim=1)
        betas = torch.split(self.beta / w_sum, CHANNELS, dim=1)
        total = 0.0
        for x, y, a, b in zip(fx, fy, alphas, betas):
            mx, my = x.mean((2, 3)), y.mean((2, 3))
            vx = (x - mx[..., None, None]).pow(2).mean((2, 3))
            vy = (y - my[..., None, None]).pow(2).mean((2, 3))
            cov = (x * y).mean((2, 3)) - mx * my
            s1 = (2 * mx * my + c1) / (mx.pow(2) + my.pow(2) + c1)
            s2 = (2 * cov + c2) / (vx + vy + c2)
            total = total + (a.to(s1.dtype) * s1).sum(1) + (b.to(s2.dtype) * s2).sum(1)
        return 1 - total

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.distance(self.features(x), self.features(y))

    def group_distance(self, candidates: torch.Tensor, gt: torch.Tensor, group_index: torch.Tensor) -> torch.Tensor:
        """D of each candidate (B, 3, H, W) against its group's ground truth ``gt[group_index]``;
        each ground truth goes through VGG once, whatever the number of candidates."""
        fx = self.features(candidates)
        fg = self.features(gt)
        fy = [f[group_index] for f in fg]
        return self.distance(fx, fy)


class DISTSReward:
    """Full-reference reward ``1 - DISTS(SR, GT)``; each ground truth's VGG features once per group."""

    name = "dists"

    def __init__(self, dists: DISTS, batch_size: int = 32):
        self.dists = dists
        self.batch_size = batch_size

    @torch.no_grad()
    def __call__(self, lr, sr, gt, group_index):
        if gt is None:
            raise ValueError("the DISTS reward is full-reference: this data set has no ground truth "
                             "(use mode=nr with a no-reference reward)")
        d = torch.cat([self.dists.group_distance(sr[i:i + self.batch_size], gt, group_index[i:i + self.batch_size])
                       for i in range(0, sr.shape[0], self.batch_size)])
        return (1 - d).clamp(0, 1).float(), {"dists": d.float()}
