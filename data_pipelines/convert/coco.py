"""COCO or LVIS instance annotations plus an image folder -> shards (one sample per image).

Each category with annotations on an image becomes a query holding all its instances:

* COCO: every category is exhaustively annotated on every image, so the categories absent from
  an image are negative queries: all of them, or ``negatives_per_image`` of them sampled with a
  seed derived from the image id (the same image always gets the same negatives). Categories no
  annotation in the file uses are left out of the negatives (annotation tools export such
  placeholders, e.g. a dataset-name category 0) unless ``keep_unused_categories`` is set.
* LVIS: only ``neg_category_ids`` are verified negatives and become negative queries; categories in
  ``not_exhaustive_category_ids`` get ``exhaustive: false``; no other negatives are invented.
* A crowd region (``iscrowd: 1``) is not an instance: its category becomes non-exhaustive on that
  image (a query with the other instances, possibly none) and is never a negative.
* An annotation without usable geometry (no segmentation, polygons with fewer than 3 points,
  zero area, an RLE of the wrong size) is dropped and counted by reason; its category becomes
  non-exhaustive on that image as well, since an object is known to be there.
* Category names become phrases with :func:`normalize_phrase`, or through a synonyms file
  ``{"category name": "phrase" | ["phrase", ...] | []}``: several categories may share a phrase
  (their instances are merged into one query), one category may feed several phrases, and ``[]``
  drops a category (its annotations are counted as dropped).
* Boxes are recomputed from the masks; annotation files' boxes often disagree with them.

Exports of annotation tools (Roboflow, CVAT, Label Studio) differ from COCO in ways handled here:

* ``file_name`` with a path prefix that is not under ``images`` (``images/x.jpg``, ``/data/upload/
  3/x.jpg``, Windows ``sub\\x.jpg``): when the full relative path is not found, shorter endings of
  it are tried (``3/x.jpg``, then ``x.jpg``), each only if no other image of the file ends the same
  way, so two ``x.jpg`` of different folders are never confused.
* CVAT exports brush masks as RLE with ``iscrowd: 1``: ``crowd_as_instances`` makes them instances.
* Roboflow adds a category 0 named after the dataset that no annotation uses (left out of the
  negatives, see above); categories may be numbered from 0.
* Generic annotation file names (Roboflow's ``train/_annotations.coco.json``, CVAT's
  ``annotations/instances_default.json``, Label Studio's ``result.json``) give the default dataset
  label from the folder instead (``coco:train``), so the splits of one export, whose image ids
  restart at 0 in each file, get distinct sample keys.
* Tools list frames nobody annotated yet: ``skip_unannotated`` skips images without annotations
  (counted) instead of making every category a negative on them.
"""

from __future__ import annotations

import argparse
import random
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path, PureWindowsPath
from typing import Any, Literal
from urllib.parse import urlparse

from data_pipelines.convert.bands import BandSelection, add_band_arguments, band_selection_from_args
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
from data_pipelines.schema import Instance, Query, Sample, normalize_phrase
from data_pipelines.writer import add_sink_arguments

AnnotationFormat = Literal["auto", "coco", "lvis"]
# annotation file names that say nothing about the split: the folder names the dataset instead
GENERIC_ANNOTATION_NAMES = {"_annotations.coco", "_annotations", "annotations", "default", "result", "coco"}


@dataclass
class _PhraseOnImage:
    instances: list[Instance] = field(default_factory=list)
    incomplete: bool = False  # a crowd region or an unusable annotation of this phrase is on the image


