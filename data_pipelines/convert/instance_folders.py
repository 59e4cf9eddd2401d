"""Images plus one binary mask file per instance -> shards (one sample per image).

Each image has a folder of masks, one file per object; overlapping objects are fine. The folder
is ``<masks>/<instance dir>`` with the template ``instance_dir`` filled from the image's path
relative to ``images`` (``{parent}``: its sub-folder, ``{stem}``: its name without extension)::

    images/row3/img001.jpg   masks/row3/img001/0001.png, 0002.png, ...      (default "{parent}/{stem}")
    train/<id>/images/<id>.png   train/<id>/masks/*.png                      (Kaggle DSB-2018 style:
        --images train --image-glob "*/images/*.png" --masks train --instance-dir "{parent}/../masks")

A mask's pixels with a value >= ``threshold`` (default: any non-zero value) are the object; a mask
holding more than two values (anti-aliased or re-compressed) needs an explicit ``threshold``, and
JPEG masks are refused (compression moves object edges). An object's phrase is ``phrase`` for
all, or its class name: the sub-folder holding the mask (``class_from="folder"``:
``img001/apple/0001.png``) or the mask's name without its trailing instance number
(``class_from="name"``: ``apple_0001.png``, ``apple-2.png``, ``apple3.png``), turned into a phrase
by ``classes`` (JSON ``{"class name": "phrase" | null}``; null leaves a class out) or normalised as
is. The folders annotate every object, so every phrase of the vocabulary absent from an image is a
negative query and all queries are exhaustive. An image without a mask folder is skipped and
counted (make an empty folder for an image without objects).
"""

from __future__ import annotations

import argparse
import re
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image

from data_pipelines.convert.bands import BandSelection, add_band_arguments, band_selection_from_args
from data_pipelines.convert.common import (
    Converter,
    DropAnnotation,
    InputError,
    SkipItem,
    instance_from_crop,
    load_json,
    read_image,
    sample_key,
    write_shards,
)
from data_pipelines.convert.mask_folder import IMAGE_SUFFIXES
from data_pipelines.schema import Instance, Query, Sample, normalize_phrase
from data_pipelines.writer import add_sink_arguments

MASK_SUFFIXES = (".png", ".tif", ".tiff", ".bmp", ".gif", ".jpg", ".jpeg")  # JPEG only to refuse it
ClassFrom = Literal["folder", "name"]
_INSTANCE_NUMBER = re.compile(r"[\s_-]*\d+$")


