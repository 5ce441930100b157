"""`oars-fast annotate`: the COMPASS three-stage annotation, from SR outputs to a training manifest.

Input layout: ``annotate.lr_dir/<stem>.<ext>`` (one LR input per group), ``annotate.sr_root/<method>/<stem>.<ext>``
(the outputs of M SR methods for each LR; a group needs at least two), optional ``annotate.gt_dir/<stem>.<ext>``
(ground truth: the synthetic subset). Per group:

* fidelity (synthetic groups only): ``F = 1 - DISTS(SR, GT)`` (classical stand-ins where the DISTS weights are
  absent: ``annotate.fidelity=ssim``, SSIM on luminance, blind to colour and brightness shifts; ``psnr``,
  PSNR over RGB capped at 60 dB, which sees them), then normalised to [0, 1] over the synthetic subset:
  ``F = clip((F_raw - lo) / (hi - lo), 0, 1)`` with lo, hi the ``fidelity_percentiles`` (1st and 99th) of
  F_raw over every synthetic pair (written to ``summary.json``); real LQ groups have no F;
* stage 1, global anchors: a :class:`~oars_fast.annotation.GlobalScorer` scores the LR (bicubic-upsampled to
  the SR size, as it is seen beside its outputs) and every SR on [1, 5]
  (``classical``: the documented no-reference proxy; ``mllm``: Q-Insight-style prompting of ``annotate.mllm``);
* stage 2, intra-group ranking: a :class:`~oars_fast.annotation.PairwiseComparator` judges every pair of SR
  outputs given the LR, aggregated to r in [0, 1] by win rate (ties 0.5; ``ranking=bradley_terry`` as an option);
* stage 3, calibration: per group, least squares ``Q_anchor ~ alpha r + beta``; ``Q_SR = clip(alpha r + beta, 1, 5)``;
* trimming: the ``trim_fraction`` of pairs where stage 1 and stage 3 disagree most (``|Q_anchor - Q_SR|``) is
  dropped and listed in ``trimmed.jsonl``.

Output in ``annotate.output`` (default ``<run_dir>``): ``manifest.jsonl`` (one row per kept (LR, SR) pair: paths,
group, method, ``f`` (null for real LQ), ``q_lr``, ``q_sr``, ``q_anchor``, ``r``, ``alpha``, ``beta``),
``trimmed.jsonl``, ``summary.json``. Every scorer output goes through a :class:`~oars_fast.annotation.ScoreCache`
(``scores.jsonl``, keyed by a hash of the scorer and its inputs), so a crash loses nothing and a restart scores
only what is missing; the manifest is written atomically at the end.

    oars-fast annotate annotate.lr_dir=LR annotate.sr_root=SR annotate.gt_dir=GT   # classical scorers, CPU
"""
from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..annotation import (
    ClassicalPairwiseComparator,
    ClassicalQualityScorer,
    MLLMGlobalScorer,
    MLLMPairwiseComparator,
    ScoreCache,
    bradley_terry,
    cached_compare,
    cached_scores,
    calibrate,
    preference_matrix,
    trim,
    win_rate,
)
from ..config import AnnotateJob, save_config
from ..data.images import load_image, scan_images
from ..errors import MissingFileError, UserError
from ..evaluation.metrics import psnr
from ..rewards.classical import ssim
from ..rewards.dists import DISTS
from ..runtime.device import select_device
from ..runtime.faults import maybe_fail

log = logging.getLogger(__name__)
PSNR_CAP = 60.0  # annotate.fidelity=psnr: dB; identical 8-bit images give +inf


