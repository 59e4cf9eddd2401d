"""Instances as connected components of a phrase's semantic mask (bottom-up grounding outputs).

Each (image, phrase) query's semantic probability map is thresholded and split into 8-connected
components (``scipy.ndimage.label``); a component is one detection whose score is its mean probability
times the phrase's presence probability (SAM3's score x presence). This is the learned form of the
classic "threshold a colour, take the blobs" baseline: exact where instances do not touch, one
detection for a touching cluster.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy import ndimage
from torch import Tensor

EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


def _query_components(prob: np.ndarray, threshold: float, min_area: int) -> tuple[list[float], list[np.ndarray]]:
    """Mean probability and mask of every component of ``prob >= threshold`` with at least ``min_area`` pixels."""
    labels, count = ndimage.label(prob >= threshold, structure=EIGHT_CONNECTED)
    if count == 0:
        return [], []
    index = np.arange(1, count + 1)
    areas = ndimage.sum_labels(np.ones_like(prob), labels, index)
    means = ndimage.mean(prob, labels, index)
    kept = [(float(m), i) for m, a, i in zip(means, areas, index, strict=True) if a >= min_area]
    return [m for m, _ in kept], [labels == i for _, i in kept]


def _box(mask: np.ndarray) -> list[float]:
    """Normalised xyxy box around a mask's pixels (pixel edges, so a one-pixel mask has a non-empty box)."""
    rows, cols = np.any(mask, 1).nonzero()[0], np.any(mask, 0).nonzero()[0]
    h, w = mask.shape
    return [cols[0] / w, rows[0] / h, (cols[-1] + 1) / w, (rows[-1] + 1) / h]


@torch.no_grad()
def semantic_components(
    semantic_logits: Tensor,
    presence: Tensor,
    top_k: int,
    out_hw: tuple[int, int],
    threshold: float = 0.5,
    min_area_fraction: float = 5e-4,
) -> dict[str, Tensor]:
    """The ``top_k`` highest-scoring components of each query's semantic mask.

    Args:
        semantic_logits: (Q, 1, h, w) semantic-mask logits (upsampled bilinearly to ``out_hw``).
        presence: (Q,) presence probability of each query's phrase.
        top_k: Components kept per query (K), the best first; missing ones are empty, score 0.
        out_hw: Size of the output masks (and of the map that is split).
        threshold: Probability at which a pixel belongs to the phrase.
        min_area_fraction: Components smaller than this fraction of the output area are dropped.

    Returns:
        ``scores`` (Q, K), ``boxes_xyxy`` (Q, K, 4) normalised, ``masks`` (Q, K, H, W) bool.
    """
    device, (h, w) = semantic_logits.device, out_hw
    prob = torch.nn.functional.interpolate(semantic_logits.float(), size=out_hw, mode="bilinear",
                                           align_corners=False)[:, 0].sigmoid().cpu().numpy()
    q = len(prob)
    scores, boxes = np.zeros((q, top_k), np.float32), np.zeros((q, top_k, 4), np.float32)
    masks = np.zeros((q, top_k, h, w), dtype=bool)
    min_area = max(1, round(min_area_fraction * h * w))
    for row, p in enumerate(prob):
        means, parts = _query_components(p, threshold, min_area)
        for k, i in enumerate(np.argsort(means)[::-1][:top_k]):
            scores[row, k], masks[row, k], boxes[row, k] = means[i], parts[i], _box(parts[i])
    scores_t = torch.from_numpy(scores).to(device) * presence.float()[:, None]
    return {"scores": scores_t, "boxes_xyxy": torch.from_numpy(boxes).to(device),
            "masks": torch.from_numpy(masks).to(device)}
