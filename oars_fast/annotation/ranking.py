"""Stage 2 of the COMPASS annotation: aggregate exhaustive intra-group pairwise comparisons into r in [0, 1].

A group is the K SR candidates of one LR input. ``prefs`` is a (K, K) matrix with ``prefs[i, j]`` the share of
comparisons that candidate i won against candidate j: 1 (i beats j), 0 (j beats i), 0.5 (tie, "similar"); values
in between come from averaging several comparisons (e.g. both presentation orders, see :func:`preference_matrix`).
Off the diagonal ``prefs[i, j] + prefs[j, i] == 1``; the diagonal is ignored.

* :func:`win_rate` (the default): ``r[i] = mean_{j != i} prefs[i, j]``.
* :func:`bradley_terry`: Bradley-Terry strengths fitted with the MM algorithm of Hunter (2004, "MM algorithms for
  generalized Bradley-Terry models", Ann. Statist.), ties split as half wins, plus a small symmetric prior, then
  mapped to [0, 1] as each candidate's mean win probability against the rest of its group (see the function).
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import numpy as np

Outcome = Literal["A", "B", "similar"]
_OUTCOME_VALUE = {"A": 1.0, "B": 0.0, "similar": 0.5}


def _as_prefs(prefs: Any) -> np.ndarray:
    """Validated float64 copy of a (K, K) preference matrix (numpy, torch or nested lists)."""
    if hasattr(prefs, "detach"):  # torch tensor, without importing torch here
        prefs = prefs.detach().cpu().numpy()
    p = np.array(prefs, dtype=np.float64)
    if p.ndim != 2 or p.shape[0] != p.shape[1]:
        raise ValueError(f"prefs must be a square (K, K) matrix, got shape {tuple(p.shape)}")
    k = p.shape[0]
    if k < 2:
        raise ValueError(f"a group needs at least 2 candidates to rank, got K={k}")
    off = ~np.eye(k, dtype=bool)
    if not np.isfinite(p[off]).all():
        i, j = np.argwhere(~np.isfinite(p) & off)[0]
        raise ValueError(f"prefs[{i}, {j}] is not finite ({p[i, j]}); every off-diagonal pair needs an outcome")
    if (p[off] < 0).any() or (p[off] > 1).any():
        i, j = np.argwhere(((p < 0) | (p > 1)) & off)[0]
        raise ValueError(f"prefs values must lie in [0, 1] (1 win, 0.5 tie, 0 loss); prefs[{i}, {j}] = {p[i, j]}")
    asym = np.abs(p + p.T - 1.0)
    asym[~off] = 0.0
    if asym.max() > 1e-6:
        i, j = np.unravel_index(int(asym.argmax()), asym.shape)
        raise ValueError(f"prefs[i, j] + prefs[j, i] must be 1 (one outcome per pair); at ({i}, {j}) it is "
                         f"{p[i, j]} + {p[j, i]}. Build the matrix with preference_matrix()")
    np.fill_diagonal(p, 0.0)
    return p


def win_rate(prefs: Any) -> np.ndarray:
    """Mean share of wins of each candidate against the others (ties count 0.5): (K,) float64 in [0, 1]."""
    p = _as_prefs(prefs)
    return p.sum(1) / (p.shape[0] - 1)


def bradley_terry(prefs: Any, iters: int = 1000, tol: float = 1e-10, prior: float = 0.1) -> np.ndarray:
    """Bradley-Terry ranking score of each candidate, (K,) float64 in [0, 1].

    Model: ``P(i beats j) = p_i / (p_i + p_j)``. Fitted with Hunter's MM update
    ``p_i <- W_i / sum_{j != i} n_ij / (p_i + p_j)``, where ``W_i = sum_j prefs[i, j]`` (ties are half wins) and
    ``n_ij = 1`` comparison per pair. ``prior`` adds that many virtual comparisons per pair, split half/half, so a
    candidate that wins (or loses) everything keeps a finite strength; ``prior=0`` is the plain maximum likelihood
    estimate (which diverges for such a candidate). Iterates until the largest change of ``log p`` is below ``tol``
    (or ``iters`` updates); strengths are normalised to geometric mean 1 after each update.

    Mapping to [0, 1]: ``r_i = mean_{j != i} p_i / (p_i + p_j)``, the model's mean win probability against the
    group. It is on the same scale as :func:`win_rate` (all ties give 0.5 each, a consistent total order gives
    evenly spread values), and unlike a min-max rescaling it does not stretch tiny differences to the full range.
    """
    if prior < 0:
        raise ValueError(f"prior must be >= 0, got {prior}")
    if iters < 1:
        raise ValueError(f"iters must be >= 1, got {iters}")
    p = _as_prefs(prefs)
    k = p.shape[0]
    off = ~np.eye(k, dtype=bool)
    wins = p.sum(1) + prior * (k - 1) / 2.0
    n = (1.0 + prior) * off  # comparisons per pair: prefs[i, j] + prefs[j, i] == 1, plus the prior
    pos = wins > 0  # with prior=0 a candidate that never wins has strength exactly 0 (the ML estimate)
    s = pos.astype(np.float64)
    for _ in range(iters):
        pair = s[:, None] + s[None, :]  # > 0 off the diagonal: of any pair at least one has wins > 0
        np.fill_diagonal(pair, 1.0)
        new = wins / (n / pair).sum(1)
        new[pos] /= np.exp(np.log(new[pos]).mean())
        change = np.abs(np.log(new[pos]) - np.log(s[pos])).max()
        s = new
        if change < tol:
            break
    pair = s[:, None] + s[None, :]
    np.fill_diagonal(pair, 1.0)
    prob = s[:, None] / pair
    np.fill_diagonal(prob, 0.0)
    return prob.sum(1) / (k - 1)


def preference_matrix(k: int, compare: Callable[[int, int], Outcome], both_orders: bool = True) -> np.ndarray:
    """Exhaustively compare K candidates; returns the (K, K) ``prefs`` matrix for :func:`win_rate`.

    ``compare(i, j)`` shows candidate i as "A" and j as "B" and returns "A", "B" or "similar". With
    ``both_orders`` every pair is also shown swapped and the two outcomes are averaged (cancels a comparator's
    position bias; entries can then be 0.25 / 0.75). Calls: K(K-1)/2 pairs, twice with ``both_orders``.
    """
    if k < 2:
        raise ValueError(f"a group needs at least 2 candidates to compare, got K={k}")
    p = np.zeros((k, k))
    for i in range(k):
        for j in range(i + 1, k):
            v = _outcome(compare(i, j), i, j)
            if both_orders:
                v = 0.5 * (v + 1.0 - _outcome(compare(j, i), j, i))
            p[i, j], p[j, i] = v, 1.0 - v
    return p


def _outcome(o: str, i: int, j: int) -> float:
    if o not in _OUTCOME_VALUE:
        raise ValueError(f"compare({i}, {j}) returned {o!r}; expected one of {sorted(_OUTCOME_VALUE)}")
    return _OUTCOME_VALUE[o]
