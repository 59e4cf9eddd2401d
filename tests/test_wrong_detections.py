"""scripts/wrong_detections.py: where wrong detections land."""

from __future__ import annotations

import numpy as np
from pycocotools import mask as mask_utils
from script_loader import load_script


def _rle(rows: slice, cols: slice) -> dict:
    mask = np.zeros((16, 16), dtype=np.uint8, order="F")
    mask[rows, cols] = 1
    rle = mask_utils.encode(mask)
    return {"size": rle["size"], "counts": rle["counts"].decode()}


def test_detections_are_right_on_another_object_poor_or_on_nothing():
    square, circle = _rle(slice(0, 6), slice(0, 6)), _rle(slice(8, 14), slice(8, 14))
    ground_truth = {
        "images": [{"id": 1, "file_name": "a.png", "text_input": "red square", "sample_key": "a"},
                   {"id": 2, "file_name": "a.png", "text_input": "circle", "sample_key": "a"},
                   {"id": 3, "file_name": "a.png", "text_input": "blue circle", "sample_key": "a"}],
        "annotations": [{"image_id": 1, "segmentation": square}, {"image_id": 2, "segmentation": circle},
                        {"image_id": 3, "segmentation": circle}],
    }
    predictions = [
        {"image_id": 1, "score": 0.9, "segmentation": square},                      # right
        {"image_id": 1, "score": 0.8, "segmentation": circle},                      # on the blue circle
        {"image_id": 1, "score": 0.7, "segmentation": _rle(slice(0, 6), slice(0, 2))},  # IoU 1/3 with its square
        {"image_id": 1, "score": 0.6, "segmentation": _rle(slice(12, 16), slice(0, 4))},  # on nothing
        {"image_id": 1, "score": 0.4, "segmentation": circle},                      # under the threshold
        {"image_id": 2, "score": 0.9, "segmentation": square},                      # on the red square
    ]
    outcomes, confusions = load_script("wrong_detections").classify(ground_truth, predictions, threshold=0.5)
    assert outcomes == {"right": 1, "on another phrase's object": 2, "on its object, poor mask": 1,
                        "on no annotated object": 1}
    # the object is named by its most specific phrase ("blue circle", not "circle")
    assert confusions == {"red square -> blue circle": 1, "circle -> red square": 1}
