"""The embedded demo set: HR patches cut from photos that ship inside installed packages.

Sources: scikit-image's ``skimage.data`` colour photos and scikit-learn's sample images. The
patches are written once to a cache folder (atomically: a temporary folder renamed when
complete) and reused; every 8th patch goes to ``val/`` (held out), the rest to ``train/``.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

log = logging.getLogger(__name__)

_SKIMAGE_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry")
_VERSION = 1


def demo_photos() -> dict[str, np.ndarray]:
    """The bundled colour photos as (H, W, 3) uint8 arrays, by name."""
    import skimage.data  # heavy and only needed for the demo set: imported when it is built
    from sklearn.datasets import load_sample_images

    photos = {name: getattr(skimage.data, name)() for name in _SKIMAGE_PHOTOS}
    photos["motorcycle"] = skimage.data.stereo_motorcycle()[0]
    sk = load_sample_images()
    for fname, img in zip(sk.filenames, sk.images):
        photos[Path(fname).stem] = img
    return {k: np.ascontiguousarray(v[..., :3]) for k, v in photos.items()}


def _valid(manifest: Path) -> bool:
    try:
        return json.loads(manifest.read_text()).get("version") == _VERSION
    except (OSError, ValueError):
        return False


def demo_dataset_dir(cache: str | Path, patch: int = 128) -> Path:
    """Folder with ``train/`` and ``val/`` HR patches of side `patch`, built on first call."""
    root = Path(cache).expanduser() / f"patches{patch}"
    manifest = root / "manifest.json"
    if _valid(manifest):
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = root.with_name(f"{root.name}.tmp{os.getpid()}")  # per process: ranks may build it at once
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "train").mkdir(parents=True)
    (tmp / "val").mkdir()
    counts = {"train": 0, "val": 0}
    k = 0
    for name, img in sorted(demo_photos().items()):
        h, w = img.shape[:2]
        for y in range(0, h - patch + 1, patch):
            for x in range(0, w - patch + 1, patch):
                split = "val" if k % 8 == 7 else "train"
                Image.fromarray(img[y:y + patch, x:x + patch]).save(tmp / split / f"{name}_{y:04d}_{x:04d}.png")
                counts[split] += 1
                k += 1
    (tmp / "manifest.json").write_text(json.dumps({"version": _VERSION, "patch": patch, **counts}))
    if _valid(manifest):  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)
        return root
    shutil.rmtree(root, ignore_errors=True)
    try:
        tmp.rename(root)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not _valid(manifest):
            raise
        return root
    log.info("demo set written to %s: %d train / %d val patches of %dpx", root, counts["train"], counts["val"], patch)
    return root
