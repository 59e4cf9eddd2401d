"""A procedural concept dataset: coloured shapes on cluttered backgrounds, asked for by noun phrase.

Each image holds a few objects. An object has a kind (circle, square, triangle, star, cross), a
colour, a size (small/large) and, optionally, a texture (plain/striped). Objects overlap, irregular
distractor blobs and lines sit among them, and the background is a noisy gradient with muted
clutter. Phrases name any subset of the attributes plus the kind: "circle", "red circle",
"small circle", "small red circle" (and "striped ..." with textures). Every query is exhaustive:
a phrase's instances are all the visible objects it describes, and negatives are phrases of
absent concepts, half of them hard (they share the kind or colour of an object in the image).

Splits: ``train`` and ``val`` never show the held-out colour-kind combinations (default "green
triangle" and "blue star") and never ask for them; ``heldout`` images each contain at least one
held-out object and always ask every held-out combination, so compositional generalisation
(a known colour on a known kind, never seen together) can be measured.

Masks are exact: each object is rasterised once, painted in drawing order, and its instance mask
is its own pixels minus those painted later. Objects are never painted with noise, and every
object in an image has its own RGB, so an instance's pixels are exactly the image pixels of its
colour. Placement is retried so that no object keeps less than ``MIN_VISIBLE_FRACTION`` of its
area; an object that cannot be placed is left out.

Command line (``python -m data_pipelines synthetic --out DIR``) writes ``DIR/train``,
``DIR/val`` and ``DIR/heldout`` shard sets; :func:`generate_synthetic` does the same from Python.
Both are deterministic in ``seed``: image ``i`` of a split depends only on (seed, split, i).
"""

from __future__ import annotations

import argparse
import itertools
import math
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from data_pipelines.schema import Query, Sample, encode_image, instance_from_mask

KINDS: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35), "green": (35, 175, 55), "blue": (40, 75, 215),
    "yellow": (230, 205, 30), "purple": (145, 45, 195),
}
SIZES: dict[str, tuple[float, float]] = {"small": (0.07, 0.10), "large": (0.15, 0.21)}
"""Object radius range per size, as a fraction of the image's shorter side."""
TEXTURES: tuple[str, ...] = ("plain", "striped")
DEFAULT_HELDOUT: tuple[str, ...] = ("green triangle", "blue star")
SPLITS: tuple[str, ...] = ("train", "val", "heldout")
MIN_VISIBLE_FRACTION = 0.5
PLACEMENT_TRIES = 20
COLOUR_JITTER = 18
BACKGROUND_NOISE = 6.0
ATTRIBUTE_ORDER = ("size", "texture", "colour")  # phrase word order before the kind


@dataclass(frozen=True)
class SyntheticConfig:
    """What the generator draws and asks.

    Attributes:
        height: image height in pixels.
        width: image width in pixels.
        kinds: object kinds (each must be one of :data:`KINDS`).
        colours: colour names (each a key of :data:`COLOURS`).
        sizes: size names (each a key of :data:`SIZES`).
        textures: add the plain/striped texture attribute (and its phrases).
        heldout: "colour kind" combinations kept out of train/val and always asked in heldout.
        objects: (min, max) concept objects per image.
        distractors: (min, max) distractor blobs/lines per image (not concepts).
        positives_per_image: positive phrases asked per image (at most; fewer if fewer exist).
        negatives_per_image: absent phrases asked per image.
        image_format: "png" (lossless) or "jpg".
    """

    height: int = 128
    width: int = 128
    kinds: tuple[str, ...] = KINDS
    colours: tuple[str, ...] = tuple(COLOURS)
    sizes: tuple[str, ...] = tuple(SIZES)
    textures: bool = False
    heldout: tuple[str, ...] = DEFAULT_HELDOUT
    objects: tuple[int, int] = (2, 5)
    distractors: tuple[int, int] = (1, 3)
    positives_per_image: int = 4
    negatives_per_image: int = 3
    image_format: str = "png"

    def __post_init__(self) -> None:
        check_appearance(self.kinds, self.colours, self.sizes)
        for combo in self.heldout:
            colour, _, kind = combo.partition(" ")
            if colour not in self.colours or kind not in self.kinds:
                raise ValueError(f"held-out combination {combo!r} must be 'COLOUR KIND' with a colour of "
                                 f"{self.colours} and a kind of {self.kinds}")
        if min(self.height, self.width) < 32:
            raise ValueError(f"images must be at least 32 px on each side, got {self.height}x{self.width}")
        if not 1 <= self.objects[0] <= self.objects[1]:
            raise ValueError(f"objects must be (min, max) with 1 <= min <= max, got {self.objects}")
        if not 0 <= self.distractors[0] <= self.distractors[1]:
            raise ValueError(f"distractors must be (min, max) with 0 <= min <= max, got {self.distractors}")
        if self.image_format not in ("png", "jpg"):
            raise ValueError(f"image_format must be 'png' or 'jpg', got {self.image_format!r}")

    @property
    def heldout_pairs(self) -> frozenset[tuple[str, str]]:
        """Held-out (colour, kind) pairs."""
        return frozenset(tuple(combo.split(" ", 1)) for combo in self.heldout)

    def axes(self) -> dict[str, tuple[str, ...]]:
        """Attribute name -> its values, in phrase word order."""
        # a single size is a property of every object, not something to ask for
        values = {"size": self.sizes if len(self.sizes) > 1 else (), "texture": TEXTURES if self.textures else (),
                  "colour": self.colours}
        return {name: values[name] for name in ATTRIBUTE_ORDER if values[name]}


