"""SA-Co files: bad records are named, and our GT/prediction exports are read alike by us and by SAM3."""

from __future__ import annotations

import contextlib
import copy
import io

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from data_pipelines.atomic import write_json_atomic
from data_pipelines.batch import GroundingBatch
from data_pipelines.schema import Query, Sample, decode_rle, encode_image, instance_from_mask
from sambridge.evaluate import evaluate_files
from sambridge.metrics import (
    SAM3_KEYS,
    RecordError,
    batch_prediction_records,
    ground_truth_from_samples,
    load_ground_truth,
    load_predictions,
    make_synthetic_saco,
    parse_ground_truth,
    prediction_records,
    saco_pair_id,
)


@pytest.fixture(scope="module")
def files():
    data = make_synthetic_saco(12, seed=31, crowd_region_fraction=0.3)
    return data.ground_truths[0], data.predictions


def _gt_error(gt: dict, tmp_path) -> RecordError:
    write_json_atomic(tmp_path / "gt.json", gt)
    with pytest.raises(RecordError) as info:
        load_ground_truth(tmp_path / "gt.json")
    assert str(tmp_path / "gt.json") in str(info.value)
    return info.value


def _pred_error(gt: dict, preds: list, tmp_path) -> RecordError:
    write_json_atomic(tmp_path / "gt.json", gt)
    write_json_atomic(tmp_path / "pred.json", preds)
    with pytest.raises(RecordError) as info:
        load_predictions(tmp_path / "pred.json", load_ground_truth(tmp_path / "gt.json"))
    assert str(tmp_path / "pred.json") in str(info.value)
    return info.value


PRED_BREAKS = {
    "unknown image": (lambda p: p.update(image_id=999_999), "image_id", "no image in the ground truth"),
    "rle size": (lambda p: p["segmentation"].update(size=[7, 9]), "segmentation.size", "does not match"),
    "missing score": (lambda p: p.pop("score"), "score", "probability in [0, 1]"),
    "nan score": (lambda p: p.update(score=float("nan")), "score", "probability in [0, 1]"),
    "score above 1": (lambda p: p.update(score=7.5), "score", "probability in [0, 1]"),
    "negative score": (lambda p: p.update(score=-0.1), "score", "probability in [0, 1]"),
    "unknown category": (lambda p: p.update(category_id=5), "category_id", "not one of"),
    "polygon": (lambda p: p.update(segmentation=[[0, 0, 5, 0, 5, 5]]), "segmentation", "compressed RLE"),
    "bad bbox": (lambda p: p.update(bbox=[1, 2, 3]), "bbox", "[x, y, w, h]"),
}


@pytest.mark.parametrize("name", list(PRED_BREAKS))
def test_bad_prediction_is_named(files, tmp_path, name):
    gt, preds = files
    breaker, field, message = PRED_BREAKS[name]
    preds = copy.deepcopy(preds)
    image_id = preds[3]["image_id"]
    breaker(preds[3])
    err = _pred_error(gt, preds, tmp_path)
    assert err.record.startswith("predictions[3]") and err.field == field and message in err.reason
    if name != "unknown image":
        assert f"image_id {image_id}" in err.record


GT_BREAKS = {
    "no exhaustive flag": ("images", 1, lambda r: r.pop("is_instance_exhaustive"), "is_instance_exhaustive"),
    "no phrase": ("images", 1, lambda r: r.update(text_input=""), "text_input"),
    "bad height": ("images", 1, lambda r: r.update(height=0), "height"),
    "unknown image": ("annotations", 2, lambda r: r.update(image_id=-4), "image_id"),
    "duplicate id": ("annotations", 2, lambda r: r.update(id=1), "id"),
    "rle size": ("annotations", 2, lambda r: r["segmentation"].update(size=[3, 3]), "segmentation.size"),
    "short runs": (
        "annotations",
        2,
        lambda r: r["segmentation"].update(counts=[1, 2, 3]),
        "segmentation.counts",
    ),
    "bad crowd flag": ("annotations", 2, lambda r: r.update(iscrowd=2), "iscrowd"),
}


