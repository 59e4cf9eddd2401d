"""Benchmark: queries/s of ``sambridge evaluate`` vs SAM3's CGF1Evaluator on the same files.

    python scripts/bench_eval.py [--queries 10000] [--seed 0] [--repeats 3] [--gt-versions 1]
                                 [--json bench.json] [--skip-cocoeval]

Draws seeded synthetic SA-Co ground truth and predictions (negatives, crowded scenes, crowd
regions, non-exhaustive queries, queries without predictions), writes them as JSON, then times,
from reading the files to the final numbers:

- ``sambridge``: :func:`sambridge.evaluate.evaluate_files` (cgF1 & co., mask AP, IoU, counting);
- ``sam3 CGF1Evaluator``: ``sam3.eval.cgf1_eval.CGF1Evaluator`` (cgF1 & co. only);
- ``pycocotools COCOeval``: mask AP only (evaluate + accumulate + summarize), for reference.

Runs are interleaved and repeated; the fastest of each is reported (least disturbed by other load).
It also checks the numbers agree: cgF1 & co. with CGF1Evaluator, AP with COCOeval.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from sam3.eval.cgf1_eval import CGF1Evaluator

from data_pipelines.atomic import write_json_atomic
from sambridge.evaluate import evaluate_files
from sambridge.metrics import SAM3_KEYS, make_synthetic_saco


def _cocoeval_ap(gt_path: Path, pred_path: Path, image_ids: list[int]) -> float:
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO(str(gt_path))
        coco_eval = COCOeval(coco_gt, coco_gt.loadRes(str(pred_path)), iouType="segm")
        coco_eval.params.imgIds = image_ids
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
    return float(coco_eval.stats[0])


def _cgf1_evaluator(gt_paths: list[Path], pred_path: Path) -> dict[str, float]:
    with contextlib.redirect_stdout(io.StringIO()):  # it prints its summary
        evaluator = CGF1Evaluator([str(p) for p in gt_paths] if len(gt_paths) > 1 else str(gt_paths[0]))
        return evaluator.evaluate(str(pred_path))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--queries", type=int, default=10_000, help="synthetic (image, phrase) queries")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3,
                        help="timed runs of each evaluator (the fastest is reported)")
    parser.add_argument("--gt-versions", type=int, default=1,
                        help="ground-truth versions (3 = SA-Co/Gold's oracle evaluation)")
    parser.add_argument("--json", metavar="PATH", help="also write the results here")
    parser.add_argument("--skip-cocoeval", action="store_true", help="do not time pycocotools' COCOeval")
    args = parser.parse_args(argv)

    start = time.perf_counter()
    data = make_synthetic_saco(args.queries, seed=args.seed, gt_versions=args.gt_versions)
    print(f"generated {args.queries} queries, {len(data.predictions)} predictions, "
          f"{sum(len(g['annotations']) for g in data.ground_truths)} annotations "
          f"in {time.perf_counter() - start:.1f} s")

    with tempfile.TemporaryDirectory() as tmp:
        gt_paths = [Path(tmp) / f"gt_{v}.json" for v in range(args.gt_versions)]
        for path, gt in zip(gt_paths, data.ground_truths, strict=True):
            write_json_atomic(path, gt)
        pred_path = Path(tmp) / "predictions.json"
        write_json_atomic(pred_path, data.predictions)
        excluded = {img["id"] for gt in data.ground_truths[1:] for img in gt["images"]
                    if not img["is_instance_exhaustive"]}
        image_ids = [img["id"] for img in data.ground_truths[0]["images"]
                     if img["is_instance_exhaustive"] and img["id"] not in excluded]

        runs: dict[str, Callable[[], object]] = {
            "sambridge evaluate_files": lambda: evaluate_files(gt_paths, pred_path),
            "sam3 CGF1Evaluator": lambda: _cgf1_evaluator(gt_paths, pred_path),
        }
        if not args.skip_cocoeval:
            runs["pycocotools COCOeval (AP only)"] = lambda: _cocoeval_ap(gt_paths[0], pred_path, image_ids)
        times: dict[str, list[float]] = {name: [] for name in runs}
        outputs: dict[str, object] = {}
        for _ in range(args.repeats):
            for name, run in runs.items():
                start = time.perf_counter()
                outputs[name] = run()
                times[name].append(time.perf_counter() - start)

    ours, theirs = outputs["sambridge evaluate_files"], outputs["sam3 CGF1Evaluator"]
    cgf1_diff = max(abs(ours[key] - (theirs[f"cgF1_eval_segm_{sam3_key}"] * scale
                                     if theirs[f"cgF1_eval_segm_{sam3_key}"] != -1 else -1.0))
                    for key, (sam3_key, scale) in SAM3_KEYS.items())
    result = {
        "queries": args.queries, "gt_versions": args.gt_versions, "evaluated_queries": len(image_ids),
        "predictions": len(data.predictions), "repeats": args.repeats,
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads",
        "timings": {name: {"best_s": min(t), "median_s": statistics.median(t),
                           "queries_per_s": args.queries / min(t)} for name, t in times.items()},
        "max_abs_diff_vs_CGF1Evaluator": cgf1_diff,
        "cgF1": ours["cgF1"], "pmF1": ours["pmF1"], "IL_MCC": ours["IL_MCC"], "AP": ours["AP"],
    }
    if not args.skip_cocoeval:
        result["abs_diff_AP_vs_COCOeval"] = abs(ours["AP"] - outputs["pycocotools COCOeval (AP only)"])

    width = max(len(name) for name in times)
    print(f"\n{'evaluator':<{width}}  {'best s':>8}  {'median s':>8}  {'queries/s':>10}")
    for name, t in result["timings"].items():
        print(f"{name:<{width}}  {t['best_s']:8.3f}  {t['median_s']:8.3f}  {t['queries_per_s']:10.0f}")
    timings = result["timings"]
    speedup = timings["sam3 CGF1Evaluator"]["best_s"] / timings["sambridge evaluate_files"]["best_s"]
    print(f"\nsambridge vs CGF1Evaluator: {speedup:.2f}x the throughput; "
          f"max |difference| over its metrics {cgf1_diff:.2e}"
          + ("" if args.skip_cocoeval else f"; |AP - COCOeval AP| {result['abs_diff_AP_vs_COCOeval']:.2e}"))
    print(json.dumps(result, indent=2))
    if args.json:
        write_json_atomic(args.json, result)
    return result


if __name__ == "__main__":
    main()
