"""``sambridge segment``: instance masks of noun phrases over an image, a folder of images or shards.

    sambridge segment --checkpoint student.pt --input photos --text "ripe apple" --text leaf --out runs/photos
    sambridge segment --checkpoint student.pt --input data/shards/val --vocabulary phrases.txt \\
        --out runs/val --overlays
    sambridge segment --checkpoint student.pt --input field.jpg --text apple --tile 1024 --overlap 256 \\
        --out runs/field --overlays

--checkpoint is a sambridge Lightning checkpoint or a student file (sambridge export). --input is an
image file, a folder of images (searched recursively, sorted: .jpg .jpeg .png .webp .tif .tiff .bmp),
or shards: a .tar, a brace pattern DIR/val-{000000..000003}.tar, or a folder of .tar files. Every
phrase (--text, --vocabulary) is asked on every image. --workers DataLoader workers decode images
while the model segments --batch-size of them per forward; --tile segments each image in overlapping
tiles at full resolution instead (one tile per forward).

Written into --out:

  results.json    COCO results list: image_id, category_id, segmentation (RLE at the image size),
                  bbox [x, y, w, h], score. As `train.py predict` writes them, image_id is the
                  (image, phrase) pair id (sambridge.metrics.saco.saco_pair_id of the image key and the
                  phrase): `sambridge evaluate` scores them against a ground truth that asks these
                  phrases of these images (the ground_truth.json `train.py predict` writes for shards).
  images.json     images: one per (image, phrase) pair (id, file_name, height, width, text_input,
                  sample_key); categories; phrases; failed: the images that could not be read, and why.
  overlays/       with --overlays: <image key>.png (a folder's image sub/a.jpg: overlays/sub/a.jpg.png).
  progress.jsonl  one line per image, written and flushed to disk as each finishes.
  settings.json   what decides the results: checkpoint sha256, input, phrases, thresholds, tiling.

Run it again with the same --out to resume: images progress.jsonl holds are not segmented again
(unreadable ones are tried again) and results.json is rewritten from it. A rerun with other settings
than settings.json records is refused. Exit code: 0 when every image was segmented, 1 when some
could not be read (named on stderr and in images.json; the others' results are written), 2 on a
user error (nothing segmented).
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import os
import sys
from collections import Counter
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from data_pipelines.atomic import atomic_write, fsync_directory, write_json_atomic
from data_pipelines.convert.common import RGB_CONVERTIBLE_MODES, InputError
from data_pipelines.convert.mask_folder import IMAGE_SUFFIXES
from data_pipelines.overlay import Detection, draw_detections
from data_pipelines.pipeline import ErrorCounter, ShardSet, ShardStream, is_remote, make_loader, resolve_shards
from data_pipelines.schema import SampleError, encode_mask, sample_from_wds
from data_pipelines.tiling import TilingConfig
from data_pipelines.vocab import command_phrases
from data_pipelines.writer import MANIFEST, SIZES, sha256_of
from sambridge.inference import Segment, Segmenter, load_model
from sambridge.metrics.saco import SACO_CATEGORY, saco_pair_id
from sambridge.parsers import segment_parser

RESULTS_FILE, IMAGES_FILE = "results.json", "images.json"
PROGRESS_FILE, SETTINGS_FILE, OVERLAYS = "progress.jsonl", "settings.json", "overlays"
MASK_SOURCES = {"auto": None, "sam2": True, "head": False}
"""``--masks`` -> ``Segmenter(refine=...)``."""
LISTED_FAILURES = 20
"""Unreadable images named on stderr at most (images.json names them all)."""


# ----------------------------------------------------------------------------------------------
# inputs
# ----------------------------------------------------------------------------------------------
@dataclass
class Item:
    """One input image: its key (folder: relative path; shards: sample key), file name, and its pixels
    ((H, W, 3) uint8) or why they could not be read."""

    key: str
    file_name: str
    image: np.ndarray | None = None
    error: str | None = None


def decode_rgb(data: bytes) -> np.ndarray:
    """Image file bytes -> (H, W, 3) uint8; raises ``ValueError`` saying why they are not one."""
    try:
        with Image.open(io.BytesIO(data)) as opened:
            if opened.mode not in RGB_CONVERTIBLE_MODES:
                raise ValueError(f"PIL mode {opened.mode} (16-bit or float): convert it to 8-bit RGB first, "
                                 "the choice of range is yours to make")
            return np.asarray(opened.convert("RGB"))
    except UnidentifiedImageError:  # its message names the BytesIO object
        raise ValueError(f"not an image PIL can identify (first bytes {data[:8]!r})") from None
    except (OSError, SyntaxError, Image.DecompressionBombError) as err:  # what PIL raises
        raise ValueError(f"not a readable image: {err}") from err


def file_key(root: Path, path: Path) -> str:
    """The key (and file name) of an image file: its path relative to the input folder."""
    return path.relative_to(root).as_posix()


class ImageFiles(Dataset):
    """Image files under ``root`` as :class:`Item`."""

    def __init__(self, root: Path, files: Sequence[Path]) -> None:
        self.root, self.files = root, list(files)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> Item:
        key = file_key(self.root, self.files[index])
        try:
            return Item(key, key, image=decode_rgb(self.files[index].read_bytes()))
        except (OSError, ValueError) as err:
            return Item(key, key, error=str(err))


def shard_item(record: dict[str, Any], rng: Any, done: Collection[str]) -> Item | None:
    """A raw shard record as an :class:`Item` (a ``ShardStream`` transform: ``rng`` is unused); ``None``
    (dropped undecoded) when its key is done."""
    key = str(record.get("__key__"))
    if key in done:
        return None
    try:
        sample = sample_from_wds(record, source=record.get("__url__"))
        return Item(key, sample.image_file, image=decode_rgb(sample.image))
    except (SampleError, ValueError) as err:
        return Item(key, key, error=str(err))


@dataclass
class Source:
    """What ``--input`` names: image files (``files`` under ``root``) or ``shards`` (whose read errors
    ``errors`` counts)."""

    root: Path | None = None
    files: Sequence[Path] = ()
    shards: ShardSet | None = None
    errors: ErrorCounter | None = None

    @property
    def total(self) -> int | None:
        """How many images, when known."""
        return len(self.files) if self.shards is None else self.shards.num_samples

    def loader(self, done: Collection[str], batch_size: int, workers: int) -> Iterator[list[Item]]:
        """Batches of the images not ``done``, decoded by ``workers`` DataLoader workers."""
        if self.shards is None:
            todo = [path for path in self.files if file_key(self.root, path) not in done]
            return iter(DataLoader(ImageFiles(self.root, todo), batch_size=batch_size, num_workers=workers,
                                   collate_fn=list))
        # without sizes: one pass over the shards, however many batches are left once done samples are dropped
        shards = dataclasses.replace(self.shards, sizes=None)
        stream = ShardStream(shards, partial(shard_item, done=frozenset(done)), list, mode="once",
                             batch_size=batch_size, num_workers=workers, errors=self.errors, name="segment")
        return iter(make_loader(stream))


def open_input(spec: str) -> Source:
    """Image file, image folder or shards (see the module docstring)."""
    path = Path(spec)
    if is_remote(spec) or "{" in spec or path.suffix == ".tar":
        return _shards(spec)
    if path.is_file():
        return Source(root=path.parent, files=[path])
    if not path.is_dir():
        raise FileNotFoundError(f"--input {spec} does not exist")
    if (path / MANIFEST).exists() or (path / SIZES).exists():
        return _shards(spec)
    tars = sorted(str(p) for p in path.glob("*.tar"))
    if tars:
        return _shards(tars)
    files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise InputError(f"--input {spec}: no images ({', '.join(IMAGE_SUFFIXES)}) or .tar shards under it")
    return Source(root=path, files=files)


def _shards(spec: str | list[str]) -> Source:
    try:
        return Source(shards=resolve_shards(spec), errors=ErrorCounter("segment"))
    except ValueError as err:
        raise InputError(f"--input {spec}: {err}") from err


# ----------------------------------------------------------------------------------------------
# the output folder: settings, progress, results
# ----------------------------------------------------------------------------------------------
def check_settings(out: Path, settings: dict[str, Any]) -> bool:
    """Refuse an ``out`` that holds results made with other settings; whether it records them already."""
    path = out / SETTINGS_FILE
    if not path.exists():
        return False
    before = json.loads(path.read_text())
    changed = sorted(k for k in set(before) | set(settings) if before.get(k) != settings.get(k))
    if changed:
        raise InputError(f"{out} holds results made with other settings ({', '.join(changed)} differ from {path}): "
                         "segment into another --out, or delete it to start over")
    return True


class Progress:
    """``progress.jsonl``: one JSON line per image, appended and flushed to disk as each finishes.

    Per image key, ``lines`` holds its line with ``results`` if there is one, else its last ``error``
    line. A line cut short (a killed run) is removed from the file when it is opened.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.lines: dict[str, dict[str, Any]] = {}
        self.done: set[str] = set()
        """Keys of the segmented images."""
        if path.exists():
            self._read()
        self.file = open(path, "a", encoding="utf-8")

    def _read(self) -> None:
        data = self.path.read_bytes()
        complete = data[:data.rfind(b"\n") + 1]
        if len(complete) < len(data):
            os.truncate(self.path, len(complete))
        for number, raw in enumerate(complete.splitlines(), 1):
            try:
                self._keep(json.loads(raw))
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise InputError(f"{self.path}:{number} is not a progress line ({err}): the file was edited or "
                                 "damaged; delete the folder to start over") from err

    def _keep(self, line: dict[str, Any]) -> None:
        if line["key"] not in self.done:
            self.lines[line["key"]] = line
        if "results" in line:
            self.done.add(line["key"])

    def add(self, line: dict[str, Any]) -> None:
        """Append ``line`` and flush it to disk."""
        self.file.write(json.dumps(line) + "\n")
        self.file.flush()
        os.fsync(self.file.fileno())
        self._keep(line)

    def close(self) -> None:
        self.file.close()
        fsync_directory(self.path.parent)


