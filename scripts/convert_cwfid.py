#!/usr/bin/env python
"""CWFID (Crop/Weed Field Image Dataset) -> tiled COCO instance segmentation, for a small real-data check.

CWFID (Haug & Ostermann, CVPPP/ECCV 2014 workshops) has 60 top-down field photographs of organic
carrot rows (1296x966 PNG) in which every plant is outlined by a polygon typed ``crop`` or ``weed``
(``annotations/NNN_annotation.yaml``), plus a pixel-exact crop/weed label image
(``annotations/NNN_annotation.png``: green = crop, red = weed, black = soil). This script makes one
instance mask per polygon: the polygon's pixels that the label image gives the polygon's type, so
the masks follow the leaves rather than the coarse outline. A pixel inside two polygons of the same
type goes to the smaller polygon; single-point "polygons" and masks under ``--min-area`` pixels are
dropped (both are counted in the printed summary).

Tiles: nearly every whole photograph holds both carrots and weeds, so with whole images every
evaluation query would be positive and image-level MCC (hence cgF1) would be 0 for any model.
``--tiles N`` (default 2) cuts each photograph into an N x N grid of equal tiles (648x483 for N=2;
the last row/column takes the remainder pixels, so nothing is lost) and writes each tile as its own
COCO image ``cwfid_NNN_rR_cC.jpg`` with the masks cropped to it (``--tiles 1``: whole images named
``cwfid_NNN.jpg``). A plant cut by a tile border keeps its visible part as an instance; pieces under
``--min-area`` pixels inside a tile are dropped (counted in the summary). Tiles without carrots or
without weeds then occur, and since a COCO file is exhaustive for every category on every image,
``python -m data_pipelines coco`` (default ``--negatives-per-image all``) writes an exhaustive
negative query for each category absent from a tile.

Licence: the dataset's README says "All data is subject to copyright and may only be used for
non-commercial research. In case of use please cite our publication" (doi 10.1007/978-3-319-16220-1_8).
Keep the images and everything made from them out of the repository (``data/`` is git-ignored).

Getting the source (about 90 MB; images, masks and annotations are all in the repository tree)::

    git clone https://github.com/cwfid/dataset cwfid      # tested at commit 36290d0
    python scripts/convert_cwfid.py --source cwfid          # -> data/real_check

Output under ``--out``: ``images/cwfid_NNN_rR_cC.jpg`` (or ``.png`` with ``--image-format png``)
and ``annotations_train.json`` / ``annotations_val.json`` with compressed-RLE segmentations and the
categories ``carrot plant`` and ``weed`` (``--crop-phrase``/``--weed-phrase``). The split is a
seeded shuffle of the SOURCE image numbers (``--val-fraction 0.2``, ``--seed 0``: 48 train, 12 val
photographs), so all tiles of a photograph are in the same split and no plant is in both; the
dataset's own ``train_test_split.yaml`` is not used (it is 40/21 and lists image 28 in both).

The crop/weed labels are not exhaustive: about 8% of the vegetation pixels of ``masks/`` (whole
plants, 52 of the 60 images) carry no label. With ``--unlabelled-min-area N`` a tile holding (the
in-tile part of) a connected unlabelled vegetation region of at least N pixels gets both categories
in LVIS-style ``not_exhaustive_category_ids`` (and absent categories of the other tiles go to
``neg_category_ids``), so the converter reads the file as LVIS and marks those queries
``exhaustive: false`` instead of treating unlabelled plants as background.
Then make shards with the project's converter (one call per split)::

    python -m data_pipelines coco --annotations data/real_check/annotations_train.json \\
        --images data/real_check/images --source cwfid --out data/real_check/shards/train
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from PIL import Image, ImageDraw
from pycocotools import mask as mask_utils

TYPES = ("crop", "weed")


def _type_masks(label_png: Path) -> dict[str, np.ndarray]:
    """The label image's crop (green) and weed (red) pixels as boolean masks."""
    rgb = np.asarray(Image.open(label_png).convert("RGB"))
    red, green = rgb[..., 0] > 127, rgb[..., 1] > 127
    return {"crop": green & ~red, "weed": red & ~green}


def _polygon_mask(xs: list[float], ys: list[float], height: int, width: int) -> np.ndarray:
    canvas = Image.new("1", (width, height), 0)
    ImageDraw.Draw(canvas).polygon(list(zip(xs, ys, strict=True)), fill=1, outline=1)
    return np.asarray(canvas, dtype=bool)


