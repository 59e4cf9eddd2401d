"""Video clips in WebDataset shards: one sample is one clip (frames, phrases, per-object masklets).

A clip sample holds::

    __key__        unique, stable id (no dots, slashes or whitespace)
    00000.png ...  the frames in order, one field per frame (png, jpg or webp bytes; formats may mix)
    json           {"schema": 1,
                    "clip": {"id": ..., "width": W, "height": H, "num_frames": T, "fps": 10.0 | null,
                             "source": "synthetic-video", "file_names": ["vid/00000.jpg", ...]},
                    "phrases": ["red circle", "blue square"],
                    "masklets": [{"id": 1, "phrases": ["red circle"],
                                  "segmentations": [{"size": [H, W], "counts": "..."} | null] * T}]}

Every phrase asked is exhaustive: each object it refers to has a masklet, so a phrase no masklet
names is a negative for the whole clip. A masklet is one physical object: its id is unique in the
clip, it names the phrases that refer to it, and per frame its visible pixels as COCO RLE, or null
where it is not visible (out of the frame or hidden); ``file_names`` (optional) are the source
frames' paths. :func:`clips_to_ytvis` writes the YouTube-VIS ground truth evaluators read.
"""

from __future__ import annotations

import io
import json
import math
import os
import re
import tarfile
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from data_pipelines.atomic import atomic_write
from data_pipelines.schema import (
    SCHEMA_VERSION,
    SampleError,
    check_header,
    check_positive_ints,
    checked_image_size,
    checked_rle,
    encode_mask,
    image_format_of,
    rle_bbox,
    validate_key,
)
from data_pipelines.writer import MANIFEST, ShardSink, Skip

FRAME_FIELD = re.compile(r"(\d{5,})\.(png|jpg|webp)")
"""A frame's field name in a sample: its zero-padded index and format (``00000.png``)."""


@dataclass
class Masklet:
    """One object through a clip: its id, the phrases that refer to it, per frame its RLE or ``None``."""

    id: int
    phrases: list[str]
    segmentations: list[dict[str, Any] | None]

    @classmethod
    def from_masks(cls, object_id: int, phrases: Sequence[str],
                   masks: Sequence[np.ndarray | None]) -> Masklet:
        """Masklet of per-frame (H, W) bool masks; an empty mask or ``None`` becomes ``None``."""
        return cls(id=object_id, phrases=list(phrases),
                   segmentations=[encode_mask(m) if m is not None and m.any() else None for m in masks])

    @property
    def visible_frames(self) -> list[int]:
        """Indices of the frames where the object is visible."""
        return [t for t, rle in enumerate(self.segmentations) if rle is not None]

    def mask(self, frame: int) -> np.ndarray | None:
        """The (H, W) bool mask in ``frame``, or ``None`` where the object is not visible."""
        rle = self.segmentations[frame]
        return None if rle is None else mask_utils.decode(checked_rle(rle)).astype(bool)

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "phrases": list(self.phrases), "segmentations": list(self.segmentations)}


@dataclass
class Clip:
    """One clip as written to a shard: encoded frames, the phrases asked, the masklets."""

    key: str
    frames: list[bytes]
    width: int
    height: int
    phrases: list[str]
    masklets: list[Masklet]
    fps: float | None = None
    clip_id: str | int | None = None
    source: str = ""
    file_names: list[str] | None = None  # the source frames' paths (converters)
    origin: str | None = None  # the file it came from, named in error messages (not written)
    dropped: dict[str, int] = field(default_factory=dict)  # annotations left out, by reason (not written)

    @property
    def num_frames(self) -> int:
        return len(self.frames)

    def frame_names(self) -> list[str]:
        """Field (and file) names of the frames: ``00000.png``, ``00001.jpg``, ..."""
        return [f"{index:05d}.{image_format_of(data)}" for index, data in enumerate(self.frames)]

    def frame(self, index: int) -> np.ndarray:
        """Frame ``index`` decoded as an (H, W, 3) uint8 array."""
        with Image.open(io.BytesIO(self.frames[index])) as img:
            return np.asarray(img.convert("RGB"))

    def meta(self) -> dict[str, Any]:
        info: dict[str, Any] = {"id": self.key if self.clip_id is None else self.clip_id, "width": self.width,
                                "height": self.height, "num_frames": self.num_frames, "fps": self.fps,
                                "source": self.source}
        if self.file_names is not None:
            info["file_names"] = list(self.file_names)
        return {"schema": SCHEMA_VERSION, "clip": info, "phrases": list(self.phrases),
                "masklets": [m.to_json() for m in self.masklets]}

    def to_wds(self) -> dict[str, Any]:
        """The dict ``webdataset.TarWriter.write`` takes."""
        record: dict[str, Any] = {"__key__": self.key}
        record.update(zip(self.frame_names(), self.frames, strict=True))
        record["json"] = json.dumps(self.meta(), separators=(",", ":")).encode()
        return record


