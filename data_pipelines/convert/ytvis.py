"""YouTube-VIS-style video annotations plus frame folders -> clip shards (one clip per video).

The JSON holds ``videos`` (``id``, ``width``, ``height``, ``file_names`` relative to ``--frames``),
``categories`` (``id``, ``name``) and ``annotations`` (one object each: ``video_id``,
``category_id``, ``segmentations`` with one RLE, polygon list or null per frame). This is the format
of YouTube-VIS 2019/2021, OVIS and SA-Co/VEval ground truth.

* Each annotation becomes a masklet (its id the annotation id) with its category name as phrase
  (:func:`normalize_phrase`); each category with masklets in a video is a phrase asked there.
* Absent categories are negatives only with ``--exhaustive`` (the dataset annotates every object of
  every category in every video, as SA-Co/VEval does); YouTube-VIS itself is not exhaustive that way.
* A crowd annotation (``iscrowd: 1``) is dropped and counted; its category is never a negative there.
* An empty or missing frame mask is null; an annotation whose ``segmentations`` has another length
  than the video, or a malformed or wrongly sized mask, is dropped and counted by reason.
* A video with a missing or undecodable frame, frames of another size than declared, or (without
  ``--exhaustive``) no annotation is skipped and counted.
"""

from __future__ import annotations

import argparse
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from data_pipelines.convert.common import (
    Converter,
    DropAnnotation,
    InputError,
    SkipItem,
    instance_from_segmentation,
    load_json,
    read_image,
    require_list,
    sample_key,
    source_label,
    write_shards,
)
from data_pipelines.schema import normalize_phrase
from data_pipelines.video import Clip, Masklet
from data_pipelines.writer import add_sink_arguments


