"""Score calibration: reliability bins and ECE by hand, in the file evaluator and in the streaming metric."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sambridge.evaluate import evaluate_saco
from sambridge.metrics import ConceptSegmentationMetrics, make_synthetic_saco, parse_ground_truth, parse_predictions
from sambridge.metrics.calibration import calibration
from sambridge.report import reliability_figure


def test_bins_precision_and_ece_by_hand():
    scores = np.array([0.05, 0.15, 0.15, 0.95, 0.95, 0.95, 0.95, 1.0])
    right = np.array([0, 1, 0, 1, 1, 1, 0, 1], dtype=bool)
    cal = calibration(scores, right, bins=10)
    assert cal.count.tolist() == [1, 2, 0, 0, 0, 0, 0, 0, 0, 5]  # a score of 1.0 falls in the last bin
    assert cal.precision[0] == 0 and cal.precision[1] == 0.5 and cal.precision[9] == pytest.approx(0.8)
    assert np.isnan(cal.precision[2]) and cal.mean_score[9] == pytest.approx(0.96)
    # ECE: (1 * |0 - 0.05| + 2 * |0.5 - 0.15| + 5 * |0.8 - 0.96|) / 8
    assert cal.ece == pytest.approx((0.05 + 0.7 + 0.8) / 8)
    assert calibration(np.linspace(0.05, 0.95, 10), np.ones(10, bool), bins=10).ece == pytest.approx(0.5)


def test_calibrated_scores_have_low_ece_and_shifted_scores_do_not():
    rng = np.random.default_rng(0)
    scores = rng.uniform(0, 1, 20000)
    right = rng.uniform(0, 1, 20000) < scores  # right exactly as often as the score says
    assert calibration(scores, right).ece < 0.02
    assert calibration(scores * 0.5, right).ece > 0.2  # under-confident by half


def test_file_evaluator_and_streaming_metric_agree_on_ece():
    data = make_synthetic_saco(30, seed=3)
    gt = parse_ground_truth(data.ground_truths[0])
    evaluation = evaluate_saco(gt, parse_predictions(data.predictions, gt))
    assert 0 < evaluation.metrics["ECE"] < 1
    assert evaluation.calibration.count.sum() > 0

    metric = ConceptSegmentationMetrics()
    from pycocotools import mask as mask_utils

    by_image = {}
    for pred in data.predictions:
        by_image.setdefault(pred["image_id"], []).append(pred)
    exhaustive = [i for i, img in gt.images.items() if img["is_instance_exhaustive"]]
    for image_id in exhaustive:
        img, preds = gt.images[image_id], by_image.get(image_id, [])
        hw = (img["height"], img["width"])
        pred_masks = torch.from_numpy(np.stack([mask_utils.decode(p["segmentation"]) for p in preds]).astype(bool)
                                      if preds else np.zeros((0, *hw), bool))
        gt_masks = torch.from_numpy(np.stack([mask_utils.decode(r) for r in gt.instances[image_id]]).astype(bool)
                                    if gt.instances[image_id] else np.zeros((0, *hw), bool))
        metric.update([pred_masks], [torch.tensor([p["score"] for p in preds], dtype=torch.float64)], [gt_masks],
                      torch.tensor([True]), [img["text_input"]], [image_id])
    streamed = metric.compute()
    assert float(streamed["ECE"]) == pytest.approx(evaluation.metrics["ECE"], abs=1e-9)
    assert metric.calibration().count.tolist() == evaluation.calibration.count.tolist()


def test_reliability_figure_draws_one_curve_per_run():
    rng = np.random.default_rng(1)
    scores = rng.uniform(0, 1, 200)
    figure = reliability_figure({"model": calibration(scores, scores > 0.5),
                                 "baseline": calibration(scores, scores > 0.9)})
    top = figure.axes[0]
    labels = [line.get_label() for line in top.get_lines()]
    assert labels[0] == "calibrated" and labels[1].startswith("model (ECE") and labels[2].startswith("baseline")
