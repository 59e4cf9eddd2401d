"""Tiling: windows, windowed RLE decoding, training crops and tiled prediction with an oracle predictor."""

from __future__ import annotations

import time

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from data_pipelines.schema import Query, Sample, decode_rle, encode_mask, instance_from_mask, validate_meta
from data_pipelines.tiling import (
    CropConfig,
    TilingConfig,
    Window,
    crop_queries,
    decode_rle_window,
    predict_tiled,
    random_training_crop,
    tile_windows,
)

TILE, OVERLAP = 1024, 256  # tile starts 0, 768, 1536, 1976 across 3000 and 0, 768, 976 down 2000


def test_tile_windows_cover_the_image_with_the_overlap() -> None:
    windows = tile_windows(2000, 3000, TILE, OVERLAP)
    assert sorted({w.left for w in windows}) == [0, 768, 1536, 1976]
    assert sorted({w.top for w in windows}) == [0, 768, 976]
    assert all((w.height, w.width) == (TILE, TILE) for w in windows)
    covered = np.zeros((2000, 3000), np.int8)
    for w in windows:
        covered[w.slices] += 1
    assert covered.min() == 1
    assert tile_windows(500, 3000, TILE, 0)[0] == Window(0, 0, 500, TILE)  # short side: one tile row
    with pytest.raises(ValueError, match="overlap"):
        tile_windows(10, 10, 8, 8)


def test_decode_rle_window_equals_slicing_the_full_mask() -> None:
    rng = np.random.default_rng(0)
    for trial in range(200):
        h, w = (int(v) for v in rng.integers(1, 30, 2))
        mask = rng.random((h, w)) < rng.random()
        top, left = int(rng.integers(0, h)), int(rng.integers(0, w))
        window = Window(top, left, int(rng.integers(1, h - top + 1)), int(rng.integers(1, w - left + 1)))
        rle = encode_mask(mask)
        assert np.array_equal(decode_rle_window(rle, window), mask[window.slices]), trial
    flat = np.array([[0, 1], [1, 1]], bool)
    uncompressed = {"size": [2, 2], "counts": [1, 3]}  # column-major runs: 0, then three 1s
    assert np.array_equal(decode_rle_window(uncompressed, Window(0, 0, 2, 2)), flat)


# ----------------------------------------------------------------------------------------------
# tiled prediction
# ----------------------------------------------------------------------------------------------
def _scene(height: int = 2000, width: int = 3000, seed: int = 0) -> np.ndarray:
    """Instance-id map of non-touching discs, many straddling tile borders (ids 1..N)."""
    rng = np.random.default_rng(seed)
    windows = tile_windows(height, width, TILE, OVERLAP)
    borders_x = sorted({b for w in windows for b in (w.left, w.right) if 80 < b < width - 80})
    borders_y = sorted({b for w in windows for b in (w.top, w.bottom) if 80 < b < height - 80})
    centres = [(y, x) for y in borders_y for x in borders_x]  # on crossings of tile borders
    centres += [
        (int(rng.integers(80, height - 80)), int(borders_x[i % len(borders_x)] + rng.integers(-40, 40)))
        for i in range(20)
    ]  # across vertical borders
    centres += [(int(rng.integers(80, height - 80)), int(rng.integers(80, width - 80))) for _ in range(60)]
    ids = np.zeros((height, width), np.int32)
    for cy, cx in centres:
        r = int(rng.integers(15, 75))
        y0, y1, x0, x1 = (
            max(cy - r - 2, 0),
            min(cy + r + 3, height),
            max(cx - r - 2, 0),
            min(cx + r + 3, width),
        )
        yy, xx = np.mgrid[y0:y1, x0:x1]
        disk = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
        if ids[y0:y1, x0:x1].any():  # keep a gap so that no two objects touch
            continue
        ids[y0:y1, x0:x1][disk] = ids.max() + 1
    return ids


