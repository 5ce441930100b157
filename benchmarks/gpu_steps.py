"""The steps of ``benchmarks/gpu_measure.sh`` that have no benchmark script of their own. Each checks that its
outputs agree with a reference before it times anything; ``--smoke`` runs it at tiny sizes on any device.

    python -m benchmarks.gpu_steps info --out gpu.txt             versions, card, what was installed
    python -m benchmarks.gpu_steps ceilings --out ceilings.csv    copy GB/s; bf16 GEMM 8192^3; F.linear
                                                                  16384x3072x3072; SDPA at the RL shape
    python -m benchmarks.gpu_steps lora-check                     lora_linear vs its reference (CPU smoke stand-in
                                                                  for the GPU kernel tests)
    python -m benchmarks.gpu_steps nft --out nft.csv              NFT loss: bf16 vs float64, then timings
    python -m benchmarks.gpu_steps profile --out profile.txt      2-layer full-width transformer + LoRA forward +
                                                                  backward: top 15 kernels, TFLOP/s vs rl_cost
    python -m benchmarks.gpu_steps merge-csv OUT IN...            rows of same-header CSVs into one file
    python -m benchmarks.gpu_steps wheels DIR [--scope S]         the wheels of DIR to install (missing ones)
    python -m benchmarks.gpu_steps install DIR --target T         install them into T (pip, else unzipped)
    python -m benchmarks.gpu_steps demo-cache --home H            synthetic demo patches for benchmarks.rl_iteration
                                                                  (the real ones need scikit-image/-learn)
    python -m benchmarks.gpu_steps jpegs --out WORK               synthetic JPEGs for benchmarks.loaders --work WORK

Heavy imports are local to each step (``wheels`` and ``install`` run before the carried wheels are installed, with
nothing but the standard library and, when present, ``packaging``).
"""

from __future__ import annotations

import argparse
import csv
import importlib.metadata
import platform
import re
import sys
from pathlib import Path

ALWAYS = {"diffusers", "deepspeed"}  # installed from .whl/ even when the image has another version
# what only the scale-out check needs: deepspeed and the dependencies a torch image usually lacks
SCALEOUT_ONLY = {
    "deepspeed",
    "hjson",
    "py-cpuinfo",
    "msgpack",
    "ninja",
    "einops",
    "pydantic",
    "pydantic-core",
    "annotated-types",
    "typing-inspection",
    "nvidia-ml-py",
}
SCOPES = ("measure", "all")  # gpu_measure.sh installs `measure` (diffusers, pytest), the scale-out check `all`
CEILING_FIELDS = ["device", "torch", "name", "value", "unit", "note"]


# ----------------------------------------------------------------------------------------------- wheels
def _dist(wheel: Path) -> str:
    return re.sub(r"[-_.]+", "-", wheel.name.split("-")[0]).lower()


def _supported(wheel: Path) -> bool:
    """Whether this interpreter can install `wheel` (its python/abi/platform tags)."""
    try:
        from packaging.tags import sys_tags
        from packaging.utils import parse_wheel_filename
    except ImportError:  # no packaging: let pip decide
        return True
    try:
        tags = parse_wheel_filename(wheel.name)[3]
    except Exception:  # noqa: BLE001 - an odd file name: let pip decide
        return True
    return not tags.isdisjoint(set(sys_tags()))


def wheels_to_install(folder: Path, scope: str = "all") -> list[Path]:
    """The wheels of `folder` to install: diffusers and deepspeed always (the versions this project was tested
    with); every other one (deepspeed's dependencies, pytest) only when this machine lacks that distribution or
    has an older version; never one built for another Python or platform (said on stderr). Scope ``measure``
    leaves out deepspeed and what only it needs (SCALEOUT_ONLY)."""
    if scope not in SCOPES:
        raise ValueError(f"scope {scope!r} is not one of {SCOPES}")
    try:
        from packaging.version import Version
    except ImportError:
        Version = None  # noqa: N806
    out = []
    for w in sorted(Path(folder).glob("*.whl")):
        name = _dist(w)
        if scope == "measure" and name in SCALEOUT_ONLY:
            continue
        if not _supported(w):
            print(f"gpu_steps wheels: {w.name} is not for this interpreter: skipped", file=sys.stderr)
            continue
        if name not in ALWAYS:
            try:
                have = importlib.metadata.version(name)
            except importlib.metadata.PackageNotFoundError:
                have = None
            if have is not None and (Version is None or Version(have) >= Version(w.name.split("-")[1])):
                continue
        out.append(w)
    return out