class CocoConverter(Converter):
    """COCO/LVIS instance annotations -> one sample per image with category-phrase queries.

    Args:
        annotations: the instances JSON file (COCO or LVIS).
        images: folder holding the images (``file_name`` relative to it; for LVIS, the last one or
            two parts of ``coco_url``, e.g. ``val2017/000000397133.jpg``).
        source: dataset label written into every sample (default ``coco:<file stem>``).
        fmt: ``coco``, ``lvis`` or ``auto`` (LVIS when images carry ``neg_category_ids``).
        synonyms: JSON file mapping category names to a phrase, a list of phrases or ``[]``.
        negatives_per_image: COCO only: at most this many negative phrases per image (None: all).
        seed: seed for sampling negatives (combined with the image id).
        keep_unused_categories: COCO only: use categories no annotation refers to as negatives too.
        crowd_as_instances: treat ``iscrowd: 1`` annotations as ordinary instances (CVAT exports
            brush masks that way).
        skip_unannotated: skip images without any annotation instead of making them all-negative.
        bands: multi-band images: which bands become RGB and how they are stretched.
    """

    def __init__(self, annotations: str | Path, images: str | Path, *, source: str | None = None,
                 fmt: AnnotationFormat = "auto", synonyms: str | Path | None = None,
                 negatives_per_image: int | None = None, seed: int = 0,
                 keep_unused_categories: bool = False, crowd_as_instances: bool = False,
                 skip_unannotated: bool = False, bands: BandSelection | None = None) -> None:
        self.annotations_path, self.images_dir = Path(annotations), Path(images)
        if not self.images_dir.is_dir():
            raise InputError(f"image folder {self.images_dir} does not exist")
        data = load_json(self.annotations_path, "COCO/LVIS annotation")
        self.images = self._checked_images(require_list(data, "images", self.annotations_path))
        annotations_list = require_list(data, "annotations", self.annotations_path)
        categories = require_list(data, "categories", self.annotations_path)
        self.fmt = self._detect_format(fmt)
        if self.fmt == "lvis" and negatives_per_image is not None:
            raise InputError("LVIS negatives are its verified neg_category_ids; "
                             "--negatives-per-image is for COCO")
        if negatives_per_image is not None and negatives_per_image < 0:
            raise InputError(f"negatives_per_image must be >= 0, got {negatives_per_image}")
        self.source = source or _default_source(self.fmt, self.annotations_path)
        self.synonyms_path = synonyms
        self.negatives_per_image, self.seed = negatives_per_image, seed
        self.crowd_as_instances, self.skip_unannotated = crowd_as_instances, skip_unannotated
        self.bands = bands
        # how many images' file names end in each way: only unique endings may stand for a file name
        self.name_endings = Counter(e for img in self.images for e in _name_endings(img.get("file_name")))

        names = self._category_names(categories)
        self.category_phrases = self._phrases_of(names, load_json(synonyms, "synonyms") if synonyms else {})
        self.phrase_categories: dict[str, list[Any]] = defaultdict(list)
        for cat_id, phrases in self.category_phrases.items():
            for phrase in phrases:
                self.phrase_categories[phrase].append(cat_id)
        self.phrases = list(self.phrase_categories)

        image_ids = {img["id"] for img in self.images}
        self.annotations_by_image: dict[Any, list[dict[str, Any]]] = defaultdict(list)
        self.annotations_without_image = 0
        for i, ann in enumerate(annotations_list):
            if not isinstance(ann, dict) or "image_id" not in ann:
                raise InputError(f"{self.annotations_path}: annotations[{i}] has no 'image_id'")
            if ann["image_id"] in image_ids:
                self.annotations_by_image[ann["image_id"]].append(ann)
            else:
                self.annotations_without_image += 1
        used = {ann.get("category_id") for ann in annotations_list}
        self.unused_categories = [names[c] for c in names if c not in used]
        self.negative_candidates = [p for p in self.phrases if keep_unused_categories
                                    or any(c in used for c in self.phrase_categories[p])]

    # ------------------------------------------------------------------ loading
    def _checked_images(self, images: list[Any]) -> list[dict[str, Any]]:
        seen: set[Any] = set()
        for i, img in enumerate(images):
            if not isinstance(img, dict) or "id" not in img:
                raise InputError(f"{self.annotations_path}: images[{i}] has no 'id'")
            if img["id"] in seen:
                raise InputError(f"{self.annotations_path}: images[{i}] repeats image id {img['id']!r}")
            seen.add(img["id"])
        return images

    def _detect_format(self, fmt: AnnotationFormat) -> Literal["coco", "lvis"]:
        if fmt not in ("auto", "coco", "lvis"):
            raise InputError(f"format must be auto, coco or lvis, got {fmt!r}")
        if fmt != "auto":
            return fmt
        lvis_keys = ("neg_category_ids", "not_exhaustive_category_ids")
        return "lvis" if any(k in img for img in self.images for k in lvis_keys) else "coco"

    def _category_names(self, categories: list[Any]) -> dict[Any, str]:
        names: dict[Any, str] = {}
        for i, cat in enumerate(categories):
            if not isinstance(cat, dict) or "id" not in cat or not isinstance(cat.get("name"), str):
                raise InputError(f"{self.annotations_path}: categories[{i}] needs an 'id' and a 'name'")
            if cat["id"] in names:
                raise InputError(f"{self.annotations_path}: categories[{i}] repeats category id "
                                 f"{cat['id']!r}")
            names[cat["id"]] = cat["name"]
        return names

    def _phrases_of(self, names: dict[Any, str], synonyms: Any) -> dict[Any, list[str]]:
        if not isinstance(synonyms, dict):
            raise InputError(f"synonyms file {self.synonyms_path} must hold an object: "
                             "category name -> phrase(s)")
        by_name = {name: cat_id for cat_id, name in names.items()}
        for cat_id, name in names.items():  # "Baseball_Bat" may also be named "baseball bat"
            by_name.setdefault(normalize_phrase(name), cat_id)
        unknown = sorted(name for name in synonyms if name not in by_name)
        if unknown:
            raise InputError(f"synonyms file {self.synonyms_path} names categories not in "
                             f"{self.annotations_path}: {unknown[:10]} "
                             f"(categories: {sorted(names.values())[:20]})")
        overrides = {by_name[name]: value for name, value in synonyms.items()}
        phrases: dict[Any, list[str]] = {}
        for cat_id, name in names.items():
            value = overrides.get(cat_id, name)
            values = [] if value is None else [value] if isinstance(value, str) else value
            if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
                raise InputError(f"synonyms file {self.synonyms_path}: {name!r} must map to a phrase, "
                                 f"a list of phrases or [], got {value!r}")
            phrases[cat_id] = list(dict.fromkeys(normalize_phrase(v) for v in values))
            if "" in phrases[cat_id]:
                where = self.synonyms_path if cat_id in overrides else self.annotations_path
                raise InputError(f"{where}: category {name!r} (id {cat_id!r}) gives an empty phrase")
        return phrases

    # ------------------------------------------------------------------ converting
    def __len__(self) -> int:
        return len(self.images)

    def key(self, index: int) -> str:
        return sample_key(self.source, self.images[index]["id"])

    def _image_path(self, img: dict[str, Any]) -> Path:
        endings = _name_endings(img.get("file_name"))
        names = endings[:1] + [e for e in endings[1:] if self.name_endings[e] == 1]
        if img.get("coco_url"):  # LVIS: images are COCO's, found by their URL path
            parts = urlparse(img["coco_url"]).path.split("/")
            names += ["/".join(parts[-2:]), parts[-1]]
        if not names:
            raise SkipItem("image entry has no file_name",
                           f"image id {img['id']!r} in {self.annotations_path}")
        for name in names:
            if (self.images_dir / name).is_file():
                return self.images_dir / name
        tried = ", ".join(str(self.images_dir / n) for n in names)
        shared = [e for e in endings[1:] if self.name_endings[e] > 1]
        note = f"; not tried, as other images' names end the same way: {', '.join(shared)}" if shared else ""
        raise SkipItem("missing image file",
                       f"{tried} (image id {img['id']!r} in {self.annotations_path}){note}")

    def convert(self, index: int) -> Sample:
        img = self.images[index]
        if self.skip_unannotated and not self.annotations_by_image.get(img["id"]):
            raise SkipItem("image without annotations",
                           f"image id {img['id']!r} in {self.annotations_path} (--skip-unannotated)")
        path = self._image_path(img)
        data, image_format, width, height = (self.bands.read_image if self.bands else read_image)(path)
        if (img.get("width"), img.get("height")) not in ((width, height), (None, None)):
            raise SkipItem("image size differs from the annotation file",
                           f"{path} is {width}x{height}, {self.annotations_path} says {img.get('width')}x"
                           f"{img.get('height')} for image id {img['id']!r}")
        on_image: dict[str, _PhraseOnImage] = {}
        present_categories: set[Any] = set()
        dropped: Counter = Counter()
        for ann in self.annotations_by_image.get(img["id"], []):
            phrases = self.category_phrases.get(ann.get("category_id"))
            if phrases is None:
                dropped["unknown category_id"] += 1
                continue
            if not phrases:
                dropped["category dropped by synonyms"] += 1
                continue
            present_categories.add(ann["category_id"])
            states = [on_image.setdefault(phrase, _PhraseOnImage()) for phrase in phrases]
            instance = None
            if ann.get("iscrowd") and not self.crowd_as_instances:
                dropped["crowd region (category made non-exhaustive)"] += 1
            else:
                try:
                    instance = instance_from_segmentation(ann.get("segmentation"), height, width)
                except DropAnnotation as drop:
                    dropped[drop.reason] += 1
            for state in states:
                if instance is None:
                    state.incomplete = True
                else:
                    state.instances.append(instance)
        if self.fmt == "coco":
            queries = self._coco_queries(img["id"], on_image)
        else:
            queries = self._lvis_queries(img, on_image, present_categories)
        if not queries:
            raise SkipItem("no queries",
                           f"image id {img['id']!r} ({path}) has no usable annotations or negatives")
        return Sample(key=self.key(index), image=data, image_format=image_format, width=width, height=height,
                      queries=queries, image_id=img["id"], source=self.source,
                      file_name=path.relative_to(self.images_dir).as_posix(), origin=str(path),
                      dropped=dict(dropped))

    def _coco_queries(self, image_id: Any, on_image: dict[str, _PhraseOnImage]) -> list[Query]:
        queries = [Query(p, on_image[p].instances, exhaustive=not on_image[p].incomplete)
                   for p in self.phrases if p in on_image]
        negatives = [p for p in self.negative_candidates if p not in on_image]
        if self.negatives_per_image is not None and len(negatives) > self.negatives_per_image:
            chosen = set(random.Random(f"{self.seed}:{image_id}").sample(negatives, self.negatives_per_image))
            negatives = [p for p in negatives if p in chosen]
        return queries + [Query(p, [], exhaustive=True) for p in negatives]

    def _lvis_queries(self, img: dict[str, Any], on_image: dict[str, _PhraseOnImage],
                      present: set[Any]) -> list[Query]:
        negative = set(img.get("neg_category_ids", []))
        not_exhaustive = set(img.get("not_exhaustive_category_ids", []))
        queries = []
        for phrase in self.phrases:
            categories = self.phrase_categories[phrase]
            if phrase in on_image:
                # exhaustive only if each category behind the phrase is fully annotated or verified absent
                exhaustive = not on_image[phrase].incomplete and all(
                    (c in present and c not in not_exhaustive) or (c not in present and c in negative)
                    for c in categories)
                queries.append(Query(phrase, on_image[phrase].instances, exhaustive=exhaustive))
            elif all(c in negative for c in categories):
                queries.append(Query(phrase, [], exhaustive=True))
        return queries

    def notes(self) -> list[str]:
        n = self.annotations_without_image
        return [f"{n} annotation(s) in {self.annotations_path} name an image id the file does not have: "
                "left out"] if n else []

    def manifest_extra(self) -> dict[str, Any]:
        negatives = "all" if self.negatives_per_image is None else self.negatives_per_image
        return {"converter": "coco", "format": self.fmt, "annotations": str(self.annotations_path),
                "images": str(self.images_dir),
                "synonyms": str(self.synonyms_path) if self.synonyms_path else None,
                "negatives_per_image": "neg_category_ids" if self.fmt == "lvis" else negatives,
                "seed": self.seed, "vocabulary": self.phrases, "unused_categories": self.unused_categories,
                "annotations_without_image": self.annotations_without_image,
                "crowd_as_instances": self.crowd_as_instances, "skip_unannotated": self.skip_unannotated,
                "bands": self.bands.to_json() if self.bands else None}


