"""SA-Co converter: pairs grouped per image, negatives, non-exhaustive pairs, read the way sam3 reads them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from pycocotools import mask as mask_utils
from shard_helpers import box_mask, write_image

from data_pipelines.cli import main
from data_pipelines.convert.saco import SacoConverter
from data_pipelines.inspect import iter_samples
from data_pipelines.schema import Sample, decode_rle
from data_pipelines.writer import load_manifest


def _rle(mask: np.ndarray) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"counts": rle["counts"].decode(), "size": list(rle["size"])}


def _normalised_box(mask: np.ndarray) -> list[float]:
    x, y, w, h = mask_utils.toBbox(mask_utils.encode(np.asfortranarray(mask.astype(np.uint8))))
    H, W = mask.shape
    return [x / W, y / H, w / W, h / H]


MASKS = {  # annotation id -> (pair id, mask on a 40x56 image)
    1: (100, box_mask(40, 56, 2, 3, 20, 18)),
    2: (100, box_mask(40, 56, 30, 20, 50, 38)),
    3: (102, box_mask(40, 56, 10, 25, 16, 39)),
}


def make_saco(root: Path) -> tuple[Path, Path]:
    """Two images in sub-folders (as SA-Co ships them), a missing one, and one with a broken pair."""
    images = root / "images"
    write_image(images / "1" / "1001" / "metaclip_a.jpeg", 40, 56, seed=1, fmt="JPEG")
    write_image(images / "1" / "1002" / "metaclip_b.jpeg", 24, 24, seed=2, fmt="JPEG")
    write_image(images / "1" / "1003" / "metaclip_d.jpeg", 24, 24, seed=3, fmt="JPEG")

    def pair(pid, file, text, w, h, exhaustive=1):
        return {
            "id": pid,
            "file_name": file,
            "text_input": text,
            "width": w,
            "height": h,
            "queried_category": str(pid % 7),
            "is_instance_exhaustive": exhaustive,
            "is_pixel_exhaustive": 1,
        }

    a, b, c, d = (
        "1/1001/metaclip_a.jpeg",
        "1/1002/metaclip_b.jpeg",
        "1/9999/missing.jpeg",
        "1/1003/metaclip_d.jpeg",
    )
    data = {
        "info": {},
        "categories": [{"id": 1, "name": "object"}],
        "images": [
            pair(100, a, "red apple", 56, 40),
            pair(101, a, "the fish ball", 56, 40),
            pair(102, a, "green leaf", 56, 40, exhaustive=0),
            pair(103, b, "chili", 24, 24),
            pair(104, b, "stem", 24, 24, exhaustive=0),
            pair(105, a, "Red  Apple", 56, 40),
            pair(106, c, "cup", 10, 10),
            pair(107, d, "bowl", 24, 24),
            pair(108, d, "spoon", 24, 24),
        ],
        "annotations": [
            {
                "id": aid,
                "image_id": pid,
                "source": "manual",
                "area": float(m.mean()),
                "bbox": _normalised_box(m),
                "segmentation": _rle(m),
                "category_id": 1,
                "iscrowd": 0,
            }
            for aid, (pid, m) in MASKS.items()
        ]
        + [
            {
                "id": 4,
                "image_id": 107,
                "segmentation": {"counts": "garbage!!", "size": [24, 24]},
                "bbox": [0, 0, 1, 1],
                "area": 0.1,
                "category_id": 1,
                "iscrowd": 0,
            },
            {
                "id": 5,
                "image_id": 555,
                "segmentation": _rle(box_mask(24, 24, 1, 1, 5, 5)),
                "bbox": [0, 0, 1, 1],
                "area": 0.1,
                "category_id": 1,
                "iscrowd": 0,
            },
        ],
    }
    path = root / "gold_fg_food_merged_a_release_test.json"
    path.write_text(json.dumps(data))
    return path, images


def test_saco_groups_pairs_per_image(tmp_path: Path) -> None:
    ann, images = make_saco(tmp_path)
    out = tmp_path / "shards"
    assert (
        main(["saco", "--annotations", str(ann), "--images", str(images), "--out", str(out), "--no-progress"])
        == 0
    )
    samples = {s.image_id: s for s in iter_samples(out)}
    assert sorted(samples) == ["1/1001/metaclip_a.jpeg", "1/1002/metaclip_b.jpeg", "1/1003/metaclip_d.jpeg"]
    a = samples["1/1001/metaclip_a.jpeg"]
    assert all(s.file_name == name for name, s in samples.items())
    assert a.key == "saco_gold_fg_food_merged_a_release_test_1_1001_metaclip_a"
    assert a.image == (images / "1/1001/metaclip_a.jpeg").read_bytes() and (a.width, a.height) == (56, 40)
    assert [(q.phrase, len(q.instances), q.exhaustive) for q in a.queries] == [
        ("red apple", 2, True),
        ("the fish ball", 0, True),
        ("green leaf", 1, False),
    ]
    for query, ann_ids in zip(a.queries, ([1, 2], [], [3]), strict=True):
        for inst, aid in zip(query.instances, ann_ids, strict=True):
            assert np.array_equal(decode_rle(inst.rle), MASKS[aid][1])
            assert inst.bbox == [
                float(v)
                for v in mask_utils.toBbox(
                    mask_utils.encode(np.asfortranarray(MASKS[aid][1].astype(np.uint8)))
                )
            ]  # pixels, not SA-Co's normalised box
    b = samples["1/1002/metaclip_b.jpeg"]
    # a non-exhaustive pair without masks says nothing about absence: it is not a negative
    assert [(q.phrase, len(q.instances), q.exhaustive) for q in b.queries] == [
        ("chili", 0, True),
        ("stem", 0, False),
    ]
    d = samples["1/1003/metaclip_d.jpeg"]
    assert [(q.phrase, len(q.instances), q.exhaustive) for q in d.queries] == [
        ("bowl", 0, False),
        ("spoon", 0, True),
    ]

    manifest = load_manifest(out)
    assert manifest["skipped"]["by_reason"] == {"missing image file": 1}
    assert "missing.jpeg" in manifest["skipped"]["examples"][0]["detail"]
    assert manifest["dropped_annotations"]["by_reason"] == {
        "pair repeating a phrase of its image": 1,
        "undecodable RLE": 1,
    }
    assert manifest["num_negatives"] == 3 and manifest["extra"]["annotations_without_pair"] == 1
    assert manifest["extra"]["pairs"] == 9


def test_saco_fixture_reads_the_same_in_sam3(tmp_path: Path) -> None:
    """sam3's own loaders accept the fixture, and its evaluator scores exactly our exhaustive queries."""
    from sam3.eval.cgf1_eval import CGF1Evaluator
    from sam3.train.data.coco_json_loaders import SAM3_EVAL_API_FROM_JSON_NP

    ann, images = make_saco(tmp_path)
    api = SAM3_EVAL_API_FROM_JSON_NP(str(ann))
    sam3_pairs = {}
    for idx in api.getDatapointIds():
        (query,), _ = api.loadQueriesAndAnnotationsFromDatapoint(idx)
        (image,) = api.loadImagesFromDatapoint(idx)
        sam3_pairs[image["original_img_id"]] = (image["file_name"], query["query_text"])
    evaluator = CGF1Evaluator(str(ann), iou_type="segm")
    evaluated = {sam3_pairs[pid] for pid in evaluator.eval_img_ids}

    a, b, d = "1/1001/metaclip_a.jpeg", "1/1002/metaclip_b.jpeg", "1/1003/metaclip_d.jpeg"
    assert evaluated == {
        (a, "red apple"),
        (a, "the fish ball"),
        (a, "Red  Apple"),
        (b, "chili"),
        ("1/9999/missing.jpeg", "cup"),
        (d, "bowl"),
        (d, "spoon"),
    }
    ours = set()
    for item in SacoConverter(ann, images).items():
        if isinstance(item, Sample):
            ours |= {(item.image_id, q.phrase) for q in item.queries if q.exhaustive}
    # the same minus: the repeated phrase (dropped), the missing image (skipped) and "bowl", whose
    # only mask does not decode (the pair can no longer claim to be exhaustive)
    assert ours == {(a, "red apple"), (a, "the fish ball"), (b, "chili"), (d, "spoon")}