# ----------------------------------------------------------------------------------------------
# validation and reading
# ----------------------------------------------------------------------------------------------
def validate_clip_meta(meta: Any, *, key: str | None = None, source: str | None = None,
                       num_frames: int | None = None, frame_size: tuple[int, int] | None = None) -> None:
    """Check a clip's ``json``; raise :class:`SampleError` naming the file, sample and field.

    Args:
        meta: the decoded ``json`` of one clip.
        key: the sample key, for the error message.
        source: the file the clip came from, for the error message.
        num_frames: how many frames the sample holds, if known; must match ``clip.num_frames``.
        frame_size: ``(width, height)`` of every decoded frame, if known; must match the metadata.
    """
    def fail(message: str, where: str) -> None:
        raise SampleError(message, source=source, key=key, field=where)

    check_header(meta, fail)
    info = meta.get("clip")
    if not isinstance(info, dict):
        fail("missing or not an object (an image sample, not a clip?)", "clip")
    check_positive_ints(info, ("width", "height", "num_frames"), "clip", fail)
    width, height, length = info["width"], info["height"], info["num_frames"]
    fps = info.get("fps")
    if fps is not None and not (isinstance(fps, int | float) and not isinstance(fps, bool)
                                and math.isfinite(fps) and fps > 0):
        fail(f"must be a positive number or null, got {fps!r}", "clip.fps")
    file_names = info.get("file_names")
    if file_names is not None and not (isinstance(file_names, list) and len(file_names) == length
                                       and all(isinstance(n, str) and n.strip() for n in file_names)):
        fail(f"must be a list of {length} non-empty strings when given", "clip.file_names")
    if num_frames is not None and num_frames != length:
        fail(f"the sample holds {num_frames} frame(s) but metadata says {length}", "clip.num_frames")
    if frame_size is not None and tuple(frame_size) != (width, height):
        fail(f"frames are {frame_size[0]}x{frame_size[1]} but metadata says {width}x{height}", "clip.width/height")
    phrases = meta.get("phrases")
    if not isinstance(phrases, list):
        fail("missing or not a list", "phrases")
    for index, phrase in enumerate(phrases):
        if not isinstance(phrase, str) or not phrase.strip():
            fail(f"must be a non-empty string, got {phrase!r}", f"phrases[{index}]")
        if phrases.index(phrase) != index:
            fail(f"phrase {phrase!r} appears twice", f"phrases[{index}]")
    masklets = meta.get("masklets")
    if not isinstance(masklets, list):
        fail("missing or not a list", "masklets")
    ids: set[int] = set()
    for mi, masklet in enumerate(masklets):
        where = f"masklets[{mi}]"
        if not isinstance(masklet, dict):
            fail("not an object", where)
        object_id = masklet.get("id")
        if not isinstance(object_id, int) or isinstance(object_id, bool):
            fail(f"must be an integer, got {object_id!r}", f"{where}.id")
        if object_id in ids:
            fail(f"object id {object_id} appears twice in one clip", f"{where}.id")
        ids.add(object_id)
        names = masklet.get("phrases")
        if not isinstance(names, list) or not names:
            fail("must be a non-empty list of the phrases that refer to the object", f"{where}.phrases")
        for pi, phrase in enumerate(names):
            if phrase not in phrases or names.index(phrase) != pi:
                fail(f"{phrase!r} is not one of the clip's phrases, or appears twice", f"{where}.phrases[{pi}]")
        segmentations = masklet.get("segmentations")
        if not isinstance(segmentations, list) or len(segmentations) != length:
            fail(f"must be a list of {length} RLEs or nulls (one per frame)", f"{where}.segmentations")
        for t, rle in enumerate(segmentations):
            if rle is not None:
                _validate_rle(rle, (height, width), f"{where}.segmentations[{t}]", fail)
        if all(rle is None for rle in segmentations):
            fail("the object is visible in no frame", f"{where}.segmentations")


