"""Compile report: every Triton kernel of oars-fast at every autotune config, compiled for sm_90 (H100/H200)
with the installed Triton, on any machine (no GPU needed: ``triton.compile`` with a CUDA target).

Per kernel, dtype and config it prints (and writes to ``--out`` as CSV): registers per thread, spilled
bytes (the cubin's stack frame + local memory, from ``cuobjdump -res-usage``: a Triton kernel has no
local arrays, so anything there is a spill), shared memory Triton allocates, whether the PTX issues
wgmma (``wgmma.mma_async``) and TMA (``cp.async.bulk.tensor``), and the compile time (a fresh cache).
The pinned default configs (``PINNED`` in kernels/lora_linear.py; the fixed launch of the other
kernels) are marked ``*``; the exit status is 1 when a default config spills or does not compile.

Kernels are specialised as their launchers would specialise them for one representative problem
(LoRA: M=16384 tokens, in=out=3072, r=32; NFT: 24 x 16 x 128 x 128 latents; rewards: 24 x 16):
16-byte aligned pointers, integers divisible by 16 marked so, unit strides as constants.

    python -m benchmarks.compile_report [--kernels K1,K2] [--dtypes bf16,fp16] [--max-configs N]
                                        [--jobs N] [--out FILE.csv] [--arch 90]

``--list`` names the kernels. ``--max-configs N`` compiles the first N configs of each kernel,
defaults first.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import importlib
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

# The report compiles; Triton's interpreter (TRITON_INTERPRET=1, which the CPU tests set) would make
# @triton.jit return interpreted functions that cannot be compiled. It must be off before triton loads.
if "triton" not in sys.modules:
    os.environ.pop("TRITON_INTERPRET", None)

DTYPES = ("bf16", "fp16")
LORA = dict(M=16384, N=3072, K=3072, R=32)
COLUMNS = ["kernel", "dtype", "config", "default", "regs", "spill_bytes", "smem_bytes", "wgmma", "tma", "compile_s",
           "num_warps", "num_stages", "arch", "triton", "status"]


# ------------------------------------------------------------------------------------------------
# Argument specialisation, as the launcher's call would produce it
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Ptr:
    dtype: str  # "bf16", "fp32", "i8", or "x" for the kernel's dtype


@dataclass(frozen=True)
class Desc:
    dtype: str
    block: tuple[int, int]


@dataclass(frozen=True)
class Const:
    value: object


@dataclass
class Variant:
    """One kernel variant: `args(dtype, cfg)` gives the launch arguments by name (Ptr / Desc / int / float / Const),
    `options(cfg)` the compile options; `configs` are (label, cfg), defaults listed first."""

    name: str
    fn: object
    configs: list[tuple[str, object]]
    defaults: set[str]
    args: Callable[[str, object], dict]
    options: Callable[[object], dict] = field(default=lambda cfg: {"num_warps": 4, "num_stages": 3})


def build_source(fn, values: dict, dtype: str):
    """(signature, constexprs, attrs) for triton.compiler.ASTSource from argument values by name."""
    names = list(fn.arg_names)
    missing = set(names) ^ set(values)
    if missing:
        raise KeyError(f"{fn.__name__}: arguments not matched: {sorted(missing)}")
    sig, const, attrs = {}, {}, {}
    for i, name in enumerate(names):
        v = values[name]
        el = (lambda d: dtype if d == "x" else d)
        if isinstance(v, Const):
            sig[name], const[name] = "constexpr", v.value
        elif isinstance(v, Ptr):
            sig[name] = "*" + el(v.dtype)
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(v, Desc):
            sig[name] = f"tensordesc<{el(v.dtype)}[{v.block[0]}, {v.block[1]}]>"
        elif isinstance(v, bool):
            sig[name], const[name] = "constexpr", v
        elif isinstance(v, int):
            if v == 1:  # the launcher specialises 1 to a constant
                sig[name], const[name] = "constexpr", 1
            else:
                sig[name] = "i32" if -2**31 <= v < 2**31 else "i64"
                if v % 16 == 0:
                    attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(v, float):
            sig[name] = "fp32"
        else:
            raise TypeError(f"{fn.__name__}.{name}: cannot specialise {v!r}")
    return sig, const, attrs


# ------------------------------------------------------------------------------------------------
# The kernels
# ------------------------------------------------------------------------------------------------


def _lora_variants() -> list[Variant]:
    L = importlib.import_module("oars_fast.kernels.lora_linear")
    M, N, K, R = LORA["M"], LORA["N"], LORA["K"], LORA["R"]
    br = L.rank_block(R)

    def order(cands, defaults):
        d = [c for c in cands if c in defaults]
        return [(str(c), c) for c in d + [c for c in cands if c not in defaults]]

    out = []
    for path in ("tma", "ptr"):
        tma = path == "tma"
        table = L.PINNED["sm90" if tma else "generic"]
        mm_defaults, u_defaults = set(table["mm"].values()), set(table["u"].values())
        mm_cands = L.MM_CONFIGS
        if not tma:  # the pointer path has no split TMA-store epilogue: those configs compile as the plain ones
            mm_cands = list(dict.fromkeys(dataclasses.replace(c, SUBTILE=False) for c in mm_cands))
            mm_defaults = {dataclasses.replace(c, SUBTILE=False) for c in mm_defaults}
        for kind in ("fwd", "dx"):
            fwd = kind == "fwd"

            def mm_args(dtype, c, fwd=fwd, tma=tma):
                sub = c.SUBTILE and tma
                if tma:
                    x, u = Desc("x", (c.BM, c.BK)), Desc("x", (c.BM, br))
                    w = Desc("x", (c.BN, c.BK) if fwd else (c.BK, c.BN))
                    b = Desc("x", (c.BN, br) if fwd else (br, c.BN))
                    y = Desc("x", (c.BM, c.BN // 2 if sub else c.BN))
                else:
                    x = w = u = b = y = Ptr("x")
                # forward: W (N, K), B (N, R); dx: W as (K'=out, N'=in), A (R, in): strides of the stored tensors
                return dict(x=x, w=w, u=u, b=b, y=y, bias_ptr=Ptr("x"), M=M, N=N, K=K, R=R, sxm=K, sxk=1,
                            swr=K if fwd else N, swc=1, sum_=br, sbr=R if fwd else N, sbc=1, sym=N, syn=1,
                            num_progs=132, HAS_BIAS=fwd, TRANS_B=fwd, TMA=tma, PRECISION=Const("tf32"),
                            BR=Const(br), BM=Const(c.BM), BN=Const(c.BN), BK=Const(c.BK),
                            GROUP_M=Const(c.GROUP_M), SUBTILE=Const(sub), FLATTEN=Const(c.FLATTEN))

            def u_args(dtype, c, fwd=fwd, tma=tma):
                if tma:
                    x, u = Desc("x", (c.BM, c.BK)), Desc("x", (c.BM, br))
                    a = Desc("x", (br, c.BK) if fwd else (c.BK, br))
                else:
                    x = a = u = Ptr("x")
                # forward: A (R, K); backward: B (out, R) read as A' (K'=out, R)
                return dict(x=x, a=a, u=u, M=M, K=K, R=R, sxm=K, sxk=1, sar=K if fwd else R, sac=1, sum_=br,
                            scale=2.0, A_T=fwd, TMA=tma, PRECISION=Const("tf32"), BR=Const(br), BM=Const(c.BM),
                            BK=Const(c.BK))

            opts = (lambda c: {"num_warps": c.num_warps, "num_stages": c.num_stages})
            out.append(Variant(f"lora_mm_{kind}_{path}", L._lora_mm_kernel, order(mm_cands, mm_defaults),
                               {str(c) for c in mm_defaults}, mm_args, opts))
            out.append(Variant(f"lora_u_{kind}_{path}", L._lora_u_kernel, order(L.U_CONFIGS, u_defaults),
                               {str(c) for c in u_defaults}, u_args, opts))
    return out


def _other_variants() -> list[Variant]:
    nft = importlib.import_module("oars_fast.kernels.nft_loss")
    rw = importlib.import_module("oars_fast.kernels.rewards")
    q8 = importlib.import_module("oars_fast.kernels.fp8_quant")
    d = 16 * 128 * 128
    chunk, n_chunks = nft._grid(d)
    fixed = [("launch", None)]
    one = {"launch"}
    v = [
        Variant("nft_fwd", nft._nft_loss_fwd_kernel, fixed, one, lambda dt, c: dict(
            vth_ptr=Ptr("x"), vold_ptr=Ptr("x"), vtgt_ptr=Ptr("x"), vref_ptr=Ptr("x"), t_ptr=Ptr("fp32"),
            part_ptr=Ptr("fp32"), D=d, CHUNK=chunk, n_chunks=n_chunks, beta=1.0, HAS_REF=True,
            BLOCK=Const(nft._BLOCK))),
        Variant("nft_bwd", nft._nft_loss_bwd_kernel, fixed, one, lambda dt, c: dict(
            vth_ptr=Ptr("x"), vold_ptr=Ptr("x"), vtgt_ptr=Ptr("x"), vref_ptr=Ptr("x"), t_ptr=Ptr("fp32"),
            coef_ptr=Ptr("fp32"), grad_ptr=Ptr("x"), D=d, CHUNK=chunk, beta=1.0, HAS_REF=True,
            BLOCK=Const(nft._BLOCK))),
        Variant("compass_fwd", rw._compass_fwd_kernel, fixed, one, lambda dt, c: dict(
            f_ptr=Ptr("x"), qlr_ptr=Ptr("x"), qsr_ptr=Ptr("x"), out_ptr=Ptr("x"), n=384, inv_gamma=1 / 7,
            BLOCK=Const(rw._BLOCK))),
        Variant("compass_bwd", rw._compass_bwd_kernel, fixed, one, lambda dt, c: dict(
            f_ptr=Ptr("x"), qlr_ptr=Ptr("x"), qsr_ptr=Ptr("x"), g_ptr=Ptr("x"), df_ptr=Ptr("x"), dql_ptr=Ptr("x"),
            dqs_ptr=Ptr("x"), n=384, inv_gamma=1 / 7, BLOCK=Const(rw._BLOCK))),
        Variant("group_adv", rw._group_adv_kernel, fixed, one, lambda dt, c: dict(
            rew_ptr=Ptr("x"), r_ptr=Ptr("fp32"), keep_ptr=Ptr("i8"), n_groups=16, group_size=24, n=384, clip=5.0,
            eps=1e-4, filter_mean=0.9, filter_std=0.05, GLOBAL_STD=True, BLOCK_G=Const(16), BLOCK_S=Const(32))),
        # rl.fp8_nograd's activations: a row of the MLP's 12288-wide hidden layer, 8 warps (the launcher's choice)
        Variant("fp8_quant", q8._quantize_rows_kernel, fixed, one, lambda dt, c: dict(
            x=Ptr("x"), codes=Ptr("u8"), scales=Ptr("fp32"), K=12288, COLS=12288, sxm=12288, sxk=1, scm=12288,
            FP8_MAX=Const(q8.FP8_MAX), TINY=Const(q8._TINY), BLOCK=Const(2048)),
            options=lambda cfg: {"num_warps": 8, "num_stages": 3}),
    ]
    return v


def variants() -> list[Variant]:
    return _lora_variants() + _other_variants()


# ------------------------------------------------------------------------------------------------
# Compiling one (kernel, dtype, config) and reading the result
# ------------------------------------------------------------------------------------------------


def _tool(name: str) -> str:
    import triton

    local = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    if local.exists():
        return str(local)
    from triton import knobs

    return getattr(knobs.nvidia, name).path


def resource_usage(cubin: bytes) -> dict:
    """REG / STACK / LOCAL / SHARED of the (single) kernel in a cubin, from cuobjdump -res-usage."""
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
        path = f.name
    try:
        out = subprocess.run([_tool("cuobjdump"), "-res-usage", path], capture_output=True, text=True,
                             timeout=120).stdout
    finally:
        os.unlink(path)
    vals = {}
    for key in ("REG", "STACK", "LOCAL", "SHARED"):
        m = re.search(rf"\b{key}:(\d+)", out)
        vals[key] = int(m.group(1)) if m else None
    return vals


def compile_one(name: str, dtype: str, label: str, arch: int = 90) -> dict:
    """Compile one config of one kernel for sm_<arch>; returns a report row."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    var = next(v for v in variants() if v.name == name)
    if not hasattr(var.fn, "arg_names") or type(var.fn).__name__ == "InterpretedFunction":
        raise RuntimeError("compile_report: Triton was loaded with TRITON_INTERPRET=1; run the report in a "
                           "process without it")
    cfg = dict(var.configs)[label]
    opts = var.options(cfg) if cfg is not None else {"num_warps": 4, "num_stages": 3}
    row = {"kernel": name, "dtype": dtype, "config": label, "default": "*" if label in var.defaults else "",
           "num_warps": opts["num_warps"], "num_stages": opts["num_stages"], "arch": f"sm_{arch}",
           "triton": triton.__version__}
    try:
        sig, const, attrs = build_source(var.fn, var.args(dtype, cfg), dtype)
        t0 = time.perf_counter()
        k = triton.compile(ASTSource(var.fn, sig, const, attrs), target=GPUTarget("cuda", arch, 32), options=opts)
        row["compile_s"] = f"{time.perf_counter() - t0:.1f}"
        ptx = k.asm["ptx"]
        res = resource_usage(k.asm["cubin"])
        spill = (res["STACK"] or 0) + (res["LOCAL"] or 0)
        row.update(regs=res["REG"], spill_bytes=spill, smem_bytes=k.metadata.shared,
                   wgmma="yes" if "wgmma.mma_async" in ptx else "no",
                   tma="yes" if "cp.async.bulk.tensor" in ptx else "no", status="ok")
    except Exception as e:  # a config that does not compile is a result, not a crash of the report
        msg = str(e).strip().splitlines()
        row.update(status=f"error: {type(e).__name__}: {msg[0][:160] if msg else ''}")
    return row


