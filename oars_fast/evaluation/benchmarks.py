"""Benchmark folder layouts for `oars-fast eval`: which LR / HR files form the test pairs, and the
protocol's centre crop. The user brings the files; nothing is downloaded.

Every layout is scanned recursively for images (png, jpg, webp, bmp, tiff); LR and HR files are paired
by file stem, first exactly, then after removing the usual suffixes (``_LR4``, ``_HR``, ``_x4``, ``_x1``,
``x4``, ``_lq``, ``_gt``: ``Canon_001_LR4`` pairs with ``Canon_001_HR``, ``0801x4`` with ``0801``). An
image's name in the results is its LR file stem.

``folders`` (``eval.lr_dir``, optional ``eval.hr_dir``)::

    <lr_dir>/<name>.png        LR inputs (any layout below it)
    <hr_dir>/<name>.png        ground truths, scale x the LR size (optional)

    whole images, unless eval.crop is set.

``realsr``: RealSR (Cai et al., ICCV 2019), version 3, x4, either as released::

    <root>/Canon/Test/4/Canon_001_HR.png   Canon_001_LR4.png   ...
    <root>/Nikon/Test/4/Nikon_001_HR.png   Nikon_001_LR4.png   ...
    (files under a Train/ folder are ignored when Test/ folders exist)

  or as the prepared test crops that generative-SR papers evaluate on (StableSR, SeeSR, OSEDiff)::

    <root>/test_LR/<name>.png + <root>/test_HR/<name>.png   (also LR/ + HR/, lq/ + gt/, at most one level down)

  protocol: centre crop, LR 128 / HR 512 (a prepared 128 / 512 set is left as it is). The released LR is
  registered on the HR's pixel grid (same size); such an LR is first downsampled x scale (antialiased
  bicubic), so that the model sees an LR of 1/scale the HR size.

``drealsr``: DRealSR (Wei et al., ECCV 2020), x4 test set::

    <root>/Test_x4/test_LR/<name>_x4.png + <root>/Test_x4/test_HR/<name>_x1.png   (or test_LR/ + test_HR/ at
    the root; also the prepared crops, as for RealSR)

  protocol: centre crop, LR 128 / HR 512.

``div2k_val``: DIV2K validation, synthetic degradation, either as prepared pairs (StableSR's DIV2K-Val:
LR 128 / HR 512 crops made with the Real-ESRGAN chain)::

    <root>/lq/<name>.png + <root>/gt/<name>.png   (also test_LR/ + test_HR/, LR/ + HR/)

  or from the 100 HR images alone::

    <root>/DIV2K_valid_HR/0801.png ... 0900.png   (or the HR files directly in <root>)

  protocol: centre crop HR 512, LR 128 made by the Real-ESRGAN second-order chain (``degradation``; x4plus
  defaults) with seed (``eval.degrade_seed``, image index): the same LR on every machine, written once to
  ``<run>/eval/inputs/`` so that other methods can be run on exactly these inputs.

``realset``: real low-quality inputs without ground truth (RealSet65, RealSet80, RealLQ250, your own)::

    <root>/<name>.png

  whole images; full-reference metrics are skipped (no ground truth).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from ..data.images import IMAGE_EXTENSIONS
from ..errors import MissingFileError, UserError

__all__ = ["PROTOCOL_CROP", "Benchmark", "EvalPair", "find_benchmark", "match_by_stem", "pair_key"]

PROTOCOL_CROP = {"folders": 0, "realsr": 512, "drealsr": 512, "div2k_val": 512, "realset": 0}
"""The protocol's centre crop (HR side; 0: whole images) of each layout."""

_LR_DIRS = ("test_lr", "lr", "lq", "test_lq")
_HR_DIRS = ("test_hr", "hr", "gt", "test_gt")
_SUFFIX = re.compile(r"(?:[_-](?:lr|hr|lq|gt)\d*|[_-]?x\d+)$", re.IGNORECASE)
_SR_SUFFIX = re.compile(r"(?:[_-](?:lr|hr|lq|gt|sr|out|output|rlt|result)\d*|[_-]?x\d+)$", re.IGNORECASE)


@dataclass(frozen=True)
class EvalPair:
    """One test image: its name (the LR file stem), the LR file, the HR file (None: no ground truth), or
    ``lr=None`` and an HR when the LR is to be synthesised (div2k_val from HR only)."""

    name: str
    lr: Path | None
    hr: Path | None


@dataclass(frozen=True)
class Benchmark:
    kind: str
    layout: str  # the layout found, in words (logged and written to metrics.json)
    pairs: list[EvalPair]
    crop: int  # the protocol's HR crop side (0: whole images)

    @property
    def has_hr(self) -> bool:
        return all(p.hr is not None for p in self.pairs)

    @property
    def synthetic(self) -> bool:
        return any(p.lr is None for p in self.pairs)


def pair_key(stem: str, sr: bool = False) -> str:
    """`stem` without the usual LR / HR / scale suffixes, lower-case (`sr`: also ``_sr``, ``_out``, ...)."""
    pattern = _SR_SUFFIX if sr else _SUFFIX
    key, prev = stem, None
    while key != prev:
        prev, key = key, pattern.sub("", key)
    return (key or stem).lower()


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
                  and not any(part.startswith(".") for part in p.relative_to(folder).parts))


def _dir(path: str | Path | None, what: str) -> Path:
    if not path:
        raise UserError(f"{what} is not set: the folder of the inputs (layouts: oars_fast/evaluation/benchmarks.py)")
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise MissingFileError(f"{what}={folder} does not exist or is not a folder")
    return folder


