"""GroundingModule: train Grounded SAM2 (full, frozen encoder or LoRA) on phrase-grounding shards."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from data_pipelines.batch import GroundingBatch
from sambridge.modules.base import BaseTask
from sambridge.optim import OptimizerConfig

FinetuneMode = Literal["full", "frozen_encoder", "lora"]


@dataclass
class LoraSettings:
    """LoRA adapters (peft) for ``finetune: lora``.

    Args:
        rank: adapter rank r.
        alpha: scaling numerator (``alpha / rank`` scales the update).
        dropout: dropout on the adapter input.
        target_modules: regex of module names to adapt; ``None`` takes the default (Hiera
            attention qkv/proj and SAM2 mask-decoder attention projections).
    """

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: str | None = None


@dataclass
class PredictSettings:
    """How predictions are post-processed.

    Args:
        top_k: keep at most this many instances per query.
        score_threshold: keep instances scoring at least this (score = match x presence).
        refine: refine instance masks with SAM2's prompt encoder + mask decoder from the boxes.
    """

    top_k: int = 20
    score_threshold: float = 0.3
    refine: bool = True


@dataclass
class GroundingLossWeights:
    """Loss weights (SAM3 detector recipe + SAM2 mask-decoder refinement recipe)."""

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
    extra: dict[str, float] = field(default_factory=dict)


class GroundingModule(BaseTask):
    """Grounded SAM2: a noun phrase in, every matching instance (box, score, mask) out.

    Args:
        model: registered model name (``sambridge.models.list_models()``).
        model_args: overrides passed to ``create_model`` (text tower, head sizes, ...).
        sam2_checkpoint: official SAM2 checkpoint (``sam2.1_hiera_*.pt``) to start from.
        sam3_checkpoint: SAM3 checkpoint whose detector-head weights initialise the grounding head.
        finetune: ``full`` trains everything, ``frozen_encoder`` freezes the SAM2 image encoder,
            ``lora`` trains LoRA adapters and the new head only.
        lora: adapter settings for ``finetune: lora``.
        loss: loss weights.
        optimizer: learning rates, parameter groups, warm-up and cosine schedule.
        predict: post-processing for validation metrics and ``predict``.
        image_size: model input size (square, multiple of 32); linked to the data module's.
    """

    monitor = "val_cgF1"
    mode = "max"

    def __init__(self, model: str = "grounded_sam2_tiny", model_args: dict[str, Any] | None = None,
                 sam2_checkpoint: str | None = None, sam3_checkpoint: str | None = None,
                 finetune: FinetuneMode = "full", lora: LoraSettings | None = None,
                 loss: GroundingLossWeights | None = None, optimizer: OptimizerConfig | None = None,
                 predict: PredictSettings | None = None, image_size: int | None = None) -> None:
        super().__init__(optimizer=optimizer, image_size=image_size)

    # ------------------------------------------------------------------ configuration
    def configure_models(self) -> None:
        from sambridge.models import apply_finetune_mode, create_model

        hp = self.hparams
        overrides = dict(hp.model_args or {})
        if hp.image_size is not None:
            overrides["image_size"] = hp.image_size
        self.model = create_model(hp.model, sam2_checkpoint=hp.sam2_checkpoint,
                                  sam3_checkpoint=hp.sam3_checkpoint, **overrides)
        apply_finetune_mode(self.model, hp.finetune, lora=asdict(hp.lora or LoraSettings()))
        self.predict_settings = hp.predict or PredictSettings()

    def configure_losses(self) -> None:
        from sambridge.losses import GroundingLoss

        self.loss_fn = GroundingLoss(**asdict(self.hparams.loss or GroundingLossWeights()))

    def configure_metrics(self) -> None:
        from sambridge.metrics import ConceptSegmentationMetrics

        self.val_metrics = ConceptSegmentationMetrics(prefix="val_")
        self.test_metrics = ConceptSegmentationMetrics(prefix="test_")

    def trainable_parameter_groups(self) -> dict[str, list[tuple[str, nn.Parameter]]]:
        names = {id(p): f"model.{n}" for n, p in self.model.named_parameters()}
        return {group: [(names[id(p)], p) for p in params if p.requires_grad]
                for group, params in self.model.parameter_groups().items()}

    # ------------------------------------------------------------------ steps
    def forward(self, batch: GroundingBatch) -> dict[str, torch.Tensor]:
        return self.model(batch.images, batch.phrases, batch.query_image)

    def _shared_step(self, batch: GroundingBatch, stage: str) -> torch.Tensor:
        outputs = self.model(batch.images, batch.phrases, batch.query_image)
        losses = self.loss_fn(outputs, batch)
        bs = batch.num_images
        on_step = stage == "train"
        self.log(f"{stage}_loss", losses["loss"], batch_size=bs, prog_bar=True, on_step=on_step,
                 on_epoch=not on_step, sync_dist=not on_step)
        self.log_dict({f"{stage}_{k}": v for k, v in losses.items() if k != "loss"}, batch_size=bs,
                      on_step=on_step, on_epoch=not on_step, sync_dist=not on_step)
        if stage != "train":
            metrics = self.val_metrics if stage == "val" else self.test_metrics
            predictions = self.postprocess(outputs, batch)
            metrics.update_from_batch(predictions, batch)
        return losses["loss"]

    def postprocess(self, outputs: dict[str, torch.Tensor], batch: GroundingBatch) -> dict[str, Any]:
        s = self.predict_settings
        return self.model.postprocess(outputs, top_k=s.top_k, score_threshold=s.score_threshold,
                                      refine=s.refine, out_hw=tuple(batch.images.shape[-2:]))

    def on_validation_epoch_end(self) -> None:
        self.log_dict(self.val_metrics.compute(), sync_dist=False)
        self.val_metrics.reset()

    def on_test_epoch_end(self) -> None:
        self.log_dict(self.test_metrics.compute(), sync_dist=False)
        self.test_metrics.reset()

    def predict_step(self, batch: GroundingBatch, batch_idx: int) -> dict[str, Any]:
        outputs = self.model(batch.images, batch.phrases, batch.query_image)
        return {"batch": batch, "predictions": self.postprocess(outputs, batch)}
