"""Moving-shapes clips: the synthetic concepts of :mod:`data_pipelines.synthetic`, in motion.

Each clip draws 3-6 objects (by default the image demo's concepts: circles, squares, triangles and
stars in red, green, blue and yellow, large, without the held-out combinations) and a few muted
distractors over the same noisy gradient background, with light fresh noise per frame. Every shape
moves in a straight line at constant speed (with up to ``jitter`` px of random wobble) from a point
outside the frame to a point outside another side, so objects ENTER, LEAVE, CROSS and OCCLUDE each
other; in each clip one object enters after the first frame and leaves before the last. Clips whose
index is a multiple of ``crossing_every`` add two objects of the same phrase that cross in the middle
of the frame, one partly in front of the other: the identity test.

Masks are exact, as in images: a fixed drawing order gives the occlusion, an object's mask is its
own pixels minus those painted later, its pixels are exactly its (unique) colour, and a frame where
none of it is visible has ``null``. Phrases asked per clip: the "colour kind" phrase of every object
visible in it, plus 1-2 absent ones (exhaustive negatives).

``sambridge data synthetic-video --out DIR`` writes ``DIR/shards`` (clip shards and manifest),
``DIR/frames/<clip>/00000.png ...`` (for ``sambridge track``) and ``DIR/ground_truth.json``
(YouTube-VIS). Clip ``i`` depends only on (seed, i).
"""

from __future__ import annotations

import argparse
import shutil
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from data_pipelines.atomic import write_json_atomic
from data_pipelines.schema import encode_image
from data_pipelines.synthetic import (
    COLOURS,
    DEFAULT_HELDOUT,
    KINDS,
    SIZES,
    _background,
    _muted_rgb,
    _object_rgb,
    _rasterise,
    _unique_rgb,
    check_appearance,
)
from data_pipelines.video import Clip, ClipSink, Masklet, clips_to_ytvis, write_frames

DEMO_KINDS = ("circle", "square", "triangle", "star")
DEMO_COLOURS = ("red", "green", "blue", "yellow")
FRAME_NOISE = 3.0
MIN_INSIDE_FRAMES = 8
"""Frames each object spends wholly inside the frame (so it is seen whole at least this long); a sixth
of the clip at most."""
TRAJECTORY_TRIES = 50


@dataclass(frozen=True)
class VideoConfig:
    """What the clip generator draws.

    Attributes:
        height: frame height in pixels.
        width: frame width in pixels.
        frames: frames per clip.
        fps: frame rate recorded in each clip.
        kinds: object kinds (of :data:`data_pipelines.synthetic.KINDS`).
        colours: colour names (keys of :data:`data_pipelines.synthetic.COLOURS`).
        sizes: size names (keys of :data:`data_pipelines.synthetic.SIZES`).
        heldout: "colour kind" combinations never drawn (the demo model never saw them).
        objects: (min, max) objects per clip, the crossing pair included.
        distractors: (min, max) moving muted blobs per clip (not concepts).
        negatives: (min, max) absent phrases asked per clip.
        crossing_every: clips whose index is a multiple of this get a crossing same-phrase pair (0: none).
        jitter: largest random offset from the straight path, in pixels.
        image_format: "png" (lossless) or "jpg".
    """

    height: int = 128
    width: int = 128
    frames: int = 48
    fps: float = 10.0
    kinds: tuple[str, ...] = DEMO_KINDS
    colours: tuple[str, ...] = DEMO_COLOURS
    sizes: tuple[str, ...] = ("large",)
    heldout: tuple[str, ...] = DEFAULT_HELDOUT
    objects: tuple[int, int] = (3, 6)
    distractors: tuple[int, int] = (0, 2)
    negatives: tuple[int, int] = (1, 2)
    crossing_every: int = 2
    jitter: float = 0.5
    image_format: str = "png"

    def __post_init__(self) -> None:
        check_appearance(self.kinds, self.colours, self.sizes)
        if not self.concepts():
            raise ValueError("every colour-kind combination is held out: nothing to draw")
        if min(self.height, self.width) < 32:
            raise ValueError(f"frames must be at least 32 px on each side, got {self.height}x{self.width}")
        if self.frames < 16:
            raise ValueError(f"clips need at least 16 frames, got {self.frames}")
        if not 1 <= self.objects[0] <= self.objects[1]:
            raise ValueError(f"objects must be (min, max) with 1 <= min <= max, got {self.objects}")
        for name in ("distractors", "negatives"):
            low, high = getattr(self, name)
            if not 0 <= low <= high:
                raise ValueError(f"{name} must be (min, max) with 0 <= min <= max, got {(low, high)}")
        if self.crossing_every < 0 or self.jitter < 0 or self.fps <= 0:
            raise ValueError("crossing_every and jitter must be >= 0 and fps > 0")
        if self.image_format not in ("png", "jpg"):
            raise ValueError(f"image_format must be 'png' or 'jpg', got {self.image_format!r}")

    def concepts(self) -> list[tuple[str, str]]:
        """The (colour, kind) pairs objects may have."""
        held = {tuple(combo.split(" ", 1)) for combo in self.heldout}
        return [(c, k) for k in self.kinds for c in self.colours if (c, k) not in held]


