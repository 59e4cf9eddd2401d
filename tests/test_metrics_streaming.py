"""ConceptSegmentationMetrics equals the file evaluator: query by query, from batches, across DDP ranks."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from pycocotools import mask as mask_utils

from data_pipelines.batch import GroundingBatch
from sambridge.evaluate import evaluate_saco
from sambridge.metrics import (
    ConceptSegmentationMetrics,
    encode_masks,
    make_synthetic_saco,
    mask_ious,
    parse_ground_truth,
    parse_predictions,
    rle_ious,
)
from sambridge.metrics import masks as masks_module


def _masks(rles, height, width) -> torch.Tensor:
    if not rles:
        return torch.zeros((0, height, width), dtype=torch.bool)
    return torch.from_numpy(np.moveaxis(mask_utils.decode(rles), -1, 0).astype(bool))


def _queries(num_queries: int, seed: int):
    """Synthetic queries as the tensors a validation loop has, and the same data evaluated from files."""
    data = make_synthetic_saco(num_queries, seed=seed, crowd_region_fraction=0.0)
    gt = parse_ground_truth(data.ground_truths[0])
    predictions = parse_predictions(data.predictions, gt)
    by_image: dict[int, list[dict]] = {}
    for pred in predictions:
        by_image.setdefault(pred["image_id"], []).append(pred)
    queries = []
    for image in data.ground_truths[0]["images"]:
        h, w, preds = image["height"], image["width"], by_image.get(image["id"], [])
        queries.append(
            dict(
                pred_masks=_masks([p["segmentation"] for p in preds], h, w),
                pred_scores=torch.tensor([p["score"] for p in preds], dtype=torch.float64),
                gt_masks=_masks(gt.instances[image["id"]], h, w),
                exhaustive=bool(image["is_instance_exhaustive"]),
                phrase=image["text_input"],
                image_id=image["id"],
            )
        )
    return queries, evaluate_saco(gt, predictions)


def _update(metric: ConceptSegmentationMetrics, queries: list[dict]) -> None:
    for i in range(0, len(queries), 7):  # batches of up to 7 queries
        chunk = queries[i : i + 7]
        metric.update(
            [q["pred_masks"] for q in chunk],
            [q["pred_scores"] for q in chunk],
            [q["gt_masks"] for q in chunk],
            [q["exhaustive"] for q in chunk],
            [q["phrase"] for q in chunk],
            [q["image_id"] for q in chunk],
        )


def test_tensor_ious_equal_pycocotools_bit_for_bit(monkeypatch):
    gen = torch.Generator().manual_seed(1)
    pred, gt = torch.rand((37, 50, 60), generator=gen) > 0.5, torch.rand((23, 50, 60), generator=gen) > 0.7
    gt[3] = False  # an empty instance: IoU 0, as pycocotools
    expected = rle_ious(encode_masks(pred), encode_masks(gt))
    assert np.array_equal(mask_ious(pred, gt), expected)
    monkeypatch.setattr(masks_module, "_CHUNK_ELEMENTS", 50 * 60 * 7)  # ragged 7-mask chunks on both sides
    assert np.array_equal(mask_ious(pred, gt), expected)
    assert mask_ious(pred[:0], gt).shape == (0, 23) and mask_ious(pred, gt[:0]).shape == (37, 0)


@pytest.fixture(scope="module")
def data():
    return _queries(150, seed=21)


def test_streaming_equals_file_evaluation(data):
    queries, evaluation = data
    metric = ConceptSegmentationMetrics(prefix="val_")
    _update(metric, queries)
    out = metric.compute()
    assert set(out) == {f"val_{k}" for k in evaluation.metrics}
    for key, value in evaluation.metrics.items():
        assert float(out[f"val_{key}"]) == pytest.approx(value, abs=1e-9), key
    assert metric.per_phrase() == evaluation.per_phrase()
    table = metric.query_table()
    assert table.image_ids == [str(i) for i in evaluation.queries.image_ids]
    assert out["val_num_skipped"] > 0 and out["val_num_queries"] == len(evaluation.queries)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_streaming_on_cuda_with_tf32_equals_file_evaluation(data):
    queries, evaluation = data
    cuda = [{**q, **{k: q[k].cuda() for k in ("pred_masks", "pred_scores", "gt_masks")}} for q in queries]
    metric = ConceptSegmentationMetrics().to("cuda")
    allow_tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True  # pixel counts stay exact: 0/1 inputs, fp32 sums
    try:
        _update(metric, cuda)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = allow_tf32
    out = metric.compute()
    for key, value in evaluation.metrics.items():
        assert float(out[key]) == pytest.approx(value, abs=1e-9), key


def test_reset_and_empty(data):
    queries, _ = data
    metric = ConceptSegmentationMetrics()
    _update(metric, queries[:20])
    metric.reset()
    with pytest.warns(UserWarning, match="before the ``update``"):
        out = metric.compute()
    assert out["num_queries"] == 0 and out["AP"] == -1 and out["cgF1"] == 0 and out["mIoU"] == -1


def test_update_from_batch_compares_inside_the_valid_area():
    gen = torch.Generator().manual_seed(0)
    canvas, valid = (40, 48), [(40, 48), (30, 36)]
    masks = torch.rand((3, *canvas), generator=gen) > 0.6
    masks[2, 30:, :] = False
    masks[2, :, 36:] = False  # instances live inside their image
    batch = GroundingBatch(
        images=torch.zeros(2, 3, *canvas),
        valid_hw=torch.tensor(valid),
        orig_hw=torch.tensor(valid),
        keys=["img_a", "img_b"],
        phrases=["apple", "leaf", "apple"],
        query_image=torch.tensor([0, 0, 1]),
        exhaustive=torch.tensor([True, True, True]),
        num_instances=torch.tensor([2, 0, 1]),
        boxes=torch.zeros(3, 4),
        masks=masks,
        instance_query=torch.tensor([0, 0, 2]),
    )
    batch.validate()
    pred = [masks[0:2].clone(), torch.zeros((1, *canvas), dtype=torch.bool), masks[2:3].clone()]
    pred[1][0, :5, :5] = True  # a false detection on the negative
    pred[2][0, 30:, :] = True  # junk in image 1's padding must not count
    scores = [torch.tensor([0.9, 0.8]), torch.tensor([0.7]), torch.tensor([0.95])]
    from_batch = ConceptSegmentationMetrics()
    from_batch.update_from_batch({"masks": pred, "scores": scores}, batch)
    direct = ConceptSegmentationMetrics()
    direct.update(
        [pred[0], pred[1], pred[2][:, :30, :36]],
        scores,
        [masks[0:2], masks[2:2], masks[2:3, :30, :36]],
        [True] * 3,
        batch.phrases,
        ["img_a", "img_a", "img_b"],
    )
    a = {k: float(v) for k, v in from_batch.compute().items()}
    assert a == pytest.approx({k: float(v) for k, v in direct.compute().items()})
    assert a["mIoU"] == pytest.approx(2 / 3)  # two perfect positives, one wrong negative
    assert a["IL_MCC"] == pytest.approx(0.0, abs=1e-6) and a["count_mae"] == pytest.approx(1 / 3)
    assert from_batch.query_table().image_ids == ["img_a", "img_a", "img_b"]

    # padded (Q, K, ...) tensors with a keep mask, as a model's postprocess returns them: slots with
    # keep=False (here an empty mask scored 0.9) are not detections
    padded = torch.zeros((3, 2, *canvas), dtype=torch.bool)
    padded[0], padded[1, 0], padded[2, 0] = pred[0], pred[1][0], pred[2][0]
    padded_scores = torch.tensor([[0.9, 0.8], [0.7, 0.9], [0.95, 0.9]])
    keep = torch.tensor([[True, True], [True, False], [True, False]])
    from_padded = ConceptSegmentationMetrics()
    from_padded.update_from_batch({"masks": padded, "scores": padded_scores, "keep": keep}, batch)
    assert {k: float(v) for k, v in from_padded.compute().items()} == pytest.approx(a)


def _box(rows: slice, cols: slice) -> torch.Tensor:
    mask = torch.zeros((10, 10), dtype=torch.bool)
    mask[rows, cols] = True
    return mask


def _one_image_batch(instances: list[list[torch.Tensor]]) -> GroundingBatch:
    """A 10x10 image with one exhaustive "apple" query per entry of ``instances`` (its instance masks)."""
    num = torch.tensor([len(query) for query in instances])
    batch = GroundingBatch(
        images=torch.zeros(1, 3, 10, 10),
        valid_hw=torch.tensor([[10, 10]]),
        orig_hw=torch.tensor([[10, 10]]),
        keys=["img"],
        phrases=["apple"] * len(instances),
        query_image=torch.zeros(len(instances), dtype=torch.long),
        exhaustive=torch.ones(len(instances), dtype=torch.bool),
        num_instances=num,
        boxes=torch.zeros(int(num.sum()), 4),
        masks=torch.stack([m for query in instances for m in query]),
        instance_query=torch.repeat_interleave(torch.arange(len(instances)), num),
    )
    batch.validate()
    return batch


def test_duplicate_rate_counts_detections_beyond_the_first_on_an_instance():
    a, b = _box(slice(0, 5), slice(0, 5)), _box(slice(5, 10), slice(5, 10))
    shrunk_a = _box(slice(0, 4), slice(0, 5))  # IoU 0.8 with a: a second detection of it
    detections = [a, shrunk_a, b, _box(slice(0, 3), slice(7, 10))]  # the last is a false positive
    metric = ConceptSegmentationMetrics(prefix="val_")
    metric.update_from_batch({"masks": [torch.stack(detections)], "scores": [torch.tensor([0.9, 0.8, 0.7, 0.6])]},
                             _one_image_batch([[a, b]]))
    out = metric.compute()
    assert float(out["val_duplicate_rate"]) == pytest.approx(1 / 4)  # 1 duplicate of 4 detections
    assert float(out["val_num_pred"]) == 4 and float(out["val_count_mae"]) == 2


def test_duplicate_rate_ignores_detections_below_the_score_threshold():
    a = _box(slice(0, 5), slice(0, 5))
    metric = ConceptSegmentationMetrics()
    metric.update_from_batch({"masks": [torch.stack([a, a]), torch.stack([a, a])],
                              "scores": [torch.tensor([0.9, 0.49]), torch.tensor([0.3, 0.2])]},
                             _one_image_batch([[a], [a]]))
    out = metric.compute()
    assert float(out["duplicate_rate"]) == 0.0 and float(out["num_pred"]) == 1
    metric.reset()
    with pytest.warns(UserWarning, match="before the ``update``"):
        assert float(metric.compute()["duplicate_rate"]) == 0.0  # no detections at all


def test_bad_updates_name_the_query():
    metric = ConceptSegmentationMetrics()
    good = torch.zeros((1, 8, 8), dtype=torch.bool)
    with pytest.raises(ValueError, match=r"query 0 \('weed', image 7\): masks must be bool"):
        metric.update([good.float()], [torch.ones(1)], [good], [True], ["weed"], [7])
    with pytest.raises(ValueError, match="expected 1 scores"):
        metric.update([good], [torch.ones(2)], [good], [True], ["weed"], [7])
    with pytest.raises(ValueError, match="of one size"):
        other_size = torch.zeros((1, 8, 9), dtype=torch.bool)
        metric.update([good], [torch.ones(1)], [other_size], [True], ["weed"], [7])
    with pytest.raises(ValueError, match="one entry per query"):
        metric.update([good], [torch.ones(1)], [good], [True, True], ["weed"], [7])
    with pytest.raises(ValueError, match="missing \\['scores'\\]"):
        metric.update_from_batch({"masks": [good]}, None)


def _assert_same_rows(rows: list[dict], expected: list[dict]) -> None:
    """Same phrases and counts; floats equal up to summation order."""
    assert [r["phrase"] for r in rows] == [r["phrase"] for r in expected]
    for row, want in zip(rows, expected, strict=True):
        assert row == {k: pytest.approx(v) if isinstance(v, float) else v for k, v in want.items()}


# ------------------------------------------------------------------ DDP: a real two-process gloo group
def _ddp_worker(rank: int, world_size: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        queries, _ = _queries(60, seed=22)
        results = {}
        shares = {"split": queries[rank::world_size], "rank1_empty": queries if rank == 0 else []}
        for scenario, share in shares.items():
            metric = ConceptSegmentationMetrics()
            _update(metric, share)
            results[scenario] = {
                "metrics": {k: float(v) for k, v in metric.compute().items()},
                "per_phrase": metric.per_phrase(),
                "image_ids": sorted(metric.query_table().image_ids),
            }
        with open(f"{out_dir}/rank{rank}.json", "w") as f:
            json.dump(results, f)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # 10 s: two spawned ranks import torch and sambridge again (fork hangs under gloo)
def test_ddp_sync_counts_each_query_once(tmp_path):
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    queries, evaluation = _queries(60, seed=22)
    single = ConceptSegmentationMetrics()
    _update(single, queries)
    expected = {k: float(v) for k, v in single.compute().items()}
    evaluated = sorted(str(i) for i in evaluation.queries.image_ids)
    for rank in (0, 1):
        results = json.loads((tmp_path / f"rank{rank}.json").read_text())
        for scenario, result in results.items():
            assert result["metrics"] == pytest.approx(expected, abs=1e-9), (rank, scenario)
            assert result["image_ids"] == evaluated  # every exhaustive query exactly once
            _assert_same_rows(result["per_phrase"], single.per_phrase())
