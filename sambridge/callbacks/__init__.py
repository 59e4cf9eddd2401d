"""Lightning callbacks: prediction files and overlays, evaluation reports."""

from sambridge.callbacks.predictions import PredictionWriter
from sambridge.callbacks.report import EvaluationReport

__all__ = ["EvaluationReport", "PredictionWriter"]