def _unzip(wheel: Path, target: Path) -> None:
    """A wheel is a zip of its site-packages tree (+ ``*.data/``): what ``pip install --target`` lays out, minus the
    scripts. Used when this interpreter has no pip."""
    import zipfile

    with zipfile.ZipFile(wheel) as z:
        for member in z.namelist():
            parts = member.split("/")
            if parts[0].endswith(".data"):
                if len(parts) > 2 and parts[1] in ("purelib", "platlib"):
                    dest = target.joinpath(*parts[2:])
                else:
                    continue  # scripts, headers, data files: not needed to import the package
            else:
                dest = target / member
            if member.endswith("/"):
                continue
            dest.parent.mkdir(parents=True, exist_ok=True)
            with z.open(member) as src, open(dest, "wb") as out:
                out.write(src.read())


def install(folder: Path, target: Path, scope: str = "all") -> list[str]:
    """Install the wheels `wheels_to_install` picks into `target` (no index, no dependencies): one pip call, else
    one at a time so that a bad wheel costs only its own feature, else (no pip) unzipped. Returns the names of the
    wheels that failed."""
    import subprocess

    wheels = wheels_to_install(folder, scope)
    target.mkdir(parents=True, exist_ok=True)
    if not wheels:
        print(f"gpu_steps install: nothing to install from {folder} (scope {scope})")
        return []
    pip = [
        sys.executable,
        "-m",
        "pip",
        "install",
        "-q",
        "--no-index",
        "--no-deps",
        "--no-compile",
        "--no-cache-dir",
        "--upgrade",
        "--disable-pip-version-check",
        "--target",
        str(target),
    ]
    has_pip = subprocess.run([sys.executable, "-m", "pip", "--version"], capture_output=True).returncode == 0
    names = ", ".join(w.name for w in wheels)
    if has_pip and subprocess.run(pip + [str(w) for w in wheels]).returncode == 0:
        print(f"gpu_steps install: {names} -> {target} (pip)")
        return []
    failed = []
    for w in wheels:
        try:
            if has_pip:
                subprocess.run(pip + [str(w)], check=True)
            else:
                _unzip(w, target)
            print(f"gpu_steps install: {w.name} -> {target} ({'pip' if has_pip else 'unzipped: no pip here'})")
        except Exception as e:  # noqa: BLE001 - one bad wheel costs its own feature, not the run
            print(f"gpu_steps install: {w.name} failed ({type(e).__name__}: {e})")
            failed.append(w.name)
    return failed


# --------------------------------------------------------------------------------------------- helpers
def _device():
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _time(fn, reps: int = 10) -> float:
    from benchmarks.harness import time_fn

    return time_fn(fn, reps=reps)[0]


def _rel(a, b) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-12))


def _row(name: str, value: float, unit: str, note: str = "") -> dict:
    import torch

    from benchmarks.harness import device_name

    return {
        "device": device_name(),
        "torch": torch.__version__,
        "name": name,
        "value": f"{value:.2f}",
        "unit": unit,
        "note": note,
    }


