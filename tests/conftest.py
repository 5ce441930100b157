import os

import torch

# Triton kernels run through Triton's interpreter on CPU-only machines; this must be set before
# oars_fast.kernels is imported. On a GPU machine they compile for the GPU.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    np.random.seed(0)


def write_image(path: Path, h: int, w: int, mode: str = "RGB", seed: int = 0) -> Path:
    """A smooth random image (so that degradations have something to act on)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([np.sin(xx / (3 + c) + rng.random() * 6) * np.cos(yy / (4 + c)) for c in range(3)], -1)
    arr = ((base * 0.5 + 0.5) * 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    if mode == "L":
        Image.fromarray(arr[..., 0]).save(path)
    elif mode == "RGBA":
        Image.fromarray(np.concatenate([arr, np.full((h, w, 1), 128, np.uint8)], -1)).save(path)
    elif mode == "I;16":
        Image.fromarray(arr[..., 0].astype(np.uint16) * 257).save(path)
    else:
        Image.fromarray(arr).save(path)
    return path


@pytest.fixture
def image_dir(tmp_path):
    d = tmp_path / "hr"
    for i in range(6):
        write_image(d / f"img{i}.png", 80 + 8 * i, 96, seed=i)
    return d


@pytest.fixture(scope="session")
def demo_cache(tmp_path_factory):
    """One demo-set cache for the whole session."""
    return tmp_path_factory.mktemp("demo-cache")


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory, demo_cache):
    """A tiny model whose VAE was briefly trained as an autoencoder (random transformer), saved as a
    diffusers folder: decoded images mean something, so SR quality can be compared."""
    from oars_fast.config import DemoBaseJob, load_config
    from oars_fast.models.backbone import build_tiny
    from oars_fast.stages.demo_base import pretrain_vae

    out = tmp_path_factory.mktemp("tiny-base")
    job = load_config(DemoBaseJob, None, [f"data.demo_cache={demo_cache}", "vae.steps=150", "vae.crop_size=32",
                                      "model.tiny={num_layers: 1}"])
    model = build_tiny(job.model, seed=0)
    pretrain_vae(model, job, torch.device("cpu"))
    model.save_pretrained(out / "model")
    return out / "model"


def lr_reward_factory(device):
    """A RewardFn factory for `reward.name=custom` tests."""
    from oars_fast.rewards.classical import LRConsistencyReward

    return LRConsistencyReward(tau=0.1)


class BrightnessReward:
    """Mean intensity of the SR: a reward any working RL loop raises within a few iterations, whatever
    the base (a test stand-in: SSIM against a good base has too little room for a short CPU run)."""

    name = "brightness"

    def __call__(self, lr, sr, gt=None, group_index=None):
        s = sr.float().mean((1, 2, 3))
        return s, {"brightness": s}


def brightness_reward_factory(device):
    return BrightnessReward()


class SaturatingReward:
    """Groups whose LR is bright get a constant 0.95 (saturated: dropped by the filter), the others the
    SR's mean intensity: which groups survive depends on the data, so ranks keep unequal numbers of rows."""

    name = "saturating"

    def __call__(self, lr, sr, gt=None, group_index=None):
        bright = lr.float().mean((1, 2, 3)) > 0.45
        s = torch.where(bright, torch.full_like(bright, 0.95, dtype=torch.float32), sr.float().mean((1, 2, 3)))
        return s, {}


def saturating_reward_factory(device):
    return SaturatingReward()
