"""GroundingModule: train Grounded SAM2 (full, frozen encoder or LoRA) on phrase-grounding shards."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from data_pipelines.batch import GroundingBatch
from sambridge.losses import GroundingLoss, GroundingLossWeights
from sambridge.metrics import ConceptSegmentationMetrics
from sambridge.models import DETECTION_SCORES, LoraSettings, apply_finetune_mode, create_model
from sambridge.modules.base import BaseTask, config_arg
from sambridge.optim import OptimizerConfig

FinetuneMode = Literal["full", "frozen_encoder", "lora"]


@dataclass
class PredictSettings:
    """Post-processing for validation, test and predict.

    Args:
        top_k: keep at most this many detections per query.
        score_threshold: keep detections scoring at least this (see ``score``); the metrics apply
            SAM3's own 0.5 threshold for cgF1 on top, mask AP sees all kept.
        refine: instance masks from SAM2's prompt encoder + mask decoder given the predicted boxes
            (``true``) or the grounding head's own stride-4 masks (``false``); ``null`` (default):
            SAM2's decoder when the run starts from a SAM2 checkpoint (its decoder is trained),
            the head's masks otherwise (a random decoder learns several times slower than the head).
        outputs: which decoder queries make the detections: ``one_to_one`` (SAM3's inference) or
            ``one_to_many`` (the DAC queries, trained with several matches per object: their scores
            learn far sooner, and ``nms_iou`` removes their duplicates), or ``components``: the
            connected components of the phrase's semantic mask, scored by mean probability x
            presence (needs ``loss.semantic_bce``/``semantic_dice``; touching instances merge).
        nms_iou: drop detections whose box overlaps a higher-scoring one of the same phrase by IoU
            above this (``null``: none); ``one_to_many`` outputs need it or ``mask_nms``.
        mask_nms: drop detections whose mask lies inside a higher-scoring one of the same phrase by
            more than this fraction of the smaller mask (``null``: none): removes the part-of-an-object
            detections of ``one_to_many`` outputs and keeps touching objects, whose boxes overlap more
            than their masks.
        score: a detection's score: ``match_x_presence`` (SAM3: the query's match probability times
            the phrase's presence) or ``match`` (the match probability alone); ``null`` (default):
            ``match`` when the loss trains the query scores of absent phrases too
            (``loss.score_absent``, which makes the match probability the detection's), else
            ``match_x_presence``.
    """

    top_k: int = 20
    score_threshold: float = 0.1
    refine: bool | None = None
    outputs: Literal["one_to_one", "one_to_many", "components"] = "one_to_one"
    nms_iou: float | None = None
    mask_nms: float | None = None
    score: Literal["match_x_presence", "match"] | None = None

    def __post_init__(self) -> None:
        if self.score not in (None, *DETECTION_SCORES):
            raise ValueError(f"prediction.score must be one of {DETECTION_SCORES} or null, got {self.score!r}")
        if self.outputs not in ("one_to_one", "one_to_many", "components"):
            raise ValueError("prediction.outputs must be one_to_one, one_to_many or components, "
                             f"got {self.outputs!r}")
        if self.mask_nms is not None and not 0 < self.mask_nms < 1:
            raise ValueError(f"prediction.mask_nms must be in (0, 1) or null, got {self.mask_nms}")
        if self.outputs == "one_to_many" and self.nms_iou is None and self.mask_nms is None:
            raise ValueError("prediction.outputs: one_to_many needs prediction.nms_iou (e.g. 0.5) or mask_nms: "
                             "several one-to-many queries predict each object")


def refine_by_default(sam2_checkpoint: str | None, prediction: PredictSettings | dict | None) -> bool:
    """Whether instance masks come from SAM2's decoder: as configured, else iff it started from SAM2 weights."""
    refine = config_arg(prediction, PredictSettings).refine
    return sam2_checkpoint is not None if refine is None else refine


def apply_prediction_settings(model: nn.Module, sam2_checkpoint: str | None,
                              prediction: PredictSettings | dict | None, score_absent: bool = False) -> None:
    """Make ``model``'s inference defaults (mask source, outputs, NMS, score) those the run validates with.

    ``score_absent``: whether the run's loss trained the query scores of absent phrases (``prediction.score``'s
    default).
    """
    settings = config_arg(prediction, PredictSettings)
    model.refine_masks = refine_by_default(sam2_checkpoint, settings)
    model.one_to_many_outputs = settings.outputs == "one_to_many"
    model.instances = "components" if settings.outputs == "components" else "queries"
    model.nms_iou = settings.nms_iou
    model.mask_nms = settings.mask_nms
    model.detection_score = settings.score or ("match" if score_absent else "match_x_presence")


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
        prediction: post-processing for validation metrics, test and ``predict`` (not named
            ``predict``: that is the data module's predict split, and Lightning merges both).
        image_size: model input size (square, multiple of 32); linked to the data module's.
        compile: ``torch.compile`` the image encoder (each SAM2 Hiera block, or the timm trunk).
        activation_checkpointing: recompute the image encoder's activations in the backward pass
            (each Hiera block, or each timm stage): less memory, about a third more encoder compute.
    """

    monitor = "val_cgF1"
    mode = "max"
    loss_on_progress_bar: bool | None = None
    """Show the training loss on the progress bar (``None``: on a CPU only). Lightning reads progress-bar
    metrics off the device after every batch, so on a GPU the host would wait for every step to finish
    before queueing the next; the logger still gets the loss every ``log_every_n_steps``."""

    def __init__(self, model: str = "grounded_sam2_tiny", model_args: dict[str, Any] | None = None,
                 sam2_checkpoint: str | None = None, sam3_checkpoint: str | None = None,
                 finetune: FinetuneMode = "full", lora: LoraSettings | None = None,
                 loss: GroundingLossWeights | None = None, optimizer: OptimizerConfig | None = None,
                 prediction: PredictSettings | None = None, image_size: int | None = None,
                 compile: bool = False, activation_checkpointing: bool = False) -> None:
        super().__init__(optimizer=optimizer, image_size=image_size, compile=compile,
                         activation_checkpointing=activation_checkpointing)

    # ------------------------------------------------------------------ configuration
    def configure_models(self) -> None:
        hp = self.hparams
        overrides = dict(hp.model_args or {})
        if hp.image_size is not None:
            overrides["image_size"] = hp.image_size
        checkpoints = {"sam2_checkpoint": hp.sam2_checkpoint, "sam3_checkpoint": hp.sam3_checkpoint}
        overrides.update({k: v for k, v in checkpoints.items() if v is not None})  # teachers take no SAM2 one
        self.model = create_model(hp.model, **overrides)
        apply_finetune_mode(self.model, hp.finetune, lora=config_arg(hp.lora, LoraSettings))
        self.predict_settings = config_arg(hp.prediction, PredictSettings)
        apply_prediction_settings(self.model, hp.sam2_checkpoint, self.predict_settings,
                                  score_absent=config_arg(hp.loss, GroundingLossWeights).score_absent)

    def configure_losses(self) -> None:
        self.loss_fn = GroundingLoss(config_arg(self.hparams.loss, GroundingLossWeights))
        # SAM2's refinement pass costs a mask-decoder run per matched box: skip it when nothing learns from it
        self.model.train_refinement = any(weight > 0 for weight in self.loss_fn.refine_weights.values())

    def configure_metrics(self) -> None:
        self.val_metrics = ConceptSegmentationMetrics(prefix="val_")
        self.test_metrics = ConceptSegmentationMetrics(prefix="test_")

    def trainable_parameter_groups(self) -> dict[str, list[tuple[str, nn.Parameter]]]:
        names = {id(p): f"model.{n}" for n, p in self.model.named_parameters()}
        return {group: [(names[id(p)], p) for p in params]
                for group, params in self.model.parameter_groups().items()}

    # ------------------------------------------------------------------ steps
    def forward(self, batch: GroundingBatch) -> dict[str, torch.Tensor]:
        return self.model(batch.images, batch.phrases, batch.query_image)

    def _shared_step(self, batch: GroundingBatch, stage: str) -> dict[str, Any]:
        outputs = self.model(batch.images, batch.phrases, batch.query_image, targets=batch)
        losses = self.loss_fn(outputs, batch)
        train = stage == "train"
        log = {"batch_size": batch.num_images, "on_step": train, "on_epoch": not train, "sync_dist": not train}
        on_bar = not train or (self.device.type == "cpu" if self.loss_on_progress_bar is None
                               else self.loss_on_progress_bar)
        self.log(f"{stage}_loss", losses["loss"], prog_bar=on_bar, **log)
        self.log_dict({f"{stage}_{name}": value for name, value in losses.items()
                       if name != "loss" and "_aux_" not in name}, **log)
        if train:
            return {"loss": losses["loss"]}
        predictions = self.postprocess(outputs, batch)
        (self.val_metrics if stage == "val" else self.test_metrics).update_from_batch(predictions, batch)
        return {"loss": losses["loss"], "predictions": predictions}

    def postprocess(self, outputs: dict[str, Any], batch: GroundingBatch) -> dict[str, torch.Tensor]:
        """Top-k detections per query with masks on the batch canvas."""
        s = self.predict_settings
        return self.model.postprocess(outputs, top_k=s.top_k, score_threshold=s.score_threshold,
                                      out_hw=tuple(batch.images.shape[-2:]), nms_iou=s.nms_iou,
                                      mask_nms=s.mask_nms)

    def _log_metrics(self, metrics) -> None:
        values = {name: value.float() for name, value in metrics.compute().items()}
        headline = f"{metrics.prefix}cgF1"
        self.log(headline, values.pop(headline), prog_bar=True)
        self.log_dict(values)
        metrics.reset()

    def on_validation_epoch_end(self) -> None:
        self._log_metrics(self.val_metrics)

    def on_test_epoch_end(self) -> None:
        self._log_metrics(self.test_metrics)

    def predict_step(self, batch: GroundingBatch, batch_idx: int) -> dict[str, Any]:
        outputs = self.model(batch.images, batch.phrases, batch.query_image)
        return {"predictions": self.postprocess(outputs, batch)}
