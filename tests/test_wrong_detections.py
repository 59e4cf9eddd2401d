"""scripts/wrong_detections.py: where wrong detections land."""

from __future__ import annotations

import numpy as np
from pycocotools import mask as mask_utils
from script_loader import load_script

from sambridge.metrics.saco import parse_ground_truth


def _rle(rows: slice, cols: slice) -> dict:
    mask = np.zeros((16, 16), dtype=np.uint8, order="F")
    mask[rows, cols] = 1
    rle = mask_utils.encode(mask)
    return {"size": rle["size"], "counts": rle["counts"].decode()}


def test_detections_are_right_on_another_object_poor_or_on_nothing():
    square, circle = _rle(slice(0, 6), slice(0, 6)), _rle(slice(8, 14), slice(8, 14))
    queries = [(1, "red square", square), (2, "circle", circle), (3, "blue circle", circle)]
    ground_truth = parse_ground_truth({
        "images": [{"id": i, "file_name": "a.png", "height": 16, "width": 16, "text_input": phrase,
                    "is_instance_exhaustive": 1, "sample_key": "a"} for i, phrase, _ in queries],
        "annotations": [{"id": i, "image_id": i, "category_id": 1, "iscrowd": 0, "segmentation": m}
                        for i, _, m in queries],
        "categories": [{"id": 1, "name": "object"}],
    })
    detections = [
        (1, 0.9, square),                            # right
        (1, 0.8, circle),                            # on the blue circle
        (1, 0.7, _rle(slice(0, 6), slice(0, 2))),    # IoU 1/3 with its square
        (1, 0.6, _rle(slice(12, 16), slice(0, 4))),  # on nothing
        (1, 0.4, circle),                            # under the threshold
        (2, 0.9, square),                            # on the red square
    ]
    predictions = [{"image_id": i, "category_id": 1, "score": score, "segmentation": m} for i, score, m in detections]
    outcomes, confusions = load_script("wrong_detections").classify(ground_truth, predictions, threshold=0.5)
    assert outcomes == {"right": 1, "on another phrase's object": 2, "on its object, poor mask": 1,
                        "on no annotated object": 1}
    # the object is named by its most specific phrase ("blue circle", not "circle")
    assert confusions == {"red square -> blue circle": 1, "circle -> red square": 1}
