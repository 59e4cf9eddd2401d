"""The shard sample schema, as code: build samples, encode masks, validate, (de)serialise.

One WebDataset sample is one image with K noun-phrase queries::

    __key__  unique, stable id (source + image id)
    jpg|png|webp  the image bytes, unmodified where possible
    json     {"schema": 1,
              "image": {"id": ..., "width": W, "height": H, "source": "coco:val2017",
                        "file_name": "train2017/000000000139.jpg"},
              "queries": [{"phrase": "red apple", "exhaustive": true,
                           "instances": [{"rle": {"size": [H, W], "counts": "..."},
                                          "bbox": [x, y, w, h]}]},
                          {"phrase": "pear", "exhaustive": true, "instances": []}]}
    teacher.safetensors  optional cached teacher outputs (never pickle)

A query without instances is a negative phrase. ``exhaustive`` says every instance of the phrase
in the image is annotated: only exhaustive queries count as negatives or for recall.
"""

from __future__ import annotations

import io
import json
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError
from pycocotools import mask as mask_utils

SCHEMA_VERSION = 1
IMAGE_EXTENSIONS = ("jpg", "png", "webp")
TEACHER_FIELD = "teacher.safetensors"
BBOX_TOLERANCE_PX = 1.0
KEY_PATTERN = re.compile(r"[^./\\\s]+")


class SampleError(ValueError):
    """A sample breaks the schema; the message names the source file, sample key and field."""

    def __init__(self, message: str, *, source: str | None = None, key: str | None = None,
                 field: str | None = None) -> None:
        self.source, self.key, self.field, self.reason = source, key, field, message
        where = ", ".join(part for part in (
            f"file {source}" if source else "",
            f"sample {key!r}" if key else "",
            f"field {field}" if field else "") if part)
        super().__init__(f"{where}: {message}" if where else message)


def validate_key(key: Any, *, source: str | None = None) -> None:
    """A sample key must be a non-empty string without dots, slashes or whitespace.

    WebDataset groups tar members by the part of the name before the first dot, so a dot in a
    key would split one sample into several.
    """
    if not isinstance(key, str) or not KEY_PATTERN.fullmatch(key):
        raise SampleError(f"key must be a non-empty string without '.', '/', '\\' or whitespace, got {key!r}",
                          source=source, key=key if isinstance(key, str) else None, field="__key__")


def normalize_phrase(phrase: str) -> str:
    """Lower-case, underscores to spaces, single spaces: 'Baseball_Bat ' -> 'baseball bat'."""
    return re.sub(r"\s+", " ", phrase.replace("_", " ")).strip().lower()


@dataclass
class Instance:
    """One object: a COCO RLE mask (``counts`` as str) and its box ``[x, y, w, h]`` in pixels."""

    rle: dict[str, Any]
    bbox: list[float]

    def to_json(self) -> dict[str, Any]:
        return {"rle": self.rle, "bbox": [float(v) for v in self.bbox]}


@dataclass
class Query:
    """A noun phrase asked of one image and every instance it refers to."""

    phrase: str
    instances: list[Instance] = field(default_factory=list)
    exhaustive: bool = True

    def to_json(self) -> dict[str, Any]:
        return {"phrase": self.phrase, "exhaustive": self.exhaustive,
                "instances": [inst.to_json() for inst in self.instances]}


