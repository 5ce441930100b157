"""One log line per step, TensorBoard scalars and images, a JSONL history for reports and tests."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

log = logging.getLogger("oars_fast.train")


class StepLogger:
    def __init__(self, run_dir: Path, stage: str, enabled: bool = True, tensorboard: bool = True):
        self.stage, self.enabled = stage, enabled
        self.dir = run_dir / "logs"
        self.writer = None
        if enabled:
            self.dir.mkdir(parents=True, exist_ok=True)
            self.jsonl = open(self.dir / f"{stage}.jsonl", "a")
            if tensorboard:
                try:
                    from torch.utils.tensorboard import SummaryWriter

                    self.writer = SummaryWriter(str(self.dir / "tb"))
                except ImportError:
                    log.warning("tensorboard is not installed: no TensorBoard scalars")

    def step(self, step: int, stats: dict, fmt: dict[str, str] | None = None) -> None:
        if not self.enabled:
            return
        fmt = fmt or {}
        parts = [f"{self.stage} step {step}"]
        for k, v in stats.items():
            parts.append(f"{k} {format(v, fmt.get(k, '.4g')) if isinstance(v, (int, float)) else v}")
        log.info(" ".join(parts))
        self.jsonl.write(json.dumps({"step": step, **{k: v for k, v in stats.items()
                                                      if isinstance(v, (int, float, str))}}) + "\n")
        self.jsonl.flush()
        if self.writer is not None:
            for k, v in stats.items():
                if isinstance(v, (int, float)):
                    self.writer.add_scalar(f"{self.stage}/{k}", v, step)

    def image(self, tag: str, img: torch.Tensor, step: int) -> None:
        if self.enabled and self.writer is not None:
            self.writer.add_image(f"{self.stage}/{tag}", img.clamp(0, 1), step)

    def close(self) -> None:
        if self.enabled:
            self.jsonl.close()
            if self.writer is not None:
                self.writer.close()
