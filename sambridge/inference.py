"""Segment images from noun phrases with a trained checkpoint (whole images or tiled large ones)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from data_pipelines.augment import AugmentConfig, Geometry, sample_geometry, warp_image
from data_pipelines.schema import decode_rle
from data_pipelines.tiling import TilingConfig, predict_tiled
from sambridge.modules.checkpoint import load_trained_model as load_model

__all__ = ["Segment", "Segmenter", "load_model"]


@dataclass
class Segment:
    """One found instance: a bool mask at the image size, its score and pixel box (x0, y0, x1, y1)."""

    mask: np.ndarray
    score: float
    box_xyxy: tuple[float, float, float, float]


class Segmenter:
    """Noun phrases in, instances out, on images of any size.

    Args:
        model: a grounding model (``GroundedSAM2``, a SAM3 teacher, a student).
        score_threshold: keep instances scoring at least this.
        top_k: instances per phrase at most (per tile when tiling).
        refine: masks from SAM2's mask decoder (True) or the grounding head (False); ``None``: the
            model's own default (``refine_masks``, what its training run validated with).
        nms_iou: drop detections overlapping a higher-scoring one of the same phrase by box IoU above this.
        device: where to run.
    """

    def __init__(self, model: nn.Module, score_threshold: float = 0.5, top_k: int = 100,
                 refine: bool | None = None, nms_iou: float | None = None,
                 device: str | torch.device = "cpu") -> None:
        self.model = model.eval().to(device)
        self.score_threshold, self.top_k, self.refine, self.device = score_threshold, top_k, refine, device
        self.nms_iou = nms_iou
        self.canvas = AugmentConfig(image_size=model.image_size)

    @torch.no_grad()
    def segment(self, image: np.ndarray, phrases: list[str]) -> list[list[Segment]]:
        """Per phrase, the instances found in an (H, W, 3) uint8 image (letterboxed to the model size)."""
        return self.segment_batch([image], phrases)[0]

    @torch.no_grad()
    def segment_batch(self, images: Sequence[np.ndarray], phrases: list[str]) -> list[list[list[Segment]]]:
        """:meth:`segment` of several images (any sizes) in one forward: per image, per phrase, the instances."""
        geometries = [sample_geometry(image.shape[:2], self.canvas) for image in images]
        canvases = torch.stack([warp_image(torch.from_numpy(np.array(image)).permute(2, 0, 1), geometry)
                                for image, geometry in zip(images, geometries, strict=True)])
        query_image = torch.arange(len(images)).repeat_interleave(len(phrases))
        out = self.model(canvases.to(self.device), list(phrases) * len(images), query_image)
        size = self.canvas.image_size
        pred = self.model.postprocess(out, top_k=self.top_k, score_threshold=self.score_threshold,
                                      refine=self.refine, out_hw=(size, size), nms_iou=self.nms_iou)
        return [[self._instances(pred, i * len(phrases) + q, geometry) for q in range(len(phrases))]
                for i, geometry in enumerate(geometries)]

    def _instances(self, pred: dict[str, torch.Tensor], query: int, geometry: Geometry) -> list[Segment]:
        """The kept detections of one query, masks and boxes mapped from the canvas to the image."""
        (h, w), (vh, vw) = geometry.orig_hw, geometry.valid_hw
        size = self.canvas.image_size
        scale_x, scale_y = w / vw, h / vh
        found = []
        for k in pred["keep"][query].nonzero()[:, 0].tolist():
            mask = pred["masks"][query, k, :vh, :vw][None, None].float()
            mask = torch.nn.functional.interpolate(mask, size=(h, w), mode="bilinear", align_corners=False)
            box = (pred["boxes_xyxy"][query, k] * size).tolist()
            found.append(Segment(mask=(mask[0, 0] >= 0.5).cpu().numpy(), score=float(pred["scores"][query, k]),
                                 box_xyxy=(box[0] * scale_x, box[1] * scale_y, box[2] * scale_x, box[3] * scale_y)))
        return found

    def segment_tiled(self, image: np.ndarray, phrases: list[str], tiling: TilingConfig,
                      progress: bool = True) -> list[list[Segment]]:
        """Large images: overlapping tiles at full resolution, pieces merged across tile borders."""
        def predict_tile(tile: np.ndarray, tile_phrases: list[str]):
            return [[(s.mask, s.score) for s in found] for found in self.segment(tile, tile_phrases)]

        merged = predict_tiled(image, list(phrases), predict_tile, tiling, progress=progress)
        results = []
        for phrase in phrases:
            found = []
            for pred in merged[phrase]:
                x, y, bw, bh = pred.bbox
                found.append(Segment(mask=decode_rle(pred.rle), score=pred.score, box_xyxy=(x, y, x + bw, y + bh)))
            results.append(found)
        return results
