"""Matching detections to tracks: mask IoU, Hungarian assignment, and where a track is expected next."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import Tensor


def mask_iou(a: Tensor, b: Tensor) -> Tensor:
    """IoU of every pair of (N, H, W) and (M, H, W) bool masks -> (N, M) float."""
    if len(a) == 0 or len(b) == 0:
        return torch.zeros(len(a), len(b))
    a, b = a.flatten(1).float(), b.flatten(1).float()
    inter = a @ b.T
    union = a.sum(1)[:, None] + b.sum(1)[None] - inter
    return torch.where(union > 0, inter / union.clamp(min=1), torch.zeros_like(inter))


def centre_proximity(a: Tensor, b: Tensor, scale: float = 1.0, margin: Tensor | float = 0.0) -> Tensor:
    """How close the centres of every pair of (N, H, W) and (M, H, W) bool masks are, relative to their
    sizes: 1 - distance / (scale * (r_a + r_b) + margin) clipped at 0, r the radius of a disc of the mask's
    area, ``margin`` pixels (a number or one per row of ``a``) -> (N, M).

    Unlike IoU it stays informative when a weak detector's masks swell or shrink from frame to frame.
    """
    if len(a) == 0 or len(b) == 0:
        return torch.zeros(len(a), len(b))

    def centres_and_radii(masks: Tensor) -> tuple[Tensor, Tensor]:
        h, w = masks.shape[-2:]
        weights = masks.flatten(1).float()
        area = weights.sum(1).clamp(min=1)
        ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32),
                                indexing="ij")
        centre = torch.stack([weights @ ys.flatten(), weights @ xs.flatten()], 1) / area[:, None]
        return centre, (area / torch.pi).sqrt()

    (ca, ra), (cb, rb) = centres_and_radii(a), centres_and_radii(b)
    margin = torch.as_tensor(margin, dtype=torch.float32).reshape(-1, 1)
    proximity = (1 - torch.cdist(ca, cb) / (scale * (ra[:, None] + rb[None]) + margin)).clamp(min=0)
    empty = (a.flatten(1).sum(1) == 0)[:, None] | (b.flatten(1).sum(1) == 0)[None]
    return proximity.masked_fill(empty, 0.0)


def assign(iou: Tensor, min_iou: float) -> list[tuple[int, int]]:
    """Row-column pairs of the assignment maximising total IoU (Hungarian), pairs under ``min_iou`` dropped."""
    if iou.numel() == 0:
        return []
    rows, cols = linear_sum_assignment(iou.numpy(), maximize=True)
    return [(int(r), int(c)) for r, c in zip(rows, cols, strict=True) if iou[r, c] >= min_iou]


def shift_mask(mask: Tensor, dy: float, dx: float) -> Tensor:
    """An (H, W) mask moved by (dy, dx) pixels (rounded), what leaves the frame dropped."""
    dy, dx = int(round(dy)), int(round(dx))
    h, w = mask.shape
    out = torch.zeros_like(mask)
    if abs(dy) >= h or abs(dx) >= w:
        return out
    src = mask[max(0, -dy):h - max(0, dy), max(0, -dx):w - max(0, dx)]
    out[max(0, dy):max(0, dy) + src.shape[0], max(0, dx):max(0, dx) + src.shape[1]] = src
    return out


def dilate(mask: Tensor, radius: int) -> Tensor:
    """An (H, W) bool mask grown by ``radius`` pixels (a square structuring element)."""
    if radius <= 0:
        return mask
    grown = F.max_pool2d(mask[None, None].float(), kernel_size=2 * radius + 1, stride=1, padding=radius)
    return grown[0, 0] > 0


def centroid(mask: Tensor) -> np.ndarray | None:
    """(y, x) centre of mass of a bool mask; ``None`` when empty."""
    ys, xs = torch.nonzero(mask, as_tuple=True)
    if len(ys) == 0:
        return None
    return np.array([ys.float().mean().item(), xs.float().mean().item()])
