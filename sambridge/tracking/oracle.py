"""A perfect detector for annotated clips: what the tracker alone achieves when every detection is right."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from data_pipelines.video import Clip


class ClipDetector(nn.Module):
    """Detects exactly the visible objects of ``clip``, frame after frame, as a grounding model would.

    ``ConceptTracker(ClipDetector(clip), clip.phrases)`` stepped through the clip's frames measures the
    tracker's own errors (association, births, deaths) apart from a model's: the ceiling its detections
    can reach. Each call of ``encode_images`` is the next frame.
    """

    def __init__(self, clip: Clip) -> None:
        super().__init__()
        self.clip = clip
        self.image_size = max(clip.height, clip.width)  # the tracker's canvas holds the frame unscaled
        self.frame = -1

    def encode_images(self, images: Tensor) -> dict:
        self.frame += 1
        return {}

    def ground(self, features: dict, phrases: list[str], query_image: Tensor) -> dict:
        return {"phrases": list(phrases)}

    def postprocess(self, out: dict, top_k: int, score_threshold: float, out_hw: tuple[int, int]) -> dict:
        """Per phrase the objects visible in this frame: their masks on the canvas, score 1."""
        found = [[m.mask(self.frame) for m in self.clip.masklets
                  if phrase in m.phrases and m.segmentations[self.frame] is not None][:top_k]
                 for phrase in out["phrases"]]
        masks = torch.zeros(len(found), max(1, *map(len, found)), *out_hw, dtype=torch.bool)
        for q, objects in enumerate(found):
            for i, mask in enumerate(objects):
                masks[q, i, :mask.shape[0], :mask.shape[1]] = torch.from_numpy(mask)
        keep = masks.flatten(2).any(-1)
        return {"masks": masks, "keep": keep, "scores": keep.float()}
