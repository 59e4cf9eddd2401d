"""A colour heuristic to compare a trained model with: threshold the phrase's colour, take connected components.

    python scripts/heuristic_baseline.py --gt runs/x/predict/ground_truth.json --shards data/shards/val \
        --out runs/x/heuristic.json
    sambridge evaluate --gt runs/x/predict/ground_truth.json --pred runs/x/predict/predictions.json \
        --baseline runs/x/heuristic.json

For every (image, phrase) pair of an SA-Co ground-truth file (as ``PredictionWriter`` writes it) the
image is read from the shards, the pixels of the phrase's colour are thresholded and each connected
component of at least ``--min-area`` of the image becomes one instance. The colour comes from a
colour word in the phrase (red, green, blue, yellow); phrases naming vegetation (plant, weed, leaf,
crop, ...) take green; others take every strongly saturated pixel. Scores rank components by size
(0.5 for the smallest kept, up to 1.0 for the largest in the image), so mask AP has an order to
rank. It knows nothing of shapes or kinds: a model that cannot beat it has not learnt the concept.
"""

from __future__ import annotations

import argparse
import io
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

from data_pipelines.atomic import write_json_atomic
from data_pipelines.inspect import iter_samples
from sambridge.metrics.saco import prediction_records, saco_pair_id

VEGETATION = ("plant", "weed", "leaf", "leaves", "crop", "grass", "seedling", "vegetation")


def colour_mask(rgb: np.ndarray, phrase: str) -> np.ndarray:
    """(H, W) bool: pixels of the colour ``phrase`` names (see the module docstring)."""
    r, g, b = (rgb[..., i].astype(np.float32) for i in range(3))
    words = phrase.lower().split()
    if "red" in words:
        return (r > 1.4 * g) & (r > 1.2 * b) & (r > 90)
    if "blue" in words:
        return (b > 1.25 * r) & (b > 1.1 * g) & (b > 80)
    if "yellow" in words:
        return (r > 110) & (g > 110) & (b < 0.75 * np.minimum(r, g))
    if "green" in words or any(word.startswith(VEGETATION) for word in words):
        return (2 * g - r - b > 30) & (g > 50)  # excess green
    return rgb.max(-1).astype(np.int16) - rgb.min(-1) > 70  # anything strongly coloured


def components(mask: np.ndarray, min_area: int) -> tuple[np.ndarray, np.ndarray]:
    """Connected components of ``mask`` with at least ``min_area`` pixels: (K, H, W) bool and (K,) scores."""
    labels, count = ndimage.label(mask)
    areas = np.bincount(labels.ravel(), minlength=count + 1)[1:]
    kept = np.flatnonzero(areas >= min_area) + 1
    if not len(kept):
        return np.zeros((0, *mask.shape), dtype=bool), np.zeros(0)
    sizes = areas[kept - 1].astype(np.float64)
    scores = 0.5 + 0.5 * (sizes - sizes.min()) / max(sizes.max() - sizes.min(), 1.0)
    return labels[None] == kept[:, None, None], scores


def predict(gt_path: str | Path, shard_dirs: Sequence[str | Path], min_area_fraction: float) -> list[dict]:
    """Heuristic predictions (COCO results with RLE masks) for every pair of the ground-truth file."""
    pairs: dict[str, list[tuple[int, str]]] = {}
    for entry in json.loads(Path(gt_path).read_text())["images"]:
        pairs.setdefault(entry["sample_key"], []).append((entry["id"], entry["text_input"]))
    records: list[dict] = []
    found = set()
    for shard_dir in shard_dirs:
        for sample in iter_samples(shard_dir):
            if sample.key not in pairs:
                continue
            found.add(sample.key)
            rgb = np.asarray(Image.open(io.BytesIO(sample.image)).convert("RGB"))
            min_area = max(1, int(min_area_fraction * rgb.shape[0] * rgb.shape[1]))
            for pair_id, phrase in pairs[sample.key]:
                if pair_id != saco_pair_id(sample.key, phrase):
                    raise ValueError(f"{gt_path}: image id {pair_id} is not the pair id of sample "
                                     f"{sample.key!r} and phrase {phrase!r}")
                masks, scores = components(colour_mask(rgb, phrase), min_area)
                records += prediction_records(pair_id, masks, scores)
    missing = sorted(set(pairs) - found)
    if missing:
        raise ValueError(f"{len(missing)} samples of {gt_path} are not in the shards (first: {missing[:3]})")
    return records


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="heuristic_baseline", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gt", required=True, help="SA-Co ground truth of the pairs to predict")
    parser.add_argument("--shards", nargs="+", required=True, help="shard directories holding the images")
    parser.add_argument("--out", required=True, help="predictions JSON (COCO results) to write")
    parser.add_argument("--min-area", type=float, default=0.002,
                        help="smallest component kept, as a fraction of the image (default 0.002)")
    args = parser.parse_args(argv)
    try:
        records = predict(args.gt, args.shards, args.min_area)
    except (OSError, ValueError, KeyError) as err:
        parser.exit(2, f"heuristic_baseline: error: {err}\n")
    write_json_atomic(args.out, records)
    print(f"{len(records)} heuristic detections written to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