def _validate_rle(rle: Any, hw: tuple[int, int], where: str, fail) -> None:
    if not isinstance(rle, dict) or "size" not in rle or "counts" not in rle:
        fail("must be null or an RLE object with 'size' and 'counts'", where)
    if rle["size"] != list(hw):
        fail(f"RLE size {rle['size']!r} does not match the frame size [H, W] = {list(hw)}", f"{where}.size")
    try:
        compressed = checked_rle(rle)
    except Exception as err:  # pycocotools raises bare Exceptions/ValueErrors on corrupt counts
        fail(f"RLE does not decode: {err}", f"{where}.counts")
    if mask_utils.area(compressed) == 0:
        fail("mask is empty (write null for a frame where the object is not visible)", where)


def clip_from_wds(record: dict[str, Any], *, source: str | None = None, check_frames: bool = False) -> Clip:
    """Rebuild a :class:`Clip` from a raw (undecoded) record and validate it.

    ``check_frames`` decodes every frame and checks its size against the metadata.
    """
    key = record.get("__key__")
    source = source or record.get("__url__")
    validate_key(key, source=source)
    frames: dict[int, bytes] = {}
    for name, value in record.items():
        if name.startswith("__") or name == "json":
            continue
        found = FRAME_FIELD.fullmatch(name)
        if found is None:
            raise SampleError("unexpected field: a clip holds frames (00000.png ...) and json",
                              source=source, key=key, field=name)
        frames[int(found.group(1))] = value
    if sorted(frames) != list(range(len(frames))):
        raise SampleError(f"frame indices must be 0 .. {len(frames) - 1} without gaps or repeats, got "
                          f"{sorted(frames)[:8]}...", source=source, key=key, field="frames")
    if "json" not in record:
        raise SampleError("missing", source=source, key=key, field="json")
    try:
        meta = json.loads(record["json"])
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise SampleError(f"not valid JSON: {err}", source=source, key=key, field="json") from err
    ordered = [frames[t] for t in range(len(frames))]
    size = _frame_size(ordered, key, source) if check_frames else None
    validate_clip_meta(meta, key=key, source=source, num_frames=len(ordered), frame_size=size)
    info = meta["clip"]
    return Clip(key=key, frames=ordered, width=info["width"], height=info["height"], phrases=meta["phrases"],
                masklets=[Masklet(id=m["id"], phrases=m["phrases"], segmentations=m["segmentations"])
                          for m in meta["masklets"]],
                fps=info.get("fps"), clip_id=info.get("id"), source=info.get("source", ""),
                file_names=info.get("file_names"))


def _frame_size(frames: Sequence[bytes], key: str | None, source: str | None) -> tuple[int, int] | None:
    """The (width, height) all frames share; a frame that does not decode or differs is an error."""
    size = None
    for index, data in enumerate(frames):
        where = f"{index:05d}"
        try:
            where = f"{index:05d}.{image_format_of(data)}"
            this = checked_image_size(data)
        except Exception as err:
            raise SampleError(f"frame does not decode: {err}", source=source, key=key, field=where) from err
        if size is not None and this != size:
            raise SampleError(f"frame is {this[0]}x{this[1]} but frame 0 is {size[0]}x{size[1]}",
                              source=source, key=key, field=where)
        size = this
    return size


def _tar_records(path: Path) -> Iterator[dict[str, Any]]:
    """Raw records of one shard, grouped by key as WebDataset does (the name up to the first dot)."""
    record: dict[str, Any] | None = None
    with tarfile.open(path) as tar:
        for member in tar:
            if not member.isfile():
                continue
            folder, _, base = member.name.rpartition("/")
            stem, _, name = base.partition(".")
            key = f"{folder}/{stem}" if folder else stem
            if record is None or record["__key__"] != key:
                if record is not None:
                    yield record
                record = {"__key__": key, "__url__": path.name}
            record[name] = tar.extractfile(member).read()
    if record is not None:
        yield record


def iter_clips(shard_dir: str | os.PathLike, *, check_frames: bool = True) -> Iterator[Clip]:
    """Every clip of a shard folder, validated: in manifest order, or the ``*.tar`` files sorted."""
    shard_dir = Path(shard_dir)
    manifest = shard_dir / MANIFEST
    if manifest.exists():
        paths = [shard_dir / r["name"] for r in json.loads(manifest.read_text())["shards"]]
    else:
        paths = sorted(shard_dir.glob("*.tar"))
    if not paths and not manifest.exists():
        raise FileNotFoundError(f"{shard_dir} holds no shards (*.tar) and no {MANIFEST}")
    for path in paths:
        for record in _tar_records(path):
            yield clip_from_wds(record, source=path.name, check_frames=check_frames)


