"""Orchard-like field images: foliage, many small red, green and yellow fruit, leaves in front of some.

Stand-ins for orchard photographs in end-to-end runs of the agriculture recipes (``docs/agriculture.md``)
and in tests: a foliage texture with branches as background, fruit in clusters ("ripe apple" red,
"unripe apple" green, "lemon" yellow and slightly elongated; the phrases are concepts of
``configs/agriculture/vocab/fruit.txt``), shaded from a highlight, overlapping each other, and
leaves painted over some of them.

Masks are exact: every fruit and leaf is rasterised once and the topmost one owns each pixel, so a
fruit's instance mask is its own pixels minus those of fruit and leaves drawn later. A fruit or leaf
is placed only where it leaves every earlier fruit at least ``MIN_VISIBLE_FRACTION`` of its pixels
(retried, else left out). Colours come from disjoint ranges (:data:`FRUITS`, foliage, leaves and
branches), so a pixel's colour alone tells which kind of fruit, if any, it belongs to.

Command line::

    python -m data_pipelines orchard --out DIR --num N --image-size H W            # unlabelled image folder
    python -m data_pipelines orchard --out DIR --num N --image-size H W --shards   # labelled shard set

Images are ``PREFIX-000000.png`` ...; a shard sample asks every fruit phrase of the configuration
(exhaustive; absent fruit kinds are negatives). Deterministic: image ``i`` depends only on
(``seed``, ``i``) and the settings.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw
from tqdm.auto import tqdm

from data_pipelines.atomic import atomic_write
from data_pipelines.convert.common import instance_from_crop
from data_pipelines.schema import Query, Sample, encode_image
from data_pipelines.writer import add_sink_arguments, sink_from_args

RGB = tuple[int, int, int]


@dataclass(frozen=True)
class ColourRange:
    """Per-channel inclusive ``low``..``high`` range of an object's colours."""

    low: RGB
    high: RGB


@dataclass(frozen=True)
class FruitLook:
    """How one kind of fruit is drawn.

    Attributes:
        colours: the range every pixel of the fruit lies in (shading included).
        aspect: (min, max) ratio of the long to the short radius.
    """

    colours: ColourRange
    aspect: tuple[float, float] = (1.0, 1.1)


FRUITS: dict[str, FruitLook] = {
    "ripe apple": FruitLook(ColourRange((170, 20, 20), (235, 70, 60))),
    "unripe apple": FruitLook(ColourRange((120, 185, 30), (170, 230, 80))),
    "lemon": FruitLook(ColourRange((210, 190, 20), (250, 235, 70)), aspect=(1.2, 1.4)),
}
"""Fruit phrases and looks; their colour ranges are disjoint from each other and from the background's."""
FOLIAGE = ColourRange((20, 50, 10), (90, 140, 60))
LEAF = ColourRange((30, 90, 20), (100, 150, 60))
BRANCH = ColourRange((85, 60, 40), (110, 80, 60))
MIN_VISIBLE_FRACTION = 0.5
PLACEMENT_TRIES = 20
CLUSTER_SIZE = 4  # fruit per cluster on average
FOLIAGE_SCALES = (4, 12, 32)  # pixels per noise cell of the foliage texture's octaves


