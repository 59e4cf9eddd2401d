"""Agriculture dataset layouts through the converters' command lines, read back from the shards.

Per-image instance-id masks (MinneApple), per-instance binary mask folders, colour-coded labels (PNG
exact, JPEG refused or snapped with a tolerance), tool-style COCO exports (Roboflow, CVAT, Label
Studio) and multi-band TIFFs.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image
from pycocotools import mask as mask_utils
from shard_helpers import write_image

from data_pipelines.cli import main
from data_pipelines.convert.bands import BandSelection, read_bands, stretch_to_uint8
from data_pipelines.convert.common import InputError, SkipItem
from data_pipelines.convert.instance_folders import InstanceFoldersConverter
from data_pipelines.convert.mask_folder import MaskFolderConverter
from data_pipelines.inspect import iter_samples
from data_pipelines.schema import Sample, decode_rle
from data_pipelines.writer import load_manifest

H, W = 40, 64


def _save(path: Path, array: np.ndarray, **kwargs) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, **kwargs)


def _convert(tmp_path: Path, *args: str) -> tuple[dict[str, Sample], dict]:
    out = tmp_path / f"out{len(list(tmp_path.glob('out*')))}"
    assert main([*args, "--out", str(out), "--no-progress"]) == 0
    return {s.image_id: s for s in iter_samples(out)}, load_manifest(out)


def _masks(sample: Sample, phrase: str) -> list[np.ndarray]:
    query = next(q for q in sample.queries if q.phrase == phrase)
    return [decode_rle(inst.rle) for inst in query.instances]


def _same_masks(got: list[np.ndarray], expected: list[np.ndarray]) -> bool:
    """Equal as sets of masks (order free)."""
    keys = sorted(m.tobytes() for m in got)
    return len(got) == len(expected) and keys == sorted(m.astype(bool).tobytes() for m in expected)


def _disk(cy: int, cx: int, r: int, h: int = H, w: int = W) -> np.ndarray:
    yy, xx = np.mgrid[:h, :w]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r


# ----------------------------------------------------------------------------------------------
# instance masks
# ----------------------------------------------------------------------------------------------
def test_minneapple_instance_id_masks_16_bit(tmp_path: Path) -> None:
    ids = np.zeros((H, W), np.uint16)
    apples = {1: _disk(10, 10, 6), 2: _disk(25, 30, 8), 70000 % 65536: _disk(12, 50, 7)}
    for value, mask in apples.items():
        ids[mask] = value
    write_image(tmp_path / "images" / "20150919_174151_image1.png", H, W, seed=1)
    _save(tmp_path / "masks" / "20150919_174151_image1.png", ids)
    write_image(tmp_path / "images" / "empty_tree.png", H, W, seed=2)
    _save(tmp_path / "masks" / "empty_tree.png", np.zeros((H, W), np.uint16))
    samples, manifest = _convert(
        tmp_path,
        "mask-folder",
        "--images",
        str(tmp_path / "images"),
        "--masks",
        str(tmp_path / "masks"),
        "--mode",
        "instance",
        "--phrase",
        "apple",
    )
    assert _same_masks(_masks(samples["20150919_174151_image1"], "apple"), list(apples.values()))
    empty = samples["empty_tree"].queries
    assert [(q.phrase, len(q.instances), q.exhaustive) for q in empty] == [("apple", 0, True)]
    assert manifest["phrases"]["apple"] == {"positive": 1, "instances": 3, "negative": 1}


def test_per_instance_binary_folders_single_phrase(tmp_path: Path) -> None:
    images, masks = tmp_path / "images", tmp_path / "masks"
    a, b = _disk(15, 20, 9), _disk(20, 28, 9)  # overlapping apples: each keeps its whole mask
    write_image(images / "row1" / "tree1.jpg", H, W, seed=3)
    _save(masks / "row1" / "tree1" / "0001.png", a.astype(np.uint8) * 255)
    _save(masks / "row1" / "tree1" / "0002.png", b.astype(np.uint16) * 65535)  # 16-bit binary
    _save(masks / "row1" / "tree1" / "0003.png", np.zeros((H, W), np.uint8))  # empty
    blurry = a.astype(np.uint8) * 200
    blurry[_disk(15, 20, 10) & ~a] = 90  # anti-aliased edge: not binary
    _save(masks / "row1" / "tree1" / "0004.png", blurry)
    write_image(images / "row1" / "tree2.jpg", H, W, seed=4)
    (masks / "row1" / "tree2").mkdir(parents=True)  # an image without objects
    write_image(images / "tree3.jpg", H, W, seed=5)  # no mask folder at all
    write_image(images / "tree4.jpg", H, W, seed=6)
    _save(masks / "tree4" / "0001.jpg", a.astype(np.uint8) * 255)  # lossy mask

    samples, manifest = _convert(
        tmp_path, "instance-folders", "--images", str(images), "--masks", str(masks), "--phrase", "Apple"
    )
    assert sorted(samples) == ["row1/tree1", "row1/tree2"]
    assert _same_masks(_masks(samples["row1/tree1"], "apple"), [a, b])
    assert [(q.phrase, q.instances, q.exhaustive) for q in samples["row1/tree2"].queries] == [
        ("apple", [], True)
    ]
    assert manifest["skipped"]["by_reason"] == {"missing instance folder": 1, "lossy mask": 1}
    assert manifest["dropped_annotations"]["by_reason"] == {
        "empty mask": 1,
        "mask is not binary (give --threshold)": 1,
    }

    converter = InstanceFoldersConverter(images, masks=masks, phrase="apple", threshold=128)
    thresholded = converter.convert(converter.files.index(Path("row1/tree1.jpg")))
    assert _same_masks(_masks(thresholded, "apple"), [a, b, a])  # 200 >= 128 > 90: the blur is cut off
    assert thresholded.dropped == {"empty mask": 1}


def test_per_instance_folders_with_classes_from_folders_and_names(tmp_path: Path) -> None:
    images, masks = tmp_path / "images", tmp_path / "masks"
    write_image(images / "plot7.png", H, W, seed=7)
    beet, weed1, weed2, stone = _disk(10, 10, 5), _disk(30, 40, 6), _disk(8, 50, 4), _disk(30, 10, 4)
    for name, mask in (
        ("sugar_beet/1.png", beet),
        ("Weed/1.png", weed1),
        ("Weed/2.png", weed2),
        ("stone/1.png", stone),
    ):
        _save(masks / "plot7" / name, mask.astype(np.uint8))
    converter = InstanceFoldersConverter(images, masks=masks, class_from="folder")
    assert converter.vocabulary == ["stone", "sugar beet", "weed"]
    sample = converter.convert(0)
    assert _same_masks(_masks(sample, "weed"), [weed1, weed2]) and _same_masks(
        _masks(sample, "sugar beet"), [beet]
    )

    classes = tmp_path / "classes.json"
    classes.write_text(
        json.dumps({"sugar_beet": "sugar beet", "Weed": "weed", "stone": None, "thistle": "weed"})
    )
    sample = InstanceFoldersConverter(images, masks=masks, class_from="folder", classes=classes).convert(0)
    assert {q.phrase: len(q.instances) for q in sample.queries} == {"sugar beet": 1, "weed": 2}
    assert sample.dropped == {"class 'stone' left out by classes": 1}

    flat = tmp_path / "flat"
    for name, mask in (("apple_0001.png", beet), ("apple-0002.png", weed1), ("leaf3.png", weed2)):
        _save(flat / "plot7" / name, mask.astype(np.uint8))
    sample = InstanceFoldersConverter(images, masks=flat, class_from="name").convert(0)
    assert _same_masks(_masks(sample, "apple"), [beet, weed1]) and _same_masks(
        _masks(sample, "leaf"), [weed2]
    )


def test_dsb_style_folders_need_an_image_glob(tmp_path: Path) -> None:
    root = tmp_path / "stage1_train"
    nucleus = _disk(20, 20, 7)
    write_image(root / "abc" / "images" / "abc.png", H, W, seed=8)
    _save(root / "abc" / "masks" / "m1.png", nucleus.astype(np.uint8) * 255)
    with pytest.raises(InputError, match="--image-glob"):
        InstanceFoldersConverter(root, phrase="seed")
    samples, _ = _convert(
        tmp_path,
        "instance-folders",
        "--images",
        str(root),
        "--image-glob",
        "*/images/*.png",
        "--instance-dir",
        "{parent}/../masks",
        "--phrase",
        "seed",
    )
    assert _same_masks(_masks(samples["abc/images/abc"], "seed"), [nucleus])


# ----------------------------------------------------------------------------------------------
# colour-coded labels
# ----------------------------------------------------------------------------------------------
def _colour_labels() -> tuple[np.ndarray, dict[str, np.ndarray]]:
    h, w = 64, 96  # regions on the 16-pixel JPEG block grid
    label = np.zeros((h, w, 3), np.uint8)
    regions = {"crop": np.zeros((h, w), bool), "weed": np.zeros((h, w), bool)}
    regions["crop"][16:48, 16:48] = True
    regions["weed"][16:32, 64:80] = True
    label[regions["crop"]] = (0, 255, 0)
    label[regions["weed"]] = (255, 0, 0)
    return label, regions


def test_colour_labels_png_exact_jpeg_refused_or_snapped(tmp_path: Path) -> None:
    label, regions = _colour_labels()
    images = tmp_path / "images"
    write_image(images / "bonn_001.png", 64, 96, seed=9)
    write_image(images / "bonn_002.png", 64, 96, seed=10)
    _save(tmp_path / "labels" / "bonn_001.png", label)
    _save(tmp_path / "labels" / "bonn_002.png", label)
    classes = tmp_path / "colours.json"
    classes.write_text(json.dumps({"#00ff00": "sugar beet", "#ff0000": "weed", "0,0,255": "stone"}))
    args = [
        "mask-folder",
        "--images",
        str(images),
        "--masks",
        str(tmp_path / "labels"),
        "--mode",
        "semantic",
        "--classes",
        str(classes),
        "--instances",
        "connected-components",
    ]
    samples, _ = _convert(tmp_path, *args)
    assert _same_masks(_masks(samples["bonn_001"], "sugar beet"), [regions["crop"]])
    assert _same_masks(_masks(samples["bonn_001"], "weed"), [regions["weed"]])
    assert _masks(samples["bonn_001"], "stone") == []

    jpeg_labels = tmp_path / "jpeg_labels"
    for name in ("bonn_001", "bonn_002"):
        _save(jpeg_labels / f"{name}.jpg", label, quality=90)
    args[4] = str(jpeg_labels)
    samples, manifest = _convert(tmp_path, *args, "--mask-ext", ".jpg")
    assert samples == {} and manifest["skipped"]["by_reason"] == {"lossy mask": 2}
    assert "--colour-tolerance" in manifest["skipped"]["examples"][0]["detail"]

    samples, manifest = _convert(tmp_path, *args, "--mask-ext", ".jpg", "--colour-tolerance", "60")
    for phrase, region in (("sugar beet", regions["crop"]), ("weed", regions["weed"])):
        (got,) = _masks(samples["bonn_001"], phrase)
        assert (got & region).sum() / (got | region).sum() > 0.95
    with pytest.raises(InputError, match="too large"):
        MaskFolderConverter(
            images, mode="semantic", masks=jpeg_labels, mask_ext=".jpg", classes=classes, colour_tolerance=128
        )  # red and black are 255 apart: 128 could match both
    with pytest.raises(InputError, match="semantic"):
        MaskFolderConverter(images, mode="instance", masks=jpeg_labels, phrase="x", colour_tolerance=10)


def test_colour_tolerance_counts_pixels_matching_no_class(tmp_path: Path) -> None:
    label, regions = _colour_labels()
    label[0:4, 0:4] = (128, 128, 0)  # a colour no class is near
    label[40:44, 70:74] = (245, 10, 5)  # near red: snapped to weed
    write_image(tmp_path / "img" / "a.png", 64, 96)
    _save(tmp_path / "lab" / "a.png", label)
    classes = tmp_path / "c.json"
    classes.write_text(json.dumps({"#00ff00": "crop", "#ff0000": "weed"}))
    sample = MaskFolderConverter(
        tmp_path / "img", mode="semantic", masks=tmp_path / "lab", classes=classes, colour_tolerance=20
    ).convert(0)
    weed = regions["weed"].copy()
    weed[40:44, 70:74] = True
    assert _same_masks(_masks(sample, "weed"), [weed])
    assert sample.dropped == {"mask pixels matching no class within --colour-tolerance": 1}


# ----------------------------------------------------------------------------------------------
# COCO exports of annotation tools
# ----------------------------------------------------------------------------------------------
def _poly(x0: int, y0: int, x1: int, y1: int) -> list[list[float]]:
    return [[x0, y0, x1, y0, x1, y1, x0, y1]]


def _poly_mask(poly: list[list[float]], h: int = H, w: int = W) -> np.ndarray:
    return mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(poly, h, w))).astype(bool)


def _roboflow_split(folder: Path, seed: int) -> None:
    write_image(folder / "IMG_0001_jpg.rf.3f9a.jpg", H, W, seed=seed)
    write_image(folder / "IMG_0002_jpg.rf.77c1.jpg", H, W, seed=seed + 1)
    data = {
        "categories": [
            {"id": 0, "name": "apples-xk2f", "supercategory": "none"},
            {"id": 1, "name": "apple", "supercategory": "apples-xk2f"},
            {"id": 2, "name": "leaf", "supercategory": "apples-xk2f"},
        ],
        "images": [
            {"id": 0, "file_name": "IMG_0001_jpg.rf.3f9a.jpg", "width": W, "height": H},
            {"id": 1, "file_name": "IMG_0002_jpg.rf.77c1.jpg", "width": W, "height": H},
        ],
        "annotations": [
            {"id": 0, "image_id": 0, "category_id": 1, "segmentation": _poly(4, 4, 20, 18), "iscrowd": 0},
            {"id": 1, "image_id": 0, "category_id": 1, "segmentation": _poly(30, 10, 50, 30), "iscrowd": 0},
            {"id": 2, "image_id": 1, "category_id": 2, "segmentation": [[5, 5, 25, 25]], "iscrowd": 0},
        ],
    }
    (folder / "_annotations.coco.json").write_text(json.dumps(data))


def test_roboflow_export_splits_placeholder_category_and_two_point_polygons(tmp_path: Path) -> None:
    export = tmp_path / "apples.v3i.coco-segmentation"
    _roboflow_split(export / "train", seed=11)
    _roboflow_split(export / "valid", seed=21)  # image ids restart at 0
    results = {}
    for split in ("train", "valid"):
        results[split] = _convert(
            tmp_path,
            "coco",
            "--annotations",
            str(export / split / "_annotations.coco.json"),
            "--images",
            str(export / split),
        )
    train, manifest = results["train"]
    first = train[0]
    assert first.source == "coco:train" and first.key == "coco_train_0"
    assert {q.phrase: (len(q.instances), q.exhaustive) for q in first.queries} == {
        "apple": (2, True),
        "leaf": (0, True),
    }
    assert _same_masks(
        _masks(first, "apple"), [_poly_mask(_poly(4, 4, 20, 18)), _poly_mask(_poly(30, 10, 50, 30))]
    )
    # the two-point polygon is no object, but a leaf is there: not a negative
    assert {q.phrase: (len(q.instances), q.exhaustive) for q in train[1].queries} == {
        "leaf": (0, False),
        "apple": (0, True),
    }
    assert manifest["extra"]["unused_categories"] == ["apples-xk2f"]
    assert "apples xk2f" not in manifest["phrases"]
    assert manifest["dropped_annotations"]["by_reason"] == {"polygon with fewer than 3 points": 1}
    valid_keys = {s.key for s in results["valid"][0].values()}
    assert valid_keys == {"coco_valid_0", "coco_valid_1"} and not valid_keys & {s.key for s in train.values()}


def _cvat_export(root: Path) -> tuple[np.ndarray, np.ndarray]:
    brush_a, brush_b = _disk(12, 12, 6), _disk(25, 45, 9)
    write_image(root / "images" / "block_a" / "frame_000000.png", H, W, seed=12)
    write_image(root / "images" / "block_a" / "frame_000001.png", H, W, seed=13)
    flat = [brush.flatten(order="F").astype(np.int8) for brush in (brush_a, brush_b)]
    counts = []
    for f in flat:
        bounds = np.concatenate([[0], np.flatnonzero(np.diff(f)) + 1, [f.size]])
        counts.append(np.diff(bounds).tolist() if not f[0] else [0, *np.diff(bounds).tolist()])
    data = {
        "licenses": [{"name": "", "id": 0, "url": ""}],
        "info": {"contributor": "", "version": ""},
        "categories": [{"id": 1, "name": "apple", "supercategory": ""}],
        "images": [
            {"id": 1, "file_name": "block_a/frame_000000.png", "width": W, "height": H},
            {"id": 2, "file_name": "block_a/frame_000001.png", "width": W, "height": H},
        ],
        "annotations": [
            {
                "id": i + 1,
                "image_id": 1,
                "category_id": 1,
                "iscrowd": 1,
                "segmentation": {"size": [H, W], "counts": c},
                "attributes": {"occluded": False},
            }
            for i, c in enumerate(counts)
        ],
    }
    (root / "annotations").mkdir(parents=True)
    (root / "annotations" / "instances_default.json").write_text(json.dumps(data))
    return brush_a, brush_b


def test_cvat_export_brush_masks_as_crowd_rle_and_unlabelled_frames(tmp_path: Path) -> None:
    root = tmp_path / "task_12_orchard"
    brushes = _cvat_export(root)
    args = [
        "coco",
        "--annotations",
        str(root / "annotations" / "instances_default.json"),
        "--images",
        str(root / "images"),
    ]
    as_coco, manifest = _convert(tmp_path, *args)
    frame = as_coco[1]
    assert frame.source == "coco:task_12_orchard"
    assert [(q.phrase, len(q.instances), q.exhaustive) for q in frame.queries] == [("apple", 0, False)]
    assert manifest["dropped_annotations"]["total"] == 2

    samples, manifest = _convert(tmp_path, *args, "--crowd-as-instances", "--skip-unannotated")
    assert list(samples) == [1]
    assert _same_masks(_masks(samples[1], "apple"), list(brushes)) and samples[1].queries[0].exhaustive
    assert manifest["skipped"]["by_reason"] == {"image without annotations": 1}


def test_label_studio_file_names_with_prefixes(tmp_path: Path) -> None:
    root = tmp_path / "project-3-at-2025"
    write_image(root / "images" / "8f3e1a2b-IMG_1.jpg", H, W, seed=14)
    write_image(root / "images" / "c0ffee00-IMG_2.jpg", H, W, seed=15)
    write_image(root / "images" / "x.jpg", H, W, seed=16)
    data = {
        "categories": [{"id": 0, "name": "Weed"}, {"id": 1, "name": "Crop"}],
        "images": [
            {"id": 0, "file_name": "images/8f3e1a2b-IMG_1.jpg", "width": W, "height": H},
            {"id": 1, "file_name": "\\data\\upload\\3\\c0ffee00-IMG_2.jpg", "width": W, "height": H},
            {"id": 2, "file_name": "/data/upload/3/a/x.jpg", "width": W, "height": H},
            {"id": 3, "file_name": "/data/upload/3/b/x.jpg", "width": W, "height": H},
        ],
        "annotations": [
            {"id": 0, "image_id": i, "category_id": 0, "segmentation": _poly(2, 2, 12, 12), "iscrowd": 0}
            for i in range(4)
        ],
    }
    (root / "result.json").write_text(json.dumps(data))
    samples, manifest = _convert(
        tmp_path, "coco", "--annotations", str(root / "result.json"), "--images", str(root / "images")
    )
    assert sorted(samples) == [0, 1] and samples[0].source == "coco:project-3-at-2025"
    assert samples[1].image == (root / "images" / "c0ffee00-IMG_2.jpg").read_bytes()
    assert _same_masks(_masks(samples[0], "weed"), [_poly_mask(_poly(2, 2, 12, 12))])
    # two entries end in x.jpg: neither may take the one x.jpg on disk
    assert manifest["skipped"]["by_reason"] == {"missing image file": 2}
    assert "other images' names end the same way: x.jpg" in manifest["skipped"]["examples"][0]["detail"]


# ----------------------------------------------------------------------------------------------
# multi-band images
# ----------------------------------------------------------------------------------------------
BAND_NAMES = ("Blue", "Green", "Red", "NIR", "RedEdge")


def _multiband(h: int = H, w: int = W) -> np.ndarray:
    """(h, w, 5) uint16: band k holds a distinct permutation of 1000 * k + 0..h*w-1, a few 0 (nodata)."""
    rng = np.random.default_rng(0)
    bands = np.stack([1000 * k + rng.permutation(h * w).reshape(h, w) for k in range(1, 6)], -1)
    bands[0, :3] = 0
    return bands.astype(np.uint16)


def _expected_stretch(band: np.ndarray, low: float, high: float) -> np.ndarray:
    return np.rint(np.clip((band.astype(float) - low) * 255 / (high - low), 0, 255)).astype(np.uint8)


def _write_gdal_tiff(path: Path, bands: np.ndarray) -> None:
    items = "".join(
        f'<Item name="DESCRIPTION" sample="{i}" role="description">{n}</Item>'
        for i, n in enumerate(BAND_NAMES)
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    tifffile.imwrite(
        path,
        bands,
        photometric="minisblack",
        planarconfig="separate" if path.stem[-1] == "p" else "contig",
        extratags=[(42112, "s", 0, f"<GDALMetadata>{items}</GDALMetadata>", True)],
    )


@pytest.mark.parametrize("layout", ["contig", "planar"])
def test_multiband_tiff_bands_by_name_and_number(tmp_path: Path, layout: str) -> None:
    bands = _multiband()
    path = tmp_path / "images" / f"field_{'p' if layout == 'planar' else 'c'}.tif"
    _write_gdal_tiff(path, bands if layout == "contig" else np.moveaxis(bands, -1, 0))
    read, names = read_bands(path)
    assert np.array_equal(read, bands) and names == list(BAND_NAMES)

    ids = np.zeros((H, W), np.uint8)
    ids[5:15, 5:25] = 1
    _save(tmp_path / "masks" / path.with_suffix(".png").name, ids)
    samples, manifest = _convert(
        tmp_path,
        "mask-folder",
        "--images",
        str(tmp_path / "images"),
        "--masks",
        str(tmp_path / "masks"),
        "--mode",
        "instance",
        "--phrase",
        "plant",
        "--bands",
        "nir,red,green",
        "--stretch-range",
        "0",
        "7000",
        "--nodata",
        "0",
    )
    (sample,) = samples.values()
    assert sample.image_format == "png" and manifest["extra"]["bands"]["bands"] == ["nir", "red", "green"]
    rgb = np.asarray(Image.open(io.BytesIO(sample.image)))
    for channel, band in enumerate((3, 2, 1)):
        expected = _expected_stretch(bands[..., band], 0, 7000)
        expected[bands[..., band] == 0] = 0
        assert np.array_equal(rgb[..., channel], expected)
    assert _same_masks(_masks(sample, "plant"), [ids == 1])

    by_number = BandSelection(bands=(3, 2, 1), percentiles=(0, 100), nodata=0).to_rgb(path)
    for channel, band in enumerate((2, 1, 0)):
        valid = bands[..., band][bands[..., band] != 0]
        expected = _expected_stretch(bands[..., band], valid.min(), valid.max())
        expected[bands[..., band] == 0] = 0
        assert np.array_equal(by_number[..., channel], expected)


def test_band_selection_errors_name_the_file(tmp_path: Path) -> None:
    path = tmp_path / "f.tif"
    _write_gdal_tiff(path, _multiband())
    with pytest.raises(SkipItem, match="has 5 bands, asked for band 6"):
        BandSelection(bands=(6, 2, 1)).to_rgb(path)
    with pytest.raises(SkipItem, match=r"no band 'swir'.*'nir'"):
        BandSelection(bands=("swir", "red", "green")).to_rgb(path)
    renamed = BandSelection(
        bands=("b8", "b4", "b3"), names=("b2", "b3", "b4", "b8", "b5"), percentiles=(0, 100)
    )
    assert renamed.to_rgb(path).shape == (H, W, 3)
    with pytest.raises(SkipItem, match="--band-names lists 3"):
        BandSelection(bands=("a",), names=("a", "b", "c")).to_rgb(path)
    with pytest.raises(InputError, match="one or three bands"):
        BandSelection(bands=(1, 2))


def test_single_band_16_bit_png_becomes_grey_without_tifffile(tmp_path: Path) -> None:
    band = (np.arange(H * W).reshape(H, W) * 7).astype(np.uint16)
    _save(tmp_path / "thermal.png", band)
    rgb = BandSelection(bands=(1,), percentiles=(0, 100)).to_rgb(tmp_path / "thermal.png")
    expected = _expected_stretch(band, band.min(), band.max())
    assert all(np.array_equal(rgb[..., c], expected) for c in range(3))


def test_percentile_stretch_clips_the_tails() -> None:
    band = np.arange(10_000, dtype=np.uint16).reshape(100, 100, 1)
    out = stretch_to_uint8(band, (2, 98))
    low, high = np.percentile(np.arange(10_000), (2, 98))
    assert (out[band < low] == 0).all() and (out[band > high] == 255).all()
    assert np.array_equal(out, _expected_stretch(band, low, high))
    assert (np.diff(out.ravel().astype(int)) >= 0).all()  # order kept


def test_coco_images_through_bands(tmp_path: Path) -> None:
    bands = _multiband()
    _write_gdal_tiff(tmp_path / "imgs" / "plot.tif", bands)
    ann = {
        "images": [{"id": 1, "file_name": "plot.tif", "width": W, "height": H}],
        "categories": [{"id": 1, "name": "weed"}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "segmentation": _poly(3, 3, 9, 9)}],
    }
    (tmp_path / "ann.json").write_text(json.dumps(ann))
    samples, _ = _convert(
        tmp_path,
        "coco",
        "--annotations",
        str(tmp_path / "ann.json"),
        "--images",
        str(tmp_path / "imgs"),
        "--bands",
        "3,2,1",
        "--stretch-range",
        "0",
        "6000",
    )
    rgb = np.asarray(Image.open(io.BytesIO(samples[1].image)))
    assert np.array_equal(rgb[..., 0], _expected_stretch(bands[..., 2], 0, 6000))
    assert (
        main(
            [
                "coco",
                "--annotations",
                str(tmp_path / "ann.json"),
                "--images",
                str(tmp_path / "imgs"),
                "--nodata",
                "0",
                "--out",
                str(tmp_path / "x"),
                "--no-progress",
            ]
        )
        == 2
    )  # --nodata needs --bands
