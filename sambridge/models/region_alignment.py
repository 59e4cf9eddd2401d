"""Region-phrase alignment: an auxiliary training signal that teaches the image features the phrases.

The grounding head learns what a phrase looks like only through its queries' matching scores, a
long way from the image trunk. GLIP and RegionCLIP align image regions with words directly; here
each annotated instance's feature, averaged inside its mask on the level the head's tokens come
from, is scored against every phrase asked of its image (a dot product after one linear projection
on each side), with target 1 where the phrase names the instance and 0 where an exhaustive phrase
does not. On the CWFID real-photo check it lifts the tiny model's cgF1 and AP (``docs/training.md``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from data_pipelines.batch import GroundingBatch

SAME_OBJECT_IOU = 0.5
"""Mask IoU above which instances of two phrases of one image are the same object."""

IDENTITY_GRID = 32
"""Side of the grid the instance masks are compared on to find the same object under two phrases."""


def mask_mean(features: Tensor, masks: Tensor, image: Tensor) -> Tensor:
    """(N, d) mean of (B, d, h, w) ``features`` of image ``image[n]`` inside (N, H, W) mask n, each mask
    area-resized to the feature grid (a cell counts by the fraction of it the mask covers)."""
    weights = F.interpolate(masks.to(features.dtype)[:, None], size=features.shape[-2:], mode="area")[:, 0]
    pooled = torch.einsum("ndhw,nhw->nd", features[image], weights)
    return pooled / weights.sum((1, 2)).clamp(min=1e-6)[:, None]


class RegionPhraseAlignment(nn.Module):
    """Scores of the annotated instances against the phrases of their image (training only).

    Args:
        d_model: Width of the image features and of the phrase embeddings.
    """

    def __init__(self, d_model: int) -> None:
        super().__init__()
        self.region = nn.Linear(d_model, d_model)
        self.phrase = nn.Linear(d_model, d_model)
        self.bias = nn.Parameter(torch.zeros(()))

    def forward(self, features: Tensor, phrases: Tensor, batch: GroundingBatch) -> dict[str, Tensor]:
        """(B, d, h, w) image features and (Q, d) embeddings of ``batch``'s phrases -> ``logits``,
        ``target`` and ``known``, each (N instances, Q phrases); reads nothing back to the host.

        ``known`` marks the pairs that have a target: the phrases of the instance's own image that
        name it, and the exhaustive ones that do not.
        """
        image = batch.query_image[batch.instance_query]
        pooled = mask_mean(features, batch.masks, image)
        logits = self.region(pooled) @ self.phrase(phrases).T / math.sqrt(pooled.shape[-1]) + self.bias
        masks = batch.masks.to(features.dtype)[:, None]
        coarse = (F.interpolate(masks, size=(IDENTITY_GRID, IDENTITY_GRID), mode="area")[:, 0] >= 0.5).flatten(1)
        overlap = coarse.float() @ coarse.float().T
        area = coarse.sum(1).float()
        iou = overlap / (area[:, None] + area[None, :] - overlap).clamp(min=1.0)
        itself = torch.eye(len(iou), dtype=torch.bool, device=iou.device)  # also a speck of a few pixels
        same_object = ((iou > SAME_OBJECT_IOU) & (image[:, None] == image[None, :])) | itself
        membership = F.one_hot(batch.instance_query, batch.num_queries).float()  # (N, Q)
        target = (same_object.float() @ membership) > 0
        same_image = image[:, None] == batch.query_image[None, :]
        known = same_image & (target | batch.exhaustive[None, :])
        return {"logits": logits, "target": target.float(), "known": known.float()}
