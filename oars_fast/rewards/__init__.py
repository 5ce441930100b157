"""Rewards: the RewardFn protocol, DISTS (FR), COMPASS (NR, :mod:`.compass`), classical stand-ins."""
import importlib

from ..errors import MissingFileError
from .base import RewardFn
from .classical import LRConsistencyReward, SSIMReward, ssim
from .dists import DISTS, DISTSReward

__all__ = ["RewardFn", "DISTSReward", "SSIMReward", "LRConsistencyReward", "ssim", "build_reward"]


def build_reward(cfg, device):
    """The RewardFn named by a RewardConfig."""
    if cfg.name == "dists":
        if not cfg.dists_vgg or not cfg.dists_weights:
            raise MissingFileError("reward.name=dists needs reward.dists_vgg (VGG16 weights in torchvision's layout) "
                                    "and reward.dists_weights (DISTS alpha/beta weights.pt)")
        return DISTSReward(DISTS(cfg.dists_vgg, cfg.dists_weights).to(device), cfg.batch_size)
    if cfg.name == "compass":
        if not cfg.compass:
            raise MissingFileError("reward.name=compass needs reward.compass=<COMPASS folder> (oars-fast compass-sft "
                                   "writes one to <run>/model)")
        from .compass import CompassReward  # heavy (transformers VL model): only when COMPASS is the reward

        return CompassReward.from_pretrained(cfg.compass, device, variant=cfg.compass_variant, gamma=cfg.compass_gamma,
                                             batch_size=cfg.batch_size)
    if cfg.name == "custom":
        module, attr = cfg.custom.split(":", 1)
        return getattr(importlib.import_module(module), attr)(device)
    if cfg.name == "ssim":
        return SSIMReward()
    return LRConsistencyReward(cfg.tau)
