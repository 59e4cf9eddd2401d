"""``sambridge evaluate``: SA-Co metrics (as SAM3 computes them), mask AP, IoU and counting error from files.

    sambridge evaluate --gt GT.json [GT_b.json GT_c.json] --pred PRED.json [--out metrics.json]
                       [--per-phrase per_phrase.csv] [--grid queries.png --image-root DIR]
                       [--baseline REF.json] [--calibration calibration.png]

Ground truth is SA-Co JSON (one ``images`` entry per image-phrase pair), predictions a COCO results
list (see :mod:`sambridge.metrics.saco`). Several ground-truth files (SA-Co/Gold ships three
annotations of each query) give SAM3's oracle evaluation: per query, the version the predictions
agree with best. cgF1/pmF1/IL_MCC equal ``sam3.eval.cgf1_eval.CGF1Evaluator`` on the same files;
AP/AP50/AP75 equal pycocotools' COCOeval (``segm``, all sizes) on the first ground truth (SAM3 has
no oracle AP; see :mod:`sambridge.metrics.ap` for how). Only instance-exhaustive queries are
evaluated; the rest are counted as ``num_skipped``.
"""

from __future__ import annotations

import io
import sys
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import webdataset as wds
from PIL import Image
from pycocotools import mask as mask_utils
from tqdm import tqdm

from data_pipelines.atomic import write_json_atomic
from data_pipelines.pipeline import resolve_shards
from data_pipelines.schema import sample_from_wds
from data_pipelines.writer import MANIFEST
from sambridge.metrics.ap import DEFAULT_MAX_DETS, average_precision
from sambridge.metrics.calibration import Calibration, calibration
from sambridge.metrics.cgf1 import DEFAULT_SCORE_THRESHOLD, IOU_THRESHOLDS, select_oracle, true_positives
from sambridge.metrics.masks import rle_ious, rle_union_overlap
from sambridge.metrics.queries import QueryMatch, QueryTable, count_duplicates, match_query, stack_ap_records
from sambridge.metrics.saco import SacoGroundTruth, gc_paused, load_ground_truth, load_predictions
from sambridge.parsers import evaluate_parser
from sambridge.report import (
    QueryView,
    compare_phrase_rows,
    query_grid_figure,
    rank_queries,
    reliability_figure,
    save_figure,
    write_phrase_table,
)

if TYPE_CHECKING:
    from matplotlib.figure import Figure

#: Metrics the printed summary shows, in order (the JSON has them all).
HEADLINE = ("cgF1", "pmF1", "IL_MCC", "cgF1@0.5", "cgF1@0.75", "positive_macro_F1", "IL_F1", "AP", "AP50",
            "AP75", "mIoU", "cIoU", "count_mae", "count_exact", "duplicate_rate", "ECE", "num_queries", "num_positive",
            "num_skipped")


@dataclass
class Evaluation:
    """Everything one evaluation produced.

    Attributes:
        metrics: flat metric name -> value (cgF1 and pmF1 in percent, as SAM3 reports them).
        queries: per-query statistics of the evaluated queries, in ground-truth order.
        gt_version: (Q,) which ground-truth version each query was scored against (oracle).
        calibration: reliability of the top detections' scores (IoU >= 0.5 against the first version).
    """

    metrics: dict[str, float]
    queries: QueryTable
    gt_version: np.ndarray
    calibration: Calibration

    def per_phrase(self) -> list[dict[str, Any]]:
        """Per-phrase rows (:meth:`sambridge.metrics.QueryTable.per_phrase`)."""
        return self.queries.per_phrase()


def _evaluation_ids(gts: Sequence[SacoGroundTruth]) -> list[int]:
    """SAM3's rule: exhaustive in the first version and not marked non-exhaustive in any other."""
    first = gts[0]
    for other in gts[1:]:
        if set(other.images) != set(first.images):
            missing = sorted(set(first.images) ^ set(other.images))[:5]
            raise ValueError(f"{other.source} and {first.source} describe different queries "
                             f"(ids in one but not the other: {missing}...)")
    excluded = {i for other in gts[1:] for i, img in other.images.items()
                if not img["is_instance_exhaustive"]}
    return [i for i in first.exhaustive_ids() if i not in excluded]


