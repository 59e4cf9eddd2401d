"""SA-Co / COCO evaluation files: read and validate them, and write them from our own samples and predictions.

Ground truth (the SA-Co format SAM3's evaluators read, derived from COCO)::

    {"images": [{"id": 7, "height": H, "width": W, "file_name": "...",
                 "text_input": "ripe apple", "is_instance_exhaustive": 1}, ...],   # one per image-phrase pair
     "annotations": [{"id": 1, "image_id": 7, "category_id": 1, "iscrowd": 0,
                      "segmentation": {"size": [H, W], "counts": "..."}, ...}, ...],
     "categories": [{"id": 1, "name": "object"}]}

An ``images`` entry without annotations is a negative phrase. Predictions are a COCO results list::

    [{"image_id": 7, "category_id": 1, "score": 0.93,
      "segmentation": {"size": [H, W], "counts": "..."}, "bbox": [x, y, w, h]}, ...]

Every record is checked before anything is computed; a bad one raises :class:`RecordError`
naming the file, the record (list, index and id) and the field. Unlike SAM3's evaluator, which
silently drops predictions for unknown images or categories, those are errors here. Compressed
RLE strings are checked for their type and size, not decoded (that would cost more than the
evaluation itself).
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from pycocotools import mask as mask_utils

from data_pipelines.batch import GroundingBatch
from data_pipelines.schema import Sample
from sambridge.metrics.masks import encode_masks

SACO_CATEGORY = {"id": 1, "name": "object"}


class RecordError(ValueError):
    """A record of an evaluation file is malformed; the message names file, record and field."""

    def __init__(self, message: str, *, source: str, record: str, field: str | None = None) -> None:
        self.source, self.record, self.field, self.reason = source, record, field, message
        where = f"{source}: {record}" + (f", field '{field}'" if field else "")
        super().__init__(f"{where}: {message}")


def _is_int(value: Any) -> bool:
    return type(value) is int or isinstance(value, np.integer)  # not bool: type(True) is bool


def _is_number(value: Any) -> bool:
    return type(value) is float or type(value) is int or isinstance(value, np.integer | np.floating)


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector: building 10**5 small dicts otherwise triggers it over and
    over for nothing (none of them form cycles); halves the time to read an evaluation file."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _read_json(path: str | Path) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON: {err}") from err


# ----------------------------------------------------------------------------------------------
# ground truth
# ----------------------------------------------------------------------------------------------
@dataclass
class SacoGroundTruth:
    """A validated SA-Co ground-truth file, indexed by query.

    Attributes:
        source: where it came from (named in errors and reports).
        images: image (query) id -> its ``images`` entry, in file order.
        instances: image id -> compressed RLEs (str counts) of its non-crowd annotations, in file order.
        crowds: image id -> compressed RLEs of its crowd regions (``iscrowd: 1``), in file order.
        category_ids: the ids in ``categories``.
    """

    source: str
    images: dict[int, dict[str, Any]]
    instances: dict[int, list[dict[str, Any]]]
    crowds: dict[int, list[dict[str, Any]]]
    category_ids: set[int]

    def exhaustive_ids(self) -> list[int]:
        """Ids of the instance-exhaustive queries, in file order (the queries SAM3 evaluates)."""
        return [i for i, img in self.images.items() if img["is_instance_exhaustive"]]


class _Invalid(Exception):
    """A check failed; the parser turns it into a :class:`RecordError` naming the record."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.message, self.field = message, field


def _record_error(err: _Invalid, source: str, section: str, index: int, record: Any,
                  id_keys: tuple[str, ...]) -> RecordError:
    ids = ", ".join(f"{k} {record.get(k)!r}" for k in id_keys) if isinstance(record, dict) else ""
    label = f"{section}[{index}]" + (f" ({ids})" if ids else "")
    return RecordError(err.message, source=source, record=label, field=err.field)