@dataclass(frozen=True)
class Concept:
    """The attributes of one object (or the attributes a phrase asks for, ``None`` = any)."""

    kind: str
    colour: str | None = None
    size: str | None = None
    texture: str | None = None

    def phrase(self) -> str:
        words = [getattr(self, name) for name in ATTRIBUTE_ORDER]
        return " ".join([w for w in words if w is not None] + [self.kind])

    def matches(self, obj: Concept) -> bool:
        """True when ``obj`` has every attribute this (phrase) concept specifies."""
        return all(getattr(self, name) in (None, getattr(obj, name)) for name in ("kind", *ATTRIBUTE_ORDER))

    def names_pair(self, pairs: frozenset[tuple[str, str]]) -> bool:
        """True when this phrase names one of the (colour, kind) ``pairs``."""
        return (self.colour, self.kind) in pairs


def check_appearance(kinds: Sequence[str], colours: Sequence[str], sizes: Sequence[str]) -> None:
    """``ValueError`` naming any kind, colour or size this generator cannot draw."""
    unknown = ([k for k in kinds if k not in KINDS] + [c for c in colours if c not in COLOURS]
               + [s for s in sizes if s not in SIZES])
    if unknown:
        raise ValueError(f"unknown kinds/colours/sizes {unknown}; choose from {KINDS}, {tuple(COLOURS)}, "
                         f"{tuple(SIZES)}")


def _attribute_subsets(axes: Sequence[str]) -> Iterator[tuple[str, ...]]:
    """Every subset of the attribute names, in phrase word order: (), ("size",), ..."""
    return itertools.chain.from_iterable(itertools.combinations(axes, n) for n in range(len(axes) + 1))


def all_phrases(config: SyntheticConfig) -> list[Concept]:
    """Every phrase concept: the kind plus any subset of the other attributes."""
    axes = config.axes()
    phrases = []
    for kind in config.kinds:
        for subset in _attribute_subsets(tuple(axes)):
            for values in itertools.product(*(axes[name] for name in subset)):
                phrases.append(Concept(kind=kind, **dict(zip(subset, values, strict=True))))
    return phrases


def split_vocabulary(config: SyntheticConfig, split: str) -> list[Concept]:
    """Phrases a split may ask: all of them for heldout, none naming a held-out pair otherwise."""
    phrases = all_phrases(config)
    if split == "heldout":
        return phrases
    return [p for p in phrases if not p.names_pair(config.heldout_pairs)]


# ----------------------------------------------------------------------------------------------
# drawing
# ----------------------------------------------------------------------------------------------
@dataclass
class Drawable:
    """A rasterised shape in drawing order; ``concept`` is None for distractors."""

    mask: np.ndarray  # (H, W) bool, the shape's own pixels
    rgb: tuple[int, int, int]
    concept: Concept | None = None
    visible: np.ndarray | None = None  # own pixels not covered by later drawables (objects only)


@dataclass
class Scene:
    """One generated image with its objects (in drawing order) and its queries."""

    image: np.ndarray  # (H, W, 3) uint8
    objects: list[Drawable]
    queries: list[Query] = field(default_factory=list)


Points = list[tuple[float, float]]


def _polygon(cx: float, cy: float, radii: Sequence[float], angles: Sequence[float]) -> Points:
    return [(cx + r * math.cos(a), cy + r * math.sin(a)) for r, a in zip(radii, angles, strict=True)]


