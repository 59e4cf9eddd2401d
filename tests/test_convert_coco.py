"""COCO / LVIS converter: exact mask round trips, phrases, negatives, crowd, LVIS ids, skip accounting."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from shard_helpers import box_mask, write_image

from data_pipelines.cli import main
from data_pipelines.convert.coco import CocoConverter
from data_pipelines.convert.common import DropAnnotation, instance_from_segmentation
from data_pipelines.inspect import iter_samples
from data_pipelines.schema import Sample, decode_rle, encode_mask
from data_pipelines.writer import load_manifest

REPO = Path(__file__).resolve().parents[1]


def _uncompressed(mask: np.ndarray) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    flat = mask.flatten(order="F").astype(np.int8)
    bounds = np.concatenate([[0], np.flatnonzero(np.diff(flat)) + 1, [flat.size]])
    runs = np.diff(bounds).tolist()
    assert rle["size"] == list(mask.shape)
    return {"size": list(mask.shape), "counts": [0, *runs] if flat[0] else runs}


def make_coco(root: Path) -> tuple[Path, Path]:
    """Five images: polygons (nested/flat/multi-part), both RLE kinds, crowd, degenerate, broken files."""
    images = root / "images"
    write_image(images / "img1.jpg", 48, 64, seed=1)
    write_image(images / "sub" / "img2.png", 30, 70, seed=2)  # non-square, in a sub-folder
    write_image(images / "img4.jpg", 20, 20, seed=4)  # the JSON will claim 10x10
    write_image(images / "img5.png", 16, 24, seed=5)
    compressed = mask_utils.encode(np.asfortranarray(box_mask(30, 70, 50, 3, 66, 25).astype(np.uint8)))
    data = {
        "images": [
            {"id": 1, "file_name": "img1.jpg", "width": 64, "height": 48},
            {"id": 2, "file_name": "sub/img2.png", "width": 70, "height": 30},
            {"id": 3, "file_name": "missing.jpg", "width": 10, "height": 10},
            {"id": 4, "file_name": "img4.jpg", "width": 10, "height": 10},
            {"id": 5, "file_name": "img5.png", "width": 24, "height": 16},
        ],
        "categories": [  # 0-based ids, a gap, and a placeholder category no annotation uses
            {"id": 0, "name": "Baseball_Bat"},
            {"id": 1, "name": "apple"},
            {"id": 2, "name": "pear"},
            {"id": 7, "name": "dataset-export"},
        ],
        "annotations": [
            {
                "id": 11,
                "image_id": 1,
                "category_id": 0,
                "iscrowd": 0,
                "bbox": [0, 0, 1, 1],  # wrong bbox
                "segmentation": [[5, 5, 30, 5, 30, 20, 5, 20]],
            },
            {
                "id": 12,
                "image_id": 1,
                "category_id": 1,
                "iscrowd": 0,
                "segmentation": [40, 30, 60, 30, 50, 45],
            },
            {
                "id": 13,
                "image_id": 1,
                "category_id": 1,
                "iscrowd": 0,
                "segmentation": _uncompressed(box_mask(48, 64, 2, 30, 12, 44)),
            },
            {
                "id": 14,
                "image_id": 1,
                "category_id": 2,
                "iscrowd": 1,
                "segmentation": _uncompressed(box_mask(48, 64, 35, 2, 60, 20)),
            },
            {"id": 15, "image_id": 1, "category_id": 0, "iscrowd": 0, "segmentation": [[1, 1, 2, 2]]},
            {
                "id": 21,
                "image_id": 2,
                "category_id": 1,
                "iscrowd": 0,
                "segmentation": {"size": [30, 70], "counts": compressed["counts"].decode()},
            },
            {"id": 22, "image_id": 2, "category_id": 2, "iscrowd": 0, "segmentation": [[0, 0, 10, 0, 20, 0]]},
            {"id": 23, "image_id": 2, "category_id": 99, "iscrowd": 0, "segmentation": [[1, 1, 9, 1, 9, 9]]},
            {
                "id": 24,
                "image_id": 2,
                "category_id": 2,
                "iscrowd": 0,
                "segmentation": [[3, 3, 20, 3, 20, 25, 3, 25], [30, 10, 31, 11]],
            },
            {"id": 41, "image_id": 4, "category_id": 1, "iscrowd": 0, "segmentation": [[1, 1, 5, 1, 5, 5]]},
            {"id": 99, "image_id": 42, "category_id": 1, "iscrowd": 0, "segmentation": [[1, 1, 5, 1, 5, 5]]},
        ],
    }
    path = root / "instances_val2017.json"
    path.write_text(json.dumps(data))
    return path, images


def _reference_mask(coco: COCO, ann_id: int) -> np.ndarray:
    """pycocotools' own mask of an annotation (it needs a flat polygon wrapped in a list)."""
    ann = dict(coco.anns[ann_id])
    if isinstance(ann["segmentation"], list) and not isinstance(ann["segmentation"][0], list):
        ann["segmentation"] = [ann["segmentation"]]
    return coco.annToMask(ann).astype(bool)