def _to_compressed_rle(segm: Any, height: int, width: int) -> dict[str, Any]:
    """RLE (compressed or uncompressed) or polygons -> compressed RLE with str counts, size checked."""
    if isinstance(segm, dict):
        size, counts = segm.get("size"), segm.get("counts")
        if not (isinstance(size, list | tuple) and len(size) == 2 and _is_int(size[0]) and _is_int(size[1])):
            raise _Invalid(f"must be [height, width], got {size!r}", "segmentation.size")
        if size[0] != height or size[1] != width:
            raise _Invalid(f"RLE size {list(size)} does not match the image's [height, width] = "
                           f"{[height, width]}", "segmentation.size")
        if isinstance(counts, str):
            return segm if type(size) is list else {"size": [height, width], "counts": counts}
        if not (isinstance(counts, list) and all(_is_int(c) and c >= 0 for c in counts)):
            raise _Invalid("must be a compressed RLE string or a list of non-negative run lengths",
                           "segmentation.counts")
        if sum(counts) != height * width:
            raise _Invalid(f"runs cover {sum(counts)} pixels, expected {height * width}",
                           "segmentation.counts")
        rle = mask_utils.frPyObjects({"size": [height, width], "counts": counts}, height, width)
    elif isinstance(segm, list) and segm and all(isinstance(p, list) and len(p) >= 6 and len(p) % 2 == 0
                                                 and all(_is_number(v) for v in p) for p in segm):
        rle = mask_utils.merge(mask_utils.frPyObjects(segm, height, width))
    else:
        raise _Invalid("must be an RLE object or a list of polygons [x1, y1, x2, y2, ...]", "segmentation")
    return {"size": [height, width], "counts": rle["counts"].decode("ascii")}


def _check_image(img: Any, images: dict[int, dict[str, Any]]) -> None:
    if not isinstance(img, dict):
        raise _Invalid("not an object")
    if not _is_int(img.get("id")):
        raise _Invalid(f"must be an integer, got {img.get('id')!r}", "id")
    if img["id"] in images:
        raise _Invalid("duplicate image id", "id")
    for name in ("height", "width"):
        if not _is_int(img.get(name)) or img[name] <= 0:
            raise _Invalid(f"must be a positive integer, got {img.get(name)!r}", name)
    exhaustive = img.get("is_instance_exhaustive")
    if exhaustive not in (0, 1) or isinstance(exhaustive, float):
        raise _Invalid(f"must be true/false or 1/0, got {exhaustive!r}", "is_instance_exhaustive")
    if not isinstance(img.get("text_input"), str) or not img["text_input"].strip():
        raise _Invalid(f"must be a non-empty noun phrase, got {img.get('text_input')!r}", "text_input")


def _check_annotation(ann: Any, images: dict[int, dict[str, Any]], category_ids: set[int],
                      seen_ids: set[int]) -> tuple[int, dict[str, Any], bool]:
    """-> (image id, compressed RLE, is a crowd region)."""
    if not isinstance(ann, dict):
        raise _Invalid("not an object")
    if not _is_int(ann.get("id")) or ann["id"] in seen_ids:
        raise _Invalid(f"must be a unique integer, got {ann.get('id')!r}", "id")
    image = images.get(ann["image_id"]) if _is_int(ann.get("image_id")) else None
    if image is None:
        raise _Invalid(f"no image has id {ann.get('image_id')!r}", "image_id")
    if not _is_int(ann.get("category_id")) or ann["category_id"] not in category_ids:
        raise _Invalid(f"{ann.get('category_id')!r} is not one of the categories {sorted(category_ids)}",
                       "category_id")
    iscrowd = ann.get("iscrowd", 0)
    if iscrowd not in (0, 1) or isinstance(iscrowd, float):
        raise _Invalid(f"must be 0 or 1, got {iscrowd!r}", "iscrowd")
    if "segmentation" not in ann:
        raise _Invalid("missing", "segmentation")
    rle = _to_compressed_rle(ann["segmentation"], image["height"], image["width"])
    return image["id"], rle, bool(iscrowd)