@dataclass
class Sample:
    """One image with its queries, as written to a shard."""

    key: str
    image: bytes
    image_format: str
    width: int
    height: int
    queries: list[Query]
    image_id: str | int | None = None
    source: str = ""
    teacher: bytes | None = None
    file_name: str | None = None  # the source image's path under the converter's image folder
    origin: str | None = None  # the file it came from, named in error messages (not written)
    dropped: dict[str, int] = field(default_factory=dict)  # annotations left out, by reason (not written)

    def meta(self) -> dict[str, Any]:
        image = {"id": self.key if self.image_id is None else self.image_id,
                 "width": self.width, "height": self.height, "source": self.source}
        if self.file_name is not None:
            image["file_name"] = self.file_name
        return {"schema": SCHEMA_VERSION, "image": image, "queries": [q.to_json() for q in self.queries]}

    @property
    def image_file(self) -> str:
        """Where the image lives: its source file name, or ``{key}.{format}`` for generated samples."""
        return self.file_name or f"{self.key}.{self.image_format}"

    def to_wds(self) -> dict[str, Any]:
        """The dict ``webdataset.TarWriter.write`` takes (bytes values are written as they are)."""
        record: dict[str, Any] = {"__key__": self.key, self.image_format: self.image,
                                  "json": json.dumps(self.meta(), separators=(",", ":")).encode()}
        if self.teacher is not None:
            record[TEACHER_FIELD] = self.teacher
        return record


