"""Metrics: SA-Co cgF1 / pmF1 / IL_MCC exactly as SAM3 computes them, mask AP as pycocotools does,
union-mask IoU, counting error and duplicate rate, from files (``sambridge.evaluate``) or streamed during
validation (:class:`ConceptSegmentationMetrics`)."""

from sambridge.metrics.ap import DEFAULT_MAX_DETS, average_precision, greedy_matches
from sambridge.metrics.cgf1 import (
    DEFAULT_SCORE_THRESHOLD,
    IOU_THRESHOLDS,
    SAM3_KEYS,
    cgf1_metrics,
    select_oracle,
    true_positives,
)
from sambridge.metrics.masks import encode_masks, mask_ious, rle_ious
from sambridge.metrics.queries import QueryMatch, QueryTable, count_duplicates, match_query
from sambridge.metrics.saco import (
    RecordError,
    SacoGroundTruth,
    batch_prediction_records,
    ground_truth_from_samples,
    load_ground_truth,
    load_predictions,
    parse_ground_truth,
    parse_predictions,
    prediction_records,
    saco_pair_id,
)
from sambridge.metrics.streaming import ConceptSegmentationMetrics
from sambridge.metrics.synthetic import SyntheticSaco, make_synthetic_saco

__all__ = [
    "DEFAULT_MAX_DETS", "DEFAULT_SCORE_THRESHOLD", "IOU_THRESHOLDS", "SAM3_KEYS",
    "ConceptSegmentationMetrics", "QueryMatch", "QueryTable", "RecordError", "SacoGroundTruth",
    "SyntheticSaco", "average_precision", "batch_prediction_records", "cgf1_metrics", "count_duplicates",
    "encode_masks", "greedy_matches", "ground_truth_from_samples", "load_ground_truth", "load_predictions",
    "make_synthetic_saco", "mask_ious", "match_query", "parse_ground_truth", "parse_predictions",
    "prediction_records", "rle_ious", "saco_pair_id", "select_oracle", "true_positives",
]
