"""``sambridge evaluate``: IoU and counting definitions on a hand-made example, and the command end to end."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from PIL import Image

from data_pipelines.atomic import write_json_atomic
from sambridge.evaluate import evaluate_files, main
from sambridge.metrics import encode_masks, make_synthetic_saco


def _box(rows: slice, cols: slice) -> np.ndarray:
    mask = np.zeros((10, 10), dtype=bool)
    mask[rows, cols] = True
    return mask


@pytest.fixture
def hand_files(tmp_path):
    a = _box(slice(0, 5), slice(0, 5))  # 25 px
    p1 = a.copy()
    p1[4, 1:5] = False  # 21 px inside a: IoU 0.84
    b, c = _box(slice(5, 10), slice(0, 10)), _box(slice(0, 3), slice(6, 10))
    images = [(1, "apple", 1), (2, "pear", 1), (3, "apple", 1), (4, "pear", 0), (5, "leaf", 1)]
    gt = {
        "images": [
            {
                "id": i,
                "height": 10,
                "width": 10,
                "file_name": f"{i}.png",
                "text_input": t,
                "is_instance_exhaustive": e,
            }
            for i, t, e in images
        ],
        "annotations": [
            {"id": n + 1, "image_id": i, "category_id": 1, "segmentation": encode_masks(m[None])[0]}
            for n, (i, m) in enumerate([(1, a), (3, b), (3, c), (4, a)])
        ],
        "categories": [{"id": 1, "name": "object"}],
    }
    preds = [
        (1, p1, 0.9),
        (1, _box(slice(7, 10), slice(7, 10)), 0.3),
        (2, _box(slice(0, 2), slice(0, 2)), 0.6),
        (4, a, 0.9),
    ]
    predictions = [
        {"image_id": i, "category_id": 1, "segmentation": encode_masks(m[None])[0], "score": s}
        for i, m, s in preds
    ]
    write_json_atomic(tmp_path / "gt.json", gt)
    write_json_atomic(tmp_path / "pred.json", predictions)
    return tmp_path / "gt.json", tmp_path / "pred.json"


def test_iou_and_counting_definitions(hand_files):
    m = evaluate_files(*hand_files)
    # per query (score threshold 0.5): apple#1 IoU 0.84, count 1 vs 1; pear#2 a false detection: IoU 0,
    # count 1 vs 0; apple#3 both missed: IoU 0, count 0 vs 2; leaf#5 correctly empty: IoU 1; pear#4 skipped.
    assert m["num_queries"] == 4 and m["num_skipped"] == 1 and m["num_positive"] == 2
    assert m["mIoU"] == pytest.approx((0.84 + 0 + 0 + 1) / 4)
    assert m["cIoU"] == pytest.approx(21 / (25 + 4 + 62 + 0))
    assert m["count_mae"] == pytest.approx((0 + 1 + 2 + 0) / 4)
    assert m["count_exact"] == pytest.approx(0.5)
    assert m["num_pred"] == 2 and m["num_gt"] == 3


def test_cli_writes_table_json_csv_markdown_and_grid(tmp_path, capsys):
    data = make_synthetic_saco(40, seed=41)
    write_json_atomic(tmp_path / "gt.json", data.ground_truths[0])
    write_json_atomic(tmp_path / "pred.json", data.predictions)
    images = tmp_path / "images"
    images.mkdir()
    for entry in data.ground_truths[0]["images"]:
        if not (images / entry["file_name"]).exists():
            shape = (entry["height"], entry["width"], 3)
            rgb = np.random.default_rng(entry["id"]).integers(0, 255, shape, np.uint8)
            Image.fromarray(rgb).save(images / entry["file_name"])
    out = tmp_path / "report"
    code = main(
        [
            "--gt",
            str(tmp_path / "gt.json"),
            "--pred",
            str(tmp_path / "pred.json"),
            "--out",
            str(out / "metrics.json"),
            "--per-phrase",
            str(out / "per_phrase.csv"),
            "--grid",
            str(out / "queries.png"),
            "--image-root",
            str(images),
            "--grid-queries",
            "3",
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "cgF1" in printed and "IL_MCC" in printed and "AP50" in printed

    written = json.loads((out / "metrics.json").read_text())
    assert written["metrics"] == pytest.approx(evaluate_files(tmp_path / "gt.json", tmp_path / "pred.json"))
    assert written["score_threshold"] == 0.5 and written["max_dets"] == 100

    with open(out / "per_phrase.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    exhaustive = [e for e in data.ground_truths[0]["images"] if e["is_instance_exhaustive"]]
    assert sorted(r["phrase"] for r in rows) == sorted({e["text_input"] for e in exhaustive})
    assert sum(int(r["queries"]) for r in rows) == len(exhaustive)
    assert (out / "per_phrase.md").read_text().count("\n") == len(rows) + 2

    with Image.open(out / "queries.png") as grid:
        assert grid.size == (780, 6 * 260)  # 3 best + 3 worst rows of 3 panels


def test_cli_refuses_a_grid_without_images_and_names_a_missing_image(tmp_path, hand_files):
    gt, pred = hand_files
    with pytest.raises(SystemExit):
        main(["--gt", str(gt), "--pred", str(pred), "--grid", str(tmp_path / "g.png")])
    with pytest.raises(FileNotFoundError, match=r"query \d+ \('.+'\): image .*\.png not found"):
        main(
            [
                "--gt",
                str(gt),
                "--pred",
                str(pred),
                "--grid",
                str(tmp_path / "g.png"),
                "--image-root",
                str(tmp_path),
            ]
        )
    assert not (tmp_path / "g.png").exists()


def test_cli_compares_with_a_baseline_side_by_side(tmp_path, capsys):
    data = make_synthetic_saco(40, seed=41)
    write_json_atomic(tmp_path / "gt.json", data.ground_truths[0])
    write_json_atomic(tmp_path / "pred.json", data.predictions)
    write_json_atomic(tmp_path / "base.json", data.predictions[::2])  # a weaker run: half the predictions
    out = tmp_path / "cmp"
    assert main(["--gt", str(tmp_path / "gt.json"), "--pred", str(tmp_path / "pred.json"),
                 "--baseline", str(tmp_path / "base.json"), "--baseline-name", "heuristic",
                 "--out", str(out / "metrics.json"), "--per-phrase", str(out / "cmp.csv"),
                 "--calibration", str(out / "calibration.png")]) == 0
    printed = capsys.readouterr().out
    model = evaluate_files(tmp_path / "gt.json", tmp_path / "pred.json")
    baseline = evaluate_files(tmp_path / "gt.json", tmp_path / "base.json")
    line = next(row for row in printed.splitlines() if row.startswith("cgF1 "))
    assert line.split()[1:] == [f"{model['cgF1']:.4f}", f"{baseline['cgF1']:.4f}",
                                f"{model['cgF1'] - baseline['cgF1']:+.4f}"]
    written = json.loads((out / "metrics.json").read_text())
    assert written["baseline_metrics"] == pytest.approx(baseline)
    with open(out / "cmp.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert {"F1", "heuristic_F1", "IL_accuracy", "heuristic_IL_accuracy"} <= set(rows[0])
    assert any(r["F1"] != r["heuristic_F1"] for r in rows)
    with Image.open(out / "calibration.png") as picture:
        assert picture.size[0] > 100


@pytest.fixture
def duplicate_files(tmp_path):
    """Query 1 ("apple", instances a and b) and query 2 ("pear", a negative). Detections on query 1:
    a shrunk copy of a (0.95, IoU 0.8), a itself (0.9, the duplicate), b, and a below-threshold copy
    of b; on query 2 one false detection. A baseline detects a and b once each."""
    a, b = _box(slice(0, 5), slice(0, 5)), _box(slice(5, 10), slice(5, 10))
    shrunk_a = _box(slice(0, 4), slice(0, 5))
    gt = {
        "images": [{"id": i, "height": 10, "width": 10, "file_name": f"{i}.png", "text_input": t,
                    "is_instance_exhaustive": 1} for i, t in [(1, "apple"), (2, "pear")]],
        "annotations": [{"id": n + 1, "image_id": 1, "category_id": 1, "segmentation": encode_masks(m[None])[0]}
                        for n, m in enumerate([a, b])],
        "categories": [{"id": 1, "name": "object"}],
    }

    def results(preds):
        return [{"image_id": i, "category_id": 1, "segmentation": encode_masks(m[None])[0], "score": s}
                for i, m, s in preds]

    write_json_atomic(tmp_path / "gt.json", gt)
    write_json_atomic(tmp_path / "pred.json", results([(1, shrunk_a, 0.95), (1, a, 0.9), (1, b, 0.8), (1, b, 0.4),
                                                (2, a, 0.7)]))
    write_json_atomic(tmp_path / "base.json", results([(1, a, 0.9), (1, b, 0.8)]))
    return tmp_path / "gt.json", tmp_path / "pred.json", tmp_path / "base.json"


def test_cli_reports_the_duplicate_rate(duplicate_files, tmp_path, capsys):
    gt, pred, base = duplicate_files
    # 4 detections scoring >= 0.5: one duplicate of a; the false detection on "pear" is no duplicate
    assert evaluate_files(gt, pred)["duplicate_rate"] == pytest.approx(1 / 4)
    assert evaluate_files([gt, gt], pred)["duplicate_rate"] == pytest.approx(1 / 4)  # oracle: versions too
    assert main(["--gt", str(gt), "--pred", str(pred), "--out", str(tmp_path / "m.json")]) == 0
    assert "duplicate_rate" in capsys.readouterr().out
    assert json.loads((tmp_path / "m.json").read_text())["metrics"]["duplicate_rate"] == pytest.approx(1 / 4)

    assert main(["--gt", str(gt), "--pred", str(pred), "--baseline", str(base),
                 "--out", str(tmp_path / "cmp.json")]) == 0
    line = next(row for row in capsys.readouterr().out.splitlines() if row.startswith("duplicate_rate "))
    assert line.split()[1:] == ["0.2500", "0.0000", "+0.2500"]
    written = json.loads((tmp_path / "cmp.json").read_text())
    assert written["metrics"]["duplicate_rate"] == pytest.approx(1 / 4)
    assert written["baseline_metrics"]["duplicate_rate"] == 0.0


def test_cli_warns_when_the_prediction_file_is_empty(tmp_path, hand_files, capsys):
    gt, _ = hand_files
    empty = tmp_path / "empty.json"
    empty.write_text("[]")
    assert main(["--gt", str(gt), "--pred", str(empty)]) in (0, None)
    err = capsys.readouterr().err
    assert f"warning: {empty} holds no predictions: every instance counts as missed" in err
