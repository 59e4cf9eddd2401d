"""Training losses."""

from sambridge.losses.grounding import GroundingLoss

__all__ = ["GroundingLoss"]