def _write_csv(path: Path, rows: list[dict], fields: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists()
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        if new:
            w.writeheader()
        w.writerows(rows)


# ----------------------------------------------------------------------------------------------- info
def info(out: Path) -> None:
    import torch

    lines = [
        f"python {platform.python_version()} ({sys.executable})",
        f"torch {torch.__version__} (CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()})",
    ]
    for pkg in (
        "triton",
        "diffusers",
        "transformers",
        "peft",
        "accelerate",
        "huggingface-hub",
        "safetensors",
        "numpy",
        "pillow",
        "pyyaml",
        "pytest",
        "scikit-image",
        "scikit-learn",
        "deepspeed",
        "pydantic",
        "hjson",
        "ninja",
        "py-cpuinfo",
        "msgpack",
        "einops",
        "psutil",
        "flash-attn",
        "nvidia-dali-cuda120",
    ):
        try:
            where = ""
            if pkg == "diffusers":  # imported: whether it works with this machine's huggingface-hub etc.
                mod = __import__(pkg)
                where = f" ({Path(mod.__file__).parent})"
            lines.append(f"{pkg} {importlib.metadata.version(pkg)}{where}")
        except Exception as e:  # noqa: BLE001 - report any import failure and go on
            why = f": {str(e).splitlines()[0][:160]}" if pkg == "diffusers" else ""  # a missing dependency, say
            lines.append(f"{pkg} absent ({type(e).__name__}{why})")
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        lines.append(
            f"device {p.name}, capability {p.major}.{p.minor}, {p.total_memory / 2**30:.1f} GiB, "
            f"{p.multi_processor_count} SMs"
        )
    else:
        lines.append(f"device cpu ({platform.processor() or platform.machine()}), no CUDA")
    text = "\n".join(lines)
    print(text)
    with open(out, "a") as f:
        f.write(text + "\n")


# ------------------------------------------------------------------------------------------ ceilings
def ceilings(out: Path, smoke: bool) -> None:
    """Measured ceilings for benchmarks.rl_cost --gpu: each op's output checked against float32 first."""
    import torch
    import torch.nn.functional as F

    from benchmarks.harness import copy_bandwidth

    dev = _device()
    dt = torch.bfloat16 if dev == "cuda" else torch.float32
    reps = 3 if smoke else 10
    rows = []
    # copy bandwidth (read + write)
    src = torch.randn(1 << 18 if smoke else 1 << 20, device=dev)
    dst = torch.empty_like(src)
    dst.copy_(src)
    assert torch.equal(dst, src), "copy_ does not copy"
    bw = copy_bandwidth(2**20 if smoke else 2**30)
    rows.append(_row("copy_gbps", bw, "GB/s", "1 GiB fp32 copy_, read + write"))

    def gemm_case(name, m, n, k, bias: bool):
        g = torch.Generator(device=dev).manual_seed(0)
        x = torch.randn(m, k, device=dev, generator=g).to(dt)
        w = (torch.randn(n, k, device=dev, generator=g) / k**0.5).to(dt)
        b = torch.randn(n, device=dev, generator=g).to(dt) if bias else None
        y = F.linear(x, w, b)
        ref = F.linear(x[:256].float(), w.float(), None if b is None else b.float())
        err = _rel(y[:256], ref)
        tol = 2e-2 if dt == torch.bfloat16 else 1e-4
        assert err < tol, f"{name}: output disagrees with float32 (rel err {err:.2g})"
        ms = _time(lambda: F.linear(x, w, b), reps)
        rows.append(_row(name, 2 * m * n * k / ms / 1e9, "TFLOP/s", f"{dt} ms={ms:.4f} rel_err={err:.2g}"))

    if smoke:
        gemm_case("gemm_bf16_8192_tflops", 256, 256, 256, False)
        gemm_case("linear_16384x3072x3072_tflops", 256, 128, 128, True)
    else:
        gemm_case("gemm_bf16_8192_tflops", 8192, 8192, 8192, False)
        gemm_case("linear_16384x3072x3072_tflops", 16384, 3072, 3072, True)
    # joint attention of the RL update: micro-batch 8, 24 heads, 1024 + 1024 + 220 tokens, head dim 128
    b, h, s, d = (2, 2, 64, 32) if smoke else (8, 24, 2268, 128)
    g = torch.Generator(device=dev).manual_seed(1)
    q, k, v = (torch.randn(b, h, s, d, device=dev, generator=g).to(dt) for _ in range(3))
    o = F.scaled_dot_product_attention(q, k, v)
    ref = torch.softmax(q[0, 0].float() @ k[0, 0].float().T / d**0.5, -1) @ v[0, 0].float()
    err = _rel(o[0, 0], ref)
    assert err < (2e-2 if dt == torch.bfloat16 else 1e-4), f"sdpa disagrees with float32 math (rel err {err:.2g})"
    flops = 4 * b * h * s * s * d
    ms = _time(lambda: F.scaled_dot_product_attention(q, k, v), reps)
    rows.append(
        _row("sdpa_rl_tflops", flops / ms / 1e9, "TFLOP/s", f"{dt} [{b},{h},{s},{d}] fwd ms={ms:.4f} rel_err={err:.2g}")
    )
    qg, kg, vg = (t.detach().requires_grad_() for t in (q, k, v))
    go = torch.randn_like(o)
    ms = _time(lambda: F.scaled_dot_product_attention(qg, kg, vg).backward(go), reps)
    rows.append(
        _row("sdpa_rl_fwdbwd_tflops", 3.5 * flops / ms / 1e9, "TFLOP/s", f"fwd+bwd counted 3.5x fwd, ms={ms:.4f}")
    )
    for r in rows:
        print(f"{r['name']:<32s} {r['value']:>10s} {r['unit']:<8s} {r['note']}")
    _write_csv(out, rows, CEILING_FIELDS)


# ------------------------------------------------------------------------------------------ LoRA check
def lora_check(smoke: bool) -> None:
    """lora_linear (output and every gradient) against the float64 reference on awkward shapes."""
    import torch

    from oars_fast.kernels import lora_linear, lora_linear_ref

    dev = _device()
    dtypes = [torch.float32] if dev == "cpu" else [torch.float32, torch.float16, torch.bfloat16]
    shapes = [(37, 53, 29, 5)] if smoke or dev == "cpu" else [(37, 53, 29, 5), (4099, 3072, 3072, 32)]
    for dtype in dtypes:
        for m, k, n, r in shapes:
            g = torch.Generator().manual_seed(m)
            ts = [
                torch.randn(*s, generator=g, dtype=torch.float64) / s[-1] ** 0.5
                for s in ((m, k), (n, k), (r, k), (n, r), (n,))
            ]
            gy = torch.randn(m, n, generator=g, dtype=torch.float64)

            def run(fn, ts, dt):
                ins = [t.to(dev, dt).requires_grad_() for t in ts]
                y = fn(ins[0], ins[1], ins[4], ins[2], ins[3], 2.0)
                y.backward(gy.to(dev, dt))
                return [y.detach()] + [t.grad for t in ins]

            ours = run(lora_linear, ts, dtype)
            same = run(lora_linear_ref, ts, dtype)
            ref = run(lora_linear_ref, ts, torch.float64)
            for name, a, b, c in zip(("y", "dx", "dW", "dA", "dB", "dbias"), ours, same, ref):
                err, err_t = (float((t.double().cpu() - c.cpu()).abs().max()) for t in (a, b))
                floor = 4 * torch.finfo(dtype).eps * max(1.0, float(c.abs().max()))
                ok = err <= 3 * err_t + floor
                print(
                    f"lora_linear {dtype} {m}x{k}->{n} r{r} {name}: err {err:.3g} (torch {err_t:.3g}) "
                    f"{'ok' if ok else 'FAIL'}"
                )
                assert ok, f"lora_linear {name} disagrees with float64"
    if dev == "cuda" and not smoke:
        lora_int64()


def lora_int64() -> None:
    """x and y over 2^31 elements (bf16): the rows past 2^31 / in, addressed with int64 offsets, against fp32 math;
    pointer and TMA paths (tests/test_kernels.py::test_lora_linear_int64_offsets, for a machine without pytest)."""
    import importlib

    import torch

    from oars_fast.kernels import lora_linear_ref

    free, _ = torch.cuda.mem_get_info()
    if free < 30 * 2**30:
        print(f"lora_linear int64: skipped, {free / 2**30:.0f} GiB free (needs 30)")
        return
    L = importlib.import_module("oars_fast.kernels.lora_linear")
    m, k, n, r = 2**31 // 64 + 301, 64, 64, 16
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16, generator=g)
    w, a, b = (
        torch.randn(*s, device="cuda", generator=g).div(d).to(torch.bfloat16)
        for s, d in (((n, k), 8), ((r, k), 8), ((n, r), 4))
    )
    tail = slice(m - 1000, m)
    for tma in (False, None):
        with L.tma_mode(tma):
            y, _ = L.lora_linear_forward(x, w, None, a, b, 2.0)
            dx, _ = L.lora_linear_backward(y, w, a, b, 2.0)
        y_ref = lora_linear_ref(x[tail].float(), w.float(), None, a.float(), b.float(), 2.0)
        dx_ref = y[tail].float() @ w.float() + 2.0 * (y[tail].float() @ b.float()) @ a.float()
        ok = torch.allclose(y[tail].float(), y_ref, atol=5e-2, rtol=2e-2) and torch.allclose(
            dx[tail].float(), dx_ref, atol=5e-2, rtol=2e-2
        )
        print(f"lora_linear int64 M={m} (x: {m * k} elements) tma={tma}: {'ok' if ok else 'FAIL'}")
        assert ok, "lora_linear disagrees with fp32 past 2^31 elements"
        del y, dx


