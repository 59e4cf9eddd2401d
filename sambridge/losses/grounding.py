"""Grounding loss: SAM3's detector recipe plus SAM2's mask-decoder recipe on the refined boxes.

Detector terms come from sam3's own loss classes (``Sam3LossWrapper`` with ``Boxes``,
``IABCEMdetr`` and ``Masks``; one-to-one matching from the model, one-to-many matching here),
applied to the final and every auxiliary decoder output. Two deliberate departures, both about
queries that are not exhaustively annotated:

* ``IABCEMdetr(weak_loss=True)``: unmatched predictions of a non-exhaustive query are not pushed
  towards "background" (sam3's ``is_exhaustive`` handling); for exhaustive queries it equals
  sam3's default (``weak_loss=False``) up to the 1e-6 in its denominator.
* The presence loss (sam3's focal form, alpha 0.5, gamma 0) is computed here so that a
  non-exhaustive query without instances (nothing known) is left out; exhaustive negatives train
  the presence head towards "absent", queries with instances towards "present".

Optionally (``semantic_bce``/``semantic_dice`` > 0) the head's semantic mask learns the union of the
query's instances (as sam3's ``SemanticSegCriterion`` with a presence head: BCE over queries whose
extent is known, with instances or exhaustive negatives; dice over queries with instances); it feeds
``postprocess(instances="components")``.

SAM2 terms supervise the mask decoder prompted with each matched query's predicted box (focal,
dice, IoU-prediction L1, object score; with several masks per box only the lowest focal+dice
mask gets focal and dice), using sam3's implementations of those functions.

Term names follow sam3: ``loss_bbox``, ``loss_giou``, ``loss_ce``, ``presence_loss``, ``loss_mask``,
``loss_dice``, with ``_aux_<i>`` for decoder layer i and ``_o2m`` for the one-to-many queries (as
in sam3, ``_o2m`` terms come already multiplied by the ``o2m`` weight); SAM2's are ``refine_loss_mask``,
``refine_loss_dice``, ``refine_loss_iou`` and ``refine_loss_class``; the semantic ones
``loss_semantic_seg`` and ``loss_semantic_dice``. ``loss`` is the weighted total.

Usage::

    out = model(images, phrases, query_image, targets=batch)   # matching happens in the forward
    losses = loss_fn(out, batch)                               # {"loss": total, every term by name}
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from sam3.train.loss import loss_fns
from sam3.train.loss.sam3_loss import Sam3LossWrapper
from sam3.train.matcher import BinaryOneToManyMatcher
from torch import Tensor, nn

from data_pipelines.batch import GroundingBatch
from sambridge.compat import apply_sam3_compat
from sambridge.models.matching import hungarian_matcher, to_sam3_targets

_METRIC_PREFIXES = ("ce_f1", "presence_dec_acc", "presence_loss")
"""sam3 outputs that are metrics (or, for presence, replaced by this module's own term)."""


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _without_presence(out: dict) -> dict:
    """Shallow copy of the outputs without presence logits (this module computes that term)."""
    copy = {k: v for k, v in out.items() if k != "presence_logit_dec"}
    if "aux_outputs" in out:
        copy["aux_outputs"] = [
            {k: v for k, v in aux.items() if k != "presence_logit_dec"} for aux in out["aux_outputs"]
        ]
    return copy


class BinaryTargetIABCE(loss_fns.IABCEMdetr):
    """sam3's IABCE with target 1 for every matched prediction instead of ``score^alpha * IoU^(1-alpha)``.

    sam3 reads the predicted boxes only to compute that IoU (without gradient); handing it the matched
    ground-truth boxes in their place makes the IoU 1, so the target is ``score^alpha``, whose fixed
    point is 1.
    """

    def get_loss(self, outputs, targets, indices, num_boxes):
        rows, cols, target_index = indices
        matched = targets["boxes_xyxy"] if target_index is None else targets["boxes_xyxy"][target_index]
        boxes = outputs["pred_boxes_xyxy"].detach().clone()
        boxes[rows, cols] = matched.to(boxes.dtype)
        return super().get_loss({**outputs, "pred_boxes_xyxy": boxes}, targets, indices, num_boxes)


class _InOrder(nn.Module):
    """A stand-in matcher that returns precomputed matchings, one per call, in order."""

    def __init__(self, matchings: list) -> None:
        super().__init__()
        self.matchings = iter(matchings)

    def forward(self, *args, **kwargs):
        return next(self.matchings)


class _EveryMaskValid:
    """Stands in for sam3's boolean ``is_valid_mask``: indexed by the matched targets it gives ``slice(None)``."""

    def __getitem__(self, index) -> slice:
        return slice(None)


class AllValidMasks(loss_fns.Masks):
    """sam3's ``Masks`` loss (focal + dice on the matched masks) for targets whose masks are all valid.

    sam3 drops invalid masks with a boolean index (``masks[keep]``): a data-dependent ``nonzero``, one
    device read per call forward and one backward. ``to_sam3_targets`` marks every mask valid, so the
    filter keeps everything: it becomes ``masks[:]`` here, and the values are sam3's.
    """

    def get_loss(self, outputs, targets, indices, num_boxes):
        rows, queries, target_index = indices
        if target_index is None:  # targets in packed order: pair i is target i
            target_index = torch.arange(len(rows), device=rows.device)
        return super().get_loss(outputs, {**targets, "is_valid_mask": _EveryMaskValid()},
                                (rows, queries, target_index), num_boxes)


@dataclass
class GroundingLossWeights:
    """The weights and targets of ``GroundingLoss``: SAM3's detector recipe and SAM2's mask-decoder
    refinement recipe (``model.init_args.loss`` in a config).

    Args:
        box_l1: L1 on matched normalised cxcywh boxes.
        box_giou: Generalised IoU on matched boxes.
        score: IoU-aware BCE (IABCE) on query scores.
        presence: Presence ("is the phrase in the image?") loss.
        mask_focal: Focal loss on the head's matched masks.
        mask_dice: Dice loss on the head's matched masks.
        refine_focal: SAM2's focal loss on the refined masks of matched boxes.
        refine_dice: SAM2's dice loss on the refined masks.
        refine_iou: SAM2's L1 loss on its predicted mask IoU.
        refine_object_score: SAM2's object-score loss.
        o2m: Multiplier of the losses on the one-to-many (DAC) queries.
        score_target: What a matched query's score learns: ``iou`` (SAM3's soft target
            ``score^alpha * IoU^(1-alpha)``, whose fixed point is the box IoU) or ``binary`` (1: the
            score becomes the probability that the detection is right, so a right detection with an
            imperfect box still passes SAM3's 0.5 threshold).
        score_absent: Also train every query score of an exhaustive prompt without instances towards 0
            (SAM3 leaves them to the presence head alone): each query then learns whether *its*
            object matches the phrase, and a detection's score (query × presence) has two chances
            to reject an absent phrase.
        mask_stride: Compare the head's matched masks with the ground truth at this stride of the
            input canvas (1 = full resolution: the stride-4 logits are upsampled bilinearly first,
            as at inference, so boundaries are learnt below the head's own resolution); ``None``
            (SAM3's recipe): at the head's own mask resolution. The semantic mask follows it.
        semantic_bce: BCE on the head's semantic mask, the union of the phrase's instances (0: none,
            SAM3's image recipe). Needed by ``prediction.outputs: components``.
        semantic_dice: Dice loss on the head's semantic mask.
        region_phrase: BCE of the region-phrase alignment scores (``loss_region_phrase``), for a head
            built with ``region_alignment``: each annotated instance's mask-pooled image feature
            against the phrases of its image.
    """

    box_l1: float = 5.0
    box_giou: float = 2.0
    score: float = 20.0
    presence: float = 20.0
    mask_focal: float = 200.0
    mask_dice: float = 10.0
    refine_focal: float = 20.0
    refine_dice: float = 1.0
    refine_iou: float = 1.0
    refine_object_score: float = 1.0
    o2m: float = 2.0
    score_target: Literal["iou", "binary"] = "iou"
    score_absent: bool = False
    mask_stride: int | None = None
    semantic_bce: float = 0.0
    semantic_dice: float = 0.0
    region_phrase: float = 10.0


class GroundingLoss(nn.Module):
    """Loss for ``GroundedSAM2`` outputs against a ``GroundingBatch``.

    Args:
        weights: Term weights and targets (default ``GroundingLossWeights()``, SAM3's recipe).
        score_pos_weight: IABCE weight of matched (positive) queries.
        score_alpha: IABCE exponent mixing score and IoU into the soft positive target.
        score_gamma: IABCE focusing exponent on negatives.
        presence_alpha: Focal alpha of the presence loss.
        presence_gamma: Focal gamma of the presence loss.
        mask_focal_alpha: Focal alpha of the head's mask loss.
        mask_focal_gamma: Focal gamma of the head's mask loss.
        o2m_alpha: One-to-many matcher: weight of the score against the IoU.
        o2m_threshold: One-to-many matcher: minimum matching quality.
        o2m_topk: One-to-many matcher: predictions per ground-truth instance at most.
        refine_supervise_all_iou: With several masks per box, supervise every IoU prediction.
    """

    def __init__(
        self,
        weights: GroundingLossWeights | None = None,
        score_pos_weight: float = 10.0,
        score_alpha: float = 0.25,
        score_gamma: float = 2.0,
        presence_alpha: float = 0.5,
        presence_gamma: float = 0.0,
        mask_focal_alpha: float = 0.25,
        mask_focal_gamma: float = 2.0,
        o2m_alpha: float = 0.3,
        o2m_threshold: float = 0.4,
        o2m_topk: int = 4,
        refine_supervise_all_iou: bool = True,
    ) -> None:
        super().__init__()
        w = weights if weights is not None else GroundingLossWeights()
        self.semantic_weights = {"loss_semantic_seg": w.semantic_bce, "loss_semantic_dice": w.semantic_dice}
        self.region_phrase_weight = w.region_phrase
        if w.mask_stride is not None and w.mask_stride < 1:
            raise ValueError(f"mask_stride must be a positive integer or None, got {w.mask_stride}")
        self.mask_stride = w.mask_stride
        if w.score_target not in ("iou", "binary"):
            raise ValueError(f"score_target must be 'iou' or 'binary', got {w.score_target!r}")
        apply_sam3_compat()  # sam3's Masks loss defaults to a CUDA-only Triton kernel
        self.presence_weight = w.presence
        self.presence_alpha = presence_alpha
        self.presence_gamma = presence_gamma
        self.mask_focal_alpha = mask_focal_alpha
        self.mask_focal_gamma = mask_focal_gamma
        self.refine_weights = {
            "refine_loss_mask": w.refine_focal,
            "refine_loss_dice": w.refine_dice,
            "refine_loss_iou": w.refine_iou,
            "refine_loss_class": w.refine_object_score,
        }
        self.refine_supervise_all_iou = refine_supervise_all_iou
        self.detector_loss = Sam3LossWrapper(
            loss_fns_find=[
                loss_fns.Boxes(weight_dict={"loss_bbox": w.box_l1, "loss_giou": w.box_giou}),
                (BinaryTargetIABCE if w.score_target == "binary" else loss_fns.IABCEMdetr)(
                    pos_weight=score_pos_weight,
                    weight_dict={"loss_ce": w.score},
                    weak_loss=True,
                    alpha=score_alpha,
                    gamma=score_gamma,
                    use_presence=not w.score_absent,  # sam3: prompts without instances train presence only
                    pos_focal=False,
                ),
                AllValidMasks(
                    weight_dict={"loss_mask": w.mask_focal, "loss_dice": w.mask_dice},
                    focal_alpha=mask_focal_alpha,
                    focal_gamma=mask_focal_gamma,
                    compute_aux=False,
                ),
            ],
            normalization="local",
            matcher=hungarian_matcher(),  # sam3 uses the one-to-one matcher on auxiliary o2m outputs
            o2m_matcher=BinaryOneToManyMatcher(alpha=o2m_alpha, threshold=o2m_threshold, topk=o2m_topk),
            o2m_weight=w.o2m,
            use_o2m_matcher_on_o2m_aux=False,
        )

    def _normaliser(self, count: int | Tensor, device: torch.device) -> Tensor:
        """Count averaged over ranks when distributed, at least 1 (sam3's/SAM2's normalisation)."""
        count = torch.as_tensor(count, dtype=torch.float32, device=device)
        if _distributed():
            dist.all_reduce(count)
            count = count / dist.get_world_size()
        return count.clamp(min=1.0)

    def forward(self, outputs: dict, batch: GroundingBatch) -> dict[str, Tensor]:
        """Every loss term by name plus their weighted sum under ``"loss"``.

        Args:
            outputs: ``GroundedSAM2`` outputs of a forward called with ``targets=batch``.
            batch: The same batch.
        """
        if "indices" not in outputs:
            raise ValueError(
                "outputs carry no matching: call model(images, phrases, query_image, targets=batch)"
            )
        device = outputs["pred_logits"].device
        mask_size = tuple(outputs["pred_masks"].shape[-2:])
        if self.mask_stride is not None:
            mask_size = tuple(max(1, side // self.mask_stride) for side in batch.images.shape[-2:])
        targets = to_sam3_targets(batch, mask_size=mask_size, device=device)
        self.detector_loss.normalization = "global" if _distributed() else "local"
        sam3_terms = self._sam3_loss(_without_presence(outputs), targets)
        total = sam3_terms.pop(loss_fns.CORE_LOSS_KEY)
        terms = {k: v for k, v in sam3_terms.items() if not k.startswith(_METRIC_PREFIXES)}
        aux = [(f"_aux_{i}", out) for i, out in enumerate(outputs.get("aux_outputs", []))]
        for suffix, out in [("", outputs), *aux]:
            if "presence_logit_dec" in out:
                terms[f"presence_loss{suffix}"] = self._presence(out["presence_logit_dec"], targets)
                total = total + self.presence_weight * terms[f"presence_loss{suffix}"]
        if any(self.semantic_weights.values()):
            semantic_terms = self._semantic(outputs["semantic_seg"], targets)
            terms.update(semantic_terms)
            total = total + sum(self.semantic_weights[k] * v for k, v in semantic_terms.items())
        if "region_alignment" in outputs:
            terms["loss_region_phrase"] = self._region_phrase(outputs["region_alignment"])
            total = total + self.region_phrase_weight * terms["loss_region_phrase"]
        if "refine" in outputs:
            refine_terms = self._refine(outputs["refine"], targets["masks"])
            terms.update(refine_terms)
            total = total + sum(self.refine_weights[k] * v for k, v in refine_terms.items())
        return {"loss": total, **terms}

    def _sam3_loss(self, outputs: dict, targets: dict) -> dict[str, Tensor]:
        """sam3's loss with the auxiliary one-to-many outputs matched up front, all in one device read.

        sam3 matches each auxiliary layer's one-to-many queries with its one-to-one matcher, one call
        (and one device read) per layer; ``match_many`` does them together and sam3 is handed the
        results in the order it asks for them.
        """
        wrapper = self.detector_loss
        aux = [{k[: -len("_o2m")]: v for k, v in out.items() if k.endswith("_o2m")}
               for out in outputs.get("aux_outputs", []) if "pred_logits_o2m" in out]
        matcher, wrapper.matcher = wrapper.matcher, _InOrder(wrapper.matcher.match_many(aux, targets))
        try:
            return wrapper.compute_loss(outputs, targets)
        finally:
            wrapper.matcher = matcher

    def _presence(self, logits: Tensor, targets: dict) -> Tensor:
        """Focal presence loss over queries whose presence is known (positive, or exhaustive negative)."""
        visible = (
            (targets["object_ids_padded"] >= 0)
            & (targets["boxes_padded"][..., 2] > 0)
            & (targets["boxes_padded"][..., 3] > 0)
        )
        present = visible.any(1)
        known = present | targets["is_exhaustive"]
        per_query = loss_fns.sigmoid_focal_loss(  # masked rather than indexed: no device-to-host sync
            logits.view(-1),
            present.float(),
            num_boxes=1,
            alpha=self.presence_alpha,
            gamma=self.presence_gamma,
            reduce=False,
            triton=False,
        )
        return (per_query * known).sum() / self._normaliser(known.sum(), logits.device)

    def _semantic(self, logits: Tensor, targets: dict) -> dict[str, Tensor]:
        """BCE (queries whose extent is known) and dice (queries with instances, as sam3's
        ``SemanticSegCriterion`` with a presence head) of each query's semantic mask against the union
        of its instances; no host sync."""
        masks, counts = targets["masks"], targets["num_boxes"]
        owner = torch.repeat_interleave(torch.arange(len(counts), device=counts.device), counts,
                                        output_size=len(masks))
        union = masks.new_zeros(len(counts), *masks.shape[-2:]).index_add_(0, owner, masks).clamp_(max=1.0)
        logits = logits.float()
        if logits.shape[-2:] != union.shape[-2:]:
            logits = F.interpolate(logits, size=union.shape[-2:], mode="bilinear", align_corners=False)
        logits = logits[:, 0].flatten(1)
        union = union.flatten(1)
        present = (counts > 0).float()
        known = torch.maximum(present, targets["is_exhaustive"].float())
        bce = F.binary_cross_entropy_with_logits(logits, union, reduction="none").mean(1)
        dice = loss_fns.dice_loss(logits, union, num_boxes=1, reduce=False)
        return {"loss_semantic_seg": (bce * known).sum() / self._normaliser(known.sum(), logits.device),
                "loss_semantic_dice": (dice * present).sum() / self._normaliser(present.sum(), logits.device)}

    def _region_phrase(self, alignment: dict[str, Tensor]) -> Tensor:
        """BCE of the region-phrase scores over the pairs with a target (``models.region_alignment``)."""
        bce = F.binary_cross_entropy_with_logits(alignment["logits"].float(), alignment["target"], reduction="none")
        return (bce * alignment["known"]).sum() / self._normaliser(alignment["known"].sum(), bce.device)

    def _refine(self, refine: dict[str, Tensor], masks: Tensor) -> dict[str, Tensor]:
        """SAM2's ``MultiStepMultiMasksAndIous`` recipe (one step) on the box-prompted masks."""
        logits, iou_pred = refine["mask_logits"], refine["iou_predictions"]
        target = masks[refine["target_index"]][:, None]
        if target.shape[-2:] != logits.shape[-2:]:
            target = F.interpolate(target, size=logits.shape[-2:], mode="bilinear") >= 0.5
        target = target.to(logits.dtype).expand_as(logits)
        num = self._normaliser(len(logits), logits.device)
        focal = loss_fns.sigmoid_focal_loss(
            logits,
            target,
            num,
            alpha=self.mask_focal_alpha,
            gamma=self.mask_focal_gamma,
            loss_on_multimask=True,
            triton=False,
        )
        dice = loss_fns.dice_loss(logits, target, num, loss_on_multimask=True)
        iou = loss_fns.iou_loss(logits, target, iou_pred, num, loss_on_multimask=True, use_l1_loss=True)
        has_object = target[:, 0].flatten(1).any(1, keepdim=True).to(logits.dtype)
        object_loss = loss_fns.sigmoid_focal_loss(
            refine["object_score_logits"], has_object, num, alpha=-1, gamma=0.0, triton=False
        )
        if logits.shape[1] > 1:  # several candidate masks: only the best one learns the shape
            best = torch.argmin(
                focal * self.refine_weights["refine_loss_mask"]
                + dice * self.refine_weights["refine_loss_dice"],
                dim=1,
            )
            rows = torch.arange(len(best), device=best.device)
            iou = iou.mean(1) if self.refine_supervise_all_iou else iou[rows, best]
            focal, dice = focal[rows, best], dice[rows, best]
        else:
            focal, dice, iou = focal[:, 0], dice[:, 0], iou[:, 0]
        weight = has_object[:, 0]  # shape losses only where the object is visible at this resolution
        return {
            "refine_loss_mask": (focal * weight).sum(),
            "refine_loss_dice": (dice * weight).sum(),
            "refine_loss_iou": (iou * weight).sum(),
            "refine_loss_class": object_loss,
        }