def evaluate_saco(gts: SacoGroundTruth | Sequence[SacoGroundTruth], predictions: list[dict[str, Any]], *,
                  score_threshold: float = DEFAULT_SCORE_THRESHOLD, max_dets: int = DEFAULT_MAX_DETS,
                  progress: bool = False) -> Evaluation:
    """Evaluate validated predictions against one or more validated ground-truth versions.

    Args:
        gts: the ground truth, or several versions of it (oracle evaluation).
        predictions: validated COCO results (:func:`sambridge.metrics.saco.parse_predictions`).
        score_threshold: predictions scoring at least this are detections (cgF1, IoU, counting).
        max_dets: predictions per query (by score) that count for AP.
        progress: show a progress bar.
    """
    gts = [gts] if isinstance(gts, SacoGroundTruth) else list(gts)
    ids = _evaluation_ids(gts)
    by_image: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for pred in predictions:
        by_image[pred["image_id"]].append(pred)

    versions, thresholds = len(gts), len(IOU_THRESHOLDS)
    tp = np.zeros((versions, len(ids), thresholds), dtype=np.int64)
    num_gt, inter, union, num_dup = (np.zeros((versions, len(ids)), dtype=np.int64) for _ in range(4))
    num_pred = np.zeros(len(ids), dtype=np.int64)
    ap_records: list[QueryMatch] = []
    for q, image_id in enumerate(tqdm(ids, desc="queries", disable=not progress)):
        preds = by_image.get(image_id, [])
        rles = [p["segmentation"] for p in preds]
        scores = np.array([p["score"] for p in preds], dtype=np.float64)
        match = match_query(rle_ious(rles, gts[0].instances[image_id]), scores,
                            score_threshold=score_threshold, max_dets=max_dets,
                            crowd_ious=rle_ious(rles, gts[0].crowds[image_id], crowd=True))
        ap_records.append(match)
        detections = [rles[i] for i in match.detections]
        num_pred[q] = len(detections)
        for v, gt in enumerate(gts):
            instances = gt.instances[image_id]
            if v == 0:
                tp[v, q], num_dup[v, q] = match.tp, match.duplicates
            else:
                ious = rle_ious(detections, instances)
                tp[v, q], num_dup[v, q] = true_positives(ious), count_duplicates(ious)
            num_gt[v, q] = len(instances)
            inter[v, q], union[v, q] = rle_union_overlap(detections, instances)

    choice = select_oracle(list(tp), list(num_gt), num_pred) if versions > 1 else np.zeros(len(ids), np.int64)
    rows = np.arange(len(ids))
    table = QueryTable(phrases=[gts[0].images[i]["text_input"] for i in ids], image_ids=list(ids),
                       tp=tp[choice, rows], num_gt=num_gt[choice, rows], num_pred=num_pred,
                       inter=inter[choice, rows], union=union[choice, rows], num_dup=num_dup[choice, rows])
    metrics = table.metrics()
    in_coco_order = [ap_records[i] for i in np.argsort(ids, kind="stable")]  # COCOeval sorts image ids
    scores, matched, ignored = stack_ap_records(in_coco_order)
    metrics.update(average_precision(scores, matched, ignored, num_gt=int(num_gt[0].sum()), max_dets=max_dets))
    reliability = calibration(scores[~ignored[:, 0]], matched[~ignored[:, 0], 0])
    metrics["ECE"] = reliability.ece
    metrics["num_skipped"] = float(len(gts[0].images) - len(ids))
    return Evaluation(metrics=metrics, queries=table, gt_version=choice, calibration=reliability)


def evaluate_files(gt_path: str | Path | Sequence[str | Path], pred_path: str | Path, *,
                   score_threshold: float = DEFAULT_SCORE_THRESHOLD, max_dets: int = DEFAULT_MAX_DETS,
                   progress: bool = False) -> dict[str, float]:
    """Metrics of an SA-Co ground-truth file (or several versions) and a COCO results file.

    Args:
        gt_path: SA-Co ground-truth JSON, or a list of versions of it (oracle evaluation).
        pred_path: COCO results JSON.
        score_threshold: predictions scoring at least this are detections (SAM3: 0.5).
        max_dets: detections per query that count for AP (COCO: 100).
        progress: show a progress bar.
    """
    return load_and_evaluate(gt_path, pred_path, score_threshold=score_threshold, max_dets=max_dets,
                             progress=progress)[0].metrics


