"""GroundingBatch -> sam3 target dicts, and a Hungarian matcher that never sees NaN/inf costs and
reads the device once per call (or once for several decoder outputs: ``FiniteCostMatcher.match_many``)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from sam3.model.box_ops import box_cxcywh_to_xyxy, generalized_box_iou
from sam3.train.matcher import BinaryHungarianMatcherV2, _do_matching
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
    num_queries, total = len(num_instances), batch.boxes.shape[0]
    owner = batch.instance_query.to(device)
    if owner.shape != (total,):
        raise ValueError(f"instance_query has shape {tuple(owner.shape)}, boxes {tuple(batch.boxes.shape)}")
    # the packing check runs on the device (no host read); a violation fails there, at the latest by the
    # next read of a value
    expected_owner = torch.repeat_interleave(torch.arange(num_queries, device=device), num_instances,
                                             output_size=total)
    torch._assert_async(
        (owner == expected_owner).all(),
        "GroundingBatch instances must be packed in query order "
        "(instance_query == repeat_interleave(arange(Q), num_instances))",
    )
    boxes = batch.boxes.to(device=device, dtype=torch.float32)
    width = max(_max_instances(batch, num_instances) if num_queries else 0, 1)
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


def _max_instances(batch: GroundingBatch, num_instances: Tensor) -> int:
    """The largest instance count of a query: the collated host copy, or a read of the device tensor."""
    return batch.max_instances if batch.max_instances is not None else int(num_instances.max())


class FiniteCostMatcher(nn.Module):
    """Wraps a sam3 matcher so its cost matrix is always finite.

    A freshly initialised or diverging model can emit NaN/inf logits or degenerate boxes, and
    scipy's ``linear_sum_assignment`` then fails with "matrix contains invalid numeric entries".
    Logits are clamped to +-20 (NaN -> 0), boxes to [0, 1] with sides >= 1e-4 (NaN -> 0.5).
    ``num_sanitized`` counts the calls whose predictions contained non-finite values.

    With sam3's ``BinaryHungarianMatcherV2`` the matching is sam3's (same costs, same scipy
    assignment, same indices), but the device is read once per call instead of once per matched pair:
    the cost matrices, the target counts and the non-finite flags travel to the host in one copy, and
    the indices come back in one (non-blocking from pinned memory on a GPU). ``match_many`` matches
    several outputs (the final and every auxiliary decoder layer) against the same targets with that
    single copy. Other matchers are called as they are.

    Args:
        matcher: A sam3 matcher (e.g. ``BinaryHungarianMatcherV2``).
    """

    def __init__(self, matcher: nn.Module) -> None:
        super().__init__()
        self.matcher = matcher
        self.num_sanitized = 0

    @staticmethod
    def _clean(outputs: dict) -> tuple[Tensor, Tensor, Tensor]:
        """Finite (logits, boxes) and a 0-d bool tensor telling whether anything had to be replaced."""
        logits, boxes = outputs["pred_logits"].detach(), outputs["pred_boxes"].detach()
        nonfinite = ~(torch.isfinite(logits).all() & torch.isfinite(boxes).all())
        logits = torch.nan_to_num(logits, nan=0.0, posinf=_LOGIT_LIMIT, neginf=-_LOGIT_LIMIT)
        boxes = torch.nan_to_num(boxes, nan=0.5, posinf=1.0, neginf=0.0)
        boxes = torch.cat([boxes[..., :2].clamp(0, 1), boxes[..., 2:].clamp(_MIN_BOX_SIDE, 1)], dim=-1)
        return logits.clamp(-_LOGIT_LIMIT, _LOGIT_LIMIT), boxes, nonfinite

    @torch.no_grad()
    def forward(self, outputs: dict, targets: dict, **kwargs) -> tuple[Tensor, Tensor, Tensor | None]:
        if isinstance(self.matcher, BinaryHungarianMatcherV2) and kwargs.get("repeat_batch", 1) <= 1:
            kwargs.pop("repeat_batch", None)
            return self.match_many([outputs], targets, **kwargs)[0]
        logits, boxes, nonfinite = self._clean(outputs)
        if nonfinite:
            self.num_sanitized += 1
        return self.matcher({"pred_logits": logits, "pred_boxes": boxes}, targets, **kwargs)

    @torch.no_grad()
    def match_many(self, outputs: Sequence[dict], targets: dict, repeats: int = 1,
                   out_is_valid: Tensor | None = None,
                   target_is_valid_padded: Tensor | None = None) -> list[tuple[Tensor, Tensor, Tensor | None]]:
        """sam3's ``BinaryHungarianMatcherV2`` matching of each of ``outputs`` against the same targets,
        with one device-to-host copy for all of them.

        Args:
            outputs: Dicts with ``pred_logits`` (B, K, 1) and ``pred_boxes`` (B, K, 4) cxcywh.
            targets: sam3 targets (``num_boxes``, ``boxes_padded``; see :func:`to_sam3_targets`).
            repeats: Targets repeated this many times (sam3's argument).
            out_is_valid: (B, K) bool, predictions that may be matched (``None``: all).
            target_is_valid_padded: (B, T) bool, padded targets that may be matched (``None``: all).

        Returns:
            Per output, ``(batch_idx, src_idx, tgt_idx)`` as sam3's matcher returns them
            (``tgt_idx`` is ``None`` when every target is matched, in packed order).
        """
        matcher = self.matcher
        if not isinstance(matcher, BinaryHungarianMatcherV2):
            raise TypeError(f"match_many needs sam3's BinaryHungarianMatcherV2, got {type(matcher).__name__}")
        if not outputs:
            return []
        num_boxes = targets["num_boxes"]
        device = outputs[0]["pred_logits"].device
        costs, flags = [], []
        for out in outputs:
            logits, boxes, nonfinite = self._clean(out)
            costs.append(self._cost(logits, boxes, targets["boxes_padded"], out_is_valid, target_is_valid_padded))
            flags.append(nonfinite)
        # the one device read: every cost matrix, the target counts and the non-finite flags
        host = torch.cat([c.float().flatten() for c in costs]
                         + [num_boxes.float(), torch.stack(flags).float()]).cpu().numpy()
        sizes = [c.numel() for c in costs]
        counts = host[sum(sizes):sum(sizes) + len(num_boxes)].astype(np.int64)
        self.num_sanitized += int(host[-len(outputs):].sum())
        do_filtering = out_is_valid is not None or target_is_valid_padded is not None
        results = []
        offset = 0
        for cost, size in zip(costs, sizes, strict=True):
            matrix = host[offset:offset + size].reshape(cost.shape)
            offset += size
            results.append(self._assign(matrix, counts, repeats, do_filtering))
        return _to_device(results, device)

    def _cost(self, logits: Tensor, boxes: Tensor, tgt_bbox: Tensor, out_is_valid: Tensor | None,
              target_is_valid_padded: Tensor | None) -> Tensor:
        """sam3 ``BinaryHungarianMatcherV2``'s (B, K, T) cost, for every query (with targets or not)."""
        m = self.matcher
        out_score = logits.squeeze(-1)
        cost_bbox = torch.cdist(boxes, tgt_bbox, p=1)
        cost_giou = -generalized_box_iou(box_cxcywh_to_xyxy(boxes), box_cxcywh_to_xyxy(tgt_bbox))
        out_prob = m.norm(out_score)
        if not m.focal:
            cost_class = -out_prob.unsqueeze(-1).expand_as(cost_bbox)
        elif m.stable:
            rescaled_giou = (-cost_giou + 1) / 2
            out_prob = out_prob.unsqueeze(-1).expand_as(cost_bbox) * rescaled_giou
            cost_class = (-m.alpha * (1 - out_prob) ** m.gamma * torch.log(out_prob)
                          + (1 - m.alpha) * out_prob ** m.gamma * torch.log(1 - out_prob))
        else:
            log_out_prob = F.logsigmoid(out_score)
            log_one_minus_out_prob = F.logsigmoid(-out_score)
            cost_class = (-m.alpha * (1 - out_prob) ** m.gamma * log_out_prob
                          + (1 - m.alpha) * out_prob ** m.gamma * log_one_minus_out_prob)
            cost_class = cost_class.unsqueeze(-1).expand_as(cost_bbox)
        cost = m.cost_bbox * cost_bbox + m.cost_class * cost_class + m.cost_giou * cost_giou
        if out_is_valid is not None:
            cost = torch.where(out_is_valid[:, :, None], cost, 1e9)
        if target_is_valid_padded is not None:
            cost = torch.where(target_is_valid_padded[:, None, :], cost, 1e9)
        return cost

    def _assign(self, cost: np.ndarray, counts: np.ndarray, repeats: int,
                do_filtering: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """sam3's host half of the matching: scipy per query with targets, indices as sam3 packs them."""
        rows = np.flatnonzero(counts > 0) if self.matcher.remove_samples_with_0_gt else np.arange(len(counts))
        kept = counts[rows]
        num_queries = cost.shape[1]
        per_query = [cost[i, :, :n] for i, n in zip(rows, kept, strict=True)]
        return_tgt = do_filtering or bool(np.any(num_queries < kept * max(repeats, 1)))
        if not per_query:
            empty = np.zeros(0, dtype=np.int64)
            return empty, empty, (empty if return_tgt else None)
        if return_tgt:
            src, tgt = zip(*(_do_matching(c, repeats=repeats, return_tgt_indices=True, do_filtering=do_filtering)
                             for c in per_query), strict=True)
            starts = np.concatenate([[0], np.cumsum(kept)[:-1]])
            tgt_idx = np.concatenate([np.asarray(t, dtype=np.int64) + s for t, s in zip(tgt, starts, strict=True)])
        else:
            src = [_do_matching(c, repeats=repeats, do_filtering=do_filtering) for c in per_query]
            tgt_idx = None
        batch_idx = np.concatenate([np.full(len(s), r, dtype=np.int64) for s, r in zip(src, rows, strict=True)])
        src_idx = np.concatenate([np.asarray(s, dtype=np.int64) for s in src])
        return batch_idx, src_idx, tgt_idx


def _to_device(results: list[tuple[np.ndarray, np.ndarray, np.ndarray | None]],
               device: torch.device) -> list[tuple[Tensor, Tensor, Tensor | None]]:
    """Host index arrays -> long tensors on ``device`` in one copy (non-blocking from pinned memory on a GPU)."""
    arrays = [a for result in results for a in result if a is not None]
    packed = torch.from_numpy(np.concatenate(arrays) if arrays else np.zeros(0, dtype=np.int64))
    if device.type == "cuda":
        packed = packed.pin_memory().to(device, non_blocking=True)
    else:
        packed = packed.to(device)
    out, offset = [], 0
    for result in results:
        tensors = []
        for a in result:
            if a is None:
                tensors.append(None)
            else:
                tensors.append(packed[offset:offset + len(a)])
                offset += len(a)
        out.append(tuple(tensors))
    return out


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


def mask_assignment(grid_hw: tuple[int, int], batch: GroundingBatch,
                    device: torch.device | str | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """One-to-many assignment of a (H, W) token grid's proposals to instances, by location.

    A token is assigned to an instance of its query when the token's centre lies inside the
    instance's mask (the smallest such instance where several overlap); an instance that covers no
    token centre (smaller than a token) gets the token nearest its box centre. This is the dense,
    location-based assignment of one-stage detectors (FCOS's centre sampling, on masks) that Co-DETR
    adds to DETR's one-to-one matching to train the encoder fast; every token of an object learns the
    phrase score and that object's box, instead of one token per object.

    Args:
        grid_hw: (H, W) of the token grid covering the canvas, row-major (the proposals' order).
        batch: The ground truth (instance masks on the canvas, packed in query order).
        device: Where the indices go (defaults to the batch's).

    Returns:
        ``(query_index, token_index, instance_index)`` long tensors, sam3's matcher index format.
    """
    device = torch.device(device) if device is not None else batch.boxes.device
    height, width = grid_hw
    masks = batch.masks.to(device)
    total = masks.shape[0]
    if total == 0:
        empty = torch.zeros(0, dtype=torch.long, device=device)
        return empty, empty, empty
    canvas_h, canvas_w = masks.shape[-2:]
    rows = ((torch.arange(height, device=device) + 0.5) * canvas_h / height).long().clamp(max=canvas_h - 1)
    cols = ((torch.arange(width, device=device) + 0.5) * canvas_w / width).long().clamp(max=canvas_w - 1)
    inside = masks[:, rows][:, :, cols].flatten(1)  # (N, HW)
    boxes = batch.boxes.to(device=device, dtype=torch.float32)
    centre_token = ((boxes[:, 1] * height).long().clamp(0, height - 1) * width
                    + (boxes[:, 0] * width).long().clamp(0, width - 1))
    inside[torch.arange(total, device=device), centre_token] |= ~inside.any(1)
    area = masks.flatten(1).sum(1).float()
    cost = torch.where(inside, area[:, None], torch.inf)  # smallest covering instance wins
    owner = batch.instance_query.to(device)
    best = cost.new_full((batch.num_queries, height * width), torch.inf)
    best = best.scatter_reduce(0, owner[:, None].expand_as(cost), cost, reduce="amin")
    assigned = inside & (cost == best[owner])
    instance, token = assigned.nonzero(as_tuple=True)
    return owner[instance], token, instance
