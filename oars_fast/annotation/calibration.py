"""Stage 3 of the COMPASS annotation: map a group's ranking scores onto the global quality scale, and trim.

Per group (the K candidates of one LR input) the ranking score r (stage 2, in [0, 1]) is fitted to the global anchor
scores (stage 1, on [1, 5]) by least squares, ``q_anchor ~ alpha * r + beta``, and the calibrated output quality is
``Q_SR = clip(alpha * r + beta, lo, hi)``: the ranking decides the order inside the group, the anchors its place and
spread on the global scale. :func:`trim` then drops the samples where anchor and calibration disagree most (the
paper removes conflicting samples before training COMPASS).
"""
from __future__ import annotations

from typing import Any

import numpy as np


def _vector(x: Any, name: str) -> np.ndarray:
    if hasattr(x, "detach"):  # torch tensor
        x = x.detach().cpu().numpy()
    v = np.array(x, dtype=np.float64)
    if v.ndim != 1 or v.size == 0:
        raise ValueError(f"{name} must be a non-empty 1-D sequence, got shape {tuple(v.shape)}")
    return v


def calibrate(r: Any, q_anchor: Any, lo: float = 1.0, hi: float = 5.0,
              nonnegative: bool = False) -> tuple[float, float, np.ndarray]:
    """Least-squares fit ``q_anchor ~ alpha * r + beta`` in one group; returns ``(alpha, beta, q_sr)``.

    ``r``: (K,) ranking scores; ``q_anchor``: (K,) global anchor scores; ``q_sr = clip(alpha * r + beta, lo, hi)``
    for every candidate, shape (K,).

    * Only candidates with a finite anchor enter the fit (an MLLM anchor that could not be parsed is NaN); they
      still receive a ``q_sr``. No finite anchor at all raises ``ValueError``.
    * Degenerate group (all fitted r equal, or a single finite anchor): the slope is undetermined, so
      ``alpha = 0`` and ``beta = mean(q_anchor)``: every candidate gets the group's mean anchor.
    * ``alpha < 0`` means the ranker and the anchors disagree on the group's order. With ``nonnegative=True``
      such a fit is replaced by the constrained least-squares optimum under ``alpha >= 0``, which is the
      degenerate solution above. Default False (the paper's plain least squares).
    """
    rv, qv = _vector(r, "r"), _vector(q_anchor, "q_anchor")
    if rv.shape != qv.shape:
        raise ValueError(f"r and q_anchor must have the same length, got {rv.size} and {qv.size}")
    if not np.isfinite(rv).all():
        raise ValueError(f"r must be finite, got {rv.tolist()}")
    if not lo <= hi:
        raise ValueError(f"need lo <= hi, got lo={lo}, hi={hi}")
    fit = np.isfinite(qv)
    if not fit.any():
        raise ValueError("calibrate: no finite anchor score in this group; score the group again or drop it")
    rf, qf = rv[fit], qv[fit]
    dr = rf - rf.mean()
    var = float(dr @ dr)
    if var <= 1e-24 * max(1.0, float(rf @ rf)):
        alpha, beta = 0.0, float(qf.mean())
    else:
        alpha = float(dr @ (qf - qf.mean())) / var
        beta = float(qf.mean() - alpha * rf.mean())
        if nonnegative and alpha < 0:
            alpha, beta = 0.0, float(qf.mean())
    return alpha, beta, np.clip(alpha * rv + beta, lo, hi)


def n_trimmed(n: int, fraction: float) -> int:
    """How many of n samples :func:`trim` drops: ``floor(fraction * n + 0.5)`` (nearest, halves round up)."""
    return int(np.floor(fraction * n + 0.5))


def trim(disagreement: Any, fraction: float) -> np.ndarray:
    """Keep mask (bool, shape (n,)) that drops the ``n_trimmed(n, fraction)`` samples of largest disagreement.

    ``disagreement`` is typically ``|q_anchor - q_sr|`` over the whole data set. Rounding: the number dropped is
    ``floor(fraction * n + 0.5)`` (e.g. 5% of 30 = 1.5 -> 2; of 1000 -> 50), never more than n. Ties are broken
    deterministically: among equal values the lower index is dropped first. NaN counts as the largest
    disagreement (an unscored sample is dropped before any scored one).
    """
    d = _vector(disagreement, "disagreement")
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be in [0, 1], got {fraction}")
    n = d.size
    k = min(n_trimmed(n, fraction), n)
    key = np.where(np.isnan(d), np.inf, d)
    order = np.lexsort((np.arange(n), -key))  # largest first; lower index first among equals
    keep = np.ones(n, dtype=bool)
    keep[order[:k]] = False
    return keep
