"""Images plus PNG masks (the way most agriculture datasets ship) -> shards.

Images are found recursively under ``images``; each pairs with the mask of the same relative path
and stem: ``<masks>/<sub/dir>/<stem><mask_suffix>.png``. Two kinds of masks:

* ``semantic``: a pixel's value is its class; ``classes`` maps values to phrases. Each class present
  becomes one instance covering the whole class region (``instances="class"``) or one instance per
  connected component (``instances="connected-components"``). Values may be colours
  (``"#ff0000"`` or ``"255,0,0"``) for RGB masks.
* ``instance``: a pixel's value is an instance id (8- or 16-bit, 0 = background). The phrase of an
  instance comes from ``phrase`` (one phrase for all), or ``classes`` keyed by instance id, or by a
  class value read from a second mask (``class_masks``: the most frequent class under the
  instance) or from a per-image JSON file (``class_json``: ``{"instance id": class value}``).

Masks annotate every object of every class, so each phrase of the vocabulary absent from an image
is a negative query, and all queries are exhaustive. Regions smaller than ``min_area`` pixels are
not objects: they are dropped and counted (a class with only such regions counts as absent).
Values that are neither background, ignored nor in ``classes`` are counted per image.

JPEG masks are refused: compression changes label values along every edge (a red/green border
turns into browns no class names). Export PNG masks; where only JPEG colour labels exist,
``colour_tolerance`` (semantic mode) assigns each pixel the class, background or ignore value
nearest to it within that many levels per channel, and counts the pixels matching none. The
tolerance must be under half the distance between any two values of the palette, so a pixel is
never close to two of them.
"""

from __future__ import annotations

import argparse
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image
from scipy import ndimage

from data_pipelines.convert.bands import BandSelection, add_band_arguments, band_selection_from_args
from data_pipelines.convert.common import (
    Converter,
    InputError,
    SkipItem,
    instance_from_crop,
    load_json,
    read_image,
    sample_key,
    write_shards,
)
from data_pipelines.schema import Instance, Query, Sample, normalize_phrase
from data_pipelines.writer import add_sink_arguments

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".tif", ".tiff", ".bmp")
MaskMode = Literal["semantic", "instance"]
InstanceSplit = Literal["class", "connected-components"]
UNMATCHED = -1  # label of pixels that match no palette value within the colour tolerance


def parse_mask_value(text: Any) -> tuple[int, bool]:
    """``(value, is_colour)`` from ``7``, ``"7"``, ``"#ff0000"`` or ``"255,0,0"`` (colours as 0xRRGGBB)."""
    text = str(text).strip()
    try:
        if text.startswith("#") and len(text) == 7:
            return int(text[1:], 16), True
        if "," in text:
            r, g, b = (int(part) for part in text.split(","))
            if not all(0 <= c <= 255 for c in (r, g, b)):
                raise ValueError
            return (r << 16) | (g << 8) | b, True
        return int(text), False
    except ValueError:
        raise InputError(f"mask value {text!r} is not an integer, '#rrggbb' or 'r,g,b'") from None


def _format_value(value: int, colour: bool) -> str:
    return f"#{value:06x}" if colour else str(value)


def _value_distance(label: np.ndarray, value: int, colour: bool) -> np.ndarray:
    """Per pixel, the largest per-channel difference to ``value`` (colours packed as 0xRRGGBB)."""
    if not colour:
        return np.abs(label - value)
    return np.maximum.reduce([np.abs(((label >> shift) & 255) - ((value >> shift) & 255))
                              for shift in (16, 8, 0)])


