"""The compile report (benchmarks/compile_report.py) on a small subset: sm_90 compiles without a GPU."""
import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _cuda_backend() -> str | None:
    """Why the installed Triton cannot compile for CUDA here, or None when it can."""
    try:
        import triton
        from triton.backends import backends
    except ImportError as e:  # pragma: no cover
        return f"triton not importable: {e}"
    if "nvidia" not in backends:
        return f"the installed Triton {triton.__version__} has no CUDA backend"
    bins = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    if not (bins / "ptxas").exists() or not (bins / "cuobjdump").exists():
        return f"the installed Triton {triton.__version__} ships no ptxas/cuobjdump"
    return None


needs_cuda_backend = pytest.mark.skipif(_cuda_backend() is not None, reason=str(_cuda_backend()))


@needs_cuda_backend
def test_compile_report_subset(tmp_path):
    """Default configs of a TMA GEMM, a pointer-path u pass and an elementwise kernel compile for sm_90: the
    rows say registers, no spill, shared memory, and wgmma/TMA where they belong. One process, ~10 s."""
    out = tmp_path / "report.csv"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, "-m", "benchmarks.compile_report", "--kernels", "lora_mm_fwd_tma,lora_u_dx_ptr,nft_bwd",
           "--dtypes", "bf16", "--max-configs", "1", "--jobs", "1", "--out", str(out)]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rows = {row["kernel"]: row for row in csv.DictReader(open(out))}
    assert set(rows) == {"lora_mm_fwd_tma", "lora_u_dx_ptr", "nft_bwd"}
    for row in rows.values():
        assert row["status"] == "ok" and row["default"] == "*" and row["arch"] == "sm_90"
        assert int(row["regs"]) > 0 and int(row["spill_bytes"]) == 0 and float(row["compile_s"]) >= 0
    mm = rows["lora_mm_fwd_tma"]
    assert (mm["wgmma"], mm["tma"]) == ("yes", "yes") and int(mm["smem_bytes"]) > 0
    assert rows["lora_u_dx_ptr"]["tma"] == "no" and rows["nft_bwd"]["wgmma"] == "no"
    assert "lora_mm_fwd_tma" in r.stdout and "spill_B" in r.stdout  # the table


def test_compile_report_flags_spilling_defaults():
    from benchmarks import compile_report as cr

    ok = {"kernel": "k", "dtype": "bf16", "config": "c", "default": "*", "status": "ok", "spill_bytes": 0}
    assert cr.failures([ok, {**ok, "default": "", "spill_bytes": 64}]) == []  # a spilling candidate is reported only
    assert cr.failures([{**ok, "spill_bytes": 24}]) and cr.failures([{**ok, "status": "error: X"}])


def test_compile_report_rejects_unknown_names():
    from benchmarks import compile_report as cr

    with pytest.raises(SystemExit, match="unknown kernel"):
        cr.jobs_for(["nope"], ["bf16"], None)
    with pytest.raises(SystemExit, match="dtype"):
        cr.main(["--dtypes", "fp8"])