# ----------------------------------------------------------------------------------------------
# masks
# ----------------------------------------------------------------------------------------------
def encode_mask(mask: np.ndarray) -> dict[str, Any]:
    """Binary (H, W) mask -> compressed COCO RLE with ``counts`` as str (JSON-safe)."""
    rle = mask_utils.encode(np.asarray(mask, dtype=np.uint8, order="F"))  # no copy if already so
    return {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")}


def compressed_rle_runs(counts: bytes) -> np.ndarray:
    """Run lengths of a compressed COCO RLE string (the inverse of pycocotools' ``rleToString``).

    pycocotools decodes RLEs whose runs do not cover the mask without complaint (the uncovered
    pixels are uninitialised memory), so :func:`decode_rle` checks the runs first.
    """
    c = np.frombuffer(counts, np.uint8).astype(np.int64) - 48
    if c.size == 0:
        return c
    if np.any((c < 0) | (c > 63)) or c[-1] & 0x20:
        raise ValueError("invalid characters or truncated RLE string")
    ends = np.flatnonzero((c & 0x20) == 0)  # each value is 5-bit digits, the last without the 0x20 flag
    starts = np.concatenate([[0], ends[:-1] + 1])
    digit = np.arange(c.size) - np.repeat(starts, ends - starts + 1)
    runs = np.add.reduceat((c & 0x1F) << (5 * digit), starts)
    runs -= ((c[ends] & 0x10) != 0).astype(np.int64) << (5 * (ends - starts + 1))  # sign bit
    # from the fourth run on, each is stored as a difference to the run two before it
    runs[3::2] = runs[1] + np.cumsum(runs[3::2]) if runs.size > 3 else runs[3::2]
    runs[4::2] = runs[2] + np.cumsum(runs[4::2]) if runs.size > 4 else runs[4::2]
    return runs


def checked_rle(rle: dict[str, Any]) -> dict[str, Any]:
    """COCO RLE (compressed str/bytes or uncompressed list counts) -> pycocotools' compressed form.

    Raises ``ValueError`` when the runs are negative or do not cover exactly H * W pixels.
    """
    h, w = (int(s) for s in rle["size"])
    counts = rle["counts"]
    if isinstance(counts, str):
        counts = counts.encode("ascii")
    runs = np.asarray(counts, dtype=np.int64) if isinstance(counts, list) else compressed_rle_runs(counts)
    if (runs.size and runs.min() < 0) or runs.sum() != h * w:
        raise ValueError(f"RLE runs cover {int(runs.sum())} pixels, expected {h} x {w} = {h * w}")
    if isinstance(counts, list):
        return mask_utils.frPyObjects({"size": [h, w], "counts": counts}, h, w)
    return {"size": [h, w], "counts": counts}


def decode_rle(rle: dict[str, Any]) -> np.ndarray:
    """COCO RLE (compressed str/bytes or uncompressed list counts) -> (H, W) bool mask."""
    return mask_utils.decode(checked_rle(rle)).astype(bool)


def rle_bbox(rle: dict[str, Any]) -> list[float]:
    """Tight ``[x, y, w, h]`` box of an RLE mask (pycocotools convention; zeros for empty)."""
    return [float(v) for v in mask_utils.toBbox(checked_rle(rle))]


def instance_from_mask(mask: np.ndarray) -> Instance:
    """Instance with the mask's RLE and its tight box; the mask must not be empty."""
    rle = encode_mask(mask)
    return Instance(rle=rle, bbox=rle_bbox(rle))


# ----------------------------------------------------------------------------------------------
# images
# ----------------------------------------------------------------------------------------------
def image_format_of(data: bytes) -> str:
    """'jpg' | 'png' | 'webp' from the file's magic bytes."""
    if data[:3] == b"\xff\xd8\xff":
        return "jpg"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    raise ValueError("image bytes are not JPEG, PNG or WebP")


def encode_image(array: np.ndarray, image_format: str = "png", quality: int = 95) -> bytes:
    """(H, W, 3) uint8 array -> encoded bytes."""
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format={"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}[image_format],
                                **({"quality": quality} if image_format != "png" else {}))
    return buf.getvalue()


def checked_image_size(data: bytes) -> tuple[int, int]:
    """(width, height) of an image whose every pixel decodes (a truncated body fails, not only a bad
    header); raises what Pillow raises for bytes that do not decode."""
    try:
        img = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:  # its message names the BytesIO object, not the data
        raise OSError(f"not an image PIL can identify (first bytes {data[:8]!r})") from None
    with img:
        img.load()
        return img.size


# ----------------------------------------------------------------------------------------------
# validation
# ----------------------------------------------------------------------------------------------
def check_header(meta: Any, fail: Callable[[str, str], None]) -> None:
    """What every record's ``json`` is first checked for: an object of this schema version (``fail(message,
    field)`` raises)."""
    if not isinstance(meta, dict):
        fail(f"expected an object, got {type(meta).__name__}", "json")
    if meta.get("schema") != SCHEMA_VERSION:
        fail(f"schema version {meta.get('schema')!r} is not {SCHEMA_VERSION}", "schema")


def check_positive_ints(record: dict, names: Sequence[str], prefix: str, fail: Callable[[str, str], None]) -> None:
    """Each of ``record[name]`` must be a positive int (not a bool); ``fail(message, "prefix.name")`` otherwise."""
    for name in names:
        value = record.get(name)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            fail(f"must be a positive integer, got {value!r}", f"{prefix}.{name}")


def validate_meta(meta: Any, *, key: str | None = None, source: str | None = None,
                  image_size: tuple[int, int] | None = None) -> None:
    """Check a sample's ``json`` against the schema; raise :class:`SampleError` naming the field.

    Args:
        meta: the decoded ``json`` of one sample.
        key: the sample key, for the error message.
        source: the file the sample came from, for the error message.
        image_size: ``(width, height)`` of the decoded image, if known; must match the metadata.
    """
    def fail(message: str, where: str) -> None:
        raise SampleError(message, source=source, key=key, field=where)

    check_header(meta, fail)
    image = meta.get("image")
    if not isinstance(image, dict):
        fail("missing or not an object", "image")
    check_positive_ints(image, ("width", "height"), "image", fail)
    width, height = image["width"], image["height"]
    file_name = image.get("file_name")
    if file_name is not None and not (isinstance(file_name, str) and file_name.strip()):
        fail(f"must be a non-empty string (the source image's path) when given, got {file_name!r}",
             "image.file_name")
    if image_size is not None and tuple(image_size) != (width, height):
        fail(f"image is {image_size[0]}x{image_size[1]} but metadata says {width}x{height}",
             "image.width/height")
    queries = meta.get("queries")
    if not isinstance(queries, list):
        fail("missing or not a list", "queries")
    seen: set[str] = set()
    for qi, query in enumerate(queries):
        where = f"queries[{qi}]"
        if not isinstance(query, dict):
            fail("not an object", where)
        phrase = query.get("phrase")
        if not isinstance(phrase, str) or not phrase.strip():
            fail(f"phrase must be a non-empty string, got {phrase!r}", f"{where}.phrase")
        if phrase in seen:
            fail(f"phrase {phrase!r} appears twice in one sample", f"{where}.phrase")
        seen.add(phrase)
        if not isinstance(query.get("exhaustive", True), bool):
            fail("must be true or false", f"{where}.exhaustive")
        instances = query.get("instances")
        if not isinstance(instances, list):
            fail("missing or not a list", f"{where}.instances")
        for ii, inst in enumerate(instances):
            _validate_instance(inst, (height, width), f"{where}.instances[{ii}]", fail)


def _validate_instance(inst: Any, hw: tuple[int, int], where: str, fail) -> None:
    if not isinstance(inst, dict) or "rle" not in inst or "bbox" not in inst:
        fail("instance must be an object with 'rle' and 'bbox'", where)
    rle = inst["rle"]
    if not isinstance(rle, dict) or "size" not in rle or "counts" not in rle:
        fail("RLE must be an object with 'size' and 'counts'", f"{where}.rle")
    size = rle["size"]
    if not (isinstance(size, list | tuple) and len(size) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) for v in size)):
        fail(f"RLE size must be [H, W] integers, got {size!r}", f"{where}.rle.size")
    if list(size) != list(hw):
        fail(f"RLE size {list(rle['size'])} does not match image size [H, W] = {list(hw)}",
             f"{where}.rle.size")
    try:  # area and box come from the runs: no need to decode (H, W) pixels per instance
        compressed = checked_rle(rle)
    except Exception as err:  # pycocotools raises bare Exceptions/ValueErrors on corrupt counts
        fail(f"RLE does not decode: {err}", f"{where}.rle.counts")
    if mask_utils.area(compressed) == 0:
        fail("mask is empty", f"{where}.rle")
    bbox = inst["bbox"]
    numbers = isinstance(bbox, list | tuple) and all(
        isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in bbox)
    if not (numbers and len(bbox) == 4 and bbox[2] >= 0 and bbox[3] >= 0):
        fail(f"bbox must be [x, y, w, h] of finite numbers, w, h >= 0, got {bbox!r}", f"{where}.bbox")
    tight = mask_utils.toBbox(compressed)
    if max(abs(float(a) - float(b)) for a, b in zip(bbox, tight, strict=True)) > BBOX_TOLERANCE_PX:
        fail(f"bbox {list(bbox)} disagrees with the mask's box {[int(v) for v in tight]}", f"{where}.bbox")


