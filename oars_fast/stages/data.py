"""`oars-fast data`: build the configured data set, read one epoch's worth of batches, report.

Prints how many files were found, how many were unusable (named in the log), and writes a
preview grid HR | degraded LR (or LR | HR for pairs) to ``<run_dir>/samples/data_preview.png``.
"""
from __future__ import annotations

import logging
import time

import torch

from ..config import DataJob, save_config
from ..data.build import build_dataset, build_loader
from ..data.degrade import Degrader
from ..data.images import make_grid, save_image
from ..runtime.device import select_device

log = logging.getLogger(__name__)


def run(job: DataJob, max_batches: int = 8) -> int:
    run_dir = job.run.run_dir
    save_config(job, run_dir / "config.yaml")
    ds = build_dataset(job.data, job.run.seed)
    loader = build_loader(ds, job.data, job.data.batch_size, job.run.seed, device=select_device(job.run.device))
    deg = Degrader(job.degradation, job.data.scale)
    gen = torch.Generator().manual_seed(job.run.seed)
    n = min(max_batches, loader.batches_per_epoch())
    t0 = time.perf_counter()
    first = None
    for i, batch in zip(range(n), loader):
        batch = {k: v.cpu() if torch.is_tensor(v) else v for k, v in batch.items()}  # DALI on a GPU: CUDA
        if "hr" in batch and "lr" not in batch:
            batch["lr"] = deg(batch["hr"], generator=gen)
        first = first or batch
    dt = time.perf_counter() - t0
    rows = [[im for im in (first.get("lr", [None] * 99)[i], first.get("hr", [None] * 99)[i]) if im is not None]
            for i in range(min(4, len(first["path"])))]
    preview = run_dir / "samples" / "data_preview.png"
    save_image(make_grid(rows), preview)
    print(f"data: source={job.data.source} loader={type(loader).__name__} files={len(ds)} batches_read={n} "
          f"batch={job.data.batch_size} skipped={loader.skipped_total} time={dt:.2f}s "
          f"({n * job.data.batch_size / max(dt, 1e-9):.1f} samples/s); preview (LR | HR) in {preview}")
    return 0
