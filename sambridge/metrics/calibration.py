"""Score calibration: how often a detection of a given score is right (reliability diagram, ECE).

A detection is *right* when it matches a ground-truth instance at IoU >= 0.5 (COCOeval's greedy rule,
the records mask AP is computed from). A calibrated model's detections scoring about 0.7 are right
about 70% of the time; SAM3's 0.5 score threshold is only meaningful for a calibrated model.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: Equal-width score bins of the reliability diagram.
DEFAULT_BINS = 10


@dataclass
class Calibration:
    """Reliability of detection scores, per equal-width score bin.

    Attributes:
        edges: (B + 1,) bin edges over [0, 1].
        count: (B,) detections per bin.
        mean_score: (B,) mean score in each bin (NaN where empty).
        precision: (B,) fraction right (IoU >= 0.5 match) in each bin (NaN where empty).
        ece: expected calibration error: sum over bins of count share x |precision - mean score|.
    """

    edges: np.ndarray
    count: np.ndarray
    mean_score: np.ndarray
    precision: np.ndarray
    ece: float


def calibration(scores: np.ndarray, right: np.ndarray, bins: int = DEFAULT_BINS) -> Calibration:
    """Reliability diagram data of detections with ``scores`` of which ``right`` matched an instance.

    Args:
        scores: (D,) detection scores in [0, 1].
        right: (D,) bool, the detection matched an instance at IoU >= 0.5.
        bins: equal-width score bins.
    """
    scores, right = np.asarray(scores, dtype=np.float64), np.asarray(right, dtype=bool)
    if scores.shape != right.shape or scores.ndim != 1:
        raise ValueError(f"expected scores (D,) and right (D,), got {scores.shape} and {right.shape}")
    edges = np.linspace(0.0, 1.0, bins + 1)
    index = np.clip(np.searchsorted(edges, scores, side="right") - 1, 0, bins - 1)
    count = np.bincount(index, minlength=bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_score = np.bincount(index, weights=scores, minlength=bins) / count
        precision = np.bincount(index, weights=right.astype(np.float64), minlength=bins) / count
    filled = count > 0
    ece = float((count[filled] * np.abs(precision[filled] - mean_score[filled])).sum() / max(count.sum(), 1))
    return Calibration(edges=edges, count=count, mean_score=mean_score, precision=precision, ece=ece)
