"""Image files: scanning folders, decoding to float tensors, writing results."""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

from ..errors import MissingFileError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")


class ImageReadError(RuntimeError):
    """A file could not be decoded as an image; the message names the file and the cause."""


def scan_images(folder: str | Path, recursive: bool = True) -> list[Path]:
    """All image files under `folder`, sorted. Raises with the folder named if it is missing or empty."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise MissingFileError(f"image folder {folder} does not exist or is not a folder")
    pattern = "**/*" if recursive else "*"
    files = sorted(p for p in folder.glob(pattern) if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise MissingFileError(f"image folder {folder} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    return files


def load_image(path: str | Path) -> torch.Tensor:
    """Decode `path` to a float32 tensor (3, H, W) in [0, 1].

    Grayscale, palette, RGBA (alpha dropped) and 16-bit images are converted to RGB; the
    conversion is logged at debug level. Truncated or unreadable files raise
    :class:`ImageReadError`.
    """
    path = Path(path)
    try:
        with Image.open(path) as im:
            im.load()
            mode = im.mode
            if mode in ("I;16", "I;16B", "I;16L", "I"):
                arr = np.asarray(im, dtype=np.float32)
                peak = 65535.0 if mode.startswith("I;16") or arr.max() > 255 else 255.0
                arr = np.clip(arr / peak, 0.0, 1.0)
                arr = np.repeat(arr[..., None], 3, axis=2)
                log.debug("%s: %s image converted to RGB", path, mode)
            else:
                if mode != "RGB":
                    log.debug("%s: %s image converted to RGB", path, mode)
                    im = im.convert("RGB")
                arr = np.asarray(im, dtype=np.float32) / 255.0
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as e:
        raise ImageReadError(f"cannot read image {path}: {e}") from None
    if arr.ndim != 3 or arr.shape[0] < 1 or arr.shape[1] < 1:
        raise ImageReadError(f"cannot read image {path}: unexpected shape {arr.shape}")
    return torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1).contiguous()


def to_uint8(img: torch.Tensor) -> np.ndarray:
    """(3, H, W) float in [0, 1] -> (H, W, 3) uint8."""
    return (img.detach().float().clamp(0, 1).mul(255).round().byte().permute(1, 2, 0).cpu().numpy())


def save_image(img: torch.Tensor, path: str | Path) -> None:
    """Write a (3, H, W) float image atomically (temp file, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    Image.fromarray(to_uint8(img)).save(tmp, format=_format_of(path))
    tmp.replace(path)


def _format_of(path: Path) -> str:
    ext = path.suffix.lower()
    return {".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP", ".bmp": "BMP", ".tif": "TIFF",
            ".tiff": "TIFF"}.get(ext, "PNG")


def make_grid(rows: list[list[torch.Tensor]], pad: int = 2) -> torch.Tensor:
    """Tile images (3, h, w) into one (3, H, W) grid; each is resized (nearest) to the row's largest."""
    h = max(im.shape[-2] for row in rows for im in row)
    w = max(im.shape[-1] for row in rows for im in row)
    ncol = max(len(r) for r in rows)
    grid = torch.ones(3, len(rows) * (h + pad) + pad, ncol * (w + pad) + pad)
    for i, row in enumerate(rows):
        for j, im in enumerate(row):
            im = im.detach().float().cpu().clamp(0, 1)
            if im.shape[-2:] != (h, w):
                im = F.interpolate(im[None], size=(h, w), mode="nearest")[0]
            y, x = pad + i * (h + pad), pad + j * (w + pad)
            grid[:, y:y + h, x:x + w] = im
    return grid
