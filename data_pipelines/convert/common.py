"""What every converter shares: input errors, image reading, annotation geometry, the write loop.

A converter turns one source item (an image and its annotations) into a :class:`Sample`. Item-level
problems raise :class:`SkipItem` (the item becomes a counted :class:`Skip`); annotation-level problems
raise :class:`DropAnnotation` (the annotation is left out and counted in ``Sample.dropped``).
"""

from __future__ import annotations

import io
import json
import math
import os
import re
from abc import ABC, abstractmethod
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from data_pipelines.schema import Instance, Sample, checked_rle, image_format_of
from data_pipelines.writer import Skip, sink_from_args

# PIL modes that convert to RGB without losing meaning (16-bit or float images need a decision)
RGB_CONVERTIBLE_MODES = {"1", "L", "LA", "P", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr"}
"""PIL modes that convert to 8-bit RGB without a choice to make (not 16-bit or float images)."""


class InputError(ValueError):
    """An input file or option is unusable; the message names the file and the field."""


class SkipItem(Exception):
    """A source item cannot become a sample; ``reason`` is counted, ``detail`` names the files."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason, self.detail = reason, detail


class DropAnnotation(Exception):
    """One annotation cannot become an instance; counted by ``reason``."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


# ----------------------------------------------------------------------------------------------
# inputs
# ----------------------------------------------------------------------------------------------
def load_json(path: str | os.PathLike, what: str) -> Any:
    """Read a JSON file, with an error that says which file and what it should have been."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{what} file {path} does not exist")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise InputError(f"{what} file {path} is not valid JSON: {err}") from err


def require_list(data: Any, name: str, path: str | os.PathLike) -> list[Any]:
    """``data[name]`` as a list, or an :class:`InputError` naming the file and the field."""
    value = data.get(name) if isinstance(data, dict) else None
    if not isinstance(value, list):
        raise InputError(f"{path}: field '{name}' is missing or not a list")
    return value


def sample_key(source: str, item_id: Any) -> str:
    """Stable, tar-safe sample key from a dataset label and an item id ('coco:val2017', 139 -> ...)."""
    return re.sub(r"[^A-Za-z0-9_-]+", "_", f"{source}_{item_id}").strip("_")


def source_label(kind: str, path: str | os.PathLike, strip_prefixes: tuple[str, ...] = ()) -> str:
    """Default dataset label ``kind:name`` from an annotation file (``instances_val2017`` -> ``val2017``)."""
    name = Path(path).stem
    for prefix in strip_prefixes:
        if name.startswith(prefix) and len(name) > len(prefix):
            name = name[len(prefix):]
            break
    return f"{kind}:{name}"


def read_image(path: Path) -> tuple[bytes, str, int, int]:
    """``(bytes, format, width, height)`` of an image file; raises :class:`SkipItem`.

    JPEG, PNG and WebP bytes are kept as they are. Other formats PIL reads (TIFF, BMP, ...) are
    re-encoded as lossless PNG if they convert to RGB without a choice to make; 16-bit or float
    images are refused (convert them to 8 bits first, the choice of range is yours to make).
    """
    if not path.is_file():
        raise SkipItem("missing image file", str(path))
    data = path.read_bytes()
    try:
        with Image.open(io.BytesIO(data)) as img:
            width, height = img.size
            try:
                return data, image_format_of(data), width, height
            except ValueError:
                if img.mode not in RGB_CONVERTIBLE_MODES:
                    raise SkipItem("unsupported image mode",
                                   f"{path} has PIL mode {img.mode}; convert it to 8-bit RGB first") from None
                buf = io.BytesIO()
                img.convert("RGB").save(buf, format="PNG")
                return buf.getvalue(), "png", width, height
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:  # what PIL raises
        raise SkipItem("unreadable image", f"{path}: {err}") from err


# ----------------------------------------------------------------------------------------------
# geometry
# ----------------------------------------------------------------------------------------------
def instance_from_segmentation(segmentation: Any, height: int, width: int) -> Instance:
    """COCO ``segmentation`` (polygons, uncompressed or compressed RLE) -> :class:`Instance`.

    Polygons may be one flat ``[x1, y1, x2, y2, ...]`` list or a list of such lists (parts are
    merged into one mask); parts with fewer than 3 points have no area and are ignored. The box is
    computed from the mask (annotation files' boxes often disagree with their masks).

    Raises:
        DropAnnotation: no or malformed segmentation, polygons with fewer than 3 points, an RLE of
            another size than the image or whose runs do not cover it, or an empty mask.
    """
    if isinstance(segmentation, dict):
        rle = _rle_from_dict(segmentation, height, width)
    elif isinstance(segmentation, list) and segmentation:
        rle = _rle_from_polygons(segmentation, height, width)
    elif segmentation in (None, [], {}):
        raise DropAnnotation("no segmentation")
    else:
        raise DropAnnotation("malformed segmentation")
    if mask_utils.area(rle) == 0:
        raise DropAnnotation("zero-area mask")
    return Instance(rle={"size": [height, width], "counts": rle["counts"].decode("ascii")},
                    bbox=[float(v) for v in mask_utils.toBbox(rle)])


def instance_from_crop(crop: np.ndarray, top: int, left: int, height: int, width: int) -> Instance:
    """Instance of a ``height x width`` mask that is empty outside ``crop`` (placed at ``top, left``).

    The column-major RLE is built from the crop alone, so the cost follows the object's box rather
    than the image: hundreds of instances on a 12-megapixel mask stay cheap. The result is the
    same string ``pycocotools.mask.encode`` gives for the full mask.
    """
    h, w = crop.shape
    padded = np.zeros((h + 2, w), np.int8)  # a zero row above and below: runs never cross columns
    padded[1:-1] = crop
    edges = np.flatnonzero(np.diff(padded.ravel(order="F"))) + 1  # run starts and ends alternate
    column, row = np.divmod(edges, h + 2)
    edges = (left + column) * height + top + row - 1
    # a run ending at the bottom of one column and one starting at the top of the next are one run
    touching = np.flatnonzero(edges[1:-1:2] == edges[2::2])
    edges = np.delete(edges, np.concatenate([2 * touching + 1, 2 * touching + 2]))
    counts = np.diff(np.concatenate([[0], edges, [height * width]]))
    if counts.size > 1 and counts[-1] == 0:
        counts = counts[:-1]
    rle = mask_utils.frPyObjects({"size": [height, width], "counts": counts.tolist()}, height, width)
    return Instance(rle={"size": [height, width], "counts": rle["counts"].decode("ascii")},
                    bbox=[float(v) for v in mask_utils.toBbox(rle)])


def _rle_from_dict(segmentation: dict[str, Any], height: int, width: int) -> dict[str, Any]:
    size, counts = segmentation.get("size"), segmentation.get("counts")
    if not isinstance(size, list | tuple) or len(size) != 2 or not isinstance(counts, str | bytes | list):
        raise DropAnnotation("malformed RLE")
    if not all(_is_number(s) and float(s).is_integer() for s in size):
        raise DropAnnotation("malformed RLE")
    if [int(s) for s in size] != [height, width]:
        raise DropAnnotation("RLE size differs from the image size")
    if isinstance(counts, list) and not all(isinstance(c, int) for c in counts):
        raise DropAnnotation("malformed RLE")
    try:
        return checked_rle({"size": [height, width], "counts": counts})
    except (ValueError, UnicodeEncodeError):
        raise DropAnnotation("undecodable RLE") from None


def _rle_from_polygons(segmentation: list[Any], height: int, width: int) -> dict[str, Any]:
    parts = [segmentation] if all(_is_number(v) for v in segmentation) else segmentation
    polygons = []
    for part in parts:
        numbers = isinstance(part, list) and all(_is_number(v) and math.isfinite(v) for v in part)
        if not numbers or len(part) % 2:
            raise DropAnnotation("malformed polygon")
        if len(part) >= 6:
            polygons.append([float(v) for v in part])
    if not polygons:
        raise DropAnnotation("polygon with fewer than 3 points")
    return mask_utils.merge(mask_utils.frPyObjects(polygons, height, width))


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


# ----------------------------------------------------------------------------------------------
# converters and the write loop
# ----------------------------------------------------------------------------------------------
class Converter(ABC):
    """A deterministic sequence of source items, each converted on demand into a Sample or a Skip."""

    @abstractmethod
    def __len__(self) -> int:
        """Number of source items."""

    @abstractmethod
    def key(self, index: int) -> str:
        """Sample key of item ``index`` (cheap: no file is read)."""

    @abstractmethod
    def convert(self, index: int) -> Sample:
        """Item ``index`` as a sample; raises :class:`SkipItem` when it cannot be one."""

    def manifest_extra(self) -> dict[str, Any]:
        """Facts about the conversion recorded in the manifest's ``extra``."""
        return {}

    def notes(self) -> list[str]:
        """Lines printed after the summary about what the conversion left out of the input file."""
        return []

    def items(self, start: int = 0) -> Iterator[Sample | Skip]:
        """Items ``start, start + 1, ...`` in a fixed order; the first ``start`` are not read at all."""
        for index in range(start, len(self)):
            try:
                yield self.convert(index)
            except SkipItem as skip:
                yield Skip(self.key(index), skip.reason, skip.detail)


def write_shards(args: Any, converter: Converter, *, clips: bool = False) -> int:
    """Write ``converter``'s samples (or, with ``clips``, its :class:`~data_pipelines.video.Clip` items) with
    the sink options in ``args``; print the summary."""
    sink_class = None
    if clips:
        from data_pipelines.video import ClipSink as sink_class  # only the video converters need it

    with sink_from_args(args, total=len(converter), extra=converter.manifest_extra(),
                        command=args.command_line, sink_class=sink_class) as sink:
        for item in converter.items(start=sink.start_index):
            sink.add(item)
    print(sink.summary())
    for note in converter.notes():
        print(note)
    return 0
