"""Segment images from noun phrases with a trained checkpoint (whole images or tiled large ones)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from data_pipelines.augment import AugmentConfig, sample_geometry, warp_image
from data_pipelines.schema import decode_rle
from data_pipelines.tiling import TilingConfig, predict_tiled
from sambridge.export import model_from_checkpoint
from sambridge.models import load_student
from sambridge.modules.checkpoint import CONFIG_CLASSES, is_lightning_checkpoint


def load_model(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> nn.Module:
    """The grounding model of a sambridge Lightning checkpoint (``.ckpt``) or an exported student, in eval mode.

    A Lightning checkpoint (``GroundingModule``, ``DistillModule``) is rebuilt from the registered
    model name and build arguments it records, LoRA adapters merged (``sambridge.export``): only the
    trained model, so a distillation checkpoint needs neither its teacher nor the weight files it
    started from. Everything loads with ``weights_only=True``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    checkpoint = None
    if path.suffix != ".safetensors":
        with torch.serialization.safe_globals(list(CONFIG_CLASSES)):
            checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    if is_lightning_checkpoint(checkpoint):
        model, _, _ = model_from_checkpoint(path)
        return model.to(map_location).eval()
    return load_student(path, device=map_location).eval()


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
        h, w = image.shape[:2]
        geometry = sample_geometry((h, w), self.canvas)
        canvas = warp_image(torch.from_numpy(np.array(image)).permute(2, 0, 1), geometry)
        out = self.model(canvas[None].to(self.device), list(phrases), torch.zeros(len(phrases), dtype=torch.long))
        size = self.canvas.image_size
        pred = self.model.postprocess(out, top_k=self.top_k, score_threshold=self.score_threshold,
                                      refine=self.refine, out_hw=(size, size), nms_iou=self.nms_iou)
        vh, vw = geometry.valid_hw
        results = []
        for q in range(len(phrases)):
            found = []
            for k in pred["keep"][q].nonzero()[:, 0].tolist():
                mask = pred["masks"][q, k, :vh, :vw][None, None].float()
                mask = torch.nn.functional.interpolate(mask, size=(h, w), mode="bilinear", align_corners=False)
                box = (pred["boxes_xyxy"][q, k] * size).tolist()
                scale_x, scale_y = w / vw, h / vh
                found.append(Segment(mask=(mask[0, 0] >= 0.5).cpu().numpy(), score=float(pred["scores"][q, k]),
                                     box_xyxy=(box[0] * scale_x, box[1] * scale_y, box[2] * scale_x,
                                               box[3] * scale_y)))
            results.append(found)
        return results

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