@dataclass(frozen=True)
class OrchardConfig:
    """What the generator draws.

    Attributes:
        height: image height in pixels.
        width: image width in pixels.
        fruits: fruit phrases to draw (keys of :data:`FRUITS`); every shard sample asks all of them.
        fruit_count: (min, max) fruit per image (fewer when they cannot be placed visibly).
        fruit_radius: (min, max) fruit radius in pixels.
        leaf_count: (min, max) leaves drawn in front of the fruit.
        branch_count: (min, max) branches in the background.
        image_format: ``png`` (lossless) or ``jpg``.
    """

    height: int = 128
    width: int = 128
    fruits: tuple[str, ...] = tuple(FRUITS)
    fruit_count: tuple[int, int] = (3, 8)
    fruit_radius: tuple[float, float] = (5.0, 9.0)
    leaf_count: tuple[int, int] = (2, 6)
    branch_count: tuple[int, int] = (0, 2)
    image_format: str = "png"

    def __post_init__(self) -> None:
        unknown = [f for f in self.fruits if f not in FRUITS]
        ranges = (self.fruit_count, self.fruit_radius, self.leaf_count, self.branch_count)
        if unknown or not self.fruits or len(set(self.fruits)) != len(self.fruits):
            raise ValueError(f"fruits must be distinct phrases of {list(FRUITS)}, got {list(self.fruits)}")
        if min(self.height, self.width) < 16 or any(not 0 <= low <= high for low, high in ranges) \
                or self.fruit_radius[0] < 1 or self.image_format not in ("png", "jpg"):
            raise ValueError(f"invalid orchard settings: {self} (need sides >= 16, 0 <= min <= max for the "
                             "counts, fruit radius >= 1 pixel, image_format png or jpg)")


@dataclass
class OrchardScene:
    """A rendered image and its objects.

    Attributes:
        image: (H, W, 3) uint8.
        owner: (H, W) int32: index of the object drawn on top at each pixel, -1 for background.
        kinds: per object in drawing order, its fruit phrase or ``None`` for a leaf.
        boxes: per object, (top, left, height, width) of the box it was drawn in.
    """

    image: np.ndarray
    owner: np.ndarray
    kinds: list[str | None] = field(default_factory=list)
    boxes: list[tuple[int, int, int, int]] = field(default_factory=list)

    def fruit_masks(self, phrase: str) -> Iterator[tuple[int, int, np.ndarray]]:
        """(top, left, bool mask of its visible pixels inside its box) of every fruit of ``phrase``."""
        for index, (kind, (top, left, h, w)) in enumerate(zip(self.kinds, self.boxes, strict=True)):
            if kind == phrase:
                yield top, left, self.owner[top:top + h, left:left + w] == index


@dataclass(frozen=True)
class _Shape:
    """One object's pixels: a bool mask of its box placed at (top, left), and its colour per pixel."""

    top: int
    left: int
    mask: np.ndarray
    colours: np.ndarray  # (h, w, 3) uint8, used where mask


