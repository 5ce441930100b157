"""One benchmark harness for every kernel.

For each case it times, side by side in one run, at least three providers: ``ours`` (the Triton
op), ``eager`` (the pure-torch reference, or the library layer it replaces) and ``compile``
(``torch.compile`` of the reference; compilation happens in the warm-up, outside the timing).
Modes: ``fwd``, ``bwd`` (backward of a retained graph) and ``full`` (forward + backward).

Timing: on a GPU ``triton.testing.do_bench`` (median with p20/p80, L2 flushed between runs); on the
CPU a wall-clock fallback (warm-up, then median/p20/p80 of repeated calls). do_bench's events time
max(host, device): a call whose Python and launches take longer than its kernels reads as host time (suspected,
not yet measured, for the H200 run's NFT loss at 24x16x128x128 and LoRA backward at M = 16384). So on a GPU each row's
note also gives ``device_ms`` (the kernels' own time per call, summed from torch.profiler) and ``host_ms``
(the wall time per call to enqueue it, no synchronisation inside the loop). Peak memory is the
CUDA peak above the inputs (on the CPU: not measured, written as empty). Rows are appended to
``benchmarks/results/<kernel>.csv`` (or ``--out``) with the device name, git sha, torch and
triton versions, the shape, provider, mode, ms, GB/s or TFLOP/s, and peak MB.
"""
from __future__ import annotations

import csv
import json
import statistics
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"

# "bwd" mode re-runs backward on a retained graph; compiled backwards with donated buffers refuse
# that, so donation is off for every compiled provider here (it saves memory, not time).
import torch._functorch.config  # noqa: E402

torch._functorch.config.donated_buffer = False
FIELDS = ["device", "git_sha", "torch", "triton", "kernel", "shape", "dtype", "provider", "mode", "ms", "p20_ms",
          "p80_ms", "gbps", "tflops", "peak_mb", "note"]


@dataclass
class Case:
    """One shape of one kernel. `make` builds fresh inputs; `providers` map name -> fn(*inputs) -> output.

    `bytes`/`flops` give, per mode, the bytes moved or flops done (for GB/s or TFLOP/s); `grad_of`
    lists the indices of inputs whose .grad is reset between timed runs."""

    kernel: str
    shape: dict
    dtype: torch.dtype
    make: Callable[[], tuple]
    providers: dict[str, Callable]
    bytes: dict[str, float] = field(default_factory=dict)
    flops: dict[str, float] = field(default_factory=dict)
    grad_of: tuple[int, ...] = ()
    modes: tuple[str, ...] = ("fwd", "bwd", "full")


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    import platform

    return f"cpu:{platform.processor() or platform.machine()} x{torch.get_num_threads()} threads"


def git_sha() -> str:
    import os

    if os.environ.get("OARS_GIT_SHA"):
        return os.environ["OARS_GIT_SHA"]
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def time_fn(fn: Callable[[], object], grad_to_none: list[torch.Tensor] | None = None, reps: int = 10,
            warmup: int = 3) -> tuple[float, float, float]:
    """(median, p20, p80) milliseconds."""
    if torch.cuda.is_available():
        import triton.testing

        q = triton.testing.do_bench(fn, warmup=25, rep=100, grad_to_none=grad_to_none, quantiles=[0.5, 0.2, 0.8])
        return float(q[0]), float(q[1]), float(q[2])
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        for t in grad_to_none or []:
            t.grad = None
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    qs = statistics.quantiles(times, n=10) if len(times) > 1 else [times[0]] * 9
    return statistics.median(times), qs[1], qs[7]


def device_and_host_ms(fn: Callable[[], object], grad_to_none: list[torch.Tensor] | None = None,
                       reps: int = 20) -> tuple[float, float]:
    """(device ms, host ms) per call on CUDA: the summed time of the kernels (and copies) torch.profiler records
    over `reps` calls, and the wall time to issue one call (the loop not synchronised inside, the GPU drained
    before it)."""
    from torch.profiler import ProfilerActivity, profile

    _sync()
    t0 = time.perf_counter()
    for _ in range(reps):
        for t in grad_to_none or []:
            t.grad = None
        fn()
    host = (time.perf_counter() - t0) * 1e3 / reps
    _sync()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            for t in grad_to_none or []:
                t.grad = None
            fn()
        _sync()
    cuda = torch.autograd.DeviceType.CUDA
    total_us = sum(getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0.0)
                   for e in prof.key_averages() if e.device_type == cuda)
    return total_us / reps / 1e3, host


