"""Step logs: every step to ``logs/<stage>.log`` (text), ``logs/<stage>.jsonl`` (for reports and tests)
and TensorBoard; on the terminal at most one line every ``interval`` seconds (the first and the last
step always), so a long run reads as a few lines a minute, not one per step."""
from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

import torch

log = logging.getLogger("oars_fast.train")


class StepLogger:
    def __init__(self, run_dir: Path, stage: str, enabled: bool = True, tensorboard: bool = True,
                 interval: float = 5.0):
        self.stage, self.enabled, self.interval = stage, enabled, interval
        self.dir = run_dir / "logs"
        self.writer = None
        self._shown = -math.inf
        if enabled:
            self.dir.mkdir(parents=True, exist_ok=True)
            self.jsonl = open(self.dir / f"{stage}.jsonl", "a")
            self.text = open(self.dir / f"{stage}.log", "a")
            if tensorboard:
                try:
                    from torch.utils.tensorboard import SummaryWriter  # optional: tensorboard may be absent

                    self.writer = SummaryWriter(str(self.dir / "tb"))
                except ImportError:
                    log.warning("tensorboard is not installed: no TensorBoard scalars")

    def step(self, step: int, stats: dict, fmt: dict[str, str] | None = None, show: bool = False) -> None:
        """Record one step; show it on the terminal when `show` or `interval` seconds have passed."""
        if not self.enabled:
            return
        fmt = fmt or {}
        parts = [f"{self.stage} step {step}"]
        for k, v in stats.items():
            parts.append(f"{k} {format(v, fmt.get(k, '.4g')) if isinstance(v, (int, float)) else v}")
        line = " ".join(parts)
        self.text.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {line}\n")
        self.text.flush()
        self.jsonl.write(json.dumps({"step": step, **{k: v for k, v in stats.items()
                                                      if isinstance(v, (int, float, str))}}) + "\n")
        self.jsonl.flush()
        if self.writer is not None:
            for k, v in stats.items():
                if isinstance(v, (int, float)):
                    self.writer.add_scalar(f"{self.stage}/{k}", v, step)
        now = time.monotonic()
        if show or now - self._shown >= self.interval:
            log.info(line)
            self._shown = now

    def image(self, tag: str, img: torch.Tensor, step: int) -> None:
        if self.enabled and self.writer is not None:
            self.writer.add_image(f"{self.stage}/{tag}", img.clamp(0, 1), step)

    def close(self) -> None:
        if self.enabled:
            self.jsonl.close()
            self.text.close()
            if self.writer is not None:
                self.writer.close()
