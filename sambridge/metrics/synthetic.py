"""Seeded synthetic SA-Co ground truth and predictions: for tests, benchmarks and trying the evaluator.

Each image carries a few phrases; each (image, phrase) query is a negative (no instances), an
ordinary scene (1-6 instances) or a crowded one (15-40 small, overlapping instances). Some
queries are not instance-exhaustive, some have a crowd region (uncompressed RLE, as COCO writes
them). Predictions are jittered copies of the instances (some missed, some duplicated) plus
false positives, with continuous random scores and tight boxes (SAM3's oracle evaluation fails
on predictions without ``bbox``); some queries get no predictions at all.
Several ground-truth versions of the same queries (SA-Co/Gold has three) can be drawn for
SAM3's oracle evaluation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from data_pipelines.schema import rle_bbox
from sambridge.metrics.masks import encode_masks
from sambridge.metrics.saco import SACO_CATEGORY

PHRASES = ("apple", "ripe apple", "green leaf", "weed", "pear", "tractor", "person", "fence post",
           "strawberry", "sheep", "bird", "wheel")


@dataclass
class SyntheticSaco:
    """Synthetic evaluation data.

    Attributes:
        ground_truths: versions of the same SA-Co ground truth (same ``images``; the first is the main one).
        predictions: COCO results for the queries.
    """

    ground_truths: list[dict[str, Any]]
    predictions: list[dict[str, Any]]


class _Canvas:
    def __init__(self, height: int, width: int) -> None:
        self.height, self.width = height, width
        self.yy, self.xx = np.mgrid[0:height, 0:width]

    def ellipse(self, cy: float, cx: float, ry: float, rx: float) -> np.ndarray:
        mask = ((self.yy - cy) / ry) ** 2 + ((self.xx - cx) / rx) ** 2 <= 1.0
        if not mask.any():  # keep every instance non-empty
            mask[int(np.clip(cy, 0, self.height - 1)), int(np.clip(cx, 0, self.width - 1))] = True
        return mask

    def random_shape(self, rng: np.random.Generator, scale: float) -> tuple[float, float, float, float]:
        return (rng.uniform(0, self.height), rng.uniform(0, self.width),
                rng.uniform(1.5, max(2.0, scale * self.height)),
                rng.uniform(1.5, max(2.0, scale * self.width)))


def _jitter(rng: np.random.Generator, shape: tuple[float, float, float, float], amount: float):
    cy, cx, ry, rx = shape
    return (cy + rng.normal(0, amount), cx + rng.normal(0, amount),
            max(1.0, ry * rng.uniform(1 - 0.1 * amount, 1 + 0.1 * amount)),
            max(1.0, rx * rng.uniform(1 - 0.1 * amount, 1 + 0.1 * amount)))


def make_synthetic_saco(num_queries: int, *, seed: int = 0, phrases_per_image: int = 3,
                        negative_fraction: float = 0.3, crowded_fraction: float = 0.1,
                        non_exhaustive_fraction: float = 0.1, crowd_region_fraction: float = 0.05,
                        no_prediction_fraction: float = 0.1, gt_versions: int = 1,
                        sizes: tuple[tuple[int, int], ...] = ((48, 64), (64, 80))) -> SyntheticSaco:
    """Draw ``num_queries`` synthetic SA-Co queries with predictions (see the module docstring).

    Args:
        num_queries: (image, phrase) pairs to draw.
        seed: random seed; the same arguments give the same data.
        phrases_per_image: queries that share one image.
        negative_fraction: share of queries without instances.
        crowded_fraction: share of crowded queries (15-40 instances).
        non_exhaustive_fraction: share of queries marked not instance-exhaustive.
        crowd_region_fraction: share of queries with an extra ``iscrowd`` annotation.
        no_prediction_fraction: share of queries without any prediction.
        gt_versions: ground-truth versions to draw (more than one for oracle evaluation).
        sizes: image sizes (height, width) to choose from.
    """
    rng = np.random.default_rng(seed)
    canvases = {hw: _Canvas(*hw) for hw in sizes}
    images: list[dict[str, Any]] = []
    annotations: list[list[dict[str, Any]]] = [[] for _ in range(gt_versions)]
    exhaustive_flags: list[list[int]] = [[] for _ in range(gt_versions)]
    predictions: list[dict[str, Any]] = []

    for q in range(num_queries):
        image_index = q // phrases_per_image
        height, width = sizes[image_index % len(sizes)]
        canvas = canvases[(height, width)]
        phrase = PHRASES[(image_index * 7 + q % phrases_per_image) % len(PHRASES)]
        query_id = 1000 + q
        images.append({"id": query_id, "file_name": f"image_{image_index:06d}.png", "height": height,
                       "width": width, "text_input": phrase})
        kind = rng.uniform()
        if kind < negative_fraction:
            shapes = []
        elif kind < negative_fraction + crowded_fraction:
            shapes = [canvas.random_shape(rng, 0.1) for _ in range(rng.integers(15, 41))]
        else:
            shapes = [canvas.random_shape(rng, 0.3) for _ in range(rng.integers(1, 7))]
        exhaustive = int(rng.uniform() >= non_exhaustive_fraction)
        crowd_region = None
        if rng.uniform() < crowd_region_fraction:
            region = np.zeros((height, width), dtype=bool)
            region[: height // 3, : width // 2] = True
            crowd_region = {"size": [height, width], "counts": _runs(region)}

        for v in range(gt_versions):
            version_shapes = shapes if v == 0 else [
                _jitter(rng, s, 0.7) if rng.uniform() < 0.4 else s for s in shapes if rng.uniform() >= 0.1]
            masks = np.stack([canvas.ellipse(*s) for s in version_shapes]) if version_shapes else \
                np.zeros((0, height, width), dtype=bool)
            for rle, mask in zip(encode_masks(masks), masks, strict=True):
                annotations[v].append({"image_id": query_id, "category_id": SACO_CATEGORY["id"], "iscrowd": 0,
                                       "segmentation": rle, "area": float(mask.sum()), "bbox": rle_bbox(rle)})
            if crowd_region is not None:
                annotations[v].append({"image_id": query_id, "category_id": SACO_CATEGORY["id"], "iscrowd": 1,
                                       "segmentation": crowd_region, "area": float(region.sum())})
            flip = v > 0 and rng.uniform() < 0.05
            exhaustive_flags[v].append(0 if flip else exhaustive)

        if rng.uniform() < no_prediction_fraction:
            continue
        pred_shapes, scores = [], []
        for shape in shapes:
            if rng.uniform() < 0.8:
                pred_shapes.append(_jitter(rng, shape, 1.0))
                scores.append(rng.uniform(0.2, 1.0))
            if rng.uniform() < 0.15:
                pred_shapes.append(_jitter(rng, shape, 2.5))
                scores.append(rng.uniform(0.05, 0.8))
        for _ in range(rng.poisson(0.7)):
            pred_shapes.append(canvas.random_shape(rng, 0.25))
            scores.append(rng.uniform(0.0, 0.9))
        order = rng.permutation(len(pred_shapes))
        if len(order):
            masks = np.stack([canvas.ellipse(*pred_shapes[i]) for i in order])
            for rle, i in zip(encode_masks(masks), order, strict=True):
                predictions.append({"image_id": query_id, "category_id": SACO_CATEGORY["id"],
                                    "segmentation": rle, "score": float(scores[i]), "bbox": rle_bbox(rle)})

    ground_truths = []
    for v in range(gt_versions):
        version_images = [{**img, "is_instance_exhaustive": flag}
                          for img, flag in zip(images, exhaustive_flags[v], strict=True)]
        version_annotations = [{"id": i + 1, **ann} for i, ann in enumerate(annotations[v])]
        ground_truths.append({"images": version_images, "annotations": version_annotations,
                              "categories": [dict(SACO_CATEGORY)]})
    return SyntheticSaco(ground_truths=ground_truths, predictions=predictions)


def _runs(mask: np.ndarray) -> list[int]:
    """Uncompressed COCO RLE counts (column-major runs, starting with background) of a boolean mask."""
    flat = mask.T.ravel()
    changes = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    bounds = np.r_[0, changes, flat.size]
    runs = np.diff(bounds).tolist()
    return runs if not flat[0] else [0, *runs]
