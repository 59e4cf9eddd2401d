"""Write ``predict``/``test`` results: SA-Co/COCO results JSON (RLE masks) and overlay PNGs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback

from data_pipelines.atomic import write_json_atomic
from data_pipelines.batch import GroundingBatch
from data_pipelines.overlay import Detection, draw_detections
from sambridge.metrics import batch_prediction_records
from sambridge.metrics.saco import batch_ground_truth
from sambridge.visualize import to_uint8_image


class PredictionWriter(Callback):
    """Saves what a model predicts in ``predict`` (and optionally ``test``).

    Writes ``predictions.json`` (COCO/SA-Co results: ``image_id`` = the (sample, phrase) pair id,
    RLE ``segmentation`` at the original image size, ``score``, ``bbox``), ``ground_truth.json``
    for labelled shards (the same pairs, in SA-Co format) so ``sambridge evaluate`` and SAM3's
    own evaluator can score the run, and one overlay PNG per image for the first images. Under
    DDP each rank writes its own part files and rank 0 merges them.

    Args:
        output_dir: where to write (default: ``<trainer.default_root_dir>/predictions``).
        overlays: overlay PNGs to draw (0 disables them).
        overlay_threshold: detections scoring at least this are drawn.
        stages: the stages to write for (``predict``, ``test``).
    """

    def __init__(self, output_dir: str | None = None, overlays: int = 32, overlay_threshold: float = 0.5,
                 stages: tuple[str, ...] = ("predict",)) -> None:
        super().__init__()
        self.output_dir, self.overlays, self.overlay_threshold = output_dir, overlays, overlay_threshold
        self.stages = stages
        self._reset()

    def _reset(self) -> None:
        self.records: list[dict[str, Any]] = []
        self.gt_images: list[dict[str, Any]] = []
        self.gt_annotations: list[dict[str, Any]] = []
        self.drawn = 0

    def _dir(self, trainer: pl.Trainer) -> Path:
        return Path(self.output_dir or Path(trainer.default_root_dir) / "predictions")

    # ------------------------------------------------------------------ collection
    def _collect(self, trainer: pl.Trainer, outputs: dict[str, Any], batch: GroundingBatch) -> None:
        predictions = {k: v.cpu() for k, v in outputs["predictions"].items() if torch.is_tensor(v)}
        self.records += batch_prediction_records(predictions, batch)
        if batch.num_instances.numel() and (batch.exhaustive.any() or batch.num_instances.sum() > 0):
            images, annotations = batch_ground_truth(batch)
            self.gt_images += images
            self.gt_annotations += annotations
        if self.drawn < self.overlays and trainer.is_global_zero:
            self._draw(trainer, predictions, batch)

    def _draw(self, trainer: pl.Trainer, predictions: dict[str, torch.Tensor], batch: GroundingBatch) -> None:
        out = self._dir(trainer) / "overlays"
        out.mkdir(parents=True, exist_ok=True)
        canvas_h, canvas_w = batch.images.shape[-2:]
        to_pixels = torch.tensor([canvas_w, canvas_h, canvas_w, canvas_h])
        for image_index in range(batch.num_images):
            if self.drawn >= self.overlays:
                return
            h, w = batch.valid_hw[image_index].tolist()
            detections = []
            for q in (batch.query_image == image_index).nonzero()[:, 0].tolist():
                chosen = predictions["keep"][q] & (predictions["scores"][q] >= self.overlay_threshold)
                for k in chosen.nonzero()[:, 0].tolist():
                    detections.append(Detection(
                        mask=predictions["masks"][q, k, :h, :w].numpy(),
                        box_xyxy=(predictions["boxes_xyxy"][q, k] * to_pixels).tolist(),
                        label=f"{batch.phrases[q]} {predictions['scores'][q, k]:.2f}", colour_index=q))
            picture = draw_detections(to_uint8_image(batch.images[image_index][:, :h, :w]), detections)
            picture.save(out / f"{batch.keys[image_index]}.png")
            self.drawn += 1

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if "predict" in self.stages:
            self._collect(trainer, outputs, batch)

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if "test" in self.stages:
            self._collect(trainer, outputs, batch)

    # ------------------------------------------------------------------ writing
    def _write(self, trainer: pl.Trainer) -> None:
        out = self._dir(trainer)
        out.mkdir(parents=True, exist_ok=True)
        rank, world = trainer.global_rank, trainer.world_size
        part = {"predictions": self.records, "images": self.gt_images, "annotations": self.gt_annotations}
        write_json_atomic(out / f"part-rank{rank}.json", part)
        trainer.strategy.barrier("prediction-writer")
        if trainer.is_global_zero:
            parts = [json.loads((out / f"part-rank{r}.json").read_text()) for r in range(world)]
            write_json_atomic(out / "predictions.json", [rec for p in parts for rec in p["predictions"]])
            images = [img for p in parts for img in p["images"]]
            if images:
                phrases = sorted({img["text_input"] for img in images})
                # annotation ids count from 1 within each batch: renumber them across batches and ranks
                annotations = [{**a, "id": i} for i, a in enumerate((a for p in parts for a in p["annotations"]), 1)]
                write_json_atomic(out / "ground_truth.json", {
                    "info": {"description": "sambridge ground truth of the predicted (sample, phrase) pairs"},
                    "images": images, "annotations": annotations,
                    "categories": [{"id": 1, "name": "object"}], "phrases": phrases})
            for r in range(world):
                (out / f"part-rank{r}.json").unlink()
        trainer.strategy.barrier("prediction-writer-done")
        self._reset()

    def on_predict_epoch_end(self, trainer, pl_module) -> None:
        if "predict" in self.stages:
            self._write(trainer)

    def on_test_epoch_end(self, trainer, pl_module) -> None:
        if "test" in self.stages:
            self._write(trainer)
