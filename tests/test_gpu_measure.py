"""benchmarks/gpu_measure.sh on the CPU: every step at tiny sizes (--cpu-smoke, in two runs), the budget that clips
and skips steps, the set-up's wheel selection and installation, the synthetic data the GPU machine needs, and the
scale-out script's smoke run, so that a device session is not spent on a typo."""

import csv
import os
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

from benchmarks import gpu_steps

ROOT = Path(__file__).resolve().parents[1]
STEPS = ["info", "ceilings", "kernel_tests", "lora_linear", "nft", "profile", "rl_iteration"]
FILES = {
    "ceilings": "ceilings.csv",
    "kernel_tests": "kernels_tests.log",
    "lora_linear": "lora_linear.csv",
    "nft": "nft.csv",
    "profile": "transformer_profile.txt",
}


def _run(*args, env=None, timeout=300, script="gpu_measure.sh"):
    # OARS_GIT_SHA: no git call from the scripts
    e = {**os.environ, "PYTHON": sys.executable, "OARS_GIT_SHA": "test", "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(
        ["bash", f"benchmarks/{script}", *args], cwd=ROOT, env=e, capture_output=True, text=True, timeout=timeout
    )


def _summary(out: Path) -> dict:
    lines = (out / "gpu.txt").read_text().split("--- gpu_measure steps")[1].splitlines()[1:]
    return {ln.split()[0]: ln.split()[1] for ln in lines if ln.strip()}


def test_plan_lists_the_steps_in_order_within_seven_minutes():
    r = _run("--plan")
    assert r.returncode == 0, r.stderr
    head, *steps = r.stdout.splitlines()
    assert head.startswith("budget 420s") and "set-up 15s" in head
    assert [ln.split()[0] for ln in steps] == STEPS
    budgets = [int(ln.split()[1]) for ln in steps]
    minimums = [int(ln.split()[2]) for ln in steps]
    assert 15 + sum(budgets) <= 420 and f"= {15 + sum(budgets)}s planned" in head
    assert all(0 < m <= b for m, b in zip(minimums, budgets))
    wrapper = subprocess.run(["bash", "benchmarks/gpu_check.sh", "--plan"], cwd=ROOT, capture_output=True, text=True)
    assert wrapper.stdout == r.stdout  # the old entry point runs the new script


def _smoke(tmp_path, skip):
    out = tmp_path / "out"
    r = _run(str(out), "--cpu-smoke", env={"GPU_MEASURE_SKIP": " ".join(skip)})
    log = (out / "measure.log").read_text() if (out / "measure.log").exists() else ""
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:] + log[-5000:]
    ran = [s for s in STEPS if s not in skip]
    assert _summary(out) == {s: "ok" if s in ran else "skipped" for s in STEPS}
    files = sorted(p.name for p in out.iterdir())
    # rl_iteration is a dry run in the smoke (no rl_iteration.csv; tests/test_benchmarks.py runs its own smoke)
    assert files == sorted(["gpu.txt", "measure.log"] + [FILES[s] for s in ran if s in FILES])
    return out, log


def test_cpu_smoke_first_steps(tmp_path):
    """info, ceilings, kernel tests, LoRA benchmark (the other steps: the next test; one run would take ~2 min)."""
    out, log = _smoke(tmp_path, ["nft", "profile", "rl_iteration"])
    info = (out / "gpu.txt").read_text()
    assert "torch " in info and "diffusers " in info and "device cpu" in info
    names = {row["name"] for row in csv.DictReader(open(out / "ceilings.csv"))}
    assert names == {
        "copy_gbps",
        "gemm_bf16_8192_tflops",
        "linear_16384x3072x3072_tflops",
        "sdpa_rl_tflops",
        "sdpa_rl_fwdbwd_tflops",
    }
    rows = list(csv.DictReader(open(out / "lora_linear.csv")))
    assert {r["provider"] for r in rows} == {"base", "ours", "addmm", "peft", "u"}
    assert {r["mode"] for r in rows if r["provider"] == "ours"} == {"fwd", "full"}
    assert "outputs agree" in log  # checked before timing
    kt = (out / "kernels_tests.log").read_text()
    assert "test_lora_linear_int64_offsets" in kt and "tests collected" in kt and "FAIL" not in kt
    assert "lora_linear torch.float32 37x53->29 r5 dA" in kt and " ok" in kt


def test_cpu_smoke_last_steps(tmp_path):
    out, log = _smoke(tmp_path, ["info", "ceilings", "kernel_tests", "lora_linear"])
    rows = list(csv.DictReader(open(out / "nft.csv")))
    assert rows[0]["kernel"] == "nft_sanity" and rows[0]["note"].startswith("ok")
    assert {r["provider"] for r in rows[1:]} == {"ours", "eager", "compile"}
    assert {r["mode"] for r in rows[1:]} == {"fwd", "bwd", "full"}
    prof = (out / "transformer_profile.txt").read_text()
    assert "agreement triton vs peft" in prof and "rl_cost counts" in prof and "top 15" in prof
    assert "synthetic 128px patches" in log and "rl_iteration: dry run ok" in log


