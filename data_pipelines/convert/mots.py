"""MOTS-style sequences (KITTI-MOTS, MOTSChallenge) -> clip shards (one clip per sequence or chunk).

Each sequence is a folder under ``--root`` with its frames in ``img1/`` (numbered files:
``000001.jpg``) and its masks either as

* ``instances/<frame stem>.png``: a map whose pixel value is ``class_id * 1000 + instance_id``
  (8- or 16-bit, 0 = background), or
* a MOTS txt file (``gt/gt.txt`` by default): lines ``frame id class_id height width rle``, where
  ``frame`` is the number in the frame's file name, ``id`` is ``class_id * 1000 + instance_id`` and
  ``rle`` a COCO compressed RLE string.

``--classes 1=car,2=pedestrian`` names the classes: each object (``id``) is a masklet whose phrase
is its class name. MOTS annotates every object of its classes, so every class of ``--classes`` is
asked in every clip, a negative where it has no object. Class 10 (id 10000, the ignore regions) and
classes not in ``--classes`` are left out and counted. ``--clip-length N`` cuts long sequences into
clips of N frames (the last may be shorter).
"""

from __future__ import annotations

import argparse
import re
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image

from data_pipelines.convert.common import (
    Converter,
    DropAnnotation,
    InputError,
    SkipItem,
    instance_from_segmentation,
    read_image,
    sample_key,
    write_shards,
)
from data_pipelines.schema import encode_mask, normalize_phrase
from data_pipelines.video import Clip, Masklet
from data_pipelines.writer import add_sink_arguments

FRAME_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
IGNORE_CLASS = 10
ID_FACTOR = 1000
MaskSource = Literal["auto", "png", "txt"]


def parse_classes(text: str) -> dict[int, str]:
    """``"1=car,2=pedestrian"`` -> ``{1: "car", 2: "pedestrian"}``; raises :class:`InputError`."""
    classes: dict[int, str] = {}
    for part in text.split(","):
        value, _, name = part.partition("=")
        phrase = normalize_phrase(name)
        if not value.strip().isdigit() or not phrase:
            raise InputError(f"--classes: {part.strip()!r} is not CLASS_ID=phrase (e.g. 1=car,2=pedestrian)")
        classes[int(value)] = phrase
    if len(set(classes.values())) != len(classes):
        raise InputError(f"--classes: two classes share a phrase in {text!r}")
    return classes


def _frame_number(path: Path) -> int:
    if not re.fullmatch(r"\d+", path.stem):
        raise InputError(f"frame file {path} is not named by its number (000001.jpg)")
    return int(path.stem)


