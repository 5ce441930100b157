"""The house rules: no import cycles, checkpoints that cannot run code, a diverged run that fails loudly,
one-line errors for a user's mistakes."""
from __future__ import annotations

import ast
import os
import pickle
from pathlib import Path

import pytest
import torch

from oars_fast.cli import main
from oars_fast.errors import UserError

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------------
# Import graph
# ------------------------------------------------------------------------------------------------


def _modules() -> dict[str, Path]:
    """Every project module by dotted name (``kernels/`` is installed as ``oars_fast.kernels``)."""
    out = {}
    for base, pkg in ((ROOT / "oars_fast", "oars_fast"), (ROOT / "kernels", "oars_fast.kernels")):
        for f in base.rglob("*.py"):
            if pkg == "oars_fast" and f.is_relative_to(ROOT / "oars_fast" / "kernels"):
                continue
            parts = list(f.relative_to(base).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join([pkg, *parts])] = f
    return out


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Project modules `name` imports anywhere in its file (function-local imports included)."""
    is_pkg = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")
                base = base[: len(base) - node.level + (1 if is_pkg else 0)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            targets = [mod] + [f"{mod}.{a.name}" for a in node.names]
        for t in targets:
            if t in modules and t != name:
                found.add(t)
    return found


def test_no_import_cycles():
    modules = _modules()
    graph = {m: _imports(m, p, modules) for m, p in modules.items()}
    # Tarjan's strongly connected components: any component of more than one module is a cycle
    index, low, stack, on, cycles, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for m in graph:
        if m not in index:
            visit(m)
    assert len(graph) > 40 and not cycles, cycles


def test_nothing_below_stages_imports_a_stage_and_kernels_import_no_project_code():
    modules = _modules()
    for m, p in modules.items():
        deps = _imports(m, p, modules)
        if not m.startswith(("oars_fast.stages", "oars_fast.cli")):
            assert not [d for d in deps if d.startswith("oars_fast.stages")], m
        if m.startswith("oars_fast.kernels"):
            assert all(d.startswith("oars_fast.kernels") for d in deps), m


# ------------------------------------------------------------------------------------------------
# Checkpoints load without unpickling code
# ------------------------------------------------------------------------------------------------


class _Payload:
    """Unpickling this runs code: it creates a file."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_crafted_checkpoint_is_refused_without_running_code(tmp_path):
    from oars_fast.runtime import checkpoint as ckpt

    folder = tmp_path / "checkpoints" / "step_000001"
    folder.mkdir(parents=True)
    marker = tmp_path / "pwned"
    with open(folder / ckpt.STATE, "wb") as f:
        pickle.dump({"step": 1, "evil": _Payload(str(marker))}, f)
    (folder / ckpt.MARKER).write_text("1")
    assert ckpt.latest_checkpoint(tmp_path / "checkpoints") == folder
    with pytest.raises(UserError, match="refusing to load .*could run code"):
        ckpt.load_state(folder)
    assert not marker.exists()


def test_training_state_with_rng_streams_is_plain_data(tmp_path):
    from oars_fast.runtime.checkpoint import load_safely
    from oars_fast.runtime.seeding import rng_state, set_rng_state

    torch.save({"rng": rng_state(), "step": 3, "losses": [0.5]}, tmp_path / "s.pt")
    state = load_safely(tmp_path / "s.pt")
    import random

    import numpy as np

    set_rng_state(state["rng"])
    a = (random.random(), float(np.random.rand()), float(torch.rand(())))
    set_rng_state(state["rng"])
    assert (random.random(), float(np.random.rand()), float(torch.rand(()))) == a


# ------------------------------------------------------------------------------------------------
# A diverged run fails loudly and keeps what was good
# ------------------------------------------------------------------------------------------------


def _tiny_sft(tmp_path, demo_cache, name):
    return ["--config", "configs/demo/sft.yaml", f"run.output_dir={tmp_path}", f"run.name={name}",
            f"data.demo_cache={demo_cache}", "data.crop_size=32", "data.batch_size=2", "model.pretrained=null",
            "model.tiny={num_layers: 1}", "sft.latent_pool=0", "sft.sample_every=0", "sampler.steps=2"]


