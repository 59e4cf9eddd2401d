"""The batch every model and Lightning module consumes (what ``ShardDataModule`` collates to)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
from torch import Tensor


@dataclass
class GroundingBatch:
    """B images, Q (image, phrase) queries and N annotated instances.

    Images are RGB in [0, 1] on a common padded canvas of size (H, W); each model resizes and
    normalises them itself, so a teacher and a student can share one batch. Instances are
    packed in query order: the instances of query ``q`` are the ``num_instances[q]`` rows that
    start at ``num_instances[:q].sum()``.

    Attributes:
        images: (B, 3, H, W) float32 in [0, 1], zero-padded at the bottom/right.
        valid_hw: (B, 2) long, height and width of the image content inside the canvas.
        orig_hw: (B, 2) long, the original image size before resizing (for exporting results).
        keys: B sample keys.
        phrases: Q noun phrases.
        query_image: (Q,) long, the image index of each query.
        exhaustive: (Q,) bool, every instance of the phrase is annotated (negatives need it).
        num_instances: (Q,) long, instances per query (0 for a negative phrase).
        boxes: (N, 4) float, normalised (cx, cy, w, h) relative to the canvas (H, W).
        masks: (N, H, W) bool on the canvas.
        instance_query: (N,) long, the query each instance belongs to.
        image_ids: B original image ids (from the sample json), for exporting results.
        image_files: B source image file names (``{key}.{format}`` for generated samples), for
            exporting results; empty when the batch was built by hand.
        teacher: optional cached teacher targets per query (offline distillation), each a tensor
            whose first dimension is Q.
        max_instances: ``num_instances.max()`` as a Python int (the collate function sets it), so that
            padding per-query targets needs no read of a device tensor; ``None``: read when needed.
    """

    images: Tensor
    valid_hw: Tensor
    orig_hw: Tensor
    keys: list[str]
    phrases: list[str]
    query_image: Tensor
    exhaustive: Tensor
    num_instances: Tensor
    boxes: Tensor
    masks: Tensor
    instance_query: Tensor
    image_ids: list = field(default_factory=list)
    image_files: list[str] = field(default_factory=list)
    teacher: dict[str, Tensor] | None = None
    max_instances: int | None = None

    @property
    def num_images(self) -> int:
        return self.images.shape[0]

    @property
    def num_queries(self) -> int:
        return len(self.phrases)

    def pin_memory(self) -> GroundingBatch:
        """Page-locked copy (``DataLoader(pin_memory=True)`` calls this on custom batch types)."""
        pinned = {name: value.pin_memory() for name, value in vars(self).items() if isinstance(value, Tensor)}
        teacher = {k: v.pin_memory() for k, v in self.teacher.items()} if self.teacher is not None else None
        return replace(self, **pinned, teacher=teacher)

    def instance_slices(self) -> list[slice]:
        """Per query, the slice of ``boxes``/``masks`` holding its instances."""
        ends = torch.cumsum(self.num_instances, 0).tolist()
        starts = [0] + ends[:-1]
        return [slice(s, e) for s, e in zip(starts, ends, strict=True)]

    def validate(self) -> None:
        """Raise ``ValueError`` when the fields disagree with each other (cheap shape checks)."""
        b, q, n = self.num_images, self.num_queries, self.boxes.shape[0]
        h, w = self.images.shape[-2:]
        checks = {
            "valid_hw": self.valid_hw.shape == (b, 2), "orig_hw": self.orig_hw.shape == (b, 2),
            "keys": len(self.keys) == b, "query_image": self.query_image.shape == (q,),
            "exhaustive": self.exhaustive.shape == (q,), "num_instances": self.num_instances.shape == (q,),
            "boxes": self.boxes.shape == (n, 4), "masks": self.masks.shape == (n, h, w),
            "instance_query": self.instance_query.shape == (n,),
            "num_instances.sum": int(self.num_instances.sum()) == n,
        }
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            raise ValueError(f"inconsistent GroundingBatch fields: {bad}")
