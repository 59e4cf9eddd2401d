"""Augmentation that keeps an image, its instance masks and their boxes consistent.

Every image goes onto a square canvas of ``image_size``: resized so its longest side fits, then
zero-padded at the bottom/right (the content's extent is ``valid_hw``). Training may add

- scale jitter: the resize is multiplied by a random factor; a larger image is cropped back to
  the canvas at a random offset, a smaller one is padded;
- horizontal flip of the content;
- colour jitter of the image only (brightness, contrast, saturation; no hue shift, because
  hue changes what colour phrases such as "red apple" refer to).

The image and its masks go through the same geometry (:class:`Geometry`); masks are resized
bilinearly and thresholded at one half, like the image's own blending at edges. Boxes are not
transformed but recomputed as the tight boxes of the transformed masks, and instances left with
fewer than ``min_instance_area`` pixels are dropped by the caller (see ``collate.SampleTransform``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from torch import Tensor
from torchvision.ops import box_convert


@dataclass(frozen=True)
class AugmentConfig:
    """Canvas size and random augmentation of one split.

    Attributes:
        image_size: side of the square canvas in pixels.
        hflip_prob: probability of a horizontal flip.
        scale_range: (min, max) factor of the random rescale; (1, 1) disables scale jitter.
        color_jitter: strength s: brightness, contrast and saturation factors in [1 - s, 1 + s].
        min_instance_area: instances with fewer visible pixels on the canvas are dropped.
    """

    image_size: int = 1024
    hflip_prob: float = 0.0
    scale_range: tuple[float, float] = (1.0, 1.0)
    color_jitter: float = 0.0
    min_instance_area: int = 1

    def __post_init__(self) -> None:
        low, high = self.scale_range
        if self.image_size < 1 or not 0 < low <= high or not 0 <= self.hflip_prob <= 1 \
                or not 0 <= self.color_jitter < 1 or self.min_instance_area < 1:
            raise ValueError(f"invalid augmentation settings: {self} (need image_size >= 1, "
                             "0 < scale min <= max, 0 <= hflip_prob <= 1, 0 <= color_jitter < 1, "
                             "min_instance_area >= 1)")

    def resize_only(self) -> AugmentConfig:
        """The same canvas without random augmentation (validation, test, predict)."""
        return AugmentConfig(image_size=self.image_size, min_instance_area=self.min_instance_area)


@dataclass(frozen=True)
class Geometry:
    """Where an image lands on the canvas: scale to ``scaled_hw``, flip, then crop at ``offset``.

    Attributes:
        orig_hw: the image's size.
        scaled_hw: its size after resizing.
        offset: (y, x) of the canvas' top-left corner inside the scaled (and flipped) image.
        flip: mirror left-right after resizing.
        canvas: the canvas side.
    """

    orig_hw: tuple[int, int]
    scaled_hw: tuple[int, int]
    offset: tuple[int, int]
    flip: bool
    canvas: int

    @property
    def valid_hw(self) -> tuple[int, int]:
        """Height and width of the image content on the canvas."""
        return (min(self.scaled_hw[0] - self.offset[0], self.canvas),
                min(self.scaled_hw[1] - self.offset[1], self.canvas))


def sample_geometry(orig_hw: tuple[int, int], config: AugmentConfig, rng: np.random.Generator | None = None,
                    allow_flip: bool = True) -> Geometry:
    """Draw the geometry of one image (no randomness without ``rng``: resize and pad only)."""
    h, w = orig_hw
    scale = config.image_size / max(h, w)
    if rng is not None and config.scale_range != (1.0, 1.0):
        scale *= float(rng.uniform(*config.scale_range))
    scaled = (max(1, round(h * scale)), max(1, round(w * scale)))
    offset = tuple(int(rng.integers(0, n - config.image_size + 1))
                   if rng is not None and n > config.image_size else 0 for n in scaled)
    flip = allow_flip and rng is not None and config.hflip_prob > 0 and bool(rng.random() < config.hflip_prob)
    return Geometry(orig_hw=(h, w), scaled_hw=scaled, offset=offset, flip=flip, canvas=config.image_size)


def _warp_content(x: Tensor, geometry: Geometry) -> Tensor:
    """(C, H, W) uint8 -> the (C, vh, vw) part of the canvas holding content."""
    if tuple(x.shape[-2:]) != geometry.scaled_hw:
        x = TF.resize(x, list(geometry.scaled_hw), antialias=True)
    if geometry.flip:
        x = x.flip(-1)
    (top, left), (vh, vw) = geometry.offset, geometry.valid_hw
    return x[..., top:top + vh, left:left + vw]


def _pad(x: Tensor, canvas: int) -> Tensor:
    out = x.new_zeros((*x.shape[:-2], canvas, canvas))
    out[..., :x.shape[-2], :x.shape[-1]] = x
    return out


def warp_image(image: Tensor, geometry: Geometry, color_jitter: float = 0.0,
               rng: np.random.Generator | None = None) -> Tensor:
    """(3, H, W) uint8 -> (3, S, S) float32 in [0, 1] on the canvas, colour-jittered if asked."""
    content = _warp_content(image, geometry).float().div_(255.0)
    if rng is not None and color_jitter > 0:
        content = jitter_colour(content, color_jitter, rng)
    return _pad(content, geometry.canvas)


def warp_masks(masks: Tensor, geometry: Geometry) -> Tensor:
    """(N, H, W) bool -> (N, S, S) bool on the canvas, through the image's geometry."""
    if masks.shape[0] == 0:
        return masks.new_zeros((0, geometry.canvas, geometry.canvas))
    content = _warp_content(masks.to(torch.uint8) * 255, geometry) >= 128
    return _pad(content, geometry.canvas)