class MotsConverter(Converter):
    """MOTS sequences as clips.

    Args:
        root: folder of sequence folders (each with ``img1/``).
        classes: class id -> phrase.
        masks: ``png`` (``instances/``), ``txt`` (``txt_name``) or ``auto`` (per sequence, PNGs if present).
        txt_name: the txt file's path inside a sequence folder.
        clip_length: frames per clip (0: whole sequences).
        source: dataset label stored in each clip (default ``mots:<root folder name>``).
        fps: frame rate to record.
    """

    def __init__(self, root: str | Path, classes: dict[int, str], *, masks: MaskSource = "auto",
                 txt_name: str = "gt/gt.txt", clip_length: int = 0, source: str | None = None,
                 fps: float | None = None) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise InputError(f"sequence root {self.root} does not exist")
        if clip_length < 0:
            raise InputError(f"--clip-length must be >= 0, got {clip_length}")
        self.classes, self.fps = classes, fps
        self.source = source or f"mots:{self.root.resolve().name}"
        self.sequences = sorted(p for p in self.root.iterdir() if (p / "img1").is_dir())
        if not self.sequences:
            raise InputError(f"{self.root} holds no sequence folder with an img1/ frame folder")
        self.frames: dict[str, list[Path]] = {}
        self.mode: dict[str, str] = {}
        self.lines: dict[str, dict[int, list[tuple[int, int, int, int, str]]]] = {}
        self.unmatched: Counter = Counter()
        self.clips: list[tuple[str, int, int]] = []  # (sequence, first frame index, frame count)
        for seq in self.sequences:
            files = sorted((p for p in (seq / "img1").iterdir() if p.suffix.lower() in FRAME_SUFFIXES),
                           key=_frame_number)
            self.frames[seq.name] = files
            pngs, txt = (seq / "instances").is_dir(), seq / txt_name
            mode = masks if masks != "auto" else "png" if pngs else "txt"
            if mode == "png" and not pngs:
                raise InputError(f"{seq}: no instances/ folder of PNG maps")
            if mode == "txt":
                if not txt.is_file():
                    raise InputError(f"{seq}: neither an instances/ folder nor a MOTS txt file {txt_name}")
                self.lines[seq.name] = self._read_txt(txt, {_frame_number(p) for p in files})
            self.mode[seq.name] = mode
            step = clip_length or max(len(files), 1)
            self.clips += [(seq.name, start, min(step, len(files) - start)) for start in range(0, len(files), step)]

    def _read_txt(self, path: Path, frames: set[int]) -> dict[int, list[tuple[int, int, int, int, str]]]:
        """Per frame number, its lines as (id, class, height, width, rle)."""
        by_frame: dict[int, list[tuple[int, int, int, int, str]]] = defaultdict(list)
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                fields = line.split(maxsplit=5)
                if len(fields) != 6 or not all(re.fullmatch(r"-?\d+", v) for v in fields[:5]):
                    raise InputError(f"{path}: line {number}: expected 'frame id class_id height width rle', "
                                     f"got {line.strip()[:60]!r}")
                frame, object_id, class_id, height, width = (int(v) for v in fields[:5])
                if frame not in frames:
                    self.unmatched["on a frame without an image"] += 1
                    continue
                by_frame[frame].append((object_id, class_id, height, width, fields[5].strip()))
        return by_frame

    def __len__(self) -> int:
        return len(self.clips)

    def key(self, index: int) -> str:
        seq, start, count = self.clips[index]
        whole = count == len(self.frames[seq])
        return sample_key(self.source, seq if whole else f"{seq}_{start:06d}")

    def manifest_extra(self) -> dict[str, Any]:
        return {"converter": "mots", "root": str(self.root), "classes": {str(k): v for k, v in self.classes.items()},
                "vocabulary": sorted(self.classes.values())}

    def notes(self) -> list[str]:
        return [f"{n} txt line(s) left out: {reason}" for reason, n in sorted(self.unmatched.items())]

    def convert(self, index: int) -> Clip:
        seq, start, count = self.clips[index]
        files = self.frames[seq][start:start + count]
        frames, size = [], None
        for path in files:
            data, _, width, height = read_image(path)
            if size is not None and (width, height) != size:
                raise SkipItem("frames of different sizes", f"{path} is {width}x{height}, earlier frames "
                               f"{size[0]}x{size[1]}")
            size = (width, height)
            frames.append(data)
        width, height = size
        dropped: Counter = Counter()
        rles: dict[int, list[dict[str, Any] | None]] = {}
        ignored: set[int] = set()
        for t, path in enumerate(files):
            objects = (self._png_objects(self.root / seq / "instances" / f"{path.stem}.png", height, width)
                       if self.mode[seq] == "png" else self._txt_objects(seq, _frame_number(path), height, width))
            for object_id, rle in objects:
                class_id = object_id // ID_FACTOR
                if class_id == IGNORE_CLASS or class_id not in self.classes:
                    reason = "ignore region" if class_id == IGNORE_CLASS else f"class {class_id} not in --classes"
                    dropped[reason] += object_id not in ignored  # once per object and clip
                    ignored.add(object_id)
                    continue
                if isinstance(rle, DropAnnotation):
                    dropped[rle.reason] += 1
                    continue
                track = rles.setdefault(object_id, [None] * count)
                if track[t] is not None:
                    dropped["duplicate object id in a frame"] += 1
                    continue
                track[t] = rle
        masklets = [Masklet(id=object_id, phrases=[self.classes[object_id // ID_FACTOR]], segmentations=track)
                    for object_id, track in sorted(rles.items()) if any(r is not None for r in track)]
        return Clip(key=self.key(index), frames=frames, width=width, height=height,
                    phrases=sorted(self.classes.values()), masklets=masklets, fps=self.fps,
                    clip_id=f"{seq}/{start}", source=self.source,
                    file_names=[str(p.relative_to(self.root)) for p in files], origin=str(self.root / seq),
                    dropped=dict(dropped))

    @staticmethod
    def _png_objects(path: Path, height: int, width: int) -> list[tuple[int, Any]]:
        if not path.is_file():
            raise SkipItem("missing instance map", str(path))
        try:
            with Image.open(path) as img:
                ids = np.asarray(img)
        except (OSError, ValueError) as err:
            raise SkipItem("unreadable instance map", f"{path}: {err}") from err
        if ids.shape != (height, width):
            raise SkipItem("instance map size differs from the frame's",
                           f"{path} is {ids.shape[::-1]} (or not single-channel), the frame {width}x{height}")
        return [(int(v), encode_mask(ids == v)) for v in np.unique(ids) if v != 0]

    def _txt_objects(self, seq: str, frame: int, height: int, width: int) -> list[tuple[int, Any]]:
        objects = []
        for object_id, class_id, h, w, counts in self.lines[seq].get(frame, []):
            try:
                if object_id // ID_FACTOR != class_id:
                    raise DropAnnotation("id and class_id disagree")
                if (h, w) != (height, width):
                    raise DropAnnotation("RLE size differs from the frame size")
                objects.append((object_id, instance_from_segmentation(
                    {"size": [h, w], "counts": counts}, height, width).rle))
            except DropAnnotation as err:
                objects.append((object_id, err))
        return objects


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--root", required=True, help="folder of sequence folders, each with img1/")
    parser.add_argument("--classes", required=True, type=str,
                        help="class ids and their phrases: 1=car,2=pedestrian (KITTI-MOTS), 2=pedestrian (MOTS20)")
    parser.add_argument("--masks", choices=("auto", "png", "txt"), default="auto",
                        help="instances/ PNG maps or a MOTS txt file (auto: PNGs where a sequence has them)")
    parser.add_argument("--txt-name", default="gt/gt.txt", help="the MOTS txt file inside each sequence folder")
    parser.add_argument("--clip-length", type=int, default=0, help="frames per clip (0: one clip per sequence)")
    parser.add_argument("--fps", type=float, help="frame rate to record in the clips")
    parser.add_argument("--source", help="dataset label stored in every clip (default mots:<root folder name>)")
    add_sink_arguments(parser, default_prefix="clips")


def run(args: argparse.Namespace) -> int:
    converter = MotsConverter(args.root, parse_classes(args.classes), masks=args.masks, txt_name=args.txt_name,
                              clip_length=args.clip_length, source=args.source, fps=args.fps)
    return write_shards(args, converter, clips=True)