def image_line(item: Item, phrases: Sequence[str], found: Sequence[Sequence[Segment]]) -> dict[str, Any]:
    """The progress line of a segmented image: its COCO result records, one per instance."""
    records = [{"image_id": saco_pair_id(item.key, phrase), "category_id": SACO_CATEGORY["id"],
                "segmentation": encode_mask(s.mask), "score": s.score,
                "bbox": [s.box_xyxy[0], s.box_xyxy[1], s.box_xyxy[2] - s.box_xyxy[0], s.box_xyxy[3] - s.box_xyxy[1]]}
               for phrase, segments in zip(phrases, found, strict=True) for s in segments]
    height, width = item.image.shape[:2]
    return {"key": item.key, "file_name": item.file_name, "height": height, "width": width, "results": records}


def write_results(out: Path, lines: dict[str, dict[str, Any]], phrases: Sequence[str]) -> list[dict[str, Any]]:
    """``results.json`` and ``images.json`` (atomically, images sorted by key); returns the failed lines."""
    finished = [lines[key] for key in sorted(lines) if "results" in lines[key]]
    failed = [lines[key] for key in sorted(lines) if "results" not in lines[key]]
    write_json_atomic(out / RESULTS_FILE, [record for line in finished for record in line["results"]])
    images = [{"id": saco_pair_id(line["key"], phrase), "file_name": line["file_name"], "height": line["height"],
               "width": line["width"], "text_input": phrase, "sample_key": line["key"]}
              for line in finished for phrase in phrases]
    write_json_atomic(out / IMAGES_FILE, {
        "images": images, "categories": [SACO_CATEGORY], "phrases": list(phrases),
        "failed": [{"file_name": line["file_name"], "sample_key": line["key"], "error": line["error"]}
                   for line in failed]})
    return failed


