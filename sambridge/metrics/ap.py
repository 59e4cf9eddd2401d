"""Mask AP (AP, AP50, AP75, AR) as pycocotools' COCOeval computes it, from compact per-detection records.

COCOeval does two things: per image it matches detections to instances (``evaluateImg``, a pure
Python loop over thresholds x detections x instances), then over all images it builds the
precision/recall curves (``accumulate``). We run its ``accumulate`` itself, and do the matching
with :func:`greedy_matches`, a vectorised copy of its rule: the top ``max_dets`` detections by
score (stable order) each take, per IoU threshold, the unmatched instance of highest IoU >= the
threshold (the last on ties); a detection left without one is ignored (neither TP nor FP) when it
overlaps a crowd region by intersection-over-its-area >= the threshold. Tests check the result
equals COCOeval's ``evaluate``/``accumulate``/``summarize`` on the same files.

Records kept per detection: its score, a matched flag and an ignored flag per IoU threshold;
per query only the number of instances. That is what lets the streaming metric compute AP
without holding masks, and the file evaluator do it several times faster than COCOeval.

Categories are not used (SA-Co has one per file; a query is its own "image"), as COCOeval with
``useCats=0``. All object sizes are pooled: SA-Co stores areas normalised by the image size,
which makes COCO's small/medium/large split meaningless.
"""

from __future__ import annotations

import contextlib
import copy
import io

import numpy as np
from pycocotools.cocoeval import COCOeval

from sambridge.metrics.cgf1 import IOU_THRESHOLDS

#: COCO's detections per image that count for AP.
DEFAULT_MAX_DETS = 100


def top_detections(scores: np.ndarray, max_dets: int) -> np.ndarray:
    """Indices of the ``max_dets`` highest scores, ties in input order (COCOeval's mergesort)."""
    return np.argsort(-np.asarray(scores, dtype=np.float64), kind="mergesort")[:max_dets]


def greedy_matches(ious: np.ndarray, crowd_ious: np.ndarray | None = None,
                   thresholds: np.ndarray = IOU_THRESHOLDS) -> tuple[np.ndarray, np.ndarray]:
    """COCOeval's greedy matching of one query's detections to its instances.

    Args:
        ious: (D, G) IoU of the detections, sorted by descending score, with the instances in file order.
        crowd_ious: optional (D, C) intersection over detection area with crowd regions.
        thresholds: (T,) IoU thresholds.

    Returns:
        ``matched`` and ``ignored``, both (D, T) bool.
    """
    num_dt, num_gt = ious.shape
    matched = np.zeros((num_dt, len(thresholds)), dtype=bool)
    floor = np.minimum(thresholds, 1 - 1e-10)  # COCOeval's starting "best IoU so far"
    taken = np.zeros((len(thresholds), num_gt), dtype=bool)
    rows = np.arange(len(thresholds))
    hits = np.flatnonzero(ious.max(axis=1) >= floor.min()) if num_gt else []  # the others match nothing
    for d in hits:
        overall = num_gt - 1 - ious[d, ::-1].argmax()  # last index of the maximum
        if not taken[:, overall].any():  # common case: the best instance is still free at every threshold
            ok = ious[d, overall] >= floor
            matched[d] = ok
            taken[ok, overall] = True
            continue
        candidates = np.where(taken, -1.0, ious[d][None, :])  # (T, G)
        best = num_gt - 1 - candidates[:, ::-1].argmax(axis=1)
        ok = candidates[rows, best] >= floor
        matched[d] = ok
        taken[rows[ok], best[ok]] = True
    if crowd_ious is None or not crowd_ious.shape[1]:
        return matched, np.zeros_like(matched)
    return matched, ~matched & (crowd_ious.max(axis=1)[:, None] >= floor[None, :])


def average_precision(scores: np.ndarray, matched: np.ndarray, ignored: np.ndarray, num_gt: int,
                      max_dets: int = DEFAULT_MAX_DETS) -> dict[str, float]:
    """AP, AP50, AP75 and AR@``max_dets`` from per-detection records, accumulated by COCOeval.

    Args:
        scores: (D,) scores of every query's top ``max_dets`` detections, queries concatenated
            (in COCOeval's order, queries by ascending id, for bit-identical results on ties).
        matched: (D, T) whether each detection matched an instance at each IoU threshold.
        ignored: (D, T) whether each detection is ignored (matched a crowd region instead).
        num_gt: instances (not crowd regions) over all queries.
        max_dets: the per-query cap the records were cut at (names the AR key).

    Returns:
        ``AP``, ``AP50``, ``AP75``, ``AR@{max_dets}`` as fractions; -1 when there are no instances.
    """
    scores = np.asarray(scores, dtype=np.float64)
    coco_eval = COCOeval(iouType="segm")
    params = coco_eval.params
    params.imgIds, params.catIds, params.useCats = [0], [1], 0
    params.areaRng, params.areaRngLbl = [[0.0, 1e10]], ["all"]
    params.maxDets = [max(len(scores), 1)]  # already cut per query: keep every record
    coco_eval._paramsEval = copy.deepcopy(params)
    coco_eval.evalImgs = [{"dtScores": scores, "dtMatches": np.asarray(matched, dtype=bool).T,
                           "dtIgnore": np.asarray(ignored, dtype=bool).T,
                           "gtIgnore": np.zeros(int(num_gt), dtype=bool)}]
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
        coco_eval.accumulate()
    precision = coco_eval.eval["precision"][:, :, 0, 0, 0]  # (T, R)
    recall = coco_eval.eval["recall"][:, 0, 0, 0]  # (T,)

    def mean_valid(values: np.ndarray) -> float:  # COCOeval.summarize's average
        valid = values[values > -1]
        return float(np.mean(valid)) if valid.size else -1.0

    return {"AP": mean_valid(precision), "AP50": mean_valid(precision[np.where(IOU_THRESHOLDS == 0.5)[0]]),
            "AP75": mean_valid(precision[np.where(IOU_THRESHOLDS == 0.75)[0]]),
            f"AR@{max_dets}": mean_valid(recall)}
