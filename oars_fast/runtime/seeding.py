"""Seeds and RNG state: one seeding helper (:func:`derive_seeds`) for every random draw that must not
depend on the rank, the micro-batch or the device; the global streams, saved as plain data."""
from __future__ import annotations

import random

import numpy as np
import torch


def derive_seeds(seeds, *tags: int) -> list[int]:
    """Independent 62-bit seeds from per-sample seeds and integer tags (e.g. step, purpose): the
    randomness of a sample depends on the sample, never on which rank or micro-batch it landed in."""
    return [int(np.random.default_rng((int(s), *(int(t) for t in tags))).integers(2**62)) for s in seeds]


def derive_seed(seed: int, *tags: int) -> int:
    """One seed from a seed and integer tags (:func:`derive_seeds` of one)."""
    return derive_seeds([seed], *tags)[0]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def seed_rank(seed: int, dist) -> None:
    """After set-up: each rank its own global RNG stream (with one process the stream is left as it is).
    What must agree across ranks (data, degradation, t, noise, rollout seeds) is seeded per sample."""
    if dist.world > 1:
        seed_everything(int(derive_seed(seed, dist.rank)))


def rng_state() -> dict:
    """The global RNG streams as plain data (lists, ints and tensors: loadable with weights_only=True)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(), "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)],
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
