"""Model tensors as pictures. The overlays themselves are drawn by :mod:`data_pipelines.overlay`."""

from __future__ import annotations

import numpy as np


def to_uint8_image(image) -> np.ndarray:
    """(3, H, W) float tensor in [0, 1] -> (H, W, 3) uint8 array."""
    return (image.detach().float().clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()
