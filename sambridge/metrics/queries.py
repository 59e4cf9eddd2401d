"""Per-query statistics: the compact table every SA-Co number is computed from.

Both the file evaluator and the streaming metric reduce each query (image, phrase) to one row
(and a few AP records per detection, :class:`QueryMatch`) as soon as they see it:

- ``tp``: (T,) true positives at each IoU threshold (:func:`sambridge.metrics.cgf1.true_positives`);
- ``num_gt``: ground-truth instances (crowd regions excluded);
- ``num_pred``: predictions with score >= the score threshold (the query's detections);
- ``inter``/``union``: pixels in (union of detections) AND / OR (union of instances);
- ``num_dup``: duplicate detections (:func:`count_duplicates`).

Derived per query: the union IoU ``inter / union`` (1.0 when both are empty, a correctly
rejected phrase; 0 when only one is empty) and the counting error ``|num_pred - num_gt|``
(detections at the same score threshold as cgF1, 0.5 by default). Over all queries, the duplicate
rate is duplicates / detections.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from sambridge.metrics.ap import greedy_matches, top_detections
from sambridge.metrics.cgf1 import IOU_THRESHOLDS, cgf1_metrics, local_f1, true_positives

#: A detection is on an instance when their mask IoU is at least this (duplicate counting).
DUPLICATE_IOU = 0.5


def count_duplicates(ious: np.ndarray, iou_threshold: float = DUPLICATE_IOU) -> int:
    """Duplicate detections of one query: those whose instance a higher-scoring detection already took.

    Each detection goes to its highest-IoU instance (the first on ties) when that IoU is >= ``iou_threshold``;
    an instance taken by n detections makes n - 1 duplicates, so the count does not depend on the
    detections' order. Detections on no instance are false positives, not duplicates.

    Args:
        ious: (D, G) IoU of the query's detections (score >= threshold) with its instances.
        iou_threshold: the IoU that puts a detection on an instance.
    """
    if ious.size == 0:
        return 0
    best = ious.argmax(axis=1)
    hit = ious[np.arange(len(best)), best] >= iou_threshold
    return int(hit.sum() - np.unique(best[hit]).size)


@dataclass
class QueryMatch:
    """What the metrics keep of one query once its IoUs are known.

    Attributes:
        detections: indices of the predictions scoring >= the score threshold, in input order.
        tp: (T,) true positives of those detections (Hungarian, as SAM3).
        top_scores: (D,) scores of the top ``max_dets`` predictions, highest first (for AP).
        top_matched: (D, T) whether each of them matched an instance (COCOeval's greedy rule).
        top_ignored: (D, T) whether each is ignored for matching a crowd region instead.
        duplicates: detections on an instance a higher-scoring detection took (:func:`count_duplicates`).
    """

    detections: np.ndarray
    tp: np.ndarray
    top_scores: np.ndarray
    top_matched: np.ndarray
    top_ignored: np.ndarray
    duplicates: int


def match_query(ious: np.ndarray, scores: np.ndarray, *, score_threshold: float, max_dets: int,
                crowd_ious: np.ndarray | None = None) -> QueryMatch:
    """Reduce one query to its cgF1 counts, duplicates and AP records.

    Args:
        ious: (K, G) IoU of every prediction (input order) with every instance.
        scores: (K,) prediction scores.
        score_threshold: predictions scoring at least this are detections.
        max_dets: predictions (by score) that count for AP.
        crowd_ious: optional (K, C) intersection over prediction area with crowd regions.
    """
    scores = np.asarray(scores, dtype=np.float64)
    detections = np.flatnonzero(scores >= score_threshold)
    top = top_detections(scores, max_dets)
    matched, ignored = greedy_matches(ious[top], None if crowd_ious is None else crowd_ious[top])
    return QueryMatch(detections=detections, tp=true_positives(ious[detections]), top_scores=scores[top],
                      top_matched=matched, top_ignored=ignored, duplicates=count_duplicates(ious[detections]))


def stack_ap_records(matches: list[QueryMatch]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Concatenate the AP records of several queries: scores (D,), matched and ignored (D, T)."""
    empty = np.zeros((0, len(IOU_THRESHOLDS)), dtype=bool)
    return (np.concatenate([np.zeros(0)] + [m.top_scores for m in matches]),
            np.concatenate([empty] + [m.top_matched for m in matches]),
            np.concatenate([empty] + [m.top_ignored for m in matches]))


@dataclass
class QueryTable:
    """One row per evaluated (instance-exhaustive) query.

    Attributes:
        phrases: Q noun phrases.
        image_ids: Q ids naming each query's image (a file's image id or a sample key).
        tp: (Q, T) int64 true positives per IoU threshold.
        num_gt: (Q,) int64 ground-truth instances.
        num_pred: (Q,) int64 predictions with score >= the score threshold.
        inter: (Q,) int64 pixels in both the detections' union and the instances' union.
        union: (Q,) int64 pixels in either.
        num_dup: (Q,) int64 duplicate detections (:func:`count_duplicates`).
    """

    phrases: list[str] = field(default_factory=list)
    image_ids: list[str | int] = field(default_factory=list)
    tp: np.ndarray = field(default_factory=lambda: np.zeros((0, len(IOU_THRESHOLDS)), dtype=np.int64))
    num_gt: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    num_pred: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    inter: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    union: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    num_dup: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))

    def __len__(self) -> int:
        return len(self.phrases)

    def iou(self) -> np.ndarray:
        """(Q,) IoU of the detections' union with the instances' union (1.0 when both are empty)."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(self.union > 0, self.inter / np.maximum(self.union, 1), 1.0)

    def quality(self) -> np.ndarray:
        """(Q,) mean over IoU thresholds of the query's F1 (1.0 for a correctly rejected phrase).

        Used to rank queries from worst to best for reports.
        """
        true_negative = (self.num_gt == 0) & (self.num_pred == 0)
        return np.where(true_negative, 1.0, local_f1(self.tp, self.num_gt, self.num_pred).mean(axis=1))

    def metrics(self) -> dict[str, float]:
        """cgF1 & co. (:func:`cgf1_metrics`), mean/cumulative IoU, counting error and query counts.

        ``mIoU`` is the mean per-query union IoU, ``cIoU`` total intersection over total union,
        ``count_mae`` the mean absolute counting error and ``count_exact`` the fraction of queries
        counted exactly, ``duplicate_rate`` duplicates over detections (0 without detections).
        Undefined values (no queries) are -1, as in pycocotools.
        """
        out = cgf1_metrics(self.tp, self.num_gt, self.num_pred)
        count_error = np.abs(self.num_pred - self.num_gt)
        total_union, total_pred = int(self.union.sum()), int(self.num_pred.sum())
        out.update({
            "mIoU": float(self.iou().mean()) if len(self) else -1.0,
            "cIoU": (float(self.inter.sum() / total_union) if total_union else 1.0) if len(self) else -1.0,
            "count_mae": float(count_error.mean()) if len(self) else -1.0,
            "count_exact": float((count_error == 0).mean()) if len(self) else -1.0,
            "duplicate_rate": float(self.num_dup.sum() / total_pred) if total_pred else 0.0,
            "num_queries": float(len(self)),
            "num_positive": float((self.num_gt > 0).sum()),
            "num_gt": float(self.num_gt.sum()),
            "num_pred": float(total_pred),
        })
        return out

    def per_phrase(self) -> list[dict[str, float | int | str | None]]:
        """One row per phrase, most frequent first.

        Columns: ``phrase``, ``queries``, ``positives`` (queries with instances), ``gt`` and
        ``pred`` (instances and detections), ``F1`` and ``F1@0.5`` (micro F1 over the phrase's
        queries as SAM3's box-level F1, averaged over IoU thresholds; None when the phrase has
        neither instances nor detections), ``IL_accuracy`` (share of queries whose presence was
        predicted right), ``mIoU`` and ``count_mae``.
        """
        phrases = np.asarray(self.phrases, dtype=object)
        iou, count_error = self.iou(), np.abs(self.num_pred - self.num_gt)
        presence_right = (self.num_gt > 0) == (self.num_pred > 0)
        rows = []
        for phrase in sorted(set(self.phrases)):
            sel = phrases == phrase
            tp, gt, pred = self.tp[sel].sum(0), self.num_gt[sel].sum(), self.num_pred[sel].sum()
            precision = tp / (pred + 1e-4)
            recall = tp / (gt + 1e-4)
            f1 = 2 * precision * recall / (precision + recall + 1e-4)
            defined = gt > 0 or pred > 0
            rows.append({"phrase": phrase, "queries": int(sel.sum()),
                         "positives": int((self.num_gt[sel] > 0).sum()), "gt": int(gt), "pred": int(pred),
                         "F1": float(f1.mean()) if defined else None,
                         "F1@0.5": float(f1[0]) if defined else None,
                         "IL_accuracy": float(presence_right[sel].mean()), "mIoU": float(iou[sel].mean()),
                         "count_mae": float(count_error[sel].mean())})
        rows.sort(key=lambda r: -r["queries"])
        return rows