class YtvisConverter(Converter):
    """Videos of a YouTube-VIS-style JSON as clips.

    Args:
        annotations: the JSON file.
        frames: folder the videos' ``file_names`` are relative to.
        exhaustive: every category absent from a video is a negative phrase of it.
        source: dataset label stored in each clip (default ``ytvis:<file stem>``).
        fps: frame rate to record (the format has none).
    """

    def __init__(self, annotations: str | Path, frames: str | Path, *, exhaustive: bool = False,
                 source: str | None = None, fps: float | None = None) -> None:
        self.path, self.frames = Path(annotations), Path(frames)
        if not self.frames.is_dir():
            raise InputError(f"frames folder {self.frames} does not exist")
        data = load_json(self.path, "YouTube-VIS annotation")
        self.videos = require_list(data, "videos", self.path)
        categories = require_list(data, "categories", self.path)
        annotations_list = require_list(data, "annotations", self.path)
        self.exhaustive, self.fps = exhaustive, fps
        self.source = source or source_label("ytvis", self.path)
        self.phrases: dict[Any, str] = {}
        for index, category in enumerate(categories):
            name = category.get("name") if isinstance(category, dict) else None
            if not isinstance(name, str) or not normalize_phrase(name) or "id" not in category:
                raise InputError(f"{self.path}: field categories[{index}] needs an 'id' and a non-empty 'name'")
            self.phrases[category["id"]] = normalize_phrase(name)
        for index, video in enumerate(self.videos):
            if not isinstance(video, dict) or "id" not in video or not isinstance(video.get("file_names"), list):
                raise InputError(f"{self.path}: field videos[{index}] needs an 'id' and a 'file_names' list")
        self.by_video: dict[Any, list[dict[str, Any]]] = defaultdict(list)
        self.unknown: Counter = Counter()
        for index, ann in enumerate(annotations_list):
            if not isinstance(ann, dict) or "video_id" not in ann or "category_id" not in ann:
                raise InputError(f"{self.path}: field annotations[{index}] needs 'video_id' and 'category_id'")
            if ann["category_id"] not in self.phrases:
                self.unknown["unknown category_id"] += 1
                continue
            self.by_video[ann["video_id"]].append(ann)
        known = {video["id"] for video in self.videos}
        self.unknown["unknown video_id"] += sum(len(v) for k, v in self.by_video.items() if k not in known)

    def __len__(self) -> int:
        return len(self.videos)

    def key(self, index: int) -> str:
        return sample_key(self.source, self.videos[index]["id"])

    def manifest_extra(self) -> dict[str, Any]:
        return {"converter": "ytvis", "annotations": str(self.path), "exhaustive": self.exhaustive,
                "vocabulary": sorted(set(self.phrases.values()))}

    def notes(self) -> list[str]:
        return [f"{n} annotation(s) left out: {reason}" for reason, n in sorted(self.unknown.items()) if n]

    def convert(self, index: int) -> Clip:
        video = self.videos[index]
        frames, size = [], None
        for name in video["file_names"]:
            data, _, width, height = read_image(self.frames / str(name))
            if size is not None and (width, height) != size:
                raise SkipItem("frames of different sizes", f"{self.frames / str(name)} is {width}x{height}, "
                               f"earlier frames {size[0]}x{size[1]}")
            size = (width, height)
            frames.append(data)
        if not frames:
            raise SkipItem("video without frames", f"video {video['id']} of {self.path}")
        declared = (video.get("width", size[0]), video.get("height", size[1]))
        if declared != size:
            raise SkipItem("frame size differs from the video's", f"video {video['id']}: frames are "
                           f"{size[0]}x{size[1]}, {self.path} says {declared[0]}x{declared[1]}")
        width, height = size
        masklets, dropped, crowd = [], Counter(), set()
        for ann in self.by_video.get(video["id"], []):
            phrase = self.phrases[ann["category_id"]]
            if ann.get("iscrowd", 0):
                dropped["crowd region"] += 1
                crowd.add(phrase)
                continue
            try:
                masklets.append(self._masklet(ann, phrase, len(frames), height, width))
            except DropAnnotation as err:
                dropped[err.reason] += 1
        positives = sorted({m.phrases[0] for m in masklets})
        negatives = sorted(set(self.phrases.values()) - set(positives) - crowd) if self.exhaustive else []
        if not positives and not negatives:
            raise SkipItem("no annotations (and not --exhaustive)", f"video {video['id']} of {self.path}")
        return Clip(key=self.key(index), frames=frames, width=width, height=height, phrases=positives + negatives,
                    masklets=masklets, fps=self.fps, clip_id=video["id"], source=self.source,
                    file_names=[str(n) for n in video["file_names"]], origin=str(self.path), dropped=dict(dropped))

    @staticmethod
    def _masklet(ann: dict[str, Any], phrase: str, length: int, height: int, width: int) -> Masklet:
        segmentations = ann.get("segmentations")
        if not isinstance(segmentations, list) or len(segmentations) != length:
            raise DropAnnotation("segmentations length differs from the video's")
        if not isinstance(ann.get("id"), int) or isinstance(ann.get("id"), bool):
            raise DropAnnotation("annotation id is not an integer")
        rles = []
        for segmentation in segmentations:
            try:
                rles.append(instance_from_segmentation(segmentation, height, width).rle)
            except DropAnnotation as err:
                if err.reason not in ("no segmentation", "zero-area mask"):
                    raise
                rles.append(None)  # not visible in this frame
        if all(rle is None for rle in rles):
            raise DropAnnotation("object visible in no frame")
        return Masklet(id=ann["id"], phrases=[phrase], segmentations=rles)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--annotations", required=True, help="YouTube-VIS-style JSON (videos, categories, annotations)")
    parser.add_argument("--frames", required=True, help="folder the videos' file_names are relative to")
    parser.add_argument("--exhaustive", action="store_true",
                        help="every category absent from a video is a negative phrase of it (only when the "
                             "dataset annotates every object of every category in every video)")
    parser.add_argument("--fps", type=float, help="frame rate to record in the clips (the format has none)")
    parser.add_argument("--source", help="dataset label stored in every clip (default ytvis:<file stem>)")
    add_sink_arguments(parser, default_prefix="clips")


def run(args: argparse.Namespace) -> int:
    converter = YtvisConverter(args.annotations, args.frames, exhaustive=args.exhaustive, source=args.source,
                               fps=args.fps)
    return write_shards(args, converter, clips=True)
