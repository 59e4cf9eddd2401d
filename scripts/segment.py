#!/usr/bin/env python
"""Segment one image from noun phrases and save an overlay (and optionally COCO-style JSON).

    python scripts/segment.py --checkpoint runs/demo/checkpoints/last.ckpt \\
        --image photo.jpg --text "red circle" --text "blue square" --out overlay.png

``--checkpoint`` takes a sambridge Lightning checkpoint (GroundingModule / DistillModule) or a
student exported with ``sambridge export``. Images larger than the model input can be segmented
at full resolution in overlapping tiles (``--tile 1024 --overlap 256``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from data_pipelines.convert.common import RGB_CONVERTIBLE_MODES
from data_pipelines.overlay import Detection, draw_detections
from data_pipelines.schema import encode_mask, normalize_phrase
from data_pipelines.tiling import TilingConfig
from sambridge.inference import Segmenter, load_model


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="Lightning .ckpt or exported student file")
    parser.add_argument("--image", required=True, help="image file (any format PIL reads)")
    parser.add_argument("--text", action="append", required=True, help="noun phrase (repeat for several)")
    parser.add_argument("--out", required=True, help="overlay PNG to write")
    parser.add_argument("--json", help="also write the instances as COCO-style records (RLE masks)")
    parser.add_argument("--threshold", type=float, default=0.5, help="minimum score (match x presence)")
    parser.add_argument("--top-k", type=int, default=100, help="instances per phrase at most")
    parser.add_argument("--masks", choices=("auto", "sam2", "head"), default="auto",
                        help="instance masks from SAM2's decoder given the boxes, or the grounding head's own "
                             "(auto: what the checkpoint's run validated with)")
    parser.add_argument("--nms-iou", type=float, default=None,
                        help="drop detections overlapping a higher-scoring one by box IoU above this")
    parser.add_argument("--tile", type=int, default=0, help="tile size for large images (0: whole image)")
    parser.add_argument("--overlap", type=int, default=256, help="tile overlap in pixels")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    phrases = list(dict.fromkeys(normalize_phrase(t) for t in args.text))
    if "" in phrases:
        print(f"error: --text must be a noun phrase, got {[t for t in args.text if not t.strip()]}", file=sys.stderr)
        return 2
    image_path = Path(args.image)
    if not image_path.is_file():
        print(f"error: image not found: {image_path}", file=sys.stderr)
        return 2
    try:
        with Image.open(image_path) as opened:
            if opened.mode not in RGB_CONVERTIBLE_MODES:
                print(f"error: {image_path} has PIL mode {opened.mode} (16-bit or float); convert it to 8-bit "
                      "RGB first: the choice of range is yours to make", file=sys.stderr)
                return 2
            image = np.asarray(opened.convert("RGB"))
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:  # what PIL raises
        print(f"error: {image_path} is not a readable image: {err}", file=sys.stderr)
        return 2
    segmenter = Segmenter(load_model(args.checkpoint), score_threshold=args.threshold, top_k=args.top_k,
                          refine={"auto": None, "sam2": True, "head": False}[args.masks], nms_iou=args.nms_iou,
                          device=args.device)
    if args.tile:
        found = segmenter.segment_tiled(image, phrases, TilingConfig(tile_size=args.tile, overlap=args.overlap))
    else:
        found = segmenter.segment(image, phrases)
    detections = [Detection(mask=s.mask, label=f"{phrase} {s.score:.2f}", box_xyxy=s.box_xyxy, colour_index=q)
                  for q, (phrase, segments) in enumerate(zip(phrases, found, strict=True)) for s in segments]
    draw_detections(image, detections).save(args.out)
    for phrase, segments in zip(phrases, found, strict=True):
        print(f"{phrase!r}: {len(segments)} instance(s)" +
              (f", scores {', '.join(f'{s.score:.2f}' for s in segments[:10])}" if segments else ""))
    if args.json:
        records = [{"phrase": phrase, "score": s.score, "segmentation": encode_mask(s.mask),
                    "bbox": [s.box_xyxy[0], s.box_xyxy[1], s.box_xyxy[2] - s.box_xyxy[0],
                             s.box_xyxy[3] - s.box_xyxy[1]]}
                   for phrase, segments in zip(phrases, found, strict=True) for s in segments]
        Path(args.json).write_text(json.dumps(records))
    print(f"overlay: {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