# ----------------------------------------------------------------------------------------------
# drawing
# ----------------------------------------------------------------------------------------------
def _shade(colours: ColourRange, t: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Colours of a shaded object: ``t`` in [0, 1] blends a dark and a light colour inside the range."""
    low, high = np.array(colours.low, np.float32), np.array(colours.high, np.float32)
    dark = rng.uniform(low, (low + high) / 2)
    light = rng.uniform((low + high) / 2, high)
    rgb = dark + (light - dark) * np.clip(t, 0, 1)[..., None]
    return np.clip(np.rint(rgb), low, high).astype(np.uint8)


def _box(cy: float, cx: float, reach: float, hw: tuple[int, int]) -> tuple[int, int, np.ndarray, np.ndarray]:
    """Top, left and pixel-centre coordinates (relative to the centre) of the clipped box around a point."""
    top, left = max(0, int(np.floor(cy - reach))), max(0, int(np.floor(cx - reach)))
    bottom, right = min(hw[0], int(np.ceil(cy + reach)) + 1), min(hw[1], int(np.ceil(cx + reach)) + 1)
    ys, xs = np.mgrid[top:bottom, left:right].astype(np.float32)
    return top, left, ys + 0.5 - cy, xs + 0.5 - cx


def _fruit(look: FruitLook, cy: float, cx: float, radius: float, hw: tuple[int, int],
           rng: np.random.Generator) -> _Shape | None:
    """An ellipse lit from the upper left; None when it has no pixel inside the image."""
    long_radius = radius * rng.uniform(*look.aspect)
    angle = rng.uniform(0, np.pi)
    top, left, dy, dx = _box(cy, cx, long_radius, hw)
    u = dx * np.cos(angle) + dy * np.sin(angle)
    v = -dx * np.sin(angle) + dy * np.cos(angle)
    mask = (u / long_radius) ** 2 + (v / radius) ** 2 <= 1.0
    if not mask.any():
        return None
    highlight = np.hypot(dy + 0.35 * radius, dx + 0.35 * radius) / (1.6 * radius)
    return _Shape(top, left, mask, _shade(look.colours, 1.0 - highlight, rng))


def _leaf(cy: float, cx: float, length: float, width: float, hw: tuple[int, int],
          rng: np.random.Generator) -> _Shape | None:
    """A lens-shaped leaf (two intersecting discs) with a lighter midrib; None when outside the image."""
    half_length, half_width = length / 2, width / 2
    radius = (half_length ** 2 / half_width + half_width) / 2
    offset = radius - half_width
    angle = rng.uniform(0, np.pi)
    top, left, dy, dx = _box(cy, cx, half_length, hw)
    u = dx * np.cos(angle) + dy * np.sin(angle)
    v = -dx * np.sin(angle) + dy * np.cos(angle)
    mask = (u ** 2 + (v - offset) ** 2 <= radius ** 2) & (u ** 2 + (v + offset) ** 2 <= radius ** 2)
    if not mask.any():
        return None
    t = 0.6 * (1 - np.abs(v) / half_width) + 0.4 * (u / length + 0.5)
    t = np.where(np.abs(v) < 0.75, 1.0, t)  # midrib
    return _Shape(top, left, mask, _shade(LEAF, t, rng))


def _noise(hw: tuple[int, int], cell: int, rng: np.random.Generator) -> np.ndarray:
    """Smooth noise in [0, 1]: a random grid with ``cell`` pixels per cell, bilinearly upsampled."""
    grid = rng.random((hw[0] // cell + 2, hw[1] // cell + 2)).astype(np.float32)
    size = (grid.shape[1] * cell, grid.shape[0] * cell)
    return np.asarray(Image.fromarray(grid, mode="F").resize(size, Image.BILINEAR))[:hw[0], :hw[1]]


def _background(config: OrchardConfig, rng: np.random.Generator) -> np.ndarray:
    """Foliage texture (octaves of smooth noise mapped onto dark-to-light greens) with branches."""
    hw = (config.height, config.width)
    texture = sum(weight * _noise(hw, cell, rng) for weight, cell in zip((0.5, 0.3, 0.2), FOLIAGE_SCALES,
                                                                           strict=True))
    texture = texture + rng.normal(0, 0.04, hw).astype(np.float32)
    texture = (texture - texture.min()) / max(float(np.ptp(texture)), 1e-6)
    low, high = np.array(FOLIAGE.low, np.float32), np.array(FOLIAGE.high, np.float32)
    image = np.clip(np.rint(low + (high - low) * texture[..., None]), low, high).astype(np.uint8)
    canvas = Image.fromarray(image)
    draw = ImageDraw.Draw(canvas)
    thickness = max(2, round(np.mean(config.fruit_radius) * 0.8))
    for _ in range(int(rng.integers(config.branch_count[0], config.branch_count[1] + 1))):
        y0, y1 = rng.uniform(0, config.height, 2)
        colour = tuple(int(c) for c in rng.integers(BRANCH.low, np.array(BRANCH.high) + 1))
        draw.line([(0, float(y0)), (config.width, float(y1))], fill=colour, width=thickness)
    return np.asarray(canvas).copy()


class _Canvas:
    """Objects in drawing order and which one is on top at each pixel."""

    def __init__(self, hw: tuple[int, int]) -> None:
        self.owner = np.full(hw, -1, np.int32)
        self.shapes: list[_Shape] = []
        self.kinds: list[str | None] = []
        self.area: list[int] = []
        self.visible: list[int] = []

    def place(self, shape: _Shape | None, kind: str | None) -> bool:
        """Draw ``shape`` on top unless it would hide too much of an earlier fruit."""
        if shape is None:
            return False
        h, w = shape.mask.shape
        region = self.owner[shape.top:shape.top + h, shape.left:shape.left + w]
        covered = region[shape.mask]
        hidden, counts = np.unique(covered[covered >= 0], return_counts=True)
        for index, count in zip(hidden.tolist(), counts.tolist(), strict=True):
            if self.kinds[index] is not None and \
                    self.visible[index] - count < MIN_VISIBLE_FRACTION * self.area[index]:
                return False
        for index, count in zip(hidden.tolist(), counts.tolist(), strict=True):
            self.visible[index] -= count
        region[shape.mask] = len(self.shapes)
        self.shapes.append(shape)
        self.kinds.append(kind)
        self.area.append(int(shape.mask.sum()))
        self.visible.append(self.area[-1])
        return True

    def paint(self, image: np.ndarray) -> None:
        """Paint every object's visible pixels onto ``image``."""
        for index, shape in enumerate(self.shapes):
            h, w = shape.mask.shape
            region = image[shape.top:shape.top + h, shape.left:shape.left + w]
            mine = self.owner[shape.top:shape.top + h, shape.left:shape.left + w] == index
            region[mine] = shape.colours[mine]


def render_orchard(config: OrchardConfig, rng: np.random.Generator) -> OrchardScene:
    """One image: background, clusters of one kind of fruit each, then leaves in front."""
    hw = (config.height, config.width)
    image = _background(config, rng)
    canvas = _Canvas(hw)
    count = int(rng.integers(config.fruit_count[0], config.fruit_count[1] + 1))
    clusters = rng.uniform((0, 0), hw, (max(1, round(count / CLUSTER_SIZE)), 2))
    cluster_fruit = rng.integers(len(config.fruits), size=len(clusters))  # one kind of fruit per cluster
    mean_radius = float(np.mean(config.fruit_radius))
    for _ in range(count):
        cluster = int(rng.integers(len(clusters)))
        phrase = config.fruits[int(cluster_fruit[cluster])]
        radius = rng.uniform(*config.fruit_radius)
        for _ in range(PLACEMENT_TRIES):
            cy, cx = np.clip(clusters[cluster] + rng.normal(0, 2.5 * mean_radius, 2), 0, np.array(hw) - 1)
            if canvas.place(_fruit(FRUITS[phrase], cy, cx, radius, hw, rng), phrase):
                break
    for _ in range(int(rng.integers(config.leaf_count[0], config.leaf_count[1] + 1))):
        length = mean_radius * rng.uniform(3.0, 5.0)
        width = length * rng.uniform(0.35, 0.5)
        for _ in range(PLACEMENT_TRIES):
            cy, cx = rng.uniform((0, 0), hw)
            if canvas.place(_leaf(cy, cx, length, width, hw, rng), None):
                break
    canvas.paint(image)
    return OrchardScene(image=image, owner=canvas.owner, kinds=canvas.kinds,
                        boxes=[(s.top, s.left, *s.mask.shape) for s in canvas.shapes])


def _rng(seed: int, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, index])