@dataclass
class Mover:
    """A shape moving along ``start -> end`` between ``t_start`` and ``t_end`` (extrapolated beyond)."""

    kind: str
    radius: float
    rgb: tuple[int, int, int]
    start: np.ndarray
    end: np.ndarray
    t_start: float
    t_end: float
    wobble: np.ndarray  # (T, 2) offsets from the straight path
    shape_seed: int  # the same rotation in every frame
    phrase: str | None = None  # None for distractors

    def centre(self, t: int) -> np.ndarray:
        s = (t - self.t_start) / (self.t_end - self.t_start)
        return self.start + s * (self.end - self.start) + self.wobble[t]

    def mask(self, t: int, hw: tuple[int, int]) -> np.ndarray:
        cx, cy = self.centre(t)
        return _rasterise(self.kind, cx, cy, self.radius, hw, np.random.default_rng(self.shape_seed))


def _border_point(side: int, along: float, hw: tuple[int, int], reach: float) -> np.ndarray:
    """A point ``reach`` px outside side 0-3 (left, top, right, bottom) at ``along`` (0-1) of its length."""
    h, w = hw
    return np.array([(-reach, along * h), (along * w, -reach), (w + reach, along * h), (along * w, h + reach)][side])


def _inside_frames(mover: Mover, frames: int, hw: tuple[int, int]) -> int:
    margin = mover.radius * 1.25
    centres = np.array([mover.centre(t) for t in range(frames)])
    inside = ((centres[:, 0] >= margin) & (centres[:, 0] <= hw[1] - margin)
              & (centres[:, 1] >= margin) & (centres[:, 1] <= hw[0] - margin))
    return int(inside.sum())


