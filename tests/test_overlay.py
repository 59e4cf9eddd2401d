"""The one overlay renderer (data_pipelines.overlay): masks blended, boxes outlined, labels on black."""

from __future__ import annotations

import warnings

import numpy as np

from data_pipelines.overlay import Detection, colour, draw_detections, draw_masks


def _image() -> np.ndarray:
    return np.full((20, 30, 3), 200, dtype=np.uint8)


def test_masks_blend_in_their_colour_and_leave_the_rest():
    masks = np.zeros((2, 20, 30), dtype=bool)
    masks[0, :5, :5] = masks[1, 10:, 10:] = True
    drawn = draw_masks(_image(), masks, alpha=0.5)
    assert drawn.dtype == np.uint8 and drawn.shape == (20, 30, 3)
    assert (drawn[~masks.any(0)] == 200).all()
    expected = (np.array([200, 200, 200]) + np.array(colour(1))) / 2
    assert np.abs(drawn[15, 15].astype(float) - expected).max() <= 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torchvision warns on an empty mask set; we do not call it then
        assert (draw_masks(_image(), np.zeros((0, 20, 30), bool)) == _image()).all()


def test_detections_are_upscaled_boxed_and_labelled():
    mask = np.zeros((20, 30), dtype=bool)
    mask[4:12, 6:20] = True
    boxed = Detection(mask=mask, label="thing 0.90", box_xyxy=(6, 4, 20, 12), colour_index=3)
    unboxed = Detection(mask=np.roll(mask, 6, axis=0), label=None, colour_index=1)  # boxed by its mask's extent
    nothing = Detection(mask=np.zeros_like(mask), label="gone")  # no box, empty mask: not drawn
    picture = np.asarray(draw_detections(_image(), [boxed, unboxed, nothing], min_size=100))
    assert picture.shape == (100, 150, 3)  # a whole factor: 5
    assert tuple(picture[4 * 5 + 10, 20 * 5 - 1]) == colour(3)  # the right edge of the box, 2 px wide
    assert tuple(picture[18 * 5 - 1, 15 * 5]) == colour(1)  # the bottom edge of the mask's extent (rows 10-17)
    label_area = picture[4 * 5 + 5:4 * 5 + 15, 6 * 5 + 3:6 * 5 + 50]  # inside the label's black patch
    text = (label_area[..., 0] > 100) & (label_area[..., 1] < 60)  # antialiased red text (colour 3)
    assert (label_area == 0).all(axis=-1).sum() > label_area.shape[0] * label_area.shape[1] // 2 and text.any()
    assert np.asarray(draw_detections(_image(), [], min_size=0)).shape == (20, 30, 3)
