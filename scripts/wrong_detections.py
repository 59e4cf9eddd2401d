#!/usr/bin/env python
"""Where a model's wrong detections land: on another phrase's object (and which phrase), on the
right object with a poor mask, or on no annotated object. Reads what ``PredictionWriter`` writes.

    python scripts/wrong_detections.py --gt runs/demo/heldout_predictions/ground_truth.json \\
        --pred runs/demo/heldout_predictions/predictions.json

A detection (score >= ``--threshold``) is right when its mask overlaps an instance of its own phrase
in that image by IoU >= ``--iou``. Otherwise, in this order: it lies on another phrase's object (IoU
>= ``--iou`` with an instance of any other phrase asked of the same image; the object is named by
its most specific phrase, the one with the most words), it overlaps its own phrase's object poorly
(IoU >= 0.1), or it lies on no annotated object. Prints a table and the most frequent confusions
("asked -> found on"), and writes the numbers with ``--json``.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter, defaultdict
from collections.abc import Sequence

import numpy as np
from pycocotools import mask as mask_utils

from data_pipelines.atomic import write_json_atomic
from sambridge.metrics.saco import RecordError, SacoGroundTruth, load_ground_truth, load_predictions

POOR_MASK_IOU = 0.1
"""Below ``--iou`` but at least this IoU with its own phrase's object: a poor mask, not a miss."""


def _ious(segmentation: dict, others: Sequence[dict]) -> np.ndarray:
    """Mask IoU of ``segmentation`` with each of ``others`` (compressed RLEs)."""
    return mask_utils.iou([segmentation], list(others), [0] * len(others))[0] if others else np.zeros(0)


def classify(ground_truth: SacoGroundTruth, predictions: Sequence[dict], threshold: float = 0.5,
             iou: float = 0.5) -> tuple[Counter, Counter]:
    """(outcome counts, "asked -> found on" counts) of the detections scoring at least ``threshold``."""
    def sample_of(image: dict) -> str:
        return image.get("sample_key", image["file_name"])

    objects: dict[str, list[tuple[str, dict]]] = defaultdict(list)  # sample -> (phrase, mask) of every instance
    for image_id, image in ground_truth.images.items():
        objects[sample_of(image)] += [(image["text_input"], m) for m in ground_truth.instances.get(image_id, [])]
    outcomes, confusions = Counter(), Counter()
    for detection in predictions:
        if detection["score"] < threshold:
            continue
        image = ground_truth.images[detection["image_id"]]
        asked, mask = image["text_input"], detection["segmentation"]
        own_iou = _ious(mask, ground_truth.instances.get(detection["image_id"], [])).max(initial=0.0)
        if own_iou >= iou:
            outcomes["right"] += 1
            continue
        other = [(phrase, m) for phrase, m in objects[sample_of(image)] if phrase != asked]
        overlaps = _ious(mask, [m for _, m in other])
        names = [phrase for (phrase, _), overlap in zip(other, overlaps, strict=True) if overlap >= iou]
        if names:
            outcomes["on another phrase's object"] += 1
            confusions[f"{asked} -> {max(names, key=lambda p: (len(p.split()), p))}"] += 1
        elif own_iou >= POOR_MASK_IOU:
            outcomes["on its object, poor mask"] += 1
        else:
            outcomes["on no annotated object"] += 1
    return outcomes, confusions


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gt", required=True, help="ground_truth.json (PredictionWriter / SA-Co format)")
    parser.add_argument("--pred", required=True, help="predictions.json (COCO results with RLE masks)")
    parser.add_argument("--threshold", type=float, default=0.5, help="score of a detection")
    parser.add_argument("--iou", type=float, default=0.5, help="mask IoU that counts as the same object")
    parser.add_argument("--top", type=int, default=12, help="confusions to print")
    parser.add_argument("--json", help="also write the numbers here")
    args = parser.parse_args(argv)
    try:
        ground_truth = load_ground_truth(args.gt)
        predictions = load_predictions(args.pred, ground_truth)
    except (OSError, RecordError) as err:
        parser.exit(2, f"wrong_detections: error: {err}\n")
    outcomes, confusions = classify(ground_truth, predictions, args.threshold, args.iou)
    total = sum(outcomes.values())
    print(f"| detections scoring >= {args.threshold} | count | share |\n|---|---|---|")
    for outcome, count in outcomes.most_common():
        print(f"| {outcome} | {count} | {count / total:.1%} |")
    print("\n| asked -> found on | count |\n|---|---|")
    for pair, count in confusions.most_common(args.top):
        print(f"| {pair} | {count} |")
    result = {"detections": total, "outcomes": dict(outcomes), "confusions": dict(confusions.most_common())}
    if args.json:
        write_json_atomic(args.json, result)
    print(json.dumps({"detections": total, "outcomes": dict(outcomes)}))
    return result


if __name__ == "__main__":
    main()
