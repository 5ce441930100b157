"""`oars-fast eval-pairs`: pairwise accuracy of a quality scorer on groups of SR outputs with preferences
(SRIQA-Bench style: every pair i < j of a group; the prediction is a tie when |s_i - s_j| <= delta, else
the sign; correct when it equals the label 1, 0 or 0.5; :func:`oars_fast.evaluation.pairwise_report`).

Folder layout (the user brings the files; nothing is downloaded)::

    <pairs.root>/<group>/lr.<ext>            the LR input of the group
    <pairs.root>/<group>/gt.<ext>            optional reference (full-reference scorers need it)
    <pairs.root>/<group>/sr/<name>.<ext>     the group's K SR outputs
    <pairs.root>/<group>/prefs.json          {"names": [K names], "prefs": K x K matrix: prefs[i][j] = 1 if i
                                              beats j, 0 if j beats i, 0.5 for a tie}, or
                                             {"ranking": [names, best first]} (strict order, no ties), or
                                             {"scores": {name: human score}} (higher is better; equal = tie)

Scorers (``pairs.scorer``): ``compass`` (the reward R of a COMPASS checkpoint, ``pairs.compass``),
``compass_qsr`` (its Q_SR alone), ``dists`` (1 - DISTS to the reference; weights in ``pairs.dists_*``),
``ssim`` (to the reference), ``classical_nr`` (the annotation's classical no-reference proxy),
``lr_consistency`` (PSNR of the downsampled SR against the LR). Output: ``<run>/pairs.json`` (overall and
per-group accuracy, the 3x3 label x prediction confusion) and a printed summary.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch

from ..annotation import ClassicalQualityScorer
from ..config import EvalPairsJob, save_config
from ..data.images import IMAGE_EXTENSIONS, load_image, scan_images
from ..errors import MissingFileError, UserError
from ..evaluation import LABELS, lr_consistency, pairwise_report
from ..rewards.classical import ssim
from ..rewards.dists import DISTS
from ..runtime.device import select_device

log = logging.getLogger(__name__)


def _image(folder: Path, stem: str) -> Path | None:
    for ext in IMAGE_EXTENSIONS:
        if (folder / f"{stem}{ext}").is_file():
            return folder / f"{stem}{ext}"
    return None


def prefs_matrix(spec: dict, names: list[str], where: Path) -> np.ndarray:
    """The (K, K) preference matrix of a prefs.json in the order of `names`."""
    k = len(names)
    if "prefs" in spec:
        order = [spec["names"].index(n) for n in names]
        p = np.asarray(spec["prefs"], dtype=np.float64)
        if p.shape != (len(spec["names"]),) * 2:
            raise UserError(f"{where}: prefs must be a {len(spec['names'])}x{len(spec['names'])} matrix")
        return p[np.ix_(order, order)]
    if "ranking" in spec:
        rank = {n: i for i, n in enumerate(spec["ranking"])}
        return np.array([[0.5 if i == j else float(rank[a] < rank[b]) for j, b in enumerate(names)]
                         for i, a in enumerate(names)])
    if "scores" in spec:
        s = [float(spec["scores"][n]) for n in names]
        return np.array([[0.5 if s[i] == s[j] else float(s[i] > s[j]) for j in range(k)] for i in range(k)])
    raise UserError(f"{where}: expected 'prefs' (+ 'names'), 'ranking' or 'scores'")


def read_groups(root: str | Path) -> list[dict]:
    """[{"name", "lr", "gt", "sr": {name: path}, "prefs": (K, K)}] of a pairs folder (layout above)."""
    root = Path(root)
    if not root.is_dir():
        raise MissingFileError(f"pairs.root={root} does not exist (layout: <root>/<group>/lr, sr/, prefs.json)")
    groups = []
    for d in sorted(p for p in root.iterdir() if p.is_dir()):
        lr, spec = _image(d, "lr"), d / "prefs.json"
        if lr is None or not spec.is_file() or not (d / "sr").is_dir():
            log.warning("skipping %s: it needs lr.<ext>, sr/ and prefs.json", d)
            continue
        sr = {p.stem: p for p in scan_images(d / "sr")}
        names = sorted(sr)
        groups.append({"name": d.name, "lr": lr, "gt": _image(d, "gt"), "sr": sr, "names": names,
                       "prefs": prefs_matrix(json.loads(spec.read_text()), names, spec)})
    if not groups:
        raise UserError(f"no group folder under {root} has lr.<ext>, sr/ and prefs.json")
    return groups


class Scorer:
    """One score per SR image of a group (higher = better)."""

    def __init__(self, job: EvalPairsJob, device: torch.device):
        cfg = self.cfg = job.pairs
        self.device = device
        self.needs_gt = cfg.scorer in ("dists", "ssim")
        if cfg.scorer in ("compass", "compass_qsr"):
            if not cfg.compass:
                raise UserError(f"pairs.scorer={cfg.scorer} needs pairs.compass=<COMPASS checkpoint folder>")
            from ..rewards.compass import CompassModel  # heavy (transformers VL model): only for COMPASS

            self.compass = CompassModel.from_pretrained(cfg.compass).to(device).eval()
        if cfg.scorer == "dists":
            if not (cfg.dists_vgg and cfg.dists_weights):
                raise MissingFileError("pairs.scorer=dists needs pairs.dists_vgg and pairs.dists_weights")
            self.dists = DISTS(cfg.dists_vgg, cfg.dists_weights).to(device)
        self.classical = ClassicalQualityScorer()

    @torch.no_grad()
    def __call__(self, lr: torch.Tensor, srs: torch.Tensor, gt: torch.Tensor | None) -> np.ndarray:
        s = self.cfg.scorer
        if self.needs_gt and gt is None:
            raise UserError(f"pairs.scorer={s} is full-reference: every group needs gt.<ext>")
        if s in ("compass", "compass_qsr"):
            from ..kernels import compass_reward

            f, q_lr, q_sr = self.compass.score(lr[None], srs, torch.zeros(len(srs), dtype=torch.long,
                                                                          device=self.device))
            out = q_sr if s == "compass_qsr" else compass_reward(f, q_lr, q_sr, self.cfg.gamma)
        elif s == "dists":
            out = 1 - self.dists(srs, gt[None].expand_as(srs))
        elif s == "ssim":
            out = ssim(srs, gt[None].expand_as(srs))
        elif s == "lr_consistency":
            out = lr_consistency(srs, lr[None].expand(len(srs), -1, -1, -1))
        else:
            out = torch.tensor(self.classical.score(list(srs.cpu())))
        return out.double().cpu().numpy()


def run(job: EvalPairsJob) -> int:
    cfg = job.pairs
    if not cfg.root:
        raise UserError("oars-fast eval-pairs: set pairs.root=<folder of groups> (layout in `oars-fast eval-pairs "
                        "--help` and oars_fast/stages/eval_pairs.py)")
    out = job.run.run_dir
    out.mkdir(parents=True, exist_ok=True)
    save_config(job, out / "config.yaml")
    device = select_device(job.run.device)
    groups = read_groups(cfg.root)
    scorer = Scorer(job, device)
    scores, prefs = [], []
    for g in groups:
        lr = load_image(g["lr"]).to(device)
        srs = torch.stack([load_image(g["sr"][n]) for n in g["names"]]).to(device)
        gt = load_image(g["gt"]).to(device) if g["gt"] else None
        scores.append(scorer(lr, srs, gt))
        prefs.append(g["prefs"])
    rep = pairwise_report(scores, prefs, cfg.delta)
    result = {"scorer": cfg.scorer, "delta": cfg.delta, "accuracy": rep.accuracy, "pairs": rep.num_pairs,
              "groups": {g["name"]: {"accuracy": a, "pairs": n, "scores": dict(zip(g["names"], s.tolist()))}
                         for g, a, n, s in zip(groups, rep.group_accuracies, rep.group_num_pairs, scores)},
              "confusion": {"labels": list(LABELS), "label_x_prediction": rep.confusion.tolist()}}
    (out / "pairs.json").write_text(json.dumps(result, indent=1))
    ties = rep.confusion[1]
    print(f"eval-pairs: {cfg.scorer} on {len(groups)} groups, {rep.num_pairs} pairs: accuracy {rep.accuracy:.4f} "
          f"(delta {cfg.delta}); tie labels predicted as 0 / tie / 1: {ties.tolist()}; details in {out / 'pairs.json'}")
    return 0
