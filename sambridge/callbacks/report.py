"""Per-phrase tables and a best/worst query picture after each validation and test epoch."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
from lightning.pytorch.callbacks import Callback

from data_pipelines.batch import GroundingBatch
from sambridge.metrics import DEFAULT_SCORE_THRESHOLD, mask_ious, match_query
from sambridge.metrics.cgf1 import local_f1
from sambridge.report import (
    QueryView,
    log_figure,
    query_grid_figure,
    rank_queries,
    reliability_figure,
    save_figure,
    write_phrase_table,
)
from sambridge.visualize import to_uint8_image


def query_quality(pred_masks, scores, gt_masks, score_threshold: float = DEFAULT_SCORE_THRESHOLD) -> float:
    """A query's F1 averaged over IoU thresholds (1.0 for a correctly rejected phrase), as reports rank."""
    match = match_query(mask_ious(pred_masks, gt_masks), scores.double().cpu().numpy(),
                        score_threshold=score_threshold, max_dets=100)
    num_gt, num_pred = gt_masks.shape[0], len(match.detections)
    if num_gt == 0 and num_pred == 0:
        return 1.0
    return float(local_f1(match.tp[None], np.array([num_gt]), np.array([num_pred])).mean())


class EvaluationReport(Callback):
    """Writes ``{stage}_step{N}_per_phrase.csv/.md``, ``{stage}_step{N}_queries.png`` (the best and
    worst of the first ``candidates`` queries: image, ground truth, prediction) and
    ``{stage}_step{N}_calibration.png`` (reliability diagram of the detection scores) into
    ``output_dir`` and logs the pictures to a wandb or TensorBoard logger.

    Expects the module's ``validation_step``/``test_step`` to return ``predictions`` (as
    ``GroundedSAM2.postprocess``) and to hold ``val_metrics``/``test_metrics``
    (``ConceptSegmentationMetrics``) that are reset after this callback runs.

    Args:
        output_dir: where to write (default: ``<logger log_dir or default_root_dir>/reports``).
        grid_queries: best and worst queries shown (each).
        candidates: queries (the first of the epoch, on rank 0) the picture chooses from.
    """

    def __init__(self, output_dir: str | None = None, grid_queries: int = 4, candidates: int = 64) -> None:
        super().__init__()
        self.output_dir, self.grid_queries, self.candidates = output_dir, grid_queries, candidates
        self.views: list[QueryView] = []
        self.quality: list[float] = []

    def _dir(self, trainer: pl.Trainer) -> Path:
        if self.output_dir:
            return Path(self.output_dir)
        log_dir = trainer.logger.log_dir if trainer.logger is not None and trainer.logger.log_dir else None
        return Path(log_dir or trainer.default_root_dir) / "reports"

    def _collect(self, trainer: pl.Trainer, outputs: Any, batch: GroundingBatch) -> None:
        if not trainer.is_global_zero or len(self.views) >= self.candidates or not isinstance(outputs, dict):
            return
        predictions = outputs.get("predictions")
        if predictions is None:
            return
        for q, rows in enumerate(batch.instance_slices()):
            if len(self.views) >= self.candidates:
                break
            if not bool(batch.exhaustive[q]):
                continue
            image = int(batch.query_image[q])
            h, w = batch.valid_hw[image].tolist()
            keep = predictions["keep"][q]
            pred, scores = predictions["masks"][q][keep][:, :h, :w].cpu(), predictions["scores"][q][keep].cpu()
            gt = batch.masks[rows, :h, :w].cpu()
            quality = query_quality(pred, scores, gt)
            shown = pred[scores >= DEFAULT_SCORE_THRESHOLD]
            self.views.append(QueryView(image=to_uint8_image(batch.images[image][:, :h, :w]),
                                        phrase=batch.phrases[q], gt_masks=gt.numpy(), pred_masks=shown.numpy(),
                                        caption=f"F1 {quality:.2f}, {len(shown)} found / {len(gt)} true"))
            self.quality.append(quality)

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if not trainer.sanity_checking:
            self._collect(trainer, outputs, batch)

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._collect(trainer, outputs, batch)

    def _report(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        metrics = getattr(pl_module, f"{stage}_metrics", None)
        if metrics is None or trainer.sanity_checking:
            return
        rows = metrics.per_phrase()  # collectives under DDP: every rank calls them
        reliability = metrics.calibration()
        if trainer.is_global_zero:
            out = self._dir(trainer)
            stem = out / f"{stage}_step{trainer.global_step:07d}"
            if rows:
                write_phrase_table(rows, f"{stem}_per_phrase.csv", f"{stem}_per_phrase.md")
            best, worst = rank_queries(np.asarray(self.quality), self.grid_queries)
            figure = query_grid_figure([self.views[i] for i in best], [self.views[i] for i in worst])
            save_figure(figure, f"{stem}_queries.png")
            log_figure(trainer.logger, figure, key=f"{stage}/queries", step=trainer.global_step)
            figure = reliability_figure({stage: reliability})
            save_figure(figure, f"{stem}_calibration.png")
            log_figure(trainer.logger, figure, key=f"{stage}/calibration", step=trainer.global_step)
        self.views, self.quality = [], []

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        self._report(trainer, pl_module, "val")

    def on_test_epoch_end(self, trainer, pl_module) -> None:
        self._report(trainer, pl_module, "test")