def parse_ground_truth(data: Any, source: str = "<ground truth>") -> SacoGroundTruth:
    """Validate an SA-Co ground-truth dict and index it (see the module docstring for the format)."""
    if not isinstance(data, dict):
        raise RecordError(f"expected a JSON object, got {type(data).__name__}", source=source,
                          record="top level")
    for section in ("images", "annotations", "categories"):
        if not isinstance(data.get(section), list):
            raise RecordError("missing or not a list", source=source, record="top level", field=section)

    category_ids: set[int] = set()
    for i, cat in enumerate(data["categories"]):
        if not isinstance(cat, dict) or not _is_int(cat.get("id")) or cat["id"] in category_ids:
            raise RecordError("must be an object with a unique integer 'id'", source=source,
                              record=f"categories[{i}]", field="id")
        category_ids.add(cat["id"])

    images: dict[int, dict[str, Any]] = {}
    for i, img in enumerate(data["images"]):
        try:
            _check_image(img, images)
        except _Invalid as err:
            raise _record_error(err, source, "images", i, img, ("id",)) from None
        images[img["id"]] = img

    instances: dict[int, list[dict[str, Any]]] = {image_id: [] for image_id in images}
    crowds: dict[int, list[dict[str, Any]]] = {image_id: [] for image_id in images}
    seen_ids: set[int] = set()
    for i, ann in enumerate(data["annotations"]):
        try:
            image_id, rle, crowd = _check_annotation(ann, images, category_ids, seen_ids)
        except _Invalid as err:
            raise _record_error(err, source, "annotations", i, ann, ("id", "image_id")) from None
        seen_ids.add(ann["id"])
        (crowds if crowd else instances)[image_id].append(rle)
    return SacoGroundTruth(source=source, images=images, instances=instances, crowds=crowds,
                           category_ids=category_ids)


def load_ground_truth(path: str | Path) -> SacoGroundTruth:
    """Read and validate an SA-Co ground-truth JSON file."""
    with gc_paused():
        return parse_ground_truth(_read_json(path), source=str(path))


# ----------------------------------------------------------------------------------------------
# predictions
# ----------------------------------------------------------------------------------------------
def _check_prediction(pred: Any, gt: SacoGroundTruth) -> None:
    if not isinstance(pred, dict):
        raise _Invalid("not an object")
    image = gt.images.get(pred["image_id"]) if _is_int(pred.get("image_id")) else None
    if image is None:
        raise _Invalid(f"no image in the ground truth ({gt.source}) has id {pred.get('image_id')!r}",
                       "image_id")
    if not _is_int(pred.get("category_id")) or pred["category_id"] not in gt.category_ids:
        raise _Invalid(f"{pred.get('category_id')!r} is not one of the ground truth's categories "
                       f"{sorted(gt.category_ids)}", "category_id")
    score = pred.get("score")
    if not _is_number(score) or not 0.0 <= score <= 1.0:
        raise _Invalid(f"must be a probability in [0, 1] (cgF1 thresholds scores), got {score!r}", "score")
    segm = pred.get("segmentation")
    if not isinstance(segm, dict) or not isinstance(segm.get("counts"), str):
        raise _Invalid("must be a compressed RLE {'size': [H, W], 'counts': str}", "segmentation")
    _to_compressed_rle(segm, image["height"], image["width"])  # checks the size
    bbox = pred.get("bbox")
    if bbox is not None and not (isinstance(bbox, list) and len(bbox) == 4 and _is_number(bbox[0])
                                 and _is_number(bbox[1]) and _is_number(bbox[2]) and _is_number(bbox[3])):
        raise _Invalid(f"must be [x, y, w, h], got {bbox!r}", "bbox")


def parse_predictions(data: Any, gt: SacoGroundTruth, source: str = "<predictions>") -> list[dict[str, Any]]:
    """Validate a COCO results list against ``gt``; returns it (records are not modified)."""
    if not isinstance(data, list):
        raise RecordError(f"expected a JSON list of results, got {type(data).__name__}", source=source,
                          record="top level")
    for i, pred in enumerate(data):
        try:
            _check_prediction(pred, gt)
        except _Invalid as err:
            raise _record_error(err, source, "predictions", i, pred, ("image_id",)) from None
    return data


def load_predictions(path: str | Path, gt: SacoGroundTruth) -> list[dict[str, Any]]:
    """Read and validate a COCO results JSON file against ``gt``."""
    with gc_paused():
        return parse_predictions(_read_json(path), gt, source=str(path))


