"""SAM3's SA-Co annotations (Gold/Silver or your own in that format) plus images -> shards.

SA-Co is COCO-derived: each ``images`` entry is one image–noun-phrase *pair* (``id``, ``file_name``,
``text_input``, ``width``, ``height``, ``is_instance_exhaustive``, ...), and ``annotations`` carry RLE
masks whose ``image_id`` is a pair id. A pair without annotations is a negative phrase. Pairs with
``is_instance_exhaustive: 0`` are the ones sam3's evaluators leave out; here their query gets
``exhaustive: false`` (so it is never used as a negative or for recall). ``bbox`` and ``area`` are
normalised in SA-Co; boxes are recomputed from the masks.

All pairs of one image file become one sample with all its phrases. A crowd region or an unusable
mask makes its pair non-exhaustive (counted by reason); a second pair with the same (normalised)
phrase on one image is dropped and counted, and so is a pair whose ``text_input`` is not a string
(``null``, a list) or whose ``is_instance_exhaustive`` is not 0/1/true/false (``"0"``): nothing is
guessed.
"""

from __future__ import annotations

import argparse
from collections import Counter, defaultdict
from pathlib import Path, PurePosixPath
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
from data_pipelines.schema import Query, Sample, normalize_phrase
from data_pipelines.writer import add_sink_arguments

PAIR_FIELDS = ("id", "file_name", "text_input")


class SacoConverter(Converter):
    """SA-Co image–phrase pairs -> one sample per image file with all its phrases.

    Args:
        annotations: the SA-Co JSON file.
        images: folder the pairs' ``file_name`` paths are relative to.
        source: dataset label written into every sample (default ``saco:<file stem>``).
    """

    def __init__(self, annotations: str | Path, images: str | Path, *, source: str | None = None) -> None:
        self.annotations_path, self.images_dir = Path(annotations), Path(images)
        if not self.images_dir.is_dir():
            raise InputError(f"image folder {self.images_dir} does not exist")
        data = load_json(self.annotations_path, "SA-Co annotation")
        pairs = require_list(data, "images", self.annotations_path)
        self.source = source or source_label("saco", self.annotations_path)
        self.pairs_by_file: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for i, pair in enumerate(pairs):
            missing = [f for f in PAIR_FIELDS if not isinstance(pair, dict) or f not in pair]
            if missing:
                raise InputError(f"{self.annotations_path}: images[{i}] lacks {', '.join(missing)} "
                                 "(is this an SA-Co file? each entry is an image-phrase pair)")
            self.pairs_by_file[pair["file_name"]].append(pair)
        self.files = list(self.pairs_by_file)
        pair_ids = Counter(pair["id"] for pair in pairs)
        repeated = [pid for pid, n in pair_ids.items() if n > 1]
        if repeated:
            raise InputError(f"{self.annotations_path}: pair ids repeat in 'images': {repeated[:10]}")
        self.annotations_by_pair: dict[Any, list[dict[str, Any]]] = defaultdict(list)
        self.annotations_without_pair = 0
        for i, ann in enumerate(require_list(data, "annotations", self.annotations_path)):
            if not isinstance(ann, dict) or "image_id" not in ann:
                raise InputError(f"{self.annotations_path}: annotations[{i}] has no 'image_id'")
            if ann["image_id"] in pair_ids:
                self.annotations_by_pair[ann["image_id"]].append(ann)
            else:
                self.annotations_without_pair += 1

    def __len__(self) -> int:
        return len(self.files)

    def key(self, index: int) -> str:
        return sample_key(self.source, PurePosixPath(self.files[index]).with_suffix(""))

    def convert(self, index: int) -> Sample:
        file_name = self.files[index]
        path = self.images_dir / file_name
        data, image_format, width, height = read_image(path)
        queries: dict[str, Query] = {}
        dropped: Counter = Counter()
        for pair in self.pairs_by_file[file_name]:
            if (pair.get("width"), pair.get("height")) not in ((width, height), (None, None)):
                raise SkipItem("image size differs from the annotation file",
                               f"{path} is {width}x{height}, pair {pair['id']!r} in {self.annotations_path} "
                               f"says {pair.get('width')}x{pair.get('height')}")
            if not isinstance(pair["text_input"], str):
                dropped["pair whose text_input is not a string"] += 1
                continue
            phrase = normalize_phrase(pair["text_input"])
            if not phrase:
                dropped["pair with an empty text_input"] += 1
                continue
            exhaustive = pair.get("is_instance_exhaustive", True)
            if exhaustive not in (0, 1) or isinstance(exhaustive, float):  # True/False/0/1, not "0" or 0.5
                dropped["pair whose is_instance_exhaustive is not 0/1/true/false"] += 1
                continue
            if phrase in queries:
                dropped["pair repeating a phrase of its image"] += 1
                continue
            query = Query(phrase, [], exhaustive=bool(exhaustive))
            for ann in self.annotations_by_pair.get(pair["id"], []):
                if ann.get("iscrowd"):
                    dropped["crowd region (pair made non-exhaustive)"] += 1
                    query.exhaustive = False
                    continue
                try:
                    query.instances.append(instance_from_segmentation(ann.get("segmentation"), height, width))
                except DropAnnotation as drop:
                    dropped[drop.reason] += 1
                    query.exhaustive = False
            queries[phrase] = query
        if not queries:
            raise SkipItem("no queries", f"{path}: every pair in {self.annotations_path} was dropped")
        return Sample(key=self.key(index), image=data, image_format=image_format, width=width, height=height,
                      queries=list(queries.values()), image_id=file_name, source=self.source,
                      file_name=PurePosixPath(file_name).as_posix(), origin=str(path), dropped=dict(dropped))

    def notes(self) -> list[str]:
        n = self.annotations_without_pair
        return [f"{n} annotation(s) in {self.annotations_path} name a pair id the file does not have: "
                "left out"] if n else []

    def manifest_extra(self) -> dict[str, Any]:
        return {"converter": "saco", "annotations": str(self.annotations_path),
                "images": str(self.images_dir), "pairs": sum(len(p) for p in self.pairs_by_file.values()),
                "annotations_without_pair": self.annotations_without_pair}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--annotations", required=True, help="SA-Co JSON (images = image-phrase pairs)")
    parser.add_argument("--images", required=True, help="folder the pairs' file_name paths are relative to")
    parser.add_argument("--source", help="dataset label stored in every sample (default: saco:<file stem>)")
    add_sink_arguments(parser)


def run(args: argparse.Namespace) -> int:
    return write_shards(args, SacoConverter(args.annotations, args.images, source=args.source))
