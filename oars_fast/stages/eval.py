"""`oars-fast eval`: several SR models side by side on a folder pair or a benchmark layout.

1. inputs: the pairs of the layout (``eval.benchmark``; :mod:`oars_fast.evaluation.benchmarks` documents
   each), centre-cropped by the protocol (RealSR, DRealSR, DIV2K-val: LR 128 / HR 512) or ``eval.crop``;
   DIV2K-val from HR alone gets its LR from the Real-ESRGAN chain with per-image seeds. Inputs that were
   changed (cropped, downsampled, synthesised) are written to ``<run>/eval/inputs/{lr,hr}/`` so that other
   methods can be run on exactly these LR images. An unreadable image (or an LR / HR size mismatch) is
   skipped, named and counted; the run goes on.
2. models (``eval.models``, a list of ``name: kind``): ``bicubic``; a model folder (the flow-matching sampler
   through :class:`~oars_fast.stages.infer.SuperResolver`; outputs cached in ``<run>/eval/<name>/`` with a
   fingerprint of the LR, the model and the sampler settings, so a rerun recomputes nothing that is done);
   or a folder of SR outputs matched by file stem (an output of the whole, uncropped image is cropped at the
   protocol's box); or ``bp:<entry>``, an earlier entry's outputs back-projected onto their LR
   (``eval.back_projection`` steps, :mod:`oars_fast.models.consistency`; no sampling); or ``hr``, the ground
   truth itself as a reference row (its LR consistency, COMPASS R and no-reference scores are what a perfect
   restoration scores; its full-reference metrics are trivially infinite / 1 and shown as such).
3. metrics per image: PSNR and SSIM on the BT.601 Y channel and PSNR on RGB (8-bit, ``eval.crop_border``
   pixels cut, default the scale), LR consistency, DISTS (weights configured), the COMPASS reward and its
   parts F, Q_LR, Q_SR (checkpoint configured and :mod:`oars_fast.rewards.compass` present), MUSIQ, LIQE,
   CLIPIQA, MANIQA (pyiqa plug-in, :mod:`oars_fast.evaluation.nr_iqa`). What cannot run is listed as
   skipped with the reason, never faked.
4. results: ``<run>/eval/metrics.csv`` (one row per model x image, with the image files), ``metrics.json``
   (means per model, metric directions, skipped metrics and images with reasons, settings) and the table
   printed at the end.

Launch::

    oars-fast eval --config configs/demo/eval.yaml
    oars-fast eval eval.lr_dir=LR eval.hr_dir=HR "eval.models=[{bicubic: bicubic}, {sft: runs/demo/sft/model}]"
    oars-fast eval eval.benchmark=realsr eval.root=/data/RealSR_V3 eval.models=[...] run.device=cuda
"""
from __future__ import annotations

import csv
import dataclasses
import functools
import hashlib
import importlib
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..config import InferJob, save_config
from ..config.evaluation import EvalJob
from ..data.degrade import Degrader
from ..data.images import IMAGE_EXTENSIONS, ImageReadError, load_image, save_image, to_uint8
from ..errors import MissingFileError, UserError
from ..evaluation import lr_consistency, psnr, ssim
from ..evaluation.benchmarks import Benchmark, EvalPair, find_benchmark, match_by_stem
from ..evaluation.nr_iqa import NR_METRICS, load_nr_metrics
from ..models.consistency import back_project
from ..runtime.device import select_device
from ..runtime.seeding import derive_seed

log = logging.getLogger(__name__)

# column -> (label, higher is better (None: neither, e.g. the input's quality), description)
METRIC_INFO: dict[str, tuple[str, bool | None, str]] = {
    "psnr_y": ("PSNR-Y", True, "PSNR (dB) on the BT.601 Y channel, 8-bit, border cropped"),
    "ssim_y": ("SSIM-Y", True, "SSIM on the BT.601 Y channel (Gaussian 11x11, sigma 1.5), border cropped"),
    "psnr_rgb": ("PSNR-RGB", True, "PSNR (dB) on RGB, 8-bit, border cropped"),
    "lr_consistency": ("LR-PSNR", True, "PSNR (dB) of the SR downsampled (antialiased bicubic) against the LR"),
    "dists": ("DISTS", False, "DISTS distance to the ground truth (0 = identical)"),
    "compass_reward": ("COMPASS R", True, "COMPASS reward R = F*Q_LR + F**(Q_LR/gamma) * (Q_SR - Q_LR)"),
    "compass_f": ("F", True, "COMPASS fidelity F in [0, 1]"),
    "compass_q_lr": ("Q_LR", None, "COMPASS quality of the input, [1, 5]"),
    "compass_q_sr": ("Q_SR", True, "COMPASS quality of the output, [1, 5]"),
    **{k: (k.upper() if k != "clipiqa" else "CLIPIQA", True, v) for k, v in NR_METRICS.items()},
}
COLUMNS = {"psnr_y": ["psnr_y"], "ssim_y": ["ssim_y"], "psnr_rgb": ["psnr_rgb"], "lr_consistency": ["lr_consistency"],
           "dists": ["dists"], "compass": ["compass_reward", "compass_f", "compass_q_lr", "compass_q_sr"],
           **{k: [k] for k in NR_METRICS}}
