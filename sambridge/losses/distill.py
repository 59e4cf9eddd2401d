"""Distillation losses: a SAM3 teacher's outputs, features and text tokens -> a student.

Three levels, each term logged by name and weighted in ``DistillLoss`` (a weight of 0 skips it):

* Outputs (``kd_*``), against the teacher targets of :mod:`sambridge.models.teacher_targets`
  (top-K detections per query, fp16; the same whether computed online or read from shards).
  Student queries are matched one-to-one to the teacher's K detections per query (Hungarian on a
  score + L1 + GIoU cost, NaN-guarded by ``FiniteCostMatcher``), then:

  ==================  ========================================================================
  ``kd_presence``     Bernoulli KL from the teacher's presence probability to the student's
  ``kd_score``        Bernoulli KL on matched queries; unmatched student queries -> probability 0
  ``kd_box_l1``       L1 on matched normalised cxcywh boxes      | matched pairs weighted by the
  ``kd_box_giou``     1 - GIoU on matched boxes                  | teacher's detection probability
  ``kd_mask_bce``     per-pixel Bernoulli KL to the teacher's    | (score x presence), normalised
                      mask probabilities, at its resolution      | by their sum (at least 1)
  ``kd_mask_dice``    soft dice (squared form) to the teacher's mask probabilities
  ==================  ========================================================================

  The KL forms equal BCE to the teacher's probability minus the teacher's entropy: same gradient,
  but exactly zero when the student reproduces the teacher and positive otherwise. The squared
  dice ``1 - 2<a, b> / (|a|^2 + |b|^2)`` has the same property for soft targets.

* Features (``feat_mse``, ``feat_cos``): the student's stride-16 neck map through a learned 1x1
  adapter, resized to the teacher's grid, against the teacher's map (MSE per element, 1 - cosine
  per location); online only. ``pooled_mse``/``pooled_cos`` compare per-query pooled
  fusion-encoder states (:func:`sambridge.models.teacher_targets.pooled_query_features`), which the
  offline cache can hold.

* Text tokens (``text_mse``, ``text_cos``): the student's text-token features against the
  teacher's on tokens valid in both (SAM3-LiteText style); a learned linear adapter when the
  widths differ.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from sam3.model.box_ops import box_cxcywh_to_xyxy, fast_diag_generalized_box_iou, generalized_box_iou
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn

from sambridge.models.matching import FiniteCostMatcher

_MIN_SIDE = 1e-6
"""Boxes' width and height are clamped to at least this in GIoU (a degenerate box would divide by 0)."""


def bernoulli_kl(teacher_logits: Tensor, student_logits: Tensor) -> Tensor:
    """KL(Bernoulli(sigmoid(t)) || Bernoulli(sigmoid(s))) elementwise; exactly 0 where s == t."""
    p = torch.sigmoid(teacher_logits)
    return p * (F.logsigmoid(teacher_logits) - F.logsigmoid(student_logits)) + (1 - p) * (
        F.logsigmoid(-teacher_logits) - F.logsigmoid(-student_logits)
    )


def soft_dice_loss(student_prob: Tensor, teacher_prob: Tensor, smooth: float = 1.0) -> Tensor:
    """Squared-form dice over the last two dims: ``1 - (2<a,b> + s) / (|a|^2 + |b|^2 + s)``; 0 iff a == b."""
    a, b = student_prob.flatten(-2), teacher_prob.flatten(-2)
    return 1 - (2 * (a * b).sum(-1) + smooth) / ((a * a).sum(-1) + (b * b).sum(-1) + smooth)


def _xyxy(boxes_cxcywh: Tensor) -> Tensor:
    sides = boxes_cxcywh[..., 2:].clamp(min=_MIN_SIDE)
    return box_cxcywh_to_xyxy(torch.cat([boxes_cxcywh[..., :2], sides], dim=-1))