def draw_overlay(path: Path, item: Item, phrases: Sequence[str], found: Sequence[Sequence[Segment]]) -> None:
    """The image with its instances, one colour per phrase (atomically)."""
    detections = [Detection(mask=s.mask, label=f"{phrase} {s.score:.2f}", box_xyxy=s.box_xyxy, colour_index=q)
                  for q, (phrase, segments) in enumerate(zip(phrases, found, strict=True)) for s in segments]
    picture = draw_detections(item.image, detections)
    atomic_write(path, lambda file: picture.save(file, format="PNG"))


# ----------------------------------------------------------------------------------------------
# the command
# ----------------------------------------------------------------------------------------------
def _settings(args: argparse.Namespace, phrases: list[str]) -> dict[str, Any]:
    """What decides the results (a resumed run must use the same)."""
    checkpoint = Path(args.checkpoint)
    if not checkpoint.is_file():
        raise FileNotFoundError(f"checkpoint not found: {checkpoint}")
    return {"checkpoint_sha256": sha256_of(checkpoint),
            "input": args.input if is_remote(args.input) else os.path.abspath(args.input),
            "phrases": phrases, "threshold": args.threshold, "top_k": args.top_k, "masks": args.masks,
            "nms_iou": args.nms_iou, "tiling": {"tile": args.tile, "overlap": args.overlap} if args.tile else None,
            "overlays": args.overlays}


def _check_numbers(args: argparse.Namespace) -> TilingConfig | None:
    """Refuse impossible numbers; the tiling, if asked for."""
    for flag, value, least in (("--batch-size", args.batch_size, 1), ("--workers", args.workers, 0),
                               ("--top-k", args.top_k, 1), ("--tile", args.tile, 0)):
        if value < least:
            raise InputError(f"{flag} must be at least {least}, got {value}")
    if not args.tile:
        return None
    try:
        return TilingConfig(tile_size=args.tile, overlap=args.overlap)
    except ValueError as err:
        raise InputError(f"--tile {args.tile} --overlap {args.overlap}: {err}") from err


