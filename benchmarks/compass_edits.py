"""Does a trained COMPASS see fidelity? Its F, Q_SR and R on known edits of the held-out ground truth.

For every held-out patch of a finished demo run (``heldout/{lr,hr}``) the candidates are the ground truth itself,
bicubic, the ground truth blurred or noisy (quality edits) and the ground truth shifted by 2 px, recoloured or
brightened (fidelity edits: as sharp as the ground truth, not the input's), plus the SR outputs of the run's eval
models where present. Each group is scored with the run's COMPASS (``compass/model``); the table gives the mean
F, Q_SR and R (``R = F*Q_LR + F**(Q_LR/7)*(Q_SR - Q_LR)``), the LR consistency (PSNR of the 4x-downsampled
candidate against the LR) and how often F ranks the candidate below the ground truth in its group.

A COMPASS whose F measures fidelity puts the fidelity edits below the ground truth in most groups; one that
does not rewards them like the ground truth, and NR-RL on it can drift away from the input (the README's COMPASS
ablation).

    python -m benchmarks.compass_edits [--run runs/demo] [--compass FOLDER] [--out benchmarks/results]
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F

from oars_fast.data.images import load_image, scan_images
from oars_fast.evaluation.metrics import lr_consistency
from oars_fast.kernels import compass_reward_ref
from oars_fast.rewards.compass import CompassModel
from oars_fast.stages.pipeline import ground_truth_edit

from .harness import RESULTS, device_name, git_sha, write_table

QUALITY_EDITS = ("blur1.0", "noise0.03")
EDITS = ("shift2", "color0.2", "bright0.1")
EVAL_MODELS = ("SFT", "FR-RL", "OARS")


def candidates(lr: torch.Tensor, hr: torch.Tensor) -> dict[str, torch.Tensor]:
    """The named candidates of one held-out patch, each (3, H, W) in [0, 1]."""
    out = {"gt": hr,
           "bicubic": F.interpolate(lr[None], size=hr.shape[-2:], mode="bicubic", align_corners=False)[0].clamp(0, 1)}
    for edit in (*QUALITY_EDITS, *EDITS):  # made as the demo's annotation set makes them
        out[edit] = ground_truth_edit(hr[None], edit)[0]
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, default=Path("runs/demo"))
    ap.add_argument("--compass", type=Path, default=None, help="a COMPASS folder (default: <run>/compass/model)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    model_dir = args.compass or args.run / "compass" / "model"
    if not model_dir.is_dir():
        raise SystemExit(f"compass_edits: no COMPASS in {model_dir} (run `make demo` first)")
    model = CompassModel.from_pretrained(model_dir).eval()
    lrs = {p.stem: p for p in scan_images(args.run / "heldout" / "lr")}
    hrs = {p.stem: p for p in scan_images(args.run / "heldout" / "hr")}
    stems = sorted(set(lrs) & set(hrs))
    if not stems:
        raise SystemExit(f"compass_edits: no held-out LR/HR pairs in {args.run / 'heldout'}")
    outputs = {m: {p.stem: p for p in scan_images(args.run / "eval" / m)} for m in EVAL_MODELS
               if (args.run / "eval" / m).is_dir()}
    acc: dict[str, dict[str, list[float]]] = {}
    for stem in stems:
        lr, hr = load_image(lrs[stem]), load_image(hrs[stem])
        cands = candidates(lr, hr)
        for m, files in outputs.items():
            if stem in files:
                cands[m] = load_image(files[stem])
        names = list(cands)
        sr = torch.stack([cands[n] for n in names])
        with torch.no_grad():
            f, q_lr, q_sr = model.score(lr[None], sr, torch.zeros(len(names), dtype=torch.long))
        r = compass_reward_ref(f, q_lr, q_sr, 7.0)
        cons = lr_consistency(sr, lr[None].expand(len(names), -1, -1, -1))
        for i, n in enumerate(names):
            a = acc.setdefault(n, {k: [] for k in ("f", "q_sr", "r", "lr_consistency", "f_below_gt")})
            a["f"].append(float(f[i]))
            a["q_sr"].append(float(q_sr[i]))
            a["r"].append(float(r[i]))
            a["lr_consistency"].append(min(float(cons[i]), 60.0))
            a["f_below_gt"].append(float(f[i] < f[0]))
    rows = []
    print(f"COMPASS of {args.run} on {len(stems)} held-out patches (means; f<gt: share of groups where F ranks the "
          f"candidate below the ground truth)")
    print(f"{'candidate':10s} {'F':>7s} {'Q_SR':>7s} {'R':>7s} {'LR-PSNR':>8s} {'f<gt':>6s}")
    for n, a in acc.items():
        mean = {k: sum(v) / len(v) for k, v in a.items()}
        print(f"{n:10s} {mean['f']:7.4f} {mean['q_sr']:7.4f} {mean['r']:7.4f} {mean['lr_consistency']:8.2f} "
              f"{mean['f_below_gt'] if n != 'gt' else float('nan'):6.2f}")
        rows.append({"device": device_name(), "git_sha": git_sha(), "compass": str(model_dir), "candidate": n,
                     "n": len(a["f"]), **{k: f"{v:.4f}" for k, v in mean.items()}})
    path = write_table(rows, args.out / "compass_edits.csv")
    print(f"rows -> {path}")


if __name__ == "__main__":
    main()
