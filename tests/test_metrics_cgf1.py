"""cgF1 / pmF1 / IL_MCC: hand-checked definitions, and parity with SAM3's CGF1Evaluator on generated files."""

from __future__ import annotations

import contextlib
import io
import json

import numpy as np
import pytest
from sam3.eval.cgf1_eval import CGF1Evaluator  # a core dependency: the parity tests fail, never skip, without it

from sambridge.evaluate import evaluate_files
from sambridge.metrics import SAM3_KEYS, cgf1_metrics, make_synthetic_saco, select_oracle, true_positives


def test_matching_is_hungarian_not_greedy():
    # Greedy would pair d0-g0 (0.9) and leave d1 unmatched; SAM3 maximises the total IoU: d0-g1 + d1-g0.
    ious = np.array([[0.9, 0.62], [0.83, 0.0]])
    assert true_positives(ious).tolist() == [2, 2, 2, 1, 1, 1, 1, 0, 0, 0]
    assert true_positives(np.zeros((0, 3))).tolist() == [0] * 10
    assert true_positives(np.zeros((2, 0))).tolist() == [0] * 10


def test_definitions_on_a_hand_computed_example():
    # q0: 2 instances found exactly; q1: 1 instance missed; q2: a false detection on a negative;
    # q3: a correctly empty negative; q4: 1 instance found with IoU 0.72 (a TP up to threshold 0.70).
    tp = np.stack(
        [
            true_positives(np.eye(2)),
            np.zeros(10, int),
            np.zeros(10, int),
            np.zeros(10, int),
            true_positives(np.array([[0.72]])),
        ]
    )
    num_gt, num_pred = np.array([2, 1, 0, 0, 1]), np.array([2, 0, 1, 0, 1])
    m = cgf1_metrics(tp, num_gt, num_pred)
    # image level: TP = q0, q4; FN = q1; FP = q2; TN = q3 -> MCC = (2*1 - 1*1) / sqrt(3*3*2*2) = 1/6
    assert m["IL_MCC"] == pytest.approx(1 / 6, abs=1e-5)
    assert m["IL_precision"] == pytest.approx(2 / 3, abs=1e-5)
    assert m["IL_recall"] == pytest.approx(2 / 3, abs=1e-5)
    assert m["IL_FPR"] == pytest.approx(1 / 2, abs=1e-5)
    # positive micro F1: IoU <= 0.70: TP 3, FP(on positives) 0, FN 1; above: TP 2, FP 1, FN 2.
    low, high = 2 * 1 * 0.75 / 1.75, 2 * (2 / 3) * 0.5 / (2 / 3 + 0.5)
    assert m["pmF1@0.5"] == pytest.approx(100 * low, abs=1e-2)
    assert m["pmF1@0.75"] == pytest.approx(100 * high, abs=1e-2)
    assert m["pmF1"] == pytest.approx(100 * (low + high) / 2, abs=1e-2)
    assert m["cgF1"] == pytest.approx(m["pmF1"] * m["IL_MCC"], rel=1e-9)
    # the false detection on q2 counts for the plain precision but not for the positive one
    assert m["precision@0.5"] == pytest.approx(3 / 4, abs=1e-3)
    assert m["positive_micro_precision@0.5"] == pytest.approx(1.0, abs=1e-3)


def test_no_positive_query_gives_sam3s_minus_one_macro_f1():
    m = cgf1_metrics(np.zeros((3, 10), int), np.array([0, 0, 2]), np.array([0, 1, 0]))
    assert m["positive_macro_F1"] == -1.0
    assert m["IL_MCC"] == pytest.approx(-0.5, abs=1e-5)  # TP 0, TN 1, FP 1, FN 1


def test_oracle_keeps_the_best_version_and_prefers_true_negatives():
    perfect, none = true_positives(np.eye(1)), np.zeros(10, int)
    tps = [np.stack([none, perfect, none]), np.stack([perfect, none, none])]
    num_gts = [np.array([1, 1, 1]), np.array([1, 2, 0])]
    choice = select_oracle(tps, num_gts, num_pred=np.array([1, 1, 1]))
    # q0: version 1 finds it; q1: version 0 is better; q2: version 1 has no instances but a detection (F1 0)
    # vs version 0 (F1 0): ties keep the first
    assert choice.tolist() == [1, 0, 0]
    choice = select_oracle(tps, [np.array([1, 1, 1]), np.array([1, 1, 0])], num_pred=np.array([1, 1, 0]))
    assert choice[2] == 1  # no instances and no detections in version 1: a true negative wins


def _sam3(gt_paths, pred_path) -> dict[str, float]:
    with contextlib.redirect_stdout(io.StringIO()):
        return CGF1Evaluator(gt_paths if len(gt_paths) > 1 else gt_paths[0]).evaluate(str(pred_path))


def _assert_same_as_sam3(ours: dict[str, float], theirs: dict[str, float]) -> None:
    for key, (sam3_key, scale) in SAM3_KEYS.items():
        value = theirs[f"cgF1_eval_segm_{sam3_key}"]
        assert ours[key] == pytest.approx(value * scale if value != -1 else -1.0, abs=1e-6), key


SCENARIOS = {
    "mixed": dict(num_queries=120, seed=1, crowd_region_fraction=0.15),
    "crowded": dict(num_queries=40, seed=2, crowded_fraction=0.9, negative_fraction=0.05),
    "mostly_negative": dict(num_queries=80, seed=3, negative_fraction=0.9),
    "no_predictions": dict(num_queries=60, seed=4, no_prediction_fraction=1.0),
    "mostly_non_exhaustive": dict(num_queries=60, seed=5, non_exhaustive_fraction=0.8),
    "oracle_three_versions": dict(num_queries=120, seed=6, gt_versions=3, crowd_region_fraction=0.1),
}


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_parity_with_sam3_cgf1_evaluator(tmp_path, name):
    args = dict(SCENARIOS[name])
    data = make_synthetic_saco(args.pop("num_queries"), **args)
    gt_paths = []
    for v, gt in enumerate(data.ground_truths):
        gt_paths.append(str(tmp_path / f"gt_{v}.json"))
        (tmp_path / f"gt_{v}.json").write_text(json.dumps(gt))
    pred_path = tmp_path / "pred.json"
    pred_path.write_text(json.dumps(data.predictions))
    ours = evaluate_files(gt_paths, pred_path)
    _assert_same_as_sam3(ours, _sam3(gt_paths, pred_path))
    if name == "no_predictions":
        assert data.predictions == [] and ours["pmF1"] == 0 and ours["AP"] == 0
    assert ours["num_queries"] + ours["num_skipped"] == len(data.ground_truths[0]["images"])


def test_parity_on_a_changed_score_threshold(tmp_path):
    # CGF1Evaluator always uses 0.5; at 0.5 both agree, at another threshold the numbers must move.
    data = make_synthetic_saco(80, seed=7)
    (tmp_path / "gt.json").write_text(json.dumps(data.ground_truths[0]))
    (tmp_path / "pred.json").write_text(json.dumps(data.predictions))
    at_half = evaluate_files(tmp_path / "gt.json", tmp_path / "pred.json", score_threshold=0.5)
    at_low = evaluate_files(tmp_path / "gt.json", tmp_path / "pred.json", score_threshold=0.1)
    _assert_same_as_sam3(at_half, _sam3([str(tmp_path / "gt.json")], tmp_path / "pred.json"))
    assert at_low["num_pred"] > at_half["num_pred"] and at_low["IL_MCC"] != at_half["IL_MCC"]