def _mover(config: VideoConfig, rng: np.random.Generator, phrase: str | None, kind: str,
           rgb: tuple[int, int, int], *, enters: bool = False, leaves: bool = False) -> Mover:
    """A straight path across the frame whose timing keeps the shape wholly inside for a while."""
    hw, frames = (config.height, config.width), config.frames
    size = config.sizes[int(rng.integers(len(config.sizes)))] if phrase else "large"
    radius = rng.uniform(*SIZES[size]) * min(hw) * (1.0 if phrase else 0.7)
    wobble = rng.uniform(-config.jitter, config.jitter, (frames, 2))
    for _ in range(TRAJECTORY_TRIES):
        side = int(rng.integers(4))
        other = (side + int(rng.integers(1, 4))) % 4  # another side: the path crosses the frame
        start = _border_point(side, rng.uniform(0.2, 0.8), hw, radius * 1.3 + config.jitter)
        end = _border_point(other, rng.uniform(0.2, 0.8), hw, radius * 1.3 + config.jitter)
        # an object that enters and leaves crosses within the clip; others may start or end outside it
        duration = rng.uniform(0.75, 0.95) * (frames - 3) if enters and leaves else rng.uniform(0.6, 1.5) * frames
        low = 1.0 if enters else -0.7 * frames
        high = frames - 2.0 - duration if leaves else 0.6 * frames
        if high < low:
            continue
        t_start = rng.uniform(low, high)
        mover = Mover(kind=kind, radius=radius, rgb=rgb, start=start, end=end, t_start=t_start,
                      t_end=t_start + duration, wobble=wobble, shape_seed=int(rng.integers(2**31)), phrase=phrase)
        if _inside_frames(mover, frames, hw) >= min(MIN_INSIDE_FRAMES, frames // 6):
            return mover
    raise RuntimeError("no trajectory found: the clip is too short for its frame size")


def _crossing_pair(config: VideoConfig, rng: np.random.Generator, colour: str, kind: str,
                   used: set[tuple[int, int, int]]) -> list[Mover]:
    """Two same-phrase objects on opposite horizontal paths that meet in the middle of the clip."""
    h, w = config.height, config.width
    frames, phrase = config.frames, f"{colour} {kind}"
    radius = [rng.uniform(*SIZES[config.sizes[int(rng.integers(len(config.sizes)))]]) * min(h, w)
              for _ in range(2)]
    middle = rng.uniform(0.4, 0.6) * h
    gap = rng.uniform(0.5, 0.9) * max(radius)  # vertical offset: the one behind stays partly visible
    duration = rng.uniform(0.8, 1.1) * frames
    t_start = (frames - 1) / 2 - duration / 2
    pair = []
    for index, (r, sign) in enumerate(zip(radius, (-1, 1), strict=True)):
        y = middle + sign * gap / 2
        start, end = np.array([-r * 1.3, y]), np.array([w + r * 1.3, y])
        if index:
            start, end = end, start
        pair.append(Mover(kind=kind, radius=r, rgb=_unique_rgb(lambda: _object_rgb(colour, rng), used),
                          start=start, end=end, t_start=t_start, t_end=t_start + duration,
                          wobble=rng.uniform(-config.jitter, config.jitter, (frames, 2)),
                          shape_seed=int(rng.integers(2**31)), phrase=phrase))
    return pair


def make_clip(config: VideoConfig, index: int, seed: int) -> Clip:
    """Clip ``index``: a function of (config, seed, index) only; key ``clip-{index:06d}``."""
    rng = np.random.default_rng([seed, index])
    hw, frames = (config.height, config.width), config.frames
    concepts = config.concepts()
    n_objects = int(rng.integers(config.objects[0], config.objects[1] + 1))
    used: set[tuple[int, int, int]] = set()
    objects: list[Mover] = []
    if config.crossing_every and index % config.crossing_every == 0 and n_objects >= 2:
        colour, kind = concepts[int(rng.integers(len(concepts)))]
        objects += _crossing_pair(config, rng, colour, kind, used)
    while len(objects) < n_objects:
        colour, kind = concepts[int(rng.integers(len(concepts)))]
        rgb = _unique_rgb(lambda c=colour: _object_rgb(c, rng), used)
        first = len(objects) == 0 or (len(objects) == 2 and objects[0].phrase == objects[1].phrase)
        objects.append(_mover(config, rng, f"{colour} {kind}", kind, rgb, enters=first, leaves=first))
    n_distractors = int(rng.integers(config.distractors[0], config.distractors[1] + 1))
    distractors = [_mover(config, rng, None, "blob", _unique_rgb(lambda: _muted_rgb(rng), used))
                   for _ in range(n_distractors)]
    order = objects + distractors
    order = [order[i] for i in rng.permutation(len(order))]  # the depth order, fixed for the clip

    background = _background(hw, rng).astype(np.float64)
    images, visible = [], {id(m): [] for m in objects}
    for t in range(frames):
        image = np.clip(np.rint(background + rng.normal(0.0, FRAME_NOISE, background.shape)), 0, 255)
        image = image.astype(np.uint8)
        masks: dict[int, np.ndarray] = {}
        for mover in order:
            mask = mover.mask(t, hw)
            for earlier in masks.values():
                earlier &= ~mask
            image[mask] = mover.rgb
            if mover.phrase is not None:
                masks[id(mover)] = mask.copy()  # its visible part: later shapes cut it
        for mover in objects:
            visible[id(mover)].append(masks[id(mover)])
        images.append(encode_image(image, config.image_format))

    masklets = []
    for mover in objects:
        masklet = Masklet.from_masks(len(masklets) + 1, [mover.phrase], visible[id(mover)])
        if masklet.visible_frames:
            masklets.append(masklet)
    positives = sorted({m.phrases[0] for m in masklets})
    absent = sorted({f"{c} {k}" for c, k in concepts} - set(positives))
    n_negatives = min(len(absent), int(rng.integers(config.negatives[0], config.negatives[1] + 1)))
    negatives = [absent[i] for i in sorted(rng.choice(len(absent), n_negatives, replace=False))]
    return Clip(key=f"clip-{index:06d}", frames=images, width=config.width, height=config.height,
                phrases=positives + negatives, masklets=masklets, fps=config.fps, clip_id=index,
                source="synthetic-video")


def iter_synthetic_clips(config: VideoConfig, count: int, seed: int) -> Iterator[Clip]:
    """Clips ``0 .. count-1``."""
    for index in range(count):
        yield make_clip(config, index, seed)


# ----------------------------------------------------------------------------------------------
# entry points
# ----------------------------------------------------------------------------------------------
def generate_clips(out_dir: str | Path, config: VideoConfig | None = None, *, clips: int = 8, seed: int = 0,
                   max_count: int = 100, overwrite: bool = False, progress: bool = False,
                   command: str | None = None) -> dict[str, Any]:
    """Write ``out_dir/shards``, ``out_dir/frames/<clip>/`` and ``out_dir/ground_truth.json``.

    Returns the shard manifest. Refuses an ``out_dir`` that holds any of the three unless
    ``overwrite`` (which deletes them first).
    """
    config = config or VideoConfig()
    out_dir = Path(out_dir)
    frames_dir, truth = out_dir / "frames", out_dir / "ground_truth.json"
    if overwrite:
        shutil.rmtree(frames_dir, ignore_errors=True)
        truth.unlink(missing_ok=True)
    elif frames_dir.exists() or truth.exists():
        raise FileExistsError(f"{out_dir} already holds frames or ground_truth.json: pass --overwrite to replace")
    written = []
    extra = {"generator": "data_pipelines.synthetic_video", "seed": seed,
             "config": {k: list(v) if isinstance(v, tuple) else v for k, v in vars(config).items()}}
    with ClipSink(out_dir / "shards", prefix="clips", max_count=max_count, on_invalid="raise",
                  mode="overwrite" if overwrite else "new", progress=progress, total=clips,
                  command=command or f"data_pipelines.synthetic_video.generate_clips(seed={seed})",
                  extra=extra) as sink:
        for clip in iter_synthetic_clips(config, clips, seed):
            sink.add(clip)
            write_frames(clip, frames_dir)
            written.append(clip)
    write_json_atomic(truth, clips_to_ytvis(written))
    return sink.written_manifest


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``sambridge data synthetic-video``."""
    parser.add_argument("--out", required=True, help="output folder: shards/, frames/<clip>/, ground_truth.json")
    parser.add_argument("--clips", type=int, default=8, help="number of clips")
    parser.add_argument("--frames", type=int, default=48, help="frames per clip")
    parser.add_argument("--seed", type=int, default=0, help="everything generated is a function of the seed")
    parser.add_argument("--image-size", type=int, nargs=2, default=[128, 128], metavar=("HEIGHT", "WIDTH"),
                        help="frame size (default 128 128, the image demo's)")
    parser.add_argument("--fps", type=float, default=10.0, help="frame rate recorded in the clips")
    parser.add_argument("--objects", type=int, nargs=2, default=[3, 6], metavar=("MIN", "MAX"),
                        help="objects per clip")
    parser.add_argument("--distractors", type=int, nargs=2, default=[0, 2], metavar=("MIN", "MAX"),
                        help="moving muted blobs per clip")
    parser.add_argument("--kinds", nargs="+", default=list(DEMO_KINDS), choices=KINDS, help="object kinds")
    parser.add_argument("--colours", nargs="+", default=list(DEMO_COLOURS), choices=tuple(COLOURS),
                        help="colours")
    parser.add_argument("--sizes", nargs="+", default=["large"], choices=tuple(SIZES), help="sizes")
    parser.add_argument("--heldout", nargs="*", default=list(DEFAULT_HELDOUT), metavar="'COLOUR KIND'",
                        help="colour-kind combinations never drawn (default: the image demo's held-out ones)")
    parser.add_argument("--crossing-every", type=int, default=2,
                        help="clips whose index is a multiple of N get two same-phrase objects crossing (0: none)")
    parser.add_argument("--format", choices=("png", "jpg"), default="png", help="frame encoding")
    parser.add_argument("--max-count", type=int, default=100, help="clips per shard at most")
    parser.add_argument("--overwrite", action="store_true", help="replace what --out holds")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    """Generate the clips; returns the exit code."""
    try:
        config = VideoConfig(height=args.image_size[0], width=args.image_size[1], frames=args.frames, fps=args.fps,
                             kinds=tuple(args.kinds), colours=tuple(args.colours), sizes=tuple(args.sizes),
                             heldout=tuple(args.heldout), objects=tuple(args.objects),
                             distractors=tuple(args.distractors), crossing_every=args.crossing_every,
                             image_format=args.format)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.clips < 1:
        print(f"error: --clips must be at least 1, got {args.clips}", file=sys.stderr)
        return 2
    manifest = generate_clips(args.out, config, clips=args.clips, seed=args.seed, max_count=args.max_count,
                              overwrite=args.overwrite, progress=not args.no_progress,
                              command=getattr(args, "command_line", None))
    out = Path(args.out)
    print(f"{out / 'shards'}: {manifest['num_samples']} clips of {config.frames} frames in "
          f"{manifest['num_shards']} shard(s); frames in {out / 'frames'}, ground truth in "
          f"{out / 'ground_truth.json'}")
    return 0
