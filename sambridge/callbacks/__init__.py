"""Lightning callbacks: prediction files and overlays, evaluation reports, run-directory checkpoints."""

from sambridge.callbacks.checkpoint import RunCheckpoint
from sambridge.callbacks.predictions import PredictionWriter
from sambridge.callbacks.report import EvaluationReport

__all__ = ["EvaluationReport", "PredictionWriter", "RunCheckpoint"]
