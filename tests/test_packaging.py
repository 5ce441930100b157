"""The wheel: built from the tracked files of this checkout, it holds every subpackage and the shipped
configs; installed non-editable into a scratch folder it runs `oars-fast --help` and a quick stage from
an unrelated folder (the CI step of the house rules)."""
from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp("src")
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                           text=True, check=True).stdout.split()
    for f in files:  # a clean copy: what a fresh clone holds (plus files not yet committed), no build leftovers
        if (ROOT / f).is_file():
            (src / f).parent.mkdir(parents=True, exist_ok=True)
            (src / f).write_bytes((ROOT / f).read_bytes())
    out = tmp_path_factory.mktemp("dist")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out),
                    str(src)], check=True, capture_output=True, text=True)
    (whl,) = out.glob("oars_fast-*.whl")
    return whl


def test_wheel_holds_every_subpackage_and_the_configs(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for pkg in [p for p in (ROOT / "oars_fast").rglob("__init__.py")]:
        assert str(pkg.relative_to(ROOT)) in names, pkg
    for sub in (ROOT / "oars_fast").iterdir():
        if sub.is_dir() and any(sub.glob("*.py")):
            assert (sub / "__init__.py").is_file(), f"{sub} has modules but no __init__.py"
    assert "oars_fast/kernels/lora_linear.py" in names and "oars_fast/models/backbone.py" in names
    for cfg in (ROOT / "configs").rglob("*.yaml"):
        assert f"oars_fast/configs/{cfg.relative_to(ROOT / 'configs')}" in names, cfg
    assert not [n for n in names if n.startswith(("tests/", "benchmarks/", "kernels/"))]


def test_installed_wheel_runs_from_an_unrelated_folder(wheel, tmp_path, demo_cache):
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-compile", "-q", "--target", str(site),
                    str(wheel)], check=True, capture_output=True, text=True)
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site), "PYTHONNOUSERSITE": "1"}
    env.pop("TRITON_INTERPRET", None)

    def run(*args):
        return subprocess.run([sys.executable, *args], cwd=work, env=env, capture_output=True, text=True, timeout=300)

    where = run("-c", "import oars_fast, oars_fast.models.backbone, oars_fast.kernels; print(oars_fast.__file__)")
    assert where.returncode == 0, where.stderr
    assert where.stdout.strip().startswith(str(site)), where.stdout  # the installed copy, not the source tree
    res = run(str(site / "bin" / "oars-fast"), "--help")
    assert res.returncode == 0 and "sft" in res.stdout and "rl" in res.stdout, res.stderr
    res = run(str(site / "bin" / "oars-fast"), "data", "--config", "configs/demo/data.yaml", "run.output_dir=out",
              f"data.demo_cache={demo_cache}", "data.batch_size=2")
    assert res.returncode == 0, res.stderr[-3000:]
    assert (work / "out" / "data" / "samples" / "data_preview.png").is_file()