class TeacherMatcher(nn.Module):
    """Hungarian matching of student queries to the teacher's top-K detections, per query row.

    Cost of (student i, teacher j) = ``score * |p_i - p_j| + bbox * L1(b_i, b_j) + giou * -GIoU(b_i, b_j)``
    with p the per-detection probability. Wrap it in ``FiniteCostMatcher`` (``DistillLoss`` does)
    so NaN/inf student outputs never reach scipy; teacher values are sanitised here.

    Args:
        cost_score: Weight of the probability difference.
        cost_bbox: Weight of the L1 box distance.
        cost_giou: Weight of the negative GIoU.
    """

    def __init__(self, cost_score: float = 2.0, cost_bbox: float = 5.0, cost_giou: float = 2.0) -> None:
        super().__init__()
        self.cost_score, self.cost_bbox, self.cost_giou = cost_score, cost_bbox, cost_giou

    @torch.no_grad()
    def forward(
        self, outputs: dict[str, Tensor], targets: dict[str, Tensor]
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Matched (row, student query, teacher detection) index triples over the rows in ``targets["rows"]``.

        Args:
            outputs: ``pred_logits`` (Q, N, 1) and ``pred_boxes`` (Q, N, 4) of the student.
            targets: ``logits`` (Q, K), ``boxes`` (Q, K, 4) of the teacher and ``rows`` (R,) long.
        """
        rows = targets["rows"]
        student_prob = outputs["pred_logits"][rows, :, 0].float().sigmoid()
        student_boxes = outputs["pred_boxes"][rows].float()
        teacher_logits = torch.nan_to_num(targets["logits"][rows].float(), nan=0.0, posinf=20.0, neginf=-20.0)
        teacher_boxes = torch.nan_to_num(targets["boxes"][rows].float(), nan=0.5, posinf=1.0, neginf=0.0)
        cost = (
            self.cost_score * (student_prob[:, :, None] - teacher_logits.sigmoid()[:, None, :]).abs()
            + self.cost_bbox * torch.cdist(student_boxes, teacher_boxes, p=1)
            - self.cost_giou * generalized_box_iou(_xyxy(student_boxes), _xyxy(teacher_boxes))
        )
        cost = torch.nan_to_num(cost, nan=1e4, posinf=1e4, neginf=-1e4).cpu().numpy()
        matches = [linear_sum_assignment(matrix) for matrix in cost]
        row_ids = [np.full(len(s), row) for row, (s, _) in zip(rows.tolist(), matches, strict=True)]
        student_ids, teacher_ids = [s for s, _ in matches], [t for _, t in matches]
        device = outputs["pred_logits"].device
        row, student, teacher = (
            torch.as_tensor(np.concatenate(ids) if ids else np.zeros(0), dtype=torch.long, device=device)
            for ids in (row_ids, student_ids, teacher_ids)
        )
        return row, student, teacher


class VectorDistill(nn.Module):
    """MSE + (1 - cosine) between adapted student vectors and teacher vectors (last dim = channels).

    Args:
        student_dim: Student width.
        teacher_dim: Teacher width; a learned linear adapter maps the student's when they differ.
    """

    def __init__(self, student_dim: int, teacher_dim: int) -> None:
        super().__init__()
        self.adapter = nn.Linear(student_dim, teacher_dim) if student_dim != teacher_dim else nn.Identity()

    def forward(self, student: Tensor, teacher: Tensor) -> tuple[Tensor, Tensor]:
        """(N, student_dim) and (N, teacher_dim) -> (MSE per element, mean 1 - cosine)."""
        adapted, teacher = self.adapter(student.float()), teacher.float()
        if adapted.shape[0] == 0:
            zero = adapted.sum() * 0
            return zero, zero
        return F.mse_loss(adapted, teacher), (1 - F.cosine_similarity(adapted, teacher, dim=-1)).mean()


class MapDistill(nn.Module):
    """MSE + (1 - cosine) between a student feature map (1x1 adapter, resized) and the teacher's map.

    Args:
        student_dim: Student feature channels.
        teacher_dim: Teacher feature channels.
    """

    def __init__(self, student_dim: int, teacher_dim: int) -> None:
        super().__init__()
        self.adapter = nn.Conv2d(student_dim, teacher_dim, kernel_size=1)

    def forward(self, student: Tensor, teacher: Tensor) -> tuple[Tensor, Tensor]:
        """(B, student_dim, h, w) and (B, teacher_dim, H, W) -> (MSE per element, mean 1 - cosine)."""
        adapted, teacher = self.adapter(student.float()), teacher.float()
        if adapted.shape[-2:] != teacher.shape[-2:]:
            adapted = F.interpolate(adapted, size=teacher.shape[-2:], mode="bilinear", align_corners=False)
        return F.mse_loss(adapted, teacher), (1 - F.cosine_similarity(adapted, teacher, dim=1)).mean()


@dataclass
class DistillWeights:
    """Weights of the distillation terms (0 switches a term off).

    Args:
        presence: Bernoulli KL on the presence probability.
        score: Bernoulli KL on matched detection probabilities (unmatched student queries -> 0).
        box_l1: L1 on matched boxes.
        box_giou: 1 - GIoU on matched boxes.
        mask_bce: per-pixel Bernoulli KL on matched masks (BCE minus the teacher's entropy).
        mask_dice: soft dice on matched masks.
        feature_mse: MSE of the adapted stride-16 student map to the teacher's map (online only).
        feature_cos: 1 - cosine of the same, per location (online only).
        pooled_mse: MSE of pooled per-query fusion-encoder states (online, or cached offline).
        pooled_cos: 1 - cosine of the same.
        text_mse: MSE of text-token features on tokens valid in both models.
        text_cos: 1 - cosine of the same, per token.
        ground_truth: multiplier of the ground-truth grounding loss (SAM3/SAM2 recipe) on the batch's
            annotations; 0 distils from the teacher alone.
    """

    presence: float = 20.0
    score: float = 20.0
    box_l1: float = 5.0
    box_giou: float = 2.0
    mask_bce: float = 20.0
    mask_dice: float = 10.0
    feature_mse: float = 1.0
    feature_cos: float = 1.0
    pooled_mse: float = 0.0
    pooled_cos: float = 0.0
    text_mse: float = 1.0
    text_cos: float = 1.0
    ground_truth: float = 1.0


TERM_WEIGHTS = {
    "kd_presence": "presence",
    "kd_score": "score",
    "kd_box_l1": "box_l1",
    "kd_box_giou": "box_giou",
    "kd_mask_bce": "mask_bce",
    "kd_mask_dice": "mask_dice",
    "feat_mse": "feature_mse",
    "feat_cos": "feature_cos",
    "pooled_mse": "pooled_mse",
    "pooled_cos": "pooled_cos",
    "text_mse": "text_mse",
    "text_cos": "text_cos",
}
"""Loss term name -> its ``DistillWeights`` field."""


def uses_terms(weights: DistillWeights, prefix: str) -> bool:
    """Whether a term named ``prefix...`` (``kd_``, ``feat_``, ``pooled_``, ``text_``) is weighted."""
    return any(getattr(weights, field) for name, field in TERM_WEIGHTS.items() if name.startswith(prefix))


class DistillLoss(nn.Module):
    """Output-, feature- and text-level distillation terms and their weighted sum.

    The adapters (feature map 1x1 conv, pooled and text linear maps) are this module's parameters
    and train with the student; each exists only when one of its two weights is non-zero.

    Args:
        weights: Term weights.
        student_dim: The student's feature / text / encoder width (its head's ``d_model``).
        teacher_dim: The teacher's (256 for SAM3).
        matcher: Student-to-teacher matcher (default ``TeacherMatcher()``, NaN-guarded).
    """

    def __init__(
        self, weights: DistillWeights, student_dim: int, teacher_dim: int, matcher: nn.Module | None = None
    ) -> None:
        super().__init__()
        self.weights = weights
        self.matcher = FiniteCostMatcher(matcher if matcher is not None else TeacherMatcher())
        self.feature = MapDistill(student_dim, teacher_dim) if self.uses("feat_") else None
        self.pooled = VectorDistill(student_dim, teacher_dim) if self.uses("pooled_") else None
        self.text = VectorDistill(student_dim, teacher_dim) if self.uses("text_") else None

    def uses(self, prefix: str) -> bool:
        """Whether a term named ``prefix...`` (``kd_``, ``feat_``, ...) has a non-zero weight."""
        return uses_terms(self.weights, prefix)

    def weight(self, term: str) -> float:
        """The weight of loss term ``term`` (e.g. ``kd_score``)."""
        return getattr(self.weights, TERM_WEIGHTS[term])

    def total(self, terms: dict[str, Tensor]) -> Tensor:
        """Weighted sum of the distillation terms in ``terms`` (other entries are ignored)."""
        parts = [self.weight(name) * value for name, value in terms.items() if name in TERM_WEIGHTS]
        if not parts:
            raise ValueError("no distillation term to sum: every weight is 0 or no teacher signal was given")
        return torch.stack(parts).sum()

    # ------------------------------------------------------------------ outputs
    def output_terms(
        self, student: dict[str, Tensor], teacher: dict[str, Tensor], valid: Tensor | None = None
    ) -> dict[str, Tensor]:
        """``kd_*`` terms of student outputs against teacher targets.

        Args:
            student: ``pred_logits`` (Q, N, 1), ``pred_boxes`` (Q, N, 4), ``pred_masks`` (Q, N, h, w)
                logits, ``presence_logit_dec`` (Q, 1).
            teacher: ``logits`` (Q, K), ``boxes`` (Q, K, 4), ``presence_logit`` (Q,),
                ``mask_logits`` (Q, K, M, M) (any float dtype).
            valid: (Q,) bool, rows with teacher targets (default: all).
        """
        num_queries = student["pred_logits"].shape[0]
        device = student["pred_logits"].device
        if valid is None:
            valid = torch.ones(num_queries, dtype=torch.bool)
        rows = valid.to(device).nonzero()[:, 0]
        t = {
            k: teacher[k].to(device=device, dtype=torch.float32)
            for k in ("logits", "boxes", "presence_logit")
        }
        row, s_idx, t_idx = self.matcher(student, {**t, "rows": rows})

        presence = bernoulli_kl(t["presence_logit"][rows], student["presence_logit_dec"][rows, 0].float())
        student_logits = student["pred_logits"][rows, :, 0].float()
        score = F.softplus(student_logits)  # unmatched student queries: KL from probability 0
        matched_rows = torch.searchsorted(rows, row)
        matched_kl = bernoulli_kl(t["logits"][row, t_idx], student_logits[matched_rows, s_idx])
        score = score.index_put((matched_rows, s_idx), matched_kl)

        weight = t["logits"][row, t_idx].sigmoid() * t["presence_logit"][row].sigmoid()
        norm = weight.sum().clamp(min=1.0)
        s_boxes, t_boxes = student["pred_boxes"][row, s_idx].float(), t["boxes"][row, t_idx]
        l1 = (s_boxes - t_boxes).abs().sum(-1)
        giou = 1 - fast_diag_generalized_box_iou(_xyxy(s_boxes), _xyxy(t_boxes))
        t_masks = teacher["mask_logits"][row, t_idx].to(device=device, dtype=torch.float32)
        s_masks = student["pred_masks"][row, s_idx].float()
        if s_masks.shape[-2:] != t_masks.shape[-2:]:
            s_masks = F.interpolate(
                s_masks[:, None], size=t_masks.shape[-2:], mode="bilinear", align_corners=False
            )[:, 0]
        mask_kl = bernoulli_kl(t_masks, s_masks).flatten(1).mean(1)
        dice = soft_dice_loss(s_masks.sigmoid(), t_masks.sigmoid())
        zero = student["pred_logits"].sum() * 0
        return {
            "kd_presence": presence.mean() if len(rows) else zero,
            "kd_score": score.mean() if len(rows) else zero,
            "kd_box_l1": (weight * l1).sum() / norm,
            "kd_box_giou": (weight * giou).sum() / norm,
            "kd_mask_bce": (weight * mask_kl).sum() / norm,
            "kd_mask_dice": (weight * dice).sum() / norm,
        }

    # ------------------------------------------------------------------ features and text
    def _adapter(self, name: str) -> nn.Module:
        module = getattr(self, name)
        if module is None:
            raise RuntimeError(f"the {name} terms have weight 0: this DistillLoss has no {name} adapter")
        return module

    def feature_terms(self, student_map: Tensor, teacher_map: Tensor) -> dict[str, Tensor]:
        """``feat_mse``/``feat_cos``: (B, ds, h, w) student map vs (B, dt, H, W) teacher map."""
        mse, cos = self._adapter("feature")(student_map, teacher_map)
        return {"feat_mse": mse, "feat_cos": cos}

    def pooled_terms(
        self, student_pooled: Tensor, teacher_pooled: Tensor, valid: Tensor | None = None
    ) -> dict[str, Tensor]:
        """``pooled_mse``/``pooled_cos``: (Q, ds) vs (Q, dt) pooled per-query features on ``valid`` rows."""
        if valid is not None:
            student_pooled = student_pooled[valid.to(student_pooled.device)]
            teacher_pooled = teacher_pooled[valid.to(teacher_pooled.device)]
        mse, cos = self._adapter("pooled")(student_pooled, teacher_pooled.to(student_pooled.device))
        return {"pooled_mse": mse, "pooled_cos": cos}

    def text_terms(
        self, student_tokens: Tensor, student_pad: Tensor, teacher_tokens: Tensor, teacher_pad: Tensor
    ) -> dict[str, Tensor]:
        """``text_mse``/``text_cos`` on tokens that are valid in both models.

        Args:
            student_tokens: (L, U, ds) sequence-first, as sam3's ``language_features``.
            student_pad: (U, L) bool, True = padding.
            teacher_tokens: (L', U, dt) for the same U phrases in the same order.
            teacher_pad: (U, L') bool.
        """
        length = min(student_tokens.shape[0], teacher_tokens.shape[0])
        if student_tokens.shape[1] != teacher_tokens.shape[1]:
            raise ValueError(
                f"student encoded {student_tokens.shape[1]} phrases, teacher {teacher_tokens.shape[1]}"
            )
        both = ~student_pad[:, :length] & ~teacher_pad[:, :length].to(student_pad.device)  # (U, L)
        student_valid = student_tokens[:length].transpose(0, 1)[both]
        teacher_valid = teacher_tokens[:length].transpose(0, 1).to(student_tokens.device)[both]
        mse, cos = self._adapter("text")(student_valid, teacher_valid)
        return {"text_mse": mse, "text_cos": cos}