def test_diverged_sft_stops_with_the_cause_and_exports_nothing(tmp_path, demo_cache, capsys):
    rc = main(["sft", *_tiny_sft(tmp_path, demo_cache, "div"), "optim.lr=1e9", "sft.steps=50", "sft.save_every=0"])
    err = capsys.readouterr().err
    assert rc == 1, err
    assert "TrainingDiverged" in err and "20 consecutive steps" in err and "learning rate 1e+09" in err
    assert "at step 21" in err and "newest complete checkpoint: none" in err
    assert not (tmp_path / "div" / "model").exists()


def test_diverged_run_keeps_the_last_good_checkpoint_newest(tmp_path, demo_cache, capsys, monkeypatch):
    """Four good steps with checkpoints at 2 and 4, then every loss is NaN: the run stops after three,
    the step-4 checkpoint stays the newest, no model is exported."""
    import oars_fast.stages.sft as sft_mod

    real, calls = sft_mod.flow_matching_loss, []

    def loss_that_breaks(*a):
        calls.append(1)
        return real(*a) * (float("nan") if len(calls) > 4 else 1.0)

    monkeypatch.setattr(sft_mod, "flow_matching_loss", loss_that_breaks)
    args = [*_tiny_sft(tmp_path, demo_cache, "late"), "sft.steps=40", "sft.save_every=2", "optim.max_nonfinite_steps=3"]
    assert main(["sft", *args]) == 1
    err = capsys.readouterr().err
    ckpts = tmp_path / "late" / "checkpoints"
    assert "3 consecutive steps" in err and "(steps 5-7; at step 7: loss nan" in err, err
    assert f"newest complete checkpoint: {ckpts / 'step_000004'}" in err
    assert sorted(p.name for p in ckpts.iterdir()) == ["step_000002", "step_000004"]
    assert not (tmp_path / "late" / "model").exists()


@pytest.mark.timeout(600)
def test_diverged_deepspeed_sft_and_rl_stop_too(tmp_path, demo_cache):
    pytest.importorskip("deepspeed")
    from _launch import launch

    args = [*_tiny_sft(tmp_path, demo_cache, "ds"), "optim.lr=1e9", "sft.steps=30", "sft.save_every=0",
            "optim.max_nonfinite_steps=4", "deepspeed.enabled=on", "deepspeed.zero_stage=2"]
    res = launch(1, ["sft", *args], check=False)
    assert res.returncode == 1 and "TrainingDiverged" in res.stderr, res.stderr[-2000:]
    assert not (tmp_path / "ds" / "model").exists()
    rl = ["rl", "--config", "configs/demo/rl_fr.yaml", f"run.output_dir={tmp_path}", "run.name=rl",
          f"data.demo_cache={demo_cache}", "data.crop_size=32", "model.pretrained=null", "model.tiny={num_layers: 1}",
          "lora.kernel=peft", "rl.group_size=2", "rl.rollout_steps=2", "rl.iterations=20", "rl.eval_inputs=0",
          "rl.probe_every=0", "rl.save_every=0", "rl.sft_model=null", "rl.filter_mean=2.0", "optim.lr=1e12",
          "optim.max_nonfinite_steps=3"]
    res = launch(1, rl, check=False)
    assert res.returncode == 1 and "TrainingDiverged" in res.stderr, res.stderr[-2000:]
    assert not (tmp_path / "rl" / "lora").exists()


# ------------------------------------------------------------------------------------------------
# A user's mistake is one line and exit code 2
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("argv,expect", [
    (["infer", "infer.input=/nonexistent/lr", "model.pretrained=/nonexistent/model"], "/nonexistent"),
    (["sft", "model.pretrained=/nonexistent/model", "run.device=cpu"], "/nonexistent/model"),
    (["merge", "merge.model=/nonexistent/m", "merge.lora=/nonexistent/l", "merge.output=/tmp/x"], "/nonexistent"),
])
def test_user_mistakes_end_as_one_line(argv, expect, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main([*argv, f"run.output_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err.strip()
    assert expect in err and "Traceback" not in err and len(err.splitlines()) == 1, err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_a_gpu_is_one_line(tmp_path, capsys):
    assert main(["data", "run.device=cuda", f"run.output_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert "no CUDA device is visible" in err and "Traceback" not in err


def test_ruff_is_configured_for_ci():
    text = (ROOT / "pyproject.toml").read_text()
    assert "line-length = 120" in text
    assert "ruff check" in (ROOT / "Makefile").read_text()
    assert os.access(ROOT / ".ci" / "run", os.X_OK)
