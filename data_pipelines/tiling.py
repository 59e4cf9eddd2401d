"""Large field images in tiles: random training crops, and tiled prediction merged back.

Field images are 4000 x 3000 pixels or more while models see about 1024: shrinking a whole image
turns a 40-pixel apple into 10 pixels. Both tools here work at the original resolution, on COCO RLE
masks (a full-resolution bool mask is 12 MB; its RLE a few hundred bytes).

Training (:func:`random_training_crop`): cut a window out of an image and its queries. An instance
cut by the window keeps its visible part when at least ``min_visible_fraction`` of its pixels are
inside (flagged ``truncated``); otherwise it is removed, and if its visible part is not a mere
sliver (``min_visible_pixels``) its query becomes non-exhaustive: the phrase is visible in the crop
without every instance of it annotated, so the crop must not teach "nothing else is there". A query
whose instances all lie outside the window stays exhaustive and becomes a negative of the crop.

Prediction (:func:`predict_tiled`): run a model-agnostic ``predict_tile(tile, phrases)`` on
overlapping tiles, paste each tile's masks into image coordinates (:func:`paste_detection`) and
merge them (:func:`merge_pieces`). An object cut by a tile border is seen partly by two or more
tiles; where two tiles overlap both see the same part of it, so two pieces from different tiles
whose masks agree inside the tiles' shared area (mask IoU restricted to that area >=
``merge_iou``) are one object and their masks are united, transitively. Duplicates left over (a
model answering twice in one tile) are removed by mask-IoU NMS. The overlap should exceed the
typical object size, so that every object lies whole inside at least one tile as well.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import combinations
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils
from tqdm.auto import tqdm

from data_pipelines.convert.common import instance_from_crop
from data_pipelines.schema import Instance, Query, checked_rle, compressed_rle_runs


@dataclass(frozen=True)
class Window:
    """Rows ``top:top + height`` and columns ``left:left + width`` of an image."""

    top: int
    left: int
    height: int
    width: int

    @property
    def bottom(self) -> int:
        return self.top + self.height

    @property
    def right(self) -> int:
        return self.left + self.width

    @property
    def slices(self) -> tuple[slice, slice]:
        """``image[window.slices]`` is the window's part of an (H, W, ...) array."""
        return slice(self.top, self.bottom), slice(self.left, self.right)

    @classmethod
    def from_bbox(cls, bbox: Sequence[float]) -> Window:
        """The pixels of a mask's COCO box ``[x, y, w, h]`` (integer for masks)."""
        x, y, w, h = (int(round(v)) for v in bbox)
        return cls(y, x, h, w)

    def intersection(self, other: Window) -> Window | None:
        """The shared rectangle, or None when the windows do not overlap."""
        top, left = max(self.top, other.top), max(self.left, other.left)
        bottom, right = min(self.bottom, other.bottom), min(self.right, other.right)
        return Window(top, left, bottom - top, right - left) if bottom > top and right > left else None

    def contains(self, other: Window) -> bool:
        return (self.top <= other.top and self.left <= other.left and other.bottom <= self.bottom
                and other.right <= self.right)


# ----------------------------------------------------------------------------------------------
# RLE windows
# ----------------------------------------------------------------------------------------------
def decode_rle_window(rle: dict[str, Any], window: Window) -> np.ndarray:
    """The (window.height, window.width) bool part of an RLE mask, without decoding the whole mask.

    COCO RLE runs go down columns, so the window's columns are one contiguous range of the runs;
    only that range is materialised (cost: window width x image height).
    """
    height = int(rle["size"][0])
    runs = compressed_rle_runs(checked_rle(rle)["counts"])
    ends = np.cumsum(runs)
    starts = ends - runs
    low, high = window.left * height, window.right * height
    first = np.clip(starts[1::2], low, high) - low  # odd runs are foreground
    last = np.clip(ends[1::2], low, high) - low
    inside = first < last
    edges = np.zeros(high - low + 1, np.int32)
    np.add.at(edges, first[inside], 1)
    np.add.at(edges, last[inside], -1)
    columns = np.cumsum(edges[:-1]).astype(bool).reshape(window.width, height)
    return columns[:, window.top:window.bottom].T


def _rle_bytes(instance: Instance) -> dict[str, Any]:
    """An instance's RLE in the form pycocotools' functions take (``counts`` as bytes)."""
    return {"size": instance.rle["size"], "counts": instance.rle["counts"].encode("ascii")}


def _instance_of(rle: dict[str, Any]) -> Instance:
    counts = rle["counts"].decode("ascii") if isinstance(rle["counts"], bytes) else rle["counts"]
    return Instance(rle={"size": [int(s) for s in rle["size"]], "counts": counts},
                    bbox=[float(v) for v in mask_utils.toBbox(rle)])