@pytest.mark.parametrize("name", list(GT_BREAKS))
def test_bad_ground_truth_is_named(files, tmp_path, name):
    gt = copy.deepcopy(files[0])
    section, index, breaker, field = GT_BREAKS[name]
    record_id = gt[section][index]["id"]
    breaker(gt[section][index])
    err = _gt_error(gt, tmp_path)
    assert err.record.startswith(f"{section}[{index}]") and err.field == field
    if name != "duplicate id":
        assert f"id {record_id}" in err.record


def test_bad_file_structure(files, tmp_path):
    gt = {k: v for k, v in files[0].items() if k != "categories"}
    assert _gt_error(gt, tmp_path).field == "categories"
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(ValueError, match="broken.json: not valid JSON"):
        load_ground_truth(tmp_path / "broken.json")
    assert _pred_error(files[0], {"image_id": 1}, tmp_path).record == "top level"


def test_polygons_and_uncompressed_rle_ground_truth(files):
    gt = copy.deepcopy(files[0])
    image = gt["images"][0]
    gt["annotations"].append(
        {
            "id": 10_000,
            "image_id": image["id"],
            "category_id": 1,
            "segmentation": [[2, 2, 20, 2, 20, 12, 2, 12]],
        }
    )
    parsed = parse_ground_truth(gt)
    polygon_rle = parsed.instances[image["id"]][-1]
    assert isinstance(polygon_rle["counts"], str) and polygon_rle["size"] == [image["height"], image["width"]]
    assert parsed.crowds and any(parsed.crowds.values())  # the generator's uncompressed crowd RLEs


# ------------------------------------------------------------------ exports
def _samples() -> list[Sample]:
    rng = np.random.default_rng(0)
    samples = []
    for s in range(4):
        h, w = 40 + 8 * s, 56
        queries = []
        for q, phrase in enumerate(("apple", "leaf", "pear")):
            masks = []
            for _ in range((s + q) % 3):
                mask = np.zeros((h, w), dtype=bool)
                y, x = rng.integers(0, h - 10), rng.integers(0, w - 10)
                mask[y : y + rng.integers(4, 10), x : x + rng.integers(4, 10)] = True
                masks.append(mask)
            queries.append(
                Query(
                    phrase=phrase,
                    instances=[instance_from_mask(m) for m in masks],
                    exhaustive=(s, q) != (3, 2),
                )
            )
        samples.append(
            Sample(
                key=f"orchard_{s:03d}",
                image=encode_image(np.zeros((h, w, 3), np.uint8)),
                image_format="png",
                width=w,
                height=h,
                queries=queries,
                image_id=s,
            )
        )
    return samples


def test_exports_are_read_alike_by_us_and_sam3(tmp_path):
    from sam3.eval.cgf1_eval import CGF1Evaluator

    samples = _samples()
    gt = ground_truth_from_samples(samples)
    assert len(gt["images"]) == 12 and gt["images"][0]["sample_key"] == "orchard_000"
    predictions = []
    for sample in samples:
        for query in sample.queries:
            masks = [decode_rle(i.rle) for i in query.instances]
            masks.append(np.zeros((sample.height, sample.width), dtype=bool))
            masks[-1][:3, :3] = True  # plus one false detection
            masks = torch.from_numpy(np.stack(masks))
            boxes = torch.tensor(
                [
                    [i.bbox[0], i.bbox[1], i.bbox[0] + i.bbox[2], i.bbox[1] + i.bbox[3]]
                    for i in query.instances
                ]
                + [[0, 0, 3, 3]],
                dtype=torch.float32,
            )
            scores = torch.linspace(0.9, 0.4, len(masks))
            predictions += prediction_records(saco_pair_id(sample.key, query.phrase), masks, scores, boxes)
    first = gt["annotations"][0]  # boxes are written as COCO [x, y, w, h], like the ground truth's
    first_pred = next(p for p in predictions if p["image_id"] == first["image_id"])
    assert first_pred["bbox"] == pytest.approx(first["bbox"])
    write_json_atomic(tmp_path / "gt.json", gt)
    write_json_atomic(tmp_path / "pred.json", predictions)
    ours = evaluate_files(tmp_path / "gt.json", tmp_path / "pred.json")
    with contextlib.redirect_stdout(io.StringIO()):
        theirs = CGF1Evaluator(str(tmp_path / "gt.json")).evaluate(str(tmp_path / "pred.json"))
    for key, (sam3_key, scale) in SAM3_KEYS.items():
        value = theirs[f"cgF1_eval_segm_{sam3_key}"]
        assert ours[key] == pytest.approx(value * scale if value != -1 else -1.0, abs=1e-6), key
    assert ours["num_skipped"] == 1 and ours["AP50"] > 0.5