def orchard_image(config: OrchardConfig, index: int, seed: int = 0) -> np.ndarray:
    """Image ``index`` (H, W, 3) uint8: a function of (config, seed, index) only."""
    return render_orchard(config, _rng(seed, index)).image


def orchard_sample(config: OrchardConfig, index: int, seed: int = 0) -> Sample:
    """Image ``index`` with one exhaustive query per fruit phrase and exact instance masks."""
    scene = render_orchard(config, _rng(seed, index))
    hw = (config.height, config.width)
    queries = [Query(phrase, [instance_from_crop(mask, top, left, *hw)
                              for top, left, mask in scene.fruit_masks(phrase)], exhaustive=True)
               for phrase in config.fruits]
    return Sample(key=f"orchard-s{seed}-{index:07d}", image=encode_image(scene.image, config.image_format),
                  image_format=config.image_format, width=config.width, height=config.height, queries=queries,
                  image_id=index, source=f"orchard:seed{seed}")


def manifest_extra(config: OrchardConfig, seed: int) -> dict[str, Any]:
    """The generator settings recorded in the shard manifest's ``extra``."""
    return {"generator": "data_pipelines.orchard", "seed": seed, "image_size": [config.height, config.width],
            "fruits": list(config.fruits), "fruit_count": list(config.fruit_count),
            "fruit_radius": list(config.fruit_radius), "leaf_count": list(config.leaf_count),
            "vocabulary": list(config.fruits)}