# ----------------------------------------------------------------------------------------------
# training crops
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CropConfig:
    """How training crops are cut out of large images.

    Attributes:
        size: (height, width) of a crop; an image dimension smaller than that is kept whole.
        min_visible_fraction: an instance cut by the crop stays (its visible part, flagged
            truncated) when at least this fraction of its pixels is inside the crop.
        min_visible_pixels: a removed instance with fewer visible pixels is a sliver that changes
            nothing; with more, its query becomes non-exhaustive.
        focus_prob: probability of placing the crop around a random instance instead of uniformly
            (sparse weeds, or a few fruit on a large image, then still appear in most crops).
    """

    size: tuple[int, int] = (1024, 1024)
    min_visible_fraction: float = 0.5
    min_visible_pixels: int = 16
    focus_prob: float = 0.5

    def __post_init__(self) -> None:
        if len(self.size) != 2 or min(self.size) < 1 or not 0 < self.min_visible_fraction <= 1 \
                or self.min_visible_pixels < 0 or not 0 <= self.focus_prob <= 1:
            raise ValueError(f"invalid crop settings: {self} (need size (h, w) >= 1, "
                             "0 < min_visible_fraction <= 1, min_visible_pixels >= 0, 0 <= focus_prob <= 1)")


@dataclass
class TrainingCrop:
    """A crop and its queries, masks in crop coordinates.

    Attributes:
        image: the crop of the image (a view of the input array).
        window: where the crop lies in the image.
        queries: the queries with the instances visible in the crop.
        truncated: per query, per kept instance: the crop cuts it (its mask is the visible part).
        removed: instances cut by the crop and removed because too little of them is visible.
    """

    image: np.ndarray
    window: Window
    queries: list[Query]
    truncated: list[list[bool]]
    removed: int


def choose_crop_window(height: int, width: int, size: tuple[int, int], rng: np.random.Generator,
                       around: Window | None = None) -> Window:
    """A random ``size`` window inside the image; around ``around``'s centre when given."""
    crop_h, crop_w = min(size[0], height), min(size[1], width)

    def start(extent: int, crop: int, centre: float | None) -> int:
        low, high = 0, extent - crop
        if centre is not None:  # the window must contain the centre pixel
            low, high = max(low, int(centre) - crop + 1), min(high, int(centre))
        return int(rng.integers(low, high + 1))

    centre_y = None if around is None else around.top + around.height / 2
    centre_x = None if around is None else around.left + around.width / 2
    return Window(start(height, crop_h, centre_y), start(width, crop_w, centre_x), crop_h, crop_w)


def crop_queries(queries: Sequence[Query], window: Window, image_hw: tuple[int, int],
                 min_visible_fraction: float = 0.5,
                 min_visible_pixels: int = 16) -> tuple[list[Query], list[list[bool]], int]:
    """Queries of the image -> queries of the crop ``window`` (see the module docstring).

    Returns:
        The crop's queries (RLEs of the window's size), per query and kept instance whether the
        crop cuts it, and how many instances were removed for too little visibility.
    """
    height, width = image_hw
    out, truncated, removed = [], [], 0
    for query in queries:
        kept, flags, incomplete = [], [], False
        for instance in query.instances:
            if [int(s) for s in instance.rle["size"]] != [height, width]:
                raise ValueError(f"instance of {query.phrase!r} has RLE size {instance.rle['size']}, "
                                 f"the image is {height}x{width}")
            rle = checked_rle(instance.rle)
            box = Window.from_bbox(mask_utils.toBbox(rle))
            part = window.intersection(box)
            if part is None:
                continue
            piece = decode_rle_window(rle, part)
            visible = int(piece.sum())
            if visible == 0:
                continue
            whole = window.contains(box) or visible == int(mask_utils.area(rle))
            if whole or visible >= min_visible_fraction * int(mask_utils.area(rle)):
                kept.append(instance_from_crop(piece, part.top - window.top, part.left - window.left,
                                               window.height, window.width))
                flags.append(not whole)
            else:
                removed += 1
                incomplete |= visible >= min_visible_pixels
        out.append(Query(query.phrase, kept, exhaustive=query.exhaustive and not incomplete))
        truncated.append(flags)
    return out, truncated, removed