class InstanceFoldersConverter(Converter):
    """Images + a folder of binary masks per image (one file per instance) -> one sample per image.

    Args:
        images: folder of images, searched recursively.
        masks: root of the mask folders (default: the image folder).
        instance_dir: mask folder of an image relative to ``masks``; ``{parent}`` and ``{stem}``
            are the image's sub-folder and file name without extension.
        image_glob: glob (relative to ``images``) selecting the image files.
        phrase: the phrase of every instance.
        class_from: take each instance's class from its sub-folder (``folder``) or from its file
            name without the trailing instance number (``name``).
        classes: JSON file mapping class names to phrases (null leaves a class out); default: the
            class names, normalised, all of them.
        threshold: pixel values >= this are the object (default: any non-zero value, and masks
            must be binary).
        min_area: masks with fewer pixels are not objects (dropped and counted).
        source: dataset label written into every sample (default ``instances:<image folder name>``).
        bands: multi-band images: which bands become RGB and how they are stretched.
    """

    def __init__(self, images: str | Path, *, masks: str | Path | None = None,
                 instance_dir: str = "{parent}/{stem}", image_glob: str = "**/*", phrase: str | None = None,
                 class_from: ClassFrom | None = None, classes: str | Path | None = None,
                 threshold: int | None = None, min_area: int = 0, source: str | None = None,
                 bands: BandSelection | None = None) -> None:
        self.images_dir = Path(images)
        self.masks_dir = Path(masks) if masks else self.images_dir
        for name, folder in (("image", self.images_dir), ("mask", self.masks_dir)):
            if not folder.is_dir():
                raise InputError(f"{name} folder {folder} does not exist")
        if (phrase is None) == (class_from is None):
            raise InputError("give --phrase (one phrase for every instance) or --class-from folder|name")
        if class_from not in (None, "folder", "name"):
            raise InputError(f"class_from must be folder or name, got {class_from!r}")
        if classes is not None and class_from is None:
            raise InputError("--classes maps class names from --class-from; with --phrase it has no use")
        if threshold is not None and threshold < 1:
            raise InputError(f"threshold must be >= 1, got {threshold}")
        try:
            instance_dir.format(parent="p", stem="s")
        except (KeyError, IndexError, ValueError) as err:
            raise InputError(f"--instance-dir {instance_dir!r} may only use {{parent}} and {{stem}}: {err}") \
                from None
        self.instance_dir, self.image_glob = instance_dir, image_glob
        self.class_from, self.threshold, self.min_area, self.bands = class_from, threshold, min_area, bands
        self.source = source or f"instances:{self.images_dir.resolve().name}"
        self.single_phrase = normalize_phrase(phrase) if phrase is not None else None
        if phrase is not None and not self.single_phrase:
            raise InputError(f"--phrase {phrase!r} is empty after normalisation")
        self.classes_path = classes
        self.class_map = self._load_classes(classes) if classes else None
        self.files = self._find_images()
        self.vocabulary = self._vocabulary()

    # ------------------------------------------------------------------ set-up
    def _load_classes(self, path: str | Path) -> dict[str, str | None]:
        table = load_json(path, "classes")
        if not isinstance(table, dict) or not table:
            raise InputError(f"classes file {path} must hold a non-empty object: "
                             "class name -> phrase or null")
        out: dict[str, str | None] = {}
        for name, value in table.items():
            if value is not None and (not isinstance(value, str) or not normalize_phrase(value)):
                raise InputError(f"classes file {path}: {name!r} must map to a phrase or null, got {value!r}")
            out[name] = normalize_phrase(value) if value is not None else None
        return out

    def _find_images(self) -> list[Path]:
        masks, images = self.masks_dir.resolve(), self.images_dir.resolve()
        if self.image_glob == "**/*" and (masks == images or masks.is_relative_to(images)):
            raise InputError(f"mask folders live under the image folder {self.images_dir}: give --image-glob "
                             "so that masks are not taken for images (e.g. '*/images/*.png')")
        files = sorted(p.relative_to(self.images_dir) for p in self.images_dir.glob(self.image_glob)
                       if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not files:
            raise InputError(f"no images ({', '.join(IMAGE_SUFFIXES)}) match {self.image_glob!r} under "
                             f"{self.images_dir}")
        return files

    def _vocabulary(self) -> list[str]:
        if self.single_phrase is not None:
            return [self.single_phrase]
        if self.class_map is not None:
            return list(dict.fromkeys(p for p in self.class_map.values() if p is not None))
        names = {self._class_name(mask) for rel in self.files
                 if (folder := self._instance_folder(rel)).is_dir() for mask in self._mask_files(folder)}
        return sorted({normalize_phrase(n) for n in names} - {""})

    # ------------------------------------------------------------------ converting
    def __len__(self) -> int:
        return len(self.files)

    def key(self, index: int) -> str:
        return sample_key(self.source, self.files[index].with_suffix("").as_posix())

    def _instance_folder(self, rel: Path) -> Path:
        relative = self.instance_dir.format(parent=rel.parent.as_posix(), stem=rel.stem)
        return self.masks_dir.joinpath(*(part for part in relative.split("/") if part not in ("", ".")))

    def _mask_files(self, folder: Path) -> list[Path]:
        pattern = "*/*" if self.class_from == "folder" else "*"
        return sorted(p for p in folder.glob(pattern) if p.suffix.lower() in MASK_SUFFIXES and p.is_file())

    def _class_name(self, mask: Path) -> str:
        if self.class_from == "folder":
            return mask.parent.name
        return _INSTANCE_NUMBER.sub("", mask.stem)

    def _phrase_of(self, class_name: str) -> str | None:
        if self.single_phrase is not None:
            return self.single_phrase
        if self.class_map is None:
            return normalize_phrase(class_name) or None
        if class_name not in self.class_map:
            raise DropAnnotation(f"class {class_name!r} not in classes")
        phrase = self.class_map[class_name]
        if phrase is None:
            raise DropAnnotation(f"class {class_name!r} left out by classes")
        return phrase

    def convert(self, index: int) -> Sample:
        rel = self.files[index]
        image_path = self.images_dir / rel
        data, image_format, width, height = (self.bands.read_image if self.bands else read_image)(image_path)
        folder = self._instance_folder(rel)
        if not folder.is_dir():
            raise SkipItem("missing instance folder", f"no folder {folder} for image {image_path}")
        found: dict[str, list[Instance]] = defaultdict(list)
        dropped: Counter = Counter()
        for mask_path in self._mask_files(folder):
            try:
                phrase = self._phrase_of(self._class_name(mask_path))
                if phrase is None:
                    raise DropAnnotation("class name is empty")
                found[phrase].append(self._instance(mask_path, image_path, width, height))
            except DropAnnotation as drop:
                dropped[drop.reason] += 1
        queries = [Query(p, found.get(p, []), exhaustive=True) for p in self.vocabulary]
        return Sample(key=self.key(index), image=data, image_format=image_format, width=width, height=height,
                      queries=queries, image_id=rel.with_suffix("").as_posix(), source=self.source,
                      file_name=rel.as_posix(), origin=f"{image_path} (masks {folder})", dropped=dict(dropped))

    def _instance(self, path: Path, image_path: Path, width: int, height: int) -> Instance:
        pixels = self._load_mask(path, image_path, (width, height))
        foreground = pixels > 0 if self.threshold is None else pixels >= self.threshold
        rows, cols = np.flatnonzero(foreground.any(1)), np.flatnonzero(foreground.any(0))
        if rows.size == 0:
            raise DropAnnotation("empty mask")
        box = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
        crop = foreground[box]
        if self.threshold is None and np.unique(pixels[box]).size > 2:  # the box holds every non-zero value
            raise DropAnnotation("mask is not binary (give --threshold)")
        if crop.sum() < self.min_area:
            raise DropAnnotation("mask smaller than min_area")
        return instance_from_crop(crop, int(rows[0]), int(cols[0]), height, width)

    def _load_mask(self, path: Path, image_path: Path, size: tuple[int, int]) -> np.ndarray:
        try:
            with Image.open(path) as mask:
                if mask.format == "JPEG":
                    raise SkipItem("lossy mask", f"{path} is a JPEG: compression moves object edges; "
                                                 "export masks as PNG")
                if mask.size != size:
                    raise SkipItem("mask size differs from image",
                                   f"{path} is {mask.size[0]}x{mask.size[1]}, "
                                   f"image {image_path} is {size[0]}x{size[1]}")
                if mask.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
                    return np.asarray(mask)
                return np.asarray(mask.convert("L"))
        except (OSError, SyntaxError, ValueError) as err:
            raise SkipItem("unreadable mask", f"{path}: {err}") from err

    def manifest_extra(self) -> dict[str, Any]:
        return {"converter": "instance-folders", "images": str(self.images_dir), "masks": str(self.masks_dir),
                "instance_dir": self.instance_dir, "class_from": self.class_from,
                "classes": str(self.classes_path) if self.classes_path else None,
                "threshold": self.threshold, "min_area": self.min_area, "vocabulary": self.vocabulary,
                "bands": self.bands.to_json() if self.bands else None}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--images", required=True, help="folder of images (searched recursively)")
    parser.add_argument("--masks", help="root of the per-image mask folders (default: --images)")
    parser.add_argument("--instance-dir", default="{parent}/{stem}",
                        help="an image's mask folder relative to --masks, from the image's {parent} "
                             "sub-folder and file {stem} (default: {parent}/{stem})")
    parser.add_argument("--image-glob", default="**/*",
                        help="glob selecting the images under --images (default: all image files)")
    parser.add_argument("--phrase", help="one phrase for every instance")
    parser.add_argument("--class-from", choices=("folder", "name"),
                        help="class of an instance: its mask's sub-folder, or its mask's file name without "
                             "the trailing instance number")
    parser.add_argument("--classes", help="JSON: class name -> phrase (null leaves the class out)")
    parser.add_argument("--threshold", type=int,
                        help="pixel values >= this are the object (default: non-zero; masks must be binary)")
    parser.add_argument("--min-area", type=int, default=0,
                        help="masks with fewer pixels are not objects (dropped and counted)")
    parser.add_argument("--source", help="dataset label stored in every sample "
                                         "(default: instances:<image folder name>)")
    add_band_arguments(parser)
    add_sink_arguments(parser)


def run(args: argparse.Namespace) -> int:
    converter = InstanceFoldersConverter(
        args.images, masks=args.masks, instance_dir=args.instance_dir, image_glob=args.image_glob,
        phrase=args.phrase, class_from=args.class_from, classes=args.classes, threshold=args.threshold,
        min_area=args.min_area, source=args.source, bands=band_selection_from_args(args))
    return write_shards(args, converter)