def _by_key(out: Path) -> dict[str, Sample]:
    return {s.key: s for s in iter_samples(out)}


def _queries(sample: Sample) -> dict[str, tuple[int, bool]]:
    return {q.phrase: (len(q.instances), q.exhaustive) for q in sample.queries}


def _convert(ann: Path, images: Path, out: Path, *extra: str) -> int:
    return main(
        [
            "coco",
            "--annotations",
            str(ann),
            "--images",
            str(images),
            "--out",
            str(out),
            "--no-progress",
            *extra,
        ]
    )


def test_coco_end_to_end_subprocess(tmp_path: Path) -> None:
    ann, images = make_coco(tmp_path)
    out = tmp_path / "shards"
    cmd = [
        sys.executable,
        "-m",
        "data_pipelines",
        "coco",
        "--annotations",
        str(ann),
        "--images",
        str(images),
        "--out",
        str(out),
        "--max-count",
        "2",
        "--no-progress",
    ]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "3 samples in 2 shard(s), 2 skipped" in result.stdout
    assert (
        "missing image file" in result.stdout
        and "image size differs from the annotation file" in result.stdout
    )
    assert f"1 annotation(s) in {ann} name an image id the file does not have: left out" in result.stdout
    manifest = load_manifest(out)
    assert manifest["command"].startswith("python -m data_pipelines coco --annotations")
    assert [s["samples"] for s in manifest["shards"]] == [2, 1]


def test_coco_masks_phrases_crowd_and_negatives(tmp_path: Path) -> None:
    ann, images = make_coco(tmp_path)
    out = tmp_path / "shards"
    assert _convert(ann, images, out) == 0
    samples = _by_key(out)
    assert sorted(samples) == ["coco_val2017_1", "coco_val2017_2", "coco_val2017_5"]
    s1, s2, s5 = samples["coco_val2017_1"], samples["coco_val2017_2"], samples["coco_val2017_5"]
    assert s1.source == "coco:val2017" and s1.image_id == 1
    assert (s1.file_name, s2.file_name) == ("img1.jpg", "sub/img2.png")  # a sample traces back to its file
    assert s1.image == (images / "img1.jpg").read_bytes() and s1.image_format == "jpg"  # bytes unmodified
    assert (s2.width, s2.height, s2.image_format) == (70, 30, "png")

    # the crowd-only pear is a non-exhaustive query without instances, never a negative; the bat lost a
    # degenerate polygon, so it is non-exhaustive; the unused category is no negative
    assert _queries(s1) == {"baseball bat": (1, False), "apple": (2, True), "pear": (0, False)}
    assert _queries(s2) == {"apple": (1, True), "pear": (1, False), "baseball bat": (0, True)}
    assert _queries(s5) == {"baseball bat": (0, True), "apple": (0, True), "pear": (0, True)}

    # every mask decodes to exactly what pycocotools makes of the source annotation; boxes follow the masks
    coco = COCO(str(ann))
    expected = {1: {"baseball bat": [11], "apple": [12, 13]}, 2: {"apple": [21], "pear": [24]}}
    for image_id, phrases in expected.items():
        sample = samples[f"coco_val2017_{image_id}"]
        for query in sample.queries:
            ann_ids = phrases.get(query.phrase, [])
            assert len(query.instances) == len(ann_ids)
            for inst, ann_id in zip(query.instances, ann_ids, strict=True):
                mask = decode_rle(inst.rle)
                assert np.array_equal(mask, _reference_mask(coco, ann_id)), ann_id
                ys, xs = np.nonzero(mask)
                assert inst.bbox == [xs.min(), ys.min(), xs.max() + 1 - xs.min(), ys.max() + 1 - ys.min()]

    manifest = load_manifest(out)
    assert manifest["skipped"]["by_reason"] == {
        "missing image file": 1,
        "image size differs from the annotation file": 1,
    }
    details = " ".join(e["detail"] for e in manifest["skipped"]["examples"])
    assert "missing.jpg" in details and "is 20x20" in details and "says 10x10" in details
    assert manifest["dropped_annotations"]["by_reason"] == {
        "crowd region (category made non-exhaustive)": 1,
        "polygon with fewer than 3 points": 1,
        "zero-area mask": 1,
        "unknown category_id": 1,
    }
    extra = manifest["extra"]
    assert extra["unused_categories"] == ["dataset-export"] and extra["annotations_without_image"] == 1
    assert extra["vocabulary"] == ["baseball bat", "apple", "pear", "dataset-export"]


