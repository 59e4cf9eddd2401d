"""Mask AP: our matching equals COCOeval.evaluateImg; file-level AP equals COCOeval end to end."""

from __future__ import annotations

import contextlib
import io
import json
import random

import numpy as np
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from sambridge.evaluate import evaluate_files
from sambridge.metrics import IOU_THRESHOLDS, average_precision, greedy_matches, make_synthetic_saco


def _coco_evaluate_img(ious: np.ndarray, crowd_ious: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """pycocotools' own per-image matching on a given IoU matrix (detections already sorted by score)."""
    num_dt, num_gt, num_crowd = ious.shape[0], ious.shape[1], crowd_ious.shape[1]
    coco_eval = COCOeval(iouType="segm")
    coco_eval.params.catIds = [1]
    gts = [{"id": j + 1, "ignore": 0, "iscrowd": 0, "area": 1.0} for j in range(num_gt)]
    gts += [{"id": num_gt + j + 1, "ignore": 1, "iscrowd": 1, "area": 1.0} for j in range(num_crowd)]
    coco_eval._gts = {(0, 1): gts}
    coco_eval._dts = {
        (0, 1): [{"id": i + 1, "score": 1.0 - i / (num_dt + 1), "area": 1.0} for i in range(num_dt)]
    }
    coco_eval.ious = {(0, 1): np.concatenate([ious, crowd_ious], axis=1)}
    result = coco_eval.evaluateImg(0, 1, [0, 1e10], 100)
    ignored = result["dtIgnore"].astype(bool)
    return ((result["dtMatches"] > 0) & ~ignored).T, ignored.T


@pytest.mark.parametrize("seed", range(30))
def test_greedy_matching_equals_cocoeval_evaluate_img(seed):
    rng = np.random.default_rng(seed)
    num_dt, num_gt, num_crowd = rng.integers(1, 12), rng.integers(0, 9), rng.integers(0, 3)
    # quantised IoUs: many ties between instances and values exactly at thresholds
    ious = rng.choice(np.r_[0.0, IOU_THRESHOLDS, 1.0, 0.52, 0.77], size=(num_dt, num_gt))
    ious *= rng.random((num_dt, num_gt)) < 0.6
    crowd_ious = rng.choice([0.0, 0.4, 0.6, 0.9], size=(num_dt, num_crowd))
    matched, ignored = greedy_matches(ious, crowd_ious)
    expected_matched, expected_ignored = _coco_evaluate_img(ious, crowd_ious)
    np.testing.assert_array_equal(matched, expected_matched)
    np.testing.assert_array_equal(ignored, expected_ignored)


def _cocoeval_stats(gt_path, pred_path, max_dets=(1, 10, 100)) -> np.ndarray:
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO(str(gt_path))
        coco_dt = coco_gt.loadRes(str(pred_path)) if json.loads(pred_path.read_text()) else None
        if coco_dt is None:  # pycocotools cannot load an empty results list
            coco_dt = COCO()
            coco_dt.dataset = {
                "images": coco_gt.dataset["images"],
                "annotations": [],
                "categories": coco_gt.dataset["categories"],
            }
            coco_dt.createIndex()
        coco_eval = COCOeval(coco_gt, coco_dt, iouType="segm")
        coco_eval.params.imgIds = [i["id"] for i in coco_gt.dataset["images"] if i["is_instance_exhaustive"]]
        coco_eval.params.maxDets = list(max_dets)
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
    return coco_eval.stats


def _write(tmp_path, data, shuffle_images=False, round_scores=None):
    gt = data.ground_truths[0]
    if shuffle_images:  # COCOeval sorts image ids; our file-order evaluation must give the same AP
        random.Random(0).shuffle(gt["images"])
    predictions = data.predictions
    if round_scores is not None:  # ties across queries
        predictions = [{**p, "score": round(p["score"], round_scores)} for p in predictions]
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    (tmp_path / "pred.json").write_text(json.dumps(predictions))
    return tmp_path / "gt.json", tmp_path / "pred.json"


SCENARIOS = {
    "mixed_with_crowd_regions": dict(num_queries=150, seed=11, crowd_region_fraction=0.3),
    "crowded": dict(num_queries=40, seed=12, crowded_fraction=0.9),
    "no_predictions": dict(num_queries=40, seed=13, no_prediction_fraction=1.0),
    "all_negative": dict(num_queries=30, seed=14, negative_fraction=1.0),
}


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_file_ap_equals_cocoeval(tmp_path, name):
    args = dict(SCENARIOS[name])
    gt_path, pred_path = _write(tmp_path, make_synthetic_saco(args.pop("num_queries"), **args))
    ours = evaluate_files(gt_path, pred_path)
    stats = _cocoeval_stats(gt_path, pred_path)
    assert ours["AP"] == pytest.approx(stats[0], abs=1e-6)
    assert ours["AP50"] == pytest.approx(stats[1], abs=1e-6)
    assert ours["AP75"] == pytest.approx(stats[2], abs=1e-6)
    assert ours["AR@100"] == pytest.approx(stats[8], abs=1e-6)
    if name == "all_negative":
        assert ours["AP"] == -1.0  # no instances: undefined, as pycocotools says
    if name == "no_predictions":
        assert ours["AP"] == 0.0


def test_file_ap_with_ties_shuffled_ids_and_few_max_dets(tmp_path):
    data = make_synthetic_saco(120, seed=15, crowded_fraction=0.4, crowd_region_fraction=0.2)
    gt_path, pred_path = _write(tmp_path, data, shuffle_images=True, round_scores=1)
    ours = evaluate_files(gt_path, pred_path, max_dets=5)
    stats = _cocoeval_stats(gt_path, pred_path, max_dets=(1, 3, 5))
    # (COCOeval.summarize's stats[0] is always at 100 detections; AP50, AP75 and AR use maxDets[2])
    assert ours["AP50"] == pytest.approx(stats[1], abs=1e-6)
    assert ours["AP75"] == pytest.approx(stats[2], abs=1e-6)
    assert ours["AR@5"] == pytest.approx(stats[8], abs=1e-6)
    assert ours["AP"] < evaluate_files(gt_path, pred_path)["AP"]  # the cap cuts real detections


def test_average_precision_of_a_perfect_and_an_empty_ranking():
    matched = np.ones((3, len(IOU_THRESHOLDS)), dtype=bool)
    perfect = average_precision(np.array([0.9, 0.8, 0.7]), matched, np.zeros_like(matched), num_gt=3)
    assert perfect == {"AP": 1.0, "AP50": 1.0, "AP75": 1.0, "AR@100": 1.0}
    half = average_precision(np.array([0.9]), matched[:1], np.zeros_like(matched[:1]), num_gt=2)
    assert half["AR@100"] == 0.5
    assert half["AP"] == pytest.approx(51 / 101)  # precision 1 up to recall 0.5: 51 of 101 recall points
    nothing = average_precision(np.zeros(0), matched[:0], matched[:0], num_gt=0)
    assert nothing["AP"] == -1.0
