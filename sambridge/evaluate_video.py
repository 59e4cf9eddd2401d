"""``sambridge evaluate-video``: HOTA, SA-Co/VEval video cgF1, ID switches and counting error of masklets.

    sambridge evaluate-video --gt ground_truth.json --pred masklets.json [more.json ...] [--out evaluation.json]

Ground truth is YT-VIS JSON with SA-Co/VEval's ``video_np_pairs``; predictions are masklets JSONs written by
``sambridge track``, each naming its video by ``video.name``. Prints a summary and a per-phrase table; ``--out``
writes every metric as JSON. See :mod:`sambridge.metrics.video` for what computes each metric.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from data_pipelines.atomic import write_json_atomic
from sambridge.metrics.saco import RecordError
from sambridge.metrics.video import VideoEvaluation, evaluate_video
from sambridge.parsers import evaluate_video_parser


def read_json(path: str | Path) -> Any:
    """The JSON content of ``path`` (``FileNotFoundError`` when missing, ``RecordError`` when not JSON)."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise RecordError(f"not valid JSON: {err}", source=str(path), record="file") from err


def evaluate_video_files(gt_path: str | Path, pred_paths: Sequence[str | Path], *,
                         score_threshold: float = 0.0) -> VideoEvaluation:
    """:func:`~sambridge.metrics.video.evaluate_video` of a ground-truth file and masklets files."""
    return evaluate_video(read_json(gt_path), [read_json(p) for p in pred_paths], score_threshold=score_threshold,
                          gt_source=str(gt_path), pred_sources=[str(p) for p in pred_paths])


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``sambridge evaluate-video``; returns the exit code."""
    args = evaluate_video_parser().parse_args(argv)
    evaluation = evaluate_video_files(args.gt, args.pred, score_threshold=args.score_threshold)
    print(evaluation.table())
    if evaluation.unpredicted_videos:
        print(f"warning: no masklets file for {len(evaluation.unpredicted_videos)} ground-truth video(s) "
              f"(their objects count as missed): {', '.join(evaluation.unpredicted_videos[:5])}", file=sys.stderr)
    if args.out:
        write_json_atomic(args.out, {**evaluation.to_json(), "gt": str(args.gt), "pred": [str(p) for p in args.pred]},
                          indent=2)
        print(f"evaluation written to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