def test_coco_keep_unused_categories(tmp_path: Path) -> None:
    ann, images = make_coco(tmp_path)
    converter = CocoConverter(ann, images, keep_unused_categories=True)
    sample = converter.convert(4)
    assert [q.phrase for q in sample.queries] == ["baseball bat", "apple", "pear", "dataset-export"]


def test_coco_sampled_negatives_are_deterministic_per_image(tmp_path: Path) -> None:
    images = tmp_path / "images"
    cats = [{"id": i, "name": f"class_{i}"} for i in range(8)]
    entries, annotations = [], []
    for i in range(12):
        write_image(images / f"{i}.png", 8, 8, seed=i)
        entries.append({"id": i, "file_name": f"{i}.png", "width": 8, "height": 8})
        annotations.append(
            {"id": i, "image_id": i, "category_id": i % 8, "iscrowd": 0, "segmentation": [[1, 1, 6, 1, 6, 6]]}
        )
    ann = tmp_path / "a.json"
    ann.write_text(json.dumps({"images": entries, "annotations": annotations, "categories": cats}))
    chosen = []
    for _ in range(2):
        converter = CocoConverter(ann, images, negatives_per_image=2)
        chosen.append([[q.phrase for q in converter.convert(i).queries[1:]] for i in range(len(converter))])
    assert chosen[0] == chosen[1]
    assert all(len(negs) == 2 for negs in chosen[0])
    assert all(f"class {i % 8}" not in negs for i, negs in enumerate(chosen[0]))
    assert len({tuple(negs) for negs in chosen[0]}) > 3  # seeded per image, not one global draw
    other_seed = CocoConverter(ann, images, negatives_per_image=2, seed=1)
    assert [[q.phrase for q in other_seed.convert(i).queries[1:]] for i in range(12)] != chosen[0]
    none = CocoConverter(ann, images, negatives_per_image=0)
    assert [q.phrase for q in none.convert(3).queries] == ["class 3"]


def test_coco_synonyms_rename_merge_and_drop(tmp_path: Path) -> None:
    ann, images = make_coco(tmp_path)
    synonyms = tmp_path / "synonyms.json"
    synonyms.write_text(json.dumps({"apple": ["apple", "Fruit"], "pear": "fruit", "Baseball_Bat": []}))
    converter = CocoConverter(ann, images, synonyms=synonyms)
    s1, s2, s5 = converter.convert(0), converter.convert(1), converter.convert(4)
    # fruit = apple + pear: the pear crowd region makes it non-exhaustive on image 1
    assert _queries(s1) == {"apple": (2, True), "fruit": (2, False)}
    assert s1.dropped["category dropped by synonyms"] == 2
    assert _queries(s2) == {"apple": (1, True), "fruit": (2, False)}
    assert _queries(s5) == {"apple": (0, True), "fruit": (0, True)}

    synonyms.write_text(json.dumps({"baseball bat": "bat"}))  # a category's name or its normalised form
    renamed = CocoConverter(ann, images, synonyms=synonyms).convert(4)
    assert [q.phrase for q in renamed.queries] == ["bat", "apple", "pear"]

    synonyms.write_text(json.dumps({"aple": "apple"}))
    out = tmp_path / "bad"
    assert _convert(ann, images, out, "--synonyms", str(synonyms)) == 2
    assert not out.exists() or not any(out.iterdir())


