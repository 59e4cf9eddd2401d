"""Lightning modules: the shared task skeleton, the grounding task and SAM3 -> student distillation, and
reading their checkpoints back (``checkpoint``: the trained model, a trained or official teacher)."""

from sambridge.modules.base import BaseTask
from sambridge.modules.checkpoint import load_teacher
from sambridge.modules.distill import DistillModule
from sambridge.modules.grounding import GroundingLossWeights, GroundingModule, PredictSettings

__all__ = ["BaseTask", "DistillModule", "GroundingLossWeights", "GroundingModule", "PredictSettings", "load_teacher"]
