#!/usr/bin/env python
"""Per-phrase mask AP at several IoU thresholds and counting error of one or more models on one ground truth.

    python scripts/compare_per_phrase.py --gt runs/eval/student/ground_truth.json \\
        --pred teacher=runs/eval/teacher/predictions.json --pred student=runs/eval/student/predictions.json \\
        --out per_phrase.md

Files are those ``train.py test`` writes with ``sambridge.callbacks.PredictionWriter`` (or any SA-Co
ground truth and COCO results; see ``docs/evaluation.md``). Each phrase's queries are evaluated on
their own with ``sambridge.evaluate.evaluate_saco`` (AP as pycocotools computes it, so the ``all``
row equals ``sambridge evaluate``). Columns per model:

* ``AP``, ``AP50``, ``AP75``: mask AP over IoU 0.50:0.95, at 0.50 and at 0.75;
* ``count_mae``: mean |detections - instances| per image (detections score >= ``--score-threshold``);
* ``count_err%``: (all detections - all instances) / all instances: the bias of a yield estimate.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from data_pipelines.atomic import atomic_write
from sambridge.evaluate import evaluate_saco
from sambridge.metrics.cgf1 import DEFAULT_SCORE_THRESHOLD
from sambridge.metrics.saco import SacoGroundTruth, load_ground_truth, load_predictions

COLUMNS = ("AP", "AP50", "AP75", "count_mae", "count_err%")


def phrase_subset(gt: SacoGroundTruth, phrase: str | None) -> SacoGroundTruth:
    """The queries of one phrase (all queries for ``None``)."""
    ids = [i for i, img in gt.images.items() if phrase is None or img["text_input"] == phrase]
    return replace(gt, source=f"{gt.source} [{phrase or 'all'}]", images={i: gt.images[i] for i in ids},
                   instances={i: gt.instances[i] for i in ids}, crowds={i: gt.crowds[i] for i in ids})


def phrase_metrics(gt: SacoGroundTruth, predictions: list[dict[str, Any]], score_threshold: float) -> dict:
    """One row per phrase (and ``all``): queries, instances and the :data:`COLUMNS`."""
    phrases = sorted({img["text_input"] for img in gt.images.values()})
    rows = {}
    for phrase in [*phrases, None]:
        subset = phrase_subset(gt, phrase)
        ids = set(subset.images)
        evaluation = evaluate_saco(subset, [p for p in predictions if p["image_id"] in ids],
                                   score_threshold=score_threshold)
        table, metrics = evaluation.queries, evaluation.metrics
        instances, detections = int(table.num_gt.sum()), int(table.num_pred.sum())
        rows[phrase or "all"] = {
            "queries": len(table), "instances": instances, "AP": metrics["AP"], "AP50": metrics["AP50"],
            "AP75": metrics["AP75"], "count_mae": metrics["count_mae"],
            "count_err%": 100.0 * (detections - instances) / instances if instances else float("nan")}
    return rows


def markdown_table(results: dict[str, dict[str, dict[str, float]]]) -> str:
    """Phrases as rows, (model, metric) as columns."""
    models = list(results)
    first = results[models[0]]
    header = ["phrase", "queries", "instances"] + [f"{m} {c}" for m in models for c in COLUMNS]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for phrase, row in first.items():
        cells = [phrase, str(row["queries"]), str(row["instances"])]
        cells += [_fmt(results[m][phrase][c], c) for m in models for c in COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _fmt(value: float, column: str) -> str:
    """'-' where a value is undefined (AP of a phrase without instances is -1, a count error NaN)."""
    if value != value or (column.startswith("AP") and value < 0):
        return "-"
    return f"{value:+.1f}" if column == "count_err%" else f"{value:.3f}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gt", required=True, help="SA-Co ground truth JSON (ground_truth.json)")
    parser.add_argument("--pred", action="append", required=True, metavar="NAME=PREDICTIONS.json",
                        help="a model's COCO results; repeat for several models")
    parser.add_argument("--score-threshold", type=float, default=DEFAULT_SCORE_THRESHOLD,
                        help="detections for counting score at least this (AP uses every prediction)")
    parser.add_argument("--out", help="also write the table as Markdown")
    args = parser.parse_args(argv)
    named = [p.split("=", 1) if "=" in p else [Path(p).parent.name, p] for p in args.pred]
    if len({name for name, _ in named}) != len(named):
        parser.error(f"model names must differ: {[name for name, _ in named]}")
    for _, path in [("gt", args.gt), *named]:
        if not Path(path).is_file():
            print(f"error: {path} not found", file=sys.stderr)
            return 2
    gt = load_ground_truth(args.gt)
    results = {name: phrase_metrics(gt, load_predictions(path, gt), args.score_threshold) for name, path in named}
    table = markdown_table(results)
    print(table, end="")
    if args.out:
        atomic_write(args.out, table)
        print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