def _compile_job(job):
    return compile_one(*job)


# ------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------


def jobs_for(kernels: list[str] | None, dtypes: list[str], max_configs: int | None) -> list[tuple]:
    vs = variants()
    names = [v.name for v in vs]
    for k in kernels or []:
        if k not in names:
            raise SystemExit(f"compile_report: unknown kernel {k!r}; choose from {names}")
    out = []
    for v in vs:
        if kernels and v.name not in kernels:
            continue
        for label, _ in v.configs[:max_configs]:
            for dt in dtypes:
                out.append((v.name, dt, label))
    return out


def print_table(rows: list[dict], file=sys.stdout) -> None:
    cols = ["kernel", "dtype", "config", "default", "regs", "spill_bytes", "smem_bytes", "wgmma", "tma", "compile_s",
            "status"]
    heads = {"default": "dflt", "spill_bytes": "spill_B", "smem_bytes": "smem_B"}
    widths = {c: max(len(heads.get(c, c)), *(len(str(r.get(c, ""))) for r in rows)) for c in cols}
    widths["status"] = min(widths["status"], 60)
    print("  ".join(heads.get(c, c).ljust(widths[c]) for c in cols), file=file)
    for r in rows:
        print("  ".join(str(r.get(c, "") if r.get(c) is not None else "-")[:widths[c]].ljust(widths[c]) for c in cols),
              file=file)