def find_groups(lr_dir: str | Path, sr_root: str | Path, gt_dir: str | Path | None) -> list[dict]:
    """[{"stem", "lr", "gt" (or None), "sr": {method: path}}] for every LR with at least two SR outputs."""
    lr_files = {p.stem: p for p in scan_images(lr_dir)}
    root = Path(sr_root)
    if not root.is_dir():
        raise MissingFileError(f"annotate.sr_root={root} does not exist (expected <sr_root>/<method>/<stem>.<ext>)")
    methods = {d.name: {p.stem: p for p in scan_images(d)} for d in sorted(root.iterdir()) if d.is_dir()}
    gts = {p.stem: p for p in scan_images(gt_dir)} if gt_dir else {}
    groups = []
    for stem in sorted(lr_files):
        sr = {m: files[stem] for m, files in methods.items() if stem in files}
        if len(sr) >= 2:
            groups.append({"stem": stem, "lr": lr_files[stem], "gt": gts.get(stem), "sr": sr})
    if not groups:
        raise UserError(f"no LR in {lr_dir} has outputs of two or more methods under {root}/<method>/ (same stem)")
    return groups


class Annotator:
    """The scorers of a job, each through the score cache."""

    def __init__(self, job: AnnotateJob, cache: ScoreCache, device: torch.device):
        cfg = self.cfg = job.annotate
        self.cache, self.device = cache, device
        if cfg.global_scorer == "mllm" or cfg.comparator == "mllm":
            if not cfg.mllm:
                raise UserError("annotate.global_scorer/comparator=mllm needs annotate.mllm=<model folder or hub id>")
            from ..annotation import TransformersChat  # heavy (transformers VL model): only for MLLM scorers

            chat = TransformersChat.from_pretrained(cfg.mllm, device=device)
        self.scorer = MLLMGlobalScorer(chat) if cfg.global_scorer == "mllm" else ClassicalQualityScorer()
        self.comparator = MLLMPairwiseComparator(chat) if cfg.comparator == "mllm" else ClassicalPairwiseComparator()
        if cfg.fidelity == "dists" and not (cfg.dists_vgg and cfg.dists_weights):
            raise MissingFileError("annotate.fidelity=dists needs annotate.dists_vgg and annotate.dists_weights "
                                   "(or annotate.fidelity=ssim / psnr, the classical stand-ins)")
        self.dists = DISTS(cfg.dists_vgg, cfg.dists_weights).to(device) if cfg.fidelity == "dists" else None
        self.fidelity_name = cfg.fidelity

    def fidelity_raw(self, sr: torch.Tensor, gt: torch.Tensor) -> float:
        """F_raw = 1 - DISTS(SR, GT) (or SSIM, or PSNR-RGB in dB capped at 60), before the normalisation over
        the synthetic subset."""
        def compute():
            with torch.no_grad():
                a, b = sr[None].to(self.device), gt[None].to(self.device)
                if self.dists is not None:
                    return float(1 - self.dists(a, b)[0])
                if self.fidelity_name == "psnr":
                    return min(float(psnr(a.cpu(), b.cpu())[0]), PSNR_CAP)  # identical 8-bit images: +inf -> cap
                return float(ssim(a, b)[0])

        return self.cache.get_or_compute((f"fidelity_{self.fidelity_name}", sr, gt), compute)

    def group(self, g: dict) -> dict:
        """Stage 1 and 2 of one group (everything cached): anchors of LR and SRs, r, raw fidelity."""
        lr = load_image(g["lr"])
        methods = sorted(g["sr"])
        srs = [load_image(g["sr"][m]) for m in methods]
        gt = load_image(g["gt"]) if g["gt"] else None
        # the LR is judged as it is seen next to its outputs: bicubic-upsampled to the SR size
        lr_view = F.interpolate(lr[None], size=srs[0].shape[-2:], mode="bicubic", align_corners=False)[0].clamp(0, 1)
        anchors = cached_scores(self.cache, self.scorer, [lr_view, *srs])
        prefs = preference_matrix(len(srs), lambda i, j: cached_compare(self.cache, self.comparator, lr, srs[i],
                                                                        srs[j]), both_orders=self.cfg.both_orders)
        r = win_rate(prefs) if self.cfg.ranking == "win_rate" else bradley_terry(prefs)
        f_raw = [self.fidelity_raw(s, gt) for s in srs] if gt is not None else [None] * len(srs)
        return {"methods": methods, "q_lr": anchors[0], "q_anchor": anchors[1:], "r": r.tolist(), "f_raw": f_raw}


