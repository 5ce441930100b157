"""`make bench`: every benchmark of oars-fast, in a fixed order.

Kernel benchmarks need a GPU: on a CPU the public ops fall back to their references (or, under
TRITON_INTERPRET=1, to Triton's interpreter), so timing them there measures nothing useful; on a
CPU-only machine only the data benchmarks run. `benchmarks/gpu_check.sh` runs everything on a GPU.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from . import bench_lora_linear, bench_nft_loss, bench_rewards, degradation, loaders
from .harness import RESULTS


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    degradation.main([])
    loaders.main(["--out", str(args.out)])
    if not torch.cuda.is_available():
        print("kernel benchmarks skipped: no GPU here (they run on a GPU: benchmarks/gpu_check.sh)")
        return
    out = ["--out", str(args.out)]
    bench_lora_linear.main(out)
    bench_nft_loss.main(out)
    bench_rewards.main(out)


if __name__ == "__main__":
    main()