# ------------------------------------------------------------------------------------------------ NFT
def nft(out: Path, smoke: bool) -> None:
    """The fused NFT loss in bf16 (the RL dtype) against float64 and against the eager reference in bf16, then the
    nft_loss benchmark (ours / eager / compile) with its rows in the same file."""
    import tempfile

    import torch

    from benchmarks import bench_nft_loss
    from benchmarks.harness import FIELDS, device_name, git_sha, run_case
    from oars_fast.kernels import nft_loss, nft_loss_ref

    dev = _device()
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    shape = (3, 4, 8, 8) if smoke else (24, 16, 64, 64)  # 24 candidates of a 512^2 output's latents
    g = torch.Generator().manual_seed(0)
    vs = [torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(4)]
    t = torch.rand(shape[0], generator=g, dtype=torch.float64)
    r = torch.rand(shape[0], generator=g, dtype=torch.float64)

    def run(fn, dt):
        th, old, tg, ref = (x.to(dev, dt).detach().clone() for x in vs)
        th.requires_grad_()
        loss = fn(
            th,
            old,
            tg,
            t.to(dev, torch.float32 if dt != torch.float64 else dt),
            r.to(dev, torch.float32 if dt != torch.float64 else dt),
            1.0,
            ref,
            1e-4,
            True,
            5.0,
        )
        loss.backward()
        return loss.detach().double().cpu(), th.grad.double().cpu()

    (l64, g64), (lo, go), (le, ge) = run(nft_loss_ref, torch.float64), run(nft_loss, dtype), run(nft_loss_ref, dtype)
    e_loss, e_loss_t = float((lo - l64).abs()), float((le - l64).abs())
    e_grad, e_grad_t = float((go - g64).abs().max()), float((ge - g64).abs().max())
    finite = bool(torch.isfinite(lo)) and bool(torch.isfinite(go).all())
    ok = (
        finite
        and e_loss <= 2 * e_loss_t + 1e-6 * abs(float(l64))
        and e_grad <= 3 * e_grad_t + 1e-6 * float(g64.abs().max())
    )
    note = (
        f"{'ok' if ok else 'FAIL'}: loss {float(l64):.6g} err {e_loss:.3g} (eager {dtype}: {e_loss_t:.3g}); grad "
        f"err {e_grad:.3g} (eager: {e_grad_t:.3g})"
    )
    print(f"nft_loss {dtype} {list(shape)} vs float64: {note}")
    _write_csv(
        out,
        [
            {
                "device": device_name(),
                "git_sha": git_sha(),
                "torch": torch.__version__,
                "kernel": "nft_sanity",
                "shape": str(list(shape)),
                "dtype": str(dtype).replace("torch.", ""),
                "provider": "ours",
                "mode": "check",
                "note": note,
            }
        ],
        FIELDS,
    )
    assert ok, f"nft_loss {dtype} disagrees with float64: {note}"
    # timings: one case of benchmarks.bench_nft_loss (ours / eager / compile; fwd, bwd, full), the first of its
    # shapes (24 candidates x 16 x 128^2 latents); its copy-bandwidth row is in ceilings.csv
    if smoke:
        case = bench_nft_loss.cases(smoke=True)[0]
        # inductor's C++ compile of the smoke case costs ~20 s on a small CPU: the graph capture is what is
        # checked here, the compiled-kernel speed only on the GPU
        case.providers["compile"] = torch.compile(case.providers["eager"], backend="aot_eager")
    else:
        case = bench_nft_loss.make_case((24, 16, 128, 128), torch.bfloat16, dev)
    with tempfile.TemporaryDirectory() as tmp:
        run_case(case, Path(tmp), note="smoke" if smoke else "", reps=3 if smoke else 10)
        merge_csv(out, sorted(Path(tmp).glob("*.csv")))
    # rl.fp8_nograd's activation quantisation (fused vs eager vs compile; codes checked first): the H200's fp8
    # rollout was slower than bf16 with the eager version
    from benchmarks import bench_fp8_quant

    with tempfile.TemporaryDirectory() as tmp:
        for case in bench_fp8_quant.cases(smoke)[: 1 if smoke else None]:
            if smoke:
                case.providers["compile"] = torch.compile(case.providers["eager"], backend="aot_eager")
            run_case(case, Path(tmp), note="smoke" if smoke else "", reps=3 if smoke else 10)
        merge_csv(out, sorted(Path(tmp).glob("*.csv")))


