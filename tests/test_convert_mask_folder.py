"""Mask-folder converter: semantic and instance-id masks, class sources, negatives, pairing and skips."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage
from shard_helpers import random_image, write_image

from data_pipelines.cli import main
from data_pipelines.convert.common import InputError, instance_from_crop
from data_pipelines.convert.mask_folder import MaskFolderConverter
from data_pipelines.inspect import iter_samples
from data_pipelines.schema import Sample, decode_rle, instance_from_mask
from data_pipelines.writer import load_manifest

H, W = 48, 80  # non-square


def _save(path: Path, array: np.ndarray, mode: str | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode=mode).save(path)


def semantic_label() -> np.ndarray:
    label = np.zeros((H, W), np.uint8)
    label[2:12, 3:20] = 1  # weed blob A
    label[30:44, 50:70] = 1  # weed blob B
    label[40, 5] = 1  # a one-pixel speck
    label[15:25, 30:45] = 2  # crop
    label[0, :] = 255  # ignore border
    label[46:48, 0:4] = 7  # a value no class names
    return label


@pytest.fixture
def semantic_folder(tmp_path: Path) -> tuple[Path, Path, Path]:
    images, masks = tmp_path / "images", tmp_path / "masks"
    write_image(images / "field" / "a.jpg", H, W, seed=1)
    _save(masks / "field" / "a_mask.png", semantic_label())
    write_image(images / "field" / "b.jpg", H, W, seed=2)
    _save(masks / "field" / "b_mask.png", np.zeros((H, W), np.uint8))  # nothing but soil
    write_image(images / "c.jpg", H, W, seed=3)  # no mask at all
    write_image(images / "d.jpg", H, W, seed=4)
    _save(masks / "d_mask.png", np.zeros((H, W + 1), np.uint8))  # wrong size
    classes = tmp_path / "classes.json"
    classes.write_text(json.dumps({"1": "Weed", "2": "crop_row", "3": "stone"}))
    return images, masks, classes


def _phrases(sample: Sample) -> dict[str, int]:
    return {q.phrase: len(q.instances) for q in sample.queries}


def test_semantic_one_instance_per_class(semantic_folder, tmp_path: Path) -> None:
    images, masks, classes = semantic_folder
    out = tmp_path / "out"
    assert (
        main(
            [
                "mask-folder",
                "--images",
                str(images),
                "--masks",
                str(masks),
                "--mask-suffix",
                "_mask",
                "--mode",
                "semantic",
                "--classes",
                str(classes),
                "--ignore",
                "255",
                "--out",
                str(out),
                "--no-progress",
            ]
        )
        == 0
    )
    samples = {s.image_id: s for s in iter_samples(out)}
    assert sorted(samples) == ["field/a", "field/b"]
    a, b = samples["field/a"], samples["field/b"]
    assert (a.file_name, b.file_name) == ("field/a.jpg", "field/b.jpg")
    assert a.image == (images / "field" / "a.jpg").read_bytes() and (a.width, a.height) == (W, H)
    assert _phrases(a) == {"weed": 1, "crop row": 1, "stone": 0}
    assert all(q.exhaustive for q in a.queries)
    label = semantic_label()
    assert np.array_equal(decode_rle(a.queries[0].instances[0].rle), label == 1)
    assert np.array_equal(decode_rle(a.queries[1].instances[0].rle), label == 2)
    assert _phrases(b) == {"weed": 0, "crop row": 0, "stone": 0}  # every class absent: all negatives

    manifest = load_manifest(out)
    assert manifest["skipped"]["by_reason"] == {"missing mask": 1, "mask size differs from image": 1}
    details = {e["reason"]: e["detail"] for e in manifest["skipped"]["examples"]}
    assert "c_mask.png" in details["missing mask"] and "c.jpg" in details["missing mask"]
    assert (
        "d_mask.png is 81x48" in details["mask size differs from image"]
        and "d.jpg is 80x48" in details["mask size differs from image"]
    )
    assert manifest["dropped_annotations"]["by_reason"] == {"mask value 7 not in classes": 1}
    assert manifest["extra"]["vocabulary"] == ["weed", "crop row", "stone"]


def test_semantic_connected_components_with_min_area(semantic_folder) -> None:
    images, masks, classes = semantic_folder
    converter = MaskFolderConverter(
        images,
        mode="semantic",
        masks=masks,
        mask_suffix="_mask",
        classes=classes,
        ignore=("255",),
        instances="connected-components",
        min_area=2,
    )
    sample = converter.convert(converter.files.index(Path("field/a.jpg")))
    assert _phrases(sample) == {"weed": 2, "crop row": 1, "stone": 0}
    assert sample.dropped == {"region smaller than min_area": 1, "mask value 7 not in classes": 1}
    label = semantic_label()
    components, _ = ndimage.label(label == 1, structure=np.ones((3, 3)))
    expected = [components == k for k in (1, 2)]  # the two blobs, in scan order
    got = [decode_rle(inst.rle) for inst in sample.queries[0].instances]
    assert all(np.array_equal(g, e) for g, e in zip(got, expected, strict=True))
    assert sample.queries[0].instances[1].bbox == [50.0, 30.0, 20.0, 14.0]


def test_semantic_colour_masks_next_to_images(tmp_path: Path) -> None:
    folder = tmp_path / "data"
    write_image(folder / "p.png", H, W, seed=5)
    colours = np.zeros((H, W, 3), np.uint8)
    colours[5:15, 5:25] = (255, 0, 0)
    colours[20:30, 40:60] = (0, 128, 0)
    _save(folder / "p_label.png", colours)
    classes = tmp_path / "c.json"
    classes.write_text(json.dumps({"#ff0000": "weed", "0,128,0": "sugar beet"}))
    converter = MaskFolderConverter(folder, mode="semantic", mask_suffix="_label", classes=classes)
    assert [str(f) for f in converter.files] == ["p.png"]  # the mask is not taken for an image
    sample = converter.convert(0)
    assert _phrases(sample) == {"weed": 1, "sugar beet": 1}
    assert np.array_equal(decode_rle(sample.queries[1].instances[0].rle), (colours == (0, 128, 0)).all(-1))
    with pytest.raises(InputError, match="give a suffix"):
        MaskFolderConverter(folder, mode="semantic", classes=classes)


def instance_ids() -> np.ndarray:
    ids = np.zeros((H, W), np.uint16)
    ids[2:10, 2:10] = 1
    ids[20:30, 10:40] = 300
    ids[5:40, 60:75] = 40000  # needs 16 bits
    ids[45, 45] = 7  # one pixel
    return ids


def test_instance_ids_16_bit_single_phrase(tmp_path: Path) -> None:
    images, masks = tmp_path / "img", tmp_path / "inst"
    write_image(images / "tree1.png", H, W, seed=6)
    _save(masks / "tree1.png", instance_ids())
    write_image(images / "tree2.png", H, W, seed=7)
    _save(masks / "tree2.png", np.zeros((H, W), np.uint16))
    assert Image.open(masks / "tree1.png").mode.startswith("I")  # really a 16-bit PNG
    converter = MaskFolderConverter(images, mode="instance", masks=masks, phrase="Apple", min_area=2)
    one, two = converter.convert(0), converter.convert(1)
    ids = instance_ids()
    assert [q.phrase for q in one.queries] == ["apple"]
    got = [decode_rle(inst.rle) for inst in one.queries[0].instances]
    assert len(got) == 3
    assert all(np.array_equal(g, ids == i) for g, i in zip(got, (1, 300, 40000), strict=True))
    assert one.dropped == {"region smaller than min_area": 1}
    assert [(q.phrase, q.instances, q.exhaustive) for q in two.queries] == [("apple", [], True)]


def test_instance_classes_from_id_map_class_mask_and_json(tmp_path: Path) -> None:
    images, masks = tmp_path / "img", tmp_path / "inst"
    write_image(images / "x.jpg", H, W, seed=8)
    ids = instance_ids()
    _save(masks / "x.png", ids)
    classes = tmp_path / "classes.json"

    classes.write_text(json.dumps({"1": "apple", "300": "leaf", "40000": "apple", "9": "pear"}))
    sample = MaskFolderConverter(images, mode="instance", masks=masks, classes=classes).convert(0)
    assert _phrases(sample) == {"apple": 2, "leaf": 1, "pear": 0}
    assert sample.dropped == {"instance without a class in classes": 1}  # id 7 is not in the map

    class_mask = np.zeros((H, W), np.uint8)
    class_mask[ids == 1] = 2
    class_mask[ids == 300] = 1
    class_mask[20:22, 10:40] = 2  # a minority of another class under instance 300
    class_mask[ids == 40000] = 2
    class_mask[ids == 7] = 1
    _save(tmp_path / "cls" / "x_cls.png", class_mask)
    classes.write_text(json.dumps({"1": "leaf", "2": "apple", "3": "pear"}))
    sample = MaskFolderConverter(
        images,
        mode="instance",
        masks=masks,
        classes=classes,
        class_masks=tmp_path / "cls",
        class_suffix="_cls",
    ).convert(0)
    assert _phrases(sample) == {"leaf": 2, "apple": 2, "pear": 0}
    leaf = [decode_rle(i.rle) for i in sample.queries[0].instances]
    assert np.array_equal(leaf[0], ids == 7) and np.array_equal(leaf[1], ids == 300)

    (tmp_path / "js").mkdir()
    (tmp_path / "js" / "x.json").write_text(json.dumps({"1": 3, "300": 3, "40000": 1}))
    sample = MaskFolderConverter(
        images, mode="instance", masks=masks, classes=classes, class_json=tmp_path / "js"
    ).convert(0)
    assert _phrases(sample) == {"leaf": 1, "apple": 0, "pear": 2}
    assert sample.dropped == {"instance without a class in classes": 1}


def test_tiff_image_is_reencoded_losslessly(tmp_path: Path) -> None:
    images = tmp_path / "img"
    pixels = random_image(H, W, seed=9)
    images.mkdir()
    Image.fromarray(pixels).save(images / "scan.tif")
    _save(tmp_path / "m" / "scan.png", instance_ids())
    sample = MaskFolderConverter(images, mode="instance", masks=tmp_path / "m", phrase="tree").convert(0)
    assert sample.image_format == "png"
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(sample.image))), pixels)


def test_bad_options_are_input_errors(tmp_path: Path) -> None:
    write_image(tmp_path / "a.jpg", 8, 8)
    with pytest.raises(InputError, match="need --classes"):
        MaskFolderConverter(tmp_path, mode="semantic", mask_suffix="_m")
    with pytest.raises(InputError, match="does not exist"):
        MaskFolderConverter(tmp_path, mode="semantic", masks=tmp_path / "nope")
    with pytest.raises(InputError, match="either --phrase"):
        MaskFolderConverter(tmp_path, mode="instance", mask_suffix="_m")
    with pytest.raises(InputError, match="'#rrggbb'"):
        bad = tmp_path / "bad.json"
        bad.write_text(json.dumps({"one": "x"}))
        MaskFolderConverter(tmp_path, mode="semantic", mask_suffix="_m", classes=bad)


def test_instance_from_crop_equals_full_mask_encoding() -> None:
    rng = np.random.default_rng(0)
    for trial in range(300):
        height, width = (int(v) for v in rng.integers(1, 40, 2))
        top, left = int(rng.integers(0, height)), int(rng.integers(0, width))
        bottom, right = int(rng.integers(top + 1, height + 1)), int(rng.integers(left + 1, width + 1))
        crop = rng.random((bottom - top, right - left)) < rng.random()
        if trial % 5 == 0:
            crop[:] = True  # runs that continue from one column into the next
        full = np.zeros((height, width), bool)
        full[top:bottom, left:right] = crop
        if not full.any():
            continue
        got = instance_from_crop(crop, top, left, height, width)
        expected = instance_from_mask(full)
        assert got.rle == expected.rle and got.bbox == expected.bbox, trial
