"""DistillModule: a frozen SAM3 teacher teaches a lighter grounding student, at every level at once.

::

    batch ──► student (GroundedSAM2 on a small Hiera / timm trunk) ──► outputs, neck map, text tokens
      │                                                                 │  kd_* (matched) · feat_* · text_*
      ├─ online:  teacher(images, phrases) ─► select_teacher_targets ──►┤  pooled_*
      ├─ offline: batch.teacher (cached by the pseudo-labeller) ───────►┤
      └─ ground truth (when the shards have it) ─► GroundingLoss ──────►┘  gt_* (x distill.ground_truth)

Both modes give the teacher's outputs to the loss in the same form (top-K detections, fp16; see
:mod:`sambridge.models.teacher_targets`), so they give the same loss on the same batch. Map-level
feature distillation needs the teacher online; text-token distillation runs only the teacher's text
encoder, so it works offline too (the teacher is then built, but its image encoder never runs).

The teacher is a registered model name (``teacher``) plus, optionally, the weights to load into it
(``teacher_checkpoint``: an official ``sam3.pt`` or a Lightning checkpoint of a trained teacher). It
is held by a plain :class:`TeacherHolder`, not as a submodule, so it is outside ``parameters()`` and
``state_dict()``: never in the optimiser or the checkpoint (it is rebuilt from the two arguments),
not wrapped by DDP/FSDP, and moved to the student's device on first use. Validation reports the same
metrics as ``GroundingModule`` (cgF1 on ground truth), so student and teacher scores compare.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from data_pipelines.batch import GroundingBatch
from sambridge.losses import GroundingLoss, GroundingLossWeights
from sambridge.losses.distill import DistillLoss, DistillWeights, uses_terms
from sambridge.models import LoraSettings, apply_finetune_mode, create_model
from sambridge.models.checkpoint_io import check_state_dict
from sambridge.models.grounding_head import head_state_dict, with_own_head_entries
from sambridge.models.sam3_teacher import TEACHER_MODELS
from sambridge.models.teacher_targets import STORAGE_DTYPE, pooled_query_features, select_teacher_targets
from sambridge.modules.base import config_arg
from sambridge.modules.checkpoint import STUDENT_SPEC_KEY, load_teacher
from sambridge.modules.grounding import (
    FinetuneMode,
    GroundingModule,
    PredictSettings,
    apply_prediction_settings,
)
from sambridge.optim import OptimizerConfig

DistillMode = Literal["online", "offline"]

_POOLED = "pooled_features"
_VALID = "valid"


@dataclass
class TeacherHolder:
    """The frozen teacher, held outside the LightningModule's module tree.

    ``nn.Module`` registers only modules, parameters and buffers assigned to it; a plain object keeps
    the teacher out of ``parameters()``, ``state_dict()``, DDP/FSDP wrapping and Lightning's moves.
    """

    model: nn.Module


def check_teacher_arg(teacher: str) -> None:
    """Refuse a ``teacher`` that is not a registered SAM3 teacher (a checkpoint path included)."""
    if teacher not in TEACHER_MODELS:
        raise ValueError(
            f"teacher must be a registered SAM3 teacher {list(TEACHER_MODELS)}, got {teacher!r}; "
            "a checkpoint (official sam3.pt or a trained teacher's .ckpt) goes in teacher_checkpoint, "
            "e.g. teacher: sam3_image, teacher_checkpoint: checkpoints/sam3.pt"
        )


class DistillModule(GroundingModule):
    """Distil a SAM3 teacher into a grounding student (outputs, features and text tokens, plus ground truth).

    Args:
        model: registered student model (``sambridge.models.list_models()``), e.g. ``grounded_sam2_student``.
        model_args: overrides passed to ``create_model`` for the student (its ``image_size`` included).
        teacher: registered teacher model (``sam3_image``, ``sam3_image_tiny``); a path is refused
            (it goes in ``teacher_checkpoint``).
        teacher_checkpoint: weights for the teacher: an official ``sam3.pt`` or a Lightning checkpoint
            of a trained teacher (``load_teacher``; its model must be ``teacher``); ``None``: random
            weights (tests, smoke runs).
        teacher_args: overrides for the teacher's ``create_model`` / ``load_teacher``.
        mode: ``online`` runs the teacher on every batch; ``offline`` reads ``batch.teacher`` (shards
            with ``teacher.safetensors``).
        distill: distillation term weights (and the ground-truth multiplier).
        teacher_top_k: online: teacher detections per query kept as targets (as the pseudo-labeller).
        teacher_mask_size: online: side of the teacher mask logits kept as targets.
        teacher_dim: teacher feature width for the adapters when the teacher is not built (offline
            without text distillation); ``None`` reads it from the teacher, or takes SAM3's 256.
        init_head_from_teacher: copy the teacher's grounding-head weights into the student's
            (strict: the head dims must match).
        sam2_checkpoint: official SAM2 checkpoint to start the student from.
        sam3_checkpoint: SAM3 checkpoint whose head weights initialise the student's head.
        finetune: student fine-tuning mode (``full``, ``frozen_encoder``, ``lora``).
        lora: adapter settings for ``finetune: lora``.
        loss: ground-truth loss weights (SAM3 detector + SAM2 refinement recipe).
        optimizer: learning rates, parameter groups, warm-up and cosine schedule.
        prediction: post-processing for validation metrics, test and ``predict``.
        image_size: the data pipeline's canvas size (linked from the data module); each model
            resizes the canvas to its own input size (``model_args.image_size`` for the student).
        compile: ``torch.compile`` the student's image encoder (each Hiera block, or the timm trunk).
        activation_checkpointing: recompute the student's image-encoder activations in the backward
            pass (each Hiera block, or each timm stage): less memory, more encoder compute.
    """

    def __init__(
        self,
        model: str = "grounded_sam2_student_tiny",
        model_args: dict[str, Any] | None = None,
        teacher: str = "sam3_image_tiny",
        teacher_checkpoint: str | None = None,
        teacher_args: dict[str, Any] | None = None,
        mode: DistillMode = "online",
        distill: DistillWeights | None = None,
        teacher_top_k: int = 16,
        teacher_mask_size: int = 64,
        teacher_dim: int | None = None,
        init_head_from_teacher: bool = False,
        sam2_checkpoint: str | None = None,
        sam3_checkpoint: str | None = None,
        finetune: FinetuneMode = "full",
        lora: LoraSettings | None = None,
        loss: GroundingLossWeights | None = None,
        optimizer: OptimizerConfig | None = None,
        prediction: PredictSettings | None = None,
        image_size: int | None = None,
        compile: bool = False,
        activation_checkpointing: bool = False,
    ) -> None:
        super().__init__(
            model=model,
            model_args=model_args,
            sam2_checkpoint=sam2_checkpoint,
            sam3_checkpoint=sam3_checkpoint,
            finetune=finetune,
            lora=lora,
            loss=loss,
            optimizer=optimizer,
            prediction=prediction,
            image_size=image_size,
            compile=compile,
            activation_checkpointing=activation_checkpointing,
        )

    # ------------------------------------------------------------------ configuration
    def configure_models(self) -> None:
        hp = self.hparams
        if hp.mode not in ("online", "offline"):
            raise ValueError(f"mode must be 'online' or 'offline', got {hp.mode!r}")
        self.distill_weights = config_arg(hp.distill, DistillWeights)
        self._check_mode_supports_weights()
        check_teacher_arg(hp.teacher)
        self.model = create_model(
            hp.model,
            sam2_checkpoint=hp.sam2_checkpoint,
            sam3_checkpoint=hp.sam3_checkpoint,
            **dict(hp.model_args or {}),
        )
        needs_teacher = hp.mode == "online" or hp.init_head_from_teacher or self._uses("text_")
        teacher = self._build_teacher() if needs_teacher else None
        if hp.init_head_from_teacher:
            weights = hp.teacher_checkpoint or "random weights"
            init_head_from(self.model, teacher, source=f"teacher {hp.teacher!r} ({weights})")
        apply_finetune_mode(self.model, hp.finetune, lora=config_arg(hp.lora, LoraSettings))
        self.predict_settings = config_arg(hp.prediction, PredictSettings)
        apply_prediction_settings(self.model, hp.sam2_checkpoint, self.predict_settings)
        keep = hp.mode == "online" or self._uses("text_")
        self._teacher = TeacherHolder(teacher) if keep and teacher is not None else None
        self.teacher_dim = self._teacher_dim(teacher)

    @property
    def teacher(self) -> nn.Module | None:
        """The frozen teacher (``None`` offline without text distillation); not a submodule (see above)."""
        return None if self._teacher is None else self._teacher.model

    def _uses(self, prefix: str) -> bool:
        return uses_terms(self.distill_weights, prefix)

    def _check_mode_supports_weights(self) -> None:
        w = self.distill_weights
        if self.hparams.mode == "offline" and (w.feature_mse or w.feature_cos):
            raise ValueError(
                "feature-map distillation (distill.feature_mse / feature_cos) needs the teacher's "
                "image features: use mode=online, or set both to 0 (cached shards can carry pooled "
                "features: distill.pooled_mse / pooled_cos)"
            )

    def _build_teacher(self) -> nn.Module:
        hp = self.hparams
        args = dict(hp.teacher_args or {})
        if hp.teacher_checkpoint is None:
            teacher = create_model(hp.teacher, **args)
        else:
            teacher = load_teacher(hp.teacher_checkpoint, model=hp.teacher, **args)
        return teacher.requires_grad_(False).eval()

    def _teacher_dim(self, teacher: nn.Module | None) -> int:
        given = self.hparams.teacher_dim
        if teacher is None:
            return given if given is not None else 256
        width = teacher.detector.hidden_dim
        if given is not None and given != width:
            raise ValueError(f"teacher_dim={given} but teacher {self.hparams.teacher!r} has width {width}")
        return width

    def configure_losses(self) -> None:
        self.gt_loss = GroundingLoss(config_arg(self.hparams.loss, GroundingLossWeights))
        self.distill_loss = DistillLoss(
            self.distill_weights, student_dim=self.model.detector.hidden_dim, teacher_dim=self.teacher_dim
        )
        self.loss_fn = self.objective  # what GroundingModule's step calls

    def trainable_parameter_groups(self) -> dict[str, list[tuple[str, nn.Parameter]]]:
        groups = super().trainable_parameter_groups()
        adapters = [
            (f"distill_loss.{n}", p) for n, p in self.distill_loss.named_parameters() if p.requires_grad
        ]
        if adapters:
            groups["distill_adapters"] = adapters
        return groups

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Record the student's build for ``sambridge export`` (its ``image_size`` is not the module's)."""
        checkpoint[STUDENT_SPEC_KEY] = {
            "model": self.hparams.model,
            "model_args": dict(self.hparams.model_args or {}),
        }

    # ------------------------------------------------------------------ teacher signals
    def _teacher_model(self) -> nn.Module:
        teacher = self.teacher
        if next(teacher.parameters()).device != self.device:
            teacher.to(self.device)
        return teacher

    def teacher_targets(self, batch: GroundingBatch) -> tuple[dict[str, Tensor], Tensor | None] | None:
        """Teacher targets of the batch's queries, with their ``valid`` rows, and (online) the teacher's
        stride-16 feature map; ``None`` when an offline evaluation batch carries no targets."""
        if self.hparams.mode == "online":
            with torch.no_grad():
                out = self._teacher_model()(batch.images, batch.phrases, batch.query_image)
            targets = select_teacher_targets(
                out, top_k=self.hparams.teacher_top_k, mask_size=self.hparams.teacher_mask_size
            )
            if self._uses("pooled_"):
                targets[_POOLED] = pooled_query_features(out).to(STORAGE_DTYPE)
            targets[_VALID] = torch.ones(
                batch.num_queries, dtype=torch.bool, device=out["pred_logits"].device
            )
            return targets, out["backbone_fpn"][-1]
        if batch.teacher is None:
            if self.training:
                raise ValueError(
                    f"offline distillation needs teacher targets (teacher.safetensors) in the shards; "
                    f"samples {batch.keys[:4]} have none"
                )
            return None
        if self._uses("pooled_") and _POOLED not in batch.teacher:
            raise ValueError(
                f"distill.pooled_* is on but the teacher files of {batch.keys[:4]} hold no "
                f"{_POOLED!r} (they hold {sorted(batch.teacher)})"
            )
        return batch.teacher, None

    def _text_terms(self, phrases: list[str]) -> dict[str, Tensor]:
        unique = list(dict.fromkeys(phrases))
        student = self.model.encode_phrases(unique)
        teacher = self._teacher_model().encode_text(unique)
        return self.distill_loss.text_terms(
            student["language_features"],
            student["language_mask"],
            teacher["language_features"],
            teacher["language_mask"],
        )

    # ------------------------------------------------------------------ steps
    def distill_terms(self, outputs: dict[str, Any], batch: GroundingBatch) -> dict[str, Tensor]:
        """Every weighted distillation term of the student ``outputs`` on ``batch`` (unweighted values)."""
        signals = self.teacher_targets(batch)
        if signals is None:
            return {}
        targets, teacher_map = signals
        valid = targets[_VALID]
        terms: dict[str, Tensor] = {}
        if self._uses("kd_"):
            terms.update(self.distill_loss.output_terms(outputs, targets, valid))
        if self._uses("feat_"):
            terms.update(self.distill_loss.feature_terms(outputs["backbone_fpn"][-1], teacher_map))
        if self._uses("pooled_"):
            terms.update(
                self.distill_loss.pooled_terms(pooled_query_features(outputs), targets[_POOLED], valid)
            )
        if self._uses("text_"):
            terms.update(self._text_terms(batch.phrases))
        return terms

    def objective(self, outputs: dict[str, Any], batch: GroundingBatch) -> dict[str, Tensor]:
        """Loss of student ``outputs`` (forward with ``targets=batch``): ``{"loss": total, term: value}``.

        ``GroundingModule``'s step calls it as ``self.loss_fn``, so logging and metrics are shared.
        """
        terms = self.distill_terms(outputs, batch)
        parts = [self.distill_loss.total(terms)] if terms else []
        if self.distill_weights.ground_truth > 0:
            gt = self.gt_loss(outputs, batch)
            terms.update({f"gt_{name}": value for name, value in gt.items() if "_aux_" not in name})
            parts.append(self.distill_weights.ground_truth * gt["loss"])
        if not parts:
            raise ValueError(
                f"nothing to learn from in batch {batch.keys[:4]}: no teacher targets and "
                "distill.ground_truth is 0"
            )
        return {"loss": torch.stack(parts).sum(), **terms}


def init_head_from(student: nn.Module, teacher: nn.Module, source: str) -> None:
    """Copy the teacher's grounding-head weights into the student (strict on the head's keys and shapes).

    The student's two-stage query selection (not part of SAM3's head) keeps its own initialisation.

    Raises:
        CheckpointError: naming the missing/unexpected keys and shape mismatches when the heads differ.
    """
    student_head = head_state_dict(student.detector)
    teacher_head = with_own_head_entries(head_state_dict(teacher.detector), student_head)
    check_state_dict(
        student_head,
        teacher_head,
        f"{source} head (init_head_from_teacher needs the same head dims)",
    )
    student.detector.load_state_dict(teacher_head, strict=False)
