"""Pairwise preference accuracy of a quality score (SRIQA-Bench style).

Each group g holds K_g images of one source (e.g. outputs of different SR methods), a score per image
(higher = better) and a (K_g, K_g) human preference matrix ``prefs[i, j]``: 1 if i beats j, 0 if j beats
i, 0.5 for a tie (the diagonal is ignored). Every unordered pair i < j of every group is one item; its
label is ``prefs[i, j]`` and the prediction is 0.5 when ``|s_i - s_j| <= delta``, else 1 if
``s_i > s_j`` else 0. A pair is correct when prediction == label; accuracy = correct / pairs over all
groups pooled (so groups with more images weigh more).
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

__all__ = ["LABELS", "PairwiseReport", "pairwise_accuracy", "pairwise_report"]

LABELS: tuple[float, float, float] = (0.0, 0.5, 1.0)
"""Order of the rows (label) and columns (prediction) of :attr:`PairwiseReport.confusion`."""


@dataclass(frozen=True)
class PairwiseReport:
    """Result of :func:`pairwise_report`.

    ``confusion[r, c]`` counts pairs with label ``LABELS[r]`` and prediction ``LABELS[c]``.
    ``group_accuracies[g]`` is NaN for a group with fewer than two images.
    """

    accuracy: float
    group_accuracies: list[float]
    group_num_pairs: list[int]
    num_pairs: int
    num_correct: int
    confusion: np.ndarray
    delta: float


def _to_numpy(x: Any, what: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().to("cpu", torch.float64).numpy()
    try:
        return np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{what} is not numeric: {exc}") from None


def _check_group(g: int, s: np.ndarray, p: np.ndarray) -> None:
    if s.ndim != 1:
        raise ValueError(f"group {g}: scores must be 1-D (K,), got shape {s.shape}")
    if not np.all(np.isfinite(s)):
        raise ValueError(f"group {g}: scores contain NaN or inf")
    k = s.shape[0]
    if p.ndim != 2 or p.shape[0] != p.shape[1]:
        raise ValueError(f"group {g}: prefs must be a square (K, K) matrix, got shape {p.shape}")
    if p.shape[0] != k:
        raise ValueError(f"group {g}: prefs is {p.shape[0]}x{p.shape[1]} but there are {k} scores")
    for i in range(k):
        for j in range(i + 1, k):
            if p[i, j] not in LABELS or p[j, i] not in LABELS:
                raise ValueError(
                    f"group {g}, pair ({i}, {j}): prefs values must be 0, 0.5 or 1, "
                    f"got prefs[{i},{j}]={p[i, j]}, prefs[{j},{i}]={p[j, i]}"
                )
            if p[i, j] + p[j, i] != 1.0:
                raise ValueError(
                    f"group {g}, pair ({i}, {j}): inconsistent prefs, prefs[{i},{j}] + prefs[{j},{i}] = "
                    f"{p[i, j]} + {p[j, i]} != 1"
                )


def pairwise_report(scores: Sequence[Any], prefs: Sequence[Any], delta: float = 0.0) -> PairwiseReport:
    """Pairwise accuracy with per-group accuracies, pair counts and the 3x3 label x prediction confusion.

    ``scores``: sequence of (K_g,) arrays / tensors; ``prefs``: sequence of (K_g, K_g) matrices (see the
    module docstring). Raises ValueError on mismatched or malformed inputs, inconsistent preferences
    (naming the group and pair), a negative / non-finite ``delta``, or no pairs at all.
    """
    if isinstance(delta, bool) or not isinstance(delta, numbers.Real) or not math.isfinite(delta) or delta < 0:
        raise ValueError(f"delta must be a finite number >= 0, got {delta!r}")
    if len(scores) != len(prefs):
        raise ValueError(f"got {len(scores)} score groups but {len(prefs)} preference matrices")
    confusion = np.zeros((3, 3), dtype=np.int64)
    group_acc: list[float] = []
    group_pairs: list[int] = []
    for g, (s_raw, p_raw) in enumerate(zip(scores, prefs, strict=True)):
        s = _to_numpy(s_raw, f"group {g} scores")
        p = _to_numpy(p_raw, f"group {g} prefs")
        _check_group(g, s, p)
        iu, ju = np.triu_indices(s.shape[0], k=1)
        label = p[iu, ju]
        diff = s[iu] - s[ju]
        pred = np.where(np.abs(diff) <= delta, 0.5, np.where(diff > 0, 1.0, 0.0))
        # LABELS are 0, 0.5, 1 -> indices 0, 1, 2.
        np.add.at(confusion, ((label * 2).astype(np.int64), (pred * 2).astype(np.int64)), 1)
        n = int(label.size)
        group_pairs.append(n)
        group_acc.append(float(np.mean(pred == label)) if n else math.nan)
    num_pairs = int(confusion.sum())
    if num_pairs == 0:
        raise ValueError("no pairs to compare: every group has fewer than two images (or there are no groups)")
    num_correct = int(np.trace(confusion))
    return PairwiseReport(
        accuracy=num_correct / num_pairs,
        group_accuracies=group_acc,
        group_num_pairs=group_pairs,
        num_pairs=num_pairs,
        num_correct=num_correct,
        confusion=confusion,
        delta=float(delta),
    )


def pairwise_accuracy(scores: Sequence[Any], prefs: Sequence[Any], delta: float = 0.0) -> float:
    """Fraction of within-group pairs i < j whose predicted preference (tie if ``|s_i - s_j| <= delta``)
    equals the human label, pooled over all groups. See :func:`pairwise_report` for validation."""
    return pairwise_report(scores, prefs, delta).accuracy