def _name_endings(file_name: Any) -> list[str]:
    """A ``file_name`` as a relative path, then ever shorter endings of it: 'a/b/c.jpg', 'b/c.jpg', 'c.jpg'.

    Backslashes, drive letters, leading slashes and '.'/'..' parts are removed first.
    """
    if not isinstance(file_name, str) or not file_name.strip():
        return []
    path = PureWindowsPath(file_name.strip())  # reads both '/' and '\' as separators
    parts = [p for p in path.parts[1 if path.anchor else 0:] if p not in (".", "..")]
    return ["/".join(parts[i:]) for i in range(len(parts))]


def _default_source(fmt: str, path: Path) -> str:
    """``fmt:<file stem>``, or ``fmt:<folder>`` for generic file names (the folder names the split)."""
    label = source_label(fmt, path, ("instances_", "lvis_"))
    if label.split(":", 1)[1].lower() not in GENERIC_ANNOTATION_NAMES:
        return label
    folders = [p.name for p in path.resolve().parents if p.name and p.name.lower() != "annotations"]
    return f"{fmt}:{folders[0]}" if folders else label


def _negative_count(text: str) -> int | None:
    if text == "all":
        return None
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0 or 'all', got {text!r}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--annotations", required=True, help="COCO or LVIS instances JSON")
    parser.add_argument("--images", required=True, help="folder holding the images")
    parser.add_argument("--format", dest="fmt", choices=("auto", "coco", "lvis"), default="auto",
                        help="annotation flavour (auto: LVIS when images carry neg_category_ids)")
    parser.add_argument("--synonyms", help="JSON: category name -> phrase, list of phrases, or [] to drop it")
    parser.add_argument("--negatives-per-image", type=_negative_count, default=None, metavar="N|all",
                        help="COCO: negative phrases per image, sampled per image id (default: all)")
    parser.add_argument("--seed", type=int, default=0, help="seed for sampling negatives")
    parser.add_argument("--keep-unused-categories", action="store_true",
                        help="COCO: also use categories no annotation refers to as negatives")
    parser.add_argument("--crowd-as-instances", action="store_true",
                        help="treat iscrowd=1 annotations as instances (CVAT exports brush masks that way)")
    parser.add_argument("--skip-unannotated", action="store_true",
                        help="skip images without annotations (unlabelled frames of tool exports) instead of "
                             "making every category a negative on them")
    parser.add_argument("--source", help="dataset label stored in every sample (default: coco:<file stem>, "
                                         "or coco:<folder> for generic names such as _annotations.coco.json)")
    add_band_arguments(parser)
    add_sink_arguments(parser)


def run(args: argparse.Namespace) -> int:
    converter = CocoConverter(args.annotations, args.images, source=args.source, fmt=args.fmt,
                              synonyms=args.synonyms, negatives_per_image=args.negatives_per_image,
                              seed=args.seed, keep_unused_categories=args.keep_unused_categories,
                              crowd_as_instances=args.crowd_as_instances,
                              skip_unannotated=args.skip_unannotated,
                              bands=band_selection_from_args(args))
    return write_shards(args, converter)