def failures(rows: list[dict]) -> list[dict]:
    """Default configs that spill or do not compile."""
    return [r for r in rows if r["default"] and (r["status"] != "ok" or int(r["spill_bytes"] or 0) > 0)]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kernels", help="comma-separated kernel names (default: all; --list names them)")
    ap.add_argument("--dtypes", default=",".join(DTYPES), help="comma-separated: bf16,fp16")
    ap.add_argument("--max-configs", type=int, default=None, help="the first N configs of each kernel (defaults first)")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel compiles (processes)")
    ap.add_argument("--arch", type=int, default=90, help="CUDA compute capability x10 (90 = H100/H200)")
    ap.add_argument("--out", type=Path, help="also write the rows as CSV here")
    ap.add_argument("--keep-cache", action="store_true", help="use Triton's cache (compile times then mean little)")
    ap.add_argument("--list", action="store_true", help="list the kernels and their configs, then exit")
    args = ap.parse_args(argv)

    if args.list:
        for v in variants():
            print(v.name + ": " + ", ".join(("*" if lbl in v.defaults else "") + lbl for lbl, _ in v.configs))
        return 0
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    for d in dtypes:
        if d not in DTYPES:
            raise SystemExit(f"compile_report: dtype {d!r} is not valid; choose from {list(DTYPES)}")
    kernels = [k.strip() for k in args.kernels.split(",")] if args.kernels else None
    jobs = jobs_for(kernels, dtypes, args.max_configs)
    cache = None
    if not args.keep_cache:
        cache = tempfile.TemporaryDirectory(prefix="oars-compile-report-")
        os.environ["TRITON_CACHE_DIR"] = cache.name
    t0 = time.perf_counter()
    try:
        if args.jobs > 1 and len(jobs) > 1:
            import multiprocessing as mp
            from concurrent.futures import ProcessPoolExecutor

            with ProcessPoolExecutor(max_workers=min(args.jobs, len(jobs)), mp_context=mp.get_context("spawn")) as ex:
                rows = list(ex.map(_compile_job, [(*j, args.arch) for j in jobs]))
        else:
            rows = [compile_one(*j, args.arch) for j in jobs]
    finally:
        if cache is not None:
            cache.cleanup()
    import triton

    print(f"compile report: Triton {triton.__version__}, target sm_{args.arch}, {len(rows)} compiles in "
          f"{time.perf_counter() - t0:.0f} s  (* = pinned default config)")
    print_table(rows)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with open(args.out, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
            w.writeheader()
            w.writerows(rows)
        print(f"wrote {args.out}")
    bad = failures(rows)
    for r in bad:
        print(f"FAIL: default config {r['kernel']} {r['dtype']} {r['config']}: "
              f"{r['status'] if r['status'] != 'ok' else str(r['spill_bytes']) + ' bytes spilled'}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