FULL_REFERENCE = ("psnr_y", "ssim_y", "psnr_rgb", "dists")


@dataclass
class Item:
    """A prepared test image: LR (and HR) tensors and files, and the crop box in the full LR's pixels."""

    index: int
    name: str
    lr_path: Path
    hr_path: Path | None
    full_lr_hw: tuple[int, int]  # the LR before the centre crop
    box: tuple[int, int, int, int] | None  # (y, x, h, w) of the crop in the full LR; None: whole image


@dataclass
class ModelSpec:
    name: str
    kind: str  # bicubic | hr | model | sr_folder | backproject
    source: str  # "bicubic", "hr", the model folder or hub id, the SR folder, or (backproject) the entry's name


# ----------------------------------------------------------------------------------------------------
# 1. inputs
# ----------------------------------------------------------------------------------------------------


def _q8(img: torch.Tensor) -> torch.Tensor:
    """`img` rounded to the 8-bit levels it is saved with (what is scored is what is on disk)."""
    return torch.from_numpy(to_uint8(img)).permute(2, 0, 1).float().div(255.0)


def _centre_box(h: int, w: int, side: int) -> tuple[int, int, int, int]:
    side = min(side, h, w)
    return (h - side) // 2, (w - side) // 2, side, side


def _crop(img: torch.Tensor, box: tuple[int, int, int, int], s: int = 1) -> torch.Tensor:
    y, x, h, w = box
    return img[:, y * s:(y + h) * s, x * s:(x + w) * s]