def run(job: AnnotateJob) -> int:
    cfg = job.annotate
    if not cfg.lr_dir or not cfg.sr_root:
        raise UserError("oars-fast annotate: set annotate.lr_dir=<LR folder> and annotate.sr_root=<folder of method "
                        "folders>")
    out = Path(cfg.output) if cfg.output else job.run.run_dir
    out.mkdir(parents=True, exist_ok=True)
    save_config(job, out / "config.yaml")
    groups = find_groups(cfg.lr_dir, cfg.sr_root, cfg.gt_dir)
    device = select_device(job.run.device)
    t0 = time.perf_counter()
    with ScoreCache(out / "scores.jsonl") as cache:
        before = len(cache)
        ann = Annotator(job, cache, device)
        scored = []
        for i, g in enumerate(tqdm(groups, desc="annotate", disable=None)):
            maybe_fail("annotate", i + 1)
            scored.append(ann.group(g))
        new_calls = len(cache) - before
    rows, summary = _manifest_rows(groups, scored, cfg)
    keep = trim(np.array([abs(r["q_anchor"] - r["q_sr"]) for r in rows]), cfg.trim_fraction)
    _write_jsonl(out / "manifest.jsonl", [r for r, k in zip(rows, keep) if k])
    _write_jsonl(out / "trimmed.jsonl", [{**r, "disagreement": abs(r["q_anchor"] - r["q_sr"])}
                                         for r, k in zip(rows, keep) if not k])
    summary.update(groups=len(groups), pairs=len(rows), kept=int(keep.sum()), trimmed=int((~keep).sum()),
                   scorer=ann.scorer.name, comparator=ann.comparator.name, fidelity=ann.fidelity_name,
                   new_scorer_outputs=new_calls, seconds=round(time.perf_counter() - t0, 2))
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(f"annotate: {len(groups)} groups, {len(rows)} pairs, {int(keep.sum())} kept, {int((~keep).sum())} trimmed; "
          f"{new_calls} new scorer outputs (the rest from the cache); manifest in {out / 'manifest.jsonl'}")
    return 0


def _manifest_rows(groups: list[dict], scored: list[dict], cfg) -> tuple[list[dict], dict]:
    """Stage 3 (calibration) and the fidelity normalisation over the synthetic subset."""
    raw = [f for s in scored for f in s["f_raw"] if f is not None]
    summary: dict = {}
    lo = hi = None
    if raw:
        lo, hi = (float(np.percentile(raw, p)) for p in cfg.fidelity_percentiles)
        summary["fidelity_normalisation"] = {"rule": "F = clip((F_raw - lo) / (hi - lo), 0, 1)", "lo": lo, "hi": hi,
                                             "percentiles": list(cfg.fidelity_percentiles), "synthetic_pairs": len(raw)}
    rows = []
    for g, s in zip(groups, scored):
        alpha, beta, q_sr = calibrate(s["r"], s["q_anchor"])
        for k, m in enumerate(s["methods"]):
            f = None
            if s["f_raw"][k] is not None:
                f = float(np.clip((s["f_raw"][k] - lo) / max(hi - lo, 1e-12), 0.0, 1.0))
            rows.append({"group": g["stem"], "method": m, "lr": str(g["lr"]), "sr": str(g["sr"][m]),
                         "gt": str(g["gt"]) if g["gt"] else None, "f": f, "q_lr": float(s["q_lr"]),
                         "q_sr": float(q_sr[k]), "q_anchor": float(s["q_anchor"][k]), "r": float(s["r"][k]),
                         "alpha": alpha, "beta": beta})
    return rows, summary


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_manifest(path: str | Path) -> list[dict]:
    """The rows of an annotation manifest."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"annotation manifest {path} does not exist (write one with `oars-fast annotate`)")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
