"""The sample schema: masks, keys, validation errors that name file, sample and field, (de)serialisation."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
from pycocotools import mask as mask_utils
from shard_helpers import box_mask, make_sample

from data_pipelines.schema import (
    SampleError,
    checked_image_size,
    compressed_rle_runs,
    decode_rle,
    encode_image,
    encode_mask,
    image_format_of,
    instance_from_mask,
    normalize_phrase,
    rle_bbox,
    sample_from_wds,
    validate_key,
    validate_meta,
)


def _true_runs(mask: np.ndarray) -> list[int]:
    flat = mask.flatten(order="F").astype(np.int8)
    change = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    runs = np.diff(bounds).tolist()
    return [0, *runs] if flat[0] else runs


def test_mask_round_trip_and_box() -> None:
    mask = box_mask(30, 50, 7, 3, 20, 11)
    rle = encode_mask(mask)
    assert isinstance(rle["counts"], str) and rle["size"] == [30, 50]
    assert np.array_equal(decode_rle(rle), mask)
    assert rle_bbox(rle) == [7.0, 3.0, 13.0, 8.0]
    inst = instance_from_mask(mask)
    assert inst.bbox == [7.0, 3.0, 13.0, 8.0]
    # uncompressed RLE (COCO crowd style) decodes to the same mask
    uncompressed = {"size": [30, 50], "counts": _true_runs(mask)}
    assert np.array_equal(decode_rle(uncompressed), mask)


def test_compressed_runs_match_pycocotools() -> None:
    rng = np.random.default_rng(0)
    for trial in range(50):
        h, w = (int(v) for v in rng.integers(1, 70, 2))
        mask = rng.random((h, w)) < rng.random() if trial % 2 else box_mask(h, w, 0, h // 2, w, h)
        counts = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))["counts"]
        runs = compressed_rle_runs(counts)
        assert runs.tolist() == _true_runs(mask)
        assert runs.sum() == h * w
        if mask.any():  # the box validation reads from the runs is the tight box of the pixels
            ys, xs = np.nonzero(mask)
            tight = [xs.min(), ys.min(), xs.max() + 1 - xs.min(), ys.max() + 1 - ys.min()]
            assert rle_bbox({"size": [h, w], "counts": counts.decode()}) == tight
    big = box_mask(3000, 4000, 5, 100, 3999, 2900)  # runs over 2**15 need multi-digit values
    counts = mask_utils.encode(np.asfortranarray(big.astype(np.uint8)))["counts"]
    assert compressed_rle_runs(counts).tolist() == _true_runs(big)


@pytest.mark.parametrize("counts", ["", "0", "3", "garbage!!"])
def test_decode_rle_rejects_runs_that_do_not_cover_the_mask(counts: str) -> None:
    # pycocotools itself returns uninitialised pixels for "" and "0"
    with pytest.raises(ValueError):
        decode_rle({"size": [4, 5], "counts": counts})


def test_normalize_phrase() -> None:
    assert normalize_phrase("  Baseball_Bat ") == "baseball bat"
    assert normalize_phrase("Red   APPLE") == "red apple"
    assert normalize_phrase("__") == ""


def test_image_helpers() -> None:
    rgb = np.zeros((10, 20, 3), np.uint8)
    for fmt in ("png", "jpg", "webp"):
        data = encode_image(rgb, fmt)
        assert image_format_of(data) == fmt
        assert checked_image_size(data) == (20, 10)
    with pytest.raises(ValueError, match="not JPEG, PNG or WebP"):
        image_format_of(b"GIF89a....")


@pytest.mark.parametrize("fmt", ["png", "jpg"])
def test_an_image_with_a_truncated_body_does_not_pass_as_readable(fmt: str) -> None:
    rng = np.random.default_rng(0)
    data = encode_image(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8), fmt)
    with pytest.raises(OSError):  # the header alone still reads fine
        checked_image_size(data[: len(data) // 2])
    with pytest.raises(OSError, match=r"not an image PIL can identify \(first bytes b'garbage'\)"):
        checked_image_size(b"garbage")  # named by its bytes, not as <_io.BytesIO object at 0x...>


def _meta() -> dict:
    return make_sample(1, height=24, width=32).meta()


def _set(meta: dict, path: str, value) -> dict:
    meta = copy.deepcopy(meta)
    target = meta
    parts = path.split(".")
    for part in parts[:-1]:
        target = target[int(part)] if part.isdigit() else target[part]
    last = parts[-1]
    target[int(last) if last.isdigit() else last] = value
    return meta


BROKEN = {
    "bad width": (lambda m: _set(m, "image.width", 0), "image.width", "positive integer"),
    "bool height": (lambda m: _set(m, "image.height", True), "image.height", "positive integer"),
    "rle of wrong size": (
        lambda m: _set(m, "queries.0.instances.0.rle.size", [12, 32]),
        "queries[0].instances[0].rle.size",
        "does not match image size",
    ),
    "undecodable rle": (
        lambda m: _set(m, "queries.0.instances.0.rle.counts", "garbage!!"),
        "queries[0].instances[0].rle.counts",
        "does not decode",
    ),
    "rle with too few runs": (
        lambda m: _set(m, "queries.0.instances.1.rle.counts", "5"),
        "queries[0].instances[1].rle.counts",
        "does not decode",
    ),
    "empty mask": (
        lambda m: _set(m, "queries.0.instances.0.rle", encode_mask(np.zeros((24, 32), bool))),
        "queries[0].instances[0].rle",
        "mask is empty",
    ),
    "bbox off the mask": (
        lambda m: _set(m, "queries.0.instances.1.bbox", [14, 12, 6, 3]),
        "queries[0].instances[1].bbox",
        "disagrees with the mask",
    ),
    "bbox not 4 numbers": (
        lambda m: _set(m, "queries.0.instances.0.bbox", [1, 2, 3]),
        "queries[0].instances[0].bbox",
        "must be [x, y, w, h]",
    ),
    "rle size not a list": (
        lambda m: _set(m, "queries.0.instances.0.rle.size", 24),
        "queries[0].instances[0].rle.size",
        "must be [H, W] integers",
    ),
    "rle size of strings": (
        lambda m: _set(m, "queries.0.instances.0.rle.size", ["24", "x"]),
        "queries[0].instances[0].rle.size",
        "must be [H, W] integers",
    ),
    "NaN in bbox": (
        lambda m: _set(m, "queries.0.instances.0.bbox", [float("nan"), 2, 3, 4]),
        "queries[0].instances[0].bbox",
        "finite numbers",
    ),
    "negative bbox width": (
        lambda m: _set(m, "queries.0.instances.0.bbox", [1, 2, -3, 4]),
        "queries[0].instances[0].bbox",
        "w, h >= 0",
    ),
    "empty phrase": (lambda m: _set(m, "queries.1.phrase", "  "), "queries[1].phrase", "non-empty string"),
    "duplicate phrase": (
        lambda m: _set(m, "queries.1.phrase", m["queries"][0]["phrase"]),
        "queries[1].phrase",
        "appears twice",
    ),
    "exhaustive not bool": (
        lambda m: _set(m, "queries.1.exhaustive", "yes"),
        "queries[1].exhaustive",
        "true or false",
    ),
    "schema version": (lambda m: _set(m, "schema", 2), "schema", "is not 1"),
    "file name not a string": (lambda m: _set(m, "image.file_name", 7), "image.file_name", "non-empty string"),
}


@pytest.mark.parametrize("name", list(BROKEN))
def test_validation_errors_name_file_sample_and_field(name: str) -> None:
    breaker, field, message = BROKEN[name]
    validate_meta(_meta(), key="k1", source="a.tar")  # the unbroken sample is valid
    with pytest.raises(SampleError) as info:
        validate_meta(breaker(_meta()), key="k1", source="data/a.tar")
    err = info.value
    assert err.field == field and err.key == "k1" and err.source == "data/a.tar"
    assert message in str(err)
    assert str(err).startswith(f"file data/a.tar, sample 'k1', field {field}: ")


def test_image_size_must_match_metadata() -> None:
    with pytest.raises(SampleError) as info:
        validate_meta(_meta(), key="k", source="x.tar", image_size=(24, 32))
    assert info.value.field == "image.width/height" and "32x24" in str(info.value)


@pytest.mark.parametrize("key", ["a.b", "dir/x", "a b", "", "back\\slash"])
def test_keys_that_break_tar_grouping_are_rejected(key: str) -> None:
    with pytest.raises(SampleError) as info:
        validate_key(key, source="f.json")
    assert info.value.field == "__key__"


def test_wds_round_trip_and_record_errors() -> None:
    sample = make_sample(3)
    record = sample.to_wds()
    assert set(record) == {"__key__", "png", "json"}
    back = sample_from_wds({**record, "__url__": "s.tar"}, check_image=True)
    assert back.meta() == sample.meta() and back.image == sample.image and back.key == sample.key

    with pytest.raises(SampleError) as info:
        sample_from_wds({**record, "jpg": b"x"})
    assert info.value.field == "image"
    with pytest.raises(SampleError) as info:
        sample_from_wds({**record, "json": b"{not json"}, source="s.tar")
    assert info.value.field == "json" and info.value.source == "s.tar"
    with pytest.raises(SampleError) as info:
        sample_from_wds({**record, "png": b"\x89PNG\r\n\x1a\nbroken"}, check_image=True)
    assert info.value.field == "png" and "does not decode" in str(info.value)
    meta = json.loads(record["json"])
    meta["image"]["width"] = 33
    with pytest.raises(SampleError) as info:
        sample_from_wds({**record, "json": json.dumps(meta).encode()}, check_image=True)
    assert info.value.field == "image.width/height"