def _shape_points(kind: str, cx: float, cy: float, r: float, rng: np.random.Generator) -> Points:
    if kind == "square":
        theta = rng.uniform(-0.35, 0.35) + math.pi / 4
        return _polygon(cx, cy, [r * 1.15] * 4, [theta + k * math.pi / 2 for k in range(4)])
    if kind == "triangle":
        theta = rng.uniform(0, 2 * math.pi)
        return _polygon(cx, cy, [r * 1.2] * 3, [theta + k * 2 * math.pi / 3 for k in range(3)])
    if kind == "star":
        theta = rng.uniform(0, 2 * math.pi)
        return _polygon(cx, cy, [r * 1.15, r * 0.48] * 5, [theta + k * math.pi / 5 for k in range(10)])
    if kind == "cross":
        arm, half = r * 1.05, r * 0.36
        outline = [(half, arm), (half, half), (arm, half), (arm, -half), (half, -half), (half, -arm),
                   (-half, -arm), (-half, -half), (-arm, -half), (-arm, half), (-half, half), (-half, arm)]
        theta = rng.uniform(-0.35, 0.35)
        c, s = math.cos(theta), math.sin(theta)
        return [(cx + x * c - y * s, cy + x * s + y * c) for x, y in outline]
    if kind == "blob":  # distractor: an irregular polygon
        n = int(rng.integers(7, 12))
        angles = np.sort(rng.uniform(0, 2 * math.pi, n))
        return _polygon(cx, cy, rng.uniform(0.4, 1.0, n) * r, angles)
    raise ValueError(f"unknown shape kind {kind!r}")


def _rasterise(kind: str, cx: float, cy: float, r: float, hw: tuple[int, int],
               rng: np.random.Generator) -> np.ndarray:
    canvas = Image.new("L", (hw[1], hw[0]), 0)
    draw = ImageDraw.Draw(canvas)
    if kind == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=1)
    elif kind == "line":  # distractor
        theta = rng.uniform(0, math.pi)
        dx, dy = math.cos(theta) * r * 1.6, math.sin(theta) * r * 1.6
        draw.line([(cx - dx, cy - dy), (cx + dx, cy + dy)], fill=1, width=max(2, int(r * 0.15)))
    else:
        draw.polygon(_shape_points(kind, cx, cy, r, rng), fill=1)
    return np.asarray(canvas, dtype=bool)


def _object_rgb(colour: str, rng: np.random.Generator) -> tuple[int, int, int]:
    base = np.array(COLOURS[colour])
    return tuple(int(v) for v in np.clip(base + rng.integers(-COLOUR_JITTER, COLOUR_JITTER + 1, 3), 0, 255))


def _muted_rgb(rng: np.random.Generator) -> tuple[int, int, int]:
    grey = rng.uniform(70, 180)
    return tuple(int(v) for v in np.clip(grey + rng.uniform(-22, 22, 3), 0, 255))