def instances_of(annotation_yaml: Path, min_area: int, stats: Counter[str]) -> tuple[
        list[tuple[str, np.ndarray]], tuple[int, int]]:
    """(type, mask) for each usable polygon of one image, and the image's (height, width)."""
    record = yaml.safe_load(annotation_yaml.read_text())
    types = _type_masks(annotation_yaml.with_suffix(".png"))
    height, width = types["crop"].shape
    polygons: list[tuple[str, np.ndarray]] = []
    for item in record.get("annotation") or []:
        kind, points = item.get("type"), item.get("points") or {}
        xs, ys = points.get("x"), points.get("y")
        if kind not in TYPES:
            stats[f"dropped: unknown type {kind!r}"] += 1
            continue
        if not isinstance(xs, list) or not isinstance(ys, list) or len(xs) < 3 or len(xs) != len(ys):
            stats["dropped: fewer than 3 points"] += 1
            continue
        polygons.append((kind, _polygon_mask(xs, ys, height, width)))
    # Contested pixels go to the smallest polygon of that type.
    order = sorted(range(len(polygons)), key=lambda i: int(polygons[i][1].sum()))
    taken = {kind: np.zeros((height, width), dtype=bool) for kind in TYPES}
    masks: dict[int, np.ndarray] = {}
    for i in order:
        kind, poly = polygons[i]
        masks[i] = poly & types[kind] & ~taken[kind]
        taken[kind] |= masks[i]
    out: list[tuple[str, np.ndarray]] = []
    for i, (kind, _) in enumerate(polygons):
        if int(masks[i].sum()) < min_area:
            stats["dropped: mask under --min-area"] += 1
            continue
        out.append((kind, masks[i]))
    for kind in TYPES:
        stats[f"{kind} pixels outside every polygon"] += int((types[kind] & ~taken[kind]).sum())
    return out, (height, width)


def unlabelled_regions(source: Path, number: int) -> np.ndarray:
    """Connected vegetation regions (``masks/``) without a crop/weed label, numbered from 1 (0: none)."""
    from scipy import ndimage

    vegetation = np.asarray(Image.open(source / "masks" / f"{number:03d}_mask.png").convert("L")) < 128
    labelled = np.asarray(Image.open(source / "annotations" / f"{number:03d}_annotation.png")
                          .convert("RGB")).max(axis=-1) > 127
    regions, _ = ndimage.label(vegetation & ~labelled)
    return regions


def largest_region(regions: np.ndarray) -> int:
    """Pixels of the largest numbered region in ``regions`` (0 when there is none)."""
    counts = np.bincount(regions.ravel())[1:]
    return int(counts.max()) if counts.size else 0


def tile_bounds(length: int, tiles: int) -> list[tuple[int, int]]:
    """``tiles`` equal [start, stop) spans covering ``length``; the last one takes the remainder."""
    step = length // tiles
    edges = [i * step for i in range(tiles)] + [length]
    return list(zip(edges[:-1], edges[1:], strict=True))


