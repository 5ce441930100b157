"""One protocol for every training stage, one runner, and the loop they share.

A stage is a class with ``setup()`` (build everything, resume when asked), ``train()`` (to the end:
the shared loop below), ``save_checkpoint()``, ``cleanup()`` (close logs) and ``summary()`` (the
one line printed at the end). :func:`run_stage` calls them in order, leaves the process group, prints
the summary on rank 0 and returns the exit code; an error propagates (the CLI turns the project's
own errors into one line and an exit code).

:class:`TrainingLoop` is what SFT, RL and the other training stages share: the step loop with its
progress bar, the logging cadence (every step to the log files, the terminal throttled), the
checkpoint cadence, the fault points of the crash tests, and the divergence guard: after
``optim.max_nonfinite_steps`` consecutive steps skipped for a non-finite loss or gradient the run
stops with :class:`~oars_fast.errors.TrainingDiverged`; nothing is exported, and a checkpoint that
falls due amid non-finite steps waits for the next finite one, so the newest complete checkpoint is
the last good one.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Protocol

from tqdm import tqdm

from ..errors import TrainingDiverged
from ..runtime import distributed
from ..runtime.checkpoint import latest_checkpoint
from ..runtime.faults import maybe_fail


class Stage(Protocol):
    def setup(self) -> Stage: ...

    def train(self) -> object: ...

    def save_checkpoint(self) -> Path: ...

    def cleanup(self) -> None: ...

    def summary(self) -> str: ...


def run_stage(stage: Stage) -> int:
    """setup -> train -> cleanup -> leave the process group; the summary on rank 0; exit code 0."""
    ok = False
    try:
        stage.setup()
        stage.train()
        ok = True
    finally:
        stage.cleanup()
        main = distributed.rank() == 0
        distributed.shutdown(clean=ok)
    if main:
        print(stage.summary())
    return 0


class TrainingLoop:
    """The loop of a training stage. The stage sets ``self.job``, ``self.dist``, ``self.logger``,
    ``self.run_dir`` and ``self.step`` in its ``setup`` and implements:

    * ``train_step() -> dict``: one optimizer step (it advances ``self.step``); the stats carry
      ``loss``, ``lr`` and ``nonfinite`` (1 when the step was skipped for a non-finite value);
    * ``total_steps`` and ``cadence() -> (log_every, save_every)``;
    * ``after_step(stats)`` (optional): sample grids, probes, evaluation (may add to `stats`);
    * ``save_checkpoint()`` and ``export()`` (the trained result, when the last step is done).
    """

    name = "train"
    log_format: dict[str, str] = {}
    history: list[float]  # the loss of every step (the stage fills it)

    def after_step(self, stats: dict) -> None:
        pass

    def cleanup(self) -> None:
        if hasattr(self, "logger"):
            self.logger.close()

    def loss_summary(self) -> str:
        """``"loss first -> last; "`` over the recorded steps, or "" before the first."""
        losses = getattr(self, "history", [])
        return f"loss {losses[0]:.4f} -> {losses[-1]:.4f}; " if losses else ""

    def train(self, until: int | None = None):
        """Run to the last step (or stop after step `until`: an interruption, for tests)."""
        total = self.total_steps
        end = min(total, until) if until is not None else total
        streak, save_due = 0, False
        bar = tqdm(total=end, initial=self.step, desc=self.name, disable=None if self.dist.main else True,
                   leave=False)
        while self.step < end:
            maybe_fail("train", self.step + 1)
            stats = self.train_step()
            bar.update(1)
            streak = streak + 1 if stats.get("nonfinite") else 0
            if streak >= self.job.optim.max_nonfinite_steps:
                self._diverged(streak, stats)
            self.after_step(stats)
            log_every, save_every = self.cadence()
            last = self.step in (1, end)
            if log_every and (self.step % log_every == 0 or last):
                self.logger.step(self.step, stats, self.log_format, show=last)
            save_due = save_due or bool(save_every and self.step % save_every == 0)
            if (save_due and not streak) or self.step == total:  # not amid non-finite steps: postponed
                self.save_checkpoint()
                save_due = False
        bar.close()
        if self.step >= total:
            self.export()
        return self.history

    def _diverged(self, streak: int, stats: dict) -> None:
        newest = latest_checkpoint(self.run_dir / "checkpoints")
        loss = stats.get("loss", math.nan)
        raise TrainingDiverged(
            f"{self.name}: the run diverged: {streak} consecutive steps skipped for a non-finite loss or gradient "
            f"(steps {self.step - streak + 1}-{self.step}; at step {self.step}: loss {loss:.4g}, learning rate "
            f"{stats.get('lr', math.nan):.4g}). Stopped without exporting; newest complete checkpoint: "
            f"{newest or 'none'}. Lower optim.lr (or raise optim.max_nonfinite_steps if the skips are expected).")
