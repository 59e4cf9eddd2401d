"""Mask overlaps for the metrics, from COCO RLEs (pycocotools) or from boolean tensors.

Both routes give bit-identical IoUs: pycocotools divides integer intersection by integer union
in double precision, and so do we (pixel counts from a float matmul are exact integers while a
mask has at most 2**24 pixels; larger masks are counted in float64). An IoU with an empty union
is 0, as in pycocotools.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from pycocotools import mask as mask_utils
from torch import Tensor

from data_pipelines.schema import encode_mask

_EXACT_FLOAT32_PIXELS = 2**24
_CHUNK_ELEMENTS = 2**25  # masks x pixels per matmul operand (128 MiB of float32)


def _iou_from_counts(inter: np.ndarray, area_a: np.ndarray, area_b: np.ndarray) -> np.ndarray:
    union = area_a[:, None] + area_b[None, :] - inter
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, inter / union, 0.0)


def intersections(a: Tensor, b: Tensor) -> np.ndarray:
    """(K, N) int64 pixel counts of ``a[k] & b[n]`` for boolean masks (K, H, W) and (N, H, W)."""
    k, n = a.shape[0], b.shape[0]
    if k == 0 or n == 0:
        return np.zeros((k, n), dtype=np.int64)
    pixels = a[0].numel()
    dtype = torch.float32 if pixels <= _EXACT_FLOAT32_PIXELS else torch.float64
    step = max(1, _CHUNK_ELEMENTS // pixels)
    out = np.empty((k, n), dtype=np.int64)
    for j in range(0, n, step):
        b_chunk = b[j:j + step].reshape(-1, pixels).to(dtype)
        for i in range(0, k, step):
            counts = a[i:i + step].reshape(-1, pixels).to(dtype) @ b_chunk.T
            out[i:i + step, j:j + step] = counts.round().to(torch.int64).cpu().numpy()
    return out


def mask_ious(pred: Tensor, gt: Tensor) -> np.ndarray:
    """(K, N) float64 IoU between boolean masks ``pred`` (K, H, W) and ``gt`` (N, H, W)."""
    inter = intersections(pred, gt)
    area_p = pred.sum((1, 2)).cpu().numpy().astype(np.int64)
    area_g = gt.sum((1, 2)).cpu().numpy().astype(np.int64)
    return _iou_from_counts(inter, area_p, area_g)


def union_overlap(pred: Tensor, gt: Tensor) -> tuple[int, int]:
    """(intersection, union) pixel counts of the union of ``pred`` masks and the union of ``gt`` masks."""
    p, g = pred.any(0), gt.any(0)
    return int((p & g).sum()), int((p | g).sum())


def rle_ious(dt: list[dict[str, Any]], gt: list[dict[str, Any]], crowd: bool = False) -> np.ndarray:
    """(D, G) float64 IoU between compressed RLEs, via ``pycocotools.mask.iou``.

    With ``crowd``, ``gt`` are crowd regions and the overlap is intersection over the ``dt`` area.
    """
    if not dt or not gt:
        return np.zeros((len(dt), len(gt)))
    ious = mask_utils.iou(dt, gt, [int(crowd)] * len(gt))
    return np.asarray(ious, dtype=np.float64).reshape(len(dt), len(gt))


def rle_union_overlap(dt: list[dict[str, Any]], gt: list[dict[str, Any]]) -> tuple[int, int]:
    """(intersection, union) pixel counts of the merged ``dt`` RLEs and the merged ``gt`` RLEs."""
    if not dt and not gt:
        return 0, 0
    if not dt or not gt:
        return 0, int(mask_utils.area(mask_utils.merge(dt or gt, intersect=False)))
    pred_union = mask_utils.merge(dt, intersect=False)
    gt_union = mask_utils.merge(gt, intersect=False)
    inter = mask_utils.area(mask_utils.merge([pred_union, gt_union], intersect=True))
    union = mask_utils.area(mask_utils.merge([pred_union, gt_union], intersect=False))
    return int(inter), int(union)


def encode_masks(masks: Tensor | np.ndarray) -> list[dict[str, Any]]:
    """(K, H, W) boolean masks -> K compressed COCO RLEs with ``counts`` as str (JSON-safe)."""
    array = masks.detach().cpu().numpy() if isinstance(masks, Tensor) else np.asarray(masks)
    return [encode_mask(m) for m in array.astype(bool)]