def random_training_crop(image: np.ndarray, queries: Sequence[Query], config: CropConfig,
                         rng: np.random.Generator) -> TrainingCrop:
    """A random crop of ``image`` (H, W[, C]) and its queries' instances (COCO RLE at H x W).

    With probability ``config.focus_prob`` the crop is placed around a random instance's centre.
    """
    height, width = image.shape[:2]
    boxes = [inst.bbox for q in queries for inst in q.instances]
    around = None
    if boxes and rng.random() < config.focus_prob:
        around = Window.from_bbox(boxes[int(rng.integers(len(boxes)))])
    window = choose_crop_window(height, width, config.size, rng, around)
    cropped, truncated, removed = crop_queries(queries, window, (height, width), config.min_visible_fraction,
                                               config.min_visible_pixels)
    return TrainingCrop(image=image[window.slices], window=window, queries=cropped, truncated=truncated,
                        removed=removed)


# ----------------------------------------------------------------------------------------------
# tiled prediction
# ----------------------------------------------------------------------------------------------
# predict_tile(tile (h, w, C) array, phrases) -> per phrase, detections (mask (h, w), score[, box])
TilePredictor = Callable[[np.ndarray, Sequence[str]], Sequence[Sequence[Sequence[Any]]]]


@dataclass(frozen=True)
class TilingConfig:
    """Tiles of a large image and how their detections are merged.

    Attributes:
        tile_size: side of the square tiles (the last row/column of tiles is aligned to the border).
        overlap: pixels shared by neighbouring tiles; more than the typical object size.
        merge_iou: pieces from two tiles are one object when their masks' IoU inside the tiles'
            shared area reaches this.
        nms_iou: after merging, of two objects whose masks' IoU exceeds this, the lower-scored one
            is removed (None: no NMS).
    """

    tile_size: int = 1024
    overlap: int = 256
    merge_iou: float = 0.5
    nms_iou: float | None = 0.5

    def __post_init__(self) -> None:
        if self.tile_size < 1 or not 0 <= self.overlap < self.tile_size or not 0 < self.merge_iou <= 1 \
                or (self.nms_iou is not None and not 0 < self.nms_iou <= 1):
            raise ValueError(f"invalid tiling settings: {self} (need tile_size >= 1, "
                             "0 <= overlap < tile_size, "
                             "0 < merge_iou <= 1, 0 < nms_iou <= 1 or None)")


@dataclass(frozen=True)
class Piece:
    """One tile's detection in image coordinates.

    Attributes:
        tile: the tile it was found in.
        instance: its mask as COCO RLE at image size, and its box ``[x, y, w, h]``.
        score: the predictor's score.
    """

    tile: Window
    instance: Instance
    score: float


@dataclass
class Prediction:
    """One object of a phrase on the whole image.

    Attributes:
        rle: COCO RLE at image size (``counts`` as str); ``schema.decode_rle`` decodes it.
        bbox: tight box ``[x, y, w, h]`` of the mask.
        score: the highest score of its pieces.
        pieces: how many tile detections were merged into it.
    """

    rle: dict[str, Any]
    bbox: list[float]
    score: float
    pieces: int


def tile_windows(height: int, width: int, tile_size: int, overlap: int) -> list[Window]:
    """Row-major tiles of ``tile_size`` covering the image, neighbours sharing at least ``overlap`` pixels.

    The last tile of a row or column is aligned to the image border (it may overlap more); an
    image side shorter than a tile gets one tile of that side's length.
    """
    if not 0 <= overlap < tile_size:
        raise ValueError(f"need 0 <= overlap < tile_size, got overlap={overlap}, tile_size={tile_size}")

    def starts(extent: int) -> list[int]:
        if extent <= tile_size:
            return [0]
        return list(range(0, extent - tile_size, tile_size - overlap)) + [extent - tile_size]

    return [Window(top, left, min(tile_size, height), min(tile_size, width))
            for top in starts(height) for left in starts(width)]


