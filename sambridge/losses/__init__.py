"""Training losses."""

from sambridge.losses.grounding import GroundingLoss, GroundingLossWeights

__all__ = ["GroundingLoss", "GroundingLossWeights"]
