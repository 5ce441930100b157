"""The reward protocol every RL reward implements.

``reward(lr, sr, gt, group_index) -> (scores, parts)``

* ``lr``  (B, 3, h, w) LR inputs in [0, 1], one row per candidate;
* ``sr``  (B, 3, H, W) the candidates in [0, 1];
* ``gt``  (G, 3, H, W) one ground truth per group, or None (no-reference rewards);
* ``group_index`` (B,) long: the group (row of ``gt``) of each candidate;
* ``scores`` (B,) float32 in [0, 1] (the RL stage filters groups on this scale);
* ``parts`` named (B,) tensors for logs (e.g. the raw metric).
"""
from __future__ import annotations

from typing import Protocol

import torch

from .dists import DISTS


class RewardFn(Protocol):
    name: str

    def __call__(self, lr: torch.Tensor, sr: torch.Tensor, gt: torch.Tensor | None,
                 group_index: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]: ...


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