def paste_detection(tile: Window, mask: Any, score: float, image_hw: tuple[int, int]) -> Piece | None:
    """A tile-sized mask (bool; float masks are thresholded at 0.5) -> a :class:`Piece`, None if empty.

    The RLE is built from the mask's box alone (``instance_from_crop``): cheap at 12 megapixels.
    """
    mask = np.asarray(mask)
    if mask.shape != (tile.height, tile.width):
        raise ValueError(f"predict_tile returned a mask of shape {mask.shape} for the tile at (top, left) = "
                         f"({tile.top}, {tile.left}) of size {tile.height}x{tile.width}")
    foreground = mask > 0.5 if np.issubdtype(mask.dtype, np.floating) else mask.astype(bool)
    rows, cols = np.flatnonzero(foreground.any(1)), np.flatnonzero(foreground.any(0))
    if rows.size == 0:
        return None
    crop = foreground[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
    instance = instance_from_crop(crop, tile.top + int(rows[0]), tile.left + int(cols[0]), *image_hw)
    return Piece(tile=tile, instance=instance, score=float(score))


def merge_pieces(pieces: Sequence[Piece], image_hw: tuple[int, int], merge_iou: float = 0.5,
                 nms_iou: float | None = 0.5) -> list[Prediction]:
    """Detections of one phrase from all tiles -> objects of the whole image, highest score first.

    Pieces from different tiles whose masks agree inside the tiles' shared area (IoU restricted to
    it >= ``merge_iou``) are united, transitively; then mask-IoU NMS at ``nms_iou``.
    """
    rles = [_rle_bytes(p.instance) for p in pieces]
    group = list(range(len(pieces)))

    def root(i: int) -> int:
        while group[i] != i:
            group[i] = group[group[i]]
            i = group[i]
        return i

    by_tile: dict[Window, list[int]] = defaultdict(list)
    for i, piece in enumerate(pieces):
        by_tile[piece.tile].append(i)
    for tile_a, tile_b in combinations(by_tile, 2):
        shared = tile_a.intersection(tile_b)
        if shared is None:
            continue
        area = _rle_bytes(instance_from_crop(np.ones((shared.height, shared.width), bool), shared.top,
                                             shared.left, *image_hw))
        sides = []
        for tile in (tile_a, tile_b):
            members = [i for i in by_tile[tile]
                       if shared.intersection(Window.from_bbox(pieces[i].instance.bbox))]
            sides.append((members, [mask_utils.merge([rles[i], area], intersect=True) for i in members]))
        (members_a, restricted_a), (members_b, restricted_b) = sides
        if not members_a or not members_b:
            continue
        ious = np.asarray(mask_utils.iou(restricted_a, restricted_b, [0] * len(restricted_b)))
        for a, b in np.argwhere(ious >= merge_iou):
            group[root(members_a[a])] = root(members_b[b])

    groups: dict[int, list[int]] = defaultdict(list)
    for i in range(len(pieces)):
        groups[root(i)].append(i)
    merged = [(rles[m[0]] if len(m) == 1 else mask_utils.merge([rles[i] for i in m], intersect=False),
               max(pieces[i].score for i in m), len(m)) for m in groups.values()]
    merged.sort(key=lambda item: -item[1])
    if nms_iou is not None and len(merged) > 1:
        ious = np.asarray(mask_utils.iou([m[0] for m in merged], [m[0] for m in merged], [0] * len(merged)))
        suppressed = np.zeros(len(merged), bool)
        keep = []
        for i in range(len(merged)):
            if not suppressed[i]:
                keep.append(i)
                suppressed |= ious[i] > nms_iou
        merged = [merged[i] for i in keep]
    out = []
    for rle, score, count in merged:
        instance = _instance_of(rle)
        out.append(Prediction(rle=instance.rle, bbox=instance.bbox, score=score, pieces=count))
    return out


def predict_tiled(image: np.ndarray, phrases: Sequence[str], predict_tile: TilePredictor,
                  config: TilingConfig | None = None, progress: bool = False) -> dict[str, list[Prediction]]:
    """Segment ``phrases`` on a large image tile by tile; full-resolution objects per phrase.

    Args:
        image: (H, W[, C]) array; each tile is passed as a contiguous copy of its part.
        phrases: the noun phrases to segment (unique).
        predict_tile: ``predict_tile(tile, phrases)`` returns, per phrase in order, the tile's
            detections as ``(mask, score)`` or ``(mask, score, box)``: ``mask`` a numpy array (or CPU
            tensor) of the tile's size, bool or probabilities; boxes are not used (each object's box
            is recomputed from its merged mask).
        config: tile size, overlap and merge/NMS thresholds.
        progress: show a progress bar over the tiles.

    Returns:
        phrase -> objects, highest score first.
    """
    config = config or TilingConfig()
    if len(set(phrases)) != len(phrases):
        raise ValueError(f"phrases must be unique, got {list(phrases)}")
    image_hw = image.shape[:2]
    pieces: dict[str, list[Piece]] = {phrase: [] for phrase in phrases}
    windows = tile_windows(*image_hw, config.tile_size, config.overlap)
    for window in tqdm(windows, desc="tiles", disable=not progress):
        outputs = predict_tile(np.ascontiguousarray(image[window.slices]), list(phrases))
        if len(outputs) != len(phrases):
            raise ValueError(f"predict_tile returned {len(outputs)} detection lists for {len(phrases)} "
                             "phrases "
                             f"(tile at (top, left) = ({window.top}, {window.left}))")
        for phrase, detections in zip(phrases, outputs, strict=True):
            for detection in detections:
                piece = paste_detection(window, detection[0], detection[1], image_hw)
                if piece is not None:
                    pieces[phrase].append(piece)
    return {phrase: merge_pieces(pieces[phrase], image_hw, config.merge_iou, config.nms_iou)
            for phrase in phrases}
