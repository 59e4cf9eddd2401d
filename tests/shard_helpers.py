"""Small scripted fixtures shared by the data-pipeline tests (images, masks, samples)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from data_pipelines.schema import Query, Sample, encode_image, instance_from_mask


def random_image(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def write_image(path: Path, height: int, width: int, seed: int = 0, fmt: str | None = None) -> bytes:
    """Write a random RGB image and return its file bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(random_image(height, width, seed)).save(path, format=fmt)
    return path.read_bytes()


def box_mask(height: int, width: int, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
    mask = np.zeros((height, width), bool)
    mask[y0:y1, x0:x1] = True
    return mask


def make_sample(index: int, height: int = 24, width: int = 32, *, key: str | None = None) -> Sample:
    """A valid sample: one positive query with 1-2 box instances and one negative."""
    masks = [box_mask(height, width, 1 + index % 5, 2, 9 + index % 5, 10)]
    if index % 2:
        masks.append(box_mask(height, width, 14, 12, 20, 20))
    return Sample(
        key=key or f"s{index:04d}",
        image=encode_image(random_image(height, width, index)),
        image_format="png",
        width=width,
        height=height,
        source="test",
        queries=[
            Query(f"thing {index % 3}", [instance_from_mask(m) for m in masks]),
            Query("absent", [], exhaustive=True),
        ],
    )