def jitter_colour(image: Tensor, strength: float, rng: np.random.Generator) -> Tensor:
    """Random brightness, contrast and saturation factors in [1 - strength, 1 + strength]."""
    brightness, contrast, saturation = rng.uniform(1 - strength, 1 + strength, 3)
    image = TF.adjust_brightness(image, float(brightness))
    image = TF.adjust_contrast(image, float(contrast))
    return TF.adjust_saturation(image, float(saturation)).clamp_(0.0, 1.0)


def mask_areas_and_boxes(masks: Tensor) -> tuple[Tensor, Tensor]:
    """(N, H, W) bool masks -> pixel counts (N,) and tight boxes (N, 4) (x0, y0, x1, y1), x1/y1 exclusive.

    Boxes of empty masks are meaningless. Computed from row/column projections of a uint8 view,
    which is two orders of magnitude faster than ``torchvision.ops.masks_to_boxes`` at 1024 px.
    """
    n, h, w = masks.shape
    if n == 0:
        return torch.zeros(0, dtype=torch.long), torch.zeros((0, 4))
    pixels = masks.view(torch.uint8)
    rows, cols = pixels.amax(2), pixels.amax(1)
    y0, y1 = rows.argmax(1), h - rows.flip(1).argmax(1)
    x0, x1 = cols.argmax(1), w - cols.flip(1).argmax(1)
    areas = pixels.flatten(1).sum(1, dtype=torch.int32).long()
    return areas, torch.stack([x0, y0, x1, y1], 1).float()


def tight_boxes(masks: Tensor) -> Tensor:
    """(N, H, W) non-empty bool masks -> (N, 4) tight boxes (x0, y0, x1, y1), x1/y1 exclusive."""
    return mask_areas_and_boxes(masks)[1]


def normalized_cxcywh(boxes: Tensor, canvas: int) -> Tensor:
    """(N, 4) xyxy pixel boxes -> (cx, cy, w, h) relative to the canvas."""
    return box_convert(boxes, "xyxy", "cxcywh") / canvas
