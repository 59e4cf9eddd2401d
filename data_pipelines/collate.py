"""From raw shard records to :class:`~data_pipelines.batch.GroundingBatch`.

:class:`SampleTransform` turns one webdataset record into a :class:`PreparedSample`:

1. validate the record against the schema (errors name the shard, sample and field);
2. choose queries (:class:`QueryPolicy`): at most ``max_queries`` (positives preferred), and in
   training extra negative phrases from the vocabulary (look-alikes of the positives first), only
   for images whose queries are all exhaustive and never a phrase the image was already asked or
   one its positives imply;
3. decode the image (in training, cut large images to a random full-resolution crop first) and
   the chosen queries' masks, augment both through one geometry
   (``data_pipelines.augment``), drop instances left with too few pixels and recompute tight
   boxes; a positive whose instances all vanished becomes a negative if its query is
   exhaustive and is dropped otherwise;
4. pick the rows of ``teacher.safetensors`` for the kept queries.

:func:`collate_samples` stacks prepared samples into a GroundingBatch.

Teacher contract (offline distillation): ``teacher.safetensors`` holds tensors whose first
dimension is the number of queries in the sample's json, one row per query in json order (loaded
with ``safetensors.torch.load``, never pickle). The batch's ``teacher[name]`` has one row per
batch query, aligned with ``phrases`` after capping and negative sampling; queries without a
teacher row (added negatives, samples without a file) get zeros and ``teacher["valid"] = False``.
``valid`` is reserved. Cached outputs describe the unaugmented image, so samples carrying a
teacher file get no flip or scale jitter: teacher boxes and masks stay aligned with the resized
image, whose extent on the canvas is ``valid_hw``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from safetensors.torch import load as load_safetensors
from torch import Tensor
from torchvision.io import ImageReadMode, decode_image

from data_pipelines.augment import (
    AugmentConfig,
    mask_areas_and_boxes,
    normalized_cxcywh,
    sample_geometry,
    warp_image,
    warp_masks,
)
from data_pipelines.batch import GroundingBatch
from data_pipelines.schema import (
    TEACHER_FIELD,
    Query,
    Sample,
    SampleError,
    decode_rle,
    normalize_phrase,
    sample_from_wds,
)
from data_pipelines.tiling import CropConfig, random_training_crop
from data_pipelines.vocab import Vocabulary

TEACHER_VALID = "valid"
MIRRORED_WORDS = re.compile(r"\b(left|right)\b")


@dataclass(frozen=True)
class QueryPolicy:
    """Which queries of an image a batch asks.

    Attributes:
        max_queries: at most this many queries per image, added negatives included.
        negatives_per_image: extra negative phrases per exhaustively labelled image (training).
        vocabulary: phrases to draw extra negatives from.
        concepts: the vocabulary's concepts (``data_pipelines.vocab``): added negatives then never
            contradict a positive (no parent, child or synonym of a phrase present in the image),
            and up to ``hard_negatives_per_image`` of them are look-alikes of the positives.
        hard_negatives_per_image: of the added negatives, at most this many are look-alikes
            (``!`` in the vocabulary file) of the image's positive phrases; the rest are drawn
            from ``vocabulary`` at random. Only look-alikes that are concepts of the vocabulary
            are asked: an exhaustively labelled image is taken to be labelled for the vocabulary's
            concepts, not for every phrase named after a ``!`` ("leaf" on an orchard image).
    """

    max_queries: int = 16
    negatives_per_image: int = 0
    vocabulary: tuple[str, ...] = ()
    concepts: Vocabulary | None = None
    hard_negatives_per_image: int = 0

    def __post_init__(self) -> None:
        if self.max_queries < 1 or self.negatives_per_image < 0 or self.hard_negatives_per_image < 0:
            raise ValueError(f"need max_queries >= 1, negatives_per_image >= 0 and hard_negatives_per_image >= 0, "
                             f"got {self}")

    def select(self, queries: Sequence[Query],
               rng: np.random.Generator | None) -> list[tuple[int | None, Query]]:
        """(index in the sample's json or None for an added negative, query) pairs, in json order.

        Positives are kept first; without ``rng`` the first ones in json order, with it a random
        subset. Negatives are added only with ``rng`` (training).
        """
        positives = [i for i, q in enumerate(queries) if q.instances]
        negatives = [i for i, q in enumerate(queries) if not q.instances]
        if rng is not None:
            positives = list(rng.permutation(positives)) if positives else []
            negatives = list(rng.permutation(negatives)) if negatives else []
        kept = sorted(int(i) for i in (positives + negatives)[:self.max_queries])
        chosen: list[tuple[int | None, Query]] = [(i, queries[i]) for i in kept]
        room = min(self.negatives_per_image, self.max_queries - len(chosen))
        if rng is not None and room > 0 and queries and all(q.exhaustive for q in queries):
            chosen += [(None, Query(phrase=p, instances=[], exhaustive=True))
                       for p in self._draw_negatives(queries, room, rng)]
        return chosen

    def _draw_negatives(self, queries: Sequence[Query], count: int, rng: np.random.Generator) -> list[str]:
        excluded = {normalize_phrase(q.phrase) for q in queries}
        hard: list[str] = []
        if self.concepts is not None:
            present = [q.phrase for q in queries if q.instances]
            excluded |= self.concepts.implied(present)
            if self.hard_negatives_per_image:
                candidates = [p for p in self.concepts.hard_negative_candidates(present)
                              if p in self.concepts and p not in excluded]
                take = min(count, self.hard_negatives_per_image, len(candidates))
                hard = [candidates[i] for i in rng.permutation(len(candidates))[:take]]
                excluded |= set(hard)
        vocabulary = self.vocabulary
        draw = rng.choice(len(vocabulary), size=min(len(vocabulary), count - len(hard) + len(excluded)),
                          replace=False) if vocabulary else []
        picked = [vocabulary[i] for i in draw if normalize_phrase(vocabulary[i]) not in excluded]
        return hard + picked[:count - len(hard)]


@dataclass
class PreparedSample:
    """One image ready to collate: canvas tensors and its final queries.

    Attributes:
        key: the sample key.
        image_id: the image id from the sample json.
        image_file: the source image's file name (``{key}.{format}`` for generated samples).
        image: (3, S, S) float32 in [0, 1] on the canvas.
        valid_hw: content extent on the canvas.
        orig_hw: the original image size.
        phrases: the image's queries.
        exhaustive: per query.
        num_instances: per query.
        masks: (N, S, S) bool, instances in query order.
        boxes: (N, 4) normalised cxcywh on the canvas.
        teacher: per-query teacher rows (aligned with ``phrases``) and ``valid``, or None.
    """

    key: str
    image_id: Any
    image_file: str
    image: Tensor
    valid_hw: tuple[int, int]
    orig_hw: tuple[int, int]
    phrases: list[str]
    exhaustive: list[bool]
    num_instances: list[int]
    masks: Tensor
    boxes: Tensor
    teacher: dict[str, Tensor] | None = None


class SampleTransform:
    """Raw webdataset record -> :class:`PreparedSample` (a picklable callable for DataLoader workers).

    Args:
        policy: query capping and negative sampling.
        augment: canvas size and augmentation; used as given when called with an ``rng``, as
            resize + pad only without one.
        crop: with an ``rng`` (training), an image larger than ``crop.size`` is first cut to a
            random crop of that size at full resolution (``data_pipelines.tiling``); instances cut
            by it keep their visible part or make their query non-exhaustive. Samples carrying
            teacher outputs are not cropped (the outputs describe the whole image).
    """

    def __init__(self, policy: QueryPolicy, augment: AugmentConfig, crop: CropConfig | None = None) -> None:
        self.policy, self.augment, self.crop = policy, augment, crop

    def __call__(self, record: dict[str, Any], rng: np.random.Generator | None = None) -> PreparedSample:
        sample = sample_from_wds(record)
        where = {"source": record.get("__url__"), "key": sample.key}
        chosen = self.policy.select(sample.queries, rng)
        image = _decode_image(sample, where)
        if rng is not None and sample.teacher is None:
            image, chosen = self._random_crop(image, chosen, rng)
        height, width = image.shape[-2:]
        augment = self.augment if rng is not None else self.augment.resize_only()
        mirrored = any(MIRRORED_WORDS.search(q.phrase.lower()) for _, q in chosen)
        geometry_rng = rng if sample.teacher is None else None  # teacher outputs fix the geometry
        geometry = sample_geometry((height, width), augment, geometry_rng, allow_flip=not mirrored)
        canvas_image = warp_image(image, geometry, augment.color_jitter, rng)

        rles = [inst.rle for _, q in chosen for inst in q.instances]
        raw = torch.from_numpy(np.stack([decode_rle(r) for r in rles])) if rles else \
            torch.zeros((0, height, width), dtype=torch.bool)
        masks = warp_masks(raw, geometry)
        areas, boxes = mask_areas_and_boxes(masks)
        keep = areas >= augment.min_instance_area
        owner = torch.tensor([qi for qi, (_, q) in enumerate(chosen) for _ in q.instances], dtype=torch.long)
        final, counts = _surviving_queries([q for _, q in chosen], keep, owner)
        selected = keep & torch.isin(owner, torch.tensor(final, dtype=torch.long))
        masks, boxes = masks[selected], normalized_cxcywh(boxes[selected], augment.image_size)
        teacher = None
        if sample.teacher is not None:
            teacher = _teacher_rows(sample.teacher, len(sample.queries), [chosen[i][0] for i in final], where)
        return PreparedSample(key=sample.key, image_id=sample.image_id, image_file=sample.image_file,
                              image=canvas_image,
                              valid_hw=geometry.valid_hw, orig_hw=(height, width),
                              phrases=[chosen[i][1].phrase for i in final],
                              exhaustive=[chosen[i][1].exhaustive for i in final], num_instances=counts,
                              masks=masks, boxes=boxes, teacher=teacher)

    def _random_crop(self, image: Tensor, chosen: list[tuple[int | None, Query]],
                     rng: np.random.Generator) -> tuple[Tensor, list[tuple[int | None, Query]]]:
        """A random ``crop.size`` part of a larger (3, H, W) image and the chosen queries cut to it."""
        if self.crop is None or (image.shape[-2] <= self.crop.size[0] and image.shape[-1] <= self.crop.size[1]):
            return image, chosen
        crop = random_training_crop(image.permute(1, 2, 0).numpy(), [q for _, q in chosen], self.crop, rng)
        cropped = torch.from_numpy(np.ascontiguousarray(crop.image)).permute(2, 0, 1)
        return cropped, [(index, query) for (index, _), query in zip(chosen, crop.queries, strict=True)]


def _surviving_queries(queries: list[Query], keep: Tensor, owner: Tensor) -> tuple[list[int], list[int]]:
    """Indices of the queries that stay after augmentation, and their instance counts.

    A positive whose instances were all cropped away stays as a negative when it is exhaustive;
    otherwise its absence is unknown and it is dropped.
    """
    final, counts = [], []
    for qi, query in enumerate(queries):
        n = int(keep[owner == qi].sum())
        if query.instances and n == 0 and not query.exhaustive:
            continue
        final.append(qi)
        counts.append(n)
    return final, counts


def _decode_image(sample: Sample, where: dict[str, Any]) -> Tensor:
    try:
        data = torch.frombuffer(bytearray(sample.image), dtype=torch.uint8)
        image = decode_image(data, mode=ImageReadMode.RGB)
    except RuntimeError as err:
        raise SampleError(f"image does not decode: {err}", field=sample.image_format, **where) from err
    if tuple(image.shape[-2:]) != (sample.height, sample.width):
        raise SampleError(f"image is {image.shape[-1]}x{image.shape[-2]} but metadata says "
                          f"{sample.width}x{sample.height}", field="image.width/height", **where)
    return image


def _teacher_rows(data: bytes, num_queries: int, rows: list[int | None],
                  where: dict[str, Any]) -> dict[str, Tensor]:
    try:
        tensors = load_safetensors(data)
    except Exception as err:  # safetensors raises its own SafetensorError on corrupt headers
        raise SampleError(f"does not load: {err}", field=TEACHER_FIELD, **where) from err
    if TEACHER_VALID in tensors:
        raise SampleError(f"the name {TEACHER_VALID!r} is reserved for the batch's row mask",
                          field=TEACHER_FIELD, **where)
    for name, tensor in tensors.items():
        if tensor.dim() == 0 or tensor.shape[0] != num_queries:
            raise SampleError(f"{name!r} has shape {list(tensor.shape)}; its first dimension must be the "
                              f"{num_queries} queries of the sample json", field=TEACHER_FIELD, **where)
    present = torch.tensor([r is not None for r in rows], dtype=torch.bool)
    index = torch.tensor([r if r is not None else 0 for r in rows], dtype=torch.long)
    out = {}
    for name, tensor in tensors.items():
        picked = tensor[index]
        picked[~present] = 0
        out[name] = picked
    out[TEACHER_VALID] = present
    return out


def collate_samples(samples: Sequence[PreparedSample]) -> GroundingBatch:
    """Stack prepared samples into a :class:`GroundingBatch` (queries and instances in image order)."""
    if not samples:
        raise ValueError("cannot collate an empty list of samples")
    num_instances = torch.tensor([n for s in samples for n in s.num_instances], dtype=torch.long)
    query_image = torch.tensor([i for i, s in enumerate(samples) for _ in s.phrases], dtype=torch.long)
    return GroundingBatch(
        images=torch.stack([s.image for s in samples]),
        valid_hw=torch.tensor([s.valid_hw for s in samples], dtype=torch.long),
        orig_hw=torch.tensor([s.orig_hw for s in samples], dtype=torch.long),
        keys=[s.key for s in samples],
        phrases=[p for s in samples for p in s.phrases],
        query_image=query_image,
        exhaustive=torch.tensor([e for s in samples for e in s.exhaustive], dtype=torch.bool),
        num_instances=num_instances,
        boxes=torch.cat([s.boxes for s in samples]).float(),
        masks=torch.cat([s.masks for s in samples]),
        instance_query=torch.repeat_interleave(torch.arange(len(num_instances)), num_instances),
        image_ids=[s.image_id for s in samples],
        image_files=[s.image_file for s in samples],
        teacher=_collate_teacher(samples),
        max_instances=int(num_instances.max()) if len(num_instances) else 0,
    )


def _collate_teacher(samples: Sequence[PreparedSample]) -> dict[str, Tensor] | None:
    with_teacher = [s for s in samples if s.teacher is not None]
    if not with_teacher:
        return None
    reference = with_teacher[0]
    names = [n for n in reference.teacher if n != TEACHER_VALID]
    out: dict[str, list[Tensor]] = {name: [] for name in [*names, TEACHER_VALID]}
    for sample in samples:
        q = len(sample.phrases)
        if sample.teacher is None:
            for name in names:
                ref = reference.teacher[name]
                out[name].append(ref.new_zeros((q, *ref.shape[1:])))
            out[TEACHER_VALID].append(torch.zeros(q, dtype=torch.bool))
            continue
        if set(sample.teacher) != set(reference.teacher):
            raise ValueError(f"teacher files of {sample.key!r} and {reference.key!r} hold different tensors: "
                             f"{sorted(sample.teacher)} vs {sorted(reference.teacher)}")
        for name in [*names, TEACHER_VALID]:
            rows, ref = sample.teacher[name], reference.teacher[name]
            if rows.shape[1:] != ref.shape[1:] or rows.dtype != ref.dtype:
                raise ValueError(f"teacher {name!r} of {sample.key!r} is {rows.dtype} {list(rows.shape[1:])} "
                                 f"per query but {ref.dtype} {list(ref.shape[1:])} in {reference.key!r}")
            out[name].append(rows)
    return {name: torch.cat(parts) for name, parts in out.items()}