def sample_from_wds(record: dict[str, Any], *, source: str | None = None,
                    check_image: bool = False) -> Sample:
    """Rebuild a :class:`Sample` from a raw (undecoded) webdataset record and validate it."""
    key = record.get("__key__")
    source = source or record.get("__url__")
    validate_key(key, source=source)
    formats = [ext for ext in IMAGE_EXTENSIONS if ext in record]
    if len(formats) != 1:
        raise SampleError(f"expected exactly one image field of {IMAGE_EXTENSIONS}, found {formats}",
                          source=source, key=key, field="image")
    if "json" not in record:
        raise SampleError("missing", source=source, key=key, field="json")
    try:
        meta = json.loads(record["json"])
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise SampleError(f"not valid JSON: {err}", source=source, key=key, field="json") from err
    image = record[formats[0]]
    size = None
    if check_image:
        try:
            size = checked_image_size(image)
        except Exception as err:
            raise SampleError(f"image does not decode: {err}", source=source, key=key,
                              field=formats[0]) from err
    validate_meta(meta, key=key, source=source, image_size=size)
    info = meta["image"]
    queries = [Query(phrase=q["phrase"], exhaustive=q.get("exhaustive", True),
                     instances=[Instance(rle=i["rle"], bbox=list(i["bbox"])) for i in q["instances"]])
               for q in meta["queries"]]
    return Sample(key=key, image=image, image_format=formats[0], width=info["width"], height=info["height"],
                  queries=queries, image_id=info.get("id"), source=info.get("source", ""),
                  teacher=record.get(TEACHER_FIELD), file_name=info.get("file_name"))