# ----------------------------------------------------------------------------------------------
# export
# ----------------------------------------------------------------------------------------------
def saco_pair_id(sample_key: str, phrase: str) -> int:
    """Stable integer id of an (image, phrase) pair: the same on every rank and every run.

    53 bits, so JSON readers that parse numbers as doubles keep it exact.
    """
    digest = hashlib.blake2b(f"{sample_key}\x00{phrase}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") & ((1 << 53) - 1)


def ground_truth_from_samples(samples: Iterable[Sample]) -> dict[str, Any]:
    """An SA-Co ground-truth dict from shard samples: one ``images`` entry per (sample, query).

    Image ids are :func:`saco_pair_id` of (sample key, phrase), so predictions written elsewhere
    (another rank, a later run) refer to the same ids. ``file_name`` is the sample's source image file
    (``{key}.{image format}`` for generated samples).
    """
    images, annotations, owners = [], [], {}
    for sample in samples:
        for query in sample.queries:
            pair_id = saco_pair_id(sample.key, query.phrase)
            if pair_id in owners:
                raise ValueError(f"sample {sample.key!r}, phrase {query.phrase!r}: (image, phrase) id "
                                 f"{pair_id} already used by {owners[pair_id]} (duplicate sample or query?)")
            owners[pair_id] = f"sample {sample.key!r}, phrase {query.phrase!r}"
            entry = {"id": pair_id, "file_name": sample.image_file,
                     "height": sample.height, "width": sample.width, "text_input": query.phrase,
                     "is_instance_exhaustive": int(query.exhaustive), "sample_key": sample.key}
            if sample.image_id is not None:
                entry["original_img_id"] = sample.image_id
            images.append(entry)
            for inst in query.instances:
                annotations.append({"id": len(annotations) + 1, "image_id": pair_id,
                                    "category_id": SACO_CATEGORY["id"], "iscrowd": 0,
                                    "segmentation": inst.rle, "bbox": [float(v) for v in inst.bbox],
                                    "area": float(mask_utils.area(inst.rle))})
    return {"images": images, "annotations": annotations, "categories": [dict(SACO_CATEGORY)]}


def _numpy(values: torch.Tensor | np.ndarray) -> np.ndarray:
    return np.asarray(values.detach().cpu() if isinstance(values, torch.Tensor) else values, dtype=np.float64)


def prediction_records(image_id: int, masks: torch.Tensor | np.ndarray, scores: torch.Tensor | np.ndarray,
                       boxes_xyxy: torch.Tensor | np.ndarray | None = None,
                       category_id: int = SACO_CATEGORY["id"]) -> list[dict[str, Any]]:
    """COCO results records for one query's predictions (masks at the original image size).

    Args:
        image_id: the query's id in the ground truth (:func:`saco_pair_id` for our exports).
        masks: (K, H, W) boolean masks.
        scores: (K,) scores.
        boxes_xyxy: optional (K, 4) boxes as absolute ``x0, y0, x1, y1``; written as COCO ``[x, y, w, h]``.
        category_id: the ground truth's category (SA-Co has one).
    """
    scores = _numpy(scores)
    if masks.ndim != 3 or masks.shape[0] != scores.shape[0] or scores.ndim != 1:
        raise ValueError(f"image_id {image_id}: expected masks (K, H, W) and scores (K,), "
                         f"got {tuple(masks.shape)} and {tuple(scores.shape)}")
    records = [{"image_id": image_id, "category_id": category_id, "segmentation": rle, "score": float(s)}
               for rle, s in zip(encode_masks(masks), scores, strict=True)]
    if boxes_xyxy is not None:
        boxes = _numpy(boxes_xyxy)
        if boxes.shape != (len(records), 4):
            raise ValueError(f"image_id {image_id}: expected boxes ({len(records)}, 4), "
                             f"got {tuple(boxes.shape)}")
        for record, (x0, y0, x1, y1) in zip(records, boxes, strict=True):
            record["bbox"] = [float(x0), float(y0), float(x1 - x0), float(y1 - y0)]
    return records


