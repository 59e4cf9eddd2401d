"""GroundingBatch -> sam3 target dicts, and a Hungarian matcher that never sees NaN/inf costs."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from sam3.model.box_ops import box_cxcywh_to_xyxy
from sam3.train.matcher import BinaryHungarianMatcherV2
from torch import Tensor, nn

from data_pipelines.batch import GroundingBatch

_LOGIT_LIMIT = 20.0
_MIN_BOX_SIDE = 1e-4


def to_sam3_targets(
    batch: GroundingBatch, mask_size: tuple[int, int] | None = None, device: torch.device | str | None = None
) -> dict[str, Tensor | None]:
    """The target dict sam3's matchers and losses read (what ``Sam3Image.back_convert`` builds).

    One row per query; boxes stay normalised cxcywh on the canvas (the model resizes the whole
    canvas, so normalised coordinates carry over unchanged).

    Args:
        batch: The collated batch (instances packed in query order).
        mask_size: (h, w) to resize the instance masks to (the prediction resolution); ``None``
            leaves masks out (enough for matching).
        device: Where the targets go (defaults to the batch's device).
    """
    device = torch.device(device) if device is not None else batch.boxes.device
    num_instances = batch.num_instances.to(device)
    num_queries, total = len(num_instances), int(num_instances.sum())
    expected_owner = torch.repeat_interleave(torch.arange(num_queries, device=device), num_instances)
    if not torch.equal(batch.instance_query.to(device), expected_owner):
        raise ValueError(
            "GroundingBatch instances must be packed in query order "
            "(instance_query == repeat_interleave(arange(Q), num_instances))"
        )
    boxes = batch.boxes.to(device=device, dtype=torch.float32)
    width = max(int(num_instances.max()) if num_queries else 0, 1)
    starts = torch.cumsum(num_instances, 0) - num_instances
    slot = torch.arange(total, device=device) - starts[expected_owner]
    boxes_padded = boxes.new_zeros(num_queries, width, 4)
    boxes_padded[expected_owner, slot] = boxes
    ids_padded = torch.full((num_queries, width), -1, dtype=torch.long, device=device)
    ids_padded[expected_owner, slot] = torch.arange(total, device=device)
    masks = None
    if mask_size is not None:
        masks = batch.masks.to(device)
        if tuple(masks.shape[-2:]) != tuple(mask_size):
            masks = (
                F.interpolate(
                    masks[:, None].float(),
                    size=tuple(mask_size),
                    mode="bilinear",
                    antialias=True,
                    align_corners=False,
                )[:, 0]
                >= 0.5
            )
        masks = masks.float()
    return {
        "boxes": boxes,
        "boxes_xyxy": box_cxcywh_to_xyxy(boxes),
        "boxes_padded": boxes_padded,
        "positive_map": boxes.new_ones(total, 1),
        "num_boxes": num_instances,
        "masks": masks,
        "semantic_masks": None,
        "is_valid_mask": torch.ones(total, dtype=torch.bool, device=device),
        "is_exhaustive": batch.exhaustive.to(device=device, dtype=torch.bool),
        "object_ids_packed": torch.arange(total, device=device),
        "object_ids_padded": ids_padded,
    }


class FiniteCostMatcher(nn.Module):
    """Wraps a sam3 matcher so its cost matrix is always finite.

    A freshly initialised or diverging model can emit NaN/inf logits or degenerate boxes, and
    scipy's ``linear_sum_assignment`` then fails with "matrix contains invalid numeric entries".
    Logits are clamped to +-20 (NaN -> 0), boxes to [0, 1] with sides >= 1e-4 (NaN -> 0.5).
    ``num_sanitized`` counts the calls whose predictions contained non-finite values.

    Args:
        matcher: A sam3 matcher (e.g. ``BinaryHungarianMatcherV2``).
    """

    def __init__(self, matcher: nn.Module) -> None:
        super().__init__()
        self.matcher = matcher
        self.num_sanitized = 0

    @torch.no_grad()
    def forward(self, outputs: dict, targets: dict, **kwargs) -> tuple[Tensor, Tensor, Tensor | None]:
        logits, boxes = outputs["pred_logits"].detach(), outputs["pred_boxes"].detach()
        if not (torch.isfinite(logits).all() and torch.isfinite(boxes).all()):
            self.num_sanitized += 1
        logits = torch.nan_to_num(logits, nan=0.0, posinf=_LOGIT_LIMIT, neginf=-_LOGIT_LIMIT)
        boxes = torch.nan_to_num(boxes, nan=0.5, posinf=1.0, neginf=0.0)
        boxes = torch.cat([boxes[..., :2].clamp(0, 1), boxes[..., 2:].clamp(_MIN_BOX_SIDE, 1)], dim=-1)
        clean = {"pred_logits": logits.clamp(-_LOGIT_LIMIT, _LOGIT_LIMIT), "pred_boxes": boxes}
        return self.matcher(clean, targets, **kwargs)


def hungarian_matcher(
    cost_class: float = 2.0,
    cost_bbox: float = 5.0,
    cost_giou: float = 2.0,
    alpha: float = 0.25,
    gamma: float = 2.0,
) -> FiniteCostMatcher:
    """SAM3's one-to-one matcher (``BinaryHungarianMatcherV2``, focal class cost), NaN-guarded.

    Args:
        cost_class: Weight of the focal classification cost.
        cost_bbox: Weight of the L1 box cost.
        cost_giou: Weight of the generalised-IoU cost.
        alpha: Focal cost alpha.
        gamma: Focal cost gamma.
    """
    return FiniteCostMatcher(
        BinaryHungarianMatcherV2(
            focal=True,
            cost_class=cost_class,
            cost_bbox=cost_bbox,
            cost_giou=cost_giou,
            alpha=alpha,
            gamma=gamma,
            stable=False,
        )
    )
