"""`oars-fast infer`: LR image(s) -> SR images with the flow-matching sampler.

Images whose LR has more than ``infer.max_pixels`` pixels (or any image when ``infer.tile`` > 0)
are cut into overlapping LR tiles, super-resolved in batches of ``infer.batch_size`` and blended
with linear ramps over the overlaps. Sides are reflect-padded to the model's multiple and cropped
back. ``infer.back_projection`` > 0 back-projects the whole output onto its LR
(:mod:`oars_fast.models.consistency`). Unreadable inputs are skipped with a message naming the file; the run goes on.

Launch: ``oars-fast infer --config configs/demo/infer.yaml infer.input=DIR infer.output=OUT``.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..config import InferJob, save_config
from ..data.images import IMAGE_EXTENSIONS, ImageReadError, load_image, save_image, scan_images
from ..errors import MissingFileError, UserError
from ..models.backbone import DTYPES, SRBackbone, load_backbone
from ..models.consistency import back_project
from ..models.sampler import sample_sr
from ..runtime.device import select_device

log = logging.getLogger(__name__)


def _pad_to(x: torch.Tensor, mult: int) -> torch.Tensor:
    h, w = x.shape[-2:]
    ph, pw = (-h) % mult, (-w) % mult
    if ph == 0 and pw == 0:
        return x
    mode = "reflect" if ph < h and pw < w else "replicate"
    return F.pad(x, (0, pw, 0, ph), mode=mode)


def _ramp(n: int, overlap: int, first: bool, last: bool) -> torch.Tensor:
    w = torch.ones(n)
    if overlap > 0:
        r = (torch.arange(overlap, dtype=torch.float32) + 0.5) / overlap
        if not first:
            w[:overlap] = r
        if not last:
            w[-overlap:] = r.flip(0)
    return w


def _starts(size: int, tile: int, stride: int) -> list[int]:
    if size <= tile:
        return [0]
    starts = list(range(0, size - tile, stride)) + [size - tile]
    return sorted(set(starts))


class SuperResolver:
    def __init__(self, model: SRBackbone, job: InferJob):
        self.model, self.job = model, job
        self.autocast = DTYPES[job.model.dtype]
        self.lr_multiple = math.lcm(model.multiple, model.scale) // model.scale

    def _run(self, lr: torch.Tensor, seeds: list[int]) -> torch.Tensor:
        return sample_sr(self.model, lr, self.job.sampler, seeds, autocast_dtype=self.autocast)

    @torch.no_grad()
    def __call__(self, lr: torch.Tensor, seed: int) -> torch.Tensor:
        """(3, h, w) LR in [0, 1] -> (3, h*scale, w*scale) SR (back-projected when infer.back_projection > 0)."""
        with self.model.prompt_encoder_on(lr.device):  # model.text_encoder_offload: once per image, not per tile
            sr = self._sample(lr, seed)
        steps = self.job.infer.back_projection
        return back_project(sr[None], lr[None], steps)[0] if steps else sr

    def _sample(self, lr: torch.Tensor, seed: int) -> torch.Tensor:
        cfg, s = self.job.infer, self.model.scale
        h, w = lr.shape[-2:]
        if cfg.tile == 0 and h * w <= cfg.max_pixels:
            x = _pad_to(lr[None], self.lr_multiple)
            return self._run(x, [seed])[0, :, : h * s, : w * s]
        tile = cfg.tile or 64
        tile = max(self.lr_multiple, tile - tile % self.lr_multiple)
        overlap = min(cfg.tile_overlap, tile // 2)
        x = _pad_to(lr[None], self.lr_multiple)
        if x.shape[-2] < tile or x.shape[-1] < tile:
            x = _pad_to(F.pad(x, (0, max(0, tile - x.shape[-1]), 0, max(0, tile - x.shape[-2])), mode="replicate"),
                        self.lr_multiple)
        H, W = x.shape[-2:]
        ys, xs = _starts(H, tile, tile - overlap), _starts(W, tile, tile - overlap)
        boxes = [(y, xx) for y in ys for xx in xs]
        out = torch.zeros(3, H * s, W * s, device=lr.device)
        norm = torch.zeros(1, H * s, W * s, device=lr.device)
        starts = range(0, len(boxes), cfg.batch_size)
        for i in tqdm(starts, desc="tiles", unit="batch", leave=False, disable=None if len(starts) > 1 else True):
            chunk = boxes[i:i + cfg.batch_size]
            tiles = torch.cat([x[:, :, y:y + tile, xx:xx + tile] for y, xx in chunk])
            srs = self._run(tiles, [seed + i + j for j in range(len(chunk))])
            for (y, xx), sr in zip(chunk, srs):
                wy = _ramp(tile * s, overlap * s, y == 0, y + tile >= H).to(lr.device)
                wx = _ramp(tile * s, overlap * s, xx == 0, xx + tile >= W).to(lr.device)
                wgt = wy[:, None] * wx[None, :]
                out[:, y * s:(y + tile) * s, xx * s:(xx + tile) * s] += sr * wgt
                norm[:, y * s:(y + tile) * s, xx * s:(xx + tile) * s] += wgt
        return (out / norm.clamp_min(1e-8))[:, : h * s, : w * s]


def _inputs(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    if path.is_dir():
        return scan_images(path)
    raise MissingFileError(f"infer.input={path} is neither an image file nor a folder")


def run(job: InferJob) -> int:
    cfg = job.infer
    if not cfg.input:
        raise UserError("oars-fast infer: set infer.input=<LR image or folder>")
    files = _inputs(Path(cfg.input).expanduser())
    device = select_device(job.run.device)
    model_cfg = job.model
    if cfg.checkpoint:
        model_cfg = dataclasses.replace(job.model, pretrained=cfg.checkpoint)
    model = load_backbone(model_cfg, job.scale, device, job.run.seed)
    model.eval()
    out_dir = Path(cfg.output) if cfg.output else job.run.run_dir / "sr"
    out_dir.mkdir(parents=True, exist_ok=True)
    save_config(job, job.run.run_dir / "infer_config.yaml")
    sr_fn = SuperResolver(model, job)
    done, skipped = 0, []
    t0 = shown = time.monotonic()
    for i, f in enumerate(tqdm(files, desc="infer", unit="img", disable=None)):
        try:
            lr = load_image(f).to(device)
        except ImageReadError as e:
            log.warning("skipped: %s", e)
            skipped.append(str(f))
            continue
        sr = sr_fn(lr, job.run.seed + 1000 * i)
        ext = f.suffix.lower() if f.suffix.lower() in IMAGE_EXTENSIONS else ".png"
        save_image(sr, out_dir / f"{f.stem}{'.png' if ext in ('.jpg', '.jpeg', '.webp') else ext}")
        done += 1
        now = time.monotonic()
        if now - shown >= job.run.log_interval or i + 1 == len(files):  # a line every few seconds, not per image
            shown = now
            log.info("infer: %d/%d image(s) (%s), %.0f s", i + 1, len(files), f.name, now - t0)
    print(f"infer: {done} image(s) written to {out_dir}; {len(skipped)} skipped"
          + (f" (unreadable: {', '.join(skipped[:5])})" if skipped else ""))
    return 0 if done or not files else 1
