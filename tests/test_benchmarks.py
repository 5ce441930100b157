"""The benchmark harness runs (tiny smoke shapes, CPU) and writes complete rows. Not a timing test."""
import csv

from benchmarks import bench_nft_loss
from benchmarks.harness import FIELDS


def test_harness_writes_three_providers_and_three_modes(tmp_path):
    bench_nft_loss.main(["--smoke", "--out", str(tmp_path)])
    rows = list(csv.DictReader(open(tmp_path / "nft_loss.csv")))
    assert list(rows[0]) == FIELDS
    assert {r["provider"] for r in rows} == {"ours", "eager", "compile"}
    assert {r["mode"] for r in rows} == {"fwd", "bwd", "full"}
    assert all(float(r["ms"]) > 0 and r["note"] == "smoke" and r["device"] and r["torch"] for r in rows)


def test_rl_iteration_script_runs(tmp_path, monkeypatch):
    """The GPU RL-iteration benchmark, on tiny shapes, end to end (so a device session is not spent on a typo)."""
    from benchmarks import rl_iteration

    monkeypatch.setenv("HOME", str(tmp_path))  # the demo set's default cache goes under the temporary home
    rl_iteration.main(["--smoke", "--iters", "1", "--fp8", "--out", str(tmp_path / "out"),
                       "--work", str(tmp_path / "w")])
    rows = list(csv.DictReader(open(tmp_path / "out" / "rl_iteration.csv")))
    assert [r["provider"] for r in rows] == ["ours", "ours_fp8", "reference"] and all(float(r["ms"]) > 0 for r in rows)
    assert all("; agree: reward" in r["note"] for r in rows[:2])  # each of ours agreed with the reference loop


def test_rl_iteration_agreement_check_catches_a_mismatch():
    from benchmarks.rl_iteration import check_agreement

    ok, text = check_agreement({"reward": 0.501, "loss": 0.2}, {"reward": 0.5, "loss": 0.2001})
    assert ok and "outside" not in text
    ok, text = check_agreement({"reward": 0.55, "loss": 0.2}, {"reward": 0.5, "loss": 0.2})
    assert not ok and "reward 0.55 vs 0.5 (outside tolerance)" in text
    assert not check_agreement({"reward": 0.5, "loss": float("nan")}, {"reward": 0.5, "loss": 0.2})[0]


def test_loader_benchmark_runs(tmp_path):
    from benchmarks import loaders

    res = loaders.main(["--smoke", "--work", str(tmp_path / "w"), "--out", str(tmp_path / "out")])
    rows = list(csv.DictReader(open(tmp_path / "out" / "loaders.csv")))
    assert {r["loader"] for r in rows} == set(res) and "torch" in res and all(v > 0 for v in res.values())


def test_memory_plan_and_the_second_gpu_script_run(tmp_path):
    """benchmarks.memory_plan and gpu_memory.sh --cpu-smoke: the code paths a GPU session would run (no memory
    numbers on the CPU, the weights counted instead)."""
    import os
    import subprocess
    import sys

    from benchmarks import memory_plan

    got = memory_plan.main(["--smoke", "--out", str(tmp_path / "mp")])
    assert got[2]["weights"] > got[1]["weights"] > 0
    rows = list(csv.DictReader(open(tmp_path / "mp" / "memory_plan.csv")))
    assert [(r["quantity"], r["blocks"]) for r in rows if r["kind"] == "fit"] == [
        ("weights", "60"), ("rollout", "60"), ("update", "60")]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run(["bash", "benchmarks/gpu_memory.sh", str(tmp_path / "gm"), "--cpu-smoke"], capture_output=True,
                         text=True, env={**env, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}, timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert sorted(p.name for p in (tmp_path / "gm").iterdir()) == [
        "compass_scoring.csv", "cuda_tests.log", "memory.log", "memory_plan.csv"]


def test_compass_edits_scores_every_candidate(tmp_path, capsys):
    """benchmarks.compass_edits on a random tiny COMPASS and two held-out patches: one row per candidate, the
    fidelity edits' LR consistency below the ground truth's (they are not the input's)."""
    import csv

    import torch

    from benchmarks import compass_edits
    from oars_fast.data.images import save_image
    from oars_fast.rewards.compass import CompassModel

    run = tmp_path / "run"
    CompassModel.tiny("qwen3vl").save_pretrained(run / "compass" / "model")
    g = torch.Generator().manual_seed(0)
    for i in range(2):
        hr = torch.nn.functional.avg_pool2d(torch.rand(1, 3, 64, 64, generator=g), 3, 1, 1)[0]
        save_image(hr, run / "heldout" / "hr" / f"p{i}.png")
        save_image(torch.nn.functional.avg_pool2d(hr[None], 4)[0], run / "heldout" / "lr" / f"p{i}.png")
    compass_edits.main(["--run", str(run), "--out", str(tmp_path)])
    rows = {r["candidate"]: r for r in csv.DictReader(open(tmp_path / "compass_edits.csv"))}
    assert list(rows) == ["gt", "bicubic", *compass_edits.QUALITY_EDITS, *compass_edits.EDITS]
    assert all(r["n"] == "2" and 0 <= float(r["f_below_gt"]) <= 1 for r in rows.values())
    for edit in compass_edits.EDITS:
        assert float(rows[edit]["lr_consistency"]) < float(rows["gt"]["lr_consistency"]), edit
    assert "f<gt" in capsys.readouterr().out
