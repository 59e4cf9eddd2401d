"""Overlay pictures: instance masks, boxes and labels drawn on an image, with torchvision's drawing utilities.

The one overlay renderer of the project: ``sambridge data inspect --grid``, the ``PredictionWriter``
callback, the evaluation report's query grid and ``sambridge segment`` all draw through it. It sits
in the data layer so that the data tools can use it without importing ``sambridge``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torchvision.ops import masks_to_boxes
from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks

Colour = tuple[int, int, int]

#: matplotlib's tab10, as 0-255 RGB: one colour per phrase (or per instance).
PALETTE: tuple[Colour, ...] = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
                               (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207))


_PAST_LAST_PIXEL = torch.tensor([0.0, 0.0, 1.0, 1.0])
"""``masks_to_boxes`` gives the last pixel's index; an xyxy box ends past it (x1 = x0 + width)."""


def colour(index: int) -> Colour:
    """The palette colour of ``index`` (the palette repeats)."""
    return PALETTE[index % len(PALETTE)]


def draw_masks(image: np.ndarray, masks: np.ndarray | Sequence[np.ndarray], colours: Sequence[Colour] | None = None,
               alpha: float = 0.45) -> np.ndarray:
    """An (H, W, 3) uint8 ``image`` with each bool (H, W) mask blended in its colour (default: palette order).

    Pixels under no mask keep their value; pixels under several masks are blended with black
    (``torchvision.utils.draw_segmentation_masks``), which marks the overlap.
    """
    if len(masks) == 0:
        return np.array(image, dtype=np.uint8)
    masks = torch.as_tensor(np.asarray(masks, dtype=bool))
    colours = list(colours) if colours is not None else [colour(i) for i in range(len(masks))]
    drawn = draw_segmentation_masks(torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1), masks,
                                    alpha=alpha, colors=colours)
    return drawn.permute(1, 2, 0).numpy()


@dataclass
class Detection:
    """One instance to draw: a bool (H, W) mask, an optional pixel xyxy box and a label (``None``: none).

    Without a box, the mask's extent is outlined (and carries the label).
    """

    mask: np.ndarray
    label: str | None
    box_xyxy: Sequence[float] | None = None
    colour_index: int = 0


def draw_detections(image: np.ndarray, detections: Sequence[Detection], alpha: float = 0.45,
                    min_size: int = 384, box_width: int = 2) -> Image.Image:
    """Blend each mask in its colour, outline its box and write its label on black; returns a PIL image.

    Small images are upscaled (nearest, by a whole factor) to at least ``min_size`` on the short side
    so labels stay legible; masks are blended before, boxes and labels drawn after the upscaling.
    """
    colours = [colour(d.colour_index) for d in detections]
    canvas = draw_masks(image, [d.mask for d in detections], colours, alpha)
    scale = max(1, int(np.ceil(min_size / max(1, min(image.shape[:2])))))
    if scale > 1:
        canvas = canvas.repeat(scale, axis=0).repeat(scale, axis=1)
    boxed = [(d, c) for d, c in zip(detections, colours, strict=True) if d.box_xyxy is not None or d.mask.any()]
    if not boxed:
        return Image.fromarray(canvas)
    boxes = torch.stack([torch.as_tensor(d.box_xyxy, dtype=torch.float32) if d.box_xyxy is not None
                         else masks_to_boxes(torch.from_numpy(d.mask)[None])[0] + _PAST_LAST_PIXEL
                         for d, _ in boxed]) * scale
    picture = draw_bounding_boxes(torch.from_numpy(canvas).permute(2, 0, 1), boxes, labels=[d.label for d, _ in boxed],
                                  colors=[c for _, c in boxed], width=box_width, label_colors=[c for _, c in boxed],
                                  label_background_colors="black", fill_labels=True)
    return Image.fromarray(picture.permute(1, 2, 0).numpy())