def _prepare_one(pair: EvalPair, index: int, job: EvalJob, crop: int, degrader: Degrader | None,
                 out_dir: Path) -> Item:
    cfg, s = job.eval, job.eval.scale
    hr = load_image(pair.hr) if pair.hr is not None else None
    changed_lr = changed_hr = False
    if pair.lr is None:  # div2k_val from HR only: centre crop, then the Real-ESRGAN chain, seeded per image
        assert hr is not None and degrader is not None
        hh, ww = hr.shape[-2] // s * s, hr.shape[-1] // s * s
        if crop:
            b = _centre_box(hh // s, ww // s, crop // s)
            hr = _crop(hr, b, s)
        else:
            hr = hr[:, :hh, :ww]
        lr = degrader(hr[None], seeds=[derive_seed(cfg.degrade_seed, index)])[0]
        lr, changed_lr, changed_hr = _q8(lr), True, True
        full, box = tuple(lr.shape[-2:]), None
    else:
        lr = load_image(pair.lr)
        if hr is not None:
            lh, lw = lr.shape[-2:]
            if (lh, lw) == tuple(hr.shape[-2:]) and s > 1:  # an LR registered on the HR grid (RealSR release)
                lh, lw = lh // s, lw // s
                lr = _q8(F.interpolate(lr[None], size=(lh, lw), mode="bicubic", antialias=True,
                                       align_corners=False)[0].clamp(0, 1))
                changed_lr = True
            if hr.shape[-2] < lh * s or hr.shape[-1] < lw * s:
                raise ValueError(f"ground truth {pair.hr} is {hr.shape[-2]}x{hr.shape[-1]}, smaller than scale={s} "
                                 f"x the LR {pair.lr} ({lh}x{lw})")
            if tuple(hr.shape[-2:]) != (lh * s, lw * s):  # mod-crop, as BasicSR: HR sides not a multiple
                hr, changed_hr = hr[:, :lh * s, :lw * s], True
        full = tuple(lr.shape[-2:])
        box = None
        if crop and (full[0] > crop // s or full[1] > crop // s):
            box = _centre_box(full[0], full[1], crop // s)
            lr, changed_lr = _crop(lr, box), True
            if hr is not None:
                hr, changed_hr = _crop(hr, box, s), True
    lr_path = pair.lr
    if changed_lr:
        lr_path = out_dir / "lr" / f"{pair.name}.png"
        save_image(lr, lr_path)
    hr_path = pair.hr
    if hr is not None and changed_hr:
        hr_path = out_dir / "hr" / f"{pair.name}.png"
        save_image(hr, hr_path)
    return Item(index, pair.name, Path(lr_path), Path(hr_path) if hr_path is not None else None, full, box)


def prepare_inputs(job: EvalJob, bench: Benchmark, out_dir: Path) -> tuple[list[Item], dict[str, str]]:
    """The prepared items and the images skipped {name: reason}."""
    cfg = job.eval
    crop = bench.crop if cfg.crop is None else cfg.crop
    degrader = Degrader(job.degradation, cfg.scale) if bench.synthetic else None
    pairs = bench.pairs[:cfg.max_images] if cfg.max_images else bench.pairs
    items, skipped = [], {}
    for i, pair in enumerate(pairs):
        try:
            items.append(_prepare_one(pair, i, job, crop, degrader, out_dir))
        except (ImageReadError, ValueError) as e:
            log.warning("eval: skipped image %s: %s", pair.name, e)
            skipped[pair.name] = str(e)
    if not items:
        raise UserError(f"eval: none of the {len(pairs)} image(s) could be read: "
                        f"{'; '.join(list(skipped.values())[:3])}")
    return items, skipped


# ----------------------------------------------------------------------------------------------------
# 2. models
# ----------------------------------------------------------------------------------------------------


def resolve_models(job: EvalJob) -> list[ModelSpec]:
    """``eval.models`` -> specs; a path that is neither a model folder nor a folder of images raises."""
    specs = []
    for name, kind in job.eval.model_entries():
        if kind.lower() in ("bicubic", "hr"):
            specs.append(ModelSpec(name, kind.lower(), kind.lower()))
            continue
        if kind.startswith("bp:"):
            src = kind[3:]
            if src not in [s.name for s in specs]:
                raise UserError(f"eval.models: {name}: {kind} names no earlier entry (entries before it: "
                                f"{', '.join(s.name for s in specs) or 'none'})")
            specs.append(ModelSpec(name, "backproject", src))
            continue
        prefix, _, rest = kind.partition(":")
        if prefix in ("model", "sr") and rest:
            explicit, path = prefix, rest
        else:
            explicit, path = None, kind
        folder = Path(path).expanduser()
        if explicit == "model" or (explicit is None and (folder / "transformer").is_dir()):
            hub_id = not folder.exists() and path.count("/") == 1 and not path.startswith((".", "/", "~"))
            if not folder.is_dir() and not hub_id:
                raise MissingFileError(f"eval.models: {name}: model folder {folder} does not exist (expected a "
                                       "diffusers folder with transformer/ and vae/, or a hub id)")
            specs.append(ModelSpec(name, "model", str(folder) if folder.exists() else path))
        elif folder.is_dir():
            specs.append(ModelSpec(name, "sr_folder", str(folder)))
        else:
            raise MissingFileError(f"eval.models: {name}: {folder} does not exist; a kind is bicubic, hr, a model "
                                   "folder (with transformer/ and vae/), model:<folder|hub id>, a folder of SR images "
                                   "or sr:<folder>")
    return specs


def _folder_stamp(source: str) -> str:
    """A fingerprint of a model folder's files (relative path, size, modification time): a model exported again
    into the same folder (e.g. ``pipeline.redo=[rl_nr]``) gets new outputs. A hub id stands for itself."""
    folder = Path(source).expanduser()
    if not folder.is_dir():
        return source
    h = hashlib.sha1()
    for f in sorted(folder.rglob("*")):
        if f.is_file():
            st = f.stat()
            h.update(f"{f.relative_to(folder)}:{st.st_size}:{st.st_mtime_ns};".encode())
    return h.hexdigest()


def _sha1(img: torch.Tensor) -> str:
    return hashlib.sha1(to_uint8(img).tobytes()).hexdigest()


class _Producer:
    """SR images of one model entry: ``sr(item, lr) -> ((3, H, W) 8-bit-rounded SR, file) or None, reason``."""

    def __init__(self, spec: ModelSpec, job: EvalJob, eval_dir: Path, device: torch.device):
        self.spec, self.job, self.device = spec, job, device
        self.scale = job.eval.scale
        self.dir = eval_dir / spec.name
        self.cache_file = self.dir / "cache.json"
        self.cache: dict = {}
        self.resolver = None
        self.source: _Producer | None = None  # backproject: the entry whose outputs are projected
        self.computed = self.reused = 0
        if spec.kind == "sr_folder":
            self.files = [p for p in sorted(Path(spec.source).rglob("*"))
                          if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS]
            if not self.files:
                raise MissingFileError(f"eval.models: {spec.name}: SR folder {spec.source} holds no images")
        elif spec.kind == "model" and self.cache_file.is_file() and not job.eval.overwrite:
            try:
                self.cache = json.loads(self.cache_file.read_text())
            except (OSError, json.JSONDecodeError):
                self.cache = {}

    def match(self, items: list[Item]) -> None:
        if self.spec.kind == "sr_folder":
            self.matched = match_by_stem([it.name for it in items], self.files, sr=True)

    @functools.cached_property
    def _settings(self) -> dict:
        """What a cached output depends on besides its LR (computed once: the model folder is not re-exported during
        an eval run)."""
        j = self.job
        out = {"source": self.spec.source, "seed": j.run.seed, "sampler": dataclasses.asdict(j.sampler),
               "dtype": j.model.dtype, "condition": j.model.condition,
               "tiling": [j.infer.tile, j.infer.tile_overlap, j.infer.max_pixels],
               "prompt": [j.model.prompt, j.model.prompt_embeds], "weights": _folder_stamp(self.spec.source)}
        if j.infer.back_projection:
            out["back_projection"] = j.infer.back_projection
        return out

    def _model(self):
        if self.resolver is None:
            from ..models.backbone import load_backbone
            from .infer import SuperResolver

            j = self.job
            model_cfg = dataclasses.replace(j.model, pretrained=self.spec.source)
            model = load_backbone(model_cfg, self.scale, self.device, j.run.seed)
            if model.scale != self.scale:
                raise UserError(f"eval.models: {self.spec.name}: the model at {self.spec.source} is x{model.scale}, "
                                f"eval.scale={self.scale}")
            model.eval()
            ij = InferJob(run=j.run, model=model_cfg, sampler=j.sampler, infer=j.infer, scale=self.scale)
            self.resolver = SuperResolver(model, ij)
            log.info("eval: %s: model %s loaded (%d sampler steps)", self.spec.name, self.spec.source,
                     j.sampler.steps)
        return self.resolver

    def __call__(self, item: Item, lr: torch.Tensor) -> tuple[torch.Tensor | None, Path | None, str]:
        s = self.scale
        want = (lr.shape[-2] * s, lr.shape[-1] * s)
        if self.spec.kind == "bicubic":
            sr = _q8(F.interpolate(lr[None], scale_factor=s, mode="bicubic", align_corners=False)[0].clamp(0, 1))
            path = self.dir / f"{item.name}.png"
            save_image(sr, path)
            return sr, path, ""
        if self.spec.kind == "hr":
            if item.hr_path is None:
                return None, None, "no ground truth (LQ-only input)"
            return load_image(item.hr_path), item.hr_path, ""
        if self.spec.kind == "sr_folder":
            f = self.matched.get(item.name)
            if f is None:
                return None, None, "no SR file matches this image's stem"
            sr = load_image(f)
            if tuple(sr.shape[-2:]) == want:
                return sr, f, ""
            full = (item.full_lr_hw[0] * s, item.full_lr_hw[1] * s)
            if item.box is not None and tuple(sr.shape[-2:]) == full:  # an output of the whole image: crop it
                sr = _crop(sr, item.box, s)
                path = self.dir / f"{item.name}.png"
                save_image(sr, path)
                return sr, path, ""
            return None, None, (f"{f.name} is {sr.shape[-2]}x{sr.shape[-1]}, expected {want[0]}x{want[1]} "
                                f"(scale {s} x the LR)")
        if self.spec.kind == "backproject":
            counts = self.source.computed, self.source.reused  # the source's own row counts its outputs
            sr, _, why = self.source(item, lr)
            self.source.computed, self.source.reused = counts
            if sr is None:
                return None, None, f"{self.spec.source}: {why}"
            sr = _q8(back_project(sr[None], lr[None], self.job.eval.back_projection)[0])
            path = self.dir / f"{item.name}.png"
            save_image(sr, path)
            return sr, path, ""
        # a model: reuse the cached output when the LR, the model and the sampler settings are the same
        path = self.dir / f"{item.name}.png"
        key = {"lr": _sha1(lr), **self._settings}
        if self.cache.get(item.name) == key and path.is_file():
            try:
                sr = load_image(path)
                if tuple(sr.shape[-2:]) == want:
                    self.reused += 1
                    return sr, path, ""
            except ImageReadError:
                pass
        sr = self._model()(lr.to(self.device), self.job.run.seed + 1000 * item.index)
        sr = _q8(sr.float().cpu().clamp(0, 1))
        save_image(sr, path)
        self.cache[item.name] = key
        self.computed += 1
        tmp = self.cache_file.with_name(".cache.json.tmp")
        tmp.write_text(json.dumps(self.cache, indent=1))
        tmp.replace(self.cache_file)
        return sr, path, ""

    def close(self) -> None:
        self.resolver = None


# ----------------------------------------------------------------------------------------------------
# 3. metrics
# ----------------------------------------------------------------------------------------------------


class _Compass:
    """COMPASS F, Q_LR, Q_SR and R per image (lazy: the module and the checkpoint may be absent)."""

    def __init__(self, model, gamma: float, device: torch.device):
        from ..kernels import compass_reward

        self.model, self.gamma, self.device, self.reward = model, gamma, device, compass_reward

    @torch.no_grad()
    def __call__(self, lr: torch.Tensor, sr: torch.Tensor) -> dict[str, float]:
        dev = self.device
        f, q_lr, q_sr = self.model.score(lr[None].to(dev), sr[None].to(dev), torch.zeros(1, dtype=torch.long,
                                                                                            device=dev))
        f, q_lr, q_sr = (torch.as_tensor(v).detach().float().reshape(-1)[:1].cpu() for v in (f, q_lr, q_sr))
        r = self.reward(f, q_lr, q_sr, self.gamma)
        return {"compass_reward": float(r[0]), "compass_f": float(f[0]), "compass_q_lr": float(q_lr[0]),
                "compass_q_sr": float(q_sr[0])}


def _load_compass(cfg, device) -> tuple[_Compass | None, str]:
    if not cfg.compass:
        return None, "no COMPASS checkpoint configured (eval.compass=<checkpoint folder>)"
    path = Path(cfg.compass).expanduser()
    if not path.exists():
        return None, f"COMPASS checkpoint {path} not found (eval.compass)"
    try:
        module = importlib.import_module("oars_fast.rewards.compass")
    except ImportError as e:
        return None, f"oars_fast.rewards.compass is not available ({e})"
    try:
        dtype = torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32  # as CompassReward
        model = module.CompassModel.from_pretrained(str(path), dtype=dtype)
        if hasattr(model, "to"):
            model = model.to(device)
        if hasattr(model, "eval"):
            model.eval()
        return _Compass(model, cfg.compass_gamma, device), ""
    except Exception as e:  # a broken or foreign checkpoint: reported, the other metrics go on
        return None, f"could not load COMPASS from {path}: {type(e).__name__}: {' '.join(str(e).split())[:300]}"


class _Scorer:
    """Every metric that can run, built once; `skipped` names the others with the reason."""

    def __init__(self, job: EvalJob, has_hr: bool, device: torch.device):
        cfg = job.eval
        self.cfg, self.device = cfg, device
        self.skipped: dict[str, str] = {}
        want = list(dict.fromkeys(cfg.metrics))
        if not has_hr:
            for m in FULL_REFERENCE:
                if m in want:
                    self.skipped[m] = "no ground truth (LQ-only inputs): full-reference metric"
            want = [m for m in want if m not in FULL_REFERENCE]
        self.dists = None
        if "dists" in want:
            if not cfg.dists_vgg or not cfg.dists_weights:
                self.skipped["dists"] = ("DISTS weights not configured (eval.dists_vgg: VGG16 weights in torchvision's "
                                         "layout; eval.dists_weights: DISTS alpha/beta weights.pt)")
                want.remove("dists")
            else:
                from ..rewards.dists import DISTS

                self.dists = DISTS(cfg.dists_vgg, cfg.dists_weights).to(device)
        self.compass = None
        if "compass" in want:
            self.compass, reason = _load_compass(cfg, device)
            if self.compass is None:
                self.skipped["compass"] = reason
                want.remove("compass")
        nr_names = [m for m in want if m in NR_METRICS]
        self.nr, nr_skipped = load_nr_metrics(nr_names, device, offline=cfg.nr_offline)
        self.skipped.update(nr_skipped)
        want = [m for m in want if m not in nr_skipped]
        self.metrics = want
        self.columns = [c for m in want for c in COLUMNS[m]]

    @torch.no_grad()
    def __call__(self, lr: torch.Tensor, sr: torch.Tensor, hr: torch.Tensor | None) -> dict[str, float]:
        out: dict[str, float] = {}
        b = self.cfg.border
        x, y = sr[None].double(), (hr[None].double() if hr is not None else None)
        for m in self.metrics:
            try:
                if m == "psnr_y":
                    out[m] = float(psnr(x, y, b, y_channel=True)[0])
                elif m == "ssim_y":
                    out[m] = float(ssim(x, y, b, y_channel=True)[0])
                elif m == "psnr_rgb":
                    out[m] = float(psnr(x, y, b, y_channel=False)[0])
                elif m == "lr_consistency":
                    out[m] = float(lr_consistency(x, lr[None].double(), self.cfg.scale)[0])
                elif m == "dists":
                    out[m] = float(self.dists(sr[None].to(self.device), hr[None].to(self.device))[0])
                elif m == "compass":
                    out.update(self.compass(lr, sr))
                else:
                    out[m] = float(self.nr[m](sr[None].to(self.device))[0])
            except ValueError as e:  # e.g. an image too small for SSIM after the border crop
                log.warning("eval: %s could not be computed: %s", m, e)
                for c in COLUMNS[m]:
                    out[c] = math.nan
        return out


# ----------------------------------------------------------------------------------------------------
# 4. results
# ----------------------------------------------------------------------------------------------------


def _rel(path: Path | None, base: Path) -> str:
    if path is None:
        return ""
    path = Path(path).resolve()
    try:
        return str(path.relative_to(base.resolve()))
    except ValueError:
        return str(path)


def _finite(v) -> float | None:
    return float(v) if v is not None and math.isfinite(float(v)) else None


def _table(summary: dict, columns: list[str]) -> str:
    cols = [c for c in columns if any(m["mean"].get(c) is not None for m in summary["models"].values())]
    heads = ["model", "n"] + [METRIC_INFO[c][0] + {True: "↑", False: "↓", None: ""}[METRIC_INFO[c][1]]
                              for c in cols]
    rows = []
    for name, m in summary["models"].items():
        cells = [name, str(m["n_images"])]
        for c in cols:
            v = m["mean"].get(c)
            cells.append("-" if v is None else (f"{v:.2f}" if "psnr" in c or c == "lr_consistency" or
                                                 c in ("musiq",) else f"{v:.4f}"))
        rows.append(cells)
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(heads)]
    fmt = lambda cells: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([fmt(heads), fmt(["-" * w for w in widths]), *(fmt(r) for r in rows)])


def run(job: EvalJob) -> int:
    cfg = job.eval
    t0 = time.monotonic()
    bench = find_benchmark(cfg.benchmark, cfg.root, cfg.lr_dir, cfg.hr_dir, cfg.scale)
    specs = resolve_models(job)
    eval_dir = job.run.run_dir / "eval"
    eval_dir.mkdir(parents=True, exist_ok=True)
    save_config(job, eval_dir / "eval_config.yaml")
    device = select_device(job.run.device)
    log.info("eval: %s: %d image(s) (%s); models: %s", cfg.benchmark, len(bench.pairs), bench.layout,
             ", ".join(f"{s.name} ({s.kind})" for s in specs))

    # 1. inputs
    items, skipped_images = prepare_inputs(job, bench, eval_dir / "inputs")
    crop = bench.crop if cfg.crop is None else cfg.crop
    has_hr = all(it.hr_path is not None for it in items)
    # 2. + 3. metrics, model after model
    scorer = _Scorer(job, has_hr, device)
    for m, reason in scorer.skipped.items():
        log.info("eval: skipped metric %s: %s", m, reason)
    producers = [_Producer(s, job, eval_dir, device) for s in specs]
    by_name = {p.spec.name: p for p in producers}
    for p in producers:
        p.match(items)
        if p.spec.kind == "backproject":
            p.source = by_name[p.spec.source]
    rows: list[dict] = []
    missing: dict[str, dict[str, str]] = {s.name: {} for s in specs}
    bar = tqdm(total=len(items) * len(specs), desc="eval", unit="img", disable=None)
    shown = -math.inf
    for p in producers:
        for it in items:
            lr = load_image(it.lr_path)
            hr = load_image(it.hr_path) if it.hr_path is not None else None
            sr, sr_path, why = p(it, lr)
            if sr is None:
                missing[p.spec.name][it.name] = why
            else:
                scores = scorer(lr, sr, hr)
                rows.append({"model": p.spec.name, "image": it.name, **scores,
                             "lr": _rel(it.lr_path, eval_dir), "hr": _rel(it.hr_path, eval_dir),
                             "sr": _rel(sr_path, eval_dir)})
            bar.update(1)
            now = time.monotonic()
            if now - shown >= job.run.log_interval:
                shown = now
                log.info("eval: %s %d/%d (%s), %.0f s", p.spec.name, it.index + 1, len(items), it.name, now - t0)
        p.close()
        if missing[p.spec.name]:
            log.warning("eval: %s: %d image(s) without output: %s", p.spec.name, len(missing[p.spec.name]),
                        "; ".join(f"{k}: {v}" for k, v in list(missing[p.spec.name].items())[:3]))
    bar.close()

    # 4. results
    columns = scorer.columns
    with open(eval_dir / "metrics.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["model", "image", *columns, "lr", "hr", "sr"])
        w.writeheader()
        for r in rows:
            w.writerow({k: (repr(float(v)) if isinstance(v, float) else v) for k, v in r.items()})
    models = {}
    for p in producers:
        mine = [r for r in rows if r["model"] == p.spec.name]
        mean, nonfinite = {}, {}
        for c in columns:
            vals = np.array([r[c] for r in mine if c in r], dtype=np.float64)
            fin = vals[np.isfinite(vals)]
            mean[c] = _finite(fin.mean()) if fin.size else None
            if fin.size < vals.size:
                nonfinite[c] = int(vals.size - fin.size)
        models[p.spec.name] = {"kind": p.spec.kind, "source": p.spec.source, "n_images": len(mine), "mean": mean,
                               "nonfinite": nonfinite, "missing": missing[p.spec.name],
                               "outputs": {"computed": p.computed, "reused": p.reused}}
    summary = {
        "version": 1,
        "settings": {"benchmark": cfg.benchmark, "layout": bench.layout, "scale": cfg.scale, "crop": crop,
                     "crop_border": cfg.border, "n_images": len(items), "seed": job.run.seed,
                     "sampler_steps": job.sampler.steps, "device": str(device),
                     "created": time.strftime("%Y-%m-%d %H:%M:%S"), "seconds": round(time.monotonic() - t0, 2)},
        "images": [it.name for it in items],
        "metrics": {c: {"label": METRIC_INFO[c][0], "higher_is_better": METRIC_INFO[c][1],
                        "description": METRIC_INFO[c][2]} for c in columns},
        "models": models,
        "skipped": scorer.skipped,
        "skipped_images": skipped_images,
    }
    tmp = eval_dir / ".metrics.json.tmp"
    tmp.write_text(json.dumps(summary, indent=2, allow_nan=False))
    tmp.replace(eval_dir / "metrics.json")

    lines = [f"eval: {cfg.benchmark}, {len(items)} image(s), x{cfg.scale}, crop {crop or 'none'}, border "
             f"{cfg.border} ({time.monotonic() - t0:.1f} s)", _table(summary, columns)]
    lines += [f"skipped {m}: {r}" for m, r in scorer.skipped.items()]
    if skipped_images:
        lines.append(f"skipped {len(skipped_images)} image(s): {', '.join(list(skipped_images)[:5])}")
    lines += [f"{n}: {len(m['missing'])} image(s) without output" for n, m in models.items() if m["missing"]]
    lines.append(f"results: {eval_dir / 'metrics.csv'}, {eval_dir / 'metrics.json'}")
    print("\n".join(lines))
    if not rows:
        why = "; ".join(f"{n}: {next(iter(m['missing'].values()))}" for n, m in models.items() if m["missing"])
        raise UserError(f"eval: no model produced an output for any image ({why})")
    return 0
