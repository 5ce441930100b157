"""The torch loader: endless, resumable, sharded over ranks, the same batches whatever the number
of workers or ranks (see :class:`ShardedLoader`)."""
from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from torch.utils.data import DataLoader

from .datasets import CropDataset, collate

log = logging.getLogger(__name__)


@dataclass
class LoaderState:
    """Where the loader stands: resumable exactly."""

    epoch: int = 0
    batch: int = 0  # batches already consumed in this epoch (this rank)


class ShardedLoader:
    """Endless, resumable iterator of per-rank batches.

    Each epoch draws one global permutation from ``(seed, epoch)``; rank ``k`` of ``world`` takes
    every ``world``-th index, cut into per-rank batches of ``micro_batch`` (an incomplete tail is
    dropped so every rank sees the same number of batches). With one rank and the global batch,
    this yields exactly the union of what ``world`` ranks would see.
    """

    def __init__(self, dataset: CropDataset, micro_batch: int, seed: int, rank: int = 0, world: int = 1,
                 num_workers: int = 0):
        if len(dataset) < micro_batch * world:
            log.warning("data set has %d samples, fewer than one global batch (%d): samples repeat",
                        len(dataset), micro_batch * world)
        self.dataset, self.micro_batch, self.seed = dataset, micro_batch, seed
        self.rank, self.world, self.num_workers = rank, world, num_workers
        self.state = LoaderState()
        self.skipped_files: set[str] = set()  # every unusable file met so far

    @property
    def skipped_total(self) -> int:
        return len(self.skipped_files)

    def _epoch_batches(self, epoch: int) -> list[list[int]]:
        n = len(self.dataset)
        per_epoch = max(n, self.micro_batch * self.world)
        perm = np.concatenate([np.random.default_rng((self.seed, epoch, r)).permutation(n)
                               for r in range(-(-per_epoch // n))])[:per_epoch]
        mine = perm[self.rank::self.world]
        nb = len(mine) // self.micro_batch
        return [mine[i * self.micro_batch:(i + 1) * self.micro_batch].tolist() for i in range(nb)]

    def note_skipped(self, names: list[str]) -> None:
        """Count unusable files met in a batch; name the new ones in the log."""
        new = sorted(set(names) - self.skipped_files)
        if new:
            self.skipped_files.update(new)
            log.warning("skipped %d unusable file(s), replaced by the next readable one: %s (unusable so far: %d)",
                        len(new), ", ".join(new[:5]), self.skipped_total)

    def batches_per_epoch(self) -> int:
        return len(self._epoch_batches(0))

    def __iter__(self) -> Iterator[dict]:
        while True:
            epoch = self.state.epoch
            self.dataset.set_epoch(epoch)
            batches = self._epoch_batches(epoch)[self.state.batch:]
            loader = DataLoader(self.dataset, batch_sampler=batches, num_workers=self.num_workers,
                                collate_fn=collate, persistent_workers=False)
            for batch in loader:
                self.state.batch += 1
                self.note_skipped(batch["skipped"])
                yield batch
            self.state = LoaderState(epoch=epoch + 1, batch=0)

    def state_dict(self) -> dict:
        return {"epoch": self.state.epoch, "batch": self.state.batch, "skipped_files": sorted(self.skipped_files)}

    def load_state_dict(self, state: dict) -> None:
        self.state = LoaderState(epoch=int(state["epoch"]), batch=int(state["batch"]))
        self.skipped_files = set(state.get("skipped_files", []))