def _mode_fn(fn: Callable, inputs: tuple, mode: str, grads: list[torch.Tensor]) -> Callable[[], object]:
    if mode == "fwd":
        return lambda: fn(*inputs)
    out = fn(*inputs)
    g = torch.ones_like(out) if out.ndim == 0 else torch.randn_like(out)
    if mode == "bwd":
        return lambda: out.backward(g, retain_graph=True)
    return lambda: fn(*inputs).backward(g)


def run_case(case: Case, out_dir: Path = RESULTS, note: str = "", reps: int = 10) -> list[dict]:
    """Time every provider in every mode; append the rows to <out_dir>/<kernel>.csv and return them."""
    meta = {"device": device_name(), "git_sha": git_sha(), "torch": torch.__version__,
            "triton": _triton_version(), "kernel": case.kernel, "shape": json.dumps(case.shape),
            "dtype": str(case.dtype).replace("torch.", ""), "note": note}
    rows = []
    for name, fn in case.providers.items():
        inputs = case.make()
        grads = [inputs[i] for i in case.grad_of]
        fn(*inputs)  # warm-up: autotuning / compilation happen here, not in the timing
        if case.modes != ("fwd",):
            out = fn(*inputs)
            out.backward(torch.ones_like(out) if out.ndim == 0 else torch.randn_like(out))
        for mode in case.modes:
            for t in grads:
                t.grad = None
            call = _mode_fn(fn, inputs, mode, grads)
            _sync()
            peak = ""
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
                call()
                _sync()
                peak = f"{(torch.cuda.max_memory_allocated() - base) / 2**20:.1f}"
            ms, p20, p80 = time_fn(call, grads, reps=reps)
            split = ""
            if torch.cuda.is_available():
                try:
                    split = "device_ms={:.4f}; host_ms={:.4f}".format(*device_and_host_ms(call, grads))
                except Exception as e:  # the timing above stands; say why the split is missing
                    split = f"device/host split failed: {type(e).__name__}"
            row_note = "; ".join(x for x in (meta["note"], split) if x)
            nbytes, nflops = case.bytes.get(mode), case.flops.get(mode)
            rows.append({**meta, "provider": name, "mode": mode, "ms": f"{ms:.4f}", "p20_ms": f"{p20:.4f}",
                         "p80_ms": f"{p80:.4f}", "gbps": f"{nbytes / ms / 1e6:.1f}" if nbytes else "",
                         "tflops": f"{nflops / ms / 1e9:.2f}" if nflops else "", "peak_mb": peak, "note": row_note})
        del inputs
    write_rows(rows, out_dir / f"{case.kernel}.csv")
    for r in rows:
        print(f"{r['kernel']:>12s} {r['shape']:<48s} {r['provider']:>8s} {r['mode']:>4s} {float(r['ms']):9.4f} ms "
              f"[{r['p20_ms']}, {r['p80_ms']}]  {r['gbps'] and r['gbps'] + ' GB/s'}"
              f"{r['tflops'] and r['tflops'] + ' TFLOP/s'}  peak {r['peak_mb'] or '-'} MB  {r['note']}")
    return rows


def bench_main(doc: str, cases: Callable[[bool], list[Case]], argv=None, before: Callable[[Path], None] | None = None):
    """The command line shared by the kernel benchmarks: ``[--smoke] [--out DIR]``."""
    import argparse

    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes (a harness check; not a result)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    if before is not None and not args.smoke:
        before(args.out)
    for case in cases(args.smoke):
        run_case(case, args.out, note="smoke" if args.smoke else "", reps=3 if args.smoke else 10)


def write_rows(rows: list[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists()
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        if new:
            w.writeheader()
        w.writerows(rows)


def write_table(rows: list[dict], path: Path) -> Path:
    """`rows` (dicts with the same keys) -> a fresh CSV at `path` with those keys as its header."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path


def copy_bandwidth(nbytes: int = 2**30) -> float:
    """Measured device copy bandwidth in GB/s (read + write), the ceiling memory-bound kernels are held to."""
    n = nbytes // 4
    src = torch.empty(n, dtype=torch.float32, device="cuda" if torch.cuda.is_available() else "cpu")
    dst = torch.empty_like(src)
    ms, _, _ = time_fn(lambda: dst.copy_(src))
    return 2 * n * 4 / ms / 1e6


def _triton_version() -> str:
    try:
        import triton

        return triton.__version__
    except ImportError:
        return ""
