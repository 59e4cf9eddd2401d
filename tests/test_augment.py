"""Augmentation keeps image, masks and boxes aligned: resize + pad, flip, scale jitter, colour jitter."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from data_pipelines.augment import (
    AugmentConfig,
    Geometry,
    normalized_cxcywh,
    sample_geometry,
    tight_boxes,
    warp_image,
    warp_masks,
)
from data_pipelines.collate import QueryPolicy, SampleTransform
from data_pipelines.schema import Query, Sample, encode_image, instance_from_mask

H, W = 60, 100
SQUARE = (20, 10, 50, 40)  # x0, y0, x1, y1 of the red square


def red_square() -> tuple[torch.Tensor, torch.Tensor]:
    image = np.full((H, W, 3), 128, np.uint8)
    x0, y0, x1, y1 = SQUARE
    image[y0:y1, x0:x1] = (230, 20, 20)
    mask = np.zeros((H, W), bool)
    mask[y0:y1, x0:x1] = True
    return torch.from_numpy(image).permute(2, 0, 1), torch.from_numpy(mask)


def red_pixels(image: torch.Tensor) -> torch.Tensor:
    """Pixels at least half red: red - green is 210 on the square, 0 on the grey background."""
    return image[0] - image[1] >= 105 / 255


def numpy_tight_box(mask: torch.Tensor) -> list[int]:
    ys, xs = np.nonzero(mask.numpy())
    return [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]


def iou(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a & b).sum() / (a | b).sum())


@pytest.mark.parametrize(
    "geometry,expected_box",
    [
        # resize only: longest side 100 -> 50, content 30 x 50, padded at the bottom
        (Geometry((H, W), (30, 50), (0, 0), False, 50), [10, 5, 25, 20]),
        # flip mirrors the box inside the content: x -> 50 - x
        (Geometry((H, W), (30, 50), (0, 0), True, 50), [25, 5, 40, 20]),
        # jitter 1.6 x the resize (content 48 x 80), canvas cropped at (y, x) = (5, 20): the square's
        # (16, 8, 40, 32) is cut at the left edge
        (Geometry((H, W), (48, 80), (5, 20), False, 50), [0, 3, 20, 27]),
        # scale down 0.5x: content 15 x 25 padded to 50 x 50
        (Geometry((H, W), (15, 25), (0, 0), False, 50), [5, 2, 12, 10]),
    ],
)
def test_square_pixels_mask_and_box_stay_together(geometry, expected_box):
    image, mask = red_square()
    out_image = warp_image(image, geometry)
    out_mask = warp_masks(mask[None], geometry)[0]
    assert out_image.shape == (3, 50, 50) and out_image.dtype == torch.float32
    assert out_mask.shape == (50, 50) and out_mask.dtype == torch.bool
    assert iou(red_pixels(out_image), out_mask) > 0.97
    box = tight_boxes(out_mask[None])[0].tolist()
    assert box == numpy_tight_box(out_mask)
    assert box == pytest.approx(expected_box, abs=1)
    vh, vw = geometry.valid_hw
    assert out_image[:, vh:].abs().sum() == 0 and out_image[:, :, vw:].abs().sum() == 0  # padding
    assert not out_mask[vh:].any() and not out_mask[:, vw:].any()


def test_sample_geometry_without_rng_resizes_and_pads_only():
    config = AugmentConfig(image_size=64, hflip_prob=1.0, scale_range=(0.5, 2.0))
    geometry = sample_geometry((300, 200), config)
    assert geometry.scaled_hw == (64, 43) and geometry.offset == (0, 0) and not geometry.flip
    assert geometry.valid_hw == (64, 43)
    rng = np.random.default_rng(0)
    flips = [sample_geometry((300, 200), AugmentConfig(64, hflip_prob=0.5), rng).flip for _ in range(200)]
    assert 70 < sum(flips) < 130
    scales = [sample_geometry((300, 200), config, rng).scaled_hw[0] for _ in range(200)]
    assert min(scales) >= 32 and max(scales) <= 128 and len(set(scales)) > 20
    assert not sample_geometry((300, 200), config, rng, allow_flip=False).flip


def test_colour_jitter_changes_the_image_only():
    image, mask = red_square()
    geometry = Geometry((H, W), (30, 50), (0, 0), False, 50)
    plain = warp_image(image, geometry)
    jittered = warp_image(image, geometry, color_jitter=0.4, rng=np.random.default_rng(1))
    assert not torch.allclose(plain, jittered)
    assert jittered.min() >= 0 and jittered.max() <= 1
    assert jittered[:, 30:].abs().sum() == 0  # padding stays zero
    # brightness, contrast and saturation scale red - green by one factor: the half-red pixels
    # still trace the mask exactly
    difference = jittered[0] - jittered[1]
    assert iou(difference >= difference.max() / 2, warp_masks(mask[None], geometry)[0]) > 0.97


def square_sample() -> Sample:
    image, mask = red_square()
    return Sample(
        key="square",
        image=encode_image(image.permute(1, 2, 0).numpy()),
        image_format="png",
        width=W,
        height=H,
        queries=[Query("red square", [instance_from_mask(mask.numpy())])],
    )


def test_random_augmentation_keeps_boxes_tight_and_pixels_on_masks():
    record = square_sample().to_wds()
    augment = AugmentConfig(image_size=64, hflip_prob=0.5, scale_range=(0.5, 2.0), min_instance_area=20)
    transform = SampleTransform(QueryPolicy(), augment)
    rng = np.random.default_rng(0)
    seen_flips, kept = set(), 0
    for _ in range(40):
        out = transform(record, rng)
        assert out.phrases == ["red square"]
        if out.num_instances == [0]:  # cropped away: the exhaustive positive became a negative
            assert out.masks.shape == (0, 64, 64)
            continue
        kept += 1
        mask = out.masks[0]
        x0, y0, x1, y1 = numpy_tight_box(mask)
        expected = torch.tensor([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0]) / 64
        assert torch.allclose(out.boxes[0], expected, atol=1e-6)
        assert iou(red_pixels(out.image), mask) > 0.95
        seen_flips.add(x0 + x1 > out.valid_hw[1])  # square's centre right of the content's middle
    assert kept > 25 and seen_flips == {True, False}


def test_helpers_on_hand_built_masks():
    masks = torch.zeros((2, 10, 20), dtype=torch.bool)
    masks[0, 2:5, 3:9] = True
    masks[1, 9, 19] = True
    assert tight_boxes(masks).tolist() == [[3, 2, 9, 5], [19, 9, 20, 10]]
    assert normalized_cxcywh(torch.tensor([[0.0, 0.0, 10.0, 20.0]]), 20).tolist() == [[0.25, 0.5, 0.5, 1.0]]
    assert tight_boxes(torch.zeros((0, 4, 4), dtype=torch.bool)).shape == (0, 4)
    with pytest.raises(ValueError, match="invalid augmentation"):
        AugmentConfig(scale_range=(2.0, 1.0))