# ----------------------------------------------------------------------------------------------
# writing
# ----------------------------------------------------------------------------------------------
class ClipSink(ShardSink):
    """A :class:`ShardSink` for clips: validates clips and counts phrases per clip.

    The manifest counts ``samples`` (clips), ``queries`` (phrases asked), ``instances`` (masklet-phrase
    pairs) and ``negatives`` (phrases without masklets).
    """

    def _check(self, clip: Clip) -> Skip | None:  # type: ignore[override]
        try:
            validate_key(clip.key, source=clip.origin)
            if clip.key in self._keys:
                raise SampleError("key is not unique in this shard set", key=clip.key, field="__key__")
            size = _frame_size(clip.frames, clip.key, clip.origin) if self.check_images else None
            validate_clip_meta(clip.meta(), key=clip.key, source=clip.origin, num_frames=clip.num_frames,
                               frame_size=size)
        except SampleError as err:
            return self._invalid(str(clip.key), err)
        return None

    def _count(self, clip: Clip) -> None:  # type: ignore[override]
        self._keys.add(clip.key)
        self.dropped_counts.update(clip.dropped)
        per_phrase = Counter(p for m in clip.masklets for p in m.phrases)
        self._current.samples += 1
        self._current.queries += len(clip.phrases)
        self._current.instances += sum(per_phrase.values())
        self._current.negatives += sum(per_phrase[p] == 0 for p in clip.phrases)
        for phrase in clip.phrases:
            counter = self.phrases.setdefault(phrase, Counter())
            if per_phrase[phrase]:
                counter["positive"] += 1
                counter["instances"] += per_phrase[phrase]
            else:
                counter["negative"] += 1


def write_clips(clips: Iterable[Clip | Skip], out_dir: str | os.PathLike, **sink_kwargs: Any) -> dict[str, Any]:
    """Write clips into a new shard set (``ShardSink`` options) and return the manifest."""
    with ClipSink(out_dir, **sink_kwargs) as sink:
        for clip in clips:
            sink.add(clip)
    return sink.written_manifest


def write_frames(clip: Clip, frames_root: str | os.PathLike) -> Path:
    """Write the clip's frames as ``frames_root/<key>/00000.png ...`` (atomically); returns that folder.

    The folder is what ``sambridge track`` reads, and the names are the ``file_names`` of
    :func:`clips_to_ytvis`.
    """
    folder = Path(frames_root) / clip.key
    for name, data in zip(clip.frame_names(), clip.frames, strict=True):
        atomic_write(folder / name, data)
    return folder


# ----------------------------------------------------------------------------------------------
# YouTube-VIS ground truth
# ----------------------------------------------------------------------------------------------
def clips_to_ytvis(clips: Iterable[Clip]) -> dict[str, Any]:
    """YouTube-VIS ground truth of clips, with SA-Co/VEval's ``video_np_pairs``.

    One video per clip (``name`` = key, ``file_names`` = ``<key>/00000.png`` ...), one category per
    phrase (sorted), one annotation per (object, phrase that refers to it) with the clip's object id in
    ``object_id``, and one ``video_np_pairs`` entry per phrase asked (``num_masklets`` 0 for negatives).
    """
    clips = list(clips)
    phrases = sorted({p for clip in clips for p in clip.phrases})
    category = {phrase: index for index, phrase in enumerate(phrases, start=1)}
    videos, annotations, pairs = [], [], []
    for video_id, clip in enumerate(clips, start=1):
        videos.append({"id": video_id, "name": clip.key, "height": clip.height, "width": clip.width,
                       "length": clip.num_frames, "file_names": [f"{clip.key}/{n}" for n in clip.frame_names()]})
        for masklet in clip.masklets:
            boxes = [None if rle is None else rle_bbox(rle) for rle in masklet.segmentations]
            areas = [None if rle is None else int(mask_utils.area(checked_rle(rle)))
                     for rle in masklet.segmentations]
            for phrase in masklet.phrases:
                annotations.append({"id": len(annotations) + 1, "video_id": video_id,
                                    "category_id": category[phrase], "object_id": masklet.id, "iscrowd": 0,
                                    "height": clip.height, "width": clip.width,
                                    "segmentations": list(masklet.segmentations), "bboxes": boxes,
                                    "areas": areas})
        for phrase in clip.phrases:
            pairs.append({"video_id": video_id, "category_id": category[phrase],
                          "num_masklets": sum(phrase in m.phrases for m in clip.masklets)})
    return {"videos": videos, "categories": [{"id": i, "name": p} for p, i in category.items()],
            "annotations": annotations, "video_np_pairs": pairs}