# -------------------------------------------------------------------------------------------- profile
def profile(out: Path, smoke: bool, batch: int = 8) -> None:
    """2 blocks of the production transformer (3072 wide, 24 heads, text dim 3584) with the RL LoRA (r32 on the 8
    attention projections, float32 adapters, bf16 autocast, gradient checkpointing): forward + backward of one
    update micro-batch, the profiler's top 15 kernels, and TFLOP/s against benchmarks.rl_cost's count."""
    import json
    import time

    import torch
    from diffusers import QwenImageTransformer2DModel
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    from benchmarks import rl_cost
    from oars_fast.config import LoRAConfig
    from oars_fast.models.lora import add_lora, lora_layers, use_lora_kernel

    dev = _device()
    cfg = dict(num_layers=2)
    img, txt = 1024, 220
    if smoke:
        cfg = dict(
            num_layers=2, attention_head_dim=16, num_attention_heads=2, joint_attention_dim=24, axes_dims_rope=(4, 6, 6)
        )
        img, txt, batch = 16, 7, 2
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    torch.manual_seed(0)
    with torch.device(dev):  # initialised on the device (0.7B parameters at full width)
        model = torch.nn.Module.to(QwenImageTransformer2DModel(**cfg), dtype)  # (ModelMixin.to warns on a cast)
    model.requires_grad_(False)
    lcfg = LoRAConfig()
    add_lora(model, lcfg)
    for _, layer in lora_layers(model):  # B != 0 so that the adapters change the output
        torch.nn.init.normal_(layer.lora_B["default"].weight, std=0.02)
    model.enable_gradient_checkpointing()
    side = int(img**0.5)
    g = torch.Generator(device=dev).manual_seed(1)
    kw = dict(
        hidden_states=torch.randn(batch, 2 * img, model.config.in_channels, device=dev, generator=g),
        encoder_hidden_states=torch.randn(batch, txt, model.config.joint_attention_dim, device=dev, generator=g),
        encoder_hidden_states_mask=torch.ones(batch, txt, device=dev, dtype=torch.long),
        timestep=torch.rand(batch, device=dev, generator=g),
        img_shapes=[[(1, side, side)] * 2] * batch,
        return_dict=False,
    )
    params = [p for p in model.parameters() if p.requires_grad]

    def step():
        with torch.autocast(dev, dtype=torch.bfloat16, enabled=dev == "cuda"):
            y = model(**kw)[0]
        y.float().pow(2).mean().backward()
        return y

    def sync():
        if dev == "cuda":
            torch.cuda.synchronize()

    # agreement first: our kernel against peft's own forward (outputs and the adapters' gradients)
    res, first = {}, {}
    for kernel in ("peft", "triton"):
        use_lora_kernel(model, kernel)
        for p in params:
            p.grad = None
        t0 = time.perf_counter()
        y = step()
        sync()
        first[kernel] = time.perf_counter() - t0
        # (the last block's text-stream output is unused: its to_add_out adapter gets no gradient)
        res[kernel] = (y.detach().float(), [None if p.grad is None else p.grad.float().clone() for p in params])
    e_out = _rel(res["triton"][0], res["peft"][0])
    assert [a is None for a in res["triton"][1]] == [b is None for b in res["peft"][1]], "different grads are None"
    e_grad = max(_rel(a, b) for a, b in zip(res["triton"][1], res["peft"][1]) if b is not None)
    tol = 3e-2 if dtype == torch.bfloat16 else 1e-4
    lines = [
        f"transformer {cfg} + LoRA r{lcfg.rank} on {len(lora_layers(model))} layers, batch {batch} x "
        f"({2 * img} image + {txt} text tokens), {dtype}, autocast bf16, gradient checkpointing",
        f"agreement triton vs peft: output rel err {e_out:.3g}, adapter grads rel err {e_grad:.3g} (tol {tol})",
    ]
    print(lines[-1])
    assert e_out < tol and e_grad < tol, lines[-1]

    times = dict(first)  # smoke: the agreement run's time (compilation included); else the median of 5
    for kernel in () if smoke else ("triton", "peft"):
        use_lora_kernel(model, kernel)
        step()
        sync()
        ts = []
        for _ in range(5):
            for p in params:
                p.grad = None
            t0 = time.perf_counter()
            step()
            sync()
            ts.append(time.perf_counter() - t0)
        times[kernel] = sorted(ts)[len(ts) // 2]
    mcfg = {k: v for k, v in model.config.items() if not k.startswith("_")}
    tc = rl_cost._transformer_cached(
        json.dumps(mcfg, default=list),
        img,
        img,
        txt,
        "bf16",
        tuple(lcfg.target_modules),
        lcfg.rank,
        "triton",
        "profile",
    )
    flops = (tc.fwd(batch) + tc.bwd(batch) + tc.recompute(batch)).total_flops
    for kernel, s in times.items():
        lines.append(
            f"fwd+bwd (+recompute) {kernel:7s} {s * 1e3:9.2f} ms  {flops / s / 1e12:7.1f} TFLOP/s "
            f"(rl_cost counts {flops / 1e12:.2f} TFLOP per step)"
        )
        print(lines[-1])
    use_lora_kernel(model, "triton")
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev == "cuda" else [])
    with torch_profile(activities=acts) as prof:
        step()
        sync()
    key = "self_cuda_time_total" if dev == "cuda" else "self_cpu_time_total"
    try:
        table = prof.key_averages().table(sort_by=key, row_limit=15)
    except (AttributeError, KeyError, RuntimeError):
        table = prof.key_averages().table(sort_by="self_device_time_total", row_limit=15)
    lines += [f"torch.profiler, one step with the triton kernel, top 15 by {key}:", table]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print(table)


