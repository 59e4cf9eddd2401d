#!/usr/bin/env python
"""Where a grounding model's detections go wrong, query by query: can its queries reach the objects,
do the queries that reach them score, which query slots fire, and do absent phrases fire.

    python scripts/diagnose_queries.py --checkpoint runs/demo/checkpoints/last.ckpt \\
        --shards data/synthetic_demo/val --batches 13

Every phrase of each image is asked (up to ``--max-queries``); masks are the head's own (stride 4,
upsampled to the canvas), scores the model's detection scores, queries the one-to-one ones (SAM3's
outputs) or with ``--outputs one_to_many`` the one-to-many (DAC) ones. Per ground-truth instance it finds
the best mask IoU over all the phrase's queries ("reachable" at IoU >= 0.5) and the best score of the
queries that reach it ("found" at score >= threshold); per detection (score >= threshold, present
phrases) whether it is right (IoU >= 0.5 with an instance), empty, and which query slot made it.
Prints a table and, with ``--json``, writes the numbers. docs/training.md has what it showed on the demo.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter

import torch
import torch.nn.functional as F

from data_pipelines import ShardDataModule
from data_pipelines.atomic import write_json_atomic
from data_pipelines.batch import GroundingBatch
from sambridge.modules.checkpoint import load_trained_model


def instance_rows(model: torch.nn.Module, batch: GroundingBatch, threshold: float, counts: Counter) -> None:
    """Add one batch's per-instance and per-detection tallies to ``counts``."""
    out = model(batch.images, batch.phrases, batch.query_image)
    scores = model.scores(out)
    masks = F.interpolate(out["pred_masks"], size=batch.images.shape[-2:], mode="bilinear") > 0
    presence = out["presence_logit_dec"][:, 0].sigmoid()
    start = 0
    for q, phrase in enumerate(batch.phrases):
        n = int(batch.num_instances[q])
        truth, start = batch.masks[start:start + n], start + n
        fired = scores[q] >= threshold
        if n == 0:
            counts["absent"] += 1
            counts["absent_fired"] += int(fired.any())
            counts["absent_presence_sum"] += float(presence[q])
            continue
        counts["present"] += 1
        counts["present_presence_sum"] += float(presence[q])
        inter = (masks[q][:, None] & truth[None]).flatten(2).sum(-1).float()
        iou = inter / (masks[q][:, None] | truth[None]).flatten(2).sum(-1).clamp(min=1)  # (K, n)
        words = "one_word" if len(phrase.split()) == 1 else "more_words"
        reachable = iou.max(0).values >= 0.5
        found = (torch.where(iou >= 0.5, scores[q][:, None], torch.zeros_like(iou)).max(0).values >= threshold)
        for group in ("all", words):
            counts[f"{group}_instances"] += n
            counts[f"{group}_reachable"] += int(reachable.sum())
            counts[f"{group}_found"] += int((found & reachable).sum())
        for k in fired.nonzero()[:, 0].tolist():
            slot = "slot0" if k == 0 else "other_slots"
            counts[f"{slot}_detections"] += 1
            counts[f"{slot}_right"] += int(iou[k].max() >= 0.5)
            counts[f"{slot}_empty"] += int(masks[q, k].sum() == 0)


def summarise(counts: Counter) -> dict[str, float]:
    """Ratios of the tallies (see the module docstring)."""
    def ratio(a: str, b: str) -> float:
        return round(counts[a] / counts[b], 3) if counts[b] else float("nan")

    detections = counts["slot0_detections"] + counts["other_slots_detections"]
    return {
        "instances": counts["all_instances"],
        "reachable": ratio("all_reachable", "all_instances"),
        "found_of_reachable": ratio("all_found", "all_reachable"),
        "found_of_reachable_one_word": ratio("one_word_found", "one_word_reachable"),
        "found_of_reachable_more_words": ratio("more_words_found", "more_words_reachable"),
        "detections": detections,
        "detections_from_slot0": round(counts["slot0_detections"] / detections, 3) if detections else float("nan"),
        "right_slot0": ratio("slot0_right", "slot0_detections"),
        "right_other_slots": ratio("other_slots_right", "other_slots_detections"),
        "empty_masks": counts["slot0_empty"] + counts["other_slots_empty"],
        "presence_present": ratio("present_presence_sum", "present"),
        "presence_absent": ratio("absent_presence_sum", "absent"),
        "absent_fired": ratio("absent_fired", "absent"),
    }


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="Lightning checkpoint or student file")
    parser.add_argument("--shards", required=True, help="shards with exhaustive phrases (e.g. a val split)")
    parser.add_argument("--batches", type=int, default=13, help="batches of --batch-size images")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-queries", type=int, default=16, help="phrases asked per image at most")
    parser.add_argument("--threshold", type=float, default=0.5, help="score of a detection")
    parser.add_argument("--outputs", choices=("one_to_one", "one_to_many"), default="one_to_one",
                        help="which decoder queries to break down (whatever the run predicts with)")
    parser.add_argument("--json", help="also write the numbers here")
    args = parser.parse_args(argv)

    model = load_trained_model(args.checkpoint).eval()
    model.one_to_many_outputs = args.outputs == "one_to_many"
    data = ShardDataModule(val=args.shards, batch_size=args.batch_size, num_workers=0, pin_memory=False,
                           persistent_workers=False, image_size=model.image_size,
                           max_queries_per_image=args.max_queries)
    data.setup("validate")
    counts: Counter = Counter()
    with torch.no_grad():
        for i, batch in enumerate(data.val_dataloader()):
            if i >= args.batches:
                break
            instance_rows(model, batch, args.threshold, counts)
    summary = summarise(counts)
    width = max(map(len, summary))
    for key, value in summary.items():
        print(f"{key:<{width}}  {value}")
    if args.json:
        write_json_atomic(args.json, summary)
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
