"""The paper's reward ablation on the demo: NR-RL on the tiny COMPASS with the full reward R and with dq_only
(Q_SR - Q_LR, no fidelity term), the same seeds, the same start (the FR-RL LoRA), the same number of iterations.
Then every resulting model is evaluated on the held-out patches with the *full* COMPASS (R, F, Q_SR), fidelity to
the LR (LR consistency: PSNR of the 4x-downsampled SR against the LR) and PSNR-Y against the HR.

The paper reports that without the fidelity term the policy hacks the reward: quality rises while fidelity to
the input falls. The variant ``null`` is a control: the full COMPASS score permuted at random within each group
(the same reward statistics, no signal about which candidate is better); a gain of ``full`` is a learned one only
where it exceeds the null's. Needs a finished demo run (`make demo`: base, sft, rl_fr, compass, heldout). The
NR-RL settings are those of ``configs/demo/rl_nr.yaml``.

    python -m benchmarks.compass_variants [--run runs/demo] [--iterations 100] [--seeds 0 1 2 3] \
        [--variants full dq_only null]

Writes benchmarks/results/compass_variants.csv (one row per model) and prints mean +- std per variant, and the
change against the start (FR-RL).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
from pathlib import Path

import torch

from oars_fast.config import EvalJob, RLJob, load_config
from oars_fast.config.schema import shipped_config
from oars_fast.stages import eval as eval_stage
from oars_fast.stages import rl as rl_stage

from .harness import RESULTS, device_name, git_sha, write_table

METRICS = ("compass_reward", "compass_f", "compass_q_sr", "lr_consistency", "psnr_y")
NULL_COMPASS = "OARS_NULL_COMPASS"  # the COMPASS folder of the null control's reward (set by main)


class ShuffledReward:
    """The null control: the wrapped reward's scores permuted at random within each group (seeded per call)."""

    name = "compass_shuffled"

    def __init__(self, inner):
        self.inner, self.calls = inner, 0

    def __call__(self, lr, sr, gt, group_index):
        scores, parts = self.inner(lr, sr, gt, group_index)
        g = torch.Generator().manual_seed(1000 + self.calls)
        self.calls += 1
        gi = torch.as_tensor(group_index).cpu()
        out = scores.clone()
        for v in torch.unique(gi):
            rows = (gi == v).nonzero().flatten()
            out[rows] = scores[rows[torch.randperm(len(rows), generator=g)]]
        return out, parts


def shuffled_compass(device):
    """reward.custom=benchmarks.compass_variants:shuffled_compass (the null variant)."""
    from oars_fast.rewards.compass import CompassReward

    return ShuffledReward(CompassReward.from_pretrained(os.environ[NULL_COMPASS], device, variant="full"))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, default=Path("runs/demo"))
    ap.add_argument("--iterations", type=int, default=100)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    ap.add_argument("--variants", nargs="+", default=["full", "dq_only", "null"],
                    choices=["full", "dq_only", "no_fidelity", "null"])
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    run = args.run.resolve()
    need = [run / p for p in ("base/model", "sft/model", "rl_fr/lora", "rl_fr/merged", "compass/model",
                              "heldout/lr", "heldout/hr")]
    missing = [str(p) for p in need if not p.exists()]
    if missing:
        raise SystemExit(f"missing {missing}: run `make demo` first (or pass --run)")
    work = run / "compass_variants"
    os.environ[NULL_COMPASS] = str(run / "compass" / "model")
    models = [{"start_FR-RL": str(run / "rl_fr" / "merged")}]
    for variant in args.variants:
        for seed in args.seeds:
            name = f"{variant}_s{seed}"
            job = load_config(RLJob, shipped_config("demo/rl_nr.yaml"), [
                f"run.output_dir={work}", f"run.name={name}", f"run.seed={seed}", "run.log_interval=30",
                f"model.pretrained={run / 'base' / 'model'}", f"rl.sft_model={run / 'sft' / 'model'}",
                f"rl.init_lora={run / 'rl_fr' / 'lora'}", f"rl.iterations={args.iterations}", "rl.probe_every=0",
                "rl.save_every=0", f"reward.compass={run / 'compass' / 'model'}",
                *([f"reward.compass_variant={variant}"] if variant != "null" else
                  ["reward.name=custom", "reward.custom=benchmarks.compass_variants:shuffled_compass"])])
            if not (work / name / "merged").exists():
                rc = rl_stage.run(job)
                if rc:
                    raise SystemExit(f"NR-RL {name} ended with exit code {rc}")
            models.append({name: str(work / name / "merged")})
    job = load_config(EvalJob, shipped_config("demo/eval.yaml"), [
        f"run.output_dir={run}", "run.name=compass_variants", f"eval.lr_dir={run / 'heldout' / 'lr'}",
        f"eval.hr_dir={run / 'heldout' / 'hr'}", f"eval.compass={run / 'compass' / 'model'}",
        "eval.models=" + json.dumps(models)])
    if eval_stage.run(job):
        raise SystemExit("eval failed")
    table = json.loads((run / "compass_variants" / "eval" / "metrics.json").read_text())["models"]
    rows = [{"device": device_name(), "git_sha": git_sha(), "model": name, "iterations": args.iterations,
             **{m: round(table[name]["mean"][m], 4) for m in METRICS}} for name in table]
    path = write_table(rows, args.out / "compass_variants.csv")
    start = rows[0]
    print(f"held-out ({table[start['model']]['n_images']} patches), {args.iterations} NR-RL iterations, "
          f"mean +- std over seeds {args.seeds}; change against the start (FR-RL) in brackets")
    print(f"{'variant':10s} " + " ".join(f"{m:>24s}" for m in METRICS))
    print(f"{'start':10s} " + " ".join(f"{start[m]:24.4f}" for m in METRICS))
    for variant in args.variants:
        mine = [r for r in rows if r["model"].startswith(variant + "_s")]
        cells = []
        for m in METRICS:
            v = [r[m] for r in mine]
            sd = statistics.stdev(v) if len(v) > 1 else 0.0
            cells.append(f"{statistics.mean(v):.4f}+-{sd:.4f} ({statistics.mean(v) - start[m]:+.4f})")
        print(f"{variant:10s} " + " ".join(f"{c:>24s}" for c in cells))
    print(f"written: {path}")


if __name__ == "__main__":
    main()