def coco_annotation(ann_id: int, image_id: int, category_id: int, mask: np.ndarray) -> dict[str, Any]:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    ys, xs = np.nonzero(mask)
    x0, y0 = int(xs.min()), int(ys.min())
    return {"id": ann_id, "image_id": image_id, "category_id": category_id, "iscrowd": 0,
            "segmentation": {"size": [int(mask.shape[0]), int(mask.shape[1])],
                             "counts": rle["counts"].decode("ascii")},
            "area": int(mask.sum()),
            "bbox": [x0, y0, int(xs.max()) - x0 + 1, int(ys.max()) - y0 + 1]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", type=Path, required=True,
                        help="CWFID checkout holding images/ and annotations/")
    parser.add_argument("--out", type=Path, default=Path("data/real_check"))
    parser.add_argument("--val-fraction", type=float, default=0.2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--crop-phrase", default="carrot plant")
    parser.add_argument("--weed-phrase", default="weed")
    parser.add_argument("--min-area", type=int, default=20,
                        help="smallest mask kept, in pixels (whole image, and each piece inside a tile)")
    parser.add_argument("--tiles", type=int, default=2,
                        help="cut every image into an N x N grid of tiles, each its own COCO image (1: whole)")
    parser.add_argument("--unlabelled-min-area", type=int, default=0,
                        help="mark both categories not exhaustive on tiles with an unlabelled "
                             "vegetation region of at least this many pixels (LVIS style; 0: off)")
    parser.add_argument("--image-format", choices=("jpg", "png"), default="jpg",
                        help="jpg (quality --jpeg-quality, ~6x smaller) or the original PNG")
    parser.add_argument("--jpeg-quality", type=int, default=95)
    args = parser.parse_args(argv)
    if args.tiles < 1:
        parser.error(f"--tiles must be >= 1, got {args.tiles}")

    annotation_files = sorted((args.source / "annotations").glob("*_annotation.yaml"))
    if not annotation_files:
        parser.error(f"no annotations/*_annotation.yaml under {args.source}")
    numbers = [int(p.name.split("_")[0]) for p in annotation_files]
    shuffled = sorted(numbers)
    random.Random(args.seed).shuffle(shuffled)
    val_numbers = set(shuffled[:round(len(shuffled) * args.val_fraction)])

    categories = [{"id": 1, "name": args.crop_phrase}, {"id": 2, "name": args.weed_phrase}]
    category_of = {"crop": 1, "weed": 2}
    splits: dict[str, dict[str, list[Any]]] = {
        name: {"images": [], "annotations": [], "categories": categories} for name in ("train", "val")}
    image_dir = args.out / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    stats: Counter[str] = Counter()
    areas: dict[str, list[int]] = {"train": [], "val": []}
    tile_sizes: Counter[tuple[int, int]] = Counter()
    ann_id = 0
    for number, annotation_yaml in zip(numbers, annotation_files, strict=True):
        source_image = args.source / "images" / f"{number:03d}_image.png"
        instances, (height, width) = instances_of(annotation_yaml, args.min_area, stats)
        image = Image.open(source_image).convert("RGB")
        if image.size != (width, height):
            raise SystemExit(f"{source_image}: size {image.size} != label image {(width, height)}")
        split_name = "val" if number in val_numbers else "train"
        split = splits[split_name]
        stats[f"{split_name} source images"] += 1
        regions = unlabelled_regions(args.source, number) if args.unlabelled_min_area > 0 else None
        for r, (y0, y1) in enumerate(tile_bounds(height, args.tiles)):
            for c, (x0, x1) in enumerate(tile_bounds(width, args.tiles)):
                stem = f"cwfid_{number:03d}" if args.tiles == 1 else f"cwfid_{number:03d}_r{r}_c{c}"
                file_name = f"{stem}.{args.image_format}"
                tile = image.crop((x0, y0, x1, y1))
                if args.image_format == "jpg":
                    tile.save(image_dir / file_name, quality=args.jpeg_quality)
                else:
                    tile.save(image_dir / file_name)
                image_id = (number * args.tiles + r) * args.tiles + c
                tile_sizes[(x1 - x0, y1 - y0)] += 1
                pieces: list[tuple[str, np.ndarray]] = []
                for kind, mask in instances:
                    piece = mask[y0:y1, x0:x1]
                    area = int(piece.sum())
                    if area == 0:
                        continue
                    if area < args.min_area:
                        stats["dropped: piece inside a tile under --min-area"] += 1
                        continue
                    if area < int(mask.sum()):
                        stats["instances cut by a tile border (visible part kept)"] += 1
                    pieces.append((kind, np.ascontiguousarray(piece)))
                record: dict[str, Any] = {"id": image_id, "file_name": file_name,
                                          "height": y1 - y0, "width": x1 - x0}
                present = {category_of[kind] for kind, _ in pieces}
                if regions is not None:
                    if largest_region(regions[y0:y1, x0:x1]) >= args.unlabelled_min_area:
                        record["not_exhaustive_category_ids"] = sorted(category_of.values())
                        record["neg_category_ids"] = []
                        stats[f"{split_name} tiles with unlabelled vegetation (not exhaustive)"] += 1
                    else:
                        record["not_exhaustive_category_ids"] = []
                        record["neg_category_ids"] = sorted(set(category_of.values()) - present)
                split["images"].append(record)
                stats[f"{split_name} tiles"] += 1
                for kind in TYPES:
                    if category_of[kind] not in present:
                        stats[f"{split_name} tiles without {kind}"] += 1
                for kind, piece in pieces:
                    ann_id += 1
                    split["annotations"].append(coco_annotation(ann_id, image_id, category_of[kind], piece))
                    areas[split_name].append(int(piece.sum()))
                    stats[f"{split_name} {kind} instances"] += 1
    for name, coco in splits.items():
        (args.out / f"annotations_{name}.json").write_text(json.dumps(coco))
        print(f"{name}: {len(coco['images'])} images, {len(coco['annotations'])} instances "
              f"-> {args.out / f'annotations_{name}.json'}")
    for name, values in areas.items():
        if values:
            print(f"  {name} instance area in pixels: median {int(np.median(values))}, "
                  f"min {min(values)}, max {max(values)}")
    print("  tile sizes (width x height: count): "
          + ", ".join(f"{w}x{h}: {n}" for (w, h), n in sorted(tile_sizes.items())))
    for key in sorted(stats):
        print(f"  {key}: {stats[key]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