def make_lvis(root: Path) -> tuple[Path, Path]:
    images = root / "coco"
    write_image(images / "val2017" / "000000000010.jpg", 32, 40, seed=10)
    write_image(images / "000000000011.jpg", 20, 20, seed=11)
    write_image(images / "val2017" / "000000000012.jpg", 20, 20, seed=12)
    data = {
        "images": [
            {
                "id": 10,
                "coco_url": "http://images.cocodataset.org/val2017/000000000010.jpg",
                "width": 40,
                "height": 32,
                "neg_category_ids": [3],
                "not_exhaustive_category_ids": [2],
            },
            {
                "id": 11,
                "coco_url": "http://images.cocodataset.org/train2017/000000000011.jpg",
                "width": 20,
                "height": 20,
                "neg_category_ids": [],
                "not_exhaustive_category_ids": [],
            },
            {
                "id": 12,
                "coco_url": "http://images.cocodataset.org/val2017/000000000012.jpg",
                "width": 20,
                "height": 20,
                "neg_category_ids": [],
                "not_exhaustive_category_ids": [],
            },
        ],
        "categories": [
            {"id": 1, "name": "apple"},
            {"id": 2, "name": "banana_split"},
            {"id": 3, "name": "pear"},
            {"id": 4, "name": "plum"},
        ],
        "annotations": [
            {
                "id": 1,
                "image_id": 10,
                "category_id": 1,
                "segmentation": [[2, 2, 12, 2, 12, 12, 2, 12]],
                "bbox": [2, 2, 10, 10],
                "area": 100,
            },
            {
                "id": 2,
                "image_id": 10,
                "category_id": 2,
                "segmentation": [[20, 20, 30, 20, 25, 30]],
                "bbox": [20, 20, 10, 10],
                "area": 50,
            },
            {
                "id": 3,
                "image_id": 11,
                "category_id": 4,
                "segmentation": [[1, 1, 9, 1, 9, 9, 1, 9]],
                "bbox": [1, 1, 8, 8],
                "area": 64,
            },
        ],
    }
    path = root / "lvis_v1_val.json"
    path.write_text(json.dumps(data))
    return path, images


def test_lvis_negatives_and_not_exhaustive_ids(tmp_path: Path) -> None:
    ann, images = make_lvis(tmp_path)
    out = tmp_path / "shards"
    assert _convert(ann, images, out) == 0
    samples = _by_key(out)
    assert sorted(samples) == ["lvis_v1_val_10", "lvis_v1_val_11"]
    # verified negatives only: plum is neither annotated nor verified absent on image 10
    assert _queries(samples["lvis_v1_val_10"]) == {
        "apple": (1, True),
        "banana split": (1, False),
        "pear": (0, True),
    }
    assert _queries(samples["lvis_v1_val_11"]) == {"plum": (1, True)}  # found by the URL's file name
    coco = COCO(str(ann))
    apple = samples["lvis_v1_val_10"].queries[0].instances[0]
    assert np.array_equal(decode_rle(apple.rle), _reference_mask(coco, 1))
    manifest = load_manifest(out)
    assert (
        manifest["extra"]["format"] == "lvis"
        and manifest["extra"]["negatives_per_image"] == "neg_category_ids"
    )
    assert manifest["skipped"]["by_reason"] == {"no queries": 1}

    assert _convert(ann, images, tmp_path / "n", "--negatives-per-image", "3") == 2  # COCO-only option


def test_lvis_phrase_shared_by_categories_needs_all_resolved(tmp_path: Path) -> None:
    ann, images = make_lvis(tmp_path)
    synonyms = tmp_path / "syn.json"
    synonyms.write_text(
        json.dumps({"apple": "fruit", "pear": "fruit", "plum": "fruit2", "banana_split": "fruit2"})
    )
    converter = CocoConverter(ann, images, synonyms=synonyms)
    # fruit = apple (annotated, exhaustive) + pear (verified absent): exhaustive;
    # fruit2 has a non-exhaustive part
    assert _queries(converter.convert(0)) == {"fruit": (1, True), "fruit2": (1, False)}
    # on image 11 plum is annotated but banana split is unknown: not exhaustive; fruit is not asked at all
    assert _queries(converter.convert(1)) == {"fruit2": (1, False)}


