"""`oars-fast annotate` on a known-severity ladder: demo photos degraded at increasing, known severities
stand in for SR methods; the calibrated Q_SR must order the ladder, fidelity must fall with severity,
trimming drops exactly its fraction, and a run killed midway re-scores nothing already cached."""
import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.stats import spearmanr

from oars_fast.annotation import n_trimmed
from oars_fast.cli import main
from oars_fast.data.images import save_image

SEVERITIES = [0.0, 0.6, 1.2, 1.8, 2.4, 3.0]  # blur sigma (px at HR), plus noise growing with it


def _degrade(hr: torch.Tensor, sev: float, g: torch.Generator) -> torch.Tensor:
    if sev == 0:
        return hr
    r = int(3 * sev) | 1
    ax = torch.arange(-r, r + 1, dtype=torch.float32)
    k = torch.exp(-ax**2 / (2 * sev**2))
    k = (k / k.sum())
    x = F.pad(hr[None], (r, r, r, r), mode="reflect")
    x = F.conv2d(x, k.view(1, 1, 1, -1).expand(3, 1, 1, -1), groups=3)
    x = F.conv2d(x, k.view(1, 1, -1, 1).expand(3, 1, -1, 1), groups=3)[0]
    return (x + torch.randn(x.shape, generator=g) * sev * 0.01).clamp(0, 1)


@pytest.fixture(scope="module")
def ladder(tmp_path_factory):
    from oars_fast.data.demo import demo_photos

    root = tmp_path_factory.mktemp("ladder")
    g = torch.Generator().manual_seed(0)
    for name, img in list(sorted(demo_photos().items()))[:6]:
        h, w = img.shape[:2]
        hr = torch.from_numpy(np.ascontiguousarray(img[(h - 128) // 2:(h + 128) // 2, (w - 128) // 2:(w + 128) // 2]))
        hr = hr.permute(2, 0, 1).float() / 255
        save_image(hr, root / "gt" / f"{name}.png")
        lr = F.interpolate(hr[None], scale_factor=0.25, mode="bicubic", antialias=True)[0].clamp(0, 1)
        save_image(lr, root / "lr" / f"{name}.png")
        for i, sev in enumerate(SEVERITIES):
            save_image(_degrade(hr, sev, g), root / "sr" / f"sev{i}" / f"{name}.png")
    return root


def _args(ladder, out):
    return ["annotate", f"annotate.lr_dir={ladder / 'lr'}", f"annotate.sr_root={ladder / 'sr'}",
            f"annotate.gt_dir={ladder / 'gt'}", "annotate.fidelity=ssim", f"annotate.output={out}",
            f"run.output_dir={out}", "run.device=cpu"]


def test_calibrated_quality_orders_the_ladder_and_fidelity_falls(ladder, tmp_path, capsys):
    assert main(_args(ladder, tmp_path)) == 0
    rows = [json.loads(x) for x in (tmp_path / "manifest.jsonl").read_text().splitlines()]
    trimmed = (tmp_path / "trimmed.jsonl").read_text().splitlines()
    total = 6 * len(SEVERITIES)
    assert len(rows) + len(trimmed) == total and len(trimmed) == n_trimmed(total, 0.05)  # exactly the fraction
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["fidelity_normalisation"]["percentiles"] == [1.0, 99.0]
    everything = rows + [json.loads(x) for x in trimmed]
    rhos_q, rhos_f = [], []
    for group in sorted({r["group"] for r in everything}):
        g = sorted((r for r in everything if r["group"] == group), key=lambda r: r["method"])
        sev = [int(r["method"][3:]) for r in g]
        rhos_q.append(spearmanr([-s for s in sev], [r["q_sr"] for r in g])[0])
        rhos_f.append(spearmanr([-s for s in sev], [r["f"] for r in g])[0])
        assert all(0 <= r["f"] <= 1 and 1 <= r["q_sr"] <= 5 and 1 <= r["q_lr"] <= 5 for r in g)
        assert len({r["q_lr"] for r in g}) == 1  # one LR per group
    print(f"ladder Spearman of calibrated Q_SR: mean {np.mean(rhos_q):.3f} min {np.min(rhos_q):.3f}; "
          f"fidelity: mean {np.mean(rhos_f):.3f}")
    assert np.mean(rhos_q) >= 0.9 and np.min(rhos_q) >= 0.8
    assert np.mean(rhos_f) >= 0.9
    # a second run scores nothing again
    assert main(_args(ladder, tmp_path)) == 0
    assert json.loads((tmp_path / "summary.json").read_text())["new_scorer_outputs"] == 0


def test_a_run_killed_midway_rescores_nothing_already_cached(ladder, tmp_path):
    env = {**os.environ, "OARS_FAULT": "annotate:4"}  # SIGKILL at the start of group 4 of 6
    res = subprocess.run([sys.executable, "-m", "oars_fast.cli", *_args(ladder, tmp_path / "a")], env=env,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == -signal.SIGKILL, res.stderr[-2000:]
    assert not (tmp_path / "a" / "manifest.jsonl").exists()
    cached = len((tmp_path / "a" / "scores.jsonl").read_text().splitlines())
    assert main(_args(ladder, tmp_path / "a")) == 0
    resumed_new = json.loads((tmp_path / "a" / "summary.json").read_text())["new_scorer_outputs"]
    assert main(_args(ladder, tmp_path / "b")) == 0
    full = json.loads((tmp_path / "b" / "summary.json").read_text())["new_scorer_outputs"]
    assert cached > 0 and resumed_new == full - cached  # the resumed run computed only what was missing
    a = (tmp_path / "a" / "manifest.jsonl").read_text()
    assert a == (tmp_path / "b" / "manifest.jsonl").read_text().replace(str(tmp_path / "b"), str(tmp_path / "a"))


def test_psnr_fidelity_sees_colour_and_brightness_shifts_that_ssim_misses(ladder, tmp_path):
    """annotate.fidelity=psnr (the colour-aware classical stand-in): sharp copies of the ground truth that are
    recoloured or brightened get a lower F than a mildly blurred one; luminance SSIM ranks the recoloured one above
    it (0.99 vs 0.83 after the normalisation)."""
    from oars_fast.data.images import load_image
    from oars_fast.stages.pipeline import unfaithful_edit

    sr_root = tmp_path / "sr"
    for gt_path in sorted((ladder / "gt").iterdir()):
        hr = load_image(gt_path)[None]
        save_image(_degrade(hr[0], 0.6, torch.Generator().manual_seed(0)), sr_root / "blur" / gt_path.name)
        for method in ("color0.2", "bright0.1"):
            save_image(unfaithful_edit(hr, method)[0], sr_root / method / gt_path.name)
    means = {}
    for fid in ("ssim", "psnr"):
        out = tmp_path / fid
        args = [a for a in _args(ladder, out) if not a.startswith(("annotate.sr_root", "annotate.fidelity"))]
        assert main([*args, f"annotate.sr_root={sr_root}", f"annotate.fidelity={fid}",
                     "annotate.trim_fraction=0"]) == 0
        rows = [json.loads(x) for x in (out / "manifest.jsonl").read_text().splitlines()]
        means[fid] = {m: np.mean([r["f"] for r in rows if r["method"] == m]) for m in ("blur", "color0.2", "bright0.1")}
    assert means["ssim"]["color0.2"] > means["ssim"]["blur"]
    assert means["psnr"]["color0.2"] < means["psnr"]["blur"] and means["psnr"]["bright0.1"] < means["psnr"]["blur"]
