"""Overlay pictures: instance masks, boxes and phrase labels drawn on an image."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

# tab10, as 0-255 RGB: one colour per phrase
PALETTE = np.array([(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
                    (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)],
                   dtype=np.float32)


@dataclass
class Detection:
    """One instance to draw: a bool (H, W) mask, an optional pixel xyxy box and a label."""

    mask: np.ndarray
    label: str
    box_xyxy: Sequence[float] | None = None
    colour_index: int = 0


def draw_detections(image: np.ndarray, detections: Sequence[Detection], alpha: float = 0.45,
                    min_size: int = 384) -> Image.Image:
    """Blend each mask in its colour, outline its box and write its label; returns a PIL image.

    Small images are upscaled (nearest) to at least ``min_size`` on the short side so labels
    stay legible.
    """
    canvas = image.astype(np.float32).copy()
    for det in detections:
        colour = PALETTE[det.colour_index % len(PALETTE)]
        canvas[det.mask] = (1 - alpha) * canvas[det.mask] + alpha * colour
    out = Image.fromarray(canvas.round().clip(0, 255).astype(np.uint8))
    scale = max(1, int(np.ceil(min_size / max(1, min(image.shape[:2])))))
    if scale > 1:
        out = out.resize((out.width * scale, out.height * scale), Image.NEAREST)
    draw = ImageDraw.Draw(out)
    for det in detections:
        colour = tuple(int(c) for c in PALETTE[det.colour_index % len(PALETTE)])
        if det.box_xyxy is not None:
            x0, y0, x1, y1 = (float(v) * scale for v in det.box_xyxy)
            draw.rectangle((x0, y0, x1, y1), outline=colour, width=2)
            anchor = (x0 + 2, y0 + 1)
        else:
            ys, xs = np.nonzero(det.mask)
            if not len(xs):
                continue
            anchor = (float(xs.min()) * scale + 2, float(ys.min()) * scale + 1)
        left, top, right, bottom = draw.textbbox(anchor, det.label)
        draw.rectangle((left - 1, top - 1, right + 1, bottom + 1), fill=(0, 0, 0))
        draw.text(anchor, det.label, fill=colour)
    return out


def to_uint8_image(image) -> np.ndarray:
    """(3, H, W) float tensor in [0, 1] -> (H, W, 3) uint8 array."""
    return (image.detach().float().clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()
