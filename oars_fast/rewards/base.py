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


class RewardFn(Protocol):
    name: str

    def __call__(self, lr: torch.Tensor, sr: torch.Tensor, gt: torch.Tensor | None,
                 group_index: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]: ...
