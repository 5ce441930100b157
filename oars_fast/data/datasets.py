"""Training data sets: HR folder, paired LR/HR folders, LQ folder; seeded crops. (Loaders:
:mod:`.loader` and :mod:`.dali`; which one a config names: :mod:`.build`.)

A sample is a dict of tensors in [0, 1]:

========  ==============================  =====================================================
key       shape                           present for
========  ==============================  =====================================================
``hr``    (3, crop, crop)                 source ``hr``/``demo`` (LR is made later, on device,
                                          by :class:`~oars_fast.data.degrade.RealESRGANDegradation`)
                                          and ``paired``
``lr``    (3, crop/scale, crop/scale)     ``paired`` (aligned with ``hr``) and ``lq``
========  ==============================  =====================================================

plus ``index`` (int), ``seed`` (int: the sample's own seed for the randomness applied later, on
device: degradation, training times and noise), ``path`` (str) and ``skipped`` (list of files that
could not be used and were replaced by the next readable one; counted by the trainer, named in its log).

Randomness is drawn from ``numpy.random.default_rng((seed, epoch, index))``: the same seed gives
the same sample, and so the same batch, whatever the number of loader workers or ranks.
"""
from __future__ import annotations

import abc
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from ..config import DataConfig
from ..errors import MissingFileError, UserError
from .images import ImageReadError, load_image, scan_images

log = logging.getLogger(__name__)


