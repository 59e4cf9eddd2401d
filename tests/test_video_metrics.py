"""Video evaluation (``sambridge.metrics.video``, ``sambridge evaluate-video``) on hand-made clips.

Clip: 12 frames of 32x32, phrase "red circle" with two objects moving right (A on top, B below), phrase
"blue square" asked but absent (a negative pair).
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from data_pipelines.atomic import write_json_atomic
from data_pipelines.schema import encode_mask
from sambridge.cli import main as cli_main
from sambridge.metrics.video import MASKLETS_FORMAT, evaluate_video

H = W = 32
T = 12
RED, BLUE = "red circle", "blue square"


def _a(t: int) -> np.ndarray:
    mask = np.zeros((H, W), dtype=bool)
    mask[3:11, t * 2:t * 2 + 7] = True
    return mask


def _b(t: int) -> np.ndarray:
    mask = np.zeros((H, W), dtype=bool)
    mask[18:27, t * 2:t * 2 + 7] = True
    return mask


def _ghost(t: int) -> np.ndarray:  # overlaps neither A nor B
    mask = np.zeros((H, W), dtype=bool)
    mask[28:31, 1:8] = True
    return mask


def _segs(shape, frames=range(T)) -> list:
    return [encode_mask(shape(t)) if t in frames else None for t in range(T)]


def _ground_truth() -> dict:
    def annotation(ann_id: int, shape) -> dict:
        segs = _segs(shape)
        return {"id": ann_id, "object_id": ann_id, "video_id": 1, "category_id": 1, "iscrowd": 0, "height": H,
                "width": W, "segmentations": segs, "bboxes": [None] * T, "areas": [None] * T}

    return {"videos": [{"id": 1, "name": "clip-000000", "height": H, "width": W, "length": T,
                        "file_names": [f"clip-000000/{t:05d}.png" for t in range(T)]}],
            "categories": [{"id": 1, "name": RED}, {"id": 2, "name": BLUE}],
            "annotations": [annotation(7, _a), annotation(8, _b)],
            "video_np_pairs": [{"video_id": 1, "category_id": 1, "num_masklets": 2},
                               {"video_id": 1, "category_id": 2, "num_masklets": 0}]}


def _masklet(masklet_id: int, shape, frames=range(T), phrase: str = RED, score: float = 0.9) -> dict:
    segs = _segs(shape, frames)
    return {"id": masklet_id, "phrase": phrase, "score": score, "segmentations": segs,
            "bboxes": [None] * T, "scores": [score if s else None for s in segs], "areas": [None] * T}


def _masklets(*masklets: dict, name: str = "clip-000000") -> dict:
    return {"format": MASKLETS_FORMAT,
            "video": {"name": name, "height": H, "width": W, "num_frames": T, "fps": None, "file_names": None},
            "phrases": [RED, BLUE], "masklets": list(masklets)}


def test_a_perfect_prediction_scores_perfectly():
    result = evaluate_video(_ground_truth(), _masklets(_masklet(1, _a), _masklet(2, _b)))
    s = result.summary
    assert s["HOTA"] == pytest.approx(1.0) and s["DetA"] == pytest.approx(1.0) and s["AssA"] == pytest.approx(1.0)
    assert s["cgF1"] > 99.9 and s["IL_MCC"] > 0.999  # sam3 smooths its ratios by 1e-6
    assert s["IDSW"] == 0 and s["IDSW_per_100"] == 0 and s["IDF1"] == pytest.approx(1.0)
    assert s["MOTA"] == pytest.approx(1.0) and s["gt_object_frames"] == 2 * T
    assert s["gt_count"] == s["pred_count"] == 2
    assert s["count_abs_error"] == 0 and s["count_rel_error"] == 0 and s["frame_count_mae"] == 0
    red = result.per_phrase[RED]
    assert red["HOTA"] == pytest.approx(1.0) and red["IDSW"] == 0 and red["pred_count"] == 2
    assert result.per_phrase[BLUE]["gt_count"] == 0 and np.isnan(result.per_phrase[BLUE]["HOTA"])  # nothing there


def test_an_identity_change_midway_is_one_switch_and_costs_hota():
    # A is lost at frame 6 and picked up again under a new id; B is tracked throughout
    result = evaluate_video(_ground_truth(),
                            _masklets(_masklet(1, _a, range(6)), _masklet(3, _a, range(6, T)), _masklet(2, _b)))
    s = result.summary
    assert s["IDSW"] == 1
    assert s["IDSW_per_100"] == pytest.approx(100 / (2 * T))
    assert s["DetA"] == pytest.approx(1.0) and s["AssA"] < 1.0 and s["HOTA"] < 1.0
    assert s["IDF1"] < 1.0 and s["pred_count"] == 3 and s["count_abs_error"] == 1

    # A and B swap masklets midway: motmetrics counts one switch per ground-truth object
    swapped = evaluate_video(_ground_truth(), _masklets(
        {**_masklet(1, _a, range(6)), "segmentations": _segs(_a, range(6))[:6] + _segs(_b, range(6, T))[6:]},
        {**_masklet(2, _b, range(6)), "segmentations": _segs(_b, range(6))[:6] + _segs(_a, range(6, T))[6:]}))
    assert swapped.summary["IDSW"] == 2 and swapped.summary["HOTA"] < 1.0
    assert swapped.summary["count_abs_error"] == 0


def test_a_missing_object_is_a_counting_error():
    result = evaluate_video(_ground_truth(), _masklets(_masklet(1, _a)))
    s = result.summary
    assert s["gt_count"] == 2 and s["pred_count"] == 1
    assert s["count_abs_error"] == 1 and s["count_rel_error"] == pytest.approx(0.5)
    assert s["frame_count_mae"] == pytest.approx(0.5)  # 1 of 2 phrases wrong by 1 in every frame
    assert result.per_phrase[RED]["frame_count_mae"] == pytest.approx(1.0)
    assert s["MOT_recall"] == pytest.approx(0.5) and s["DetRe"] == pytest.approx(0.5) and s["HOTA"] < 1.0
    assert s["IDSW"] == 0


def test_an_extra_false_track_is_a_counting_error_and_lowers_precision():
    perfect = [_masklet(1, _a), _masklet(2, _b)]
    results = {}
    for phrase in (RED, BLUE):  # a ghost of a present phrase, then of the absent one
        result = results[phrase] = evaluate_video(_ground_truth(),
                                                  _masklets(*perfect, _masklet(5, _ghost, phrase=phrase)))
        s = result.summary
        assert s["pred_count"] == 3 and s["count_abs_error"] == 1 and s["count_rel_error"] == pytest.approx(0.5)
        assert s["MOT_precision"] == pytest.approx(2 / 3) and s["DetPr"] == pytest.approx(2 / 3)
        assert s["HOTA"] < 1.0 and s["IDSW"] == 0 and s["MOT_recall"] == pytest.approx(1.0)
        assert result.per_phrase[phrase]["pred_count"] == result.per_phrase[phrase]["gt_count"] + 1
    assert results[BLUE].per_phrase[BLUE]["HOTA"] == 0.0  # only false positives for a phrase that is absent
    assert results[RED].summary["IL_MCC"] > 0.999  # every pair answered right at the video level ...
    assert results[BLUE].summary["IL_MCC"] < 0.5 and results[BLUE].summary["cgF1"] < 50  # ... not the negative


def test_masklets_below_the_score_threshold_are_left_out():
    pred = _masklets(_masklet(1, _a), _masklet(2, _b), _masklet(5, _ghost, score=0.2))
    assert evaluate_video(_ground_truth(), pred).summary["pred_count"] == 3
    assert evaluate_video(_ground_truth(), pred, score_threshold=0.5).summary["pred_count"] == 2


def test_a_clip_longer_than_255_frames():  # pycocotools' batched area() overflows past 255 masks
    frames, size = 260, 8
    mask = np.zeros((size, size), dtype=bool)
    mask[2:5, 2:5] = True
    segs = [encode_mask(mask)] * frames
    gt = {"videos": [{"id": 1, "name": "long", "height": size, "width": size, "length": frames}],
          "categories": [{"id": 1, "name": RED}],
          "annotations": [{"id": 1, "video_id": 1, "category_id": 1, "segmentations": segs}]}
    pred = {"format": MASKLETS_FORMAT, "video": {"name": "long", "height": size, "width": size, "num_frames": frames},
            "phrases": [RED], "masklets": [{"id": 1, "phrase": RED, "score": 1.0, "segmentations": segs}]}
    result = evaluate_video(gt, pred)
    assert result.summary["HOTA"] == pytest.approx(1.0) and result.summary["gt_object_frames"] == frames
    assert "cgF1" not in result.summary and "video_np_pairs" in result.notes[0]  # SA-Co/VEval needs them


def test_masklets_round_trip_through_the_cli(tmp_path, capsys):
    from sambridge.tracking import Masklet, TrackResult  # the tracker's own writer

    masklets = [Masklet(id=1, phrase=RED, num_frames=T), Masklet(id=2, phrase=RED, num_frames=T)]
    for t in range(T):
        masklets[0].add(t, _a(t), 0.8)
        masklets[1].add(t, _b(t), 0.7)
    track = TrackResult(phrases=[RED, BLUE], height=H, width=W, num_frames=T, masklets=masklets,
                        video_name="clip-000000")
    write_json_atomic(tmp_path / "gt.json", _ground_truth())
    write_json_atomic(tmp_path / "masklets.json", track.to_json())
    out = tmp_path / "report" / "evaluation.json"

    cli_main(["evaluate-video", "--gt", str(tmp_path / "gt.json"), "--pred", str(tmp_path / "masklets.json"),
              "--out", str(out)])  # raises SystemExit on a non-zero exit code
    printed = capsys.readouterr().out
    assert "HOTA" in printed and "IDSW_per_100" in printed and RED in printed
    written = json.loads(out.read_text())
    assert written["summary"]["HOTA"] == pytest.approx(1.0) and written["summary"]["IDSW"] == 0
    assert written["summary"] == pytest.approx(evaluate_video(_ground_truth(), track.to_json()).summary)
    assert written["per_phrase"][BLUE]["HOTA"] is None and written["pred"] == [str(tmp_path / "masklets.json")]


def _unknown_phrase(gt: dict, pred: dict) -> tuple[dict, dict]:
    pred["phrases"].append("green triangle")
    return gt, pred


def _unknown_category(gt: dict, pred: dict) -> tuple[dict, dict]:
    gt["annotations"][0]["category_id"] = 9
    return gt, pred


@pytest.mark.parametrize(("spoil", "expected"), [
    (None, r"No such file.*masklets\.json"),
    (lambda g, p: (g, "{not json"), r"masklets\.json: file: not valid JSON"),
    (lambda g, p: (g, {**p, "format": "coco"}), r"masklets\.json: top level, field 'format'"),
    (lambda g, p: (g, {**p, "video": {**p["video"], "name": "clip-9"}}),
     r"masklets\.json: video, field 'name'.*'clip-9'"),
    (_unknown_phrase, r"masklets\.json: phrases\[2\], field 'phrases'.*'green triangle'"),
    (lambda g, p: (g, {**p, "masklets": [{**p["masklets"][0], "segmentations": [None]}]}),
     r"masklets\.json: masklets\[0\] \(id 1, phrase 'red circle'\), field 'segmentations'"),
    (_unknown_category, r"gt\.json: annotations\[0\] \(id 7\), field 'category_id'"),
])
def test_a_bad_file_exits_2_with_one_line_naming_file_and_field(tmp_path, capsys, spoil, expected):
    gt, pred = _ground_truth(), _masklets(_masklet(1, _a))
    if spoil is not None:
        gt, pred = spoil(gt, pred)
        if isinstance(pred, str):
            (tmp_path / "masklets.json").write_text(pred)
        else:
            write_json_atomic(tmp_path / "masklets.json", pred)
    write_json_atomic(tmp_path / "gt.json", gt)
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["evaluate-video", "--gt", str(tmp_path / "gt.json"), "--pred", str(tmp_path / "masklets.json")])
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    assert re.search(expected, lines[0]), lines[0]
