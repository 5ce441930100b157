"""COMPASS scoring throughput: prefix reuse (the LR prefix once per group, its keys/values gathered for the K
candidates, only the SR suffix run per candidate) against per-pair full-sequence scoring, in one run.

* ``--arch tiny`` (default; any machine): the tiny random Qwen3-VL of the tests, float32.
* ``--arch qwen3vl-8b --layers N``: the Qwen3-VL-8B architecture at full width (text 4096, vision 1152) with N
  text layers (and ``--vision-layers``, default all 27), random weights, bf16, on a GPU (``--allow-cpu`` runs it
  on the CPU, for a code-path check only).

Both use the production pixel budget (LR upscaled to 256x256, SR 512x512 -> 64 + 256 image tokens on Qwen3-VL).
Before timing, the two paths' outputs are compared in float32 (max |diff| of F, Q_LR, Q_SR must be <= 1e-3), and
again in bf16 on a GPU (reported; > 0.25 fails).
Reported: pairs/s of each, the speed-up, the peak CUDA memory of each path above the weights (GPU), and the
keys/values one prefix occupies (for a memory plan). Rows go to ``<out>/compass_scoring.csv``.

    python -m benchmarks.compass_scoring [--groups 2] [--k 24] [--batch-size 24] [--out DIR]
    python -m benchmarks.compass_scoring --arch qwen3vl-8b --layers 8 --groups 4 --k 24 --batch-size 48
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from .harness import RESULTS, device_name, git_sha, write_rows

TOL_FP32 = 1e-3  # observed ~1e-7 on the CPU; a wrong suffix position id moves the tiny model's scores by > 1e-3
TOL_BF16 = 0.25  # bf16: rounding differs between the two batch layouts (reported; only a gross error fails)


def _time(fn, reps: int, cuda: bool) -> list[float]:
    fn()  # warm-up
    times = []
    for _ in range(reps):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="tiny", choices=["tiny", "qwen3vl-8b"])
    ap.add_argument("--layers", type=int, default=8, help="qwen3vl-8b: text layers (36 in the full model)")
    ap.add_argument("--vision-layers", type=int, default=None, help="qwen3vl-8b: vision layers (27 in full)")
    ap.add_argument("--groups", type=int, default=2, help="G: LR inputs")
    ap.add_argument("--k", type=int, default=24, help="K: candidates per LR input")
    ap.add_argument("--batch-size", type=int, default=24, help="candidates per suffix / full forward")
    ap.add_argument("--lr-size", type=int, default=128)
    ap.add_argument("--sr-size", type=int, default=512)
    ap.add_argument("--reps", type=int, default=None, help="timed repetitions (default 5 on a GPU, 3 on the CPU)")
    ap.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                    help="timed dtype (auto: bf16 for qwen3vl-8b on a GPU, else float32)")
    ap.add_argument("--threads", type=int, default=1, help="CPU threads (default 1: on a shared CPU, idle OpenMP "
                    "threads spinning against other jobs make timings meaningless)")
    ap.add_argument("--allow-cpu", action="store_true", help="qwen3vl-8b on the CPU (a code-path check)")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, one repetition (a script check)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)

    from oars_fast.rewards.compass import CompassConfig, CompassModel

    cuda = torch.cuda.is_available()
    if not cuda:
        torch.set_num_threads(args.threads)
    if args.arch == "qwen3vl-8b" and not cuda and not args.allow_cpu:
        print("compass_scoring: --arch qwen3vl-8b needs a GPU (or --allow-cpu); skipped")
        return {}
    dev = torch.device("cuda" if cuda else "cpu")
    config = CompassConfig(head_hidden=1024 if args.arch == "qwen3vl-8b" else 32)
    if args.smoke:
        args.groups, args.k, args.batch_size, args.lr_size, args.sr_size, args.reps = 2, 3, 4, 16, 64, 1
        config = CompassConfig(head_hidden=32, min_pixels=32 * 32, max_pixels=64 * 64)
    reps = args.reps or (5 if cuda else 3)
    # built in float32 for the agreement check; the GPU timing then runs a bf16 backbone (heads stay float32)
    arch = "tiny-qwen3vl" if args.arch == "tiny" else "qwen3vl-8b"
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}.get(args.dtype) or (
        torch.bfloat16 if (cuda and args.arch == "qwen3vl-8b") else torch.float32)
    model = CompassModel.random(arch, text_layers=args.layers if args.arch == "qwen3vl-8b" else None,
                                vision_layers=args.vision_layers, dtype=torch.float32, device=dev, config=config)
    n_params = sum(p.numel() for p in model.parameters())

    g, k = args.groups, args.k
    gen = torch.Generator().manual_seed(0)
    lr = torch.rand(g, 3, args.lr_size, args.lr_size, generator=gen).to(dev)
    sr = torch.rand(g * k, 3, args.sr_size, args.sr_size, generator=gen).to(dev)
    gi = torch.arange(g, device=dev).repeat_interleave(k)
    bs = args.batch_size

    # correctness first: prefix reuse must reproduce full-sequence scoring (float32; then in the timed dtype)
    def agreement():
        ours = model.score(lr, sr, gi, batch_size=bs)
        ref = model.score_full(lr, sr, gi, batch_size=bs)
        return max(float((a.float() - b.float()).abs().max()) for a, b in zip(ours, ref)), ours

    diff32, outs = agreement()
    spread = ", ".join(f"{n} {x.mean():.3f}+-{x.std():.3f}" for n, x in zip(("F", "Q_LR", "Q_SR"), outs))
    if not diff32 <= TOL_FP32:
        raise SystemExit(f"compass_scoring: prefix reuse and full scoring disagree in float32: max |diff| "
                         f"{diff32:.3g} > {TOL_FP32}")
    diff = diff32
    if dtype != torch.float32:  # the timed model: built in bf16 as from_pretrained loads it (rotary buffers float32)
        del model
        if cuda:
            torch.cuda.empty_cache()
        model = CompassModel.random(arch, text_layers=args.layers if args.arch == "qwen3vl-8b" else None,
                                    vision_layers=args.vision_layers, dtype=dtype,
                                    device=dev, config=config)
        diff, _ = agreement()
        if not diff <= TOL_BF16:
            raise SystemExit(f"compass_scoring: prefix reuse and full scoring disagree in {dtype}: max |diff| "
                             f"{diff:.3g} > {TOL_BF16}")
    if cuda:
        torch.cuda.empty_cache()
    weights_mb = torch.cuda.memory_allocated() / 2**20 if cuda else 0.0

    h_lr = model.image_size(args.lr_size, args.lr_size)
    h_sr = model.image_size(args.sr_size, args.sr_size)
    n_lr = h_lr[0] * h_lr[1] // (model.patch * model.merge) ** 2
    n_sr = h_sr[0] * h_sr[1] // (model.patch * model.merge) ** 2
    pre, suf = model._layout(n_lr, n_sr)
    tc = model.backbone.config.text_config
    kv_bytes = tc.num_hidden_layers * 2 * tc.num_key_value_heads * tc.head_dim * torch.finfo(dtype).bits // 8
    prefix_kv_mb = kv_bytes * len(pre) / 2**20

    results, rows = {}, []
    depth = model.backbone.config.vision_config.depth
    shape = {"arch": args.arch, "layers": tc.num_hidden_layers, "vision_layers": depth,
             "groups": g, "k": k, "batch_size": bs, "lr": list(h_lr), "sr": list(h_sr), "prefix_tokens": len(pre),
             "suffix_tokens": len(suf)}
    for name, fn in (("prefix_reuse", lambda: model.score(lr, sr, gi, batch_size=bs)),
                     ("full", lambda: model.score_full(lr, sr, gi, batch_size=bs))):
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        times = _time(fn, reps, cuda)
        ms = times[len(times) // 2]
        peak = (torch.cuda.max_memory_allocated() / 2**20 - weights_mb) if cuda else None
        results[name] = {"ms": ms, "pairs_per_s": g * k / ms * 1e3, "peak_mb_above_weights": peak}
        rows.append({"device": device_name(), "git_sha": git_sha(), "torch": torch.__version__, "triton": "",
                     "kernel": "compass_scoring", "shape": json.dumps(shape), "dtype": str(dtype).replace("torch.", ""),
                     "provider": name, "mode": "fwd", "ms": f"{ms:.2f}", "p20_ms": f"{times[len(times) // 5]:.2f}",
                     "p80_ms": f"{times[min(len(times) - 1, 4 * len(times) // 5)]:.2f}", "gbps": "", "tflops": "",
                     "peak_mb": "" if peak is None else f"{peak:.0f}", "note": ""})
    speedup = results["prefix_reuse"]["pairs_per_s"] / results["full"]["pairs_per_s"]
    for r in rows:
        p = results[r["provider"]]
        r["note"] = (f"pairs_per_s={p['pairs_per_s']:.2f} speedup={speedup:.3f} maxdiff={diff:.2e} "
                     f"maxdiff_fp32={diff32:.2e} weights_mb={weights_mb:.0f} prefix_kv_mb={prefix_kv_mb:.2f}"
                     + (" smoke" if args.smoke else ""))
    write_rows(rows, args.out / "compass_scoring.csv")
    print(f"compass_scoring: {device_name()} {args.arch} ({n_params / 1e6:.1f}M params, {shape['layers']} text / "
          f"{shape['vision_layers']} vision layers, {str(dtype).replace('torch.', '')}) G={g} K={k} batch={bs} "
          f"LR {h_lr[0]}x{h_lr[1]} ({len(pre)} prefix tokens) SR {h_sr[0]}x{h_sr[1]} ({len(suf)} suffix tokens)")
    print(f"  agreement: max |diff| of F, Q_LR, Q_SR = {diff32:.2e} in float32 (tolerance {TOL_FP32})"
          + (f", {diff:.2e} in {str(dtype).replace('torch.', '')}" if dtype != torch.float32 else "")
          + f"; outputs {spread}")
    for name, p in results.items():
        mem = "" if p["peak_mb_above_weights"] is None else f", peak {p['peak_mb_above_weights']:.0f} MB above weights"
        print(f"  {name:>12s}: {p['ms']:9.1f} ms per {g * k} pairs = {p['pairs_per_s']:8.2f} pairs/s{mem}")
    print(f"  speed-up of prefix reuse: {speedup:.2f}x; weights {weights_mb:.0f} MB; keys/values of one prefix "
          f"{prefix_kv_mb:.2f} MB ({kv_bytes / 2**10:.1f} KiB per token); a suffix chunk of {bs} holds {bs} copies")
    return {"speedup": speedup, "maxdiff": diff, "maxdiff_fp32": diff32, **results}


if __name__ == "__main__":
    main()