def test_budget_clips_and_skips_steps(tmp_path):
    out = tmp_path / "out"
    t0 = time.time()
    r = _run(str(out), "--cpu-smoke", "--budget", "30", env={"GPU_MEASURE_SKIP": "info kernel_tests"})
    took = time.time() - t0
    summary = _summary(out)
    assert summary["info"] == "skipped"
    skipped = [s for s in STEPS[2:] if summary[s] == "skipped"]
    assert skipped and "needs" in (out / "gpu.txt").read_text()
    assert took < 30 + 15, r.stdout  # the budget, plus python start-up: steps are clipped to end in time


def test_wheel_selection_by_scope(tmp_path):
    for name in (
        "diffusers-0.0.1-py3-none-any.whl",
        "deepspeed-0.0.1-py3-none-any.whl",
        "hjson-99.0-py3-none-any.whl",
        "pytest-0.0.1-py3-none-any.whl",
        "no_such_package_xyz-1.0-py3-none-any.whl",
        "oldabi-1.0-cp27-cp27mu-manylinux1_x86_64.whl",
        "pytest-99.0-py3-none-any.whl",
    ):
        (tmp_path / name).write_bytes(b"")
    got = sorted(p.name for p in gpu_steps.wheels_to_install(tmp_path))
    # diffusers and deepspeed always; others only when newer than the installed one; never one for another Python
    assert got == [
        "deepspeed-0.0.1-py3-none-any.whl",
        "diffusers-0.0.1-py3-none-any.whl",
        "hjson-99.0-py3-none-any.whl",
        "no_such_package_xyz-1.0-py3-none-any.whl",
        "pytest-99.0-py3-none-any.whl",
    ]
    measure = sorted(p.name for p in gpu_steps.wheels_to_install(tmp_path, "measure"))
    assert measure == [
        "diffusers-0.0.1-py3-none-any.whl",
        "no_such_package_xyz-1.0-py3-none-any.whl",
        "pytest-99.0-py3-none-any.whl",
    ]
    with pytest.raises(ValueError):
        gpu_steps.wheels_to_install(tmp_path, "most")


def _wheel(folder: Path, name: str, version: str) -> Path:
    path = folder / f"{name}-{version}-py3-none-any.whl"
    info = f"{name}-{version}.dist-info"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(f"{name}/__init__.py", "VALUE = 42\n")
        z.writestr(f"{name}-{version}.data/purelib/{name}_extra.py", "EXTRA = 1\n")
        z.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
        z.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr(f"{info}/RECORD", "")
    return path


@pytest.mark.parametrize("how", ["pip", "unzip"])
def test_install_makes_the_wheels_importable(tmp_path, how):
    wheels = tmp_path / "whl"
    wheels.mkdir()
    _wheel(wheels, "oars_fake_pkg", "1.2")
    target = tmp_path / "site"
    if how == "pip":
        assert gpu_steps.install(wheels, target, "measure") == []
    else:  # what a machine without pip gets
        gpu_steps._unzip(next(wheels.glob("*.whl")), target)
    code = (
        "import importlib.metadata as m, oars_fake_pkg, oars_fake_pkg_extra; "
        "print(oars_fake_pkg.VALUE, oars_fake_pkg_extra.EXTRA, m.version('oars_fake_pkg'))"
    )
    r = subprocess.run(
        [sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(target)}, capture_output=True, text=True
    )
    assert r.stdout.split() == ["42", "1", "1.2"], r.stderr


def test_synthetic_demo_cache_is_the_demo_set(tmp_path, monkeypatch):
    """The patches gpu_measure.sh writes for rl_iteration are taken as the demo set without the demo photos
    (scikit-image, scikit-learn), as on a GPU machine without them; the same for the loader benchmark's JPEGs."""
    from benchmarks import loaders
    from oars_fast.data import demo

    def no_photos():
        raise ImportError("no scikit-image here")

    monkeypatch.setattr(demo, "demo_photos", no_photos)
    root = gpu_steps.demo_cache(tmp_path, patch=64, n=16)
    assert demo.demo_dataset_dir(tmp_path / ".cache" / "oars-fast" / "demo", 64) == root
    assert len(list((root / "train").glob("*.png"))) == 14 and len(list((root / "val").glob("*.png"))) == 2
    jpeg = gpu_steps.synthetic_jpegs(tmp_path / "work", n=5)
    assert loaders.make_files(tmp_path / "work", 5) == jpeg


def test_scaleout_script_smoke(tmp_path):
    out = tmp_path / "so"
    r = _run(str(out), env={"SMOKE": "1"}, script="gpu_scaleout_check.sh")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == ["gpu_scaleout.txt", "gpu_scaleout_tests.log", "loaders.csv"]
    assert "deepspeed" in (out / "gpu_scaleout.txt").read_text()
    assert "tests collected" in (out / "gpu_scaleout_tests.log").read_text()


def test_merge_csv_keeps_one_header(tmp_path):
    for i in range(2):
        with open(tmp_path / f"{i}.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=["a", "b"])
            w.writeheader()
            w.writerow({"a": i, "b": 2 * i})
    out = tmp_path / "all.csv"
    assert gpu_steps.merge_csv(out, [tmp_path / "0.csv", tmp_path / "1.csv"]) == 2
    assert out.read_text().splitlines() == ["a,b", "0,0", "1,2"]
