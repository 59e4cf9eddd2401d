"""SA-Co concept-segmentation metrics (cgF1, pmF1, IL_MCC) exactly as SAM3's ``CGF1Evaluator`` computes them.

One *query* is an (image, noun phrase) pair; SA-Co files call it an "image". Only instance-exhaustive
queries are evaluated. Per query (``sam3.eval.cgf1_eval.CGF1Eval.evaluateImg``):

- predictions scoring at least the score threshold (0.5) are the query's detections;
- detections and ground-truth instances (crowd regions dropped) are matched one-to-one by the
  Hungarian algorithm maximising total mask IoU; at each IoU threshold 0.50:0.05:0.95 a matched
  pair with IoU >= threshold is a true positive, other detections are FPs, other instances FNs;
- image level: a query with instances and detections is an IL true positive, instances but no
  detections an IL false negative, detections but no instances an IL false positive, neither a
  true negative.

Over all queries (``CGF1Eval.accumulate``), per IoU threshold and with SAM3's epsilons:

- positive micro precision = TP / (TP + FP on queries that have instances + 1e-4),
  recall = TP / (TP + FN + 1e-4), pmF1 = 2PR / (P + R + 1e-4)  ("positive micro F1");
- IL_MCC = (TP*TN - FP*FN) / (sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN)) + 1e-6) on the IL counts;
- cgF1 = pmF1 x IL_MCC, then averaged over the IoU thresholds.

Reported scales follow SAM3's published tables: ``cgF1*`` and ``pmF1*`` in percent, everything
else as the fraction ``CGF1Evaluator`` returns. :data:`SAM3_KEYS` maps our keys to its keys.
"""

from __future__ import annotations

import numpy as np
from pycocotools.cocoeval import Params
from scipy.optimize import linear_sum_assignment

#: IoU thresholds 0.50:0.05:0.95, the very array pycocotools (and so SAM3) compares against.
IOU_THRESHOLDS: np.ndarray = Params(iouType="segm").iouThrs
#: SAM3's score threshold: a prediction counts as a detection when its score is >= this.
DEFAULT_SCORE_THRESHOLD = 0.5

# (name, image_level) in CGF1Evaluator's order; box-level ones are also reported @0.5 and @0.75.
_BOX_LEVEL = ("cgF1", "precision", "recall", "F1", "positive_macro_F1", "positive_micro_F1",
              "positive_micro_precision")
_IMAGE_LEVEL = ("IL_precision", "IL_recall", "IL_F1", "IL_FPR", "IL_MCC")
_PERCENT = {"cgF1": "cgF1", "positive_micro_F1": "pmF1"}  # SAM3 name -> our name, reported x100


def _our_name(sam3_name: str) -> str:
    return _PERCENT.get(sam3_name, sam3_name)


#: our metric key -> (``CGF1Evaluator.evaluate`` key without the ``cgF1_eval_{iou_type}_`` prefix, scale).
SAM3_KEYS: dict[str, tuple[str, float]] = {
    **{f"{_our_name(n)}{s}": (f"{n}{s}", 100.0 if n in _PERCENT else 1.0)
       for n in _BOX_LEVEL for s in ("", "@0.5", "@0.75")},
    **{n: (n, 1.0) for n in _IMAGE_LEVEL},
}


def true_positives(ious: np.ndarray, thresholds: np.ndarray = IOU_THRESHOLDS) -> np.ndarray:
    """True positives per IoU threshold for one query.

    Args:
        ious: (D, G) IoU of each detection (score >= threshold, in prediction order) with each
            non-crowd instance.
        thresholds: IoU thresholds.

    Returns:
        (T,) int64 counts of Hungarian-matched pairs (max total IoU, as SAM3) with IoU >= threshold.
    """
    if ious.size == 0:
        return np.zeros(len(thresholds), dtype=np.int64)
    rows, cols = linear_sum_assignment(-ious)
    matched = ious[rows, cols]
    return (matched[None, :] >= thresholds[:, None]).sum(axis=1).astype(np.int64)


def local_f1(tp: np.ndarray, num_gt: np.ndarray, num_pred: np.ndarray) -> np.ndarray:
    """Per-query F1 at each threshold with SAM3's epsilons: (Q, T) from (Q, T) TPs and (Q,) counts."""
    fp = num_pred[:, None] - tp
    fn = num_gt[:, None] - tp
    precision = tp / (tp + fp + 1e-4)
    recall = tp / (tp + fn + 1e-4)
    return 2 * precision * recall / (precision + recall + 1e-4)


def _mean_valid(values: np.ndarray) -> float:
    """COCO-style summary: mean of the entries > -1, or -1 when there are none (NaN never counts)."""
    valid = values[values > -1]
    return float(np.mean(valid)) if valid.size else -1.0