def match_by_stem(names: list[str], files: list[Path], sr: bool = False) -> dict[str, Path]:
    """For each name, the file of `files` with that stem, else the one whose :func:`pair_key` equals the
    name's (when exactly one does). Names without a match are left out."""
    exact = {f.stem: f for f in files}
    by_key: dict[str, list[Path]] = {}
    for f in files:
        by_key.setdefault(pair_key(f.stem, sr), []).append(f)
    out = {}
    for n in names:
        if n in exact:
            out[n] = exact[n]
        else:
            cands = by_key.get(pair_key(n, sr), [])
            if len(cands) == 1:
                out[n] = cands[0]
    return out


def _pairs(lr_files: list[Path], hr_files: list[Path] | None, where: str) -> list[EvalPair]:
    names = [f.stem for f in lr_files]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise UserError(f"{where}: several LR files share the stem(s) {dup[:5]}; names must be unique")
    if hr_files is None:
        return [EvalPair(f.stem, f, None) for f in lr_files]
    hr = match_by_stem(names, hr_files)
    missing = [n for n in names if n not in hr]
    if missing:
        raise MissingFileError(f"{where}: no ground truth matches the LR file(s) {missing[:5]}"
                               f"{' ...' if len(missing) > 5 else ''} ({len(missing)} of {len(names)}); files are "
                               f"paired by stem (suffixes like _LR4 / _HR / _x4 ignored)")
    return [EvalPair(f.stem, f, hr[f.stem]) for f in lr_files]


def _folder_pair(root: Path) -> tuple[Path, Path] | None:
    """(LR folder, HR folder): sibling folders with LR-like and HR-like names at `root` or one level below."""
    for base in [root, *sorted(p for p in root.iterdir() if p.is_dir())]:
        subs = {p.name.lower(): p for p in base.iterdir() if p.is_dir()}
        lr = next((subs[n] for n in _LR_DIRS if n in subs), None)
        hr = next((subs[n] for n in _HR_DIRS if n in subs), None)
        if lr is not None and hr is not None:
            return lr, hr
    return None


def _realsr_release(root: Path, scale: int) -> list[EvalPair] | None:
    lr_files = [f for f in _images(root) if re.search(rf"_LR{scale}$", f.stem, re.IGNORECASE)]
    tests = [f for f in lr_files if "test" in (p.lower() for p in f.relative_to(root).parts[:-1])]
    lr_files = tests or lr_files
    if not lr_files:
        return None
    pairs = []
    for f in lr_files:
        base = re.sub(rf"_LR{scale}$", "", f.stem, flags=re.IGNORECASE)
        hr = next((f.with_name(base + s + f.suffix) for s in ("_HR", "_hr") if f.with_name(base + s + f.suffix)
                   .is_file()), None)
        if hr is None:
            raise MissingFileError(f"RealSR layout: {f} has no {base}_HR{f.suffix} beside it")
        pairs.append(EvalPair(f.stem, f, hr))
    return pairs


def find_benchmark(kind: str, root: str | Path | None = None, lr_dir: str | Path | None = None,
                   hr_dir: str | Path | None = None, scale: int = 4) -> Benchmark:
    """The pairs of layout `kind` (see the module docstring); a missing or unrecognised folder raises a
    :class:`~oars_fast.errors.UserError` naming the expected layout."""
    if kind == "folders":
        lr = _dir(lr_dir, "eval.lr_dir")
        lr_files = _images(lr)
        if not lr_files:
            raise MissingFileError(f"eval.lr_dir={lr} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
        hr_files = None
        if hr_dir:
            hr = _dir(hr_dir, "eval.hr_dir")
            hr_files = _images(hr)
        return Benchmark(kind, f"LR {lr}" + (f", HR {hr_dir}" if hr_dir else ", no ground truth"),
                         _pairs(lr_files, hr_files, "eval.lr_dir / eval.hr_dir"), PROTOCOL_CROP[kind])
    base = _dir(root, f"eval.root (benchmark={kind})")
    if kind == "realset":
        files = _images(base)
        if not files:
            raise MissingFileError(f"benchmark=realset: {base} holds no images; expected <root>/<name>.png")
        return Benchmark(kind, f"LQ images in {base}, no ground truth", _pairs(files, None, str(base)),
                         PROTOCOL_CROP[kind])
    found = _folder_pair(base)
    if found is not None:
        lr, hr = found
        return Benchmark(kind, f"prepared pairs {lr} + {hr}", _pairs(_images(lr), _images(hr), str(base)),
                         PROTOCOL_CROP[kind])
    if kind == "realsr":
        pairs = _realsr_release(base, scale)
        if pairs:
            return Benchmark(kind, f"RealSR release under {base} (*_LR{scale} + *_HR)", pairs, PROTOCOL_CROP[kind])
        raise MissingFileError(f"benchmark=realsr: {base} holds neither <camera>/Test/{scale}/*_LR{scale}.png + "
                               "*_HR.png (the release) nor test_LR/ + test_HR/ (prepared crops)")
    if kind == "div2k_val":
        hr_root = next((p for p in base.iterdir() if p.is_dir() and p.name.lower() == "div2k_valid_hr"), base)
        files = _images(hr_root)
        if files:
            return Benchmark(kind, f"HR only in {hr_root}: LR synthesised (Real-ESRGAN chain)",
                             [EvalPair(f.stem, None, f) for f in files], PROTOCOL_CROP[kind])
        raise MissingFileError(f"benchmark=div2k_val: {base} holds neither lq/ + gt/ (prepared pairs) nor HR "
                               "images (DIV2K_valid_HR/0801.png ...)")
    raise MissingFileError(f"benchmark={kind}: {base} holds no test_LR/ + test_HR/ folders (e.g. "
                           f"{base}/Test_x4/test_LR/<name>_x4.png + test_HR/<name>_x1.png)")
