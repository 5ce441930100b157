"""NFT vs Flow-GRPO at equal sample budgets on the demo setting (tiny model, CPU): held-out reward vs samples,
over several seeds (mean and spread). Needs a finished demo run (`make demo`: its base and SFT model). Writes
benchmarks/results/rl_curves.csv (one row per objective x seed x evaluation) and prints the mean +- std table.

    python -m benchmarks.rl_curves [--run runs/demo] [--iterations 30] [--eval-every 5] [--seeds 0 1 2] [--out DIR]
"""
from __future__ import annotations

import argparse
import statistics
from collections import defaultdict
from pathlib import Path

from oars_fast.config import RLJob, load_config
from oars_fast.stages.rl import RLStage

from .harness import RESULTS, device_name, git_sha, write_table

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo" / "rl_fr.yaml"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, default=Path("runs/demo"), help="a finished demo run (base/model)")
    ap.add_argument("--iterations", type=int, default=30)
    ap.add_argument("--eval-every", type=int, default=5)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    base = args.run / "base" / "model"
    if not base.exists():
        raise SystemExit(f"{base} is missing: run `make demo` first (or pass --run)")
    rows = []
    for objective in ("nft", "flow_grpo"):
        for seed in args.seeds:
            job = load_config(RLJob, CONFIG, [
                f"rl.objective={objective}", f"rl.iterations={args.iterations}", f"rl.eval_every={args.eval_every}",
                f"run.seed={seed}", f"model.pretrained={base}", "rl.sft_model=null", "rl.probe_every=0",
                "rl.save_every=0", "run.log_interval=30", f"run.output_dir={args.run / 'rl_curves'}",
                f"run.name={objective}_s{seed}"])
            stage = RLStage(job).setup()
            curve = [(0, 0, stage.eval_before)]
            stage.train()
            curve += [(i + 1, h["samples"], h["eval_reward"]) for i, h in enumerate(stage.history)
                      if "eval_reward" in h]
            stage.cleanup()
            for it, samples, reward in curve:
                rows.append({"device": device_name(), "git_sha": git_sha(), "objective": objective, "seed": seed,
                             "iteration": it, "samples": samples, "heldout_reward": f"{reward:.4f}",
                             "reward": "ssim (stand-in for DISTS)", "kl_weight": job.rl.kl_weight})
    path = write_table(rows, args.out / "rl_curves.csv")
    curves = defaultdict(list)
    for r in rows:
        curves[(r["objective"], r["iteration"], r["samples"])].append(float(r["heldout_reward"]))
    print(f"held-out reward, mean +- std over seeds {args.seeds}")
    for (objective, it, samples), v in curves.items():
        sd = statistics.stdev(v) if len(v) > 1 else 0.0
        print(f"{objective:10s} iteration {it:3d} samples {samples:5d}  {statistics.mean(v):.4f} +- {sd:.4f}")
    print(f"written: {path}")


if __name__ == "__main__":
    main()
