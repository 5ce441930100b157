"""Data-loader throughput: the torch loader (PIL decode in worker processes) vs DALI (decode, crop and
flip in its pipeline; ``device="mixed"`` nvJPEG on a GPU, CPU otherwise), same files, same crops.

    python -m benchmarks.loaders [--images 48] [--crop 256] [--batch 16] [--workers 2] [--batches 30]
                                 [--device cuda|cpu] [--smoke]

The files are the bundled demo photos written once as JPEG (quality 95) under ``--work``. Each
loader first yields two warm-up batches (worker / pipeline start-up), then ``--batches`` batches
are timed. Prints images/s per loader and their ratio and appends rows to
``benchmarks/results/loaders.csv``; nothing is asserted.
"""
from __future__ import annotations

import argparse
import csv
import time
from pathlib import Path

import torch
from PIL import Image

from oars_fast.config import DataConfig
from oars_fast.data.build import build_dataset, build_loader
from oars_fast.data.loader import ShardedLoader

from .harness import RESULTS, device_name, git_sha


def make_files(work: Path, n: int) -> Path:
    """`n` JPEG files (whole demo photos, repeated with a different flip/rotation when needed)."""
    from oars_fast.data.demo import demo_photos

    out = work / "jpeg"
    if len(list(out.glob("*.jpg"))) >= n:
        return out
    out.mkdir(parents=True, exist_ok=True)
    photos = list(demo_photos().items())
    for i in range(n):
        name, img = photos[i % len(photos)]
        im = Image.fromarray(img).transpose(Image.Transpose.ROTATE_90) if (i // len(photos)) % 2 else \
            Image.fromarray(img)
        im.save(out / f"{i:04d}_{name}.jpg", quality=95)
    return out


def throughput(loader, batches: int, device: torch.device) -> float:
    """Images/s delivered on `device` (the torch loader's batches are copied there, as training does)."""
    it = iter(loader)
    for _ in range(2):  # warm-up: workers / pipeline start, first decode
        next(it)
    t0 = time.perf_counter()
    n = 0
    for _ in range(batches):
        b = next(it)
        hr = b["hr"].to(device, non_blocking=True)
        n += len(hr)
        if hr.is_cuda:
            torch.cuda.synchronize()
    return n / (time.perf_counter() - t0)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=48)
    ap.add_argument("--crop", type=int, default=256)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--workers", type=int, default=2, help="torch: worker processes; DALI: threads")
    ap.add_argument("--batches", type=int, default=30)
    ap.add_argument("--work", type=Path, default=Path("runs/bench_loaders"))
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                    help="where batches are delivered (DALI decodes there with nvJPEG on a GPU)")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes (a script check; not a result)")
    args = ap.parse_args(argv)
    if args.smoke:
        args.images, args.crop, args.batch, args.batches = 8, 64, 4, 2
    folder = make_files(args.work, args.images)
    cfg = DataConfig(source="hr", hr_dir=str(folder), crop_size=args.crop, num_workers=args.workers, loader="dali")
    ds = build_dataset(cfg, seed=0)
    loaders = {"torch": ShardedLoader(ds, args.batch, 0, num_workers=args.workers)}
    device = torch.device(args.device)
    dali = build_loader(ds, cfg, args.batch, 0, device=device)
    if type(dali) is not ShardedLoader:  # build_loader fell back when DALI is missing
        loaders["dali"] = dali
    result = {name: throughput(ld, args.batches, device) for name, ld in loaders.items()}
    rows = []
    for name, ips in result.items():
        print(f"loader {name:5s}: {ips:7.1f} images/s  ({args.batch} x {args.crop}px crops of {args.images} JPEG "
              f"photos, {args.workers} workers/threads, delivered on {device}, {device_name()})")
        rows.append({"device": device_name(), "git_sha": git_sha(), "loader": name, "images_per_s": f"{ips:.2f}",
                     "batch": args.batch, "crop": args.crop, "workers": args.workers,
                     "note": "smoke" if args.smoke else ""})
    if "dali" in result:
        print(f"loader dali / torch: {result['dali'] / result['torch']:.2f}x")
    else:
        print("loader dali: not installed here (pip install -e .[dali]); only the torch loader was timed")
    path = args.out / "loaders.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists()
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        if new:
            w.writeheader()
        w.writerows(rows)
    return result


if __name__ == "__main__":
    main()