def load_and_evaluate(
        gt_path: str | Path | Sequence[str | Path], pred_path: str | Path, *,
        score_threshold: float = DEFAULT_SCORE_THRESHOLD, max_dets: int = DEFAULT_MAX_DETS,
        progress: bool = False) -> tuple[Evaluation, list[SacoGroundTruth], list[dict[str, Any]]]:
    """Load, validate and evaluate files; also returns the loaded ground truths and predictions."""
    paths = [gt_path] if isinstance(gt_path, str | Path) else list(gt_path)
    if not paths:
        raise ValueError("at least one ground-truth file is needed")
    with gc_paused():
        gts = [load_ground_truth(p) for p in paths]
        predictions = load_predictions(pred_path, gts[0])
        evaluation = evaluate_saco(gts, predictions, score_threshold=score_threshold, max_dets=max_dets,
                                   progress=progress)
    return evaluation, gts, predictions


def format_metrics(metrics: dict[str, float], keys: Sequence[str] = HEADLINE) -> str:
    """A two-column text table of ``keys`` (those present)."""
    rows = [(k, metrics[k]) for k in keys if k in metrics]
    width = max((len(k) for k, _ in rows), default=6)
    lines = [f"{'metric':<{width}}  value", f"{'-' * width}  {'-' * 10}"]
    lines += [f"{k:<{width}}  {int(v) if k.startswith('num_') else round(v, 4)}" for k, v in rows]
    lines.append("(cgF1 and pmF1 in percent, as SAM3 reports them; the rest are fractions or counts)")
    return "\n".join(lines)


def format_comparison(metrics: dict[str, float], reference: dict[str, float], name: str = "baseline",
                      keys: Sequence[str] = HEADLINE) -> str:
    """A text table of ``keys``: the run, the reference run and their difference."""
    rows = [(k, metrics[k], reference[k]) for k in keys if k in metrics and k in reference]
    width = max((len(k) for k, _, _ in rows), default=6)
    lines = [f"{'metric':<{width}}  {'model':>10}  {name:>10}  {'difference':>10}",
             f"{'-' * width}  {'-' * 10}  {'-' * 10}  {'-' * 10}"]
    for k, a, b in rows:
        if k.startswith("num_"):
            lines.append(f"{k:<{width}}  {int(a):>10}  {int(b):>10}")
        else:
            lines.append(f"{k:<{width}}  {a:>10.4f}  {b:>10.4f}  {a - b:>+10.4f}")
    lines.append("(cgF1 and pmF1 in percent, as SAM3 reports them; lower is better for count_mae, "
                 "duplicate_rate and ECE)")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# best/worst grid of a file evaluation
# ----------------------------------------------------------------------------------------------
def _decode(rles: Sequence[dict[str, Any]], height: int, width: int) -> np.ndarray:
    if not rles:
        return np.zeros((0, height, width), dtype=bool)
    return np.moveaxis(mask_utils.decode(list(rles)), -1, 0).astype(bool)


def _image_reader(image_root: Path, entries: Sequence[dict[str, Any]]
                  ) -> Callable[[dict[str, Any]], tuple[np.ndarray, str]]:
    """Reads the image of a ground-truth entry: ``(RGB array, where it came from)``."""
    if (image_root / MANIFEST).is_file():
        wanted = {entry.get("sample_key") for entry in entries} - {None}
        found: dict[str, bytes] = {}
        for url in resolve_shards(str(image_root)).urls:  # raw records: only the wanted ones are decoded
            for record in wds.WebDataset(url, shardshuffle=False, empty_check=False):
                if record["__key__"] in wanted:
                    found[record["__key__"]] = sample_from_wds(record, source=url).image
            if len(found) == len(wanted):
                break

        def from_shards(entry: dict[str, Any]) -> tuple[np.ndarray, str]:
            key = entry.get("sample_key")
            if key not in found:
                raise FileNotFoundError(f"query {entry['id']} ({entry['text_input']!r}): sample {key!r} is not "
                                        f"in the shards of {image_root}")
            with Image.open(io.BytesIO(found[key])) as img:
                return np.asarray(img.convert("RGB")), f"{image_root} sample {key!r}"
        return from_shards

    def from_files(entry: dict[str, Any]) -> tuple[np.ndarray, str]:
        path = image_root / entry.get("file_name", "")
        if not path.is_file():
            raise FileNotFoundError(f"query {entry['id']} ({entry['text_input']!r}): image {path} not found "
                                    f"(file_name {entry.get('file_name')!r} under {image_root})")
        with Image.open(path) as img:
            return np.asarray(img.convert("RGB")), str(path)
    return from_files