def write_images(out_dir: str | os.PathLike, config: OrchardConfig, num: int, seed: int = 0,
                 prefix: str = "orchard", overwrite: bool = False, progress: bool = True) -> list[Path]:
    """Write ``num`` unlabelled images ``out_dir/PREFIX-000000.EXT`` (atomically; existing files are
    refused unless ``overwrite``) and return their paths."""
    out = Path(out_dir)
    paths = [out / f"{prefix}-{i:06d}.{config.image_format}" for i in range(num)]
    existing = [p for p in paths if p.exists()]
    if existing and not overwrite:
        raise FileExistsError(f"{existing[0]} exists ({len(existing)} of the {num} images): "
                              "pass --overwrite to replace them")
    out.mkdir(parents=True, exist_ok=True)
    for index, path in enumerate(tqdm(paths, desc="orchard images", disable=not progress)):
        atomic_write(path, encode_image(orchard_image(config, index, seed), config.image_format))
    return paths


# ----------------------------------------------------------------------------------------------
# command line
# ----------------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``python -m data_pipelines orchard``."""
    add_sink_arguments(parser, default_prefix="orchard")
    parser.add_argument("--num", type=int, required=True, help="images to generate")
    parser.add_argument("--image-size", type=int, nargs="+", default=[128], metavar="SIDE",
                        help="image side, or HEIGHT WIDTH (default 128)")
    parser.add_argument("--shards", action="store_true",
                        help="write a labelled shard set (exact instance masks) instead of an unlabelled image folder")
    parser.add_argument("--fruits", nargs="+", default=list(FRUITS), choices=tuple(FRUITS),
                        help="fruit phrases to draw (and ask, with --shards)")
    parser.add_argument("--fruit-count", type=int, nargs=2, default=list(OrchardConfig.fruit_count),
                        metavar=("MIN", "MAX"), help="fruit per image")
    parser.add_argument("--fruit-radius", type=float, nargs=2, default=list(OrchardConfig.fruit_radius),
                        metavar=("MIN", "MAX"), help="fruit radius in pixels")
    parser.add_argument("--leaf-count", type=int, nargs=2, default=list(OrchardConfig.leaf_count),
                        metavar=("MIN", "MAX"), help="leaves in front of the fruit per image")
    parser.add_argument("--format", choices=("png", "jpg"), default="png", help="image encoding")
    parser.add_argument("--seed", type=int, default=0, help="everything generated is a function of the seed")


def run(args: argparse.Namespace) -> int:
    """Generate the images or shards; returns the exit code."""
    if len(args.image_size) not in (1, 2) or args.num < 0:
        print(f"error: --image-size takes SIDE or HEIGHT WIDTH and --num must be >= 0, got "
              f"{args.image_size} and {args.num}", file=sys.stderr)
        return 2
    try:
        config = OrchardConfig(height=args.image_size[0], width=args.image_size[-1], fruits=tuple(args.fruits),
                               fruit_count=tuple(args.fruit_count), fruit_radius=tuple(args.fruit_radius),
                               leaf_count=tuple(args.leaf_count), image_format=args.format)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if not args.shards:
        paths = write_images(args.out, config, args.num, args.seed, args.prefix, args.overwrite,
                             progress=not args.no_progress)
        print(f"{args.out}: {len(paths)} unlabelled image(s) of {config.height}x{config.width}")
        return 0
    with sink_from_args(args, total=args.num, extra=manifest_extra(config, args.seed),
                        command=getattr(args, "command_line", None)) as sink:
        if not sink.already_complete:
            for index in range(sink.start_index, args.num):
                sink.add(orchard_sample(config, index, args.seed))
    print(sink.summary())
    return 0
