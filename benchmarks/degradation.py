"""Throughput of the Real-ESRGAN degradation: a batch of 16 HR crops of 256x256.

    python -m benchmarks.degradation [--device cpu|cuda] [--batch 16] [--size 256] [--iters 5]

Prints images/s (median over iterations after one warm-up); nothing is asserted.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from oars_fast.data.degrade import RealESRGANDegradation


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--iters", type=int, default=5)
    args = ap.parse_args(argv)
    deg = RealESRGANDegradation()
    hr = torch.rand(args.batch, 3, args.size, args.size, device=args.device)
    g = torch.Generator().manual_seed(0)
    deg(hr, generator=g)  # warm-up
    times = []
    for _ in range(args.iters):
        if hr.is_cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        deg(hr, generator=g)
        if hr.is_cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    print(f"degradation: device={args.device} threads={torch.get_num_threads()} batch={args.batch}x3x{args.size}x"
          f"{args.size} median={med * 1e3:.1f} ms  {args.batch / med:.1f} images/s "
          f"(min {min(times) * 1e3:.1f} ms, max {max(times) * 1e3:.1f} ms)")


if __name__ == "__main__":
    main()
