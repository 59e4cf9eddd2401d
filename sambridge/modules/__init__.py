"""Lightning modules: the shared task skeleton, the grounding task and SAM3 -> student distillation."""

from sambridge.modules.base import BaseTask
from sambridge.modules.distill import DistillModule
from sambridge.modules.grounding import GroundingLossWeights, GroundingModule, PredictSettings

__all__ = ["BaseTask", "DistillModule", "GroundingLossWeights", "GroundingModule", "PredictSettings"]
