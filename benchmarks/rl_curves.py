"""NFT vs Flow-GRPO at equal sample budgets on the demo setting (tiny model, CPU): held-out reward vs
samples. Needs the demo's base (`make demo` first). Writes benchmarks/results/rl_curves.csv.

    python -m benchmarks.rl_curves [--iterations 30] [--eval-every 5] [--out DIR]
"""
from __future__ import annotations

import argparse
import csv
from pathlib import Path

from oars_fast.config import RLJob, load_config
from oars_fast.stages.rl import RLStage

from .harness import RESULTS, device_name, git_sha

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo" / "rl_fr.yaml"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iterations", type=int, default=30)
    ap.add_argument("--eval-every", type=int, default=5)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    rows = []
    for objective in ("nft", "flow_grpo"):
        job = load_config(RLJob, CONFIG, [f"rl.objective={objective}", f"rl.iterations={args.iterations}",
                                          f"rl.eval_every={args.eval_every}", "rl.sft_model=null",
                                          "rl.probe_every=0", "rl.save_every=0", "lora.kernel=peft",
                                          "rl.grpo_clip=0.2", "run.output_dir=runs/rl_curves",
                                          f"run.name={objective}"])
        if not Path(job.model.pretrained).exists():
            raise SystemExit(f"{job.model.pretrained} is missing: run `make demo` first")
        stage = RLStage(job).setup()
        curve = [(0, 0, stage.eval_before)]
        stage.train()
        curve += [(i + 1, h["samples"], h["eval_reward"]) for i, h in enumerate(stage.history) if "eval_reward" in h]
        stage.cleanup()
        for it, samples, reward in curve:
            rows.append({"device": device_name(), "git_sha": git_sha(), "objective": objective, "iteration": it,
                         "samples": samples, "heldout_reward": f"{reward:.4f}", "reward": "ssim (stand-in)"})
            print(f"{objective:10s} iteration {it:3d} samples {samples:5d} held-out reward {reward:.4f}")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "rl_curves.csv"
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    print(f"written: {path}")


if __name__ == "__main__":
    main()