def saco_query_grid(evaluation: Evaluation, gts: Sequence[SacoGroundTruth],
                    predictions: Sequence[dict[str, Any]], image_root: str | Path, num_queries: int = 4,
                    score_threshold: float = DEFAULT_SCORE_THRESHOLD) -> Figure:
    """The best/worst grid of a file evaluation, images read from ``image_root / file_name`` or, when
    ``image_root`` is a shard directory (it holds ``manifest.json``), from its samples.

    Args:
        evaluation: the result of :func:`evaluate_saco`.
        gts: the ground-truth versions it was evaluated against.
        predictions: the predictions it evaluated.
        image_root: folder the ground truth's ``file_name`` paths are relative to, or the shard
            directory the ground truth was predicted from (images found by ``sample_key``).
        num_queries: best and worst queries to show (each).
        score_threshold: predictions drawn are those scoring at least this.
    """
    table = evaluation.queries
    quality, iou = table.quality(), table.iou()
    best, worst = rank_queries(quality, num_queries)
    by_image: dict[int, list[dict[str, Any]]] = {}
    for pred in predictions:
        if pred["score"] >= score_threshold:
            by_image.setdefault(pred["image_id"], []).append(pred["segmentation"])

    shown = [*best, *worst]
    read_image = _image_reader(Path(image_root), [gts[0].images[table.image_ids[q]] for q in shown])

    def view(q: int) -> QueryView:
        image_id = table.image_ids[q]
        entry = gts[0].images[image_id]
        image, path = read_image(entry)
        h, w = entry["height"], entry["width"]
        if image.shape[:2] != (h, w):
            raise ValueError(f"query {image_id}: image {path} is {image.shape[1]}x{image.shape[0]} but the "
                             f"ground truth says {w}x{h}")
        return QueryView(image=image, phrase=entry["text_input"],
                         gt_masks=_decode(gts[evaluation.gt_version[q]].instances[image_id], h, w),
                         pred_masks=_decode(by_image.get(image_id, []), h, w),
                         caption=f"F1 {quality[q]:.2f}  IoU {iou[q]:.2f}  (id {image_id})")

    return query_grid_figure([view(q) for q in best], [view(q) for q in worst])


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``sambridge evaluate``; returns the exit code."""
    parser = evaluate_parser()
    parser.set_defaults(score_threshold=DEFAULT_SCORE_THRESHOLD, max_dets=DEFAULT_MAX_DETS)
    args = parser.parse_args(argv)
    if args.grid and not args.image_root:
        parser.error("--grid needs --image-root")
    evaluation, gts, predictions = load_and_evaluate(args.gt, args.pred, score_threshold=args.score_threshold,
                                                     max_dets=args.max_dets, progress=True)
    if not predictions:
        print(f"warning: {args.pred} holds no predictions: every instance counts as missed", file=sys.stderr)
    reference = None
    if args.baseline:
        with gc_paused():
            reference = evaluate_saco(gts, load_predictions(args.baseline, gts[0]),
                                      score_threshold=args.score_threshold, max_dets=args.max_dets)
        print(format_comparison(evaluation.metrics, reference.metrics, args.baseline_name))
    else:
        print(format_metrics(evaluation.metrics))
    if args.out:
        result = {"metrics": evaluation.metrics, "gt": [str(p) for p in args.gt], "pred": str(args.pred),
                  "score_threshold": args.score_threshold, "max_dets": args.max_dets}
        if reference is not None:
            result.update(baseline=str(args.baseline), baseline_metrics=reference.metrics)
        write_json_atomic(args.out, result)
        print(f"metrics written to {args.out}")
    if args.per_phrase:
        markdown = Path(args.per_phrase).with_suffix(".md")
        if reference is None:
            write_phrase_table(evaluation.per_phrase(), args.per_phrase, markdown)
        else:
            rows, columns = compare_phrase_rows(evaluation.per_phrase(), reference.per_phrase(), args.baseline_name)
            write_phrase_table(rows, args.per_phrase, markdown, columns=columns)
        print(f"per-phrase table written to {args.per_phrase} and {markdown}")
    if args.calibration:
        curves = {"model": evaluation.calibration}
        if reference is not None:
            curves[args.baseline_name] = reference.calibration
        save_figure(reliability_figure(curves), args.calibration)
        print(f"reliability diagram written to {args.calibration}")
    if args.grid:
        figure = saco_query_grid(evaluation, gts, predictions, image_root=args.image_root,
                                 num_queries=args.grid_queries, score_threshold=args.score_threshold)
        save_figure(figure, args.grid)
        print(f"best/worst queries written to {args.grid}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