# ----------------------------------------------------------------------------------------- demo-cache
def _smooth_image(rng, h: int, w: int):
    """A smooth random RGB image (uint8) with some noise: stands in for a photo where only sizes matter."""
    import numpy as np

    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    f = rng.uniform(2, 12, (3, 2))
    img = np.stack(
        [np.sin(2 * np.pi * (f[c, 0] * xx + rng.random())) * np.cos(2 * np.pi * f[c, 1] * yy) for c in range(3)], -1
    )
    img = img * 0.4 + 0.5 + rng.normal(0, 0.05, img.shape)
    return (img.clip(0, 1) * 255).astype(np.uint8)


def synthetic_jpegs(work: Path, n: int = 48) -> Path:
    """`n` synthetic 768x512 JPEGs (quality 95) in ``work/jpeg``, where ``benchmarks.loaders`` looks for its files
    first: the loader benchmark without scikit-image (its demo photos)."""
    import numpy as np
    from PIL import Image

    out = work / "jpeg"
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(_smooth_image(rng, 512, 768)).save(out / f"{i:04d}_synthetic.jpg", quality=95)
    print(f"jpegs: {n} synthetic 768x512 JPEGs in {out}")
    return out


def demo_cache(home: Path, patch: int = 256, n: int = 40) -> Path:
    """`n` smooth random patches in the layout of ``oars_fast.data.demo.demo_dataset_dir`` under
    ``home/.cache/oars-fast/demo`` (the demo set's default cache), so that benchmarks.rl_iteration runs where
    scikit-image and scikit-learn (the real demo photos) are not installed. Its timings do not depend on the
    pixels (random weights)."""
    import json

    import numpy as np
    from PIL import Image

    from oars_fast.data import demo

    root = home / ".cache" / "oars-fast" / "demo" / f"patches{patch}"
    if demo._valid(root / "manifest.json"):
        return root
    rng = np.random.default_rng(0)
    counts = {"train": 0, "val": 0}
    for i in range(n):
        split = "val" if i % 8 == 7 else "train"
        (root / split).mkdir(parents=True, exist_ok=True)
        Image.fromarray(_smooth_image(rng, patch, patch)).save(root / split / f"synthetic_{i:03d}.png")
        counts[split] += 1
    (root / "manifest.json").write_text(json.dumps({"version": demo._VERSION, "patch": patch, **counts}))
    print(f"demo-cache: {counts['train']} train / {counts['val']} val synthetic {patch}px patches in {root}")
    return root