def test_batch_predictions_map_back_to_the_original_images(tmp_path):
    # rectangles at even pixel positions survive a 2x downscale onto the canvas and the way back exactly
    apples = [[_rect(40, 56, 2 * s, 4, 10, 8), _rect(40, 56, 20, 30, 6, 12)] for s in range(2)]
    samples = [
        Sample(
            key=f"row_{s}",
            image=b"",
            image_format="png",
            width=56,
            height=40,
            queries=[Query("apple", [instance_from_mask(m) for m in apples[s]]), Query("pear", [])],
        )
        for s in range(2)
    ]
    canvas = 32
    masks = torch.from_numpy(np.stack([m[::2, ::2] for pair in apples for m in pair]))
    batch = GroundingBatch(
        images=torch.zeros(2, 3, canvas, canvas),
        valid_hw=torch.tensor([[20, 28]] * 2),
        orig_hw=torch.tensor([[40, 56]] * 2),
        keys=[s.key for s in samples],
        phrases=["apple", "pear"] * 2,
        query_image=torch.tensor([0, 0, 1, 1]),
        exhaustive=torch.ones(4, dtype=torch.bool),
        num_instances=torch.tensor([2, 0, 2, 0]),
        boxes=torch.zeros(4, 4),
        masks=F.pad(masks, (0, canvas - 28, 0, canvas - 20)),
        instance_query=torch.tensor([0, 0, 2, 2]),
    )
    batch.validate()
    # padded (Q, K, ...) predictions: each query's instances plus a dropped (keep=False) junk slot
    pred = torch.zeros((4, 3, canvas, canvas), dtype=torch.bool)
    pred[0, :2], pred[2, :2], pred[1, 2] = batch.masks[0:2], batch.masks[2:4], True
    keep = torch.tensor([[True, True, False], [False] * 3, [True, True, False], [False] * 3])
    boxes = torch.zeros((4, 3, 4))
    for q, i in ((0, 0), (0, 1), (2, 0), (2, 1)):
        ys, xs = torch.nonzero(pred[q, i], as_tuple=True)
        boxes[q, i] = torch.tensor([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]) / canvas
    records = batch_prediction_records(
        {"masks": pred, "scores": torch.full((4, 3), 0.9), "keep": keep, "boxes_xyxy": boxes}, batch
    )
    assert len(records) == 4
    assert {r["image_id"] for r in records} == {saco_pair_id(s.key, "apple") for s in samples}
    gt = ground_truth_from_samples(samples)
    np.testing.assert_allclose([r["bbox"] for r in records], [a["bbox"] for a in gt["annotations"]])
    write_json_atomic(tmp_path / "gt.json", gt)
    write_json_atomic(tmp_path / "pred.json", records)
    metrics = evaluate_files(tmp_path / "gt.json", tmp_path / "pred.json")
    assert metrics["mIoU"] == 1.0 and metrics["IL_MCC"] == pytest.approx(1.0, abs=1e-5)
    assert metrics["AP"] == 1.0 and metrics["count_mae"] == 0


def _rect(h: int, w: int, y: int, x: int, dh: int, dw: int) -> np.ndarray:
    mask = np.zeros((h, w), dtype=bool)
    mask[y : y + dh, x : x + dw] = True
    return mask


def test_pair_ids_are_stable_and_duplicates_rejected():
    assert saco_pair_id("orchard_000", "apple") == saco_pair_id("orchard_000", "apple")
    assert saco_pair_id("orchard_000", "apple") != saco_pair_id("orchard_000", "pear")
    assert 0 < saco_pair_id("x", "y") < 2**53
    samples = _samples()
    with pytest.raises(ValueError, match="sample 'orchard_001', phrase 'apple'.*already used"):
        ground_truth_from_samples([samples[0], samples[1], samples[1]])
    with pytest.raises(ValueError, match="expected masks"):
        prediction_records(1, torch.zeros((2, 4, 4), dtype=torch.bool), torch.ones(3))