def _canvas_to_original(masks: torch.Tensor, batch: GroundingBatch, image: int) -> torch.Tensor:
    """(K, H, W) bool masks on the batch canvas -> (K, h, w) at the image's original size."""
    (valid_h, valid_w), (orig_h, orig_w) = batch.valid_hw[image].tolist(), batch.orig_hw[image].tolist()
    masks = masks[:, :valid_h, :valid_w]
    if masks.shape[0] and (valid_h, valid_w) != (orig_h, orig_w):
        masks = F.interpolate(masks[None].float(), size=(orig_h, orig_w), mode="bilinear",
                              align_corners=False)[0] >= 0.5
    return masks


def batch_prediction_records(predictions: Mapping[str, Sequence[torch.Tensor] | torch.Tensor],
                             batch: GroundingBatch) -> list[dict[str, Any]]:
    """COCO results for every query of a batch, mapped from the batch canvas to each original image.

    Masks are cropped to the image's valid area and resized to its original size (bilinear on the
    binary mask, kept where >= 0.5); boxes are scaled alike. Image ids are
    :func:`saco_pair_id` (sample key, phrase), the ids :func:`ground_truth_from_samples` and
    :func:`batch_ground_truth` write, so export the ground truth from the same queries the model
    saw (a query cap drops some).

    Args:
        predictions: per query, in batch order: ``masks`` (K_q, H, W) bool on the canvas,
            ``scores`` (K_q,), optionally ``keep`` (K_q,) bool (only those are written) and
            ``boxes_xyxy`` (K_q, 4) normalised to the canvas. Lists or padded (Q, K, ...) tensors.
        batch: the batch the predictions are for.
    """
    canvas_h, canvas_w = batch.images.shape[-2:]
    keep = predictions.get("keep")
    records = []
    for q, image in enumerate(batch.query_image.tolist()):
        (valid_h, valid_w), (orig_h, orig_w) = batch.valid_hw[image].tolist(), batch.orig_hw[image].tolist()
        masks, scores = predictions["masks"][q], predictions["scores"][q]
        boxes = predictions["boxes_xyxy"][q] if "boxes_xyxy" in predictions else None
        if keep is not None:
            masks, scores = masks[keep[q]], scores[keep[q]]
            boxes = None if boxes is None else boxes[keep[q]]
        masks = _canvas_to_original(masks, batch, image)
        if boxes is not None:
            scale = torch.tensor([canvas_w * orig_w / valid_w, canvas_h * orig_h / valid_h] * 2,
                                 dtype=torch.float64, device=boxes.device)
            boxes = boxes.to(torch.float64) * scale
        records += prediction_records(saco_pair_id(batch.keys[image], batch.phrases[q]), masks, scores, boxes)
    return records


def batch_ground_truth(batch: GroundingBatch) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """SA-Co ``images`` and ``annotations`` for every query of a batch, masks at the original size.

    The counterpart of :func:`batch_prediction_records` for labelled batches (annotation ``id``s
    count from 1 within the batch: renumber when merging batches). The canvas round trip
    (resize down, back up) makes masks approximate for images larger than the canvas; score
    against the source annotations (:func:`ground_truth_from_samples`) for exact numbers.
    """
    images, annotations = [], []
    for q, rows in enumerate(batch.instance_slices()):
        image = int(batch.query_image[q])
        orig_h, orig_w = batch.orig_hw[image].tolist()
        pair_id = saco_pair_id(batch.keys[image], batch.phrases[q])
        file_name = batch.image_files[image] if batch.image_files else batch.keys[image]
        images.append({"id": pair_id, "file_name": file_name, "height": orig_h, "width": orig_w,
                       "text_input": batch.phrases[q], "is_instance_exhaustive": int(batch.exhaustive[q]),
                       "sample_key": batch.keys[image]})
        masks = _canvas_to_original(batch.masks[rows].cpu(), batch, image)
        for rle in encode_masks(masks):
            annotations.append({"id": len(annotations) + 1, "image_id": pair_id,
                                "category_id": SACO_CATEGORY["id"], "iscrowd": 0, "segmentation": rle,
                                "bbox": [float(v) for v in mask_utils.toBbox(rle)],
                                "area": float(mask_utils.area(rle))})
    return images, annotations
