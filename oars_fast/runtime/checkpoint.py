"""Crash-safe checkpoints: written to ``<name>.tmp`` and renamed when complete.

A checkpoint is a folder ``checkpoints/step_000123/`` holding whatever the stage writes plus
``training_state.pt`` and a ``COMPLETE`` marker written last. A crash mid-save leaves only a
``.tmp`` folder, which is ignored (and removed by the next save), so the previous checkpoint
stays the newest complete one.
"""
from __future__ import annotations

import logging
import os
import re
import shutil
from pathlib import Path
from typing import Callable

import torch

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


def save_checkpoint(root: str | Path, step: int, write: Callable[[Path], None], state: dict, keep: int = 2) -> Path:
    """Write checkpoint `step` atomically: `write(folder)` fills it, then the state and marker."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:06d}"
    tmp = root / f"step_{step:06d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    write(tmp)
    torch.save(state, tmp / STATE)
    (tmp / MARKER).write_text(str(step))
    _fsync_dir(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for _, old in complete_checkpoints(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob("step_*.tmp"):
        shutil.rmtree(stale, ignore_errors=True)
    log.info("checkpoint written: %s", final)
    return final


def load_state(folder: str | Path) -> dict:
    return torch.load(Path(folder) / STATE, map_location="cpu", weights_only=False)


def _fsync_dir(path: Path) -> None:
    for f in path.rglob("*"):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