def reflect_pad_to(img: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Reflect-pad (C, H, W) at the bottom/right to at least (h, w), repeating the reflection as needed."""
    while img.shape[-2] < h or img.shape[-1] < w:
        ph = min(h - img.shape[-2], img.shape[-2] - 1) if img.shape[-2] < h else 0
        pw = min(w - img.shape[-1], img.shape[-1] - 1) if img.shape[-1] < w else 0
        if ph <= 0 and pw <= 0:  # a 1-pixel side cannot be reflected
            return F.pad(img[None], (0, max(0, w - img.shape[-1]), 0, max(0, h - img.shape[-2])),
                         mode="replicate")[0]
        img = F.pad(img[None], (0, max(pw, 0), 0, max(ph, 0)), mode="reflect")[0]
    return img


class CropDataset(Dataset, abc.ABC):
    """Shared machinery: per-sample RNG, skip-and-replace of unusable files.

    `keys`: the images of a sample, in the order of :meth:`paths` (the first is the one whose grid the
    crop plan is drawn on)."""

    keys: tuple[str, ...] = ()

    def __init__(self, files: list[Any], cfg: DataConfig, seed: int):
        self.files = files
        self.cfg = cfg
        self.seed = seed
        self.epoch = 0
        self._bad: set[int] = set()  # indices known to be unusable (per process)

    def __len__(self) -> int:
        return len(self.files)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _rng(self, index: int) -> np.random.Generator:
        return np.random.default_rng((self.seed, self.epoch, index))

    def sample_seed(self, index: int) -> int:
        """The seed of sample `index` in this epoch, for randomness applied after loading (a stream of
        its own, apart from the crop's)."""
        return int(np.random.default_rng((self.seed, self.epoch, index, 1)).integers(2**62))

    @abc.abstractmethod
    def _load(self, index: int, rng: np.random.Generator) -> dict:
        """The sample of file `index`, cropped and flipped with `rng`; ImageReadError if unusable."""

    def __getitem__(self, index: int) -> dict:
        skipped: list[str] = []
        for attempt in range(len(self.files)):
            i = (index + attempt) % len(self.files)
            if i in self._bad:
                skipped.append(self.display_name(i))
                continue
            try:
                sample = self._load(i, self._rng(i))
            except ImageReadError as e:
                log.warning("skipping unusable image: %s", e)
                self._bad.add(i)
                skipped.append(self.display_name(i))
                continue
            # a per-sample seed for the randomness that happens later, on device (degradation, t, noise)
            sample.update(index=index, skipped=skipped, seed=self.sample_seed(i))
            return sample
        raise UserError(f"no usable image among the {len(self.files)} files of this data set "
                           f"(all skipped; first: {skipped[:3]})")

    def paths(self, i: int) -> tuple[Path, ...]:
        """The files of sample `i`, in the order of `keys`."""
        f = self.files[i]
        return tuple(f) if isinstance(f, tuple) else (f,)

    def display_name(self, i: int) -> str:
        """How sample `i` is named in logs (its HR file for pairs)."""
        return str(self.paths(i)[-1])

    def _flips(self, rng: np.random.Generator) -> tuple[bool, bool]:
        if not self.cfg.flip:
            return False, False
        return bool(rng.random() < 0.5), bool(rng.random() < 0.5)

    @staticmethod
    def _offset(rng: np.random.Generator, h: int, w: int, c: int) -> tuple[int, int]:
        return int(rng.integers(0, h - c + 1)), int(rng.integers(0, w - c + 1))

    def crop_side(self) -> int:
        """Side of the crop on the grid of the first image read (LR for lq/paired, HR for hr)."""
        return self.cfg.crop_size

    def plan(self, index: int, height: int, width: int) -> tuple[int, int, bool, bool]:
        """(y, x, hflip, vflip) of sample `index` this epoch, for a first image of (height, width): the
        draws `_load` makes, so another loader (DALI) can cut exactly the same crops."""
        rng = self._rng(index)
        c = self.crop_side()
        y, x = self._offset(rng, max(height, c), max(width, c), c)
        return (y, x, *self._flips(rng))

    def _flip(self, rng: np.random.Generator, *imgs: torch.Tensor) -> list[torch.Tensor]:
        hflip, vflip = self._flips(rng)
        out = []
        for im in imgs:
            if hflip:
                im = im.flip(-1)
            if vflip:
                im = im.flip(-2)
            out.append(im.contiguous())
        return out

    def _fit(self, img: torch.Tensor, size: int, path: Any) -> torch.Tensor:
        if img.shape[-2] >= size and img.shape[-1] >= size:
            return img
        if self.cfg.small_image == "skip":
            raise ImageReadError(f"{path} is {img.shape[-1]}x{img.shape[-2]}, smaller than the crop {size}")
        log.debug("%s is smaller than the crop %d: reflect-padded", path, size)
        return reflect_pad_to(img, size, size)


class HRDataset(CropDataset):
    """Random HR crops; the LR is synthesised later by the (batched, on-device) degradation."""

    keys = ("hr",)

    def _load(self, index: int, rng: np.random.Generator) -> dict:
        path = self.files[index]
        c = self.cfg.crop_size
        img = self._fit(load_image(path), c, path)
        y, x = self._offset(rng, img.shape[-2], img.shape[-1], c)
        (hr,) = self._flip(rng, img[:, y:y + c, x:x + c])
        return {"hr": hr, "path": str(path)}


class LQDataset(CropDataset):
    """Random crops of real low-quality inputs (no ground truth) of side crop_size/scale."""

    keys = ("lr",)

    def crop_side(self) -> int:
        return self.cfg.crop_size // self.cfg.scale

    def _load(self, index: int, rng: np.random.Generator) -> dict:
        path = self.files[index]
        c = self.crop_side()
        img = self._fit(load_image(path), c, path)
        y, x = self._offset(rng, img.shape[-2], img.shape[-1], c)
        (lr,) = self._flip(rng, img[:, y:y + c, x:x + c])
        return {"lr": lr, "path": str(path)}


class PairedDataset(CropDataset):
    """Real LR/HR pairs matched by file stem; the HR crop is aligned with the LR crop at `scale`."""

    keys = ("lr", "hr")

    def crop_side(self) -> int:
        return self.cfg.crop_size // self.cfg.scale

    def _load(self, index: int, rng: np.random.Generator) -> dict:
        lr_path, hr_path = self.files[index]
        s = self.cfg.scale
        lr, hr = load_image(lr_path), load_image(hr_path)
        if hr.shape[-2] != lr.shape[-2] * s or hr.shape[-1] != lr.shape[-1] * s:
            raise ImageReadError(f"pair {lr_path} / {hr_path}: HR is {hr.shape[-1]}x{hr.shape[-2]}, expected "
                                 f"{s}x the LR ({lr.shape[-1]}x{lr.shape[-2]})")
        c = self.crop_side()
        if lr.shape[-2] < c or lr.shape[-1] < c:
            lr = self._fit(lr, c, lr_path)
            hr = reflect_pad_to(hr, lr.shape[-2] * s, lr.shape[-1] * s)
        y, x = self._offset(rng, lr.shape[-2], lr.shape[-1], c)
        lr_c = lr[:, y:y + c, x:x + c]
        hr_c = hr[:, y * s:(y + c) * s, x * s:(x + c) * s]
        lr_c, hr_c = self._flip(rng, lr_c, hr_c)
        return {"lr": lr_c, "hr": hr_c, "path": str(hr_path)}


def match_pairs(lr_dir: str | Path, hr_dir: str | Path) -> list[tuple[Path, Path]]:
    """Pair LR and HR files by file stem. Unmatched files are counted in a warning."""
    lr_files, hr_files = scan_images(lr_dir), scan_images(hr_dir)
    hr_by_stem = {p.stem: p for p in hr_files}
    pairs = [(p, hr_by_stem[p.stem]) for p in lr_files if p.stem in hr_by_stem]
    if not pairs:
        raise MissingFileError(f"no LR file in {lr_dir} has an HR file of the same stem in {hr_dir}")
    unmatched = len(lr_files) + len(hr_files) - 2 * len(pairs)
    if unmatched:
        log.warning("%d files in %s / %s have no partner of the same stem and are ignored", unmatched, lr_dir, hr_dir)
    return pairs


def collate(samples: list[dict]) -> dict:
    out: dict[str, Any] = {}
    for key in ("hr", "lr"):
        if key in samples[0]:
            out[key] = torch.stack([s[key] for s in samples])
    out["index"] = torch.tensor([s["index"] for s in samples])
    out["seed"] = torch.tensor([s["seed"] for s in samples], dtype=torch.int64)
    out["path"] = [s["path"] for s in samples]
    out["skipped"] = [p for s in samples for p in s["skipped"]]
    return out