def _encode_ids(ids: np.ndarray) -> np.ndarray:
    """The ids as an RGB image the oracle reads back (what the model "sees")."""
    return np.stack([ids % 256, ids // 256, np.zeros_like(ids)], -1).astype(np.uint8)


def _oracle(duplicates: bool = False):
    """Per tile, the visible piece of every object: even ids are apples, odd ids leaves."""

    def predict_tile(tile: np.ndarray, phrases: list[str]) -> list[list[tuple]]:
        ids = tile[..., 0].astype(np.int32) + 256 * tile[..., 1].astype(np.int32)
        found: dict[str, list[tuple]] = {"apple": [], "leaf": []}
        for i in np.unique(ids[ids > 0]):
            piece = ids == i
            phrase = "apple" if i % 2 == 0 else "leaf"
            found[phrase].append((piece, 0.5 + (i % 40) / 100, (0, 0, 1, 1)))
            if duplicates:  # the same object again, lower score and as probabilities
                found[phrase].append((piece.astype(np.float32) * 0.9, 0.1))
        return [found[p] for p in phrases]

    return predict_tile


def _match(predictions, ids: np.ndarray, object_ids: list[int]) -> np.ndarray:
    truth = [encode_mask(ids == i) for i in object_ids]
    truth = [{"size": t["size"], "counts": t["counts"].encode()} for t in truth]
    found = [{"size": p.rle["size"], "counts": p.rle["counts"].encode()} for p in predictions]
    return np.asarray(mask_utils.iou(found, truth, [0] * len(truth)))


def test_tiled_prediction_returns_every_object_once_with_its_whole_mask() -> None:
    ids = _scene()
    image = _encode_ids(ids)
    start = time.perf_counter()
    result = predict_tiled(image, ["apple", "leaf"], _oracle(), TilingConfig(TILE, OVERLAP))
    seconds = time.perf_counter() - start
    total = 0
    for phrase, parity in (("apple", 0), ("leaf", 1)):
        object_ids = [i for i in range(1, ids.max() + 1) if i % 2 == parity]
        ious = _match(result[phrase], ids, object_ids)
        assert ious.shape == (len(object_ids), len(object_ids))  # as many predictions as objects
        assert (ious.max(0) > 0.99).all() and (ious.max(1) > 0.99).all()  # one-to-one
        assert ((ious > 0.5).sum(0) == 1).all()
        for prediction in result[phrase]:
            assert prediction.bbox == [
                float(v)
                for v in mask_utils.toBbox(
                    {"size": prediction.rle["size"], "counts": prediction.rle["counts"].encode()}
                )
            ]
        total += len(object_ids)
    pieces = [p.pieces for p in result["apple"] + result["leaf"]]
    assert total >= 60 and max(pieces) >= 4 and sum(n > 1 for n in pieces) >= 20  # straddlers were merged
    assert seconds < 10


def test_duplicates_in_one_tile_are_removed_by_nms_only() -> None:
    ids = _scene(seed=1)
    image = _encode_ids(ids)
    config = TilingConfig(TILE, OVERLAP)
    result = predict_tiled(image, ["apple", "leaf"], _oracle(duplicates=True), config)
    apples = [i for i in range(1, ids.max() + 1) if i % 2 == 0]
    assert len(result["apple"]) == len(apples) and all(p.score > 0.1 for p in result["apple"])
    without_nms = predict_tiled(
        image, ["apple"], _oracle(duplicates=True), TilingConfig(TILE, OVERLAP, nms_iou=None)
    )
    # without NMS, the two answers of one tile stay apart unless another tile's answer links them:
    # exactly the objects that only one tile sees come twice
    windows = tile_windows(*ids.shape, TILE, OVERLAP)
    one_tile = [i for i in apples if sum((ids[w.slices] == i).any() for w in windows) == 1]
    assert 0 < len(one_tile) < len(apples)
    assert len(without_nms["apple"]) == len(apples) + len(one_tile)


def test_touching_objects_across_a_border_stay_apart() -> None:
    ids = np.zeros((1024, 1800), np.int32)
    ids[100:300, 700:850] = 2  # inside the overlap of tiles 0 and 1 (columns 776..1024)
    ids[100:300, 850:1000] = 4  # touches object 2 along column 850
    ids[500:600, 1000:1100] = 6  # cut by the border at column 1024
    result = predict_tiled(_encode_ids(ids), ["apple"], _oracle(), TilingConfig(TILE, OVERLAP))["apple"]
    ious = _match(result, ids, [2, 4, 6])
    assert len(result) == 3 and (ious.max(0) == 1.0).all()


def test_predictor_output_is_checked() -> None:
    image = np.zeros((300, 300, 3), np.uint8)
    with pytest.raises(ValueError, match=r"shape \(10, 10\) for the tile at \(top, left\) = \(0, 0\)"):
        predict_tiled(
            image, ["apple"], lambda tile, phrases: [[(np.ones((10, 10), bool), 0.9)]], TilingConfig(256, 64)
        )
    with pytest.raises(ValueError, match="1 detection lists for 2 phrases"):
        predict_tiled(image, ["apple", "leaf"], lambda tile, phrases: [[]], TilingConfig(256, 64))
    with pytest.raises(ValueError, match="unique"):
        predict_tiled(image, ["apple", "apple"], lambda tile, phrases: [[], []])


# ----------------------------------------------------------------------------------------------
# training crops
# ----------------------------------------------------------------------------------------------
def _field(height: int = 600, width: int = 800) -> tuple[np.ndarray, list[np.ndarray], list[Query]]:
    rng = np.random.default_rng(3)
    image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    yy, xx = np.mgrid[:height, :width]
    apples = [
        ((yy - cy) ** 2 + (xx - cx) ** 2) <= r * r
        for cy, cx, r in ((100, 100, 40), (300, 420, 60), (500, 700, 30), (50, 600, 25), (450, 200, 50))
    ]
    queries = [
        Query("apple", [instance_from_mask(m) for m in apples]),
        Query("pear", []),
        Query("leaf", [instance_from_mask(apples[0] & (xx < 90))], exhaustive=False),
    ]
    return image, apples, queries


def test_training_crops_keep_masks_boxes_and_exhaustiveness_consistent() -> None:
    image, apples, queries = _field()
    config = CropConfig(size=(160, 200), min_visible_fraction=0.5, min_visible_pixels=16, focus_prob=0.5)
    rng = np.random.default_rng(0)
    seen = {"truncated": 0, "removed": 0, "non_exhaustive": 0, "negative": 0}
    for _ in range(60):
        crop = random_training_crop(image, queries, config, rng)
        window = crop.window
        assert (window.height, window.width) == (160, 200)
        assert np.array_equal(crop.image, image[window.slices])
        apple = crop.queries[0]
        kept = [decode_rle(inst.rle) for inst in apple.instances]
        expected_cut = False
        expected = []
        for mask in apples:
            visible = mask[window.slices]
            fraction = visible.sum() / mask.sum()
            if fraction >= 0.5:
                expected.append(visible)
            elif visible.sum() >= 16:
                expected_cut = True
        assert len(kept) == len(expected)
        assert all(np.array_equal(k, e) for k, e in zip(kept, expected, strict=True))
        assert crop.truncated[0] == [
            bool(e.sum() < m.sum())
            for e, m in zip(
                expected, [m for m in apples if m[window.slices].sum() / m.sum() >= 0.5], strict=True
            )
        ]
        assert apple.exhaustive == (not expected_cut)
        assert crop.queries[1] == Query("pear", [], exhaustive=True)
        assert crop.queries[2].exhaustive is False  # stays non-exhaustive whatever the crop
        sample = Sample(
            key="k",
            image=b"",
            image_format="png",
            width=window.width,
            height=window.height,
            queries=crop.queries,
        )
        validate_meta(sample.meta())  # boxes agree with the cropped masks, RLE sizes with the crop
        seen["truncated"] += sum(crop.truncated[0])
        seen["removed"] += crop.removed
        seen["non_exhaustive"] += not apple.exhaustive
        seen["negative"] += not apple.instances and apple.exhaustive
    assert all(count > 0 for count in seen.values()), seen  # every case happened


def test_focused_crops_contain_an_instance_and_small_images_stay_whole() -> None:
    image, apples, queries = _field()
    rng = np.random.default_rng(1)
    config = CropConfig(size=(128, 128), focus_prob=1.0)
    for _ in range(30):
        crop = random_training_crop(image, queries, config, rng)
        assert any(m[crop.window.slices].any() for m in apples)
    whole = random_training_crop(image[:100, :90], [Query("pear", [])], CropConfig(size=(256, 256)), rng)
    assert whole.window == Window(0, 0, 100, 90) and whole.image.shape == (100, 90, 3)


def test_crop_queries_checks_rle_size_and_counts_slivers() -> None:
    mask = np.zeros((100, 100), bool)
    mask[10:90, 10:90] = True
    query = Query("weed", [instance_from_mask(mask)])
    # 2 x 80 visible pixels of 6400: removed; 160 >= 16 pixels make the query non-exhaustive
    (cut,), _, removed = crop_queries([query], Window(0, 88, 100, 12), (100, 100))
    assert cut.instances == [] and not cut.exhaustive and removed == 1
    (sliver,), _, _ = crop_queries([query], Window(0, 88, 100, 12), (100, 100), min_visible_pixels=200)
    assert sliver.exhaustive
    with pytest.raises(ValueError, match="RLE size"):
        crop_queries([query], Window(0, 0, 10, 10), (50, 50))
    with pytest.raises(ValueError, match="invalid crop settings"):
        CropConfig(min_visible_fraction=0)