# ------------------------------------------------------------------------------------------ merge-csv
def merge_csv(out: Path, inputs: list[Path]) -> int:
    """Append the rows of `inputs` (CSV files with a header) to `out`, keeping `out`'s header (or the first
    input's). Returns the number of rows written."""
    n = 0
    for path in inputs:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
        if not rows:
            continue
        fields = list(rows[0])
        if out.exists():
            with open(out, newline="") as f:
                fields = next(csv.reader(f), fields)
        _write_csv(out, rows, fields)
        n += len(rows)
    return n


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "step",
        choices=[
            "info",
            "ceilings",
            "lora-check",
            "nft",
            "profile",
            "merge-csv",
            "wheels",
            "install",
            "demo-cache",
            "jpegs",
        ],
    )
    ap.add_argument("paths", nargs="*", type=Path, help="merge-csv: OUT IN...; wheels, install: DIR")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--smoke", action="store_true", help="tiny sizes on any device (a check of the step, no result)")
    ap.add_argument(
        "--scope",
        choices=SCOPES,
        default="all",
        help="wheels, install: measure leaves out deepspeed and what only it needs",
    )
    ap.add_argument("--target", type=Path, help="install: the folder to install into (first on PYTHONPATH)")
    ap.add_argument("--home", type=Path, help="demo-cache: the HOME whose ~/.cache/oars-fast/demo gets the patches")
    ap.add_argument("--patch", type=int, default=256, help="demo-cache: patch side (rl_iteration: max(128, crop))")
    args = ap.parse_args(argv)
    folder = args.paths[0] if args.paths else Path(".whl")
    if args.step == "wheels":
        print("\n".join(str(w) for w in wheels_to_install(folder, args.scope)))
    elif args.step == "install":
        if args.target is None:
            ap.error("install needs --target")
        failed = install(folder, args.target, args.scope)
        sys.exit(1 if any(f.startswith("diffusers-") for f in failed) else 0)
    elif args.step == "jpegs":
        if args.out is None:
            ap.error("jpegs needs --out (benchmarks.loaders' --work)")
        synthetic_jpegs(args.out)
    elif args.step == "demo-cache":
        if args.home is None:
            ap.error("demo-cache needs --home")
        demo_cache(args.home, args.patch)
    elif args.step == "merge-csv":
        print(f"{merge_csv(args.paths[0], args.paths[1:])} rows -> {args.paths[0]}")
    elif args.step == "lora-check":
        lora_check(args.smoke)
    else:
        if args.out is None:
            ap.error(f"{args.step} needs --out")
        {
            "info": lambda: info(args.out),
            "ceilings": lambda: ceilings(args.out, args.smoke),
            "nft": lambda: nft(args.out, args.smoke),
            "profile": lambda: profile(args.out, args.smoke),
        }[args.step]()


if __name__ == "__main__":
    main()