def test_resume_and_existing_output(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    ann, images = make_coco(tmp_path)
    out = tmp_path / "shards"
    assert _convert(ann, images, out, "--max-count", "1") == 0
    first = {p.name: p.read_bytes() for p in out.glob("*.tar")}
    assert _convert(ann, images, out) == 2
    assert "already holds shards" in capsys.readouterr().err
    assert _convert(ann, images, out, "--resume") == 2  # without --max-count 1: other settings
    assert "max_count: 1 -> 1000" in capsys.readouterr().err
    assert _convert(ann, images, out, "--max-count", "1", "--resume") == 0
    assert "already complete with 3 samples" in capsys.readouterr().out
    assert {p.name: p.read_bytes() for p in out.glob("*.tar")} == first


def test_interrupted_conversion_resumes_without_rereading_finished_images(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ann, images = make_coco(tmp_path)
    reference = tmp_path / "reference"
    assert _convert(ann, images, reference, "--max-count", "1") == 0

    original = CocoConverter.convert
    calls: list[int] = []
    crash_at = [4]

    def counting_convert(self: CocoConverter, index: int) -> Sample:
        calls.append(index)
        if index in crash_at:
            raise KeyboardInterrupt  # the user pressed Ctrl-C, or the job hit its time limit
        return original(self, index)

    monkeypatch.setattr(CocoConverter, "convert", counting_convert)
    out = tmp_path / "shards"
    with pytest.raises(KeyboardInterrupt):
        _convert(ann, images, out, "--max-count", "1")
    assert sorted(p.name for p in out.iterdir()) == ["progress.json", "shard-000000.tar"]
    calls.clear()
    crash_at.clear()
    assert _convert(ann, images, out, "--max-count", "2", "--resume") == 2  # other settings: refused
    assert calls == [] and sorted(p.name for p in out.iterdir()) == ["progress.json", "shard-000000.tar"]
    assert _convert(ann, images, out, "--max-count", "1", "--resume") == 0
    # shard 0 holds the first image and is kept; items 1-4 are converted again (shard 1 was unfinished)
    assert calls == [1, 2, 3, 4]
    resumed, expected = load_manifest(out), load_manifest(reference)
    contents = [[(s.key, s.image, s.meta()) for s in iter_samples(d)] for d in (out, reference)]
    assert contents[0] == contents[1]
    assert resumed["skipped"] == expected["skipped"]
    assert resumed["dropped_annotations"] == expected["dropped_annotations"]


@pytest.mark.parametrize(
    ("segmentation", "reason"),
    [
        (None, "no segmentation"),
        ([], "no segmentation"),
        ([[1, 1, 4, 1, 4]], "malformed polygon"),
        ([[1, 1, "x", 1, 4, 4]], "malformed polygon"),
        ([[1, 1, float("nan"), 1, 4, 4]], "malformed polygon"),
        ([[1, 1, 2, 2]], "polygon with fewer than 3 points"),
        ([0, 0, 3, 0, 4, 0], "zero-area mask"),
        ({"size": [5, 5], "counts": [1, 2]}, "undecodable RLE"),
        ({"size": [5, 5], "counts": "garbage!!"}, "undecodable RLE"),
        ({"size": [5, 5], "counts": [25]}, "zero-area mask"),
        ({"size": [4, 4], "counts": [16]}, "RLE size differs from the image size"),
        ({"size": [5, 5]}, "malformed RLE"),
        ({"size": ["5", "5"], "counts": [25]}, "malformed RLE"),
        ({"size": ["a", 5], "counts": [25]}, "malformed RLE"),
        (42, "malformed segmentation"),
    ],
)
def test_unusable_geometry_is_dropped_with_a_reason(segmentation, reason: str) -> None:
    with pytest.raises(DropAnnotation) as info:
        instance_from_segmentation(segmentation, 5, 5)
    assert info.value.reason == reason


def test_flat_nested_and_rle_segmentations_agree() -> None:
    flat = [1, 1, 8, 1, 8, 6, 1, 6]
    mask = decode_rle(instance_from_segmentation(flat, 10, 12).rle)
    assert np.array_equal(mask, decode_rle(instance_from_segmentation([flat], 10, 12).rle))
    assert np.array_equal(mask, decode_rle(instance_from_segmentation(_uncompressed(mask), 10, 12).rle))
    inst = instance_from_segmentation({"size": [10, 12], "counts": encode_mask(mask)["counts"]}, 10, 12)
    assert np.array_equal(decode_rle(inst.rle), mask) and inst.bbox == [1.0, 1.0, 7.0, 5.0]