def segment_images(segmenter: Segmenter, images: list[np.ndarray], phrases: list[str],
                   tiling: TilingConfig | None) -> list[list[list[Segment]]]:
    """Per image, per phrase, the instances: whole images in one forward, or each in tiles."""
    if tiling is None:
        return segmenter.segment_batch(images, phrases)
    return [segmenter.segment_tiled(image, phrases, tiling, progress=False) for image in images]


@dataclass
class Tally:
    """What one run did: images segmented, and samples skipped for a key segmented already."""

    segmented: int = 0
    duplicates: int = 0


def segment_batch(batch: list[Item], segmenter: Segmenter, phrases: list[str], tiling: TilingConfig | None,
                  progress: Progress, overlays: Path | None, tally: Tally) -> None:
    """Segment the readable images of ``batch``; one progress line per image (and its overlay first)."""
    readable = []
    for item in batch:
        if item.key in progress.done:
            tally.duplicates += 1
        elif item.error is not None:
            progress.add({"key": item.key, "file_name": item.file_name, "error": item.error})
        else:
            readable.append(item)
    if not readable:
        return
    for item, found in zip(readable, segment_images(segmenter, [item.image for item in readable], phrases, tiling),
                           strict=True):
        if overlays is not None:
            draw_overlay(overlays / f"{item.key}.png", item, phrases, found)
        progress.add(image_line(item, phrases, found))
        tally.segmented += 1


def _report(out: Path, lines: dict[str, dict[str, Any]], phrases: list[str], failed: list[dict[str, Any]],
            tally: Tally, shard_errors: int) -> None:
    finished = [line for line in lines.values() if "results" in line]
    phrase_of = {saco_pair_id(line["key"], phrase): phrase for line in finished for phrase in phrases}
    instances = Counter(phrase_of[r["image_id"]] for line in finished for r in line["results"])
    images = Counter(phrase_of[i] for i in {r["image_id"] for line in finished for r in line["results"]})
    for phrase in phrases:
        print(f"{phrase!r}: {instances[phrase]} instance(s) in {images[phrase]} image(s)")
    print(f"{len(finished)} image(s) segmented ({tally.segmented} in this run); results in {out / RESULTS_FILE}, "
          f"ids to file names and phrases in {out / IMAGES_FILE}")
    if failed:
        print(f"warning: {len(failed)} image(s) could not be read (listed in {out / IMAGES_FILE}):", file=sys.stderr)
        for line in failed[:LISTED_FAILURES]:
            print(f"  {line['file_name']}: {line['error']}", file=sys.stderr)
    if tally.duplicates:
        print(f"warning: {tally.duplicates} sample(s) skipped: their key was segmented already (duplicate keys; "
              "sambridge data verify lists them)", file=sys.stderr)
    if shard_errors:
        print(f"warning: {shard_errors} shard read error(s): the rest of those shards was skipped (see the "
              "warnings above)", file=sys.stderr)


def run(args: argparse.Namespace) -> int:
    """Segment ``--input`` into ``--out``; the exit code (see the module docstring)."""
    phrases = command_phrases(args.text, args.vocabulary, "segment")
    tiling = _check_numbers(args)
    source = open_input(args.input)
    out, settings = Path(args.out), _settings(args, phrases)
    recorded = check_settings(out, settings)
    segmenter = Segmenter(load_model(args.checkpoint, map_location=args.device), score_threshold=args.threshold,
                          top_k=args.top_k, refine=MASK_SOURCES[args.masks], nms_iou=args.nms_iou, device=args.device)
    if not recorded:
        write_json_atomic(out / SETTINGS_FILE, settings, indent=1)
    progress, tally = Progress(out / PROGRESS_FILE), Tally()
    overlays = out / OVERLAYS if args.overlays else None
    try:
        batches = source.loader(progress.done, args.batch_size, args.workers)
        with tqdm(total=source.total, initial=len(progress.done), unit="image", desc="segment") as bar:
            for batch in batches:
                segment_batch(batch, segmenter, phrases, tiling, progress, overlays, tally)
                bar.update(len(batch))
    finally:
        progress.close()
    failed = write_results(out, progress.lines, phrases)
    shard_errors = source.errors.count if source.errors is not None else 0
    _report(out, progress.lines, phrases, failed, tally, shard_errors)
    return 1 if failed or tally.duplicates or shard_errors else 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``sambridge segment``; returns the exit code."""
    parser = segment_parser()  # sambridge.parsers: --help without torch; the device default is set here
    parser.set_defaults(device="cuda" if torch.cuda.is_available() else "cpu")
    return run(parser.parse_args(argv))
