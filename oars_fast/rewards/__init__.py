"""Rewards: the RewardFn protocol, the full-reference DISTS reward, (later) COMPASS."""
from .base import DISTSReward, RewardFn

__all__ = ["RewardFn", "DISTSReward"]