def _background(hw: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    h, w = hw
    start, end = np.array(_muted_rgb(rng), float), np.array(_muted_rgb(rng), float)
    direction = rng.uniform(0, 2 * math.pi)
    ys, xs = np.mgrid[0:h, 0:w]
    t = (xs * math.cos(direction) + ys * math.sin(direction)) / max(h, w)
    t = (t - t.min()) / max(t.max() - t.min(), 1e-6)
    image = start + (end - start) * t[..., None]
    for _ in range(int(rng.integers(2, 6))):  # muted clutter under everything
        r = rng.uniform(0.05, 0.2) * min(h, w)
        kind = "line" if rng.random() < 0.5 else "blob"
        mask = _rasterise(kind, rng.uniform(0, w), rng.uniform(0, h), r, hw, rng)
        image[mask] = _muted_rgb(rng)
    image += rng.normal(0.0, BACKGROUND_NOISE, image.shape)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def _object_concepts(config: SyntheticConfig, split: str) -> list[Concept]:
    textures = TEXTURES if config.textures else (None,)
    concepts = [Concept(kind=k, colour=c, size=s, texture=t) for k, c, s, t
                in itertools.product(config.kinds, config.colours, config.sizes, textures)]
    if split == "heldout":
        return concepts
    return [c for c in concepts if not c.names_pair(config.heldout_pairs)]


def _place(scene: list[Drawable], kind: str, radius_range: tuple[float, float], hw: tuple[int, int],
           rng: np.random.Generator) -> np.ndarray | None:
    """A mask for a new shape that leaves every earlier object enough visible area, or None."""
    h, w = hw
    for _ in range(PLACEMENT_TRIES):
        r = rng.uniform(*radius_range) * min(h, w)
        margin = r * 1.2  # the largest shape reaches 1.2 r from its centre
        mask = _rasterise(kind, rng.uniform(margin, w - margin), rng.uniform(margin, h - margin), r, hw, rng)
        if not mask.any():
            continue
        if all(d.concept is None or (d.visible & ~mask).sum() >= MIN_VISIBLE_FRACTION * d.mask.sum()
               for d in scene):
            return mask
    return None


def _unique_rgb(rgb_fn, used: set[tuple[int, int, int]]) -> tuple[int, int, int]:
    rgb = rgb_fn()
    while rgb in used:
        rgb = rgb_fn()
    used.add(rgb)
    return rgb


def _heldout_object(config: SyntheticConfig, rng: np.random.Generator) -> Concept:
    if not config.heldout:
        raise ValueError("the heldout split needs a held-out combination (--heldout 'COLOUR KIND')")
    colour, kind = sorted(config.heldout_pairs)[int(rng.integers(len(config.heldout_pairs)))]
    size = config.sizes[int(rng.integers(len(config.sizes)))]
    texture = TEXTURES[int(rng.integers(2))] if config.textures else None
    return Concept(kind=kind, colour=colour, size=size, texture=texture)


def render_scene(config: SyntheticConfig, split: str, rng: np.random.Generator) -> Scene:
    """Draw one image: background, then objects and distractors in a random interleaved order."""
    hw = (config.height, config.width)
    image = _background(hw, rng)
    allowed = _object_concepts(config, split)
    n_objects = int(rng.integers(config.objects[0], config.objects[1] + 1))
    concepts = [allowed[int(rng.integers(len(allowed)))] for _ in range(n_objects)]
    n_distractors = int(rng.integers(config.distractors[0], config.distractors[1] + 1))
    order: list[Concept | None] = concepts + [None] * n_distractors
    order = [order[i] for i in rng.permutation(len(order))]
    if split == "heldout":  # one object is held out, drawn first: it always finds a place
        order.pop(next(i for i, c in enumerate(order) if c is not None))
        order.insert(0, _heldout_object(config, rng))
    drawn: list[Drawable] = []
    used_rgb: set[tuple[int, int, int]] = set()
    for concept in order:
        if concept is None:
            # palette-coloured lines and muted blobs: nothing that could pass for a concept shape
            kind = "line" if rng.random() < 0.5 else "blob"
            mask = _place(drawn, kind, (0.08, 0.2), hw, rng)
            colour = config.colours[int(rng.integers(len(config.colours)))]
            rgb_fn = partial(_object_rgb, colour, rng) if kind == "line" else partial(_muted_rgb, rng)
        else:
            mask = _place(drawn, concept.kind, SIZES[concept.size], hw, rng)
            rgb_fn = partial(_object_rgb, concept.colour, rng)
        if mask is None:
            continue
        for earlier in drawn:
            if earlier.visible is not None:
                earlier.visible &= ~mask
        drawable = Drawable(mask=mask, rgb=_unique_rgb(rgb_fn, used_rgb), concept=concept,
                            visible=mask.copy() if concept is not None else None)
        _paint(image, drawable)
        drawn.append(drawable)
    objects = [d for d in drawn if d.concept is not None and d.visible.any()]
    return Scene(image=image, objects=objects)


def _paint(image: np.ndarray, drawable: Drawable) -> None:
    image[drawable.mask] = drawable.rgb
    if drawable.concept is not None and drawable.concept.texture == "striped":
        h, w = drawable.mask.shape
        period = max(4, min(h, w) // 24)
        ys, xs = np.mgrid[0:h, 0:w]
        stripes = ((xs + ys) // period) % 2 == 1
        dark = tuple(int(v * 0.55) for v in drawable.rgb)
        image[drawable.mask & stripes] = dark


# ----------------------------------------------------------------------------------------------
# queries
# ----------------------------------------------------------------------------------------------
def _phrases_of(obj: Concept, axes: Sequence[str]) -> list[Concept]:
    return [Concept(kind=obj.kind, **{name: getattr(obj, name) for name in subset})
            for subset in _attribute_subsets(axes)]


def _choose(items: list[Concept], k: int, rng: np.random.Generator) -> list[Concept]:
    if k <= 0 or not items:
        return []
    return [items[i] for i in rng.choice(len(items), size=min(k, len(items)), replace=False)]


def ask_queries(scene: Scene, config: SyntheticConfig, split: str, rng: np.random.Generator) -> list[Query]:
    """Positive phrases of present objects and (hard) negatives of absent ones, all exhaustive."""
    vocabulary = split_vocabulary(config, split)
    allowed = set(vocabulary)
    concepts = [o.concept for o in scene.objects]
    present = sorted({p for c in concepts for p in _phrases_of(c, tuple(config.axes())) if p in allowed},
                     key=Concept.phrase)
    absent = [p for p in vocabulary if not any(p.matches(c) for c in concepts)]
    forced: list[Concept] = []
    if split == "heldout":  # always ask every held-out combination, present or not
        forced = [Concept(kind=kind, colour=colour) for colour, kind in sorted(config.heldout_pairs)]
    positives = [p for p in forced if p in present]
    positives += _choose([p for p in present if p not in forced], config.positives_per_image - len(positives),
                         rng)
    negatives = [p for p in forced if p not in present]
    hard = [p for p in absent if p not in negatives
            and any(p.kind == c.kind or (p.colour is not None and p.colour == c.colour) for c in concepts)]
    n_free = config.negatives_per_image - len(negatives)
    negatives += _choose(hard, (n_free + 1) // 2, rng)
    negatives += _choose([p for p in absent if p not in negatives],
                         config.negatives_per_image - len(negatives), rng)
    asked = positives + negatives
    asked = [asked[i] for i in rng.permutation(len(asked))]
    return [Query(phrase=p.phrase(), exhaustive=True,
                  instances=[instance_from_mask(o.visible) for o in scene.objects if p.matches(o.concept)])
            for p in asked]


def make_sample(config: SyntheticConfig, split: str, index: int, seed: int) -> Sample:
    """Image ``index`` of ``split``: a function of (seed, split, index) only."""
    rng = np.random.default_rng([seed, SPLITS.index(split), index])
    scene = render_scene(config, split, rng)
    queries = ask_queries(scene, config, split, rng)
    return Sample(key=f"synthetic-{split}-{index:07d}", image=encode_image(scene.image, config.image_format),
                  image_format=config.image_format, width=config.width, height=config.height,
                  queries=queries, image_id=index, source=f"synthetic:{split}")


def iter_samples(config: SyntheticConfig, split: str, count: int, seed: int,
                 start: int = 0) -> Iterator[Sample]:
    """Samples ``start .. count-1`` of a split (``start`` > 0 resumes an interrupted run)."""
    for index in range(start, count):
        yield make_sample(config, split, index, seed)


def manifest_extra(config: SyntheticConfig, split: str, seed: int) -> dict[str, Any]:
    """The generator settings recorded in each split's manifest ``extra``."""
    return {"generator": "data_pipelines.synthetic", "split": split, "seed": seed,
            "image_size": [config.height, config.width], "kinds": list(config.kinds),
            "colours": list(config.colours), "sizes": list(config.sizes),
            "textures": list(TEXTURES) if config.textures else [], "heldout_combos": list(config.heldout),
            "vocabulary": sorted(p.phrase() for p in split_vocabulary(config, split))}


# ----------------------------------------------------------------------------------------------
# entry points
# ----------------------------------------------------------------------------------------------
def _config_from(image_size: int | Sequence[int], **kwargs: Any) -> SyntheticConfig:
    size = [image_size] if isinstance(image_size, int) else list(image_size)
    if len(size) not in (1, 2):
        raise ValueError(f"image_size must be a side or (height, width), got {image_size!r}")
    return SyntheticConfig(height=size[0], width=size[-1], **kwargs)


def generate_synthetic(out_dir: str | Path, *, image_size: int | Sequence[int] = 128, num_train: int = 2000,
                       num_val: int = 200, num_heldout: int = 200, max_count: int = 250, seed: int = 0,
                       progress: bool = False, overwrite: bool = False,
                       **config: Any) -> dict[str, dict[str, Any]]:
    """Write ``out_dir/{train,val,heldout}`` shard sets and return each split's manifest.

    Args:
        out_dir: root directory; one shard set per split below it.
        image_size: image side, or (height, width).
        num_train: training images.
        num_val: validation images (same concepts as train).
        num_heldout: images with held-out colour-kind combinations.
        max_count: samples per shard at most.
        seed: everything generated is a function of the seed.
        progress: show progress bars.
        overwrite: replace existing shard sets instead of refusing.
        **config: further :class:`SyntheticConfig` fields (``textures``, ``heldout``, ``objects``...).
    """
    from data_pipelines.writer import ShardSink  # lazy: see add_arguments

    settings = _config_from(image_size, **config)
    counts = {"train": num_train, "val": num_val, "heldout": num_heldout}
    manifests = {}
    for split, count in counts.items():
        with ShardSink(Path(out_dir) / split, prefix=split, max_count=max_count, on_invalid="raise",
                       mode="overwrite" if overwrite else "new", progress=progress, total=count,
                       command=f"data_pipelines.synthetic.generate_synthetic(seed={seed})",
                       extra=manifest_extra(settings, split, seed)) as sink:
            for sample in iter_samples(settings, split, count, seed):
                sink.add(sample)
        manifests[split] = sink.written_manifest
    return manifests


class _ImageSize(argparse.Action):
    """``--image-size SIDE`` or ``--image-size HEIGHT WIDTH``."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        if len(values) > 2 or min(values) < 32:
            parser.error(f"{option_string} takes SIDE or HEIGHT WIDTH, each at least 32, got {values}")
        setattr(namespace, self.dest, values)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``python -m data_pipelines synthetic``."""
    # lazy, for import time: the writer imports webdataset and with it torch (~3 s); generating samples
    # (the demo, tests, the DataModule's tests) does not need it
    from data_pipelines.writer import add_sink_arguments

    add_sink_arguments(parser, default_prefix="{split}")
    parser.set_defaults(max_count=250)
    parser.add_argument("--image-size", type=int, nargs="+", default=[128], metavar="SIDE", action=_ImageSize,
                        help="image side, or HEIGHT WIDTH for non-square images (default 128)")
    parser.add_argument("--num-train", type=int, default=2000, help="training images")
    parser.add_argument("--num-val", type=int, default=200, help="validation images")
    parser.add_argument("--num-heldout", type=int, default=200, help="images with held-out combinations")
    parser.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS, help="object kinds")
    parser.add_argument("--colours", nargs="+", default=list(COLOURS), choices=tuple(COLOURS), help="colours")
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=tuple(SIZES),
                        help="sizes (one size: phrases do not name it)")
    parser.add_argument("--objects", type=int, nargs=2, default=[2, 5], metavar=("MIN", "MAX"),
                        help="concept objects per image")
    parser.add_argument("--distractors", type=int, nargs=2, default=[1, 3], metavar=("MIN", "MAX"),
                        help="distractor blobs/lines per image")
    parser.add_argument("--positives", type=int, default=4, help="positive phrases asked per image (at most)")
    parser.add_argument("--negatives", type=int, default=3, help="absent phrases asked per image")
    parser.add_argument("--textures", action="store_true", help="add the plain/striped texture attribute")
    parser.add_argument("--heldout", nargs="*", default=list(DEFAULT_HELDOUT), metavar="'COLOUR KIND'",
                        help="colour-kind combinations seen only in the heldout split")
    parser.add_argument("--format", choices=("png", "jpg"), default="png", help="image encoding")
    parser.add_argument("--seed", type=int, default=0, help="everything generated is a function of the seed")


def run(args: argparse.Namespace) -> int:
    """Generate the three splits below ``--out`` (shards ``{split}-000000.tar``); returns the exit code."""
    from data_pipelines.writer import sink_from_args  # lazy: see add_arguments

    try:
        config = _config_from(args.image_size, kinds=tuple(args.kinds), colours=tuple(args.colours),
                              sizes=tuple(args.sizes), textures=args.textures, heldout=tuple(args.heldout),
                              objects=tuple(args.objects), distractors=tuple(args.distractors),
                              positives_per_image=args.positives, negatives_per_image=args.negatives,
                              image_format=args.format)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.num_heldout > 0 and not config.heldout:
        print("error: --num-heldout needs at least one --heldout 'COLOUR KIND' combination", file=sys.stderr)
        return 2
    counts = {"train": args.num_train, "val": args.num_val, "heldout": args.num_heldout}
    for split, count in counts.items():
        split_args = argparse.Namespace(**{**vars(args), "prefix": args.prefix.format(split=split)})
        with sink_from_args(split_args, out_dir=Path(args.out) / split, total=count,
                            extra=manifest_extra(config, split, args.seed),
                            command=getattr(args, "command_line", None)) as sink:
            if not sink.already_complete:
                for sample in iter_samples(config, split, count, args.seed, start=sink.start_index):
                    sink.add(sample)
        print(sink.summary())
    return 0