def cgf1_metrics(tp: np.ndarray, num_gt: np.ndarray, num_pred: np.ndarray,
                 thresholds: np.ndarray = IOU_THRESHOLDS) -> dict[str, float]:
    """Every ``CGF1Evaluator`` metric from per-query counts (see the module docstring for scales).

    Args:
        tp: (Q, T) true positives per query and IoU threshold (:func:`true_positives`).
        num_gt: (Q,) non-crowd instances per query.
        num_pred: (Q,) detections (score >= threshold) per query.
        thresholds: the (T,) IoU thresholds ``tp`` was counted at.
    """
    tp = np.asarray(tp, dtype=np.int64).reshape(len(num_gt), len(thresholds))
    num_gt = np.asarray(num_gt, dtype=np.int64)
    num_pred = np.asarray(num_pred, dtype=np.int64)
    fp = num_pred[:, None] - tp
    fn = num_gt[:, None] - tp
    has_gt, has_pred = num_gt > 0, num_pred > 0
    scored = has_gt | has_pred        # queries with box-level counts (all but true negatives)
    positive = has_gt & has_pred      # queries pmF1's false positives and the macro F1 come from

    tps, fps, fns = tp[scored].sum(0), fp[scored].sum(0), fn[scored].sum(0)
    pm_fps = fp[positive].sum(0)
    precision = tps / (tps + fps + 1e-4)
    pm_precision = tps / (tps + pm_fps + 1e-4)
    recall = tps / (tps + fns + 1e-4)
    f1 = 2 * precision * recall / (precision + recall + 1e-4)
    pm_f1 = 2 * pm_precision * recall / (pm_precision + recall + 1e-4)
    with np.errstate(invalid="ignore", divide="ignore"):  # SAM3 divides by a zero count too (-> -1)
        macro_f1 = local_f1(tp[positive], num_gt[positive], num_pred[positive]).sum(0) / positive.sum()

    il_tp, il_fn = int(positive.sum()), int((has_gt & ~has_pred).sum())
    il_fp, il_tn = int((~has_gt & has_pred).sum()), int((~scored).sum())
    il_recall = il_tp / (il_tp + il_fn + 1e-6)
    il_precision = il_tp / (il_tp + il_fp + 1e-6)
    il_mcc = float(il_tp * il_tn - il_fp * il_fn) / (
        (float(il_tp + il_fp) * float(il_tp + il_fn) * float(il_tn + il_fp) * float(il_tn + il_fn)) ** 0.5
        + 1e-6)
    box_level = {"cgF1": pm_f1 * il_mcc, "precision": precision, "recall": recall, "F1": f1,
                 "positive_macro_F1": macro_f1, "positive_micro_F1": pm_f1,
                 "positive_micro_precision": pm_precision}
    image_level = {"IL_precision": il_precision, "IL_recall": il_recall,
                   "IL_F1": 2 * il_precision * il_recall / (il_precision + il_recall + 1e-6),
                   "IL_FPR": il_fp / (il_fp + il_tn + 1e-6), "IL_MCC": il_mcc}

    out: dict[str, float] = {}
    for our_key, (sam3_key, scale) in SAM3_KEYS.items():
        name, _, at = sam3_key.partition("@")
        if name in image_level:
            out[our_key] = float(image_level[name])
            continue
        values = np.asarray(box_level[name], dtype=np.float64)
        if at:
            values = values[np.where(float(at) == thresholds)[0]]
        summary = _mean_valid(values)
        out[our_key] = summary * scale if summary != -1.0 else -1.0
    return out


def select_oracle(tps: list[np.ndarray], num_gts: list[np.ndarray], num_pred: np.ndarray) -> np.ndarray:
    """Per query, which of several ground-truth versions SAM3's oracle evaluation keeps.

    SA-Co/Gold has three independent annotations per query; ``CGF1Evaluator`` scores each and keeps,
    per query, the first best by mean local F1, a true negative (no instances, no detections) always
    winning (``CGF1Evaluator._select_best_scoring``).

    Args:
        tps: per version, (Q, T) true positives.
        num_gts: per version, (Q,) instances.
        num_pred: (Q,) detections (the same predictions are scored against every version).

    Returns:
        (Q,) index of the chosen version.
    """
    def state(v: int) -> tuple[np.ndarray, np.ndarray]:
        has_f1 = (num_gts[v] > 0) | (num_pred > 0)  # a true negative has no local F1
        return has_f1, local_f1(tps[v], num_gts[v], num_pred).mean(axis=1)

    choice = np.zeros(len(num_pred), dtype=np.int64)
    best_has, best_f1 = state(0)
    for v in range(1, len(tps)):
        cur_has, cur_f1 = state(v)
        take = np.where(best_has & cur_has, cur_f1 > best_f1, ~cur_has)
        choice[take] = v
        best_has, best_f1 = np.where(take, cur_has, best_has), np.where(take, cur_f1, best_f1)
    return choice