def test_saco_size_mismatch_and_bad_file(tmp_path: Path) -> None:
    ann, images = make_saco(tmp_path)
    data = json.loads(ann.read_text())
    data["images"][3]["width"] = 25
    ann.write_text(json.dumps(data))
    converter = SacoConverter(ann, images)
    skips = [item for item in converter.items() if not isinstance(item, Sample)]
    assert [(s.reason, s.key.endswith("metaclip_b")) for s in skips if "size" in s.reason] == [
        ("image size differs from the annotation file", True)
    ]
    assert "pair 103" in skips[0].detail or "pair 103" in skips[1].detail

    ann.write_text(json.dumps({"images": [{"id": 1, "file_name": "x.jpg"}], "annotations": []}))
    out = tmp_path / "out"
    assert main(["saco", "--annotations", str(ann), "--images", str(images), "--out", str(out)]) == 2


def test_saco_pairs_with_unusable_labels_are_dropped_and_counted_not_guessed(tmp_path: Path) -> None:
    """``text_input: null`` is not the phrase "none", a list is not "['red', 'apple']", "0" is not true."""
    images = tmp_path / "images"
    write_image(images / "a.jpeg", 24, 24, seed=1, fmt="JPEG")

    def pair(pid, text, exhaustive=1):
        return {"id": pid, "file_name": "a.jpeg", "text_input": text, "width": 24, "height": 24,
                "is_instance_exhaustive": exhaustive}

    ann = tmp_path / "saco.json"
    ann.write_text(json.dumps({"images": [pair(1, None), pair(2, ["red", "apple"]), pair(3, "stem", "0"),
                                          pair(4, "leaf", 0.5), pair(5, "fruit", True), pair(6, "twig", 0)],
                               "annotations": []}))
    out = tmp_path / "shards"
    assert main(["saco", "--annotations", str(ann), "--images", str(images), "--out", str(out),
                 "--no-progress"]) == 0
    (sample,) = iter_samples(out)
    assert [(q.phrase, q.exhaustive) for q in sample.queries] == [("fruit", True), ("twig", False)]
    assert load_manifest(out)["dropped_annotations"]["by_reason"] == {
        "pair whose text_input is not a string": 2,
        "pair whose is_instance_exhaustive is not 0/1/true/false": 2,
    }
