"""Crash-safe checkpoints: written to ``<name>.tmp`` and renamed when complete.

A checkpoint is a folder ``checkpoints/step_000123/`` holding whatever the stage writes (every
rank's DeepSpeed shards and ``rank_N.pt``, rank 0's consolidated safetensors) plus
``training_state.pt`` and a ``COMPLETE`` marker written last, after everything else is fsynced. A
crash mid-save leaves only a ``.tmp`` folder, which is ignored (and removed by the next save), so
the previous checkpoint stays the newest complete one.

Training state and per-rank files hold tensors and plain data only (numbers, strings, lists, dicts;
RNG states included) and are read with ``torch.load(weights_only=True)``: a checkpoint from
elsewhere cannot run code when it is opened. A file that needs more is refused with a message.
"""
from __future__ import annotations

import logging
import os
import pickle
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import torch

from ..errors import UserError
from .distributed import Dist, barrier
from .faults import maybe_fail

log = logging.getLogger(__name__)
_STEP = re.compile(r"^step_(\d+)$")
MARKER = "COMPLETE"
STATE = "training_state.pt"


def complete_checkpoints(root: str | Path) -> list[tuple[int, Path]]:
    """(step, folder) of every complete checkpoint under `root`, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    out = []
    for p in root.iterdir():
        m = _STEP.match(p.name)
        if m and p.is_dir() and (p / MARKER).is_file():
            out.append((int(m.group(1)), p))
    return sorted(out)


def latest_checkpoint(root: str | Path) -> Path | None:
    ckpts = complete_checkpoints(root)
    return ckpts[-1][1] if ckpts else None


def save_checkpoint(root: str | Path, step: int, write: Callable[[Path], None], state: dict, keep: int = 2,
                    dist: Dist | None = None, write_every_rank: Callable[[Path], None] | None = None,
                    keep_with: str | None = None) -> Path:
    """Write checkpoint `step` atomically; every rank calls it.

    1. rank 0 makes ``step_N.tmp``; 2. every rank runs `write_every_rank(tmp)` (DeepSpeed shards,
    per-rank RNG); 3. rank 0 runs `write(tmp)` (consolidated weights), saves `state`, fsyncs, writes
    the marker and renames the folder to ``step_N``; older checkpoints beyond `keep` are pruned, except
    the newest one holding the file `keep_with` (the consolidated weights, when not every checkpoint has them).
    """
    root, dist = Path(root), dist or Dist()
    final = root / f"step_{step:06d}"
    tmp = root / f"step_{step:06d}.tmp"
    if dist.main:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    barrier()
    if write_every_rank is not None:
        write_every_rank(tmp)
    barrier()
    if dist.main:
        write(tmp)
        torch.save(state, tmp / STATE)
        _fsync_dir(tmp)
        maybe_fail("save", step)
        (tmp / MARKER).write_text(str(step))
        _fsync_dir(tmp, only=MARKER)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        complete = [folder for _, folder in complete_checkpoints(root)]
        holders = [f for f in complete if keep_with and (f / keep_with).is_file()]
        for old in complete[:-keep]:
            if not (holders and old == holders[-1]):
                shutil.rmtree(old, ignore_errors=True)
        for stale in root.glob("step_*.tmp"):
            shutil.rmtree(stale, ignore_errors=True)
        log.info("checkpoint written: %s", final)
    barrier()
    return final


def publish_folder(tmp: str | Path, dst: str | Path) -> Path:
    """Put the finished folder `tmp` in place of `dst`: the old `dst` is renamed to ``<dst>.old``, `tmp` renamed
    to `dst`, then the old one deleted. A crash leaves a complete `dst` (old or new) or, between the renames, the
    old one complete in ``<dst>.old`` and the new one in `tmp`; never a half-written or half-deleted `dst`."""
    tmp, dst = Path(tmp), Path(dst)
    old = dst.with_name(dst.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if dst.exists():
        dst.rename(old)
    tmp.rename(dst)
    shutil.rmtree(old, ignore_errors=True)
    return dst


def rank_file(folder: Path, rank: int) -> Path:
    """Per-rank state (RNG, partitioned EMA) inside a checkpoint."""
    return Path(folder) / f"rank_{rank:05d}.pt"


def load_state(folder: str | Path) -> dict:
    """The training state of a checkpoint folder (rank 0's)."""
    return load_safely(Path(folder) / STATE)


def load_safely(path: str | Path) -> dict:
    """A checkpoint file of tensors and plain data, without unpickling anything else (no code runs)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise UserError(f"refusing to load {path}: it holds objects other than tensors and plain data, and "
                        f"unpickling them could run code ({str(e).splitlines()[0]}). Only load checkpoints "
                        f"written by oars-fast.") from None


def _fsync_dir(path: Path, only: str | None = None) -> None:
    for f in ([path / only] if only else path.rglob("*")):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