class MaskFolderConverter(Converter):
    """Images + semantic or instance-id masks -> one sample per image with one query per phrase.

    Args:
        images: folder of images, searched recursively.
        mode: ``semantic`` (pixel value = class) or ``instance`` (pixel value = instance id).
        masks: folder of masks mirroring the image sub-folders (default: the image folder).
        mask_suffix: mask file name = image stem + this suffix + ``mask_ext``.
        mask_ext: mask file extension.
        classes: JSON file mapping mask values (semantic), instance ids, or the class values of
            ``class_masks``/``class_json`` (instance) to phrases.
        phrase: instance mode: the phrase of every instance.
        background: values that are background.
        ignore: values that are neither background nor any class (e.g. 255 on object borders).
        instances: semantic mode: one instance per ``class`` region or per connected component.
        min_area: regions smaller than this many pixels are not objects (dropped and counted).
        connectivity: 4 or 8, for connected components.
        class_masks: instance mode: folder of class masks giving each instance's class.
        class_json: instance mode: folder of per-image JSON files ``{"instance id": class value}``.
        class_suffix: file name suffix of class masks / class JSON files (after the image stem).
        source: dataset label written into every sample (default ``masks:<image folder name>``).
        colour_tolerance: semantic mode: snap each mask pixel to the nearest class, background or
            ignore value within this many levels per channel (for JPEG labels, which are refused
            without it).
        bands: multi-band images: which bands become RGB and how they are stretched.
    """

    def __init__(self, images: str | Path, *, mode: MaskMode, masks: str | Path | None = None,
                 mask_suffix: str = "", mask_ext: str = ".png", classes: str | Path | None = None,
                 phrase: str | None = None, background: tuple[Any, ...] = (0,), ignore: tuple[Any, ...] = (),
                 instances: InstanceSplit = "class", min_area: int = 0, connectivity: int = 8,
                 class_masks: str | Path | None = None, class_json: str | Path | None = None,
                 class_suffix: str = "", source: str | None = None, colour_tolerance: int | None = None,
                 bands: BandSelection | None = None) -> None:
        self.images_dir = Path(images)
        self.masks_dir = Path(masks) if masks else self.images_dir
        for name, folder in (("image", self.images_dir), ("mask", self.masks_dir),
                             ("class mask", class_masks), ("class JSON", class_json)):
            if folder is not None and not Path(folder).is_dir():
                raise InputError(f"{name} folder {folder} does not exist")
        if mode not in ("semantic", "instance"):
            raise InputError(f"mode must be semantic or instance, got {mode!r}")
        if instances not in ("class", "connected-components"):
            raise InputError(f"instances must be class or connected-components, got {instances!r}")
        if connectivity not in (4, 8):
            raise InputError(f"connectivity must be 4 or 8, got {connectivity}")
        self.mode, self.instances, self.min_area = mode, instances, min_area
        self.mask_suffix = mask_suffix
        self.mask_ext = mask_ext if mask_ext.startswith(".") else f".{mask_ext}"
        self.class_masks_dir = Path(class_masks) if class_masks else None
        self.class_json_dir = Path(class_json) if class_json else None
        self.class_suffix = class_suffix
        self.structure = ndimage.generate_binary_structure(2, 1 if connectivity == 4 else 2)
        self.source = source or f"masks:{self.images_dir.resolve().name}"
        self.classes_path = classes
        self.single_phrase = normalize_phrase(phrase) if phrase is not None else None
        self.classes, self.colour = self._load_classes(classes, phrase)
        self.background = {parse_mask_value(v)[0] for v in background}
        self.ignore = {parse_mask_value(v)[0] for v in ignore}
        self.vocabulary = list(dict.fromkeys(self.classes.values())) if self.classes else [self.single_phrase]
        self.colour_tolerance, self.bands = colour_tolerance, bands
        if colour_tolerance is not None:
            self._check_tolerance(colour_tolerance)
        self.files = self._find_images()

    # ------------------------------------------------------------------ set-up
    def _load_classes(self, classes: str | Path | None, phrase: str | None) -> tuple[dict[int, str], bool]:
        """``(mask value -> phrase, whether values are colours)``, after checking the option combination."""
        if self.mode == "semantic" and (classes is None or phrase is not None):
            raise InputError("semantic masks need --classes (mask value -> phrase) and no --phrase")
        if self.mode == "instance" and (classes is None) == (phrase is None):
            raise InputError("instance masks need either --phrase (one phrase for all) or --classes")
        if self.mode == "instance" and phrase is not None and (self.class_masks_dir or self.class_json_dir):
            raise InputError("--class-masks/--class-json need --classes, not --phrase")
        if self.class_masks_dir and self.class_json_dir:
            raise InputError("give --class-masks or --class-json, not both")
        if phrase is not None:
            if not self.single_phrase:
                raise InputError(f"--phrase {phrase!r} is empty after normalisation")
            return {}, False
        table = load_json(classes, "classes")
        if not isinstance(table, dict) or not table:
            raise InputError(f"classes file {classes} must hold a non-empty object: mask value -> phrase")
        parsed: dict[int, str] = {}
        colours = set()
        for key, value in table.items():
            number, colour = parse_mask_value(key)
            colours.add(colour)
            if not isinstance(value, str) or not normalize_phrase(value):
                raise InputError(f"classes file {classes}: value {key!r} must map to a non-empty phrase, "
                                 f"got {value!r}")
            parsed[number] = normalize_phrase(value)
        if len(colours) > 1:
            raise InputError(f"classes file {classes} mixes colour and integer values")
        if colours == {True} and self.mode == "instance" and not self.class_masks_dir:
            raise InputError(f"classes file {classes}: colour values only work with semantic or class masks")
        return parsed, colours == {True}

    def _check_tolerance(self, tolerance: int) -> None:
        if self.mode != "semantic" or tolerance < 0:
            raise InputError(f"--colour-tolerance is for semantic masks and must be >= 0, got {tolerance} "
                             f"with --mode {self.mode}")
        palette = sorted(self.classes.keys() | self.background | self.ignore)
        for i, a in enumerate(palette):
            for b in palette[i + 1:]:
                if 2 * tolerance >= _value_distance(np.array(a), b, self.colour):
                    raise InputError(
                        f"--colour-tolerance {tolerance} is too large: palette values "
                        f"{_format_value(a, self.colour)} and {_format_value(b, self.colour)} are only "
                        f"{int(_value_distance(np.array(a), b, self.colour))} apart "
                        "(need tolerance < half that)")

    def _snap_to_palette(self, label: np.ndarray) -> np.ndarray:
        """Each pixel -> the palette value within the tolerance (at most one is), else UNMATCHED."""
        snapped = np.full(label.shape, UNMATCHED, np.int64)
        for value in self.classes.keys() | self.background | self.ignore:
            snapped[_value_distance(label, value, self.colour) <= self.colour_tolerance] = value
        return snapped

    def _find_images(self) -> list[Path]:
        annotation_dirs = [(d, s) for d, s in ((self.masks_dir, self.mask_suffix),
                                                (self.class_masks_dir, self.class_suffix),
                                                (self.class_json_dir, self.class_suffix)) if d is not None]
        for folder, suffix in annotation_dirs:
            if folder.resolve() == self.images_dir.resolve() and not suffix:
                raise InputError(f"masks live in the image folder {folder}: give a suffix (--mask-suffix/"
                                 "--class-suffix) so they can be told apart from the images")
        files = []
        for path in sorted(self.images_dir.rglob("*")):
            if path.suffix.lower() not in IMAGE_SUFFIXES or not path.is_file():
                continue
            if any(self._is_annotation_file(path, folder, suffix) for folder, suffix in annotation_dirs):
                continue
            files.append(path.relative_to(self.images_dir))
        if not files:
            raise InputError(f"no images ({', '.join(IMAGE_SUFFIXES)}) found under {self.images_dir}")
        return files

    def _is_annotation_file(self, path: Path, folder: Path, suffix: str) -> bool:
        folder, images = folder.resolve(), self.images_dir.resolve()
        if folder == images:
            return bool(suffix) and path.stem.endswith(suffix)
        return folder.is_relative_to(images) and path.resolve().is_relative_to(folder)

    # ------------------------------------------------------------------ converting
    def __len__(self) -> int:
        return len(self.files)

    def key(self, index: int) -> str:
        return sample_key(self.source, self.files[index].with_suffix("").as_posix())

    def _companion(self, folder: Path, rel: Path, suffix: str, ext: str) -> Path:
        return folder / rel.parent / f"{rel.stem}{suffix}{ext}"

    def _load_mask(self, path: Path, image_path: Path, size: tuple[int, int], colour: bool) -> np.ndarray:
        if not path.is_file():
            raise SkipItem("missing mask", f"no {path} for image {image_path}")
        try:
            with Image.open(path) as mask:
                if mask.format == "JPEG" and self.colour_tolerance is None:
                    raise SkipItem("lossy mask", f"{path} is a JPEG: compression changes label values at "
                                                 "object edges; export PNG masks, or give --colour-tolerance "
                                                 "for semantic colour labels")
                if mask.size != size:
                    raise SkipItem("mask size differs from image",
                                   f"{path} is {mask.size[0]}x{mask.size[1]}, "
                                   f"image {image_path} is {size[0]}x{size[1]}")
                if colour:
                    rgb = np.asarray(mask.convert("RGB")).astype(np.int64)
                    return (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]
                if mask.mode not in ("1", "L", "P", "I", "I;16", "I;16B", "I;16L"):
                    raise SkipItem("mask is not single-channel",
                                   f"{path} has PIL mode {mask.mode}; "
                                   "give colour classes as '#rrggbb' for RGB masks")
                return np.asarray(mask).astype(np.int64)
        except (OSError, SyntaxError, ValueError) as err:
            raise SkipItem("unreadable mask", f"{path}: {err}") from err

    def convert(self, index: int) -> Sample:
        rel = self.files[index]
        image_path = self.images_dir / rel
        data, image_format, width, height = (self.bands.read_image if self.bands else read_image)(image_path)
        mask_path = self._companion(self.masks_dir, rel, self.mask_suffix, self.mask_ext)
        colour = self.colour and self.mode == "semantic"  # instance ids are never colours
        label = self._load_mask(mask_path, image_path, (width, height), colour)
        if self.colour_tolerance is not None:
            label = self._snap_to_palette(label)
        dropped: Counter = Counter()
        if self.mode == "semantic":
            found = self._semantic_instances(label, dropped)
        else:
            phrases = self._instance_phrases(rel, image_path, label)
            found = self._id_instances(label, phrases, dropped)
        queries = [Query(p, found.get(p, []), exhaustive=True) for p in self.vocabulary]
        return Sample(key=self.key(index), image=data, image_format=image_format, width=width, height=height,
                      queries=queries, image_id=rel.with_suffix("").as_posix(), source=self.source,
                      file_name=rel.as_posix(), origin=f"{image_path} (mask {mask_path})", dropped=dict(dropped))

    def _semantic_instances(self, label: np.ndarray, dropped: Counter) -> dict[str, list[Instance]]:
        values = set(np.unique(label).tolist())
        for value in sorted(values - self.classes.keys() - self.background - self.ignore):
            if value == UNMATCHED:
                dropped["mask pixels matching no class within --colour-tolerance"] += 1
            else:
                dropped[f"mask value {_format_value(value, self.colour)} not in classes"] += 1
        values_of: dict[str, list[int]] = defaultdict(list)
        for value, phrase in self.classes.items():
            if value in values:
                values_of[phrase].append(value)
        found: dict[str, list[Instance]] = {}
        for phrase, phrase_values in values_of.items():
            region = np.isin(label, phrase_values)
            if self.instances == "class":
                regions, count = region.astype(np.int32), 1
            else:
                regions, count = ndimage.label(region, structure=self.structure)
            found[phrase] = self._instances_of(regions, range(1, count + 1), dropped)
        return found

    def _instances_of(self, regions: np.ndarray, ids: Any, dropped: Counter) -> list[Instance]:
        """One instance per id of a non-negative integer label image, dropping small regions."""
        instances = []
        boxes = ndimage.find_objects(regions)
        height, width = regions.shape
        for region_id in ids:
            box = boxes[region_id - 1] if region_id - 1 < len(boxes) else None
            if box is None:
                continue
            crop = regions[box] == region_id
            if crop.sum() < self.min_area:
                dropped["region smaller than min_area"] += 1
            else:
                instances.append(instance_from_crop(crop, box[0].start, box[1].start, height, width))
        return instances

    def _id_instances(self, ids: np.ndarray, phrase_of: dict[int, str | None],
                      dropped: Counter) -> dict[str, list[Instance]]:
        by_phrase: dict[str, list[int]] = defaultdict(list)
        for instance_id, phrase in phrase_of.items():
            if phrase is None:
                dropped["instance without a class in classes"] += 1
            else:
                by_phrase[phrase].append(instance_id)
        return {phrase: self._instances_of(ids, members, dropped) for phrase, members in by_phrase.items()}

    def _instance_phrases(self, rel: Path, image_path: Path, ids: np.ndarray) -> dict[int, str | None]:
        """Phrase (None: unknown) of every instance id in the mask."""
        not_instances = self.background | self.ignore
        instance_ids = [i for i in np.unique(ids).tolist() if i not in not_instances]
        if any(i < 0 for i in instance_ids):
            raise SkipItem("negative instance id", f"{image_path}'s mask holds negative values")
        if self.single_phrase is not None:
            return {i: self.single_phrase for i in instance_ids}
        if self.class_masks_dir is not None:
            path = self._companion(self.class_masks_dir, rel, self.class_suffix, self.mask_ext)
            classes = self._load_mask(path, image_path, (ids.shape[1], ids.shape[0]), self.colour)
            boxes = ndimage.find_objects(ids)
            return {i: self._majority_class(classes[box][ids[box] == i])
                    for i, box in ((i, boxes[i - 1]) for i in instance_ids)}
        if self.class_json_dir is not None:
            path = self._companion(self.class_json_dir, rel, self.class_suffix, ".json")
            if not path.is_file():
                raise SkipItem("missing class file", f"no {path} for image {image_path}")
            table = load_json(path, "instance classes")
            if not isinstance(table, dict):
                raise SkipItem("unreadable class file",
                               f"{path} must hold an object: instance id -> class value")
            return {i: self.classes.get(parse_mask_value(table[str(i)])[0]) if str(i) in table else None
                    for i in instance_ids}
        return {i: self.classes.get(i) for i in instance_ids}

    def _majority_class(self, values: np.ndarray) -> str | None:
        values = values[~np.isin(values, list(self.background | self.ignore))]
        if values.size == 0:
            return None
        candidates, votes = np.unique(values, return_counts=True)
        return self.classes.get(int(candidates[votes.argmax()]))

    def manifest_extra(self) -> dict[str, Any]:
        return {"converter": "mask-folder", "mode": self.mode, "images": str(self.images_dir),
                "masks": str(self.masks_dir),
                "classes": str(self.classes_path) if self.classes_path else None,
                "instances": self.instances if self.mode == "semantic" else "ids", "min_area": self.min_area,
                "background": sorted(self.background), "ignore": sorted(self.ignore),
                "colour_tolerance": self.colour_tolerance, "vocabulary": self.vocabulary,
                "bands": self.bands.to_json() if self.bands else None}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--images", required=True, help="folder of images (searched recursively)")
    parser.add_argument("--mode", required=True, choices=("semantic", "instance"),
                        help="semantic: pixel value = class; instance: pixel value = instance id")
    parser.add_argument("--masks", help="folder of masks mirroring the image sub-folders (default: --images)")
    parser.add_argument("--mask-suffix", default="", help="mask name = image stem + suffix + --mask-ext")
    parser.add_argument("--mask-ext", default=".png", help="mask file extension")
    parser.add_argument("--classes", help="JSON: mask value / instance id / class value -> phrase")
    parser.add_argument("--phrase", help="instance mode: one phrase for every instance")
    parser.add_argument("--background", nargs="*", default=["0"], help="background values (default: 0)")
    parser.add_argument("--ignore", nargs="*", default=[],
                        help="values that are neither background nor a class (e.g. 255)")
    parser.add_argument("--instances", choices=("class", "connected-components"), default="class",
                        help="semantic mode: one instance per class region or per connected component")
    parser.add_argument("--min-area", type=int, default=0,
                        help="regions smaller than this many pixels are not objects (dropped and counted)")
    parser.add_argument("--connectivity", type=int, choices=(4, 8), default=8,
                        help="pixel connectivity of connected components")
    parser.add_argument("--class-masks",
                        help="instance mode: folder of class masks (class = most frequent value under it)")
    parser.add_argument("--class-json",
                        help="instance mode: folder of per-image JSON files {instance id: class value}")
    parser.add_argument("--class-suffix", default="", help="class mask/JSON name = image stem + this suffix")
    parser.add_argument("--source",
                        help="dataset label stored in every sample (default: masks:<image folder name>)")
    parser.add_argument("--colour-tolerance", type=int,
                        help="semantic mode: snap mask pixels to the nearest class/background/ignore value "
                             "within this many levels per channel (needed to read JPEG label images)")
    add_band_arguments(parser)
    add_sink_arguments(parser)


def run(args: argparse.Namespace) -> int:
    converter = MaskFolderConverter(
        args.images, mode=args.mode, masks=args.masks, mask_suffix=args.mask_suffix, mask_ext=args.mask_ext,
        classes=args.classes, phrase=args.phrase, background=tuple(args.background),
        ignore=tuple(args.ignore), instances=args.instances, min_area=args.min_area,
        connectivity=args.connectivity, class_masks=args.class_masks, class_json=args.class_json,
        class_suffix=args.class_suffix, source=args.source, colour_tolerance=args.colour_tolerance,
        bands=band_selection_from_args(args))
    return write_shards(args, converter)
